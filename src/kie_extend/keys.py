"""Every Redis key kie-extend writes, under the configurable prefix (``KIE_KEY_PREFIX``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Names of all Redis keys for one prefix; tests isolate themselves with a unique prefix."""

    prefix: str = "kie_extend"

    def job(self, job_id: str) -> str:
        """Hash: one job's record (state, request, timestamps, tracks, handler states, event)."""
        return f"{self.prefix}:job:{job_id}"

    def state_index(self, state: str) -> str:
        """Sorted set of job ids in ``state`` scored by creation time (for ``kie-extend jobs``)."""
        return f"{self.prefix}:state:{state}"

    def idempotency(self, key: str) -> str:
        """String: the first job id that used an idempotency key (expires after the window)."""
        return f"{self.prefix}:idem:{key}"

    @property
    def due(self) -> str:
        """Sorted set: job id -> time its next step (submit, poll, give-up check) is due; claims lease it."""
        return f"{self.prefix}:due"

    @property
    def blocked(self) -> str:
        """Sorted set: queued jobs waiting for in-flight room or the end of a pause, FIFO by time."""
        return f"{self.prefix}:blocked"

    @property
    def inflight(self) -> str:
        """Set: ids of jobs holding an in-flight slot (submitting or submitted, not finished)."""
        return f"{self.prefix}:inflight"

    @property
    def rate_log(self) -> str:
        """Sorted set: submission slots (taken or reserved) scored by time, for the rolling window."""
        return f"{self.prefix}:rate"

    @property
    def pause(self) -> str:
        """Hash: present while submission is paused (reason, code, since, last probe)."""
        return f"{self.prefix}:pause"

    @property
    def probe_lock(self) -> str:
        """String with a TTL: one pause probe at a time across all beats and workers."""
        return f"{self.prefix}:pause:probe"

    @property
    def deliveries(self) -> str:
        """Sorted set: ``job_id|handler`` -> time the delivery is due; claims lease it."""
        return f"{self.prefix}:deliveries"

    @property
    def dead_letters(self) -> str:
        """List: JSON records of deliveries that exhausted their retries (newest first)."""
        return f"{self.prefix}:dead"

    @property
    def results(self) -> str:
        """Stream: one entry per finished job (the ``redis_stream`` handler)."""
        return f"{self.prefix}:results"

    def dedup(self, handler: str, dedup_key: str) -> str:
        """String: marks a handler's delivery of ``{job_id}:{event}`` done (exactly-once sinks)."""
        return f"{self.prefix}:dedup:{handler}:{dedup_key}"

    @property
    def stats(self) -> str:
        """Hash: counters shared by every process (submissions, responses by code, polls, ...)."""
        return f"{self.prefix}:stats"
