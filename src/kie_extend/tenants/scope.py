"""What one tenant's token may see: the tenant a batch belongs to, and the system view cut to it.

A job's tenant is on its record. A batch has none of its own: it belongs to the tenant it was
created for through ``/v1`` (:meth:`~kie_extend.store.keys.Keys.batch_owner`, written when a
tenant's submission names it), else to the tenants of its recorded jobs (the oldest
``SAMPLE`` of them: a batch sent by one producer is one tenant's). These reads happen on ``/v1``
and the dashboard only, never in the worker.
"""

from __future__ import annotations

from typing import Any

from kie_extend.infra.runtime import Runtime

#: Oldest jobs of a batch whose tenant is read to tell whose it is.
SAMPLE = 20


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def batch_tenants(rt: Runtime, batch_id: str) -> set[str]:
    """The tenants a batch belongs to (empty: unknown, or no job recorded yet and no owner):
    its recorded owner, else the tenants of its oldest ``SAMPLE`` recorded jobs."""
    owner = rt.redis.get(rt.keys.batch_owner(batch_id))
    return {_t(owner)} if owner is not None else batch_tenants_of_jobs(rt, batch_id)


def owns_batch(rt: Runtime, batch_id: str, tenant: str | None) -> bool:
    """Whether ``tenant`` may see the batch (None: an admin, who sees every batch)."""
    return tenant is None or tenant in batch_tenants(rt, batch_id)


def tenant_filter(rt: Runtime, tenant: str, batch_id: str | None) -> str | None | bool:
    """The tenant filter a listing for ``tenant``'s token uses: ``tenant`` itself; None (no filter)
    for a batch that is the tenant's alone, so its declared jobs not yet recorded (``pending``,
    which carry no tenant) are listed too; False when ``batch_id`` is not the tenant's (list nothing)."""
    if batch_id is None:
        return tenant
    owners = batch_tenants(rt, batch_id)
    if tenant not in owners:
        return False
    return None if owners == {tenant} else tenant


def claim_batch(rt: Runtime, batch_id: str, tenant: str) -> bool:
    """Record ``tenant`` as the batch's owner unless the batch is another tenant's already; True
    when ``tenant`` may add jobs to it (a new batch, or its own)."""
    ttl = max(1, int(rt.settings.retention))
    if rt.redis.set(rt.keys.batch_owner(batch_id), tenant, nx=True, ex=ttl):
        known = batch_tenants_of_jobs(rt, batch_id)
        if known and tenant not in known:
            rt.redis.delete(rt.keys.batch_owner(batch_id))
            return False
        return True
    return _t(rt.redis.get(rt.keys.batch_owner(batch_id)) or b"") == tenant


def batch_tenants_of_jobs(rt: Runtime, batch_id: str) -> set[str]:
    """The tenants of a batch's oldest ``SAMPLE`` recorded jobs (the owner record aside)."""
    ids = rt.redis.zrange(rt.keys.batch_jobs(batch_id), 0, SAMPLE - 1)
    if not ids:
        return set()
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(rt.keys.job(_t(job_id)), "tenant")
    return {_t(t) for t in pipe.execute() if t is not None}


def system_for(view: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    """The ``/v1/system`` view (``api_v1._system``'s shape) as ``tenant`` may see it: the account's
    gates and pauses as they are, waiting counts of its own jobs only; the account-wide counts
    (``jobs`` by state, ``due``, ``dead_letters``, the job store's memory) left out. None: all."""
    if tenant is None:
        return view
    by_priority = {p: {t: n for t, n in tenants.items() if t == tenant}
                   for p, tenants in view["waiting_by_priority"].items()}
    by_priority = {p: v for p, v in by_priority.items() if v}
    mine = sum(n for v in by_priority.values() for n in v.values())
    hidden = ("jobs", "due", "dead_letters", "redis_memory")
    return {**{k: v for k, v in view.items() if k not in hidden}, "waiting": mine,
            "waiting_by_priority": by_priority, "waiting_by_tenant": {tenant: mine} if mine else {}}


__all__ = ["SAMPLE", "batch_tenants", "batch_tenants_of_jobs", "owns_batch", "claim_batch", "tenant_filter",
           "system_for"]
