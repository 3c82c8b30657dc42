"""``redis_stream``: XADD every result event to ``{prefix}:results``, exactly once per dedup key."""

from __future__ import annotations

import json
from typing import Any

from kie_extend.handlers.base import HandlerContext
from kie_extend.store.jobstore import Writes, run_script

# KEYS: dedup marker, stream. ARGV: ttl seconds, id field name (job_id, or batch_id for
# batch.finished), its value, event name, payload JSON, max length.
_XADD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', ARGV[2], ARGV[3], 'event', ARGV[4],
                    'payload', ARGV[5])
end
return false
"""


class RedisStreamHandler:
    """Appends events to a Redis stream any language can read (XREAD, consumer groups)."""

    name = "redis_stream"
    #: One local script call: delivered by the finishing process itself, no extra message.
    inline = True

    def __init__(self, ctx: HandlerContext, *, name: str | None = None, stream: str | None = None) -> None:
        """The global handler on ``{prefix}:results``; or one called ``name`` writing to ``stream``
        (a tenant's own, handlers/tenants.py), with dedup markers of its own name."""
        if name is not None:
            self.name = name
        self._stream = stream or ctx.keys.results
        self._keys = ctx.keys
        self._ttl = int(max(ctx.settings.retention, 60))
        self._maxlen = ctx.settings.results_maxlen
        self._script = ctx.redis.register_script(_XADD_ONCE)

    def _fields(self, event: dict[str, Any]) -> tuple[str, Any, Any, str]:
        """The entry's id field and value (job_id, or batch_id for batch.finished), event name, payload."""
        idf = ("batch_id", event["batch_id"]) if "batch_id" in event and "job_id" not in event \
            else ("job_id", event["job_id"])
        return (*idf, event["event"], json.dumps(event, separators=(",", ":")))

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """Append the event unless this dedup key was already appended."""
        run_script(self._script, [self._keys.dedup(self.name, dedup_key), self._stream],
                   [self._ttl, *self._fields(event), self._maxlen])

    def queue(self, writes: Writes, event: dict[str, Any], dedup_key: str) -> None:
        """The same append as :meth:`deliver`, queued on the job store's collected ``writes`` (sent
        with a step's other writes in one round trip, atomically with the writes queued after it)."""
        field, value, name, payload = self._fields(event)
        writes.once(self._keys.dedup(self.name, dedup_key), self._ttl)
        writes.xadd(self._stream, self._maxlen, {field: value, "event": name, "payload": payload})


def factory(ctx: HandlerContext) -> RedisStreamHandler:
    """Build the handler."""
    return RedisStreamHandler(ctx)
