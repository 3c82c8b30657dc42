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


@dataclass
class Intake:
    """A checked message: the body to send, warnings, clean options, and every problem found."""

    body: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    problems: list[dict[str, str]] = field(default_factory=list)


def _json_size(value: Any) -> int | None:
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError):
        return None


def check_message(request: Any, *, settings: Settings, idempotency_key: Any = None, metadata: Any = None,
                  job_id: str | None = None, extra_kwargs: dict[str, Any] | None = None,
                  audio_duration: float | None = None) -> Intake:
    """Check one extend message; problems are collected, never raised (see :func:`require`)."""
    out = Intake()
    problems = out.problems
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


def require(intake: Intake) -> Intake:
    """The intake itself, or a ValidationError listing every problem it found."""
    if intake.problems:
        raise ValidationError(intake.problems)
    return intake
