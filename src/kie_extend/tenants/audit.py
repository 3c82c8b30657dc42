"""Audit lines for admin actions (pause, resume, tenant set): who, what, old → new.

Each action is written twice: a log line on the ``kie_extend.tenants.audit`` logger (with
``KIE_LOG_FORMAT=json`` its ``audit`` field holds the entry) and an entry in the capped Redis stream
:meth:`~kie_extend.store.keys.Keys.audit` (``XADD MAXLEN ~ 10000``), read back by ``GET /v1/audit``
and ``kie-extend audit``. ``who`` is an identity, never a token: ``"admin"`` or a tenant's name for
the HTTP API and the dashboard, ``"cli:<os user>"`` for the command line.

An entry: ``{"id": stream id, "ts": ISO-8601 UTC, "who", "via": "api" | "dashboard" | "cli",
"action": "pause" | "resume" | "tenant.set", "target": tenant or null, "old", "new"}`` (``old`` and
``new`` JSON values: the pause's state and reason, or the tenant's changed settings).
"""

from __future__ import annotations

import getpass
import json
import logging
from datetime import datetime, timezone
from typing import Any

import redis

from kie_extend.store.keys import Keys

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
    entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
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


__all__ = ["MAXLEN", "DEFAULT_COUNT", "MAX_COUNT", "cli_identity", "record", "recent"]
