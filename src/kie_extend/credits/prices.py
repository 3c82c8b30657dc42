"""Prices: what each provider operation is estimated to cost in KIE credits (``KIE_PRICES``).

The estimate is what a job reserves when it is admitted; where the provider reports the real
charge (``creditsConsumed`` on the createTask route) that wins when the job is settled
(credits/ledger.py). Operations are the provider calls a job can make: the extension itself
(``extend``) and its follow-up steps (``wav``, ``stems``, ``split_stem``, ``video``,
``midi``, ``lyrics``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

#: Every operation a price can be given for, and its default price (credits). ``extend`` matches a
#: Suno task as observed (about 12 credits); the follow-ups follow KIE's price list.
DEFAULT_PRICES: dict[str, float] = {"extend": 12.0, "wav": 0.4, "stems": 10.0, "split_stem": 50.0, "video": 2.0,
                                    "midi": 0.0, "lyrics": 0.0}
OPERATIONS: tuple[str, ...] = tuple(DEFAULT_PRICES)
#: The operation of the job itself (an upload-and-extend task).
EXTEND = "extend"


def parse_prices(value: Any) -> dict[str, float]:
    """Prices from ``extend=12,wav=0.4`` text (or a mapping), over :data:`DEFAULT_PRICES`: an
    operation not named keeps its default. Returns ``{operation: credits}`` with every operation.
    Raises ValueError naming the part at fault: an unknown operation, a missing ``=``, a price that
    is not a finite number of at least 0, or an operation named twice."""
    out = dict(DEFAULT_PRICES)
    if value is None:
        return out
    items: list[tuple[str, Any]]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = []
        for part in str(value).split(","):
            if not part.strip():
                continue
            name, sep, price = part.partition("=")
            if not sep:
                raise ValueError(f"{part.strip()!r} is not OPERATION=CREDITS such as extend=12")
            items.append((name.strip(), price.strip()))
    seen: set[str] = set()
    for name, price in items:
        if name not in DEFAULT_PRICES:
            raise ValueError(f"unknown operation {name!r} (known: {', '.join(OPERATIONS)})")
        if name in seen:
            raise ValueError(f"operation {name!r} is priced twice")
        seen.add(name)
        try:
            credits = float(price)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={price!r}: a price is a number of credits such as 12 or 0.4") from None
        if isinstance(price, bool) or not math.isfinite(credits) or credits < 0:
            raise ValueError(f"{name}={price!r}: a price is a finite number of credits, at least 0")
        out[name] = credits
    return out


def estimate(prices: Mapping[str, float], operation: str = EXTEND) -> float:
    """The estimated price of one ``operation`` (credits); KeyError for an unknown one."""
    return float(prices[operation])


def steps_price(prices: Mapping[str, float], steps: Any, takes: Any = "all", n_takes: int = 2) -> float:
    """The estimated price of a job's follow-up steps (jobs/plan.py), credits: each step's operation
    (``split_stem`` for a stems step of that type) on each take it runs on (``n_takes``, KIE's two,
    or one with ``takes="first"``); 0 for no steps or a plan that is not a list of steps."""
    if not isinstance(steps, list):
        return 0.0
    per_take = 0.0
    for step in steps:
        if not isinstance(step, dict):
            continue
        op = "split_stem" if step.get("op") == "stems" and step.get("type") == "split_stem" else step.get("op")
        per_take += float(prices.get(str(op), 0.0))
    return per_take * (1 if takes == "first" else n_takes)


def format_credits(value: float) -> str:
    """Credits as text: an integral amount without decimals, else up to two (``12``, ``0.4``)."""
    rounded = round(float(value), 2)
    return f"{rounded:.0f}" if rounded == int(rounded) else f"{rounded:.2f}".rstrip("0")


def prices_text(prices: Mapping[str, float]) -> str:
    """``KIE_PRICES`` text for ``prices`` (the inverse of :func:`parse_prices`)."""
    return ",".join(f"{op}={format_credits(prices[op])}" for op in OPERATIONS if op in prices)
