"""Beat's scheduler: runs kie-extend's tick in the beat process itself.

Sent as a message, the tick would wait behind every queued extend and poll message, exactly when
the schedule matters most. In beat it runs on time; the claims it makes are Lua scripts with
leases, so any number of beats can run at once.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import PersistentScheduler

log = logging.getLogger("kie_extend.beat")

TICK_TASK = "kie_extend.tick"


class TickScheduler(PersistentScheduler):
    """Celery's persistent scheduler, with the ``kie_extend.tick`` entry run in-process."""

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Run the tick here; hand any other entry to Celery as usual."""
        if entry.task != TICK_TASK:
            super().apply_entry(entry, producer)
            return
        try:
            self.app.kie_services.get_scheduler().tick()
        except Exception:  # a failed tick is logged; the next one retries everything it missed
            log.exception("tick failed")
