"""Read kie-extend's result events from the Redis stream through a consumer group, at least once.

The ``redis_stream`` handler adds one entry per event to ``{KIE_KEY_PREFIX}:results`` (the prefix
in braces, a Redis Cluster hash tag: ``{kie_extend}:results`` by default). Every entry has the
fields ``event`` and ``payload`` (the event as JSON), plus ``job_id`` for the job events
(``job.succeeded``, ``job.failed``, ``job.cancelled``) or ``batch_id`` for ``batch.finished``.
``--tenant T`` reads tenant T's own stream instead, ``{KIE_KEY_PREFIX}:results:T`` (a tenant with
``stream = true`` in the tenants file), with the same entries for T's jobs and batches only.

What this reader guarantees (docs/producers.md, "Reading results with a consumer group"):

- It reads as one named consumer of a consumer group (``--group``, ``--consumer``; the consumer
  name defaults to the host name, so a restarted reader is the same consumer) and creates the group,
  and the stream, when missing (``XGROUP CREATE … MKSTREAM``).
- On start it takes back every entry the group still holds pending for this consumer (read before
  a crash, never acknowledged), and every ``--claim-interval`` seconds it takes over entries pending
  for longer than ``--min-idle`` seconds with ``XAUTOCLAIM``: those of consumers that died, and its
  own whose handling failed.
- An entry is acknowledged (``XACK``) only once its handler returned. A handler that raises leaves
  the entry pending; it is tried again after ``--min-idle`` seconds.
- Poison entries: an entry delivered ``--max-deliveries`` times whose handler fails again (or that
  arrives delivered more often than that: the reader crashed while handling it) is copied to the
  stream ``--unhandled-stream`` (default the stream's name + ``:unhandled``) with the reason, logged
  and acknowledged. The reader never wedges on one entry.
- An event kind this reader does not know (a newer kie-extend) is treated the same way: copied to
  the unhandled stream, logged and acknowledged, so it is kept for a newer reader and blocks nothing.
- Redis lost while running (a restart, a failover): it logs it and reconnects with backoff (0.5 s
  doubling to 30 s), then takes back its pending entries as on start. A Redis it cannot reach at
  start is an error (exit 2), as is a command Redis refuses; a group deleted meanwhile is created
  again.
- SIGINT or SIGTERM: it finishes the entry in hand and exits 0.

    KIE_REDIS_URL=redis://localhost:6379/0 python examples/consume_results.py --group billing

Prints one JSON line per handled event on stdout, and its log on stderr. Runs until stopped, or
until ``--count`` events were handled, or until ``--timeout`` seconds pass with nothing to do.
Needs only the ``redis`` package (redis-py 5 or later) and Redis 6.2 or later (or Valkey).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis

log = logging.getLogger("consume_results")

#: An event handler: (entry id, event payload as a dict, the entry's raw fields) -> None; raises on failure.
Handler = Callable[[str, dict[str, Any], dict[str, str]], None]


# -- your work goes here: one function per event kind ----------------------------------------------

def emit(summary: dict[str, Any]) -> None:
    """Stand-in for real work: print one JSON line."""
    print(json.dumps(summary), flush=True)


def on_job_succeeded(entry_id: str, event: dict[str, Any], fields: dict[str, str]) -> None:
    """A job finished with its tracks (``tracks[].audio_url`` and the rest, see the README)."""
    emit({"entry": entry_id, "event": event["event"], "job_id": event["job_id"],
          "kie_task_id": event.get("kie_task_id"), "tracks": [t.get("audio_url") for t in event.get("tracks") or []],
          "batch_id": event.get("batch_id"), "metadata": event.get("metadata")})


def on_job_failed(entry_id: str, event: dict[str, Any], fields: dict[str, str]) -> None:
    """A job failed for good; ``error.kind`` says why (``invalid_request``, ``generation_failed``, …)."""
    emit({"entry": entry_id, "event": event["event"], "job_id": event["job_id"],
          "kie_task_id": event.get("kie_task_id"), "error": (event.get("error") or {}).get("kind"),
          "batch_id": event.get("batch_id"), "metadata": event.get("metadata")})


def on_job_cancelled(entry_id: str, event: dict[str, Any], fields: dict[str, str]) -> None:
    """A job was cancelled before it was sent to KIE (by an operator, a batch cancel or its ``not_after``)."""
    emit({"entry": entry_id, "event": event["event"], "job_id": event["job_id"],
          "error": (event.get("error") or {}).get("kind"), "batch_id": event.get("batch_id"),
          "metadata": event.get("metadata")})


def on_batch_finished(entry_id: str, event: dict[str, Any], fields: dict[str, str]) -> None:
    """Every job of a batch is terminal; ``counts`` by state (``succeeded``, ``failed``, …)."""
    emit({"entry": entry_id, "event": event["event"], "batch_id": event["batch_id"],
          "total": event.get("total"), "counts": event.get("counts")})


HANDLERS: dict[str, Handler] = {
    "job.succeeded": on_job_succeeded,
    "job.failed": on_job_failed,
    "job.cancelled": on_job_cancelled,
    "batch.finished": on_batch_finished,
}


# -- the reader -------------------------------------------------------------------------------------

def results_stream(prefix: str) -> str:
    """The stream name for a key prefix: ``{prefix}:results`` (a prefix already in braces is kept)."""
    return (prefix if "{" in prefix else "{" + prefix + "}") + ":results"


class Reader:
    """One consumer of a consumer group on the results stream.

    ``handlers`` maps event kinds to handlers; ``max_deliveries`` >= 1; ``min_idle`` and
    ``claim_interval`` are seconds. Raises ``redis.RedisError`` when Redis fails."""

    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, *,
                 handlers: dict[str, Handler] | None = None, unhandled_stream: str | None = None,
                 min_idle: float = 60.0, claim_interval: float = 30.0, max_deliveries: int = 5,
                 batch: int = 100) -> None:
        self.r, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.handlers = HANDLERS if handlers is None else handlers
        self.unhandled_stream = unhandled_stream or stream + ":unhandled"
        self.min_idle_ms = max(int(min_idle * 1000), 0)
        self.claim_interval = claim_interval
        self.max_deliveries = max(max_deliveries, 1)
        self.batch = batch
        self.handled = 0
        self.set_aside = 0
        self.stopping = False

    def ensure_group(self, start: str = "0") -> None:
        """Create the group (and the stream) once; an existing group keeps its position."""
        try:
            self.r.xgroup_create(self.stream, self.group, id=start, mkstream=True)
            log.info("created consumer group %s on %s at %s", self.group, self.stream, start)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ----- taking entries -----------------------------------------------------------------------

    def _deliveries(self, ids: list[str], consumer: str | None = None) -> dict[str, int]:
        """How often each of ``ids`` (pending) was delivered, from XPENDING."""
        if not ids:
            return {}
        rows = self.r.xpending_range(self.stream, self.group, min=min(ids, key=_id_key), max=max(ids, key=_id_key),
                                     count=len(ids) * 2 + 10, consumername=consumer or self.consumer)
        return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def take_own_pending(self) -> list[tuple[str, dict[str, str] | None, int]]:
        """Claim back every entry still pending for this consumer (a crashed earlier run of it)."""
        out: list[tuple[str, dict[str, str] | None, int]] = []
        start = "-"
        while True:
            rows = self.r.xpending_range(self.stream, self.group, min=start, max="+", count=self.batch,
                                         consumername=self.consumer)
            if not rows:
                return out
            ids = [_text(row["message_id"]) for row in rows]
            # XCLAIM to ourselves with no minimum idle time: counts the delivery and returns the entries.
            claimed = dict(_entries(self.r.xclaim(self.stream, self.group, self.consumer, 0, ids)))
            counts = self._deliveries(ids)
            for entry_id in ids:
                # An id XCLAIM did not return was trimmed from the stream: nothing left to handle.
                out.append((entry_id, claimed.get(entry_id), counts.get(entry_id, 1)))
            if len(rows) < self.batch:
                return out
            start = "(" + ids[-1]

    def take_abandoned(self) -> list[tuple[str, dict[str, str] | None, int]]:
        """XAUTOCLAIM every entry pending longer than ``min_idle`` (any consumer, this one included)."""
        out: list[tuple[str, dict[str, str] | None, int]] = []
        cursor = "0-0"
        while True:
            reply = self.r.xautoclaim(self.stream, self.group, self.consumer, self.min_idle_ms,
                                      start_id=cursor, count=self.batch)
            cursor = _text(reply[0])
            entries = _entries(reply[1])
            # Redis 7 also lists ids that were pending but trimmed away; XAUTOCLAIM dropped them already.
            for entry_id in (reply[2] if len(reply) > 2 else []):
                log.warning("entry %s was trimmed from %s before it was handled", _text(entry_id), self.stream)
            counts = self._deliveries([e for e, _ in entries])
            out.extend((entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries)
            if cursor in ("0-0", "0"):
                return out

    def read_new(self, block_ms: int) -> list[tuple[str, dict[str, str] | None, int]]:
        """New entries for this group (``>``), blocking up to ``block_ms``."""
        reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=block_ms)
        return [(entry_id, fields, 1) for entry_id, fields in _entries(reply[0][1] if reply else [])]

    # ----- handling one entry -------------------------------------------------------------------

    def process(self, entry_id: str, fields: dict[str, str] | None, deliveries: int) -> bool:
        """Handle one delivered entry and acknowledge it when done; True when it was handled.

        Not acknowledged (left pending, tried again after ``min_idle``): a handler that raised
        before the entry's ``max_deliveries``-th delivery."""
        if not fields:  # pending, but trimmed from the stream meanwhile: nothing to handle
            self.r.xack(self.stream, self.group, entry_id)
            return False
        kind = fields.get("event", "")
        handler = self.handlers.get(kind)
        if handler is None:
            self._set_aside(entry_id, fields, deliveries, f"unknown event kind {kind!r}")
            return False
        if deliveries > self.max_deliveries:
            self._set_aside(entry_id, fields, deliveries,
                            f"delivered {deliveries} times; the reader stopped while handling it")
            return False
        try:
            event = json.loads(fields["payload"])
            handler(entry_id, event, fields)
        except Exception as exc:  # any handler error: retry later, up to max_deliveries
            if deliveries >= self.max_deliveries:
                self._set_aside(entry_id, fields, deliveries, f"handler failed: {type(exc).__name__}: {exc}")
            else:
                log.warning("entry %s (%s): handler failed on delivery %d of %d, left pending: %s: %s",
                            entry_id, kind, deliveries, self.max_deliveries, type(exc).__name__, exc)
            return False
        self.r.xack(self.stream, self.group, entry_id)
        self.handled += 1
        return True

    def _set_aside(self, entry_id: str, fields: dict[str, str], deliveries: int, reason: str) -> None:
        """Copy the entry to the unhandled stream with the reason, then acknowledge it (one transaction)."""
        record = {**fields, "entry_id": entry_id, "group": self.group, "consumer": self.consumer,
                  "deliveries": str(deliveries), "reason": reason}
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.unhandled_stream, record)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.set_aside += 1
        log.error("entry %s set aside to %s: %s", entry_id, self.unhandled_stream, reason)

    # ----- the loop -----------------------------------------------------------------------------

    def run(self, count: int = 0, idle_timeout: float = 0.0) -> int:
        """Handle entries until stopped, ``count`` handled (0: no limit) or ``idle_timeout`` seconds
        without an entry (0: no limit); returns how many were handled."""
        batches = [self.take_own_pending()]
        next_claim = time.monotonic()  # claim abandoned entries right away, then every claim_interval
        last_work = time.monotonic()
        while not self.stopping:
            if count and self.handled >= count:
                break
            if not batches:
                if time.monotonic() >= next_claim:
                    batches.append(self.take_abandoned())
                    next_claim = time.monotonic() + self.claim_interval
                else:
                    wait = min(1.0, max(next_claim - time.monotonic(), 0.01))
                    batches.append(self.read_new(int(wait * 1000)))
            entries = batches.pop(0)
            if entries:
                last_work = time.monotonic()
            elif idle_timeout and time.monotonic() - last_work > idle_timeout:
                break
            for entry_id, fields, deliveries in entries:
                if self.stopping or (count and self.handled >= count):
                    break  # what is left stays pending for this consumer: taken back on the next start
                self.process(entry_id, fields, deliveries)
        return self.handled


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(raw: Any) -> list[tuple[str, dict[str, str] | None]]:
    """(id, fields) pairs from a redis-py reply; fields None for an entry that no longer exists."""
    out = []
    for entry_id, fields in raw or []:
        decoded = {_text(k): _text(v) for k, v in fields.items()} if fields else None
        out.append((_text(entry_id), decoded))
    return out


def default_consumer() -> str:
    """This host's name: stable across restarts, so a restarted reader takes back its own entries."""
    return os.environ.get("KIE_RESULTS_CONSUMER") or socket.gethostname() or "consumer"


def main(argv: list[str] | None = None, handlers: dict[str, Handler] | None = None) -> int:
    """Parse the arguments and run a reader; 0 when it stopped normally, 2 when Redis failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--group", default=os.environ.get("KIE_RESULTS_GROUP", "kie-extend-results"),
                        help="consumer group name [env KIE_RESULTS_GROUP, default kie-extend-results]")
    parser.add_argument("--consumer", default=default_consumer(),
                        help="this consumer's name in the group; keep it stable across restarts "
                             "[env KIE_RESULTS_CONSUMER, default the host name]")
    parser.add_argument("--new-only", action="store_true",
                        help="a new group starts at the stream's end instead of its beginning")
    parser.add_argument("--min-idle", type=float, default=60.0,
                        help="take over entries pending this many seconds (failed or abandoned) [60]")
    parser.add_argument("--claim-interval", type=float, default=30.0,
                        help="look for such entries every this many seconds [30]")
    parser.add_argument("--max-deliveries", type=int, default=5,
                        help="set an entry aside once it was delivered this many times and failed [5]")
    parser.add_argument("--tenant", default=None,
                        help="read this tenant's own stream {prefix}:results:TENANT (tenants file, stream = true)")
    parser.add_argument("--unhandled-stream", default=None,
                        help="where entries set aside go [default: the stream's name + :unhandled]")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="stop after this many seconds with nothing to do (0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KIE_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    url = os.environ.get("KIE_REDIS_URL", "redis://localhost:6379/0")
    stream = results_stream(os.environ.get("KIE_KEY_PREFIX", "kie_extend"))
    if args.tenant:
        stream += ":" + args.tenant
    client = redis.Redis.from_url(url, decode_responses=True)
    reader = Reader(client, stream, args.group, args.consumer, handlers=handlers,
                    unhandled_stream=args.unhandled_stream, min_idle=args.min_idle,
                    claim_interval=args.claim_interval, max_deliveries=args.max_deliveries)

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s: stopping after the entry in hand", signal.Signals(signum).name)
        reader.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    where = urlsplit(url)  # host and port only: the URL may hold a password
    redis_at = f"{where.hostname}:{where.port or 6379}"
    connected, delay = False, 0.5
    while not reader.stopping:
        try:
            reader.ensure_group("$" if args.new_only else "0")
            connected, delay = True, 0.5
            reader.run(count=args.count, idle_timeout=args.timeout)
            break
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                log.error("Redis at %s refused a command: %s", redis_at, exc)
                return 2
            log.warning("consumer group %s on %s is gone (%s); creating it again", args.group, stream, exc)
        except redis.AuthenticationError as exc:  # a wrong user or password: trying again cannot help
            log.error("Redis at %s refused the credentials (%s); check the user and password in the URL",
                      redis_at, exc)
            return 2
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not connected:  # never reached: a wrong URL or a stopped server; say so and stop
                log.error("Redis at %s cannot be reached: %s", redis_at, exc)
                return 2
            log.warning("lost Redis at %s (%s); trying again in %.1f s", redis_at, exc, delay)
            deadline = time.monotonic() + delay
            while not reader.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
            delay = min(delay * 2, 30.0)
        except redis.RedisError as exc:
            log.error("Redis at %s failed: %s", redis_at, exc)
            return 2
    log.info("handled %d event(s) from %s as %s/%s; %d set aside", reader.handled, stream, args.group,
             args.consumer, reader.set_aside)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
