"""Early audio: a ``job.progress`` event at the ``text`` and ``first`` stages (``KIE_PROGRESS_EVENTS``).

While KIE generates, its takes get stream URLs before the final audio: at ``TEXT_SUCCESS`` (the
lyrics are done) and ``FIRST_SUCCESS`` (the first take can be streamed). With the setting on, the
first poll (a callback makes it happen at once) that sees a stage marks it in the job's record, in
one script that refuses when the stage was marked already or the job is no longer ``submitted``,
then hands ``{"event": "job.progress", "stage", "job_id", "tracks", ...}`` to every handler that
takes progress (``download`` does not: there is nothing final to fetch yet), dedup key
``{job_id}:job.progress:{stage}``, up to three tries each. While those deliveries run, the record's
``progress_pending`` holds back the job's terminal move (store/lua.py's transition, for at most
``PENDING_MAX`` seconds), so no handler sees a progress event after the job's result event. A stage
the job skipped, or learned after its terminal move, sends nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kie_extend.jobs.events import public_tracks, sharing
from kie_extend.store.record import JobRecord

log = logging.getLogger("kie_extend.jobs.progress")

#: KIE's statuses that are a progress stage, and the stage they are.
STAGES = {"TEXT_SUCCESS": "text", "FIRST_SUCCESS": "first"}
#: Longest a pending progress delivery holds back the terminal move, in seconds (store/lua.py).
PENDING_MAX = 30
#: Tries per handler of one progress event.
ATTEMPTS = 3

# KEYS: job. ARGV: stage, now (epoch s), event JSON. 1 when this call marked the stage.
_MARK = """
local jk = KEYS[1]
if redis.call('HGET', jk, 'state') ~= 'submitted' or redis.call('HEXISTS', jk, 'steps_n') == 1 then return 0 end
if redis.call('HEXISTS', jk, 'progress:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', jk, 'progress:' .. ARGV[1], ARGV[3], 'progress_pending', ARGV[2])
return 1
"""


def build_progress(rec: JobRecord, job_id: str, stage: str, tracks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``job.progress`` event of ``stage`` with the takes known so far (stream URLs)."""
    return {"event": "job.progress", "stage": stage, "job_id": job_id, "kie_task_id": rec.kie_task_id,
            "tracks": public_tracks(tracks), "metadata": rec.metadata, **sharing(rec)}


class Progress:
    """Marks progress stages and delivers their events (see the module's docstring)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self._mark = rt.redis.register_script(_MARK)

    def reached(self, job_id: str, rec: JobRecord, status: str, tracks: list[dict[str, Any]]) -> bool:
        """A poll saw ``status``; when it is a stage not marked yet, mark it and deliver its event.
        True when this call delivered it."""
        stage = STAGES.get(status)
        if stage is None or not self.rt.settings.progress_events:
            return False
        import json

        event = build_progress(rec, job_id, stage, tracks)
        key = self.rt.keys.job(job_id)
        if not self._mark(keys=[key], args=[stage, repr(time.time()), json.dumps(event)]):
            return False
        try:
            for name in self.rt.routes.names_for(rec.tenant):
                handler = self.rt.handlers.get(name)
                if handler is None or not getattr(handler, "progress", True):
                    continue
                self._deliver(job_id, name, handler, event, f"{job_id}:job.progress:{stage}")
        finally:
            self.rt.redis.hdel(key, "progress_pending")
        self.rt.store.stat(f"progress_{stage}")
        log.info("progress %s delivered [job_id=%s]", stage, job_id)
        return True

    def _deliver(self, job_id: str, name: str, handler: Any, event: dict[str, Any], dedup: str) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                handler.deliver(event, dedup)
                return
            except Exception as exc:  # a handler's failure never touches the job
                if attempt == ATTEMPTS:
                    self.rt.store.stat("progress_failures")
                    log.warning("progress event to %s not delivered after %d tries: %s: %s [job_id=%s]", name,
                                attempt, type(exc).__name__, str(exc)[:300], job_id)
                    return
                time.sleep(0.2 * attempt)


__all__ = ["PENDING_MAX", "Progress", "STAGES", "build_progress"]
