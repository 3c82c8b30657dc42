"""End to end: real Valkey, the simulator over HTTP, serve (callbacks), Celery worker and beat
processes; jobs enter through every kind of producer."""

from __future__ import annotations

import json
from collections import Counter
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kie_extend.store.keys import Keys
from kie_extend.api import enqueue_extend, get_job, producer_app
from kie_extend.cli.devstack import DevStack
from kie_extend.errors import ValidationError

TERMINAL = {"succeeded", "failed"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("e2e")
    with DevStack(workdir, key_prefix=f"e2e{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s", "KIE_POLL_CALLBACK_INTERVAL": "2s",
                       "KIE_TICK_INTERVAL": "0.5s", "KIE_HANDLERS": "redis_stream"}) as st:
        st.start_simulator("--time-factor", "0.04", "--seed", "7")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def wait_terminal(stack: DevStack, job_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    recs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in job_ids}
        if all(r["state"] in TERMINAL and all(h.get("state") == "delivered" for h in r["handlers"].values())
               for r in recs.values()):
            return recs
        time.sleep(0.25)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-3000:] for c in stack.children)
    raise AssertionError(f"jobs did not finish: {[(j, r['state']) for j, r in recs.items()]}\n{logs}")


def stream_events(stack: DevStack) -> list[dict]:
    r = redis.Redis.from_url(stack.redis_url)
    entries = r.xrange(Keys(stack.settings().key_prefix).results)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def valid_request(stack: DevStack, **extra: object) -> dict:
    req = {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
           "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Song"}
    req.update(extra)
    return req


def submissions_for(stack: DevStack, job_id: str) -> int:
    by_url = stack.sim_stats()["submissions_by_callback_url"]
    return sum(n for url, n in by_url.items() if url.endswith(f"/kie/callback/{job_id}"))


def test_python_api_happy_path(stack: DevStack) -> None:
    settings = stack.settings()
    ids = [enqueue_extend(valid_request(stack), metadata={"n": i}, settings=settings) for i in range(3)]
    ids.append(enqueue_extend(valid_request(stack, instrumental=True, model="V4_5", prompt=None), settings=settings))
    recs = wait_terminal(stack, ids)
    for job_id, rec in recs.items():
        assert rec["state"] == "succeeded", rec
        assert rec["kie_status"] == "SUCCESS" and len(rec["tracks"]) == 2
        assert all(t["audio_url"] and t["id"] for t in rec["tracks"])
        assert rec["attempts"] == 1 and rec["polls"] >= 1 and rec["submitted_at"] and rec["finished_at"]
        assert rec["handlers"] == {"redis_stream": {"state": "delivered", "attempts": 1}}
        assert submissions_for(stack, job_id) == 1
    events = [e for e in stream_events(stack) if e["job_id"] in ids]
    assert sorted(e["job_id"] for e in events) == sorted(ids)  # exactly one event per job
    payload = json.loads(next(e for e in events if e["job_id"] == ids[0])["payload"])
    assert payload["event"] == "job.succeeded" and payload["metadata"] == {"n": 0}
    assert payload["request"]["callBackUrl"].endswith(f"/kie/callback/{ids[0]}")
    assert set(payload["tracks"][0]) == {"id", "audio_url", "stream_audio_url", "image_url", "title", "tags",
                                         "duration", "model_name", "prompt"}


def test_foreign_celery_producer_by_name(stack: DevStack) -> None:
    """A producer that never imports kie_extend: plain Celery, send_task by name, JSON."""
    job_id = f"foreign-{uuid.uuid4()}"
    script = textwrap.dedent(f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={stack.redis_url!r})
        app.conf.task_serializer = "json"
        app.send_task("kie_extend.extend", kwargs={{"request": json.loads(sys.argv[1]),
                      "idempotency_key": None, "metadata": {{"from": "foreign"}}}},
                      task_id={job_id!r}, queue={stack.settings().queue!r})
        assert "kie_extend" not in sys.modules
        print("sent")
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(valid_request(stack))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded" and rec["metadata"] == {"from": "foreign"}
    assert submissions_for(stack, job_id) == 1


def test_cli_enqueue_and_status(stack: DevStack) -> None:
    env = {**stack.env}
    cmd = [sys.executable, "-m", "kie_extend.cli.main", "enqueue", "--upload-url", f"{stack.sim_url}/files/source/40s.mp3",
           "--model", "V4", "--custom", "--instrumental", "--continue-at", "12", "--style", "lofi",
           "--title", "CLI", "--wait"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    assert "succeeded" in out.stdout
    status = subprocess.run([sys.executable, "-m", "kie_extend.cli.main", "status", job_id, "--json"], env=env,
                            capture_output=True, text=True, timeout=30)
    rec = json.loads(status.stdout)
    assert rec["state"] == "succeeded" and rec["job_id"] == job_id
    bad = subprocess.run([sys.executable, "-m", "kie_extend.cli.main", "enqueue", "--upload-url", "ftp://x/y.mp3",
                          "--model", "V9", "--custom"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "uploadUrl" in bad.stderr and "model" in bad.stderr
    summary = subprocess.run([sys.executable, "-m", "kie_extend.cli.main", "status"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert "in flight" in summary.stdout and "submission:  open" in summary.stdout


def test_api_rejects_invalid_before_enqueueing(stack: DevStack) -> None:
    settings = stack.settings()
    before = stack.sim_stats()["submissions_accepted"]
    r = redis.Redis.from_url(stack.redis_url)
    jobs_before = len(r.keys(Keys(settings.key_prefix).job("*")))
    with pytest.raises(ValidationError) as err:
        enqueue_extend({"uploadUrl": "ftp://x/a.mp3", "defaultParamFlag": True, "model": "V3",
                        "styleWeight": 2}, metadata={"x": "y" * 20000}, settings=settings)
    fields = {e["field"] for e in err.value.errors}
    assert {"uploadUrl", "model", "styleWeight", "metadata"} <= fields
    time.sleep(1.0)
    assert len(r.keys(Keys(settings.key_prefix).job("*"))) == jobs_before
    assert stack.sim_stats()["submissions_accepted"] == before


def test_bad_message_by_name_becomes_failed_job_with_event(stack: DevStack) -> None:
    settings = stack.settings()
    job_id = f"bad-{uuid.uuid4()}"
    producer_app(settings).send_task("kie_extend.extend", task_id=job_id, queue=settings.queue, kwargs={
        "request": {"uploadUrl": "not a url", "defaultParamFlag": "yes", "model": "V5", "continueAt": -1},
        "colour": "blue"})
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request"
    fields = {e["field"] for e in rec["error"]["errors"]}
    assert {"uploadUrl", "defaultParamFlag", "continueAt", "colour"} <= fields
    events = [e for e in stream_events(stack) if e["job_id"] == job_id]
    assert len(events) == 1 and events[0]["event"] == "job.failed"
    assert submissions_for(stack, job_id) == 0


def test_unknown_job_is_not_found(stack: DevStack) -> None:
    assert get_job("no-such-job", settings=stack.settings()) == {"job_id": "no-such-job", "state": "not_found"}


def test_idempotency_key_submits_once(stack: DevStack) -> None:
    settings = stack.settings()
    key = f"idem-{uuid.uuid4()}"
    a = enqueue_extend(valid_request(stack), idempotency_key=key, settings=settings)
    b = enqueue_extend(valid_request(stack), idempotency_key=key, settings=settings)
    recs = wait_terminal(stack, [a, b])
    # Two workers may take the two messages in either order: whichever is accepted first is the original.
    dups = [j for j, r in recs.items() if r["duplicate_of"]]
    assert len(dups) == 1
    dup = dups[0]
    original = recs[dup]["duplicate_of"]
    assert original in (a, b) and original != dup
    assert recs[dup]["state"] == recs[original]["state"] == "succeeded"
    assert submissions_for(stack, original) == 1 and submissions_for(stack, dup) == 0
    assert [e["job_id"] for e in stream_events(stack) if e["job_id"] in (a, b)] == [original]


def test_idempotency_key_reused_by_foreign_producers(stack: DevStack) -> None:
    """Two plain Celery messages share a key with different requests, sent together to real workers
    (concurrency 2): the worker's atomic step lets one through; the other ends failed with its own
    event, never with the first job's tracks. A third with the winner's request is its duplicate."""
    settings = stack.settings()
    key = f"idem-{uuid.uuid4()}"
    app = producer_app(settings)
    ids = {title: f"foreign-{title}-{uuid.uuid4().hex[:8]}" for title in ("A", "B")}
    for title, job_id in ids.items():
        app.send_task("kie_extend.extend", task_id=job_id, queue=settings.queue,
                      kwargs={"request": valid_request(stack, title=title), "idempotency_key": key})
    recs = wait_terminal(stack, list(ids.values()))
    states = sorted(r["state"] for r in recs.values())
    assert states == ["failed", "succeeded"], recs
    loser = next(j for j, r in recs.items() if r["state"] == "failed")
    winner = next(j for j, r in recs.items() if r["state"] == "succeeded")
    assert recs[loser]["error"]["kind"] == "invalid_request"
    assert recs[loser]["error"]["message"] == "idempotency key reused with a different request"
    assert not recs[loser]["tracks"] and not recs[loser].get("duplicate_of")
    assert submissions_for(stack, winner) == 1 and submissions_for(stack, loser) == 0
    events = {e["job_id"]: json.loads(e["payload"]) for e in stream_events(stack) if e["job_id"] in ids.values()}
    assert events[loser]["event"] == "job.failed" and events[loser]["tracks"] == []
    assert events[winner]["event"] == "job.succeeded"
    title = next(t for t, j in ids.items() if j == winner)
    third = f"foreign-C-{uuid.uuid4().hex[:8]}"
    app.send_task("kie_extend.extend", task_id=third, queue=settings.queue,
                  kwargs={"request": valid_request(stack, title=title), "idempotency_key": key})
    rec = wait_terminal(stack, [third])[third]
    assert rec["duplicate_of"] == winner and rec["state"] == "succeeded"


def test_provider_rejection_fails_job(stack: DevStack) -> None:
    """The provider's own validation (continueAt beyond the 30 s source) fails the job as invalid_request."""
    settings = stack.settings()
    job_id = enqueue_extend(valid_request(stack, continueAt=45), settings=settings)
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request" and rec["error"]["code"] == 422


def _publish_raw(stack: DevStack, body: bytes, content_type: str, headers: dict) -> None:
    from kombu import Connection, Queue

    queue = stack.settings().queue
    with Connection(stack.redis_url) as conn:
        conn.Producer().publish(body, routing_key=queue, content_type=content_type, content_encoding="utf-8",
                                headers=headers, declare=[Queue(queue)], serializer=None)


def test_malformed_messages_become_failed_jobs(stack: DevStack) -> None:
    """Non-JSON bodies, pickle, wrong shapes, wrong types, huge strings: failed jobs, never a dead worker."""
    settings = stack.settings()
    ids = {name: f"malformed-{name}-{uuid.uuid4()}" for name in ("notjson", "pickle", "shape", "types", "huge", "args")}
    base = {"lang": "py", "task": "kie_extend.extend", "argsrepr": "", "kwargsrepr": "", "origin": "test"}
    _publish_raw(stack, b"{not json", "application/json", {**base, "id": ids["notjson"], "root_id": ids["notjson"]})
    _publish_raw(stack, b"\x80\x04K\x01.", "application/x-python-serialize",
                 {**base, "id": ids["pickle"], "root_id": ids["pickle"]})
    _publish_raw(stack, json.dumps({"not": "a task call"}).encode(), "application/json",
                 {**base, "id": ids["shape"], "root_id": ids["shape"]})
    app = producer_app(settings)
    app.send_task("kie_extend.extend", task_id=ids["types"], queue=settings.queue,
                  kwargs={"request": ["a", "list"], "metadata": "not an object", "idempotency_key": 12})
    app.send_task("kie_extend.extend", task_id=ids["huge"], queue=settings.queue,
                  kwargs={"request": {**valid_request(stack), "defaultParamFlag": False, "prompt": "x" * 200_000}})
    app.send_task("kie_extend.extend", task_id=ids["args"], queue=settings.queue, args=[{"uploadUrl": "x"}])
    recs = wait_terminal(stack, list(ids.values()))
    for name, job_id in ids.items():
        rec = recs[job_id]
        assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", (name, rec)
    assert "decoded" in recs[ids["notjson"]]["error"]["message"]
    assert {e["field"] for e in recs[ids["types"]]["error"]["errors"]} >= {"request", "metadata", "idempotency_key"}
    events = Counter(e["job_id"] for e in stream_events(stack))
    assert all(events[j] == 1 for j in ids.values())
    assert all(c.alive() for c in stack.workers)
    ok = enqueue_extend(valid_request(stack), settings=settings)  # the worker still works
    assert wait_terminal(stack, [ok])[ok]["state"] == "succeeded"
