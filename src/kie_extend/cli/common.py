"""What every ``kie-extend`` subcommand shares: settings, the runtime, and argument types."""

from __future__ import annotations

import argparse
from typing import Any

from kie_extend.config import Settings, load_settings


def settings() -> Settings:
    """Settings from the environment; a ConfigError reaches :func:`main`, which prints it (exit 5)."""
    return load_settings()


def runtime(settings: Settings) -> Any:
    """A :class:`~kie_extend.infra.runtime.Runtime` for ``settings`` (imported late: most commands that
    fail early never need it)."""
    from kie_extend.infra.runtime import Runtime

    return Runtime(settings)


def seconds_arg(text: str) -> float:
    """A duration flag in seconds: a finite number >= 0 (``nan``, ``inf`` and negatives refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def factor_arg(text: str) -> float:
    """A time factor flag: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def limit_arg(text: str) -> int:
    """``--limit`` of every listing command: an integer from 1 to ``listing.MAX_LIMIT``."""
    from kie_extend.jobs.listing import MAX_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_LIMIT}, got {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}, got {value}")
    return value


def add_listing_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--limit N`` and ``--json``, the same on every listing command (newest first, one page)."""
    from kie_extend.jobs.listing import DEFAULT_LIMIT, MAX_LIMIT

    parser.add_argument("--limit", type=limit_arg, default=DEFAULT_LIMIT, metavar="N",
                        help=f"at most N {what}, newest first (1-{MAX_LIMIT}, default {DEFAULT_LIMIT})")
    parser.add_argument("--json", action="store_true", help="print one JSON document (see the README)")
