"""Result handlers: one small interface, built-ins by name, third parties by entry point.

A handler gets every terminal job's event once its job finishes, at least once, with a stable
dedup key ``{job_id}:{event}``. Raising means "try again later"; the delivery machinery
(:mod:`kie_extend.handlers.delivery`) retries with backoff and dead-letters, and a failing handler never
affects the job or the other handlers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from kie_extend.errors import ConfigError
from kie_extend.handlers.base import ENTRY_POINT_GROUP, Factory, Handler, HandlerContext

#: The built-in handlers by name, and the module holding each one's ``factory``.
BUILTINS = {
    "redis_stream": "kie_extend.handlers.redis_stream",
    "webhook": "kie_extend.handlers.webhook",
    "download": "kie_extend.handlers.download",
    "store": "kie_extend.handlers.store",
}


def _builtin(name: str) -> Factory | None:
    module = BUILTINS.get(name)
    if module is None:
        return None
    return importlib.import_module(module).factory  # type: ignore[no-any-return]


def build_handler(name: str, ctx: HandlerContext) -> Handler:
    """The handler called ``name``: a built-in, ``callable:pkg.mod:func``, or an entry point."""
    if name.startswith("callable:"):
        from kie_extend.handlers.callable import CallableHandler

        return CallableHandler(name, name.split(":", 1)[1])
    factory = _builtin(name)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ConfigError(
                f"KIE_HANDLERS: unknown handler {name!r} (built-ins: redis_stream, webhook, download, store, "
                f"callable:module:function; plugins register under {ENTRY_POINT_GROUP!r})"
            )
        factory = found[0].load()
    return factory(ctx)


def build_handlers(names: list[str], ctx: HandlerContext) -> dict[str, Handler]:
    """Every configured handler by name; raises ConfigError naming the bad one."""
    return {name: build_handler(name, ctx) for name in names}


__all__ = ["ENTRY_POINT_GROUP", "BUILTINS", "Factory", "Handler", "HandlerContext", "build_handler", "build_handlers"]
