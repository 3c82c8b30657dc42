"""Handler deliveries: at least once, retried with backoff per handler, then dead-lettered.

A handler's failure is caught, logged with the job id, recorded in the job's ``handlers`` map and
retried on its own schedule; it never touches the job's state or the other handlers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

from kie_extend.errors import ConfigError
from kie_extend.handlers.tenants import tenant_of
from kie_extend.store.record import iso_ms
from kie_extend.infra import tracing
from kie_extend.infra.runtime import Runtime
from kie_extend.store.jobstore import BATCH_REF

log = logging.getLogger("kie_extend.handlers.delivery")


class Delivery:
    """Delivers stored result events to handlers and keeps the dead-letter list."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = rt.settings

    def deliver(self, job_id: str, handler_name: str, event: dict[str, Any] | None = None) -> str:
        """Deliver ``job_id``'s event to one handler; returns the delivery's new state.

        ``job_id`` may be ``@batch:<batch_id>``: that batch's ``batch.finished`` event.

        ``event`` is given only by the process that just wrote it (the first attempt, inline);
        otherwise the stored event and the handler's attempt count are read from the record.
        """
        # The job's stored trace context (one HGET, only when tracing is on): a delivery run under
        # another trace's span (an operator's cancel over HTTP, say) still lands in the job's trace.
        traceparent = (tracing.job_traceparent(self.rt.redis, self.rt.keys.job(job_id))
                       if tracing.enabled() and not job_id.startswith(BATCH_REF) else None)
        with tracing.job_span("kie.deliver", job_id, traceparent, kie_handler=handler_name) as span:
            state = self._deliver(job_id, handler_name, event)
            tracing.annotate(span, kie_delivery__state=state)
            return state

    def _deliver(self, job_id: str, handler_name: str, event: dict[str, Any] | None = None) -> str:
        store, keys = self.rt.store, self.rt.keys
        field = f"handler:{handler_name}"
        attempts = 1
        if event is None:
            raw = store.get(job_id)
            if raw is None or not raw.get("event"):
                store.schedule_delivery(job_id, handler_name, None)
                return "gone"
            info = json.loads(raw.get(field) or '{"state":"pending","attempts":0}')
            if info.get("state") in ("delivered", "dead"):
                store.schedule_delivery(job_id, handler_name, None)
                return str(info["state"])
            event = json.loads(raw["event"])
            attempts = int(info.get("attempts") or 0) + 1
        extra = {"job_id": job_id, "kie_task_id": event.get("kie_task_id")}
        tracing.annotate_current(kie_task_id=event.get("kie_task_id"))
        # The stable dedup key: {job_id}:{event}, or {batch_id}:batch.finished.
        dedup = f"{event['batch_id']}:{event['event']}" if job_id.startswith(BATCH_REF) else f"{job_id}:{event['event']}"
        writes = store.deferring()
        try:
            handler = self.rt.handlers.get(handler_name)
            if handler is None:  # removed from KIE_HANDLERS or the tenants file since the job ended
                raise ConfigError(f"handler {handler_name} is not configured in this process")
            if writes is not None and hasattr(handler, "queue"):
                # A handler whose delivery is a write to this Redis (redis_stream) joins the step's
                # bookkeeping round trip, its mark right after it, in one atomic step. Should that
                # round trip fail, the delivery stays on its schedule, leased to this process, and
                # the tick hands it out again when the lease runs out.
                handler.queue(writes, event, dedup)
                store.mark_delivered(job_id, handler_name, attempts)
                return "delivered"
            handler.deliver(event, dedup)
        except Exception as exc:  # a handler's failure is isolated, whatever it is
            detail = f"{type(exc).__name__}: {exc}"[:500]
            if attempts >= self.s.handler_max_attempts:
                state = "dead"
                self.rt.redis.lpush(keys.dead_letters, json.dumps({
                    "job_id": job_id, "handler": handler_name, "event": event["event"],
                    "attempts": attempts, "error": detail, "at": iso_ms(),
                }))
                store.schedule_delivery(job_id, handler_name, None)
                store.stat("handler_dead_letters")
                log.error("handler %s dead-lettered after %d attempts: %s", handler_name, attempts, detail, extra=extra)
            else:
                state = "retrying"
                delay = min(600.0, self.s.handler_retry_base * 2 ** (attempts - 1)) * (0.5 + random.random())
                store.schedule_delivery(job_id, handler_name, time.time() + delay)
                log.warning("handler %s failed (attempt %d): %s; retry in %.1fs", handler_name, attempts, detail,
                            delay, extra=extra)
            store.stat("handler_failures")
            store.update(job_id, **{field: {"state": state, "attempts": attempts, "last_error": detail}})
            return state
        store.mark_delivered(job_id, handler_name, attempts)
        return "delivered"

    def dead_letters(self, limit: int = 100, *, job_id: str | None = None, handler: str | None = None,
                     tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest dead letters, at most ``limit``: ``{"job_id", "handler", "event", "attempts",
        "error", "at"}`` each. Filters (all optional, combined): one job's (``job_id``), one handler's
        (``handler``, e.g. ``webhook@shop``), one tenant's own handlers' (``tenant``: ``webhook@T``
        and ``redis_stream@T``, handlers/tenants.py)."""
        if job_id is None and handler is None and tenant is None:
            return [json.loads(x) for x in self.rt.redis.lrange(self.rt.keys.dead_letters, 0, limit - 1)]
        items = (json.loads(x) for x in self.rt.redis.lrange(self.rt.keys.dead_letters, 0, -1))
        return [i for i in items if _matches(i, job_id, handler, tenant)][:limit]

    def replay(self, job_id: str | None = None, *, handler: str | None = None, tenant: str | None = None) -> int:
        """Put dead letters back on the delivery schedule: all, or those the filters of
        :meth:`dead_letters` keep; returns how many."""
        count = 0
        keys = self.rt.keys
        for raw in self.rt.redis.lrange(keys.dead_letters, 0, -1):
            item = json.loads(raw)
            if not _matches(item, job_id, handler, tenant):
                continue
            if not self.rt.store.exists(item["job_id"]):
                continue
            self.rt.store.update(item["job_id"], **{f"handler:{item['handler']}": {"state": "pending", "attempts": 0}})
            self.rt.store.schedule_delivery(item["job_id"], item["handler"], time.time())
            self.rt.redis.lrem(keys.dead_letters, 1, raw)
            count += 1
        return count


def _matches(item: dict[str, Any], job_id: str | None, handler: str | None, tenant: str | None) -> bool:
    """Whether a dead letter passes the filters of :meth:`Delivery.dead_letters`."""
    name = str(item.get("handler") or "")
    return ((not job_id or item.get("job_id") == job_id) and (not handler or name == handler)
            and (not tenant or tenant_of(name) == tenant))
