"""Run-time tenant settings: an admin's weight, rate cap and budget, shared by every process in Redis.

The tenants file (``KIE_TENANTS_FILE``) gives each tenant's defaults; ``kie-extend tenant set`` and
``PUT /v1/tenants/{tenant}`` store overrides in one Redis hash (:meth:`~kie_extend.store.keys.Keys.tenant_settings`),
read by the admission script at every admission, so a change applies on every worker and beat at
their next admission (within one tick), with no restart. Precedence, per setting: the run-time
value, then ``KIE_TENANT_LIMITS`` (rate only), then the file, then the default (weight 1, no cap,
no budget).

Hash fields (tenants hold no ``|``): ``<tenant>|weight`` (``"3"``), ``<tenant>|rate``
(``"<count> <window ms>"`` or ``"none"``) with ``<tenant>|rate_text`` (``"5/10s"``), ``<tenant>|budget``
(``"<credits> <window s>"`` or ``"none"``) with ``<tenant>|budget_text``.

:func:`effective` is the one reader every consumer uses (``GET /v1/tenants``, ``kie-extend tenant
list``, and budget enforcement built on top): ``{tenant: Tenant}`` with the values in force now.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import redis

from kie_extend.config import Settings, parse_rate
from kie_extend.errors import ValidationError
from kie_extend.store.keys import Keys
from kie_extend.tenants.registry import Tenant, budget_window_problem

#: Settings an admin may change at run time.
FIELDS = ("weight", "rate", "budget")
#: A value that removes the run-time setting (back to the file's, or KIE_TENANT_LIMITS').
DEFAULT = "default"
#: A rate or budget value meaning "none" (no cap, no budget), whatever the file says.
NONE = "none"
#: Weights an admin may set (as in the tenants file).
WEIGHTS = range(1, 1001)
_BUDGET = re.compile(r"^\s*\d+\s*/\s*.+$")


class UnknownTenant(LookupError):
    """The tenant is not declared in the tenants file (or there is no file): nothing to set."""


@dataclass(frozen=True)
class Change:
    """One setting changed: ``field`` of ``tenant`` from ``old`` to ``new`` (effective values as
    shown by :meth:`Tenant.public`: a weight int, a rate or budget text, or None)."""

    tenant: str
    field: str
    old: Any
    new: Any


def window_text(count: int, seconds: float) -> str:
    """``5/10s`` for ``(5, 10.0)``: a rate or budget as the tenants file writes it."""
    return f"{count}/{seconds:g}s"


def _values(raw: dict[Any, Any]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for field, value in raw.items():
        f = field.decode() if isinstance(field, bytes) else str(field)
        tenant, _, name = f.rpartition("|")
        if tenant:
            out.setdefault(tenant, {})[name] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def overrides(client: redis.Redis, keys: Keys) -> dict[str, dict[str, str]]:
    """The run-time settings stored now: ``{tenant: {field: raw value}}`` (see the module's fields)."""
    return _values(client.hgetall(keys.tenant_settings))


def _apply(base: Tenant, found: dict[str, str]) -> Tenant:
    changes: dict[str, Any] = {}
    if "weight" in found:
        changes["weight"] = int(found["weight"])
    for name in ("rate", "budget"):
        if name not in found:
            continue
        if found[name] == NONE:
            changes[name], changes[f"{name}_text"] = None, None
        else:
            count, window = found[name].split()
            seconds = float(window) / 1000 if name == "rate" else float(window)
            changes[name] = (int(count), seconds)
            changes[f"{name}_text"] = found.get(f"{name}_text") or window_text(int(count), seconds)
    return dataclasses.replace(base, **changes) if changes else base


def defaults(settings: Settings) -> dict[str, Tenant]:
    """Each declared tenant's settings without run-time changes: the file's, with a
    ``KIE_TENANT_LIMITS`` cap naming the tenant in place of the file's ``rate``. Empty without a file."""
    registry = settings.tenants
    if registry is None:
        return {}
    out = {}
    for name, tenant in registry.tenants.items():
        limit = settings.tenant_limits.get(name)
        if limit is not None and limit != tenant.rate:
            tenant = dataclasses.replace(tenant, rate=limit, rate_text=window_text(*limit))
        out[name] = tenant
    return out


def effective(client: redis.Redis, keys: Keys, settings: Settings) -> dict[str, Tenant]:
    """The settings in force now for every declared tenant, by name: run-time values over
    :func:`defaults`. One HGETALL; empty without a tenants file. Budget enforcement reads
    ``Tenant.budget`` (``(credits, window seconds)`` or None) from here."""
    if not defaults(settings):
        return {}
    return effective_from(client.hgetall(keys.tenant_settings), settings)


def effective_from(raw: dict[Any, Any], settings: Settings) -> dict[str, Tenant]:
    """:func:`effective` from the ``Keys.tenant_settings`` hash already read (``raw``: its HGETALL,
    for a caller that batches it in its own pipeline)."""
    found = _values(raw)
    return {name: _apply(tenant, found.get(name, {})) for name, tenant in defaults(settings).items()}


def views(client: redis.Redis, keys: Keys, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every declared tenant as ``GET /v1/tenants`` and ``kie-extend tenant list`` show it, by name:
    :meth:`Tenant.public` of its settings in force, plus ``overridden`` (the fields set at run time)."""
    base = defaults(settings)
    if not base:
        return {}
    found = overrides(client, keys)
    return {name: {**_apply(t, found.get(name, {})).public(),
                   "overridden": [f for f in FIELDS if f in found.get(name, {})]} for name, t in base.items()}


def parse_changes(weight: Any = None, rate: Any = None, budget: Any = None) -> dict[str, str | None]:
    """Check the values to set (None: leave as is) into ``{field: stored value or None to clear}``
    and, for rate and budget, ``{field}_text``. Raises ValidationError listing every bad field:
    weight an integer 1-1000 or ``default``; rate ``COUNT/WINDOW`` (``5/10s``), ``none`` or
    ``default``; budget ``CREDITS/WINDOW`` (``2000/1d``), ``none`` or ``default``."""
    out: dict[str, str | None] = {}
    problems: list[dict[str, str]] = []
    if weight is not None:
        if weight == DEFAULT:
            out["weight"] = None
        else:
            w = (weight if isinstance(weight, int) and not isinstance(weight, bool)
                 else int(weight) if isinstance(weight, str) and weight.strip().isdigit() else None)
            if w is None or w not in WEIGHTS:
                problems.append({"field": "weight", "message": f"must be an integer from 1 to 1000, or "
                                                               f"{DEFAULT!r} (got {str(weight)[:40]!r})"})
            else:
                out["weight"] = str(w)
    for name, value, example in (("rate", rate, "5/10s"), ("budget", budget, "2000/1d")):
        if value is None:
            continue
        if value == DEFAULT:
            out[name], out[f"{name}_text"] = None, None
            continue
        if value == NONE:
            out[name], out[f"{name}_text"] = NONE, None
            continue
        try:
            if not isinstance(value, str) or (name == "budget" and not _BUDGET.match(value)):
                raise ValueError(f"{str(value)[:40]!r} is not a {name} such as {example}")
            count, seconds = parse_rate(value)
            if name == "budget" and (problem := budget_window_problem(seconds)) is not None:
                raise ValueError(problem)
        except ValueError as exc:
            problems.append({"field": name, "message": f"{exc}; or {NONE!r}, or {DEFAULT!r}"})
            continue
        stored = f"{count} {int(round(seconds * 1000))}" if name == "rate" else f"{count} {seconds:g}"
        out[name], out[f"{name}_text"] = stored, value.strip()
    if problems:
        raise ValidationError(problems)
    if not out:
        raise ValidationError([{"field": "body", "message": "name at least one of weight, rate, budget"}])
    return out


def set_tenant(client: redis.Redis, keys: Keys, settings: Settings, tenant: str, *, weight: Any = None,
               rate: Any = None, budget: Any = None) -> list[Change]:
    """Store run-time settings of a declared ``tenant`` (see :func:`parse_changes` for the values)
    in one atomic step; every worker and beat applies them at its next admission. Returns the
    settings that changed (old → new effective values; empty when nothing did). Raises
    UnknownTenant for a tenant the file does not declare, ValidationError for bad values."""
    base = defaults(settings)
    if tenant not in base:
        raise UnknownTenant(tenant)
    changes = parse_changes(weight, rate, budget)
    before = _apply(base[tenant], overrides(client, keys).get(tenant, {})).public()
    pipe = client.pipeline(transaction=True)
    for field, value in changes.items():
        if value is None:
            pipe.hdel(keys.tenant_settings, f"{tenant}|{field}")
        else:
            pipe.hset(keys.tenant_settings, f"{tenant}|{field}", value)
    pipe.execute()
    after = _apply(base[tenant], overrides(client, keys).get(tenant, {})).public()
    return [Change(tenant, f, before[f], after[f]) for f in FIELDS if before[f] != after[f]]


__all__ = ["FIELDS", "DEFAULT", "NONE", "Change", "UnknownTenant", "window_text", "overrides", "defaults",
           "effective", "views", "parse_changes", "set_tenant"]
