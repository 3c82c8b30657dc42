"""Quotes: what a submission would cost and when it would be done, before anything is enqueued.

``kie-extend batch submit FILE --quote`` and ``POST /v1/quote`` validate a submission exactly as
they would send it, then answer :func:`quote` instead of enqueuing: how many jobs, their estimated
credits (``KIE_PRICES``' ``extend`` per job), an ETA, the provider's balance and the tenant's budget
left. A quote only reads Redis (and, without a recent balance snapshot, asks KIE for the balance).

The ETA is a fluid model of admission (admission/queues.py): the jobs waiting at a higher priority
go first; at the quoted jobs' priority every tenant with waiting work gets a share of the account's
submission rate (``KIE_SUBMIT_RATE``, and no more than ``KIE_MAX_IN_FLIGHT`` jobs per
:data:`GENERATION_SECONDS`) in proportion to its weight, never above its own rate cap; a share a
tenant cannot use (its queue ran dry, or its cap) goes to the others. The quoted jobs queue behind
their tenant's own waiting jobs. ``eta_seconds`` is when the last of them would be submitted plus
:data:`GENERATION_SECONDS`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

from kie_extend.credits.budgets import budgets, used
from kie_extend.credits.prices import EXTEND, estimate
from kie_extend.credits.reconcile import balances
from kie_extend.errors import ProviderError
from kie_extend.infra.check import PROBE_TIMEOUT
from kie_extend.tenants.settings import effective

#: A typical generation, submit to finish (seconds): a Suno extension's takes stream within a minute
#: or two and complete in about three. A constant, not a measurement: the project's histogram
#: (``time_to_result_seconds``) counts from acceptance, so it holds the queueing the model adds itself.
GENERATION_SECONDS = 180.0
#: A balance snapshot older than this many KIE_BALANCE_INTERVALs is not recent: the quote asks KIE.
RECENT_SNAPSHOTS = 2
#: ... and never older than this (seconds), whatever the interval.
RECENT_FLOOR = 120.0


def fair_drain(waiting: dict[str, float], weights: dict[str, float], caps: dict[str, float],
               rate: float) -> dict[str, float]:
    """When each tenant's waiting jobs at one priority are all submitted (seconds from now), when
    they share ``rate`` (jobs/s) by ``weights`` (default 1), each at most its ``caps`` rate (jobs/s;
    absent: none), a share nobody can use going to the others. ``waiting``: ``{tenant: jobs}``.
    Returns ``{tenant: seconds}`` for every tenant with jobs (``math.inf`` if it gets no rate)."""
    left = {t: float(n) for t, n in waiting.items() if n > 0}
    done: dict[str, float] = {}
    now = 0.0
    while left:
        rates: dict[str, float] = {}
        free, open_ = rate, set(left)
        while open_:
            total = sum(weights.get(t, 1.0) for t in open_)
            capped = [t for t in open_ if caps.get(t, math.inf) < free * weights.get(t, 1.0) / total]
            if not capped:
                for t in open_:
                    rates[t] = free * weights.get(t, 1.0) / total
                break
            for t in capped:
                rates[t] = caps[t]
                free -= caps[t]
                open_.discard(t)
        step = min((left[t] / rates[t] for t in left if rates.get(t, 0) > 0), default=math.inf)
        if step == math.inf:
            done.update({t: math.inf for t in left})
            break
        now += step
        for t in list(left):
            left[t] -= rates.get(t, 0.0) * step
            if left[t] <= 1e-9:
                done[t] = now
                del left[t]
    return done


def eta(waiting: dict[str, dict[str, int]], quoted: dict[tuple[str, int], int], weights: dict[str, float],
        caps: dict[str, float], rate: float) -> dict[tuple[str, int], float]:
    """Seconds until the last job of each quoted group is submitted: ``waiting`` is
    ``Admission.waiting()`` (``{priority: {tenant: jobs}}``), ``quoted`` ``{(tenant, priority): jobs}``
    joining the back of their tenant's queue; ``weights``, ``caps`` (jobs/s) and ``rate`` (jobs/s)
    as in :func:`fair_drain`. Every higher priority drains before a lower one starts."""
    queues: dict[int, dict[str, float]] = {}
    for prio, tenants in waiting.items():
        for tenant, n in tenants.items():
            queues.setdefault(int(prio), {})[tenant] = queues.get(int(prio), {}).get(tenant, 0) + n
    for (tenant, prio), n in quoted.items():
        queues.setdefault(prio, {})[tenant] = queues.get(prio, {}).get(tenant, 0) + n
    out: dict[tuple[str, int], float] = {}
    start = 0.0
    for prio in sorted(queues, reverse=True):
        drained = fair_drain(queues[prio], weights, caps, rate)
        for (tenant, p) in quoted:
            if p == prio:
                out[(tenant, p)] = start + drained.get(tenant, 0.0)
        start += max(drained.values(), default=0.0)
    return out


def _balance(rt: Any, now: float) -> tuple[float | None, str | None, str | None]:
    """The provider's balance: (credits, source "snapshot" or "live", None) or (None, None, reason)."""
    recent = max(RECENT_FLOOR, RECENT_SNAPSHOTS * float(rt.settings.balance_interval))
    points = balances(rt.redis, rt.keys, recent, now)
    if points:
        return points[-1][1], "snapshot", None
    timeout = (min(rt.settings.connect_timeout, PROBE_TIMEOUT), min(rt.settings.read_timeout, PROBE_TIMEOUT))
    try:
        return float(rt.client.credits(timeout=timeout)), "live", None
    except ProviderError as exc:
        return None, None, f"no balance snapshot in the last {recent:g} s and KIE did not answer: {exc}"[:300]


def quote(rt: Any, jobs: Iterable[tuple[Any, ...]], now: float | None = None) -> dict[str, Any]:
    """A quote for jobs given as ``(tenant, priority)`` each, or ``(tenant, priority, extra credits)``
    for a job whose follow-up steps cost more (prices.steps_price), reading Redis only (and KIE's
    balance when no snapshot is recent). ``rt``: the process's Runtime.

    Returns ``{"jobs": n, "credits": estimate, "eta_seconds": seconds (int, None when a tenant gets
    no rate), "balance": credits or None, "balance_source": "snapshot" | "live" | None,
    "balance_reason": why None (else None), "budget_left": credits or None (no budget; with several
    tenants, None here and per tenant below), "fits": bool, "generation_seconds":
    GENERATION_SECONDS, "tenants": {tenant: {"jobs", "credits", "eta_seconds", "budget_left",
    "fits"}}}``. Credits are KIE credits; ``fits`` is credits ≤ budget_left (where a budget) and ≤
    balance (where known)."""
    now = time.time() if now is None else now
    s = rt.settings
    groups: dict[tuple[str, int], int] = {}
    extra: dict[str, float] = {}
    for job in jobs:
        tenant, prio = job[0], int(job[1])
        groups[(tenant, prio)] = groups.get((tenant, prio), 0) + 1
        if len(job) > 2 and job[2]:
            extra[tenant] = extra.get(tenant, 0.0) + float(job[2])
    price = estimate(s.prices, EXTEND)
    declared = effective(rt.redis, rt.keys, s)
    weights = {t: float(v.weight) for t, v in declared.items()}
    caps = {t: n / w for t, (n, w) in s.tenant_limits.items() if w > 0}
    caps.update({t: v.rate[0] / v.rate[1] for t, v in declared.items() if v.rate is not None and v.rate[1] > 0})
    count, window = s.submit_rate
    rate = min(count / window if window > 0 else math.inf, s.max_in_flight / GENERATION_SECONDS)
    submitted = eta(rt.admission.waiting(), groups, weights, caps, rate)
    caps_credits = {t: c for t, c in budgets(s, rt.redis, rt.keys).items() if t in {g[0] for g in groups}}
    spent = used(rt.redis, rt.keys, caps_credits, now)
    balance, source, reason = _balance(rt, now)
    tenants: dict[str, dict[str, Any]] = {}
    for (tenant, prio), n in sorted(groups.items()):
        entry = tenants.setdefault(tenant, {"jobs": 0, "credits": 0.0, "eta_seconds": 0, "budget_left": None})
        entry["jobs"] += n
        entry["credits"] = round(entry["credits"] + n * price, 6)
        when = submitted[(tenant, prio)]
        entry["eta_seconds"] = (None if when == math.inf or entry["eta_seconds"] is None
                                else max(entry["eta_seconds"], math.ceil(when + GENERATION_SECONDS)))
    for tenant, entry in tenants.items():
        entry["credits"] = round(entry["credits"] + extra.get(tenant, 0.0), 6)
        if tenant in caps_credits:
            entry["budget_left"] = round(caps_credits[tenant][0] - spent.get(tenant, 0.0), 6)
        entry["fits"] = entry["budget_left"] is None or entry["credits"] <= entry["budget_left"]
    total = round(sum(e["credits"] for e in tenants.values()), 6)
    etas = [e["eta_seconds"] for e in tenants.values()]
    return {"jobs": sum(groups.values()), "credits": total,
            "eta_seconds": None if None in etas else max(etas, default=0),
            "balance": balance, "balance_source": source, "balance_reason": reason,
            "budget_left": next(iter(tenants.values()))["budget_left"] if len(tenants) == 1 else None,
            "fits": all(e["fits"] for e in tenants.values()) and (balance is None or total <= balance),
            "generation_seconds": GENERATION_SECONDS, "tenants": tenants}
