"""Global gates shared by every worker on every machine: pauses, in-flight cap, submission rate.

The rate gate is a rolling-window log in a sorted set, kept by Lua scripts on Redis's own clock.
Admission (queues.py) books a job the earliest slot that keeps every window of
``KIE_SUBMIT_RATE`` within the limit; the job waits in Redis until then. When its turn comes
:meth:`Gates.acquire` checks the window again against the sends that really happened, so a job
that comes late never pushes a window over the limit; if it must wait a little more, it keeps its
place and waits only until the oldest send in the window ages out.

Two pauses stop admission: the provider's (401/402/433, lifted by a credit probe) and an
operator's (``kie-extend pause`` / ``resume``); so does a provider that cannot be reached
(reach.py, lifted by a credit probe or any answer from KIE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

from kie_extend.errors import ValidationError
from kie_extend.jobs.ids import text_problem
from kie_extend.store.keys import Keys

# KEYS: pause, operator pause, inflight, rate log, breaker, reach. ARGV: job_id, token, limit,
# book_window_ms, check_window_ms, max_inflight.
# The log holds "s:<token>" for sends that happened (scored by send time) and "b:<token>" for slots
# booked by admission (scored by the slot; queues.py); the bookings are also kept alone in the log's
# key + ":b" (Keys.rate_booked), for admission to count them. Returns {verdict, wait_ms}: verdict ok |
# paused | unreachable | breaker | inflight | wait | lost (no booking: the job must be admitted again).
# A send already granted to this token is granted again (the script may run twice when a client
# re-sends it after a timeout), so one token never takes two slots.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job, booked, RB = ARGV[1], 'b:' .. ARGV[2], KEYS[4] .. ':b'
-- Give the job's booking back: from the log and from the bookings' own set (Keys.rate_booked).
local function unbook()
  redis.call('ZREM', KEYS[4], booked)
  redis.call('ZREM', RB, booked)
end
local limit, book, check, maxif = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('ZSCORE', KEYS[4], 's:' .. ARGV[2]) then
  redis.call('SADD', KEYS[3], job)
  return {'ok', 0}
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  unbook()
  return {'paused', 0}
end
if redis.call('HGET', KEYS[6], 'state') == 'unreachable' then
  unbook()
  return {'unreachable', 0}
end
local bst = redis.call('HGET', KEYS[5], 'state')
if (bst == 'open' or bst == 'half_open') and redis.call('HGET', KEYS[5], 'probe') ~= job then
  unbook()
  return {'breaker', 0}
end
local mine = redis.call('ZSCORE', KEYS[4], booked)
if not mine then return {'lost', 0} end
if tonumber(mine) > now then return {'wait', tonumber(mine) - now} end
if redis.call('SISMEMBER', KEYS[3], job) == 0 and redis.call('SCARD', KEYS[3]) >= maxif then
  unbook()
  return {'inflight', 0}
end
-- Its turn: only sends that really happened can fill the provider's window now.
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. (now - check), now, 'WITHSCORES')) do
  table.insert(out, m)
end
local sent = {}
for i = 1, #out, 2 do
  if string.sub(out[i], 1, 2) == 's:' then table.insert(sent, tonumber(out[i + 1])) end
end
if #sent < limit then
  unbook()
  redis.call('ZADD', KEYS[4], now, 's:' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[4], book * 2 + 1000)
  redis.call('SADD', KEYS[3], job)
  return {'ok', 0}
end
local slot = sent[#sent - limit + 1] + check + 1
redis.call('ZADD', KEYS[4], slot, booked)
redis.call('ZADD', RB, slot, booked)
redis.call('PEXPIRE', RB, slot - now + book * 2 + 1000)
return {'wait', slot - now}
"""

Verdict = Literal["ok", "paused", "unreachable", "breaker", "inflight", "wait", "lost"]


#: Longest operator pause reason, in characters (CLI, HTTP API and dashboard alike).
MAX_PAUSE_REASON = 500


def check_pause_reason(reason: object) -> None:
    """ValidationError (field ``reason``) unless ``reason`` is text of at most :data:`MAX_PAUSE_REASON` characters
    with no unpaired surrogates or control characters (ids.text_problem)."""
    if not isinstance(reason, str) or len(reason) > MAX_PAUSE_REASON:
        got = f", got {len(reason)}" if isinstance(reason, str) else ""
        raise ValidationError([{"field": "reason", "message": f"must be a string of at most {MAX_PAUSE_REASON} "
                                                              f"characters{got}"}])
    why = text_problem(reason) if reason else None
    if why:  # not storable text, or control characters (terminal escapes would reach operators)
        raise ValidationError([{"field": "reason", "message": why}])


@dataclass(frozen=True)
class Decision:
    """What the gates said: go now, wait ``wait`` seconds for a booked slot, or park."""

    verdict: Verdict
    wait: float = 0.0


class Gates:
    """The submission gates, all in Redis so any number of workers share them."""

    def __init__(
        self, client: redis.Redis, keys: Keys, *, rate: tuple[int, float], margin: float, max_in_flight: int
    ) -> None:
        self.redis = client
        self.keys = keys
        self.limit, self.window = rate
        self.margin = margin
        self.max_in_flight = max_in_flight
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, job_id: str, token: str) -> Decision:
        """Ask to submit ``job_id`` now (``token`` names this attempt's rate slot).

        ``ok``: send now (an in-flight slot is taken); ``wait``: the booked slot is ``wait`` seconds
        ahead; ``paused`` / ``unreachable`` / ``breaker`` / ``inflight`` / ``lost``: the booking is gone, the job goes
        back to its ready queue until admission picks it again."""
        # Slots are booked a full window plus the margin apart; a send is checked against the sends
        # of the last window plus half the margin, which leaves the other half for lateness and
        # network jitter while every provider-side window still holds at most the limit.
        book_ms = int(round((self.window + self.margin) * 1000))
        check_ms = int(round((self.window + self.margin / 2) * 1000))
        verdict, wait_ms = self._acquire(
            keys=[self.keys.pause, self.keys.operator_pause, self.keys.inflight, self.keys.rate_log, self.keys.breaker,
                  self.keys.reach],
            args=[job_id, token, self.limit, book_ms, check_ms, self.max_in_flight],
        )
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        return Decision(verdict, int(wait_ms) / 1000.0)

    def release(self, job_id: str) -> None:
        """Give back an in-flight slot taken by :meth:`acquire` that was not used."""
        self.redis.srem(self.keys.inflight, job_id)

    def in_flight(self) -> int:
        """Jobs holding an in-flight slot now."""
        return int(self.redis.scard(self.keys.inflight))

    def window_use(self) -> int:
        """Sends within the current rolling window (booked future slots not counted)."""
        now_ms = time.time() * 1000
        lo = now_ms - (self.window + self.margin) * 1000
        members = self.redis.zrangebyscore(self.keys.rate_log, f"({lo}", now_ms)
        return sum(1 for m in members if m.startswith(b"s:"))

    def booked(self) -> int:
        """Future submission slots booked by waiting jobs."""
        return int(self.redis.zcount(self.keys.rate_booked, time.time() * 1000, "+inf"))

    # -- pause -------------------------------------------------------------------------------
    def pause(self, code: int, reason: str) -> None:
        """Stop all submission (401/402/433) until a probe of the credit endpoint succeeds."""
        mapping = {"code": str(code), "reason": reason[:300], "since": repr(time.time())}
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.keys.pause, "since", mapping["since"])
        pipe.hset(self.keys.pause, mapping={"code": mapping["code"], "reason": mapping["reason"]})
        pipe.execute()

    def resume(self) -> None:
        """Lift a pause."""
        self.redis.delete(self.keys.pause)

    def paused(self) -> dict[str, str] | None:
        """The pause record (code, reason, since), or None when submission is open."""
        raw = self.redis.hgetall(self.keys.pause)
        if not raw:
            return None
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}

    def pause_operator(self, reason: str = "") -> None:
        """An operator's pause: no job is admitted until :meth:`resume_operator` (apart from the
        provider's 401/402 pause, which a credit probe lifts by itself). The one place the reason's
        rules are kept (the CLI, the HTTP API, the dashboard and the Python API all call this):
        ValidationError (field ``reason``) per :func:`check_pause_reason`."""
        check_pause_reason(reason)
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.keys.operator_pause, "since", repr(time.time()))
        pipe.hset(self.keys.operator_pause, "reason", reason or "paused by an operator")
        pipe.execute()

    def resume_operator(self) -> bool:
        """Lift an operator's pause; False when there was none."""
        return bool(self.redis.delete(self.keys.operator_pause))

    def operator_paused(self) -> dict[str, str] | None:
        """The operator's pause (reason, since), or None."""
        raw = self.redis.hgetall(self.keys.operator_pause)
        if not raw:
            return None
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}

    def take_probe_turn(self, interval: float) -> bool:
        """True for one caller per ``interval`` seconds: the one that probes the provider."""
        return bool(self.redis.set(self.keys.probe_lock, "1", nx=True, px=max(1, int(interval * 1000))))
