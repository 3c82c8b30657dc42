"""A job's record, parsed once from its Redis hash into typed fields.

The store keeps a job as a hash of text fields (written by the pipeline and the store's Lua);
:meth:`JobRecord.from_hash` turns one into a :class:`JobRecord` without ever raising: a missing
field takes its default, a number that does not parse (or is not finite) reads as absent, JSON
that does not parse reads as its default. The exact hash stays on the record (``raw``) for the
few readers that need a field as stored, a field this module does not know, or a broken record
(the store's invariants, ``doctor``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kie_extend.jobs.states import JobState

#: Prefix of the per-handler delivery fields (``handler:<name>`` -> ``{"state", "attempts", ...}``).
HANDLER_PREFIX = "handler:"
#: Priority of a record that names none (or a garbled one); see README "Sharing one account".
DEFAULT_PRIORITY = 5

_STATES = {s.value: s for s in JobState}


def _text(raw: Mapping[str, str], name: str) -> str | None:
    """The field's text, None when absent or empty."""
    return raw.get(name) or None


def _float(raw: Mapping[str, str], name: str) -> float | None:
    """The field as a finite float; None when absent, empty, garbled or not finite."""
    value = raw.get(name)
    if not value:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(raw: Mapping[str, str], name: str, default: int = 0) -> int:
    """The field as an integer (``int()`` of its text); ``default`` when absent, empty or garbled."""
    try:
        return int(raw.get(name) or default)
    except (TypeError, ValueError):
        return default


def _json(raw: Mapping[str, str], name: str, default: Any) -> Any:
    """The field's JSON value; ``default`` when absent, empty or not JSON."""
    value = raw.get(name)
    if value in (None, ""):
        return default
    try:
        return json.loads(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _history(raw: Mapping[str, str]) -> tuple[tuple[float, str, str], ...]:
    """The ``history`` field's moves, ``(epoch seconds, from, to)``; unreadable entries skipped."""
    moves = _json(raw, "history", [])
    out = []
    for move in moves if isinstance(moves, list) else ():
        if not isinstance(move, list) or len(move) < 3:
            continue
        try:
            at = float(move[0])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(at):
            continue
        out.append((at, "" if move[1] is None else str(move[1]), "" if move[2] is None else str(move[2])))
    return tuple(out)


def encode_overlay(fields: Mapping[str, Any]) -> dict[str, str]:
    """Values about to be written, as the text :meth:`JobRecord.from_hash` reads: text as is,
    ``None`` as empty (absent), anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) if v is not None else "" for k, v in fields.items()}


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job's record with its fields' real types.

    Times ending ``_ts`` are epoch seconds (float); those ending ``_at`` are ISO-8601 UTC text as
    stored. ``state`` is None for a record without a state (an idempotency duplicate's pointer) or
    with a state this version does not know; ``state_text`` is the state exactly as stored (None
    when absent). Counters are 0 when absent or garbled. JSON fields are parsed: ``error`` (the
    stored value, normally ``{"kind", "message", ...}``, None when absent or garbled),
    ``tracks`` (the provider's takes, dicts only), ``metadata`` (``{}`` by default),
    ``handlers`` (``{name: {"state", "attempts", ...}}``, by name), ``event`` (the stored result
    event or None), ``history`` (``(at, from, to)`` moves, oldest first). ``request`` parses the
    stored request body when read (``request_text`` is the stored JSON). ``raw`` is the hash
    exactly as read.
    """

    job_id: str | None = None
    state: JobState | None = None
    state_text: str | None = None
    state_ts: float | None = None
    # -- the request and what the producer gave with it
    request_text: str | None = None
    metadata: Any = field(default_factory=dict)
    idempotency_key: str | None = None
    msg_sha: str | None = None
    duplicate_of: str | None = None
    tenant: str | None = None
    priority: int = DEFAULT_PRIORITY
    batch_id: str | None = None
    not_after: float | None = None
    rq: str | None = None
    # -- times
    created_at: str | None = None
    created_ts: float | None = None
    submitted_at: str | None = None
    submitted_ts: float | None = None
    finished_at: str | None = None
    submit_started_ts: float | None = None
    last_poll_ts: float | None = None
    poll_lease: float | None = None
    poll_interval: float | None = None
    # -- counters
    attempts: int = 0
    sends: int = 0
    polls: int = 0
    retried: int = 0
    regenerations: int = 0
    unreached: int = 0
    empty_success: int = 0
    # -- the provider's side
    kie_task_id: str | None = None
    kie_status: str | None = None
    hint_task_id: str | None = None
    tracks: tuple[dict[str, Any], ...] = ()
    # -- flags and errors
    admitted: str | None = None
    outcome_unknown: bool = False
    callbacks_seen: bool = False
    submit_error: str | None = None
    error: Any = None
    # -- outcome bookkeeping
    event: dict[str, Any] | None = None
    handlers: dict[str, Any] = field(default_factory=dict)
    history: tuple[tuple[float, str, str], ...] = ()
    op: str | None = None
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> JobRecord:
        """The record from a job's hash (field -> text, as ``HGETALL`` returns it decoded);
        never raises on missing, legacy or garbled fields (see the module's docstring)."""
        raw = dict(raw)
        state_text = raw.get("state")
        tracks = _json(raw, "tracks", [])
        event = _json(raw, "event", None)
        return cls(
            job_id=_text(raw, "job_id"),
            state=_STATES.get(state_text) if state_text else None,  # type: ignore[arg-type]
            state_text=state_text,
            state_ts=_float(raw, "state_ts"),
            request_text=raw.get("request"),
            metadata=_json(raw, "metadata", {}),
            idempotency_key=_text(raw, "idempotency_key"),
            msg_sha=_text(raw, "msg_sha"),
            duplicate_of=_text(raw, "duplicate_of"),
            tenant=_text(raw, "tenant"),
            priority=_int(raw, "priority", DEFAULT_PRIORITY),
            batch_id=_text(raw, "batch_id"),
            not_after=_float(raw, "not_after"),
            rq=_text(raw, "rq"),
            created_at=_text(raw, "created_at"),
            created_ts=_float(raw, "created_ts"),
            submitted_at=_text(raw, "submitted_at"),
            submitted_ts=_float(raw, "submitted_ts"),
            finished_at=_text(raw, "finished_at"),
            submit_started_ts=_float(raw, "submit_started_ts"),
            last_poll_ts=_float(raw, "last_poll_ts"),
            poll_lease=_float(raw, "poll_lease"),
            poll_interval=_float(raw, "poll_interval"),
            attempts=_int(raw, "attempts"),
            sends=_int(raw, "sends"),
            polls=_int(raw, "polls"),
            retried=_int(raw, "retried"),
            regenerations=_int(raw, "regenerations"),
            unreached=_int(raw, "unreached"),
            empty_success=_int(raw, "empty_success"),
            kie_task_id=_text(raw, "kie_task_id"),
            kie_status=_text(raw, "kie_status"),
            hint_task_id=_text(raw, "hint_task_id"),
            tracks=tuple(t for t in tracks if isinstance(t, dict)) if isinstance(tracks, list) else (),
            admitted=_text(raw, "admitted"),
            outcome_unknown=bool(raw.get("outcome_unknown")),
            callbacks_seen=bool(raw.get("callbacks_seen")),
            submit_error=_text(raw, "submit_error"),
            error=_json(raw, "error", None),
            event=event if isinstance(event, dict) else None,
            handlers={key[len(HANDLER_PREFIX):]: _json(raw, key, {})
                      for key in sorted(raw) if key.startswith(HANDLER_PREFIX)},
            history=_history(raw),
            op=_text(raw, "op"),
            raw=raw,
        )

    @property
    def request(self) -> dict[str, Any] | None:
        """The stored request body (parsed on each read), None when absent, garbled or not an object."""
        if not self.request_text:
            return None
        try:
            body = json.loads(self.request_text)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    @property
    def request_value(self) -> Any:
        """The stored request as any JSON value (``{}`` when absent or garbled), as events carry it."""
        return _json(self.raw, "request", {}) if self.raw else {}

    @property
    def exists(self) -> bool:
        """Whether the hash had any field at all."""
        return bool(self.raw)

    @property
    def is_pointer(self) -> bool:
        """An idempotency duplicate's record: it names the first job and has no state of its own."""
        return bool(self.duplicate_of) and self.state_text is None

    @property
    def error_kind(self) -> str | None:
        """``error.kind`` when the error is an object, else None."""
        return self.error.get("kind") if isinstance(self.error, dict) else None

    @property
    def invalid_fields(self) -> list[Any]:
        """``error.errors`` of an ``invalid_request`` failure (the fields to fix), else ``[]``."""
        if self.error_kind != "invalid_request":
            return []
        errors = self.error.get("errors")
        return list(errors) if isinstance(errors, list) else [errors] if errors else []

    def with_fields(self, fields: Mapping[str, Any]) -> JobRecord:
        """This record as it will read once ``fields`` are written (``None`` clears a field)."""
        return JobRecord.from_hash({**self.raw, **encode_overlay(fields)})


#: The record of a job that has none yet.
EMPTY = JobRecord.from_hash({})


def as_record(value: JobRecord | Mapping[str, str] | None) -> JobRecord | None:
    """A JobRecord from a record or a raw hash (None stays None)."""
    if value is None or isinstance(value, JobRecord):
        return value
    return JobRecord.from_hash(value)


__all__ = ["JobRecord", "EMPTY", "as_record", "encode_overlay", "HANDLER_PREFIX", "DEFAULT_PRIORITY"]
