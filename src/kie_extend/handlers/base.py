"""The result-handler interface: what a handler provides and what its factory is given.

Third-party handlers import these names from :mod:`kie_extend.handlers` (re-exported there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import redis

from kie_extend.config import Settings
from kie_extend.store.keys import Keys

ENTRY_POINT_GROUP = "kie_extend.handlers"


@runtime_checkable
class Handler(Protocol):
    """What every result handler provides."""

    name: str
    # A handler may set ``inline = True`` when a delivery is fast and local (no network wait):
    # its first attempt then runs in the process that finished the job, with no extra message.

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """Deliver one result event; raise to have it retried."""


@dataclass(frozen=True)
class HandlerContext:
    """What a handler factory may use to build its handler."""

    settings: Settings
    redis: redis.Redis
    keys: Keys


Factory = Callable[[HandlerContext], Handler]

__all__ = ["ENTRY_POINT_GROUP", "Handler", "HandlerContext", "Factory"]
