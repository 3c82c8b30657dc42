"""Reconciliation: the provider's balance as the tick sees it, against the ledger's charges.

The tick (admission/tick.py) takes a snapshot of the balance (``GET /api/v1/chat/credit``, the
provider client's ``credits()``) at most once per ``KIE_BALANCE_INTERVAL`` across every beat, into a
sorted set capped at :data:`SNAPSHOTS_KEPT` entries (``Keys.balance``). ``kie-extend credits
--reconcile`` compares the balance's fall between the first and the last snapshot of a window with
what the ledger charged for the jobs admitted in it: a difference is a charge (or a refund) the
ledger does not know about.
"""

from __future__ import annotations

import time
from typing import Any

from kie_extend.credits.ledger import usage
from kie_extend.store.record import iso_s
from kie_extend.store.keys import LEDGER_BUCKET, Keys

#: Balance snapshots kept (the oldest are dropped): a week at one a minute.
SNAPSHOTS_KEPT = 7 * 24 * 60


def snapshot_due(client: Any, keys: Keys, interval: float) -> bool:
    """Whether this caller takes the next balance snapshot: True at most once per ``interval``
    seconds across every beat (``interval`` 0: never)."""
    if interval <= 0:
        return False
    return bool(client.set(keys.balance_lock, "1", nx=True, px=max(1, int(interval * 1000))))


def record_balance(client: Any, keys: Keys, balance: float, now: float | None = None) -> None:
    """Add one snapshot of the provider's ``balance`` (credits) at ``now`` (unix seconds) and drop
    the oldest beyond SNAPSHOTS_KEPT, in one round trip."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.balance, {f"{now!r}:{float(balance)!r}": now})
    pipe.zremrangebyrank(keys.balance, 0, -SNAPSHOTS_KEPT - 1)
    pipe.execute()


def balances(client: Any, keys: Keys, since: float, now: float | None = None) -> list[tuple[float, float]]:
    """The snapshots of the last ``since`` seconds, oldest first: ``[(unix seconds, balance)]``."""
    now = time.time() if now is None else now
    out = []
    for member in client.zrangebyscore(keys.balance, now - since, "+inf"):
        text = member.decode() if isinstance(member, bytes) else str(member)
        ts, _, value = text.partition(":")
        out.append((float(ts), float(value)))
    return out


def reconcile(client: Any, keys: Keys, since: float, now: float | None = None,
              balance_now: float | None = None) -> dict[str, Any]:
    """The balance's fall over the last ``since`` seconds against the ledger's charges.

    ``balance_now``: the balance read at ``now`` (credits), taken as the window's last reading.
    Without it the window ends at the last snapshot, and a job admitted after that snapshot counts
    in the ledger but not yet in the fall (a difference until the next snapshot).

    The window runs from the first snapshot in it to the last; the ledger side is every job
    admitted from the ledger bucket (LEDGER_BUCKET s) of the first snapshot on. Returns ``{"since",
    "from", "to" (ISO-8601 or None), "snapshots", "balance_start", "balance_end", "fall" (start -
    end), "charged", "refunded", "open" (reserved, not yet settled), "difference" (fall - charged),
    "complete" (false while reservations are open: their charges are not known yet)}``; the numbers
    are None without two snapshots in the window."""
    now = time.time() if now is None else now
    points = balances(client, keys, since, now)
    if balance_now is not None:
        points.append((now, float(balance_now)))
    out: dict[str, Any] = {"since": iso_s(now - since), "snapshots": len(points), "from": None, "to": None,
                           "balance_start": None, "balance_end": None, "fall": None, "charged": None,
                           "refunded": None, "open": None, "difference": None, "complete": False}
    if len(points) < 2:
        return out
    (t0, b0), (t1, b1) = points[0], points[-1]
    # The ledger books a job in the bucket of its reservation: from the first snapshot's bucket on.
    ledger = usage(client, keys, now - (t0 // LEDGER_BUCKET) * LEDGER_BUCKET, now=now)["total"]
    fall = round(b0 - b1, 6)
    out.update({"from": iso_s(t0), "to": iso_s(t1), "balance_start": b0, "balance_end": b1, "fall": fall,
                "charged": ledger["charged"], "refunded": ledger["refunded"], "open": ledger["open"],
                "difference": round(fall - ledger["charged"], 6), "complete": ledger["open"] == 0})
    return out
