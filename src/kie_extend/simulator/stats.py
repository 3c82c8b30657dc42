"""Counters of everything the simulator received and did, served at `GET /_sim/stats`."""

from __future__ import annotations

import collections
import threading
from typing import Any

COUNTERS = ("submissions_accepted", "rate_limited", "polls", "callbacks_sent", "callbacks_failed", "uploads")
TALLIES = ("requests", "submissions_by_callback_url", "polls_by_task", "callbacks_by_type", "faults",
           "followups_accepted", "followup_conflicts", "followup_rate_limited", "followup_polls", "followup_paid")


class Stats:
    """Thread-safe counters (plain numbers) and tallies (counts by key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero everything."""
        with self._lock:
            self._counters = dict.fromkeys(COUNTERS, 0)
            self._tallies: dict[str, collections.Counter[str]] = {n: collections.Counter() for n in TALLIES}
            self._codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Set everything from a :meth:`snapshot` (unknown names are ignored)."""
        with self._lock:
            for name in COUNTERS:
                self._counters[name] = int(snapshot.get(name) or 0)
            for name in TALLIES:
                self._tallies[name] = collections.Counter({str(k): int(v) for k, v in (snapshot.get(name) or {}).items()})
            self._codes = collections.defaultdict(collections.Counter)
            for route, codes in (snapshot.get("codes") or {}).items():
                self._codes[route] = collections.Counter({str(k): int(v) for k, v in codes.items()})

    def add(self, name: str, n: int = 1) -> None:
        """Increase the counter `name`."""
        with self._lock:
            self._counters[name] += n

    def tally(self, name: str, key: str, n: int = 1) -> None:
        """Increase the count of `key` in the tally `name`."""
        with self._lock:
            self._tallies[name][key] += n

    def answered(self, route: str, code: int) -> None:
        """Record one request on `route` answered with provider `code`."""
        with self._lock:
            self._tallies["requests"][route] += 1
            self._codes[route][str(code)] += 1

    def get(self, name: str, key: str | None = None) -> int:
        """Current value of a counter, or of one key of a tally."""
        with self._lock:
            return self._counters[name] if key is None else self._tallies[name][key]

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-ready dicts."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out.update({n: dict(c) for n, c in self._tallies.items()})
            out["codes"] = {route: dict(c) for route, c in self._codes.items()}
            return out
