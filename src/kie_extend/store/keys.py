"""Every Redis key kie-extend writes, under the configurable prefix (``KIE_KEY_PREFIX``).

Every name starts with the prefix in braces, ``{kie_extend}:...``: a Redis Cluster hash tag, so all
keys of one prefix live in one hash slot and every Lua script can touch them together on a cluster
as on a single server. A prefix that already holds a ``{...}`` tag is used as it is.

A name built from an id (job, batch, tenant, idempotency key) is a fixed family followed by the id,
always last: ``{p}:job:<id>``, ``{p}:req:<id>``, ``{p}:batch:<id>``, ``{p}:batchjobs:<id>``, ``{p}:idem:<key>``. No
family's name is another's followed by more text, so whatever an id holds (the grammar in jobs/ids.py
already keeps ``:`` out) it cannot spell a key of another family or another id's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


#: Seconds a per-minute series bucket (:meth:`Keys.minute`) lives after its last write: the
#: dashboard charts the last hour, so two hours keep every minute it shows.
MINUTE_TTL = 2 * 3600
#: Histograms whose observations are also counted per minute (field ``<name>:<le>``), so the
#: dashboard can chart the last hour's percentiles rather than all-time ones.
MINUTE_HISTOGRAMS = frozenset({"time_to_result_seconds"})
#: Seconds of one bucket of the credit ledger (:meth:`Keys.ledger`): usage and reconciliation are
#: exact to this much.
LEDGER_BUCKET = 300
#: Seconds of one bucket of a tenant's spend (:meth:`Keys.spend`), which budgets sum over their window.
SPEND_BUCKET = 3600
#: Seconds a ledger or spend bucket lives after its last write: usage looks back at most this far.
LEDGER_TTL = 35 * 86400


@dataclass(frozen=True)
class Keys:
    """Names of all Redis keys for one prefix; tests isolate themselves with a unique prefix."""

    prefix: str = "kie_extend"

    @cached_property
    def tag(self) -> str:
        """The prefix as a hash tag: ``{prefix}``, or the prefix itself when it has one already."""
        return self.prefix if re.search(r"\{[^{}]+\}", self.prefix) else "{" + self.prefix + "}"

    def job(self, job_id: str) -> str:
        """Hash: one job's record (state, timestamps, tracks, handler states, event). Records written
        before :meth:`request` existed hold the request here too, in field ``request``."""
        return f"{self.tag}:job:{job_id}"

    def request(self, job_id: str) -> str:
        """String: one job's request body (store/packing.py: JSON text, or packed), beside its record
        so the record stays a small listpack hash. Written in the same step as the record, it expires
        with it (same TTL) and is read through ``JobStore.get`` / ``JobStore.request``."""
        return f"{self.tag}:req:{job_id}"

    def state_index(self, state: str) -> str:
        """Sorted set of job ids in ``state`` scored by creation time (for ``kie-extend jobs``)."""
        return f"{self.tag}:state:{state}"

    def idempotency(self, key: str, tenant: str) -> str:
        """Hash: the first job that used an idempotency key within one tenant (``job``) and its
        request's fingerprint (``fp``); expires after the window. Tenants hold no ``:``."""
        return f"{self.tag}:idem:{tenant}:{key}"

    def legacy_idempotency(self, key: str) -> str:
        """String: an idempotency key's first job as written before keys were scoped by tenant (only
        read, until the last such key expires with its window)."""
        return f"{self.tag}:idem:{key}"

    def job_claim(self, job_id: str) -> str:
        """String: an explicit job id claimed by a producer before its message is published: the
        message's digest, with ``:sent`` appended once published (expires after the idempotency window)."""
        return f"{self.tag}:claim:{job_id}"

    @property
    def due(self) -> str:
        """Sorted set: job id -> time its next step (submit, poll, give-up check) is due; claims lease it."""
        return f"{self.tag}:due"

    def ready(self, priority: int | str, tenant: str) -> str:
        """Sorted set: one tenant's queued jobs of one priority waiting for a submission slot, by age."""
        return f"{self.tag}:ready:{priority}:{tenant}"

    def tenants(self, priority: int | str) -> str:
        """Sorted set: tenants with jobs waiting at ``priority``, scored by when they were last served."""
        return f"{self.tag}:tenants:{priority}"

    @property
    def priorities(self) -> str:
        """Sorted set: priorities that have waiting jobs (score = the priority)."""
        return f"{self.tag}:prios"

    def tenant_rate(self, tenant: str) -> str:
        """Sorted set: a capped tenant's admitted slots in its own window (``KIE_TENANT_LIMITS``)."""
        return f"{self.tag}:tenant_rate:{tenant}"

    def tenant_turn(self, priority: int | str) -> str:
        """Hash: tenant -> slots it has taken in its current turn at ``priority`` (weighted round
        robin: a tenant of weight w keeps the turn for w slots). Absent: 0."""
        return f"{self.tag}:turn:{priority}"

    @property
    def tenant_settings(self) -> str:
        """Hash: run-time tenant settings set by an admin (``kie-extend tenant set``), fields
        ``<tenant>|weight``, ``<tenant>|rate`` (``count window_ms`` or ``none``), ``<tenant>|rate_text``,
        ``<tenant>|budget`` (``credits window_s``), ``<tenant>|budget_text``; tenants/settings.py."""
        return f"{self.tag}:tenant_settings"

    @property
    def audit(self) -> str:
        """Stream: admin actions (pause, resume, tenant set), capped near 10,000 entries; tenants/audit.py."""
        return f"{self.tag}:audit"

    @property
    def admission_seq(self) -> str:
        """String counter: admission turns handed out (the round robin's clock)."""
        return f"{self.tag}:admission:seq"

    @property
    def deadlines(self) -> str:
        """Sorted set: queued jobs with a ``not_after`` deadline, scored by it."""
        return f"{self.tag}:deadlines"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's total, counts by state (``c:<state>``), times and its ``batch.finished`` event."""
        return f"{self.tag}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """Sorted set: a batch's job ids, scored by creation time. (Up to 0.1.0 it was
        ``{p}:batch:<id>:jobs``, which a batch id ending in ``:jobs`` could spell; see
        :meth:`legacy_batch_jobs` and ``batches.migrate_legacy_job_lists``.)"""
        return f"{self.tag}:batchjobs:{batch_id}"

    def legacy_batch_jobs(self, batch_id: str) -> str:
        """The name a batch's job list had in earlier versions (read once, to move it)."""
        return f"{self.tag}:batch:{batch_id}:jobs"

    def batch_owner(self, batch_id: str) -> str:
        """String: the tenant a batch was created for through ``/v1`` (kept KIE_RETENTION), so a
        tenant's token sees its batch before any worker records one of its jobs."""
        return f"{self.tag}:batchowner:{batch_id}"

    @property
    def batches(self) -> str:
        """Sorted set: batch ids scored by creation time (``kie-extend batch list``)."""
        return f"{self.tag}:batches"

    @property
    def operator_pause(self) -> str:
        """Hash: present while an operator has paused submission (reason, since)."""
        return f"{self.tag}:pause:operator"

    @property
    def inflight(self) -> str:
        """Set: ids of jobs holding an in-flight slot (submitting or submitted, not finished)."""
        return f"{self.tag}:inflight"

    @property
    def rate_log(self) -> str:
        """Sorted set: submission slots (taken or reserved) scored by time, for the rolling window."""
        return f"{self.tag}:rate"

    @property
    def rate_booked(self) -> str:
        """Sorted set: the reserved slots of :attr:`rate_log` alone (``b:<token>`` by slot time), so
        admission counts them without walking the window's sends. Its name is the rate log's + ``:b``
        (the Lua scripts build it that way)."""
        return f"{self.rate_log}:b"

    @property
    def pause(self) -> str:
        """Hash: present while submission is paused (reason, code, since, last probe)."""
        return f"{self.tag}:pause"

    @property
    def probe_lock(self) -> str:
        """String with a TTL: one pause probe at a time across all beats and workers."""
        return f"{self.tag}:pause:probe"

    @property
    def deliveries(self) -> str:
        """Sorted set: ``job_id|handler`` -> time the delivery is due; claims lease it."""
        return f"{self.tag}:deliveries"

    @property
    def dead_letters(self) -> str:
        """List: JSON records of deliveries that exhausted their retries (newest first)."""
        return f"{self.tag}:dead"

    @property
    def results(self) -> str:
        """Stream: one entry per finished job (the ``redis_stream`` handler)."""
        return f"{self.tag}:results"

    def tenant_results(self, tenant: str) -> str:
        """Stream: one tenant's own result events (``redis_stream@<tenant>``, handlers/tenants.py)."""
        return f"{self.tag}:results:{tenant}"

    def dedup(self, handler: str, dedup_key: str) -> str:
        """String: marks a handler's delivery of ``{job_id}:{event}`` done (exactly-once sinks)."""
        return f"{self.tag}:dedup:{handler}:{dedup_key}"

    @property
    def stats(self) -> str:
        """Hash: counters shared by every process (submissions, responses by code, polls, ...)."""
        return f"{self.tag}:stats"

    @property
    def breaker(self) -> str:
        """Hash: the provider breaker (state, failure streak, cooldown, probe job) (README "The provider breaker")."""
        return f"{self.tag}:breaker"

    @property
    def reach(self) -> str:
        """Hash: whether KIE can be reached (state, failure streak, since, next probe, last error)."""
        return f"{self.tag}:reach"

    @property
    def sweep_lock(self) -> str:
        """String with a TTL: one invariant sweep per KIE_SWEEP_INTERVAL across all beats."""
        return f"{self.tag}:sweep"

    @property
    def tick_last(self) -> str:
        """Hash: the last finished tick's time (``at``, epoch seconds), for the stalled-tick alert."""
        return f"{self.tag}:tick:last"

    def session_revoked(self, sid: str) -> str:
        """String: a logged-out dashboard session id (``sid`` from its cookie), kept for the
        session's remaining life so the old cookie opens nothing."""
        return f"{self.tag}:session:revoked:{sid}"

    def minute(self, minute: int) -> str:
        """Hash: what happened in one minute (``minute`` = unix seconds // 60), for the dashboard's
        charts: ``submitted`` and ``finished``/``succeeded``/``failed``/``cancelled`` (bumped by the
        transition script), ``queued``/``in_flight`` (the highest depth a tick saw that minute) and
        ``time_to_result_seconds:<le>`` histogram bins. Expires :data:`MINUTE_TTL` s after its last write.
        The transition script (lua.py) builds the same name from the tag: keep the two in step."""
        return f"{self.tag}:min:{int(minute)}"

    def ledger(self, bucket: int) -> str:
        """Hash: the credit ledger of one :data:`LEDGER_BUCKET` (``bucket`` = unix seconds // that),
        fields ``<tenant>|<operation>|reserved``, ``…|charged``, ``…|refunded``, ``…|settled`` (the
        reservations settled) (credits, floats). A
        job's settlement is booked in the bucket of its reservation. Written only by the job store's
        Lua (lua.py builds the same name from the tag: keep the two in step); expires
        :data:`LEDGER_TTL` s after its last write."""
        return f"{self.tag}:ledger:{int(bucket)}"

    def spend(self, bucket: int) -> str:
        """Hash: each tenant's charged plus still-reserved credits of one :data:`SPEND_BUCKET`
        (``bucket`` = unix seconds // that), field ``<tenant>``; budgets sum it over their window.
        Written by the job store's Lua like :meth:`ledger`."""
        return f"{self.tag}:spend:{int(bucket)}"

    @property
    def budget_wait(self) -> str:
        """Hash: tenants whose jobs wait because their budget is used up, field tenant -> unix
        seconds the admission script last held one back (cleared when one of theirs is admitted)."""
        return f"{self.tag}:budgetwait"

    @property
    def balance(self) -> str:
        """Sorted set: the provider's credit balance as the tick saw it, member ``<unix seconds>:<balance>``
        scored by the time; capped to the newest snapshots (credits/reconcile.py)."""
        return f"{self.tag}:balance"

    @property
    def balance_lock(self) -> str:
        """String with a TTL: one balance snapshot per KIE_BALANCE_INTERVAL across all beats."""
        return f"{self.tag}:balancelock"

    @property
    def sweep_last(self) -> str:
        """Hash: the last sweep's time, jobs checked and violations found."""
        return f"{self.tag}:sweep:last"

    def states(self) -> dict[str, str]:
        """State name -> its index key, for every state a job can be in."""
        from kie_extend.jobs.states import JobState

        return {s.value: self.state_index(s.value) for s in JobState if s is not JobState.NOT_FOUND}
