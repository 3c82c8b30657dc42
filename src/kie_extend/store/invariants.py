"""Invariants of the job store, checked by the tick's sweep and by ``kie-extend doctor``.

Every unfinished job must be somewhere the tick will find it, or it waits forever:

- ``unscheduled``: a ``queued`` job neither in its ready queue (where admission finds it) nor on
  the due schedule, or a ``submitting`` / ``submitted`` job not on the due schedule. Repair: put it
  on the due schedule now.
- ``missing_record``: an id in a state index, the due schedule or the in-flight set whose record
  is gone (evicted, or deleted by hand). Nothing can bring the job back; repair
  removes the dangling entries so the gates count right, and the loss is logged as an error.
- ``wrong_index``: an id in the index of a state other than its record's. Repair: move it.
- ``inflight_leak``: an id in the in-flight set whose job holds no slot (not submitting or
  submitted): it shrinks ``KIE_MAX_IN_FLIGHT`` for everyone. Repair: remove it.
- ``inflight_missing``: a submitting or submitted job not in the in-flight set (a job whose follow-up
  steps run holds none: its steps do, store/steps.py). Repair: add it.
- ``finished_scheduled``: a finished job still on the due schedule after its entry fell due (no
  tick took it off). Repair: remove.
- ``missing_request``: an unfinished job whose request body is gone (its request key, ``Keys.request``,
  evicted or deleted by hand, and no ``request`` field in a record from before that key). It can
  never be sent; nothing can bring the request back, so there is no repair: cancel or fail it.
- ``orphan_request``: a request key whose job record is gone. Repair: delete it.

Each repair is one Lua script that re-checks its condition on the spot, so a job that moved on
meanwhile is left alone. Jobs younger in their state than ``grace`` seconds are skipped: between two
writes of a normal step a job may briefly look unscheduled.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from kie_extend.store.steps import split_sub_id
from kie_extend.store.keys import Keys
from kie_extend.store.lua import LIB
from kie_extend.jobs.states import IN_FLIGHT, TERMINAL, JobState

log = logging.getLogger("kie_extend.store.invariants")

#: Ids read per round trip while sweeping.
CHUNK = 500

_UNFINISHED = (JobState.QUEUED, JobState.SUBMITTING, JobState.SUBMITTED)

# KEYS: job, due. ARGV: tag, id, state the job must still be in, now. Puts an unscheduled job on
# the due schedule (only if it is still in that state, on no schedule and in no ready queue).
_RESCHEDULE = LIB + """
local id = ARGV[2]
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[3] then return 0 end
if redis.call('ZSCORE', KEYS[2], id) then return 0 end
local rq = redis.call('HGET', KEYS[1], 'rq')
if ARGV[3] == 'queued' and rq then
  local _, _, rk = rq_keys(rq)
  if redis.call('ZSCORE', rk, id) then return 0 end
end
redis.call('ZADD', KEYS[2], ARGV[4], id)
return 1
"""

# KEYS: job, due, inflight, deadlines, then every state index. ARGV: id. Removes a vanished job's
# dangling entries (only if its record is really gone; a ready queue drops it when admission meets it).
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  if i == 3 then redis.call('SREM', KEYS[i], ARGV[1]) else redis.call('ZREM', KEYS[i], ARGV[1]) end
end
return 1
"""

# KEYS: due, inflight. ARGV: tag, then ids. For each id: state ('' = a record without one, false
# = no record), the time it entered that state, its time on the due schedule ('' = not on it),
# whether it is in its ready queue, whether it holds an in-flight slot, whether its request is
# stored (its request key, or a 'request' field in an older record).
_INSPECT = LIB + """
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local jk = T .. ':job:' .. id
  local f = redis.call('HMGET', jk, 'state', 'state_ts', 'created_ts', 'duplicate_of', 'rq')
  local exists = f[1] or f[4] or redis.call('EXISTS', jk) == 1
  local ready = 0
  if f[5] then
    local _, _, rk = rq_keys(f[5])
    if redis.call('ZSCORE', rk, id) then ready = 1 end
  end
  table.insert(out, exists and (f[1] or '') or false)
  table.insert(out, f[2] or f[3] or '0')
  table.insert(out, redis.call('ZSCORE', KEYS[1], id) or '')
  table.insert(out, ready)
  table.insert(out, redis.call('SISMEMBER', KEYS[2], id))
  local req = 1
  if f[1] and redis.call('EXISTS', T .. ':req:' .. id) == 0 and redis.call('HEXISTS', jk, 'request') == 0 then
    req = 0
  end
  table.insert(out, req)
end
return out
"""

# KEYS: request key, job. Deletes a request key whose record is gone.
_DROP_ORPHAN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS: job, inflight. ARGV: id, "add" | "remove". Fixes in-flight membership from the record's state.
_INFLIGHT = """
local st = redis.call('HGET', KEYS[1], 'state')
local holds = st == 'submitting' or st == 'submitted'
if ARGV[2] == 'add' and holds then return redis.call('SADD', KEYS[2], ARGV[1]) end
if ARGV[2] == 'remove' and not holds then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""

# KEYS: job, from index, to index. ARGV: id, state the record must be in. Moves an id between indexes.
_REINDEX = """
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], tonumber(redis.call('HGET', KEYS[1], 'created_ts') or '0'), ARGV[1])
return 1
"""

# KEYS: job, due. ARGV: id. Takes a finished job off the due schedule.
_UNSCHEDULE_FINISHED = """
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'succeeded' and st ~= 'failed' and st ~= 'cancelled' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


@dataclass
class Violation:
    """One broken invariant: its kind, the job, what was seen, and whether it was repaired."""

    kind: str
    job_id: str
    detail: str
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "job_id": self.job_id, "detail": self.detail, "repaired": self.repaired}


@dataclass
class Report:
    """What a sweep found: jobs looked at and the violations (repaired or not)."""

    checked: int = 0
    violations: list[Violation] = field(default_factory=list)
    #: Where a bounded pass stopped (phase, position), or None when it went through everything.
    cursor: tuple[int, int] | None = None

    def counts(self) -> dict[str, int]:
        """Violations by kind."""
        return dict(Counter(v.kind for v in self.violations))

    @property
    def repaired(self) -> int:
        """How many violations were repaired."""
        return sum(1 for v in self.violations if v.repaired)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"checked": self.checked, "violations": len(self.violations), "repaired": self.repaired,
                "by_kind": self.counts(), "items": [v.as_dict() for v in self.violations]}


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class Invariants:
    """Checks (and optionally repairs) the job store's invariants under one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._reschedule = client.register_script(_RESCHEDULE)
        self._forget = client.register_script(_FORGET)
        self._inflight = client.register_script(_INFLIGHT)
        self._reindex = client.register_script(_REINDEX)
        self._unschedule = client.register_script(_UNSCHEDULE_FINISHED)
        self._inspect = client.register_script(_INSPECT)
        self._drop_orphan = client.register_script(_DROP_ORPHAN)

    def _records(self, ids: list[str]) -> list[tuple[str | None, float, float | None, bool, bool, bool]]:
        """For each id: (state, or None when the record is gone; time in that state; its time on
        the due schedule or None; in its ready queue; in the in-flight set; its request stored),
        read in one script."""
        out = self._inspect(keys=[self.keys.due, self.keys.inflight], args=[self.keys.tag, *ids])
        rows = []
        for i in range(0, len(out), 6):
            state = out[i]
            due = _t(out[i + 2])
            rows.append((None if state is None else _t(state), float(_t(out[i + 1]) or 0),
                         float(due) if due else None, bool(out[i + 3]), bool(out[i + 4]), bool(out[i + 5])))
        return rows

    def _phases(self) -> list[tuple[str, str]]:
        """What a full pass walks, in order: (kind, key or key pattern)."""
        k = self.keys
        return [*(("state", k.state_index(s.value)) for s in _UNFINISHED), ("inflight", k.inflight), ("due", k.due),
                ("requests", _glob_escape(k.request("")) + "*")]

    def _orphans(self, pattern: str, pos: int) -> tuple[int, list[str]]:
        """One SCAN step over the request keys (about CHUNK keys of the keyspace looked at): the next
        cursor and the ids of request keys found whose record is gone."""
        get_node = getattr(self.redis, "get_node_from_key", None)
        if get_node is None:
            pos, found = self.redis.scan(pos, match=pattern, count=CHUNK)
        else:  # a cluster: every key of the prefix is in one slot, so on one node (keys.py)
            cursors, found = self.redis.scan(pos, match=pattern, count=CHUNK,
                                             target_nodes=get_node(self.keys.request("")))
            pos = next(iter(cursors.values()))
        names = [_t(n) for n in found]
        if not names:
            return pos, []
        prefix = len(self.keys.request(""))
        ids = [n[prefix:] for n in names]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.keys.job(job_id))
        return pos, [j for j, there in zip(ids, pipe.execute()) if not there]

    def check(self, *, repair: bool = False, grace: float = 30.0, now: float | None = None,
              limit: int | None = None, cursor: tuple[int, int] = (0, 0),
              budget: int | None = None) -> Report:
        """Look at every unfinished job and the shared sets; repair what is broken when ``repair``.

        ``grace``: seconds a job must have been in its state before it counts as unscheduled.
        ``limit``: stop after this many violations (None: no limit). ``cursor``/``budget``: start
        where a previous call stopped and look at no more than ``budget`` ids (the tick's sweep
        does a bounded share per tick); the report's ``cursor`` says where to go on, None when the
        pass is complete. Returns a :class:`Report`."""
        now = now or time.time()
        report = Report()
        keys = self.keys
        state_keys = [keys.state_index(s.value) for s in JobState if s is not JobState.NOT_FOUND]
        finished = {s.value for s in TERMINAL}

        def add(kind: str, job_id: str, detail: str, fix: Any) -> None:
            v = Violation(kind, job_id, detail)
            if repair:
                try:
                    v.repaired = bool(fix())
                except redis.RedisError as exc:
                    v.detail += f" (repair failed: {exc})"
            report.violations.append(v)

        def forget(j: str) -> Any:
            return self._forget(keys=[keys.job(j), keys.due, keys.inflight, keys.deadlines, *state_keys], args=[j])

        phases = self._phases()
        phase, pos = cursor
        spent = 0  # ids looked at, plus CHUNK per keyspace SCAN step, against ``budget``
        while phase < len(phases):
            if (budget is not None and spent >= budget) or (limit is not None and len(report.violations) >= limit):
                report.cursor = (phase, pos)
                return report
            kind, key = phases[phase]
            if kind == "requests":
                pos, orphans = self._orphans(key, pos)
                spent += CHUNK
                for job_id in orphans:
                    add("orphan_request", job_id, "a request key whose record is gone",
                        lambda j=job_id: self._drop_orphan(keys=[keys.request(j), keys.job(j)]))
                if pos == 0:
                    phase, pos = phase + 1, 0
                continue
            if kind == "inflight":
                pos, members = self.redis.sscan(key, pos, count=CHUNK)
                ids = [_t(m) for m in members]
            else:
                ids = [_t(m) for m in self.redis.zrange(key, pos, pos + CHUNK - 1)]
            rows = self._records(ids) if ids else []
            removed = 0
            spent += len(ids)
            for job_id, (actual, ts, on_due, on_ready, in_flight, has_request) in zip(ids, rows):
                report.checked += 1
                step = split_sub_id(job_id) if actual is None else None
                if step is not None and self.redis.exists(keys.job(step[0])):
                    continue  # a follow-up step of a job that exists (store/steps.py): scheduled under its sub-id
                if actual is None:
                    where = {"state": f"in the {key.rsplit(':', 1)[-1]} index", "inflight": "holds an in-flight slot",
                             "due": "on the due schedule"}[kind]
                    add("missing_record", job_id, f"{where} but its record is gone", lambda j=job_id: forget(j))
                    removed += 1
                    continue
                if kind == "state":
                    state = key.rsplit(":", 1)[-1]
                    if actual != state:
                        if actual in {s.value for s in JobState}:
                            add("wrong_index", job_id, f"in the {state} index but {actual or 'without state'}",
                                lambda j=job_id, a=actual, st=state: self._reindex(
                                    keys=[keys.job(j), keys.state_index(st), keys.state_index(a)], args=[j, a]))
                            removed += 1
                        continue
                    scheduled = on_due is not None or (state == JobState.QUEUED.value and on_ready)
                    if not scheduled and now - ts >= grace:
                        add("unscheduled", job_id, f"{state} for {now - ts:.0f}s on no schedule",
                            lambda j=job_id, st=state: self._reschedule(
                                keys=[keys.job(j), keys.due], args=[keys.tag, j, st, repr(now)]))
                    if state in {s.value for s in IN_FLIGHT} and not in_flight and \
                            not self.redis.hexists(keys.job(job_id), "steps_n"):  # steps hold the slots then
                        add("inflight_missing", job_id, f"{state} but not counted in flight",
                            lambda j=job_id: self._inflight(keys=[keys.job(j), keys.inflight], args=[j, "add"]))
                    if not has_request:
                        add("missing_request", job_id, f"{state} but its request is gone (no request key)",
                            lambda: False)
                elif kind == "inflight":
                    if actual not in {s.value for s in IN_FLIGHT}:
                        add("inflight_leak", job_id, f"holds an in-flight slot while {actual or 'without state'}",
                            lambda j=job_id: self._inflight(keys=[keys.job(j), keys.inflight], args=[j, "remove"]))
                elif actual in finished and on_due is not None and on_due <= now - grace:
                    # A finished job's entry that has not fallen due yet is harmless: the step that
                    # claims it drops it (a late callback may put one there after the job ended).
                    add("finished_scheduled", job_id, f"{actual} but still on the due schedule",
                        lambda j=job_id: self._unschedule(keys=[keys.job(j), keys.due], args=[j]))
                    removed += 1
            if kind == "inflight":
                if pos == 0:
                    phase, pos = phase + 1, 0
            elif len(ids) < CHUNK:
                phase, pos = phase + 1, 0
            else:
                # Entries repaired out of this sorted set shift the ones after them down.
                pos += len(ids) - (removed if repair else 0)
        report.cursor = None
        return report


__all__ = ["Invariants", "Report", "Violation"]
