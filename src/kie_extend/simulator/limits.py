"""Rolling-window rate limiter keyed by an arbitrary string (API key or task ID)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable


class RollingLimiter:
    """Allow at most `limit` events per `window` seconds per key; refused events are not recorded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._events: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, limit: int, window: float) -> bool:
        """Record an event for `key` and return True, or return False if the window is full."""
        now = self._clock()
        with self._lock:
            events = self._events.setdefault(key, collections.deque())
            while events and events[0] <= now - window:
                events.popleft()
            if len(events) >= limit:
                return False
            events.append(now)
            if len(self._events) > 10000:
                self._prune(now, window)
            return True

    def _prune(self, now: float, window: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - window]:
            del self._events[key]

    def clear(self) -> None:
        """Forget all recorded events."""
        with self._lock:
            self._events.clear()
