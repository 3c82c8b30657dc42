"""Enqueue one extend job with plain Celery, by task name, without importing kie_extend.

This is what a producer in another code base does: it needs only ``celery[redis]`` and the wire
contract (docs/producers.md). The job id is the Celery task id, chosen here, so it is known
before the message leaves.

    KIE_BROKER_URL=redis://localhost:6379/0 python examples/send_task.py https://example.org/song.mp3

Environment: ``KIE_BROKER_URL`` (else ``KIE_REDIS_URL``, else ``redis://localhost:6379/0``) and
``KIE_QUEUE`` (default ``kie_extend``). Prints the job id on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from celery import Celery

TASK_NAME = "kie_extend.extend"


def build_request(args: argparse.Namespace) -> dict:
    """The KIE request body, in KIE's own camelCase field names (custom mode, with vocals)."""
    return {
        "uploadUrl": args.upload_url,
        "defaultParamFlag": True,
        "instrumental": False,
        "continueAt": args.continue_at,
        "model": args.model,
        "prompt": args.prompt,
        "style": args.style,
        "title": args.title,
        # "callBackUrl" is left out: the worker fills it from KIE_CALLBACK_BASE_URL.
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upload_url", help="public http(s) URL of the source audio")
    parser.add_argument("--model", default="V5")
    parser.add_argument("--continue-at", type=float, default=10.0, help="seconds into the source audio")
    parser.add_argument("--prompt", default="[Verse]\nThe road runs on past the river")
    parser.add_argument("--style", default="indie folk")
    parser.add_argument("--title", default="Road (Extended)")
    parser.add_argument("--job-id", help="the job id to use (default: a new UUID)")
    parser.add_argument("--idempotency-key", help="a second job with the same key is not submitted again")
    parser.add_argument("--metadata", default="{}", help="JSON object handed to every result handler")
    args = parser.parse_args(argv)

    broker = os.environ.get("KIE_BROKER_URL") or os.environ.get("KIE_REDIS_URL") or "redis://localhost:6379/0"
    queue = os.environ.get("KIE_QUEUE", "kie_extend")

    app = Celery("producer", broker=broker)
    app.conf.update(task_serializer="json", accept_content=["json"], task_protocol=2,
                    broker_connection_retry_on_startup=True)

    kwargs: dict = {"request": build_request(args), "metadata": json.loads(args.metadata)}
    if args.idempotency_key:
        kwargs["idempotency_key"] = args.idempotency_key
    job_id = args.job_id or str(uuid.uuid4())

    # Keyword arguments only; the task id is the job id.
    app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue=queue)
    print(f"sent {TASK_NAME} to queue {queue!r}", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
