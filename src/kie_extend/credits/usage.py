"""Usage: what each tenant spent over a window (the ledger, by operation) with its budget's use: one report for `kie-extend usage`, `GET /v1/usage`, the dashboard and metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kie_extend.credits.budgets import budgets, used
from kie_extend.credits.ledger import usage


def usage_report(rt: Any, since: float, tenant: str | None = None) -> dict[str, Any]:
    """The ledger over the last ``since`` seconds (credits/ledger.py ``usage``: ``{"since", "until",
    "seconds", "tenants": {tenant: {"reserved", "charged", "refunded", "open", "operations"}},
    "total"}``, credits), ``tenant``: that one only. A tenant with a budget also gets ``budget``:
    ``{"credits", "window" (seconds), "used" (charged plus reserved in its window), "ratio"}``. ``rt``:
    the process's Runtime (its redis, keys and settings)."""
    report = usage(rt.redis, rt.keys, since, tenant=tenant)
    caps = budgets(rt.settings, rt.redis, rt.keys)
    if tenant is not None:
        caps = {t: c for t, c in caps.items() if t == tenant}
    spent = used(rt.redis, rt.keys, caps)
    for name, (credits, window) in caps.items():
        entry = report["tenants"].setdefault(name, {"reserved": 0.0, "charged": 0.0, "refunded": 0.0, "open": 0.0,
                                                   "operations": {}})
        use = round(spent.get(name, 0.0), 6)
        entry["budget"] = {"credits": credits, "window": window, "used": use,
                           "ratio": round(use / credits, 6) if credits > 0 else (1.0 if use > 0 else 0.0)}
    return report


#: The window of a tenant's usage in the tenants list when it has no budget: 24 hours (seconds).
DEFAULT_WINDOW = 86400.0


def tenants_usage(rt: Any, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each named tenant's credits over its budget's window (``DEFAULT_WINDOW``, 24 h, without a
    budget), as ``GET /v1/tenants`` and ``kie-extend tenant list`` show them: ``{tenant: {"window"
    (seconds), "reserved", "charged", "refunded", "open", "budget_left"}}`` in KIE credits, from the
    ledger (credits/ledger.py ``usage``, whole ledger buckets). ``budget_left``: the budget minus its
    charged plus reserved credits in the window as admission counts them (``used``, whole hours), can
    be negative after a late charge; None without a budget. The ledger reaches back LEDGER_TTL (35 d)
    at most, so a longer window's credits are those of that span. One round trip per distinct window, plus
    one for the budgets' use. ``rt``: the process's Runtime."""
    names = list(names)
    caps = {t: c for t, c in budgets(rt.settings, rt.redis, rt.keys).items() if t in names}
    spent = used(rt.redis, rt.keys, caps) if caps else {}
    windows = {t: caps[t][1] if t in caps else DEFAULT_WINDOW for t in names}
    by_window = {w: usage(rt.redis, rt.keys, w)["tenants"] for w in set(windows.values())}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        row = by_window[windows[name]].get(name, {})
        out[name] = {"window": windows[name],
                     **{k: float(row.get(k, 0.0)) for k in ("reserved", "charged", "refunded", "open")},
                     "budget_left": round(caps[name][0] - spent.get(name, 0.0), 6) if name in caps else None}
    return out


def tenant_views_with_usage(rt: Any) -> dict[str, dict[str, Any]]:
    """The tenants list (tenants/settings.py ``views``) with each tenant's ``usage``
    (:func:`tenants_usage`): ``GET /v1/tenants`` and ``kie-extend tenant list``. Empty without a tenants file."""
    from kie_extend.tenants.settings import views

    listed = views(rt.redis, rt.keys, rt.settings)
    spent = tenants_usage(rt, listed) if listed else {}
    return {name: {**view, "usage": spent[name]} for name, view in listed.items()}
