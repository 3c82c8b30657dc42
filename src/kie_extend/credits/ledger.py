"""The ledger: every job's credits (reserved when admitted, charged or refunded when it ends) and their totals by tenant, operation and time.

The writes are the job store's Lua (store/lua.py ``reserve`` and ``settle``), inside the admission
script and the transition script, so they cost no round trip of their own and a job is never
charged twice: a reservation is open (``cr_open`` on the record) from admission until the move that
settles it, which removes it in the same atomic step. A job's record carries ``cr_reserved``,
``cr_charged`` and ``cr_refunded``; the totals live in buckets of ``LEDGER_BUCKET`` seconds
(``Keys.ledger``), booked at the time of the reservation. This module reads them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kie_extend.store.record import iso_s
from kie_extend.store.keys import LEDGER_BUCKET, LEDGER_TTL, Keys

#: The kinds of credits the ledger counts.
KINDS = ("reserved", "charged", "refunded")
#: errorCode of a failure the provider refunds (531; createTask's failCode 400 "try again later" is
#: reported as 531 by provider/jobs_route.py).
REFUNDED_CODE = 531


def charge_of(record: Any) -> float | str:
    """What a job whose task ended as ``record`` (provider.client.TaskRecord) is charged, as
    JobStore.transition's ``settle`` takes it: 0 for a refunded failure (531), the provider's
    ``creditsConsumed`` where the route reports it, else ``"open"`` (the estimate reserved)."""
    if record.failed and record.error_code == REFUNDED_CODE:
        return 0.0
    if record.credits_consumed is not None:
        return float(record.credits_consumed)
    return "open"


def _num(value: Any) -> float:
    try:
        return round(float(value), 6) if value not in (None, "") else 0.0
    except (TypeError, ValueError):
        return 0.0


def job_credits(raw: Mapping[str, str]) -> dict[str, float]:
    """A job's ``credits`` (its public record): ``{"reserved", "charged", "refunded"}`` in credits,
    from its raw hash; all 0 for a job never admitted."""
    return {"reserved": _num(raw.get("cr_reserved")), "charged": _num(raw.get("cr_charged")),
            "refunded": _num(raw.get("cr_refunded"))}


def _zero() -> dict[str, float]:
    return {"reserved": 0.0, "charged": 0.0, "refunded": 0.0, "open": 0.0}


def usage(client: Any, keys: Keys, since: float, *, tenant: str | None = None,
          now: float | None = None) -> dict[str, Any]:
    """Credits reserved, charged and refunded, and still ``open`` (reserved, not yet settled), by
    tenant and by operation, of the jobs admitted in the last ``since`` seconds (whole ledger
    buckets of LEDGER_BUCKET s; at most LEDGER_TTL back), in one round trip. ``tenant``: that one
    only. Returns ``{"since", "until" (ISO-8601), "seconds", "tenants": {tenant: {"reserved",
    "charged", "refunded", "open", "operations": {op: {same}}}}, "total": {same}}``."""
    now = time.time() if now is None else now
    since = max(0.0, min(float(since), float(LEDGER_TTL)))
    first, last = int((now - since) // LEDGER_BUCKET), int(now // LEDGER_BUCKET)
    pipe = client.pipeline(transaction=False)
    for bucket in range(first, last + 1):
        pipe.hgetall(keys.ledger(bucket))
    sums: dict[tuple[str, str], dict[str, float]] = {}
    settled: dict[tuple[str, str], float] = {}
    for found in pipe.execute():
        for field, value in found.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            who, _, rest = name.partition("|")
            op, _, kind = rest.partition("|")
            if tenant is not None and who != tenant:
                continue
            if kind == "settled":
                settled[(who, op)] = settled.get((who, op), 0.0) + float(value)
            elif kind in KINDS:
                row = sums.setdefault((who, op), _zero())
                row[kind] += float(value)
    tenants: dict[str, Any] = {}
    total = _zero()
    for (who, op), row in sorted(sums.items()):
        row["open"] = max(row["reserved"] - settled.get((who, op), 0.0), 0.0)
        entry = tenants.setdefault(who, {**_zero(), "operations": {}})
        entry["operations"][op] = {k: round(v, 6) for k, v in row.items()}
        for k in row:
            entry[k] = round(entry[k] + row[k], 6)
            total[k] = round(total[k] + row[k], 6)
    return {"since": iso_s(now - since), "until": iso_s(now), "seconds": since, "tenants": tenants, "total": total}
