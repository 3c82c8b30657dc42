"""Beat's scheduler: runs kie-extend's tick in the beat process itself.

Sent as a message, the tick would wait behind every queued extend and poll message, exactly when
the schedule matters most. In beat it runs on time; the claims it makes are Lua scripts with
leases, so any number of beats can run at once.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import PersistentScheduler

from kie_extend.infra.logs import Throttled
from kie_extend.infra.errors import is_infra_error

log = logging.getLogger("kie_extend.admission.beat")

TICK_TASK = "kie_extend.tick"
#: Seconds beat waits after its schedule could not run for an infrastructure reason.
INFRA_WAIT = 1.0
#: Seconds between two warnings about the same outage (the ones left out are counted in the next).
INFRA_LOG_EVERY = 10.0
#: Shortest wait (seconds) between two runs of the schedule. Celery's scheduler takes 10 ms of
#: "drift" off the time left before the next entry, and beat's loop does not sleep at all when that
#: leaves zero or less: without a floor, beat spins through the last 10 ms before every tick (about
#: 240 idle loops a second, a tenth of a core, at a 0.1 s tick). An entry then runs at most this late.
MIN_WAIT = 0.005


class TickScheduler(PersistentScheduler):
    """Celery's persistent scheduler, with the ``kie_extend.tick`` entry run in-process.

    While Redis or the broker is away, beat logs one WARNING per :data:`INFRA_LOG_EVERY` seconds
    (saying how many it left out), not one a tick, and one INFO line when the tick runs again."""

    _schedule_log = Throttled(INFRA_LOG_EVERY)
    _tick_log = Throttled(INFRA_LOG_EVERY)
    _failing = 0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Celery's scheduler tick: the seconds to wait before the next, at least :data:`MIN_WAIT`; a
        broker or store that is unavailable for a while (no connection, read-only, out of memory)
        costs one logged line and a short wait, never the beat process."""
        try:
            return max(float(super().tick(*args, **kwargs)), MIN_WAIT)
        except Exception as exc:
            if not is_infra_error(exc):
                raise
            self._schedule_log.warning(log, "beat could not run its schedule (%s: %s); trying again",
                                       type(exc).__name__, exc)
            return INFRA_WAIT

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Run the tick here; hand any other entry to Celery as usual."""
        if entry.task != TICK_TASK:
            try:
                super().apply_entry(entry, producer)
            except Exception as exc:  # Celery logs send errors itself; this is a safety net
                log.warning("could not send %s: %s: %s", entry.task, type(exc).__name__, exc)
            return
        try:
            self.app.kie_services.get_scheduler().tick()
        except Exception as exc:  # a failed tick is logged; the next one retries everything it missed
            TickScheduler._failing += 1
            if is_infra_error(exc):
                self._tick_log.warning(log, "tick failed: %s: %s", type(exc).__name__, exc)
            else:
                log.exception("tick failed")
            return
        if TickScheduler._failing:
            log.info("tick runs again after %d failed tick(s)", TickScheduler._failing)
            TickScheduler._failing = 0
