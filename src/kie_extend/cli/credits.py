"""`kie-extend usage` and `kie-extend credits --reconcile`: the ledger by tenant and operation, and the balance's fall against it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kie_extend.cli.common import runtime as _runtime
from kie_extend.cli.common import settings as _settings
from kie_extend.config import parse_duration
from kie_extend.credits.prices import format_credits
from kie_extend.credits.reconcile import reconcile
from kie_extend.credits.usage import usage_report
from kie_extend.store.keys import LEDGER_TTL


def since_arg(text: str) -> float:
    """``--since``: a duration such as 30m, 24h or 7d (at most the ledger's 35 days)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0 or seconds > LEDGER_TTL:
        raise argparse.ArgumentTypeError(f"{text!r}: give a window of more than 0 and at most {LEDGER_TTL // 86400}d")
    return seconds


def cmd_usage(args: argparse.Namespace) -> int:
    """Credits reserved, charged, refunded and still open by tenant and operation (``--json``: the
    same document as ``GET /v1/usage``)."""
    rt = _runtime(_settings())
    report = usage_report(rt, args.since, args.tenant)
    registry = rt.settings.tenants
    if args.tenant and registry is not None and not registry.declared(args.tenant):
        # A typo would print an empty table and exit 0; the ledger may still hold an old tenant's.
        print(f"warning: {args.tenant!r} is not a tenant of KIE_TENANTS_FILE (declared: "
              f"{', '.join(sorted(registry.tenants)) or 'none'})", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"credits of jobs admitted since {report['since']} (until {report['until']})")
    print(f"{'tenant':<24} {'operation':<11} {'reserved':>10} {'charged':>10} {'refunded':>10} {'open':>8}  budget")
    for name, entry in sorted(report["tenants"].items()):
        rows = list(entry["operations"].items()) or [("-", entry)]
        for op, row in rows:
            budget = entry.get("budget")
            note = (f"{format_credits(budget['used'])} of {format_credits(budget['credits'])} per "
                    f"{_window(budget['window'])}") if budget else ""
            print(f"{name:<24} {op:<11} {format_credits(row['reserved']):>10} {format_credits(row['charged']):>10} "
                  f"{format_credits(row['refunded']):>10} {format_credits(row['open']):>8}  {note}")
    t = report["total"]
    print(f"{'total':<24} {'':<11} {format_credits(t['reserved']):>10} {format_credits(t['charged']):>10} "
          f"{format_credits(t['refunded']):>10} {format_credits(t['open']):>8}")
    return 0


def _window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def cmd_reconcile(args: argparse.Namespace) -> int:
    """The balance's fall over ``--since`` against the ledger's charges. Exit 0 when they agree (or
    reservations are still open), 1 when they differ, 3 without two balance snapshots in the window."""
    rt = _runtime(_settings())
    live: float | None
    try:  # the balance now ends the window: jobs settled since the last snapshot count on both sides
        live = rt.client.credits(timeout=(3.0, 5.0))
    except Exception as exc:  # unreachable: the snapshots alone (a late job may show as a difference)
        live = None
        print(f"(the balance could not be read now: {type(exc).__name__}; comparing the tick's snapshots only)",
              file=sys.stderr)
    report = reconcile(rt.redis, rt.keys, args.since, balance_now=live)
    if args.json:
        print(json.dumps(report, indent=2))
    elif report["fall"] is None:
        print(f"fewer than two balance snapshots since {report['since']} ({report['snapshots']}): the tick takes "
              "one every KIE_BALANCE_INTERVAL while beat runs")
    else:
        print(f"balance {format_credits(report['balance_start'])} at {report['from']} -> "
              f"{format_credits(report['balance_end'])} at {report['to']}: fell {format_credits(report['fall'])}")
        print(f"ledger charged {format_credits(report['charged'])} (refunded {format_credits(report['refunded'])}, "
              f"still reserved {format_credits(report['open'])})")
        print(f"difference {format_credits(report['difference'])}"
              + ("" if report["complete"] else " (jobs still open: their charges are not known yet)"))
    if report["fall"] is None:
        return 3
    return 0 if report["difference"] == 0 or not report["complete"] else 1
