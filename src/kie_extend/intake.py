"""The checks every extend message passes, at the producer (Python API, CLI) and in the worker.

One function, so a request the API accepts is the request the worker accepts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import ValidationError
from .models import parse_request

#: Largest request body accepted (bytes of JSON); the provider's own limits are far below it.
MAX_REQUEST_BYTES = 64 * 1024
#: Longest idempotency key accepted.
MAX_IDEMPOTENCY_KEY = 256
#: Job ids the callback receiver can route (the id is a path segment of the callback URL).
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: Tenant names (DESIGN §11).
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Longest batch id; it may hold any printable characters but ``|`` (a separator in the store).
MAX_BATCH_ID = 128
#: Priorities: higher is admitted first.
PRIORITIES = range(0, 10)
DEFAULT_PRIORITY = 5


def parse_not_after(value: Any) -> float:
    """Epoch seconds from an ISO-8601 time (with a zone, or UTC when it has none) or epoch seconds.

    Raises ValueError with a message fit for a field error."""
    from datetime import datetime, timezone

    if isinstance(value, bool):
        raise ValueError("must be an ISO-8601 UTC time or epoch seconds")
    if isinstance(value, (int, float)):
        if not 0 < value < 1e11:
            raise ValueError("must be epoch seconds (a positive number) or an ISO-8601 UTC time")
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else _iso(text, datetime, timezone)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not an ISO-8601 UTC time (2026-12-01T12:00:00Z) or epoch seconds")


def _iso(text: str, datetime: Any, timezone: Any) -> float:
    when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return float(when.timestamp())


@dataclass
class Intake:
    """A checked message: the body to send, warnings, clean options, and every problem found."""

    body: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    tenant: str = "default"
    priority: int = DEFAULT_PRIORITY
    batch_id: str | None = None
    not_after: float | None = None
    problems: list[dict[str, str]] = field(default_factory=list)


def _json_size(value: Any) -> int | None:
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError):
        return None


def check_message(request: Any, *, settings: Settings, idempotency_key: Any = None, metadata: Any = None,
                  job_id: str | None = None, extra_kwargs: dict[str, Any] | None = None,
                  audio_duration: float | None = None, tenant: Any = None, priority: Any = None,
                  batch_id: Any = None, not_after: Any = None) -> Intake:
    """Check one extend message; problems are collected, never raised (see :func:`require`).

    ``tenant`` (default KIE_DEFAULT_TENANT), ``priority`` (0-9, default 5), ``batch_id`` and
    ``not_after`` (ISO-8601 UTC or epoch seconds; it becomes epoch seconds) are DESIGN §11's options."""
    out = Intake(tenant=settings.default_tenant)
    problems = out.problems
    check_options(out, tenant=tenant, priority=priority, batch_id=batch_id, not_after=not_after)
    if job_id is not None and not JOB_ID_PATTERN.fullmatch(job_id):
        problems.append({"field": "job_id", "message": "must be 1-128 characters of A-Z a-z 0-9 _ . : - "
                         "(it is part of the job's callback URL)"})
    for name in sorted(extra_kwargs or {}):
        problems.append({"field": name, "message": "unknown keyword argument"})
    if metadata is not None:
        size = _json_size(metadata)
        if not isinstance(metadata, dict):
            problems.append({"field": "metadata", "message": "must be a JSON object"})
        elif size is None:
            problems.append({"field": "metadata", "message": "must be JSON-serialisable"})
        elif size > settings.metadata_max_bytes:
            problems.append({"field": "metadata", "message": f"larger than {settings.metadata_max_bytes} bytes"})
        else:
            out.metadata = metadata
    if idempotency_key is not None:
        if isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            out.idempotency_key = idempotency_key
        else:
            problems.append({"field": "idempotency_key",
                             "message": f"must be a string of 1-{MAX_IDEMPOTENCY_KEY} characters"})
    size = _json_size(request)
    if size is None:
        problems.append({"field": "request", "message": "must be JSON-serialisable"})
        return out
    if size > MAX_REQUEST_BYTES:
        problems.append({"field": "request", "message": f"is {size} bytes of JSON; at most {MAX_REQUEST_BYTES}"})
        return out
    try:
        parsed = parse_request(request, allow_private_urls=settings.allow_private_urls,
                               audio_duration=audio_duration)
        out.body, out.warnings = dict(parsed.body), list(parsed.warnings)
    except ValidationError as exc:
        problems += exc.errors
    return out


def check_options(out: Intake, *, tenant: Any = None, priority: Any = None, batch_id: Any = None,
                  not_after: Any = None) -> None:
    """Check the sharing options into ``out`` (values, or problems naming the field)."""
    problems = out.problems
    if tenant is not None:
        if isinstance(tenant, str) and TENANT_PATTERN.fullmatch(tenant):
            out.tenant = tenant
        else:
            problems.append({"field": "tenant", "message": "must be 1-64 characters of A-Z a-z 0-9 _ . -"})
    if priority is not None:
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)  # JSON's 7.0 is the integer 7 (JSON Schema says so too)
        if isinstance(priority, int) and not isinstance(priority, bool) and priority in PRIORITIES:
            out.priority = priority
        else:
            problems.append({"field": "priority", "message": f"must be an integer from 0 to 9 (higher goes first), "
                             f"got {priority!r}"[:200]})
    if batch_id is not None:
        if (isinstance(batch_id, str) and 0 < len(batch_id) <= MAX_BATCH_ID and batch_id.isprintable()
                and "|" not in batch_id):
            out.batch_id = batch_id
        else:
            problems.append({"field": "batch_id", "message": f"must be 1-{MAX_BATCH_ID} printable characters "
                             "without '|'"})
    if not_after is not None:
        try:
            out.not_after = parse_not_after(not_after)
        except ValueError as exc:
            problems.append({"field": "not_after", "message": str(exc)[:200]})


def require(intake: Intake) -> Intake:
    """The intake itself, or a ValidationError listing every problem it found."""
    if intake.problems:
        raise ValidationError(intake.problems)
    return intake
