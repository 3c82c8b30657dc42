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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
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


def _iso(ts: float | None, timespec: str) -> str:
    when = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def iso_ms(ts: float | None = None) -> str:
    """Epoch seconds (default: now) as ISO-8601 UTC text with milliseconds (``2026-12-05T02:10:58.437Z``):
    the one format of every ``*_at`` field of records, events, manifests and audit entries."""
    return _iso(ts, "milliseconds")


def iso_s(ts: float | None = None) -> str:
    """Epoch seconds (default: now) as ISO-8601 UTC text to the second (``2026-12-05T02:10:58Z``), for
    reports (usage windows, pauses, the breaker)."""
    return _iso(ts, "seconds")


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
    stored (``created_at`` is ``created_ts`` as text when the hash has no ``created_at``: new
    records store their creation time once). ``job_id`` is the hash's own ``job_id`` field, which
    only records written by earlier versions hold (the id is the key). ``state`` is None for a record without a state (an idempotency duplicate's pointer) or
    with a state this version does not know; ``state_text`` is the state exactly as stored (None
    when absent). Counters are 0 when absent or garbled. JSON fields are parsed: ``error`` (the
    stored value, normally ``{"kind", "message", ...}``, None when absent or garbled),
    ``tracks`` (the provider's takes, dicts only), ``metadata`` (``{}`` by default),
    ``handlers`` (``{name: {"state", "attempts", ...}}``, by name). The larger JSON fields few
    readers need are parsed when read: ``request`` (``request_text`` is the stored JSON),
    ``event`` (the stored result event or None), ``history`` (``(at, from, to)`` moves, oldest
    first). ``raw`` is the hash exactly as read.
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
    handlers: dict[str, Any] = field(default_factory=dict)
    op: str | None = None
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> JobRecord:
        """The record from a job's hash (field -> text, as ``HGETALL`` returns it decoded);
        never raises on missing, legacy or garbled fields (see the module's docstring)."""
        raw = dict(raw)
        # Only the fields the hash holds are parsed: an absent field reads as its parser's default,
        # which is the attribute's default too (pinned by tests/test_record.py).
        values = {attr: parse(raw) for key in raw if key in _PARSERS for attr, parse in _PARSERS[key]}
        return cls(**values, handlers=_handlers(raw), raw=raw)

    @property
    def created_at(self) -> str | None:
        """When the job was created, ISO-8601 UTC text: ``created_at`` as stored by records that keep
        it, else ``created_ts`` as text (a new record stores its creation time once, so a queued
        backlog's hashes stay small); None when neither is readable."""
        stored = self.raw.get("created_at")
        if stored:
            return stored
        return iso_ms(self.created_ts) if self.created_ts is not None else None

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
    def event(self) -> dict[str, Any] | None:
        """The stored result event (parsed on each read), None when absent, garbled or not an object."""
        event = _json(self.raw, "event", None)
        return event if isinstance(event, dict) else None

    @property
    def history(self) -> tuple[tuple[float, str, str], ...]:
        """The job's last moves, ``(epoch seconds, from, to)``, oldest first (parsed on each read;
        ``from`` is ``""`` for the first move); unreadable entries are skipped."""
        return _history(self.raw)

    @property
    def request_value(self) -> Any:
        """The stored request as any JSON value (``{}`` when absent or garbled), as events carry it."""
        return _json(self.raw, "request", {}) if self.raw else {}

    def raw_json(self, name: str, default: Any = None) -> Any:
        """Any field's JSON value as stored (``default`` when absent or not JSON)."""
        return _json(self.raw, name, default)

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
        """This record as it will read once ``fields`` are written (``None`` clears a field); the
        same as ``from_hash`` of the merged hash, re-reading only the fields given."""
        overlay = encode_overlay(fields)
        raw = {**self.raw, **overlay}
        changes = {attr: parse(raw) for key in overlay for attr, parse in _PARSERS.get(key, ())}
        if any(key.startswith(HANDLER_PREFIX) for key in overlay):
            changes["handlers"] = _handlers(raw)
        return replace(self, raw=raw, **changes)


def _handlers(raw: Mapping[str, str]) -> dict[str, Any]:
    return {key[len(HANDLER_PREFIX):]: _json(raw, key, {}) for key in sorted(k for k in raw if k.startswith(HANDLER_PREFIX))}


def _tracks(raw: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    tracks = _json(raw, "tracks", [])
    return tuple(t for t in tracks if isinstance(t, dict)) if isinstance(tracks, list) else ()


def _state(raw: Mapping[str, str]) -> JobState | None:
    text = raw.get("state")
    return _STATES.get(text) if text else None


def _as(kind: Callable[[Mapping[str, str], str], Any], key: str) -> Callable[[Mapping[str, str]], Any]:
    return lambda raw: kind(raw, key)


_TEXT = ("job_id", "idempotency_key", "msg_sha", "duplicate_of", "tenant", "batch_id", "rq",
         "submitted_at", "finished_at", "kie_task_id", "kie_status", "hint_task_id", "admitted", "submit_error", "op")
_FLOAT = ("state_ts", "not_after", "created_ts", "submitted_ts", "submit_started_ts", "last_poll_ts", "poll_lease",
          "poll_interval")
_INT = ("attempts", "sends", "polls", "retried", "regenerations", "unreached", "empty_success")

#: Hash field -> the record's attributes read from it, with their parsers (``handler:*`` aside).
_PARSERS: dict[str, tuple[tuple[str, Callable[[Mapping[str, str]], Any]], ...]] = {
    **{key: ((key, _as(_text, key)),) for key in _TEXT},
    **{key: ((key, _as(_float, key)),) for key in _FLOAT},
    **{key: ((key, _as(_int, key)),) for key in _INT},
    "state": (("state", _state), ("state_text", lambda raw: raw.get("state"))),
    "request": (("request_text", lambda raw: raw.get("request")),),
    "metadata": (("metadata", lambda raw: _json(raw, "metadata", {})),),
    "priority": (("priority", lambda raw: _int(raw, "priority", DEFAULT_PRIORITY)),),
    "tracks": (("tracks", _tracks),),
    "outcome_unknown": (("outcome_unknown", lambda raw: bool(raw.get("outcome_unknown"))),),
    "callbacks_seen": (("callbacks_seen", lambda raw: bool(raw.get("callbacks_seen"))),),
    "error": (("error", lambda raw: _json(raw, "error", None)),),
}


#: The record of a job that has none yet.
EMPTY = JobRecord.from_hash({})


def as_record(value: JobRecord | Mapping[str, str] | None) -> JobRecord | None:
    """A JobRecord from a record or a raw hash (None stays None)."""
    if value is None or isinstance(value, JobRecord):
        return value
    return JobRecord.from_hash(value)


__all__ = ["JobRecord", "EMPTY", "as_record", "encode_overlay", "iso_ms", "HANDLER_PREFIX", "DEFAULT_PRIORITY"]
