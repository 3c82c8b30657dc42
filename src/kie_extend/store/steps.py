"""A job's follow-up step entries in its record, and the one script that moves each entry.

Entry ``n`` of job ``J`` lives in J's hash as ``step:<n>`` (its JSON: op, take, audio_id, spec,
after, kie_task_id, result, error, times) and ``stepst:<n>`` (its state, plain text so the
admission script can read it). It is scheduled, admitted and leased under the sub-id ``J~<n>``
(``~`` never occurs in a job id): in J's ready queue, on the due schedule, in the rate log and
the in-flight set, exactly as a job is.

Entry states::

    waiting  → queued → submitting → submitted → succeeded | failed
    (midi waits for its stems entry)        (lyrics: submitting → succeeded | failed)

Every move is one script: it happens only while the job is ``submitted`` and the entry is in one
of the expected states, and returns every entry's state, so the caller that made the last entry
terminal is the one that sees all of them terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from kie_extend.store.keys import Keys
from kie_extend.store.lua import LIB

#: Entry states that are final.
STEP_TERMINAL = frozenset({"succeeded", "failed"})
SEP = "~"

# KEYS: job, inflight, priorities, admission seq, due. ARGV: tag, job id, entries JSON ([[state,
# entry JSON], ...]), tracks JSON, kie status, now, watchdog time, settle spec of the extension.
_BEGIN = LIB + """
local jk = KEYS[1]
if redis.call('HGET', jk, 'state') ~= 'submitted' or redis.call('HEXISTS', jk, 'steps_n') == 1 then return 0 end
local entries = cjson.decode(ARGV[3])
redis.call('HSET', jk, 'tracks', ARGV[4], 'kie_status', ARGV[5], 'steps_n', #entries, 'steps_ts', ARGV[6])
for i, e in ipairs(entries) do
  local n = i - 1
  redis.call('HSET', jk, 'step:' .. n, e[2], 'stepst:' .. n, e[1], 'stepsends:' .. n, 0)
  if e[1] == 'queued' then ready_add(jk, ARGV[2] .. '~' .. n, KEYS[3], KEYS[4]) end
end
-- The extension is done: it no longer holds an in-flight slot, and its reservation is settled.
redis.call('SREM', KEYS[2], ARGV[2])
settle(jk, ARGV[8])
redis.call('ZADD', KEYS[5], tonumber(ARGV[7]), ARGV[2])
return 1
"""

# KEYS: job, inflight, due, priorities, admission seq. ARGV: tag, job id, n, expected states
# (comma-separated), new state, entry JSON ('' = keep), due ('' keep, '-' remove, else epoch s),
# '1' = put in the ready queue, charge op, charge credits, now, '1' = release its in-flight slot.
# Returns {1, state of entry 0, state of entry 1, ...} when moved, {0, current state} when not.
_MOVE = LIB + """
local jk, n = KEYS[1], ARGV[3]
if redis.call('HGET', jk, 'state') ~= 'submitted' then return {0, 'job'} end
local cur = redis.call('HGET', jk, 'stepst:' .. n)
if not cur then return {0, 'none'} end
local ok = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
local sub = ARGV[2] .. '~' .. n
redis.call('HSET', jk, 'stepst:' .. n, ARGV[5])
if ARGV[5] == 'submitting' and cur ~= 'submitting' then redis.call('HINCRBY', jk, 'stepsends:' .. n, 1) end
if ARGV[6] ~= '' then redis.call('HSET', jk, 'step:' .. n, ARGV[6]) end
if ARGV[7] == '-' then redis.call('ZREM', KEYS[3], sub)
elseif ARGV[7] ~= '' then redis.call('ZADD', KEYS[3], tonumber(ARGV[7]), sub) end
if ARGV[8] == '1' then
  redis.call('HDEL', jk, 'stepadm:' .. n)
  ready_add(jk, sub, KEYS[4], KEYS[5])
end
if ARGV[12] == '1' then redis.call('SREM', KEYS[2], sub) end
local amount = tonumber(ARGV[10]) or 0
if amount > 0 then
  ledger_add(tonumber(ARGV[11]), redis.call('HGET', jk, 'tenant') or '', ARGV[9], 'charged', amount, amount)
  redis.call('HINCRBYFLOAT', jk, 'cr_charged', amount)
end
local out = {1}
for i = 0, tonumber(redis.call('HGET', jk, 'steps_n') or '0') - 1 do
  table.insert(out, redis.call('HGET', jk, 'stepst:' .. i) or '')
end
return out
"""


def sub_id(job_id: str, n: int) -> str:
    """The scheduling id of entry ``n`` of ``job_id``."""
    return f"{job_id}{SEP}{n}"


def split_sub_id(ref: str) -> tuple[str, int] | None:
    """``(job id, n)`` of a step's sub-id, None for a job id."""
    base, sep, n = ref.rpartition(SEP)
    if not sep or not base or not n.isdigit():
        return None
    return base, int(n)


@dataclass
class Entry:
    """One step of one take, as stored (``state`` from ``stepst:<n>``, the rest from ``step:<n>``)."""

    n: int
    state: str
    data: dict[str, Any]
    sends: int = 0

    @property
    def op(self) -> str:
        return str(self.data.get("op"))


def entries_of(raw: dict[str, str]) -> list[Entry]:
    """Every entry of a job's raw hash, in order ([] for a job without steps)."""
    try:
        count = int(raw.get("steps_n") or 0)
    except ValueError:
        return []
    out = []
    for n in range(count):
        try:
            data = json.loads(raw.get(f"step:{n}") or "{}")
        except ValueError:
            data = {}
        try:
            sends = int(raw.get(f"stepsends:{n}") or 0)
        except ValueError:
            sends = 0
        out.append(Entry(n, raw.get(f"stepst:{n}") or "", data if isinstance(data, dict) else {}, sends))
    return out


class StepStore:
    """Writes a job's step entries (see the module's docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis, self.keys = client, keys
        self._begin = client.register_script(_BEGIN)
        self._move = client.register_script(_MOVE)

    def begin(self, job_id: str, entries: Iterable[tuple[str, dict[str, Any]]], tracks: list[dict[str, Any]],
              kie_status: str, now: float, watchdog_at: float, settle: str | float = "auto") -> bool:
        """Record a succeeded extension's takes and its step entries (``(state, entry)`` pairs), put
        the queued ones in the job's ready queue, free the extension's in-flight slot, settle its
        reservation and put the job on the due schedule at ``watchdog_at``; False when the job is not
        ``submitted`` or its steps began already."""
        k = self.keys
        pairs = [[state, json.dumps(entry)] for state, entry in entries]
        return bool(self._begin(keys=[k.job(job_id), k.inflight, k.priorities, k.admission_seq, k.due],
                                args=[k.tag, job_id, json.dumps(pairs), json.dumps(tracks), kie_status, now,
                                      watchdog_at, str(settle)]))

    def move(self, job_id: str, n: int, expect: Iterable[str], to: str, *, entry: dict[str, Any] | None = None,
             due: float | None | str = "", ready: bool = False, charge: tuple[str, float] | None = None,
             release: bool = False, now: float = 0.0) -> list[str] | None:
        """Move entry ``n`` from one of ``expect`` to ``to`` (writing ``entry`` when given; ``due``:
        a time, None to take it off the schedule, "" to leave it; ``ready``: back in the ready queue;
        ``charge``: ``(op, credits)`` into the ledger; ``release``: free its in-flight slot). Returns
        every entry's state after the move, or None when the move did not happen."""
        k = self.keys
        due_arg = "-" if due is None else "" if due == "" else repr(float(due))
        op, credits = charge or ("", 0.0)
        out = self._move(keys=[k.job(job_id), k.inflight, k.due, k.priorities, k.admission_seq],
                         args=[k.tag, job_id, n, ",".join(expect), to, json.dumps(entry) if entry is not None else "",
                               due_arg, "1" if ready else "", op, credits, now, "1" if release else ""])
        if not out or int(out[0]) != 1:
            return None
        return [s.decode() if isinstance(s, bytes) else str(s) for s in out[1:]]


__all__ = ["Entry", "STEP_TERMINAL", "StepStore", "entries_of", "split_sub_id", "sub_id"]
