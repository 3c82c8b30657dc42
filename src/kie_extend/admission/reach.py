"""Provider reachability: KIE cannot be reached at all, so submission waits for everyone.

A connection that is refused, a name that does not resolve, a TLS handshake that fails, a connect
timeout, a 5xx from an edge in front of KIE, or a request that got no answer at all (read timeout,
connection dropped) (``errors.is_unreachable``) says nothing about the job that met it. The last
kind may have reached KIE, so the job that met it keeps its never-resend handling
(``submit_outcome_unknown``); it only counts towards the pause, so a KIE that hangs does not swallow
every new job in turn. When ``KIE_UNREACHABLE_THRESHOLD`` such failures (any workers, submissions and
polls alike) fall within ``KIE_UNREACHABLE_WINDOW`` seconds of the first one, the provider is
*unreachable*: admission and the submission gate hold every job in ``queued`` (as the 401/402 pause
and the breaker do, see gates.py, queues.py); submitted jobs keep being polled, and a poll that
cannot connect only backs off. Once every ``KIE_UNREACHABLE_PROBE_INTERVAL`` one caller across all
beats (the scheduler's tick) probes the provider with the free credit endpoint. Any answer from
KIE itself (the probe's, or a poll's) makes it *reachable* again and submission resumes at once.

Why the credit endpoint and not a probe job (as the breaker lets one through): it is free, sends no
paid work at a provider that may be half up, holds no job hostage, and reaches the same host.

A success from a worker that met a failure itself within the window clears the count, so an
occasional refused connection between good answers does not add up to an outage. Only the
worker's own memory decides whether a success needs a round trip, so a healthy system pays nothing.

State lives in one Redis hash (``Keys.reach``), changed only by the Lua scripts below.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from kie_extend.store.keys import Keys

# KEYS: reach. ARGV: threshold, window ms, probe interval ms, error text (already trimmed).
# Returns 1 when this failure made the provider unreachable.
_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'last_failure', now, 'last_error', ARGV[4])
if redis.call('HGET', KEYS[1], 'state') == 'unreachable' then return 0 end
local first = tonumber(redis.call('HGET', KEYS[1], 'first') or '0')
local streak
if first == 0 or now - first > tonumber(ARGV[2]) then
  streak = 1
  redis.call('HSET', KEYS[1], 'first', now, 'streak', 1)
else
  streak = redis.call('HINCRBY', KEYS[1], 'streak', 1)
end
if streak >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'unreachable', 'since', now, 'probe_at', now + tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[1], 'outages', 1)
  return 1
end
return 0
"""

# KEYS: reach. ARGV: who ("probe" or "answer"). KIE answered: clear the count; end an outage.
# Returns 1 when it ended one.
_ANSWERED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], 'streak', 0, 'first', 0)
if st ~= 'unreachable' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'reachable', 'recovered', now, 'recovered_by', ARGV[1],
           'last_outage_ms', now - tonumber(redis.call('HGET', KEYS[1], 'since') or now))
redis.call('HDEL', KEYS[1], 'since', 'probe_at')
return 1
"""

# KEYS: reach. ARGV: probe interval ms. One caller per interval gets the turn to probe.
_PROBE_TURN = """
if redis.call('HGET', KEYS[1], 'state') ~= 'unreachable' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0') then return 0 end
redis.call('HSET', KEYS[1], 'probe_at', now + tonumber(ARGV[1]), 'last_probe', now)
return 1
"""


class Reachability:
    """Whether KIE can be reached, shared by every worker and beat (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, threshold: int, window: float,
                 probe_interval: float) -> None:
        self.redis = client
        self.keys = keys
        self.threshold = threshold
        self.window = window
        self.probe_interval = probe_interval
        self._failure = client.register_script(_FAILURE)
        self._answered = client.register_script(_ANSWERED)
        self._probe_turn = client.register_script(_PROBE_TURN)
        #: monotonic time until which this process's own failures may still be counted in Redis.
        self._dirty_until = 0.0

    def failure(self, error: str) -> bool:
        """Count one connect-level failure or edge 5xx (``error`` names it; no secrets in it).
        True when this failure made the provider unreachable."""
        self._dirty_until = time.monotonic() + self.window
        return bool(self._failure(keys=[self.keys.reach],
                                  args=[self.threshold, int(self.window * 1000), int(self.probe_interval * 1000),
                                        str(error)[:200]]))

    def answered(self, by: str = "answer") -> bool:
        """KIE answered a request (any code: it is reachable). Costs a round trip only when this
        process met a failure within the window (or ``by`` is ``"probe"``). True when it ended an
        outage."""
        if by != "probe" and time.monotonic() > self._dirty_until:
            return False
        self._dirty_until = 0.0
        return bool(self._answered(keys=[self.keys.reach], args=[by]))

    def probe_turn(self) -> bool:
        """True for one caller per probe interval while the provider is unreachable."""
        return bool(self._probe_turn(keys=[self.keys.reach], args=[int(self.probe_interval * 1000)]))

    def probe_failed(self, error: str) -> None:
        """Note a probe that could not reach KIE either."""
        self.redis.hset(self.keys.reach, mapping={"last_probe_error": str(error)[:200], "last_error": str(error)[:200]})

    def unreachable(self) -> bool:
        """Whether submission is held because KIE cannot be reached."""
        return _t(self.redis.hget(self.keys.reach, "state") or b"") == "unreachable"

    def state(self) -> dict[str, Any]:
        """``{"reachable": bool, "state": "reachable"|"unreachable", "since", "next_probe",
        "last_failure", "last_probe", "recovered" (epoch seconds or None), "last_error",
        "last_probe_error" (text or None), "streak", "threshold", "window", "probe_interval",
        "outages" (how many began), "last_outage_seconds"}``."""
        raw = {_t(k): _t(v) for k, v in self.redis.hgetall(self.keys.reach).items()}

        def ms(name: str) -> float | None:
            return float(raw[name]) / 1000.0 if raw.get(name) not in (None, "", "0") else None

        state = raw.get("state") or "reachable"
        return {
            "reachable": state != "unreachable",
            "state": state,
            "since": ms("since"),
            "next_probe": ms("probe_at"),
            "last_failure": ms("last_failure"),
            "last_probe": ms("last_probe"),
            "recovered": ms("recovered"),
            "last_error": raw.get("last_error") or None,
            "last_probe_error": raw.get("last_probe_error") or None,
            "streak": int(raw.get("streak") or 0),
            "threshold": self.threshold,
            "window": self.window,
            "probe_interval": self.probe_interval,
            "outages": int(raw.get("outages") or 0),
            "last_outage_seconds": float(raw["last_outage_ms"]) / 1000.0 if raw.get("last_outage_ms") else None,
        }

    def reset(self) -> None:
        """Forget everything (the provider counts as reachable)."""
        self.redis.delete(self.keys.reach)


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
