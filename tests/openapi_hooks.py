"""Schemathesis hooks for tests/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

One rule of ``POST /v1/jobs`` (and of ``POST /v1/quote``, which takes its body) depends on the clock,
so no schema can state it: a ``not_after`` already past is refused (a job that could never run).
Before each call a past ``not_after``, at
the top of the body or in any job of a list, is moved a year ahead in its own spelling (number,
digit string or RFC 3339 time), so a schema-valid body stays schema-valid and the API must accept
it. Two rules of ``steps`` span the list and have no schema form either (each op at most once; a midi
step after a stems step): a repeated op is dropped, and a stems step is put before a midi step that
has none. Nothing else is changed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import schemathesis

from kie_extend.jobs.intake import parse_not_after

#: How far ahead a past not_after is moved, in seconds.
AHEAD = 365 * 86400.0


def _future(value: Any) -> Any:
    try:
        when = parse_not_after(value)
    except ValueError:
        return value  # not a time at all: the API must refuse it, and does
    if when > time.time() + 60:
        return value
    later = time.time() + AHEAD
    if isinstance(value, (int, float)):
        return type(value)(later)
    if value.strip().replace(".", "", 1).isdigit():
        return str(int(later))
    return datetime.fromtimestamp(later, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _steps(steps: Any) -> Any:
    if not isinstance(steps, list):
        return steps
    out: list[Any] = []
    seen: set[Any] = set()
    for step in steps:
        op = step.get("op") if isinstance(step, dict) else None
        if not isinstance(op, str) or op in seen:
            if not isinstance(op, str):
                out.append(step)
            continue
        if op == "midi" and "stems" not in seen:
            out.append({"op": "stems", "type": "separate_vocal"})
            seen.add("stems")
        seen.add(op)
        out.append(step)
    return out


def _move(obj: Any) -> None:
    if isinstance(obj, dict):
        if obj.get("not_after") is not None:
            obj["not_after"] = _future(obj["not_after"])
        if obj.get("steps") is not None:
            obj["steps"] = _steps(obj["steps"])
        if isinstance(obj.get("jobs"), list):
            for job in obj["jobs"]:
                _move(job)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    if case.operation.method.upper() == "POST" and case.operation.path in ("/v1/jobs", "/v1/quote"):
        _move(case.body)
