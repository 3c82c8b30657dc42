"""Audit lines for admin actions (pause, resume, tenant set): who, what, old → new.

Each action is written twice: a log line on the ``kie_extend.tenants.audit`` logger (with
``KIE_LOG_FORMAT=json`` its ``audit`` field holds the entry) and an entry in the capped Redis stream
:meth:`~kie_extend.store.keys.Keys.audit` (``XADD MAXLEN ~ 10000``), read back by ``GET /v1/audit``
and ``kie-extend audit``. ``who`` is an identity, never a token: ``"admin"`` or a tenant's name for
the HTTP API and the dashboard, ``"cli:<os user>"`` for the command line, ``"python:<os user>"``
for the Python API's ``pause``/``resume``.

An entry: ``{"id": stream id, "ts": ISO-8601 UTC, "who", "via": "api" | "dashboard" | "cli" | "python",
"action": "pause" | "resume" | "tenant.set", "target": tenant or null, "old", "new"}`` (``old`` and
``new`` JSON values: the pause's state and reason, or the tenant's changed settings).
"""

from __future__ import annotations

import getpass
import json
import logging
from typing import Any

import redis

from kie_extend.infra.runtime import Runtime
from kie_extend.store.keys import Keys
from kie_extend.store.record import iso_ms
from kie_extend.tenants import settings
from kie_extend.tenants.settings import Change

#: Entries the stream keeps (approximately: Redis trims whole nodes).
MAXLEN = 10_000
#: Entries ``GET /v1/audit`` and ``kie-extend audit`` show by default, and at most.
DEFAULT_COUNT, MAX_COUNT = 50, 1000

log = logging.getLogger(__name__)


def cli_identity() -> str:
    """Who runs the command line: ``cli:<os user>`` (``cli:unknown`` when the OS cannot tell)."""
    try:
        return "cli:" + getpass.getuser()
    except (OSError, KeyError):
        return "cli:unknown"


def record(client: redis.Redis, keys: Keys, *, who: str, via: str, action: str, target: str | None = None,
           old: Any = None, new: Any = None) -> dict[str, Any]:
    """Write one audit entry (log line and stream entry) and return it (with its stream ``id``)."""
    entry = {"ts": iso_ms(),
             "who": who, "via": via, "action": action, "target": target, "old": old, "new": new}
    fields = {k: json.dumps(v) for k, v in entry.items()}
    entry_id = client.xadd(keys.audit, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
    entry = {"id": entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), **entry}
    what = f" {target}" if target else ""
    log.info("audit: %s via %s: %s%s: %s -> %s", who, via, action, what, json.dumps(old), json.dumps(new),
             extra={"audit": entry})
    return entry


def recent(client: redis.Redis, keys: Keys, count: int = DEFAULT_COUNT) -> list[dict[str, Any]]:
    """The last ``count`` entries (at most MAX_COUNT), newest first."""
    out = []
    for entry_id, fields in client.xrevrange(keys.audit, count=max(1, min(int(count), MAX_COUNT))):
        item: dict[str, Any] = {"id": entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)}
        for k, v in fields.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            item[name] = json.loads(v)
        out.append(item)
    return out


def pause(rt: Runtime, *, who: str, via: str, reason: str = "") -> dict[str, str] | None:
    """An operator's pause (``Gates.pause_operator``: ValidationError for a bad reason), audited;
    returns the pause now in force."""
    old = rt.gates.operator_paused()
    rt.gates.pause_operator(reason)
    new = rt.gates.operator_paused()
    record(rt.redis, rt.keys, who=who, via=via, action="pause", old=old, new=new)
    return new


def resume(rt: Runtime, *, who: str, via: str) -> bool:
    """Lift an operator's pause, audited (also when there was none: someone asked); False when
    there was none."""
    old = rt.gates.operator_paused()
    resumed = rt.gates.resume_operator()
    record(rt.redis, rt.keys, who=who, via=via, action="resume", old=old, new=rt.gates.operator_paused())
    return resumed


def set_tenant(rt: Runtime, tenant: str, *, who: str, via: str, **values: Any) -> list[Change]:
    """``tenants.settings.set_tenant`` (same values, same errors), audited when something changed:
    ``old`` and ``new`` hold the changed settings' values in force before and after."""
    changes = settings.set_tenant(rt.redis, rt.keys, rt.settings, tenant, **values)
    if changes:
        record(rt.redis, rt.keys, who=who, via=via, action="tenant.set", target=tenant,
               old={c.field: c.old for c in changes}, new={c.field: c.new for c in changes})
    return changes


__all__ = ["MAXLEN", "DEFAULT_COUNT", "MAX_COUNT", "cli_identity", "record", "recent", "pause", "resume",
           "set_tenant"]
