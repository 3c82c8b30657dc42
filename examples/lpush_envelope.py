"""Enqueue one extend job by writing Celery's Redis message envelope directly: no Celery library.

This shows what any language with a Redis client can do when it has no Celery client: build the
protocol-2 message (JSON body ``[args, kwargs, embed]``, base64-encoded inside kombu's Redis
envelope) and LPUSH it onto the list named after the queue, in the broker's database.

    KIE_BROKER_URL=redis://localhost:6379/0 python examples/lpush_envelope.py https://example.org/song.mp3

Environment: ``KIE_BROKER_URL`` (else ``KIE_REDIS_URL``, else ``redis://localhost:6379/0``) and
``KIE_QUEUE`` (default ``kie_extend``). Redis brokers only. Prints the job id.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import uuid

import redis


def envelope(job_id: str, queue: str, kwargs: dict) -> dict:
    """The message as Celery's Redis transport stores it (the fields a worker needs)."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "kie_extend.extend", "id": job_id, "root_id": job_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None},
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upload_url", help="public http(s) URL of the source audio")
    parser.add_argument("--job-id", help="the job id to use (default: a new UUID)")
    args = parser.parse_args(argv)

    broker = os.environ.get("KIE_BROKER_URL") or os.environ.get("KIE_REDIS_URL") or "redis://localhost:6379/0"
    queue = os.environ.get("KIE_QUEUE", "kie_extend")
    job_id = args.job_id or str(uuid.uuid4())
    request = {"uploadUrl": args.upload_url, "defaultParamFlag": True, "instrumental": True, "continueAt": 10,
               "model": "V4_5", "style": "ambient piano", "title": "Drift"}
    message = envelope(job_id, queue, {"request": request, "metadata": {"producer": "raw"}})
    redis.Redis.from_url(broker).lpush(queue, json.dumps(message))
    print(job_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
