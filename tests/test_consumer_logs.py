"""A real Celery worker process given misnamed, undecodable and wrongly shaped messages: each becomes
a failed ``invalid_request`` job (infra/consumer.py) and the worker log says so in one WARNING line,
without Celery's multi-line ERROR ("Received unregistered task …") and its traceback."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kie_extend.api import get_job, producer_app
from kie_extend.cli.devstack import DevStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with DevStack(tmp_path_factory.mktemp("consumer-logs"), key_prefix=f"clog{uuid.uuid4().hex[:6]}",
                  env={"KIE_HANDLERS": "redis_stream", "KIE_TICK_INTERVAL": "0.5s"}) as st:
        st.start_simulator("--time-factor", "0.04")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=1)
        yield st


def _publish_raw(stack: DevStack, body: bytes, headers: dict[str, str]) -> None:
    from kombu import Connection, Queue

    queue = stack.settings().queue
    with Connection(stack.redis_url) as conn:
        conn.Producer().publish(body, routing_key=queue, content_type="application/json", content_encoding="utf-8",
                                headers=headers, declare=[Queue(queue)], serializer=None)


def _wait_failed(stack: DevStack, job_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    recs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in job_ids}
        if all(r["state"] == "failed" for r in recs.values()):
            return recs
        time.sleep(0.2)
    raise AssertionError(f"not failed: {recs}")


def test_handled_bad_messages_log_one_warning_and_no_celery_error(stack: DevStack) -> None:
    settings = stack.settings()
    app = producer_app(settings)
    misnamed = {f"misnamed-{uuid.uuid4().hex[:8]}": name for name in ("kie_extend.Extend", "billing.charge_card")}
    for job_id, name in misnamed.items():
        app.send_task(name, kwargs={"request": {"uploadUrl": "x"}}, task_id=job_id, queue=settings.queue)
    undecodable = f"notjson-{uuid.uuid4().hex[:8]}"
    base = {"lang": "py", "task": "kie_extend.extend", "argsrepr": "", "kwargsrepr": "", "origin": "test"}
    _publish_raw(stack, b"{not json", {**base, "id": undecodable, "root_id": undecodable})
    shape = f"shape-{uuid.uuid4().hex[:8]}"
    _publish_raw(stack, json.dumps({"not": "a task call"}).encode(), {**base, "id": shape, "root_id": shape})
    ids = [*misnamed, undecodable, shape]
    recs = _wait_failed(stack, ids)
    assert all(r["error"]["kind"] == "invalid_request" for r in recs.values()), recs
    worker = stack.workers[0]
    log = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the log line follows the record by a moment
        log = Path(worker.log_path).read_text(errors="replace")
        if all(f"message {j} recorded as failed" in log for j in ids):
            break
        time.sleep(0.2)
    for job_id in ids:
        lines = [line for line in log.splitlines() if job_id in line]
        assert any("WARNING" in line and f"message {job_id} recorded as failed (invalid_request)" in line
                   for line in lines), (job_id, log[-4000:])
        assert not any("ERROR" in line or "CRITICAL" in line for line in lines), (job_id, lines)
    for noise in ("Received unregistered task", "Received invalid task message", "Can't decode message body",
                  "Traceback"):
        assert noise not in log, (noise, log[-4000:])
    assert "did you mean `kie_extend.extend`?" in log  # the reason is in the one line
    assert worker.alive()
