"""Read kie-extend result events from the Redis stream with a consumer group.

Each finished job adds one entry to ``{KIE_KEY_PREFIX}:results`` (the prefix in braces, e.g. ``{kie_extend}:results``) with the fields ``job_id``,
``event`` (``job.succeeded`` or ``job.failed``) and ``payload`` (the event as JSON). A consumer
group lets several consumers share the stream: each entry goes to one of them, and stays pending
until it is acknowledged with XACK, so an entry whose consumer crashed is read again (this script
first re-reads its own pending entries, then new ones).

    KIE_REDIS_URL=redis://localhost:6379/0 python examples/consume_results.py --group billing

Prints one JSON line per event. Runs until interrupted, or until ``--count`` events were handled,
or until ``--timeout`` seconds pass without a new event.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import redis


def handle(entry_id: str, fields: dict[str, str]) -> None:
    """Your work goes here; raise to leave the entry pending (it is read again later)."""
    event = json.loads(fields["payload"])
    summary = {
        "entry": entry_id,
        "job_id": fields["job_id"],
        "event": fields["event"],
        "kie_task_id": event.get("kie_task_id"),
        "tracks": [t.get("audio_url") for t in event.get("tracks") or []],
        "error": (event.get("error") or {}).get("kind"),
        "metadata": event.get("metadata"),
    }
    print(json.dumps(summary), flush=True)


def ensure_group(client: redis.Redis, stream: str, group: str, start: str) -> None:
    """Create the group (and the stream) once; an existing group keeps its position."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", default="kie-extend-results", help="consumer group name")
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="this consumer's name within the group (keep it stable across restarts)")
    parser.add_argument("--new-only", action="store_true",
                        help="a new group starts at the stream's end instead of its beginning")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="stop after this many seconds without a new event (0: never)")
    args = parser.parse_args(argv)

    url = os.environ.get("KIE_REDIS_URL", "redis://localhost:6379/0")
    prefix = os.environ.get("KIE_KEY_PREFIX", "kie_extend")
    # Keys are named under the prefix as a Redis hash tag: {kie_extend}:results
    stream = prefix if "{" in prefix else "{" + prefix + "}"
    stream += ":results"
    client = redis.Redis.from_url(url, decode_responses=True)
    ensure_group(client, stream, args.group, "$" if args.new_only else "0")

    handled = 0
    last_seen = time.monotonic()
    cursor = "0"  # first our own pending entries (delivered before, never acknowledged), then ">"
    try:
        while not (args.count and handled >= args.count):
            if args.timeout and time.monotonic() - last_seen > args.timeout:
                break
            block = None if cursor == "0" else 1000
            reply = client.xreadgroup(args.group, args.consumer, {stream: cursor}, count=100, block=block)
            entries = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            for entry_id, fields in entries:
                if not fields:  # pending entry trimmed from the stream meanwhile
                    client.xack(stream, args.group, entry_id)
                    continue
                handle(entry_id, fields)
                client.xack(stream, args.group, entry_id)
                handled += 1
                last_seen = time.monotonic()
                if args.count and handled >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    print(f"handled {handled} event(s) from {stream} as {args.group}/{args.consumer}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
