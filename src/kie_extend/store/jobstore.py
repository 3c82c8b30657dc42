"""The Redis job store: records, the one state-transition function, and leased schedules.

Every state change goes through :meth:`JobStore.transition`, a Lua script that compares the
current state, writes the new one with its fields, keeps the state indexes and the in-flight set
in step, and, for a terminal state, writes the result event and queues one delivery per handler in
the same atomic step (the outbox).

A job's request body lives in its own key (``Keys.request``, packed by store/packing.py), not in
the record's hash, so a queued job's hash stays a listpack. It is written by the move that creates
the record and follows the record's lifetime; :meth:`JobStore.get` folds it back into the record
(field ``request``, JSON text) in the same round trip, and :meth:`JobStore.request` reads it alone.
Records written before the key existed still carry ``request`` in the hash: both read that too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import redis

from kie_extend.store import lua
from kie_extend.store.packing import pack, unpack
from kie_extend.store.keys import MINUTE_HISTOGRAMS, MINUTE_TTL, Keys
from kie_extend.store.record import JobRecord, iso_ms
from kie_extend.jobs.states import IN_FLIGHT, TERMINAL, TRANSITIONS, JobState

log = logging.getLogger("kie_extend.store.jobstore")

#: Prefix of the ids of batch records in the delivery schedule (``@batch:<batch_id>``).
BATCH_REF = "@batch:"


class Moved(int):
    """A transition's outcome: true when the move happened; ``batch_finished`` names the batch whose
    last job this move ended (its ``batch.finished`` event and deliveries were written with it)."""

    batch_finished: str | None = None
    #: A move to ``succeeded`` that closed the provider breaker (see admission/breaker.py).
    breaker_closed: bool = False

# Claim up to ARGV[3] members due by ARGV[1]: push each one's score to ARGV[2] (the lease end),
# so a claimer that dies lets the member fall due again; returns member, due-time pairs.
# KEYS[1]: the sorted set.
_CLAIM = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #found, 2 do redis.call('ZADD', KEYS[1], ARGV[2], found[i]) end
return found
"""

# Claim one job's poll: refused while another poll of it is in flight (its lease, a field of the
# job's hash, ends later than ARGV[1]) or sooner than ARGV[2] seconds after the last poll started;
# else record the start (last_poll_ts, the poll counts) and the lease end ARGV[3], in one step.
# Returns nil when claimed, else the time (text) before which no poll may start; '-1' if the job is gone.
# KEYS[1]: the job's hash, KEYS[2]: the stats hash.
_CLAIM_POLL_FN = """
local function claim_poll(jk, stats, now_s, gap_s, lease_s)
  if redis.call('HEXISTS', jk, 'state') == 0 then return '-1' end
  local now = tonumber(now_s)
  local lease = tonumber(redis.call('HGET', jk, 'poll_lease') or '0') or 0
  if lease > now then return tostring(lease) end
  local last = tonumber(redis.call('HGET', jk, 'last_poll_ts') or '0') or 0
  local gap = tonumber(gap_s)
  if now - last < gap then return tostring(last + gap) end
  redis.call('HSET', jk, 'last_poll_ts', now_s, 'poll_lease', lease_s)
  redis.call('HINCRBY', jk, 'polls', 1)
  redis.call('HINCRBY', stats, 'polls', 1)
  return false
end
"""
_CLAIM_POLL = _CLAIM_POLL_FN + "return claim_poll(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"

# A due job's record, read for its next step; when it is ``submitted`` (the step is a poll) its
# poll is claimed in the same step, as _CLAIM_POLL does. Returns {fields} or {fields, claim}: the
# record as it was before the claim (HGETALL), and '' when claimed, else what _CLAIM_POLL returns.
# KEYS, ARGV: as _CLAIM_POLL.
_STEP_READ = _CLAIM_POLL_FN + """
local raw = redis.call('HGETALL', KEYS[1])
local request = redis.call('GET', KEYS[3])
for i = 1, #raw, 2 do
  if raw[i] == 'state' then
    if raw[i + 1] ~= 'submitted' then return {raw, '-', request} end
    return {raw, claim_poll(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) or '', request}
  end
end
return {raw, '-', request}
"""


# Bookkeeping writes, several in one script call (see Writes): ARGV holds runs of ``command, number of
# arguments, index of its key in KEYS, arguments...``. ``ONCE`` (argument: seconds) sets its key with
# NX and an expiry, and when the key was already there skips the run after it: an append made once per
# key. ``IFEQ`` (arguments: field, value) ends the script unless the hash's field holds the value: the
# runs after it happen only then. The runs execute in order in one atomic step; an error stops the
# script at that run.
_WRITES = """
local i, skip = 1, false
while i <= #ARGV do
  local op, n, key = ARGV[i], tonumber(ARGV[i + 1]), KEYS[tonumber(ARGV[i + 2])]
  if skip then
    skip = false
  elseif op == 'ONCE' then
    skip = not redis.call('SET', key, '1', 'NX', 'EX', ARGV[i + 3])
  elseif op == 'IFEQ' then
    if redis.call('HGET', key, ARGV[i + 3]) ~= ARGV[i + 4] then return 0 end
  else
    redis.call(op, key, unpack(ARGV, i + 3, i + 2 + n))
  end
  i = i + 3 + n
end
return 1
"""


def run_script(script: Any, keys: list[Any], args: list[Any]) -> Any:
    """Call a registered script (``register_script``) on its own client: EVALSHA, and on NOSCRIPT (a
    restart emptied the server's script cache) the script's own call, which loads it. The same as
    ``script(keys=..., args=...)`` without redis-py's per-call type checks."""
    try:
        return script.registered_client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return script(keys=keys, args=args)


class Writes:
    """Bookkeeping writes (counters, histogram bins, a delivery mark, a poll's release) collected
    and sent as one script call: one command to pack and one reply to read, however many writes.
    Methods take the arguments of the redis-py command of the same name; :meth:`once` guards the
    write queued right after it. The writes run in order, atomically (``_WRITES``)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[Any] = []
        self._index: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.args)

    def _op(self, op: str, key: str, *args: Any) -> None:
        at = self._index.get(key)
        if at is None:
            self.keys.append(key)
            at = self._index[key] = len(self.keys)
        self.args += [op, len(args), at, *args]

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        self._op("HINCRBY", key, field, int(amount))

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        self._op("HINCRBYFLOAT", key, field, repr(float(amount)))

    def hset(self, key: str, field: str, value: Any) -> None:
        self._op("HSET", key, field, value)

    def hdel(self, key: str, *fields: str) -> None:
        self._op("HDEL", key, *fields)

    def zrem(self, key: str, *members: str) -> None:
        self._op("ZREM", key, *members)

    def expire(self, key: str, seconds: int) -> None:
        self._op("EXPIRE", key, int(seconds))

    def xadd(self, key: str, maxlen: int, fields: dict[str, Any]) -> None:
        """XADD ``fields`` (in order) to the stream ``key``, trimmed to about ``maxlen`` entries."""
        self._op("XADD", key, "MAXLEN", "~", int(maxlen), "*", *[x for kv in fields.items() for x in kv])

    def once(self, key: str, seconds: int) -> None:
        """Run the next write only if ``key`` did not exist (it is then set, expiring in ``seconds``)."""
        self._op("ONCE", key, int(seconds))

    def only_if(self, key: str, field: str, value: str) -> None:
        """Run the writes queued after this one only if the hash ``key``'s ``field`` holds ``value``
        when they run (the writes before it run regardless)."""
        self._op("IFEQ", key, field, value)

    def clear(self) -> None:
        """Forget every queued write (they were sent)."""
        self.keys, self.args, self._index = [], [], {}


def new_op() -> str:
    """A new operation id for a move (:meth:`JobStore.transition`): 64 random bits as hex text."""
    return os.urandom(8).hex()


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


class OneTrip:
    """Registered scripts' calls sent together in one round trip, in order: ``add(script, keys,
    args)`` each, then ``execute()`` returns their replies. (A redis-py pipeline first asks the
    server whether it knows every script queued on it: one more round trip each time.) A call the
    server answers NOSCRIPT (a restart emptied its script cache) is sent again on its own, which
    loads the script; any other error reply is raised."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.calls: list[tuple[Any, list[Any], list[Any]]] = []

    def add(self, script: Any, keys: list[Any], args: list[Any]) -> None:
        """Queue ``script`` (from ``register_script``) with its keys and arguments."""
        self.calls.append((script, keys, args))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The replies, in the order the calls were added; with ``raise_on_error=False`` a call's
        error reply is returned in its place (the exception) instead of raised."""
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in self.calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
        out = []
        for (script, keys, args), reply in zip(self.calls, replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                reply = script(keys=keys, args=args)
            elif isinstance(reply, Exception) and raise_on_error:
                raise reply
            out.append(reply)
        self.calls = []
        return out


class IllegalTransition(RuntimeError):
    """A move that the state machine forbids (a bug, never a race)."""


class JobStore:
    """Job records and schedules in Redis, under one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._transition = client.register_script(lua.TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._pointer = client.register_script(lua.POINTER)
        self._ready = client.register_script(lua.READY)
        self._claim_poll = client.register_script(_CLAIM_POLL)
        self._step_read = client.register_script(_STEP_READ)
        self._writes_script = client.register_script(_WRITES)
        # The transition script's keys that name no job (see transition), built once.
        k = keys
        self._move_keys = (k.due, k.inflight, k.deliveries, k.stats, k.deadlines, k.rate_log, k.priorities,
                           k.admission_seq, k.breaker)
        self._state_keys = tuple(k.state_index(st.value) for st in lua.STATE_ORDER)
        # The pipeline collecting bookkeeping writes while a step defers them (see deferred()),
        # per thread: a receiver's threads share one store.
        self._local = threading.local()

    def record_key(self, ref: str) -> str:
        """The hash holding a job's record, or a batch's (``@batch:<id>``, for its deliveries)."""
        return self.keys.batch(ref[len(BATCH_REF):]) if ref.startswith(BATCH_REF) else self.keys.job(ref)

    # -- records ---------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, str] | None:
        """The raw record (field -> text), or None when no such job exists. A job's record has its
        request JSON text in ``request`` (read from its request key in the same round trip)."""
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Iterable[str]) -> list[dict[str, str] | None]:
        """The raw records of ``job_ids`` in order (None for a missing one), as :meth:`get`, in one
        round trip."""
        refs = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.hgetall(self.record_key(ref))
            if not ref.startswith(BATCH_REF):
                pipe.get(self.keys.request(ref))
        found = iter(pipe.execute())
        out: list[dict[str, str] | None] = []
        for ref in refs:
            raw = next(found)
            stored = None if ref.startswith(BATCH_REF) else next(found)
            if not raw:
                out.append(None)
                continue
            out.append(_with_request({_text(k): _text(v) for k, v in raw.items()}, stored))
        return out

    def request(self, job_id: str) -> dict[str, Any] | None:
        """A job's request body (the JSON object to send to the provider), from its request key or,
        for a record written before that key existed, from its hash; None when neither holds one.
        Raises ValueError when the stored text is not JSON."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.request(job_id))
        pipe.hget(self.keys.job(job_id), "request")
        stored, legacy = pipe.execute()
        text = _text(legacy) if legacy is not None else unpack(stored) if stored is not None else None
        return None if text is None else json.loads(text)

    def get_record(self, job_id: str) -> JobRecord | None:
        """The job's record parsed into typed fields (one ``HGETALL``, as :meth:`get`), or None
        when no such job exists. ``JobRecord.raw`` holds the hash as read."""
        raw = self.get(job_id)
        return None if raw is None else JobRecord.from_hash(raw)
    def get_for_step(self, job_id: str, now: float, gap: float, lease: float) -> tuple[dict[str, str] | None, float | None | str]:
        """:meth:`get` for a due job's next step, in the same round trip as :meth:`claim_poll` (same
        arguments) when the job is ``submitted``: ``(record or None, claim)``, where ``claim`` is
        what :meth:`claim_poll` returns (``None`` = claimed) for a submitted job, and ``""`` (no claim
        tried) otherwise. The record is the one read before the claim, with its request as :meth:`get`
        has it."""
        return _step_read_reply(run_script(self._step_read, *self._step_read_call(job_id, now, gap, lease)))

    def get_for_steps(self, job_ids: list[str], now: float, gap: float,
                      lease: float) -> list[tuple[dict[str, str] | None, float | None | str] | None]:
        """:meth:`get_for_step` for several jobs in one round trip: one ``(record or None, claim)``
        per id, in order (a grouped poll message's reads), or None for a job whose read got an error
        reply (a key of the wrong type: its own step reads it again and meets the error alone).
        Raises what the connection raises."""
        trip = OneTrip(self.redis)
        for job_id in job_ids:
            trip.add(self._step_read, *self._step_read_call(job_id, now, gap, lease))
        return [None if isinstance(found, Exception) else _step_read_reply(found)
                for found in trip.execute(raise_on_error=False)]

    def _step_read_call(self, job_id: str, now: float, gap: float, lease: float) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the step-read script for ``job_id``."""
        return [self.keys.job(job_id), self.keys.stats, self.keys.request(job_id)], [repr(now), gap, repr(now + lease)]

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block, this thread's bookkeeping writes that nothing in the same step reads
        back (:meth:`observe`, :meth:`stat`, :meth:`mark_delivered`, :meth:`release_poll`, and what
        an inline handler queues through :meth:`deferring`) are collected and sent in one round trip
        (one script call, :class:`Writes`) when the block ends, also when it raises (a failure to
        send them then is logged, and the block's own error goes on). Nested blocks join the outer one."""
        if getattr(self._local, "pipe", None) is not None:
            yield
            return
        writes = self._local.pipe = Writes()
        failed = True
        try:
            yield
            failed = False
        finally:
            self._local.pipe = None
            if writes:
                try:
                    self.send(writes)
                except Exception as exc:
                    if not failed:
                        raise
                    log.warning("bookkeeping writes not sent (%s: %s)", type(exc).__name__, exc)

    def deferring(self) -> Writes | None:
        """The writes the current :meth:`deferred` block of this thread collects, or None outside one."""
        return getattr(self._local, "pipe", None)  # type: ignore[no-any-return]

    def send(self, writes: Writes) -> None:
        """Send collected :class:`Writes` now, in one round trip."""
        if writes:
            run_script(self._writes_script, writes.keys, writes.args)

    def send_with(self, trip: OneTrip, writes: Writes) -> list[Any]:
        """Send the calls queued on ``trip`` and then ``writes`` (emptied) in one round trip; the
        replies of ``trip``'s calls, in order."""
        queued = len(trip.calls)
        if writes:
            trip.add(self._writes_script, writes.keys, writes.args)
            writes.clear()  # sent with the trip, whatever its outcome: never a second time
        return trip.execute()[:queued]

    def _writes(self) -> tuple[Writes, bool]:
        """``(writes, True)``: new :class:`Writes` to queue bookkeeping writes on and then send; or,
        within :meth:`deferred`, ``(its writes, False)`` (the block sends them)."""
        pipe = getattr(self._local, "pipe", None)
        if pipe is not None:
            return pipe, False
        return Writes(), True

    def exists(self, job_id: str) -> bool:
        """Whether a record exists for ``job_id``."""
        return bool(self.redis.exists(self.record_key(job_id)))

    def update(self, job_id: str, **fields: Any) -> None:
        """Set non-state fields of an existing record (state changes use :meth:`transition`)."""
        if "state" in fields:
            raise IllegalTransition("state changes go through transition()")
        mapping = {k: _enc(v) for k, v in fields.items() if v is not None}
        gone = [k for k, v in fields.items() if v is None]
        pipe = self.redis.pipeline()
        if mapping:
            pipe.hset(self.record_key(job_id), mapping=mapping)
        if gone:
            pipe.hdel(self.record_key(job_id), *gone)
        pipe.execute()

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        """Add to a counter field of a record."""
        return int(self.redis.hincrby(self.keys.job(job_id), field, amount))

    def create_pointer(self, job_id: str, fields: dict[str, Any], ttl: float, *, handlers: Iterable[str] = (),
                       deliveries_at: float | None = None) -> bool:
        """Write a record that only points at another job (idempotency duplicate); once, atomically.
        In a batch it counts as done (``c:duplicate``); False when the key already existed."""
        mapping = {k: _enc(v) for k, v in fields.items() if v is not None}
        request = mapping.pop("request", None)
        now = time.time()
        return bool(self._pointer(
            keys=[self.keys.job(job_id), self.keys.deliveries, self.keys.stats, self.keys.request(job_id)],
            args=[self.keys.tag, job_id, int(ttl), json.dumps(mapping), repr(now), iso_ms(now),
                  json.dumps(list(handlers)), repr(deliveries_at or now), pack(request) if request else ""]))

    def declare_batch(self, batch_id: str, job_ids: Iterable[str]) -> int:
        """Name a batch's jobs before they are sent (a producer that knows them: enqueue_many,
        ``batch submit``), so the batch cannot look finished while messages are still arriving.
        Declaring an id twice changes nothing. Returns the batch's total."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.keys.batch(batch_id), "created_ts", repr(now))
        pipe.zadd(self.keys.batches, {batch_id: now}, nx=True)
        ids = list(job_ids)
        for i in range(0, len(ids), 1000):
            pipe.zadd(self.keys.batch_jobs(batch_id), {j: now for j in ids[i:i + 1000]}, nx=True)
        pipe.zcard(self.keys.batch_jobs(batch_id))
        return int(pipe.execute()[-1])

    def enqueue_ready(self, job_id: str) -> bool:
        """Put a queued, not admitted job back in its ready queue (where admission finds it)."""
        k = self.keys
        return bool(self._ready(keys=[k.job(job_id), k.priorities, k.admission_seq], args=[k.tag, job_id]))

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
        ready: bool = False,
        pipe: Any = None,
        op: str | None = None,
        after: str = "",
        send: str = "",
        settle: str | float | None = None,
    ) -> Moved:
        """Move ``job_id`` to ``to`` if it is in one of ``expect``; False if it was not.

        ``due``: a time to put the job on the due schedule, ``None`` to take it off, ``""`` to
        leave it. A terminal move needs ``event``; it is stored with the state, and one delivery
        per handler is queued (due at ``deliveries_at``, default now), all in one atomic step.
        ``stat`` names a shared counter bumped with the move. A move to ``succeeded`` also resets
        the provider breaker's streak and closes it when open (``Moved.breaker_closed``). ``ready``: a move to ``queued`` puts the
        job in its ready queue, where admission (admission/queues.py) picks it for a submission slot.
        Leaving ``queued`` takes it out of its ready queue and the deadline index; a batch's counts
        move with the job, and the move that ends a batch's last job writes its ``batch.finished``
        event and deliveries too (``Moved.batch_finished``). With ``pipe`` (a redis-py pipeline) the
        script is only queued on it and ``Moved(0)`` is returned: the caller reads each move's
        outcome from ``pipe.execute()`` (first element 1 = moved); with a :class:`OneTrip`, from its
        ``execute()`` through :meth:`moved`. A ``request`` among ``fields`` goes to the job's request
        key (packed), not to its hash; the key gets the record's TTL on a terminal move and loses it
        on any other. ``op``: the move's operation id (default: a new one, :func:`new_op`), written to
        the record's ``op`` field with the move. ``settle`` settles the job's open credit reservation in
        the same step (credits/ledger.py): a number of credits charged (the rest refunded), ``"open"``
        to charge all of it, ``"auto"`` (the default of a terminal move) to charge all of it when the
        provider had accepted the job and none when it never did; ``None`` on a non-terminal move: no
        settlement. ``after``: move only if the record's ``op`` is still this one (a move chained to an
        earlier one queued on the same ``pipe``), and then, with ``send`` (a rate-log member,
        ``s:<job_id>:<send>``), only if admission recorded that send.
        """
        expected = list(expect)
        for frm in expected:
            if to not in TRANSITIONS[frm]:
                raise IllegalTransition(f"{frm} -> {to} is not a legal move")
        if (to in TERMINAL) != (event is not None):
            raise IllegalTransition("a terminal move must carry exactly one result event")
        encoded = {k: _enc(v) for k, v in (fields or {}).items()}
        request = encoded.pop("request", None)
        payload = json.dumps({k: (v if v is not None else None) for k, v in encoded.items()})
        due_arg = "-" if due is None else ("" if due == "" else repr(float(due)))
        k = self.keys
        now = time.time()
        call = dict(
            keys=[k.job(job_id), *self._move_keys, k.request(job_id), *self._state_keys],
            args=[
                k.tag,
                job_id,
                to.value,
                "|".join("" if s is None else s.value for s in expected),
                payload,
                due_arg,
                json.dumps(event, separators=(",", ":")) if event is not None else "",
                json.dumps(list(handlers)),
                repr(now),
                "1" if to in IN_FLIGHT else "0",
                str(int(retention)),
                repr(float(deliveries_at if deliveries_at is not None else now)),
                stat,
                op or new_op(),  # the operation id: 64 random bits, a short field of the record
                "1" if ready else "",
                iso_ms(now),
                pack(request) if request else "",
                "" if settle is None else settle if isinstance(settle, str) else repr(float(settle)),
                after,
                send,
            ],
        )
        if isinstance(pipe, OneTrip):
            pipe.add(self._transition, **call)
            return Moved(0)
        if pipe is not None:
            self._transition(**call, client=pipe)
            return Moved(0)
        return self.moved(job_id, run_script(self._transition, call["keys"], call["args"]))

    def moved(self, job_id: str, result: Any) -> Moved:
        """A transition's outcome from the script's reply (one read from a pipeline or a :class:`OneTrip`)."""
        k = self.keys
        if int(result[2]):
            self.redis.hincrby(k.stats, "transition_replays", 1)
        moved = Moved(int(result[0]))
        moved.breaker_closed = len(result) > 4 and bool(int(result[4]))
        if len(result) > 3 and int(result[3]):
            batch = self.redis.hget(k.job(job_id), "batch_id")
            moved.batch_finished = _text(batch) if batch else None
        return moved

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
        pipe, send = self._writes()
        pipe.hset(self.record_key(job_id), f"handler:{handler}",
                  json.dumps({"state": "delivered", "attempts": attempts}, separators=(",", ":")))
        pipe.zrem(self.keys.deliveries, f"{job_id}|{handler}")
        pipe.hincrby(self.keys.stats, "handler_deliveries", 1)
        if send:
            self.send(pipe)

    def claim_poll(self, job_id: str, now: float, gap: float, lease: float) -> float | None:
        """Claim ``job_id``'s poll starting at ``now`` (epoch seconds): one poll of a job in flight at
        a time (the claim holds until ``release_poll`` or ``lease`` seconds), and never sooner than
        ``gap`` seconds after the previous one started, across every worker. ``None`` when claimed
        (its start and the poll counts are recorded), else the epoch time before which no poll may
        start (``-1.0``: the job's record is gone)."""
        found = self._claim_poll(keys=[self.keys.job(job_id), self.keys.stats], args=[repr(now), gap, repr(now + lease)])
        return None if found is None else float(_text(found))

    def unclaim_poll(self, job_id: str, claimed_at: float, lease: float, before: dict[str, str] | None) -> None:
        """Undo a poll claim taken at ``claimed_at`` (epoch seconds, for ``lease`` seconds) by
        :meth:`get_for_step(s)` for a poll that did not run: the lease ends, the job's and the stats'
        ``polls`` count it no more, and its last poll time is what ``before`` (the record read with
        the claim) held. Nothing when the claim is no longer that one."""
        jk = self.keys.job(job_id)
        pipe, send = self._writes()
        pipe.only_if(jk, "poll_lease", repr(claimed_at + lease))
        pipe.hdel(jk, "poll_lease")
        pipe.hincrby(jk, "polls", -1)
        pipe.hincrby(self.keys.stats, "polls", -1)
        last = (before or {}).get("last_poll_ts")
        if last:
            pipe.hset(jk, "last_poll_ts", last)
        else:
            pipe.hdel(jk, "last_poll_ts")
        if send:
            self.send(pipe)

    def release_poll(self, job_id: str) -> None:
        """End ``job_id``'s poll claim (its poll finished)."""
        pipe, send = self._writes()
        pipe.hdel(self.keys.job(job_id), "poll_lease")
        if send:
            self.send(pipe)

    def observe(self, name: str, value: float, buckets: tuple[float, ...], stat: str = "") -> None:
        """Add one observation to a shared histogram: its bin (the smallest bucket bound at or above
        ``value``, else ``+Inf``), the sum and the count; metrics.render adds the bins up into
        Prometheus's cumulative buckets. ``stat`` names a counter bumped in the same round trip.
        A histogram named in ``keys.MINUTE_HISTOGRAMS`` also counts its bin in this minute's
        series hash (``Keys.minute``), in the same round trip."""
        le = next((f"{b:g}" for b in buckets if value <= b), "+Inf")
        pipe, send = self._writes()
        pipe.hincrby(self.keys.stats, f"hist:{name}:bin:{le}", 1)
        pipe.hincrby(self.keys.stats, f"hist:{name}:count", 1)
        pipe.hincrbyfloat(self.keys.stats, f"hist:{name}:sum", value)
        if name in MINUTE_HISTOGRAMS:
            minute = self.keys.minute(int(time.time() // 60))
            pipe.hincrby(minute, f"{name}:{le}", 1)
            pipe.expire(minute, MINUTE_TTL)
        if stat:
            pipe.hincrby(self.keys.stats, stat, 1)
        if send:
            self.send(pipe)

    def stat(self, name: str, amount: int = 1) -> None:
        """Bump a shared counter."""
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            self.redis.hincrby(self.keys.stats, name, amount)
        else:
            pipe.hincrby(self.keys.stats, name, amount)


def _with_request(record: dict[str, str], stored: bytes | str | None) -> dict[str, str]:
    """``record`` (a job's raw hash, changed in place and returned) with its request JSON text in
    ``request``, unpacked from its request key's value ``stored``; an older record that holds the
    field in its hash keeps it."""
    if stored is not None and "request" not in record:
        record["request"] = unpack(stored)
    return record


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _step_read_reply(found: list[Any]) -> tuple[dict[str, str] | None, float | None | str]:
    """What :meth:`JobStore.get_for_step` returns, from its script's reply."""
    flat, claim, stored = found[0], _text(found[1]), found[2] if len(found) > 2 else None
    raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)} or None
    if raw is not None:
        _with_request(raw, stored)
    if claim == "-":
        return raw, ""
    return raw, (None if claim == "" else float(claim))
