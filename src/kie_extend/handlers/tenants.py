"""Own results: a tenant's own webhook (``webhook@<tenant>``) and stream (``redis_stream@<tenant>``).

A tenant of the tenants file (``KIE_TENANTS_FILE``) with a ``webhook_url`` gets a handler named
``webhook@<tenant>``: the built-in ``webhook`` handler aimed at that URL and signed with the
tenant's ``webhook_secret`` (same headers, same signature). With ``stream = true`` it also gets
``redis_stream@<tenant>``: the built-in ``redis_stream`` handler writing to
``{<prefix>}:results:<tenant>`` with its own dedup markers. They are ordinary handlers of the
delivery machinery (handlers/delivery.py): each has its own delivery state in the job's (or
batch's) ``handlers`` map, its own retries and its own dead letters, so one tenant's failing
receiver never holds back another tenant's or the global handlers.

Which handlers a job's event goes to is decided when the job ends, from its tenant: the global
``KIE_HANDLERS`` plus that tenant's own (:meth:`TenantRoutes.names_for`, a dictionary lookup: a job
of a tenant without own results costs nothing more). A batch's ``batch.finished`` goes to the
handlers of the job that ended it (a batch is one tenant's).

Handler names carry the tenant's name only; the URL's query and the secret never reach Redis,
events, logs or errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from kie_extend.handlers.base import Handler, HandlerContext

#: Separates a built-in handler's name from the tenant it works for: ``webhook@shop``.
SEP = "@"
#: The built-in handlers a tenant may have its own of, in the order they are added.
KINDS = ("redis_stream", "webhook")


def handler_name(kind: str, tenant: str) -> str:
    """``<kind>@<tenant>``, e.g. ``webhook@shop``."""
    return f"{kind}{SEP}{tenant}"


def tenant_of(name: str) -> str | None:
    """The tenant a handler name works for (``webhook@shop`` -> ``shop``), or None for a global one."""
    kind, sep, tenant = name.partition(SEP)
    return tenant if sep and kind in KINDS and tenant else None


def own_kinds(tenant: Any) -> tuple[str, ...]:
    """The built-in handlers ``tenant`` (a :class:`~kie_extend.tenants.registry.Tenant`) has its own of."""
    return tuple(k for k, on in (("redis_stream", tenant.stream), ("webhook", tenant.webhook_url)) if on)


def _own(registry: Any) -> Iterator[tuple[Any, str, str]]:
    """``(tenant, kind, handler name)`` for every tenant's own handler (``registry`` None: none)."""
    for tenant in (registry.tenants.values() if registry is not None else ()):
        for kind in own_kinds(tenant):
            yield tenant, kind, handler_name(kind, tenant.name)


def own_handler_names(registry: Any) -> list[str]:
    """Every tenant's own handler names, from a parsed tenants file (None: no tenants)."""
    return [name for _, _, name in _own(registry)]


def build_tenant_handlers(registry: Any, ctx: HandlerContext) -> dict[str, Handler]:
    """Every tenant's own handlers by name, from a parsed tenants file (None: no tenants)."""
    from kie_extend.handlers.redis_stream import RedisStreamHandler
    from kie_extend.handlers.webhook import WebhookHandler

    out: dict[str, Handler] = {}
    for tenant, kind, name in _own(registry):
        if kind == "webhook":
            out[name] = WebhookHandler(ctx.settings, name=name, url=tenant.webhook_url, secret=tenant.webhook_secret)
        else:
            out[name] = RedisStreamHandler(ctx, name=name, stream=ctx.keys.tenant_results(tenant.name))
    return out


class TenantRoutes:
    """Which handlers a job's event goes to, by tenant: the global ones, plus the tenant's own."""

    def __init__(self, global_names: Iterable[str], own: Iterable[str]) -> None:
        self.global_names: tuple[str, ...] = tuple(global_names)
        by_tenant: dict[str, list[str]] = {}
        for name in own:
            tenant = tenant_of(name)
            if tenant is not None:
                by_tenant.setdefault(tenant, []).append(name)
        self._routes: Mapping[str, tuple[str, ...]] = {
            t: self.global_names + tuple(names) for t, names in by_tenant.items()}

    def names_for(self, tenant: str | None) -> tuple[str, ...]:
        """The handler names a job of ``tenant`` (None or unknown: only the global ones) delivers to."""
        if not tenant or not self._routes:
            return self.global_names
        return self._routes.get(tenant, self.global_names)

    def all_names(self) -> tuple[str, ...]:
        """Every handler name any job may deliver to: the global ones, then every tenant's own."""
        seen = dict.fromkeys(self.global_names)
        for names in self._routes.values():
            seen.update(dict.fromkeys(names))
        return tuple(seen)


__all__ = ["SEP", "KINDS", "handler_name", "tenant_of", "own_kinds", "own_handler_names", "build_tenant_handlers",
           "TenantRoutes"]
