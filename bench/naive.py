"""Baselines for the benchmarks: a tiny Celery app of its own (JSON, same Valkey, its own queues).

* ``naive.extend``: the design kie-extend replaces. One task per job that submits to the provider with
  ``requests`` and then holds its worker process: ``while not done: sleep(poll_interval); GET
  record-info``. A 429 on submit is retried after one rate window (the naive design has no shared
  rate gate). Start/submit/finish times go to ``bench:naive:{run}`` (a Redis hash per job).
* ``naive.noop``: a raw Celery task that does nothing, for the per-task overhead baseline.

Run a worker with ``PYTHONPATH=bench celery -A naive worker -Q bench_naive`` (env ``NAIVE_BROKER_URL``).
The app mirrors kie-extend's worker options that matter for throughput (acks late, prefetch 1,
results ignored) so the two are compared like for like.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
import requests
from celery import Celery

BROKER = os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0")
NAIVE_QUEUE = "bench_naive"
NOOP_QUEUE = "bench_noop"

app = Celery("bench_naive", broker=BROKER, set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_default_queue=NAIVE_QUEUE,
)

_redis: redis.Redis | None = None
_session: requests.Session | None = None


def _r() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER)
    return _redis


def _http() -> requests.Session:
    global _session
    if _session is None:
        _session = requests.Session()
    return _session


@app.task(name="naive.noop")
def noop() -> None:
    """Nothing at all."""


@app.task(name="naive.extend")
def extend(run: str, job: str, sim_url: str, api_key: str, body: dict[str, Any], poll_interval: float,
           rate_window: float, timeout: float) -> str:
    """Submit, then sleep-and-poll in this process until the task is done (or ``timeout``)."""
    started = time.time()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    http = _http()
    while True:
        reply = http.post(sim_url + "/api/v1/generate/upload-extend", data=json.dumps(body), headers=headers,
                          timeout=30).json()
        if reply.get("code") == 429:
            time.sleep(rate_window)
            continue
        break
    submitted = time.time()
    task_id = (reply.get("data") or {}).get("taskId")
    status, polls = "SUBMIT_FAILED", 0
    while task_id and time.time() - started < timeout:
        time.sleep(poll_interval)
        polls += 1
        info = http.get(sim_url + "/api/v1/generate/record-info", params={"taskId": task_id}, headers=headers,
                        timeout=30).json()
        status = str(((info.get("data") or {}).get("status")) or "PENDING")
        if status == "SUCCESS" or "FAIL" in status or "ERROR" in status or status == "CALLBACK_EXCEPTION":
            break
    _r().hset(f"bench:naive:{run}", job, json.dumps({
        "started": started, "submitted": submitted, "finished": time.time(), "status": status,
        "task_id": task_id, "polls": polls}))
    return status
