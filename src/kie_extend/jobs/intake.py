"""The checks every extend message passes, at the producer (Python API, CLI) and in the worker.

One function, so a request the API accepts is the request the worker accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kie_extend.config import Settings
from kie_extend.errors import ValidationError
from kie_extend.jobs.ids import (JOB_ID_PATTERN, MAX_ID, MAX_IDEMPOTENCY_KEY, TENANT_PATTERN,  # noqa: F401 (re-exported)
                  TEXT_FIELDS, id_problem, idempotency_problem, text_problems)
from kie_extend.jobs.plan import check_plan
from kie_extend.jobs.request import parse_request
from kie_extend.store.record import DEFAULT_PRIORITY  # noqa: F401 (re-exported)

#: Largest request body accepted (bytes of JSON); the provider's own limits are far below it.
MAX_REQUEST_BYTES = 64 * 1024
#: Longest batch id. Job ids, batch ids and tenants follow one grammar (ids.py, README "Identifiers");
#: JOB_ID_PATTERN, TENANT_PATTERN and MAX_IDEMPOTENCY_KEY are re-exported from there.
MAX_BATCH_ID = MAX_ID
#: Priorities: higher is admitted first.
PRIORITIES = range(0, 10)
#: The options, optional kwargs of ``kie_extend.extend``: sharing the account (tenant … not_after) and the
#: follow-up steps run on the finished extension (steps, takes; jobs/plan.py).
EXTEND_OPTIONS = ("tenant", "priority", "batch_id", "not_after", "steps", "takes")
#: Every keyword argument ``kie_extend.extend`` accepts, in the order the docs give them: the one
#: list hints, the Python API and the task's signature (a test compares them) agree on.
EXTEND_KWARGS = ("request", "idempotency_key", "metadata", *EXTEND_OPTIONS)
#: The field under which a message's positional arguments are reported (they are never accepted).
POSITIONAL_FIELD = "positional arguments"


def kwargs_hint() -> str:
    """``request=…, idempotency_key=…, …``: every accepted kwarg, for messages that name them."""
    return ", ".join(f"{name}=…" for name in EXTEND_KWARGS)


def near_miss(name: str, accepted: Iterable[str]) -> str | None:
    """The one of ``accepted`` that ``name`` probably meant (case, ``_`` and ``-`` ignored, or a
    small typo), or None."""
    import difflib

    def norm(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    accepted = list(accepted)
    by_norm = {norm(k): k for k in accepted}
    return by_norm.get(norm(str(name))) or next(iter(difflib.get_close_matches(str(name), accepted, n=1,
                                                                                cutoff=0.7)), None)


def unknown_name_message(name: str, accepted: tuple[str, ...], what: str = "keyword argument") -> str:
    """``unknown field; did you mean batch_id? accepted: …``: the problem text for a name that is
    not one of ``accepted``, with a near miss (see :func:`near_miss`)."""
    close = near_miss(name, accepted)
    hint = f"did you mean {close}? " if close else ""
    return f"unknown {what}; {hint}accepted: {', '.join(accepted)}"


def unknown_kwarg_message(name: str) -> str:
    """The problem text for a kwarg ``kie_extend.extend`` does not take, with a near miss named."""
    return unknown_name_message(name, EXTEND_KWARGS)


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
    steps: list[dict[str, Any]] | None = None
    takes: str = "all"
    problems: list[dict[str, str]] = field(default_factory=list)


def _json_size(value: Any, strict: bool = False) -> int | None:
    """Bytes of ``value`` as JSON; None when it is not JSON. ``strict``: NaN and Infinity are not
    JSON either (a record holding one could not be answered on /v1 or sent in an event); the
    request's fields get their own "must be a finite number" instead."""
    try:
        return len(json.dumps(value, allow_nan=not strict))
    except (TypeError, ValueError):
        return None


def check_message(request: Any, *, settings: Settings, idempotency_key: Any = None, metadata: Any = None,
                  job_id: str | None = None, extra_kwargs: dict[str, Any] | None = None,
                  audio_duration: float | None = None, tenant: Any = None, priority: Any = None,
                  batch_id: Any = None, not_after: Any = None, steps: Any = None, takes: Any = None,
                  refuse_past: bool = False) -> Intake:
    """Check one extend message; problems are collected, never raised (see :func:`require`).

    ``tenant`` (default KIE_DEFAULT_TENANT; with KIE_TENANTS_STRICT, one the tenants file does not
    declare is a problem, and so is naming none when the default tenant is not declared),
    ``priority`` (0-9, default 5), ``batch_id`` and
    ``not_after`` (ISO-8601 UTC or epoch seconds; it becomes epoch seconds) are the sharing options (README "Sharing one account");
    ``steps`` and ``takes`` the follow-up plan (jobs/plan.py, README "Follow-up steps").
    ``refuse_past`` (producers: the Python API, the HTTP API, the CLI) makes a ``not_after`` already
    past a problem; the worker leaves it off and cancels such a job with reason ``deadline``."""
    out = Intake(tenant=settings.default_tenant)
    problems = out.problems
    check_options(out, tenant=tenant, priority=priority, batch_id=batch_id, not_after=not_after,
                  steps=steps, takes=takes, refuse_past=refuse_past)
    if tenant is not None and tenant == out.tenant and undeclared(settings, tenant):
        problems.append({"field": "tenant", "message": f"{tenant!r} is not a tenant of KIE_TENANTS_FILE "
                         "(KIE_TENANTS_STRICT is on): use a declared tenant"})
    elif tenant is None and undeclared(settings, out.tenant):
        # No tenant named: it would run as KIE_DEFAULT_TENANT, which strict mode allows only when
        # the file declares it (else a producer could take an undeclared share by naming none).
        problems.append({"field": "tenant", "message": f"no tenant named, and KIE_DEFAULT_TENANT {out.tenant!r} is "
                         "not a tenant of KIE_TENANTS_FILE (KIE_TENANTS_STRICT is on): name a declared tenant, "
                         "or declare the default one"})
    if job_id is not None and id_problem("job_id", job_id):
        problems.append(id_problem("job_id", job_id))  # type: ignore[arg-type]
    for name in sorted(extra_kwargs or {}):
        if name == POSITIONAL_FIELD:
            problems.append({"field": name, "message": "positional arguments are not accepted; send keyword "
                             f"arguments: {kwargs_hint()}"})
        else:
            problems.append({"field": name, "message": unknown_kwarg_message(name)})
    if metadata is not None:
        size = _json_size(metadata, strict=True)
        if not isinstance(metadata, dict):
            problems.append({"field": "metadata", "message": "must be a JSON object"})
        elif size is None:
            problems.append({"field": "metadata", "message": "must be JSON-serialisable (no NaN or Infinity)"})
        elif size > settings.metadata_max_bytes:
            problems.append({"field": "metadata", "message": f"larger than {settings.metadata_max_bytes} bytes"})
        elif text_problems(metadata, "metadata"):
            problems += text_problems(metadata, "metadata")
        else:
            out.metadata = metadata
    if idempotency_key is not None:
        bad_key = idempotency_problem(idempotency_key)
        if bad_key:
            problems.append(bad_key)
        else:
            out.idempotency_key = idempotency_key
    if request is None and POSITIONAL_FIELD in (extra_kwargs or {}):
        return out  # the request came positionally: that is the one problem to report
    size = _json_size(request)
    if size is None:
        problems.append({"field": "request", "message": "must be JSON-serialisable"})
        return out
    if size > MAX_REQUEST_BYTES:
        problems.append({"field": "request", "message": f"is {size} bytes of JSON; at most {MAX_REQUEST_BYTES}"})
        return out
    if isinstance(request, dict):
        # Text KIE could not take (an unpaired surrogate anywhere; NUL or another control character
        # in its text fields): refused before anything is sent. Metadata is never sent to KIE: only
        # what cannot be stored as text is refused there.
        bad_text = [p for k, v in request.items() for p in text_problems(v, str(k), controls=k in TEXT_FIELDS)]
        bad_text += [{"field": "request", "message": f"field name {k!r} is not valid text"}
                     for k in request if isinstance(k, str) and text_problems(k, "request")]
        if bad_text:
            problems += bad_text
            return out
    try:
        parsed = parse_request(request, allow_private_urls=settings.allow_private_urls,
                               audio_duration=audio_duration)
        out.body, out.warnings = dict(parsed.body), list(parsed.warnings)
    except ValidationError as exc:
        problems += exc.errors
    return out


def undeclared(settings: Settings, tenant: str) -> bool:
    """Whether ``tenant`` is refused as undeclared: KIE_TENANTS_STRICT is on, a tenants file is
    loaded and does not declare it (the file is read once, with the settings: no I/O here)."""
    registry = settings.tenants if settings.tenants_strict else None
    return registry is not None and not registry.declared(tenant)


def check_options(out: Intake, *, tenant: Any = None, priority: Any = None, batch_id: Any = None,
                  not_after: Any = None, steps: Any = None, takes: Any = None, refuse_past: bool = False) -> None:
    """Check the options into ``out`` (values, or problems naming the field); with
    ``refuse_past``, a ``not_after`` at or before now is a problem (see :func:`past_deadline`).
    ``steps``/``takes``: the follow-up plan (jobs/plan.py)."""
    problems = out.problems
    if steps is not None or takes is not None:
        out.steps, out.takes, found = check_plan(steps, takes)
        problems += found
    if tenant is not None:
        if id_problem("tenant", tenant):
            problems.append(id_problem("tenant", tenant))  # type: ignore[arg-type]
        else:
            out.tenant = tenant
    if priority is not None:
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)  # JSON's 7.0 is the integer 7 (JSON Schema says so too)
        if isinstance(priority, int) and not isinstance(priority, bool) and priority in PRIORITIES:
            out.priority = priority
        else:
            problems.append({"field": "priority", "message": f"must be an integer from 0 to 9 (higher goes first), "
                             f"got {priority!r}"[:200]})
    if batch_id is not None:
        if id_problem("batch_id", batch_id):
            problems.append(id_problem("batch_id", batch_id))  # type: ignore[arg-type]
        else:
            out.batch_id = batch_id
    if not_after is not None:
        try:
            out.not_after = parse_not_after(not_after)
        except ValueError as exc:
            problems.append({"field": "not_after", "message": str(exc)[:200]})
        else:
            reason = past_deadline(out.not_after) if refuse_past else None
            if reason:
                problems.append({"field": "not_after", "message": reason})


def past_deadline(not_after: float, now: float | None = None) -> str | None:
    """Why a ``not_after`` (epoch seconds) at or before ``now`` cannot be enqueued, else None."""
    import time
    from datetime import datetime, timezone

    now = time.time() if now is None else now
    if not_after > now:
        return None
    ago = now - not_after
    span = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else
            f"{ago / 3600:.0f} h" if ago < 172800 else f"{ago / 86400:.0f} days")
    when = datetime.fromtimestamp(not_after, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return (f"is already past ({when}, {span} ago): a job not sent to KIE by then is cancelled, so this one "
            "could never run; give a later time, or none")


def require(intake: Intake) -> Intake:
    """The intake itself, or a ValidationError listing every problem it found."""
    if intake.problems:
        raise ValidationError(intake.problems)
    return intake
