"""Usage: what each tenant spent over a window (the ledger, by operation) with its budget's use: one report for `kie-extend usage`, `GET /v1/usage`, the dashboard and metrics."""

from __future__ import annotations

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
