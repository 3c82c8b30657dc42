"""Idempotency keys that check what they dedup, explicit job ids claimed at the producer's entrance,
and ``batch submit`` re-runs that send nothing twice (README "Idempotency").

Real Valkey, the real ``/v1`` app over loopback (tests/test_http_api.py's stack: messages land in the
broker list and are accepted in this process, as a worker would), the simulator, and the real
``kie-extend`` command for batch files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from kie_extend import api
from kie_extend.config import Settings
from kie_extend.errors import IdempotencyConflictError, JobExistsError
from kie_extend.jobs.idempotency import CONFLICT_MESSAGE, request_fingerprint
from test_http_api import READ, Stack, req, sim, stack  # noqa: F401  (fixtures)



def events(stack: Stack) -> list[dict[str, Any]]:
    """Every entry of the results stream (the redis_stream handler), oldest first."""
    out = []
    for _, fields in stack.rt.redis.xrange(stack.rt.keys.results):
        out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out


def events_for(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return [e for e in events(stack) if e.get("job_id") == job_id]


def record(stack: Stack, job_id: str) -> dict[str, Any]:
    return api.get_job(job_id, settings=stack.settings)


def assert_refused(stack: Stack, job_id: str) -> None:
    """``job_id`` ended failed / invalid_request with the conflict message and its own event."""
    rec = record(stack, job_id)
    assert rec["state"] == "failed" and not rec.get("duplicate_of") and not rec.get("tracks")
    assert rec["error"]["kind"] == "invalid_request" and rec["error"]["message"] == CONFLICT_MESSAGE
    mine = events_for(stack, job_id)
    assert len(mine) == 1 and mine[0]["event"] == "job.failed"
    payload = json.loads(mine[0]["payload"])
    assert payload["job_id"] == job_id and payload["error"]["message"] == CONFLICT_MESSAGE
    assert not payload.get("tracks")


# ----- idempotency keys -------------------------------------------------------------------------------

def test_same_key_same_request_is_a_duplicate(stack: Stack) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first = api.enqueue_extend(req(stack.sim), idempotency_key=key, metadata={"try": 1}, settings=stack.settings)
    stack.consume()
    # Metadata and priority are not part of the fingerprint: a retry with a new trace id is the same work.
    second = api.enqueue_extend(req(stack.sim), idempotency_key=key, metadata={"try": 2}, priority=9,
                                settings=stack.settings)
    stack.consume()
    stack.h.run_until(stack.h.finished(first))
    rec = record(stack, second)
    assert rec["duplicate_of"] == first and rec["state"] == "succeeded" and rec["metadata"] == {"try": 2}
    assert stack.sim.simulator.stats_snapshot()["submissions_accepted"] == 1
    assert events_for(stack, second) == [] and len(events_for(stack, first)) == 1
    # The dashboard's search finds the key's first job (in the default tenant).
    from kie_extend.http.dashboard_data import _search_ids

    assert first in _search_ids(stack.rt, key)


def test_a_key_written_before_the_upgrade_still_dedups(stack: Stack) -> None:
    """A key from before tenant scoping (a plain string under the old name) lives out its window."""
    key = f"k-{uuid.uuid4().hex}"
    first = api.enqueue_extend(req(stack.sim), settings=stack.settings)
    stack.consume()
    stack.rt.redis.set(stack.rt.keys.legacy_idempotency(key), first, ex=3600)
    second = api.enqueue_extend(req(stack.sim, title="Any"), idempotency_key=key, tenant="shop",
                                settings=stack.settings)
    stack.consume()
    assert record(stack, second)["duplicate_of"] == first


def test_same_key_other_request_python_api(stack: Stack) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first = api.enqueue_extend(req(stack.sim), idempotency_key=key, settings=stack.settings)
    stack.consume()
    with pytest.raises(IdempotencyConflictError) as exc:
        api.enqueue_extend(req(stack.sim, title="Another song"), idempotency_key=key, settings=stack.settings)
    assert exc.value.errors == [{"field": "idempotency_key", "message": CONFLICT_MESSAGE}]
    (refused,) = exc.value.job_ids
    assert refused != first and stack.messages() == []  # nothing sent
    assert_refused(stack, refused)
    stack.h.run_until(stack.h.finished(first))
    assert record(stack, first)["state"] == "succeeded"


def test_same_key_other_request_v1_is_409(stack: Stack) -> None:
    key = f"k-{uuid.uuid4().hex}"
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "idempotency_key": key})
    assert r.status_code == 202
    stack.consume()
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, style="jazz"), "idempotency_key": key})
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["kind"] == "conflict" and error["message"] == CONFLICT_MESSAGE
    assert error["errors"] == [{"field": "idempotency_key", "message": CONFLICT_MESSAGE}]
    (refused,) = error["job_ids"]
    assert stack.messages() == []
    assert_refused(stack, refused)
    got = stack.call("GET", f"/v1/jobs/{refused}", token=READ).json()
    assert got["state"] == "failed" and got["error"]["message"] == CONFLICT_MESSAGE
    # In a list, the item is named by its index.
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim)},
                                                      {"request": req(stack.sim, title="x"), "idempotency_key": key}]})
    assert r.status_code == 409 and r.json()["error"]["errors"][0]["field"] == "[1].idempotency_key"
    assert stack.messages() == []


def test_same_key_other_request_raw_message_fails_at_the_worker(stack: Stack) -> None:
    """A foreign producer's Celery message (no producer-side check): the worker refuses it."""
    key = f"k-{uuid.uuid4().hex}"
    first = api.enqueue_extend(req(stack.sim), idempotency_key=key, settings=stack.settings)
    stack.consume()
    foreign = f"foreign-{uuid.uuid4().hex[:8]}"
    api.producer_app(stack.settings).send_task(
        "kie_extend.extend", task_id=foreign, queue=stack.settings.queue,
        kwargs={"request": req(stack.sim, title="Foreign"), "idempotency_key": key})
    stack.consume()
    assert_refused(stack, foreign)
    assert (stack.rt.store.get(foreign) or {}).get("idempotency_key") == key
    stack.h.run_until(stack.h.finished(first))
    assert stack.sim.simulator.stats_snapshot()["submissions_accepted"] == 1


def test_simultaneous_sends_with_one_key_only_one_wins(stack: Stack) -> None:
    """Both producers pass their look before any worker recorded the key: the worker's atomic step
    lets exactly one through, the other ends failed with its own event."""
    key = f"k-{uuid.uuid4().hex}"
    a = api.enqueue_extend(req(stack.sim, title="A"), idempotency_key=key, settings=stack.settings)
    b = api.enqueue_extend(req(stack.sim, title="B"), idempotency_key=key, settings=stack.settings)
    stack.consume()
    states = {j: record(stack, j)["state"] for j in (a, b)}
    loser = b if states[a] != "failed" else a
    assert_refused(stack, loser)
    winner = a if loser == b else b
    stack.h.run_until(stack.h.finished(winner))
    assert record(stack, winner)["state"] == "succeeded"


def test_key_is_scoped_by_tenant(stack: Stack) -> None:
    key = f"k-{uuid.uuid4().hex}"
    shop = api.enqueue_extend(req(stack.sim), idempotency_key=key, tenant="shop", settings=stack.settings)
    stack.consume()
    # The same key in another tenant is another key: same request or not, it is a job of its own.
    radio = api.enqueue_extend(req(stack.sim, title="Radio"), idempotency_key=key, tenant="radio",
                               settings=stack.settings)
    same = api.enqueue_extend(req(stack.sim), idempotency_key=key, tenant="studio", settings=stack.settings)
    stack.consume()
    for job in (shop, radio, same):
        stack.h.run_until(stack.h.finished(job))
        rec = record(stack, job)
        assert rec["state"] == "succeeded" and not rec.get("duplicate_of")
    assert stack.sim.simulator.stats_snapshot()["submissions_accepted"] == 3
    assert request_fingerprint(req(stack.sim), "shop") != request_fingerprint(req(stack.sim), "studio")


# ----- explicit job ids ------------------------------------------------------------------------------

def test_simultaneous_posts_with_one_job_id(stack: Stack) -> None:
    """30 tries: two producers POST the same job id at the same moment with different requests;
    exactly one 202, the other 409, and only the winner's message is in the broker."""
    for n in range(30):
        job_id = f"race-{n}-{uuid.uuid4().hex[:6]}"
        barrier = threading.Barrier(2)
        codes: dict[str, int] = {}

        def post(title: str) -> None:
            body = {"request": req(stack.sim, title=title), "job_id": job_id}
            barrier.wait(5)
            codes[title] = stack.call("POST", "/v1/jobs", json=body).status_code

        threads = [threading.Thread(target=post, args=(t,)) for t in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert sorted(codes.values()) == [202, 409], (n, codes)
        winner = next(t for t, c in codes.items() if c == 202)
        sent = [kw for j, kw in stack.messages() if j == job_id]
        assert len(sent) == 1 and sent[0]["request"]["title"] == winner
        stack.rt.redis.delete(stack.settings.queue)


def test_explicit_id_retry_and_python_api(stack: Stack) -> None:
    job_id = f"order-{uuid.uuid4().hex[:8]}"
    assert api.enqueue_extend(req(stack.sim), job_id=job_id, settings=stack.settings) == job_id
    # Not recorded yet: the same call again is answered with the same id and sends nothing twice.
    assert api.enqueue_extend(req(stack.sim), job_id=job_id, settings=stack.settings) == job_id
    assert [j for j, _ in stack.messages()] == [job_id]
    with pytest.raises(JobExistsError):
        api.enqueue_extend(req(stack.sim, title="Other"), job_id=job_id, settings=stack.settings)
    stack.consume()
    assert api.enqueue_extend(req(stack.sim), job_id=job_id, settings=stack.settings) == job_id
    with pytest.raises(JobExistsError):
        api.enqueue_extend(req(stack.sim, title="Other"), job_id=job_id, settings=stack.settings)
    assert stack.messages() == []
    # Every kwarg counts in "the same message": the worker's record is matched after JSON.
    full = {"idempotency_key": f"k-{job_id}", "metadata": {"order": 1, "tags": ["a"]}, "tenant": "shop",
            "priority": 7, "batch_id": f"b-{job_id}", "not_after": "2999-01-01T00:00:00Z"}
    other = f"{job_id}-full"
    assert api.enqueue_extend(req(stack.sim), job_id=other, settings=stack.settings, **full) == other
    stack.consume()
    assert record(stack, other)["state"] in ("queued", "submitting", "submitted", "succeeded")
    assert api.enqueue_extend(req(stack.sim), job_id=other, settings=stack.settings, **full) == other
    assert stack.messages() == []
    with pytest.raises(JobExistsError):
        api.enqueue_extend(req(stack.sim), job_id=other, settings=stack.settings, **{**full, "priority": 6})


def test_one_id_twice_in_one_list(stack: Stack) -> None:
    """Two items of one list under one id with different requests: refused before anything is sent."""
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    with pytest.raises(JobExistsError):
        api.enqueue_many([{"request": req(stack.sim), "job_id": job_id},
                          {"request": req(stack.sim, title="Other"), "job_id": job_id}], settings=stack.settings)
    assert stack.messages() == []
    # The claim was given back: the id is free for the next request.
    assert api.enqueue_many([{"request": req(stack.sim, title="Other"), "job_id": job_id}],
                            settings=stack.settings) == [job_id]


def test_a_claim_without_a_message_expires(stack: Stack) -> None:
    """A producer that died between claim and publish strands nothing: the claim is a key with a TTL
    (no record, nothing for the sweep), and the same request re-sent is published."""
    job_id = f"lost-{uuid.uuid4().hex[:8]}"
    from kie_extend.jobs.idempotency import Idempotency, kwargs_digest

    idem = Idempotency(stack.rt.redis, stack.rt.keys, stack.settings.idempotency_window)
    digest = kwargs_digest({"request": req(stack.sim)})
    assert idem.claim([(job_id, digest)]) == ["won"]
    assert 0 < stack.rt.redis.ttl(stack.rt.keys.job_claim(job_id)) <= int(stack.settings.idempotency_window)
    assert record(stack, job_id)["state"] == "not_found"
    assert api.enqueue_extend(req(stack.sim), job_id=job_id, settings=stack.settings) == job_id
    assert [j for j, _ in stack.messages()] == [job_id]
    stack.consume()
    stack.h.run_until(stack.h.finished(job_id))
    assert record(stack, job_id)["state"] == "succeeded"


# ----- batch submit re-run with no worker -----------------------------------------------------------------

def test_batch_rerun_before_any_worker_sends_nothing_twice(tmp_path: Path,
                                                           make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    lines = 7
    path = tmp_path / "spring.jsonl"
    path.write_text("".join(json.dumps({"uploadUrl": f"https://e.org/{n}.mp3", "defaultParamFlag": False,
                                        "model": "V5", "prompt": f"p{n}"}) + "\n" for n in range(lines)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": settings.redis_url, "KIE_KEY_PREFIX": settings.key_prefix,
                "KIE_QUEUE": settings.queue, "KIE_API_KEY": "test-key-0123456789",
                "KIE_ALLOW_PRIVATE_URLS": "true", "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/unused"})
    outs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "kie_extend.cli", "batch", "submit", str(path), "--batch-id", "spring"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    r = redis.Redis.from_url(settings.redis_url)
    assert r.llen(settings.queue) == lines
    assert f"sent {lines}, already there 0" in outs[0] and f"sent 0, already there {lines}" in outs[1]
    # The same batch id with one line changed: that line is another request under a taken id
    # (skipped, as a re-run skips every taken id); nothing is sent again.
    path.write_text(path.read_text().replace('"p3"', '"changed"'))
    done = subprocess.run([sys.executable, "-m", "kie_extend.cli", "batch", "submit", str(path), "--batch-id", "spring"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and f"sent 0, already there {lines}" in done.stdout
    assert r.llen(settings.queue) == lines
