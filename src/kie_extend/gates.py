"""Global gates shared by every worker on every machine: pause, in-flight cap, submission rate.

The rate gate is a rolling-window log in a sorted set, kept by one Lua script on Redis's own
clock. A job that finds the window full does not spin: it books the earliest slot that keeps every
window of ``KIE_SUBMIT_RATE`` within the limit, and waits in Redis until then. When its turn
comes the window is checked again against the sends that really happened, so a job that comes
late never pushes a window over the limit; if it must wait a little more, it keeps its place and
waits only until the oldest send in the window ages out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

from .keys import Keys

# KEYS: pause, inflight, rate log, breaker. ARGV: job_id, token, limit, book_window_ms,
# check_window_ms, max_inflight, probe_timeout_ms.
# The log holds "s:<token>" for sends that happened (scored by send time) and "b:<token>" for booked
# slots (scored by the slot). Returns {verdict, wait_ms}: verdict ok | paused | breaker | inflight | wait.
# A send already granted to this token is granted again (the script may run twice when a client
# re-sends it after a timeout), so one token never takes two slots.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job, booked = ARGV[1], 'b:' .. ARGV[2]
local limit, book, check, maxif = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('ZSCORE', KEYS[3], 's:' .. ARGV[2]) then
  redis.call('SADD', KEYS[2], job)
  return {'ok', 0}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREM', KEYS[3], booked)
  return {'paused', 0}
end
local bst = redis.call('HGET', KEYS[4], 'state')
if bst == 'open' or bst == 'half_open' then
  if redis.call('HGET', KEYS[4], 'probe') ~= job then
    local untilms = tonumber(redis.call('HGET', KEYS[4], 'until') or '0')
    if now < untilms then
      redis.call('ZREM', KEYS[3], booked)
      return {'breaker', untilms - now}
    end
    -- The cooldown is over: this job is the one probe.
    redis.call('HSET', KEYS[4], 'state', 'half_open', 'probe', job, 'until', now + tonumber(ARGV[7]))
  end
end
if redis.call('SISMEMBER', KEYS[2], job) == 0 and redis.call('SCARD', KEYS[2]) >= maxif then
  redis.call('ZREM', KEYS[3], booked)
  return {'inflight', 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - book)
local mine = redis.call('ZSCORE', KEYS[3], booked)
if mine and tonumber(mine) > now then return {'wait', tonumber(mine) - now} end
local function sends_since(lo)
  local out = {}
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. lo, now, 'WITHSCORES')) do
    table.insert(out, m)
  end
  local scores = {}
  for i = 1, #out, 2 do
    if string.sub(out[i], 1, 2) == 's:' then table.insert(scores, tonumber(out[i + 1])) end
  end
  return scores
end
local function send()
  redis.call('ZREM', KEYS[3], booked)
  redis.call('ZADD', KEYS[3], now, 's:' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[3], book * 2 + 1000)
  redis.call('SADD', KEYS[2], job)
  return {'ok', 0}
end
if mine then
  -- Its turn: only sends that really happened can fill the provider's window now.
  local sent = sends_since(now - check)
  if #sent < limit then return send() end
  local slot = sent[#sent - limit + 1] + check + 1
  redis.call('ZADD', KEYS[3], slot, booked)
  return {'wait', slot - now}
end
-- A new request: book the earliest slot after every earlier booking that keeps each window of
-- book_window_ms within the limit, counting sends and bookings alike.
local n = redis.call('ZCARD', KEYS[3])
local slot = now
if n >= limit then
  local e = redis.call('ZRANGE', KEYS[3], n - limit, n - limit, 'WITHSCORES')
  slot = math.max(slot, tonumber(e[2]) + book)
end
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if last[2] then slot = math.max(slot, tonumber(last[2])) end
if slot <= now then
  local sent = sends_since(now - check)
  if #sent < limit then return send() end
  slot = sent[#sent - limit + 1] + check + 1
end
redis.call('ZADD', KEYS[3], slot, booked)
redis.call('PEXPIRE', KEYS[3], slot - now + book * 2 + 1000)
return {'wait', slot - now}
"""

Verdict = Literal["ok", "paused", "breaker", "inflight", "wait"]


@dataclass(frozen=True)
class Decision:
    """What the gates said: go now, wait ``wait`` seconds for a booked slot, or park."""

    verdict: Verdict
    wait: float = 0.0


class Gates:
    """The submission gates, all in Redis so any number of workers share them."""

    def __init__(
        self, client: redis.Redis, keys: Keys, *, rate: tuple[int, float], margin: float, max_in_flight: int,
        probe_timeout: float = 1800.0,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.limit, self.window = rate
        self.margin = margin
        self.max_in_flight = max_in_flight
        self.probe_timeout = probe_timeout
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, job_id: str, token: str) -> Decision:
        """Ask to submit ``job_id`` now (``token`` names this attempt's rate slot).

        ``ok``: send now (an in-flight slot is taken); ``wait``: a rate slot is booked ``wait``
        seconds ahead; ``paused`` / ``breaker`` / ``inflight``: park the job until the tick frees it."""
        # Slots are booked a full window plus the margin apart; a send is checked against the sends
        # of the last window plus half the margin, which leaves the other half for lateness and
        # network jitter while every provider-side window still holds at most the limit.
        book_ms = int(round((self.window + self.margin) * 1000))
        check_ms = int(round((self.window + self.margin / 2) * 1000))
        verdict, wait_ms = self._acquire(
            keys=[self.keys.pause, self.keys.inflight, self.keys.rate_log, self.keys.breaker],
            args=[job_id, token, self.limit, book_ms, check_ms, self.max_in_flight, int(self.probe_timeout * 1000)],
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
        members = self.redis.zrangebyscore(self.keys.rate_log, time.time() * 1000, "+inf")
        return sum(1 for m in members if m.startswith(b"b:"))

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

    def take_probe_turn(self, interval: float) -> bool:
        """True for one caller per ``interval`` seconds: the one that probes the provider."""
        return bool(self.redis.set(self.keys.probe_lock, "1", nx=True, px=max(1, int(interval * 1000))))
