"""Budgets: each tenant's credits per rolling window (the tenants file's ``budget``), and how much of it is used.

A tenant with a budget is admitted only while its charged plus reserved credits in the rolling
window stay within it (the admission script, admission/queues.py, checks it at slot time); its other
jobs wait in ``queued`` with ``waiting_for: "budget"``. Spend is kept in hour buckets
(``Keys.spend``), so a window is counted in whole hours: it reaches back to the start of the hour
``window`` seconds ago, which can only hold a tenant back a little early, never let it overspend.
"""

from __future__ import annotations

import time
from typing import Any

from kie_extend.store.keys import SPEND_BUCKET, Keys


def file_budgets(settings: Any) -> dict[str, tuple[float, float]]:
    """The tenants file's budgets: ``{tenant: (credits, window seconds)}``, only tenants with one.
    The admission script takes these and lets a run-time setting (tenants/settings.py) win over them."""
    registry = getattr(settings, "tenants", None)
    if registry is None:
        return {}
    return {name: (float(t.budget[0]), float(t.budget[1])) for name, t in registry.tenants.items()
            if t.budget is not None}


def budgets(settings: Any, client: Any = None, keys: Keys | None = None) -> dict[str, tuple[float, float]]:
    """Every tenant's budget in force: ``{tenant: (credits, window seconds)}``, only tenants with one.

    The one place budgets are read in Python (metrics, usage, ``waiting_for``): with ``client`` and
    ``keys``, the effective settings (run-time values over the file, tenants/settings.py, one
    HGETALL); without them, the file's alone."""
    if client is None or keys is None or getattr(settings, "tenants", None) is None:
        return file_budgets(settings)
    from kie_extend.tenants.settings import effective

    return {name: (float(t.budget[0]), float(t.budget[1])) for name, t in effective(client, keys, settings).items()
            if t.budget is not None}


def used(client: Any, keys: Keys, tenants: dict[str, tuple[float, float]], now: float | None = None) -> dict[str, float]:
    """Each tenant's charged plus still-reserved credits over its budget's window (whole hours, as
    the admission script counts them): ``{tenant: credits}``, in one round trip."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    spans: list[tuple[str, int]] = []
    for tenant, (_, window) in tenants.items():
        first, last = int((now - window) // SPEND_BUCKET), int(now // SPEND_BUCKET)
        for bucket in range(first, last + 1):
            pipe.hget(keys.spend(bucket), tenant)
        spans.append((tenant, last - first + 1))
    found = iter(pipe.execute() if spans else [])
    out: dict[str, float] = {}
    for tenant, n in spans:
        out[tenant] = sum(float(v) for v in (next(found) for _ in range(n)) if v is not None)
    return out


def waiting(client: Any, keys: Keys) -> set[str]:
    """Tenants whose jobs wait for budget now (the admission script held one back, and has admitted
    none of theirs since)."""
    return {(t.decode() if isinstance(t, bytes) else str(t)) for t in client.hkeys(keys.budget_wait)}
