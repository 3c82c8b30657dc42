"""Early audio (KIE_PROGRESS_EVENTS): job.progress at the text and first stages, once each, before the
result event; real workers, beat, serve (callbacks) and the simulator sending every callback twice."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.config import Settings
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.progress import Progress
from kie_extend.store.keys import Keys
from kie_extend.store.record import JobRecord


def run_stack(tmp: Path, progress: bool) -> DevStack:
    st = DevStack(tmp, key_prefix=f"prog{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "5s", "KIE_POLL_INTERVAL": "5s", "KIE_POLL_MAX_INTERVAL": "5s",
                       "KIE_POLL_CALLBACK_INTERVAL": "5s", "KIE_POLL_MIN_GAP": "0.05s", "KIE_TICK_INTERVAL": "0.25s",
                       "KIE_HANDLERS": "redis_stream", "KIE_PROGRESS_EVENTS": "true" if progress else "false"})
    st.__enter__()
    st.start_simulator("--time-factor", "0.05", "--seed", "3", "--fault-duplicate-callback", "1.0")
    st.start_serve(callbacks_only=True)
    st.start_worker(concurrency=2)
    st.start_beat()
    return st


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    st = run_stack(tmp_path_factory.mktemp("progress"), True)
    yield st
    st.__exit__(None, None, None)


def request_for(stack: DevStack, **extra: Any) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Song", **extra}


def events(stack: DevStack, job_ids: set[str]) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(stack.redis_url)
    out = []
    for _, fields in r.xrange(Keys(stack.settings().key_prefix).results):
        event = json.loads(fields[b"payload"])
        if event.get("job_id") in job_ids:
            out.append(event)
    return out


def wait_finished(stack: DevStack, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = [get_job(j, settings=stack.settings()) for j in ids]
        if all(r["state"] in ("succeeded", "failed") and all(h.get("state") == "delivered"
                                                             for h in r["handlers"].values()) for r in recs):
            return
        time.sleep(0.2)
    raise AssertionError([get_job(j, settings=stack.settings())["state"] for j in ids])


def test_progress_once_per_stage_before_the_result(stack: DevStack) -> None:
    ids = [enqueue_extend(request_for(stack), settings=stack.settings()) for _ in range(4)]
    ids.append(enqueue_extend(request_for(stack, instrumental=True, prompt=None), settings=stack.settings()))
    wait_finished(stack, ids)
    time.sleep(1.0)  # late duplicate callbacks must not add anything
    got = events(stack, set(ids))
    for job_id in ids[:4]:
        mine = [(e["event"], e.get("stage")) for e in got if e["job_id"] == job_id]
        assert mine == [("job.progress", "text"), ("job.progress", "first"), ("job.succeeded", None)], mine
        first = next(e for e in got if e["job_id"] == job_id and e.get("stage") == "first")
        assert len(first["tracks"]) == 2 and all(t["stream_audio_url"] for t in first["tracks"])
    # An instrumental has no lyrics stage: only first, then the result.
    mine = [(e["event"], e.get("stage")) for e in got if e["job_id"] == ids[4]]
    assert mine == [("job.progress", "first"), ("job.succeeded", None)], mine
    assert stack.sim_stats()["faults"].get("fault_duplicate_callback", 0) > 0


def test_no_progress_when_the_setting_is_off(tmp_path: Path) -> None:
    st = run_stack(tmp_path, False)
    try:
        job_id = enqueue_extend(request_for(st), settings=st.settings())
        wait_finished(st, [job_id])
        assert [e["event"] for e in events(st, {job_id})] == ["job.succeeded"]
    finally:
        st.__exit__(None, None, None)


def test_a_stage_after_the_terminal_move_is_refused(make_settings: Any, rclient: redis.Redis) -> None:
    settings: Settings = make_settings(progress_events=True)
    rt = Runtime(settings)
    key = rt.keys.job("j1")
    rclient.hset(key, mapping={"state": "succeeded", "job_id": "j1", "tenant": "default"})
    progress = Progress(rt)
    assert progress.reached("j1", JobRecord.from_hash({"state": "succeeded"}), "FIRST_SUCCESS", []) is False
    assert not rclient.hexists(key, "progress:first")
    rclient.hset(key, "state", "submitted")
    assert progress.reached("j1", JobRecord.from_hash({"state": "submitted"}), "TEXT_SUCCESS", []) is True
    assert progress.reached("j1", JobRecord.from_hash({"state": "submitted"}), "TEXT_SUCCESS", []) is False
    assert not rclient.hexists(key, "progress_pending")
