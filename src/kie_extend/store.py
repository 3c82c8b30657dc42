"""The Redis job store: records, the one state-transition function, and leased schedules.

Every state change goes through :meth:`JobStore.transition`, a Lua script that compares the
current state, writes the new one with its fields, keeps the state indexes and the in-flight set
in step, and, for a terminal state, writes the result event and queues one delivery per handler in
the same atomic step (the outbox).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable

import redis

from .keys import Keys
from .states import IN_FLIGHT, TERMINAL, TRANSITIONS, JobState

#: Order of the state-index keys passed to the transition script after its six fixed keys.
STATE_ORDER: tuple[JobState, ...] = tuple(s for s in JobState if s is not JobState.NOT_FOUND)

# KEYS: job, due, blocked, inflight, deliveries, stats, then one state index per STATE_ORDER entry.
# ARGV: job_id, to, expected ("|"-joined, "" = no record), fields JSON, due ("" keep, "-" remove,
#       else score), event JSON or "", handlers JSON, now, inflight flag, retention seconds, time the
#       deliveries fall due, a counter to bump ("" none), operation id.
# The operation id makes the script safe to run twice: a client that re-sends it after a socket
# timeout (the server was only slow) finds its own id on the record and gets "done", not a lost race.
_TRANSITION = """
local jk, id, to, op = KEYS[1], ARGV[1], ARGV[2], ARGV[13]
local S = {""" + ", ".join(f"['{st.value}'] = {i + 7}" for i, st in enumerate(STATE_ORDER)) + """}
if op ~= '' and redis.call('HGET', jk, 'op') == op then return {1, to, 1} end
local cur = redis.call('HGET', jk, 'state') or ''
local ok = false
for e in string.gmatch(ARGV[3] .. '|', '([^|]*)|') do
  if e == cur then ok = true end
end
if not ok then return {0, cur, 0} end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', jk, k) else redis.call('HSET', jk, k, v) end
end
redis.call('HSET', jk, 'state', to, 'state_ts', ARGV[8], 'op', op)
local created = tonumber(redis.call('HGET', jk, 'created_ts') or ARGV[8])
if cur ~= '' then redis.call('ZREM', KEYS[S[cur]], id) end
redis.call('ZADD', KEYS[S[to]], created, id)
if ARGV[9] == '1' then redis.call('SADD', KEYS[4], id) else redis.call('SREM', KEYS[4], id) end
if ARGV[5] == '-' then redis.call('ZREM', KEYS[2], id)
elseif ARGV[5] ~= '' then redis.call('ZADD', KEYS[2], ARGV[5], id) end
if ARGV[6] ~= '' then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('HSET', jk, 'event', ARGV[6])
  for _, h in ipairs(cjson.decode(ARGV[7])) do
    redis.call('HSET', jk, 'handler:' .. h, '{"state":"pending","attempts":0}')
    redis.call('ZADD', KEYS[5], ARGV[11], id .. '|' .. h)
  end
  redis.call('HINCRBY', KEYS[6], 'jobs_' .. to, 1)
  redis.call('EXPIRE', jk, ARGV[10])
else
  redis.call('PERSIST', jk)
end
if ARGV[12] ~= '' then redis.call('HINCRBY', KEYS[6], ARGV[12], 1) end
return {1, cur, 0}
"""

# Create a pointer record unless the key exists. KEYS: job. ARGV: ttl seconds, fields JSON.
_POINTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Claim up to ARGV[3] members due by ARGV[1]: push each one's score to ARGV[2] (the lease end),
# so a claimer that dies lets the member fall due again; returns member, due-time pairs.
# KEYS[1]: the sorted set.
_CLAIM = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #found, 2 do redis.call('ZADD', KEYS[1], ARGV[2], found[i]) end
return found
"""

# Move up to ARGV[1] blocked jobs (oldest first) onto the due schedule at ARGV[2].
# KEYS: blocked, due.
_RELEASE = """
local n = tonumber(ARGV[1])
if n <= 0 then return 0 end
local ids = redis.call('ZRANGE', KEYS[1], 0, n - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], 'LT', ARGV[2], id)
  redis.call('ZADD', KEYS[2], 'NX', ARGV[2], id)
end
return #ids
"""


def _enc(value: Any) -> Any:
    """A hash field value: JSON for containers, text for scalars, null to delete."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, JobState):
        return value.value
    return str(value)


class IllegalTransition(RuntimeError):
    """A move that the state machine forbids (a bug, never a race)."""


class JobStore:
    """Job records and schedules in Redis, under one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._pointer = client.register_script(_POINTER)

    # -- records ---------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, str] | None:
        """The raw record (field -> text), or None when no such job exists."""
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    def exists(self, job_id: str) -> bool:
        """Whether a record exists for ``job_id``."""
        return bool(self.redis.exists(self.keys.job(job_id)))

    def update(self, job_id: str, **fields: Any) -> None:
        """Set non-state fields of an existing record (state changes use :meth:`transition`)."""
        if "state" in fields:
            raise IllegalTransition("state changes go through transition()")
        mapping = {k: _enc(v) for k, v in fields.items() if v is not None}
        gone = [k for k, v in fields.items() if v is None]
        pipe = self.redis.pipeline()
        if mapping:
            pipe.hset(self.keys.job(job_id), mapping=mapping)
        if gone:
            pipe.hdel(self.keys.job(job_id), *gone)
        pipe.execute()

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        """Add to a counter field of a record."""
        return int(self.redis.hincrby(self.keys.job(job_id), field, amount))

    def create_pointer(self, job_id: str, fields: dict[str, Any], ttl: float) -> bool:
        """Write a record that only points at another job (idempotency duplicate); once, atomically."""
        mapping = {k: _enc(v) for k, v in fields.items() if v is not None}
        return bool(self._pointer(keys=[self.keys.job(job_id)], args=[int(ttl), json.dumps(mapping)]))

    # -- the one place a state changes -------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        expect: Iterable[JobState | None],
        fields: dict[str, Any] | None = None,
        due: float | None | str = "",
        event: dict[str, Any] | None = None,
        handlers: Iterable[str] = (),
        retention: float = 7 * 86400,
        deliveries_at: float | None = None,
        stat: str = "",
    ) -> bool:
        """Move ``job_id`` to ``to`` if it is in one of ``expect``; False if it was not.

        ``due``: a time to put the job on the due schedule, ``None`` to take it off, ``""`` to
        leave it. A terminal move needs ``event``; it is stored with the state, and one delivery
        per handler is queued (due at ``deliveries_at``, default now), all in one atomic step.
        ``stat`` names a shared counter bumped with the move.
        """
        expected = list(expect)
        for frm in expected:
            if to not in TRANSITIONS[frm]:
                raise IllegalTransition(f"{frm} -> {to} is not a legal move")
        if (to in TERMINAL) != (event is not None):
            raise IllegalTransition("a terminal move must carry exactly one result event")
        encoded = {k: _enc(v) for k, v in (fields or {}).items()}
        payload = json.dumps({k: (v if v is not None else None) for k, v in encoded.items()})
        due_arg = "-" if due is None else ("" if due == "" else repr(float(due)))
        k = self.keys
        result = self._transition(
            keys=[k.job(job_id), k.due, k.blocked, k.inflight, k.deliveries, k.stats,
                  *(k.state_index(st.value) for st in STATE_ORDER)],
            args=[
                job_id,
                to.value,
                "|".join("" if s is None else s.value for s in expected),
                payload,
                due_arg,
                json.dumps(event, separators=(",", ":")) if event is not None else "",
                json.dumps(list(handlers)),
                repr(time.time()),
                "1" if to in IN_FLIGHT else "0",
                str(int(retention)),
                repr(float(deliveries_at if deliveries_at is not None else time.time())),
                stat,
                uuid.uuid4().hex,
            ]
        )
        if int(result[2]):
            self.redis.hincrby(k.stats, "transition_replays", 1)
        return bool(int(result[0]))

    # -- schedules ---------------------------------------------------------------------------
    def schedule(self, job_id: str, at: float, *, only_earlier: bool = False) -> None:
        """Put a job on the due schedule at ``at`` (``only_earlier``: never push it later)."""
        if only_earlier:
            pipe = self.redis.pipeline()
            pipe.zadd(self.keys.due, {job_id: at}, lt=True)
            pipe.zadd(self.keys.due, {job_id: at}, nx=True)
            pipe.execute()
        else:
            self.redis.zadd(self.keys.due, {job_id: at})

    def unschedule(self, job_id: str) -> None:
        """Take a job off the due schedule."""
        self.redis.zrem(self.keys.due, job_id)

    def claim_due(self, until: float, lease: float, limit: int) -> list[tuple[str, float]]:
        """Claim jobs due by ``until`` under a lease (score moves to ``until + lease``); (id, due) pairs."""
        found = self._claim(keys=[self.keys.due], args=[until, until + lease, limit])
        return [(_text(found[i]), float(found[i + 1])) for i in range(0, len(found), 2)]

    def claim_deliveries(self, now: float, lease: float, limit: int) -> list[tuple[str, str]]:
        """Claim due handler deliveries under a lease; ``(job_id, handler)`` pairs."""
        found = self._claim(keys=[self.keys.deliveries], args=[now, now + lease, limit])
        return [tuple(_text(found[i]).split("|", 1)) for i in range(0, len(found), 2)]  # type: ignore[misc]

    def schedule_delivery(self, job_id: str, handler: str, at: float | None) -> None:
        """Put a delivery back on its schedule at ``at``, or drop it (``None``)."""
        member = f"{job_id}|{handler}"
        if at is None:
            self.redis.zrem(self.keys.deliveries, member)
        else:
            self.redis.zadd(self.keys.deliveries, {member: at})

    def block(self, job_id: str, since: float) -> None:
        """Park a queued job until in-flight room frees or a pause ends (FIFO by ``since``)."""
        pipe = self.redis.pipeline()
        pipe.zrem(self.keys.due, job_id)
        pipe.zadd(self.keys.blocked, {job_id: since}, nx=True)
        pipe.execute()

    def release_blocked(self, count: int, now: float) -> int:
        """Move up to ``count`` parked jobs, oldest first, onto the due schedule now."""
        return int(self._release(keys=[self.keys.blocked, self.keys.due], args=[count, now]))

    # -- listings and counters ---------------------------------------------------------------
    def list_ids(self, state: JobState, limit: int = 100) -> list[str]:
        """Newest job ids in ``state``."""
        return [_text(x) for x in self.redis.zrevrange(self.keys.state_index(state.value), 0, limit - 1)]

    def count(self, state: JobState) -> int:
        """How many jobs are in ``state``."""
        return int(self.redis.zcard(self.keys.state_index(state.value)))

    def trim_indexes(self, older_than: float) -> None:
        """Forget expired terminal jobs in the state indexes."""
        for state in TERMINAL:
            self.redis.zremrangebyscore(self.keys.state_index(state.value), "-inf", older_than)

    def mark_delivered(self, job_id: str, handler: str, attempts: int) -> None:
        """Record a handler's successful delivery and take it off the delivery schedule."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.job(job_id), f"handler:{handler}",
                  json.dumps({"state": "delivered", "attempts": attempts}, separators=(",", ":")))
        pipe.zrem(self.keys.deliveries, f"{job_id}|{handler}")
        pipe.hincrby(self.keys.stats, "handler_deliveries", 1)
        pipe.execute()

    def note_poll(self, job_id: str, now: float) -> None:
        """Record that a poll starts: its time, the job's poll count and the shared counter."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.job(job_id), "last_poll_ts", repr(now))
        pipe.hincrby(self.keys.job(job_id), "polls", 1)
        pipe.hincrby(self.keys.stats, "polls", 1)
        pipe.execute()

    def observe(self, name: str, value: float, buckets: tuple[float, ...]) -> None:
        """Add one observation to a shared histogram (cumulative buckets, sum and count)."""
        pipe = self.redis.pipeline(transaction=False)
        for le in buckets:  # every bucket exists, even empty ones
            pipe.hincrby(self.keys.stats, f"hist:{name}:le:{le:g}", 1 if value <= le else 0)
        pipe.hincrby(self.keys.stats, f"hist:{name}:le:+Inf", 1)
        pipe.hincrbyfloat(self.keys.stats, f"hist:{name}:sum", value)
        pipe.execute()

    def stat(self, name: str, amount: int = 1) -> None:
        """Bump a shared counter."""
        self.redis.hincrby(self.keys.stats, name, amount)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
