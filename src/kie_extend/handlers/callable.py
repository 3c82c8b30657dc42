"""``callable:package.module:function``: call a Python function with each result event."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from kie_extend.errors import ConfigError


class CallableHandler:
    """Calls ``package.module:function(event)``; an exception means "retry later"."""

    def __init__(self, name: str, target: str) -> None:
        self.name = name
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"KIE_HANDLERS: {name!r} must look like callable:package.module:function")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"KIE_HANDLERS: cannot load {target!r}: {exc}") from None
        if not callable(obj):
            raise ConfigError(f"KIE_HANDLERS: {target!r} is not callable")
        self._func: Callable[[dict[str, Any]], Any] = obj

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """Call the function with the event."""
        self._func(event)
