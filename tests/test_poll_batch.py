"""Grouped poll messages: the tick's grouping (pure), one message running several jobs' steps in
process (its reads in one round trip, an error in one job not stopping the others, the time budget
handing the rest on), and many jobs through real workers with fewer poll messages than polls."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from inline import Harness, harness_factory, sample_request
from kie_extend.admission.tick import POLL_SPREAD, poll_batches
from kie_extend.api import enqueue_many, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.simulator import SimConfig, SimServer, serve
from kie_extend.worker import create_app


# -- the grouping ------------------------------------------------------------------------------------
def test_few_due_jobs_go_one_per_message() -> None:
    due = [(f"j{i}", 100.0 + i) for i in range(POLL_SPREAD)]
    groups = poll_batches(due, now=103.5, most=8)
    assert [ids for ids, _ in groups] == [[f"j{i}"] for i in range(POLL_SPREAD)]
    # already due: no countdown; later ones keep their own time
    assert [at for _, at in groups] == [None] * 4 + [104.0 + i for i in range(POLL_SPREAD - 4)]


def test_many_due_jobs_share_messages_in_time_order_at_their_last_time() -> None:
    due = [(f"j{i}", 200.0 - i) for i in range(100)]  # newest first: grouping sorts by time
    groups = poll_batches(due, now=150.0, most=8)
    assert all(len(ids) <= 8 for ids, _ in groups) and len(groups) == 13
    flat = [j for ids, _ in groups for j in ids]
    assert sorted(flat) == sorted(j for j, _ in due) and len(flat) == len(set(flat))
    times = dict(due)
    for ids, at in groups:
        last = max(times[j] for j in ids)
        assert at == (last if last > 150.0 else None)  # never before any of its jobs' times
    assert [times[g[0][0]] for g in groups] == sorted(times[g[0][0]] for g in groups)


def test_group_size_grows_with_the_due_count_and_poll_batch_one_means_single() -> None:
    due = [(f"j{i}", 0.0) for i in range(POLL_SPREAD + 1)]
    assert max(len(ids) for ids, _ in poll_batches(due, 1.0, most=8)) == 2
    assert all(len(ids) == 1 for ids, _ in poll_batches(due * 3, 1.0, most=1))
    assert poll_batches([], 1.0, most=8) == []


# -- one grouped message, in process -----------------------------------------------------------------
@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.01, seed=3, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim)


def _poll_task(h: Harness) -> Any:
    app = create_app(h.rt.settings)
    return app.tasks["kie_extend.poll"]


def _broken_job(h: Harness) -> str:
    """A job whose record key holds a string, not a hash: its step raises WRONGTYPE (a Redis error
    reply that is no infrastructure fault)."""
    job_id = f"broken-{uuid.uuid4().hex[:8]}"
    h.rt.redis.set(h.rt.keys.job(job_id), "not a hash")
    return job_id


def test_a_grouped_message_in_process(harness: Callable[..., Harness]) -> None:
    """One app for both parts (Celery keeps the first app's task under a name in this process)."""
    h = harness()
    task = _poll_task(h)

    # 1. every job polled, a duplicate id once, and one job's error raised only after the others ran
    jobs = [h.accept(sample_request(h.sim, title=f"G{i}")) for i in range(3)]
    broken = _broken_job(h)
    polls_before = {j: int(h.state(j).get("polls", 0)) for j in jobs}
    deadline = time.monotonic() + 30
    while not all(h.finished(j)() for j in jobs):
        assert time.monotonic() < deadline, {j: h.state(j).get("state") for j in jobs}
        time.sleep(0.3)
        result = task.apply(kwargs={"job_ids": [jobs[0], broken, jobs[1], jobs[2], jobs[0]]})
        assert result.failed() and "WRONGTYPE" in str(result.result), result.result
    for j in jobs:
        rec = h.state(j)
        assert rec["state"] == "succeeded" and len(json.loads(rec["tracks"])) == 2
        assert int(rec["polls"]) > polls_before[j]
    assert int(h.state(jobs[0])["polls"]) == int(h.state(jobs[1])["polls"])  # the duplicate: once
    assert h.sim.simulator.stats_snapshot()["submissions_accepted"] == 3

    # 2. past a third of KIE_LEASE (5 s here) the jobs left go out as a message of their own, unclaimed
    slow = [h.accept(sample_request(h.sim, title=f"S{i}")) for i in range(3)]
    assert all(h.state(j)["state"] == "submitted" for j in slow)
    h.dispatch.pending.clear()
    requests.post(h.sim.url + "/_sim/config", json={"fault_slow": 1.0, "slow_seconds": 1.0},
                  timeout=5).raise_for_status()
    try:
        result = task.apply(kwargs={"job_ids": slow})
    finally:
        requests.post(h.sim.url + "/_sim/config", json={"fault_slow": 0.0}, timeout=5).raise_for_status()
    assert result.successful(), result.result
    assert [int(h.state(j)["polls"]) for j in slow] == [1, 1, 0]
    # the rest went out as a message of its own on the job queue (the broker is this Valkey)
    queued = [json.loads(m) for m in h.rt.redis.lrange(h.rt.settings.queue, 0, -1)]
    handed = [m["headers"]["kwargsrepr"] for m in queued
              if m["headers"]["task"] == "kie_extend.poll" and slow[2] in m["headers"]["kwargsrepr"]]
    assert handed == [repr({"job_id": slow[2]})], handed
    # its claim undone: polled at once, not after KIE_LEASE, and its poll count stays true
    assert "poll_lease" not in h.state(slow[2]) and "last_poll_ts" not in h.state(slow[2])
    h.pipeline.advance(slow[2])
    assert int(h.state(slow[2])["polls"]) == 1


# -- through real workers ----------------------------------------------------------------------------
def test_many_jobs_through_workers_use_fewer_poll_messages_than_polls(tmp_path: Path) -> None:
    env = {"KIE_TICK_INTERVAL": "0.5s", "KIE_POLL_FIRST": "0.3s", "KIE_POLL_INTERVAL": "0.3s",
           "KIE_POLL_MAX_INTERVAL": "0.5s", "KIE_POLL_MIN_GAP": "0.1s", "KIE_SUBMIT_RATE": "1000/1s",
           "KIE_MAX_IN_FLIGHT": "1000"}
    with DevStack(tmp_path, env=env) as st:
        st.start_simulator("--time-factor", "0.02", "--rate-limit", "100000", "--no-callbacks")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        settings = st.settings()
        ids = enqueue_many([{"request": {**sample_request_for(st), "title": f"W{i}",
                                         "callBackUrl": "http://127.0.0.1:9/kie/callback/unused"}}
                            for i in range(80)], settings=settings)
        deadline = time.monotonic() + 120
        while True:
            recs = [get_job(j, settings=settings) for j in ids]
            if all(r["state"] in ("succeeded", "failed") for r in recs):
                break
            assert time.monotonic() < deadline, [r["state"] for r in recs]
            time.sleep(0.3)
        assert all(r["state"] == "succeeded" for r in recs)
        sim = st.sim_stats()
        assert sim["submissions_accepted"] == 80  # every job sent once
        polls = sum(int(r["polls"]) for r in recs)
        text = Path(worker.log_path).read_text(errors="replace")
        messages = len(re.findall(r"Task kie_extend\.poll\[[^\]]+\] received", text))
        assert polls >= 80 and messages < polls, (messages, polls)


def sample_request_for(st: DevStack) -> dict[str, Any]:
    return {"uploadUrl": f"{st.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 3, "model": "V5", "style": "jazz", "title": "T"}
