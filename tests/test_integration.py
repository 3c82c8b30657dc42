"""Integration: RabbitMQ as broker, callbacks against polling alone, JSON logs, /metrics."""

from __future__ import annotations

import json
import socket
import statistics
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import requests

from kie_extend.api import enqueue_extend, enqueue_many, get_job
from kie_extend.cli.devstack import DevStack

FAST = {"KIE_TICK_INTERVAL": "0.3s", "KIE_POLL_MIN_GAP": "0.1s"}


def _request(stack: DevStack, i: int = 0) -> dict:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 4 + i, "model": "V4_5", "style": "ambient", "title": f"I{i}"}


def _wait(stack: DevStack, ids: list[str], timeout: float = 60) -> dict[str, dict]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    while True:
        recs = {j: get_job(j, settings=settings) for j in ids}
        if all(r["state"] in ("succeeded", "failed") for r in recs.values()):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError({j: r["state"] for j, r in recs.items()})
        time.sleep(0.2)


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_up(), reason="no RabbitMQ answers on 127.0.0.1:5672 (the broker test needs one)")
def test_rabbitmq_broker(tmp_path: Path) -> None:
    """KIE_BROKER_URL=amqp://…: Celery messages on RabbitMQ, the job store stays in Redis."""
    queue = f"kie_extend_test_{uuid.uuid4().hex[:8]}"
    broker = "amqp://guest:guest@127.0.0.1:5672//"
    with DevStack(tmp_path, key_prefix=queue, env={"KIE_BROKER_URL": broker, "KIE_QUEUE": queue,
                                                   "KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_CALLBACK_INTERVAL": "2s", **FAST}) as st:
        try:
            st.start_simulator("--time-factor", "0.03")
            st.start_serve(callbacks_only=True)
            st.start_worker(concurrency=2)
            st.start_beat()
            settings = st.settings()
            assert settings.effective_broker_url.startswith("amqp://")
            ids = enqueue_many([{"request": _request(st, i)} for i in range(4)], settings=settings)
            recs = _wait(st, ids)
            assert all(r["state"] == "succeeded" for r in recs.values())
            by_url = st.sim_stats()["submissions_by_callback_url"]
            assert all(sum(n for u, n in by_url.items() if u.endswith(j)) == 1 for j in ids)
        finally:
            from kombu import Connection

            with Connection(broker) as conn:  # leave nothing behind on the shared broker
                channel = conn.channel()
                for name in (queue, f"{queue}.pidbox", "celeryev"):
                    try:
                        channel.queue_delete(name)
                    except Exception:
                        channel = conn.channel()


def _parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_callbacks_cut_time_to_result_and_polls(tmp_path: Path) -> None:
    """Same jobs with callbacks and with polling alone: callbacks finish sooner with fewer polls."""
    env = {"KIE_POLL_FIRST": "2s", "KIE_POLL_INTERVAL": "2s", "KIE_POLL_MAX_INTERVAL": "3s",
           "KIE_POLL_CALLBACK_INTERVAL": "10s", "KIE_LOG_FORMAT": "json", **FAST}
    with DevStack(tmp_path, key_prefix=f"cb{uuid.uuid4().hex[:6]}", env=env) as st:
        st.start_simulator("--time-factor", "0.1", "--seed", "4")
        callbacks = st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=2)
        st.start_beat()
        settings = st.settings()
        results = {}
        for mode in ("callbacks", "polling"):
            st.sim_config(callbacks=(mode == "callbacks"))
            ids = enqueue_many([{"request": _request(st, i)} for i in range(6)], settings=settings)
            recs = _wait(st, ids)
            assert all(r["state"] == "succeeded" for r in recs.values()), recs
            ttr = [_parse_iso(r["finished_at"]) - _parse_iso(r["submitted_at"]) for r in recs.values()]
            results[mode] = {"polls": statistics.mean(r["polls"] for r in recs.values()),
                             "time_to_result": statistics.mean(ttr)}
        assert results["callbacks"]["polls"] < results["polling"]["polls"], results
        assert results["callbacks"]["time_to_result"] < results["polling"]["time_to_result"], results

        # /metrics on serve (callbacks only) adds up every process's work.
        text = requests.get(callbacks + "/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith('kie_extend_jobs{state="succeeded"}'))
        assert int(line.split()[-1]) >= 12
        assert 'kie_extend_provider_responses_total{call="submit",code="200"}' in text
        assert "kie_extend_in_flight 0" in text
        assert "# TYPE kie_extend_time_to_result_seconds histogram" in text
        assert 'kie_extend_poll_seconds_bucket{le="+Inf"}' in text
        count = next(x for x in text.splitlines() if x.startswith("kie_extend_time_to_result_seconds_count"))
        assert int(count.split()[-1]) >= 12

        # JSON logs: one object per line, job_id (and kie_task_id) on the job lines.
        worker_log = Path(st.workers[0].log_path).read_text().splitlines()
        objs = [json.loads(x) for x in worker_log if x.startswith("{")]
        job_lines = [o for o in objs if o["logger"] == "kie_extend.jobs.pipeline"]
        assert job_lines and all("job_id" in o for o in job_lines)
        assert any(o.get("kie_task_id") for o in job_lines if o["msg"] == "submitted")
