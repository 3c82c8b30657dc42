"""The provider breaker: a run of failed generations across jobs stops submission.

During an outage at the provider every generation fails, and each failed generation was paid for.
After ``KIE_BREAKER_THRESHOLD`` consecutive generation failures (any jobs) the breaker opens:
submission pauses as for 401/402 (jobs wait in ``queued``; submitted jobs keep being polled; no
regeneration). After ``KIE_BREAKER_COOLDOWN`` one probe job is let through (half-open); its success
closes the breaker, its failure opens it again for twice as long (at most ``MAX_COOLDOWN``). Any
successful generation closes it and resets the streak.

State lives in one Redis hash (``Keys.breaker``), changed only by the Lua scripts below, so any
number of workers and beats share it. The submission gate (gates.py) reads the same hash.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from kie_extend.store.keys import Keys

#: Longest cooldown (seconds) the doubling after failed probes may reach.
MAX_COOLDOWN = 1800.0

# KEYS: breaker. ARGV: job_id, threshold, base cooldown ms, max cooldown ms. Returns 1 when this
# failure opened (or re-opened) the breaker.
_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local streak = redis.call('HINCRBY', KEYS[1], 'streak', 1)
redis.call('HSET', KEYS[1], 'last_failure', now, 'last_failure_job', ARGV[1])
local st = redis.call('HGET', KEYS[1], 'state') or 'closed'
if st == 'half_open' and redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  local cd = math.min(tonumber(redis.call('HGET', KEYS[1], 'cooldown') or ARGV[3]) * 2, tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + cd, 'cooldown', cd, 'probe', '')
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  return 1
end
if st == 'closed' and streak >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', now, 'until', now + tonumber(ARGV[3]),
             'cooldown', ARGV[3], 'probe', '')
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  return 1
end
return 0
"""

# KEYS: breaker. ARGV: job_id. A successful generation: reset the streak, close an open breaker.
# Returns 1 when it closed the breaker.
_SUCCESS = """
local st = redis.call('HGET', KEYS[1], 'state') or 'closed'
redis.call('HSET', KEYS[1], 'streak', 0)
if st == 'closed' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'closed', 'probe', '', 'closed_by', ARGV[1])
redis.call('HDEL', KEYS[1], 'until', 'since', 'cooldown')
return 1
"""

# KEYS: breaker. ARGV: job_id. The probe ended neither way (e.g. refused as invalid): another job
# may probe at once.
_NEUTRAL = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' and redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'until', tonumber(t[1]) * 1000, 'probe', '')
  return 1
end
return 0
"""


class Breaker:
    """The shared provider breaker; see the module docstring for the states and their moves."""

    def __init__(self, client: redis.Redis, keys: Keys, *, threshold: int, cooldown: float) -> None:
        self.redis = client
        self.keys = keys
        self.threshold = threshold
        self.cooldown = cooldown
        self._failure = client.register_script(_FAILURE)
        self._success = client.register_script(_SUCCESS)
        self._neutral = client.register_script(_NEUTRAL)

    def failure(self, job_id: str) -> bool:
        """Count one failed generation of ``job_id``; True when this failure opened the breaker."""
        max_ms = int(max(MAX_COOLDOWN, self.cooldown) * 1000)
        return bool(self._failure(keys=[self.keys.breaker],
                                  args=[job_id, self.threshold, int(self.cooldown * 1000), max_ms]))

    def success(self, job_id: str) -> bool:
        """Count one successful generation; True when it closed an open breaker."""
        return bool(self._success(keys=[self.keys.breaker], args=[job_id]))

    def neutral(self, job_id: str) -> None:
        """``job_id`` ended without telling whether the provider works: free the probe turn."""
        self._neutral(keys=[self.keys.breaker], args=[job_id])

    def state(self) -> dict[str, Any]:
        """``{"state": "closed"|"open"|"half_open", "streak", "opens", "since", "until", "probe"}``;
        times are epoch seconds (or None)."""
        raw = {_t(k): _t(v) for k, v in self.redis.hgetall(self.keys.breaker).items()}

        def ms(name: str) -> float | None:
            return float(raw[name]) / 1000.0 if raw.get(name) else None

        return {
            "state": raw.get("state") or "closed",
            "streak": int(raw.get("streak") or 0),
            "threshold": self.threshold,
            "opens": int(raw.get("opens") or 0),
            "since": ms("since"),
            "until": ms("until"),
            "probe": raw.get("probe") or None,
        }

    def is_open(self) -> bool:
        """Whether submission is held by the breaker (open or half-open)."""
        return self.state()["state"] != "closed"

    def probe_due(self, now: float | None = None) -> bool:
        """Whether an open breaker's cooldown (or a half-open probe's time) has run out."""
        st = self.state()
        return st["state"] != "closed" and (st["until"] or 0) <= (now or time.time())

    def reset(self) -> None:
        """Close the breaker by hand (an operator who knows the outage is over)."""
        self.redis.delete(self.keys.breaker)


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
