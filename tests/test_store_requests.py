"""A job's request body in its own key beside the record: the queued record stays a listpack hash,
the request key is written with the record and goes away with it, records from before the key
existed (request in the hash) still submit and retry, and the doctor sees a lost or orphan key."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from inline import Harness, harness_factory, sample_request
from kie_extend.api import get_job
from kie_extend.jobs.states import JobState
from kie_extend.simulator import SimConfig, SimServer, serve
from kie_extend.store import packing
from kie_extend.store.invariants import Invariants


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=3, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim)


def typical(sim: SimServer, i: int = 7) -> dict[str, Any]:
    """A request as producers send them: custom mode, a lyric prompt, style and title."""
    return sample_request(sim, instrumental=False, prompt=f"[Verse]\nWalking home along the river, take {i}",
                          style="indie folk, acoustic guitar", title=f"Walking Home {i}", vocalGender="f")


def queued(h: Harness, request: dict[str, Any], **kw: Any) -> str:
    """A job accepted while the operator pause holds it in ``queued``."""
    h.rt.gates.pause_operator("test")
    job = h.accept(request, **kw)
    assert h.state(job)["state"] == "queued"
    return job


def to_old_layout(h: Harness, job: str) -> None:
    """Rewrite a record as versions before the request key wrote it: the request JSON in the hash."""
    r, k = h.rt.redis, h.rt.keys
    text = packing.unpack(r.get(k.request(job)))
    r.hset(k.job(job), "request", text)
    r.delete(k.request(job))


def test_queued_record_is_a_listpack_and_the_request_is_beside_it(harness: Callable[..., Harness]) -> None:
    h = harness()
    r, k = h.rt.redis, h.rt.keys
    request = typical(h.sim)
    job = queued(h, request, metadata={"order": 42}, batch_id="b1", tenant="acme")
    limit = int(r.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
    raw = r.hgetall(k.job(job))
    assert b"request" not in raw
    assert {f.decode(): len(v) for f, v in raw.items() if len(v) > limit} == {}
    assert r.object("encoding", k.job(job)) == b"listpack"
    stored = r.get(k.request(job))
    assert stored.startswith(packing.PACKED_V1) and len(stored) < len(json.dumps(request))
    assert r.ttl(k.request(job)) == -1 and r.ttl(k.job(job)) == -1
    body = {**request, "callBackUrl": f"{h.rt.settings.callback_base_url}/kie/callback/{job}"}
    assert h.rt.store.request(job) == body
    assert json.loads(h.rt.store.get(job)["request"]) == body  # the record as read carries it, in one round trip


def test_queued_record_stores_nothing_it_can_derive(harness: Callable[..., Harness]) -> None:
    """The id is the key, ``created_at`` is ``created_ts`` as text, counters not yet counted read 0
    and no metadata reads {}: none of them sits in a queued job's hash, yet every reader shows them."""
    h = harness()
    r, k = h.rt.redis, h.rt.keys
    job = queued(h, typical(h.sim))
    raw = {f.decode(): v.decode() for f, v in r.hgetall(k.job(job)).items()}
    assert not {"job_id", "created_at", "attempts", "polls", "metadata"} & set(raw), raw
    rec = h.rt.store.get_record(job)
    assert rec is not None and rec.attempts == 0 and rec.polls == 0 and rec.metadata == {}
    shown = get_job(job, settings=h.rt.settings)
    assert shown["job_id"] == job and shown["attempts"] == 0 and shown["polls"] == 0 and shown["metadata"] == {}
    created = time.mktime(time.strptime(shown["created_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert shown["created_at"].endswith("Z") and abs(created - float(raw["created_ts"])) < 1.0
    with_meta = queued(h, typical(h.sim, 8), metadata={"order": 42})
    assert get_job(with_meta, settings=h.rt.settings)["metadata"] == {"order": 42}
    h.rt.gates.resume_operator()
    h.run_until(h.finished(job))
    done = get_job(job, settings=h.rt.settings)
    assert done["state"] == "succeeded" and done["attempts"] == 1 and done["polls"] >= 1, done
    assert done["created_at"] == shown["created_at"]


def test_request_key_follows_the_record_to_its_end(harness: Callable[..., Harness]) -> None:
    h = harness(retention=2)
    r, k = h.rt.redis, h.rt.keys
    job = queued(h, typical(h.sim))
    assert h.pipeline.cancel(job) == "cancelled"
    ttl_job, ttl_req = r.pttl(k.job(job)), r.pttl(k.request(job))
    assert 0 < ttl_req <= 2000 and abs(ttl_job - ttl_req) < 50
    event = json.loads(h.state(job)["event"])
    assert event["event"] == "job.cancelled" and event["request"]["title"] == "Walking Home 7"
    deadline = time.monotonic() + 10
    while r.exists(k.job(job), k.request(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.exists(k.job(job), k.request(job)) == 0


def test_a_retried_job_keeps_its_request_key_for_good(harness: Callable[..., Harness]) -> None:
    h = harness(retention=3600)
    r, k = h.rt.redis, h.rt.keys
    h.sim.simulator.update_config({"fault_generation_fail": 1.0})
    job = h.accept(typical(h.sim))
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "failed" and r.ttl(k.request(job)) > 0
    h.sim.simulator.update_config({"fault_generation_fail": 0.0})
    assert h.pipeline.retry(job)
    assert r.ttl(k.request(job)) == -1 and r.ttl(k.job(job)) == -1
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "succeeded"


def test_duplicate_pointer_request_expires_with_it(harness: Callable[..., Harness]) -> None:
    h = harness(idempotency_window=600)
    r, k = h.rt.redis, h.rt.keys
    first = queued(h, typical(h.sim), idempotency_key="k1")
    dup = h.accept(typical(h.sim), idempotency_key="k1")
    assert h.state(dup)["duplicate_of"] == first
    assert b"request" not in r.hgetall(k.job(dup)) and r.exists(k.request(dup))
    assert 0 < r.ttl(k.request(dup)) <= 600 and abs(r.ttl(k.job(dup)) - r.ttl(k.request(dup))) <= 1


def test_an_old_record_with_the_request_in_its_hash_still_submits(harness: Callable[..., Harness]) -> None:
    h = harness()
    job = queued(h, typical(h.sim, 9))
    to_old_layout(h, job)
    assert h.rt.store.request(job)["title"] == "Walking Home 9"
    h.rt.gates.resume_operator()
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert raw["state"] == "succeeded" and raw["kie_task_id"]
    assert json.loads(raw["event"])["request"]["title"] == "Walking Home 9"
    assert not h.rt.redis.exists(h.rt.keys.request(job))  # nothing written for an old record
    assert Invariants(h.rt.redis, h.rt.keys).check(grace=0).violations == []


def test_an_old_failed_record_is_retried_with_its_request(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sim.simulator.update_config({"fault_generation_fail": 1.0})
    job = h.accept(typical(h.sim, 11))
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "failed"
    to_old_layout(h, job)
    h.sim.simulator.update_config({"fault_generation_fail": 0.0})
    assert h.pipeline.retry(job)
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert raw["state"] == "succeeded" and json.loads(raw["event"])["request"]["title"] == "Walking Home 11"


def test_doctor_reports_a_lost_request_and_repairs_an_orphan(harness: Callable[..., Harness]) -> None:
    h = harness()
    r, k = h.rt.redis, h.rt.keys
    lost = queued(h, typical(h.sim, 1))
    orphan = queued(h, typical(h.sim, 2))
    old = queued(h, typical(h.sim, 3))
    to_old_layout(h, old)  # the request in the hash counts as stored
    r.delete(k.request(lost))
    h.pipeline.cancel(orphan)
    r.delete(k.job(orphan))
    inv = Invariants(r, k)
    found = inv.check(grace=0)
    assert {(v.kind, v.job_id) for v in found.violations} == {("missing_request", lost), ("orphan_request", orphan)}
    fixed = inv.check(grace=0, repair=True)
    assert {(v.kind, v.repaired) for v in fixed.violations} == {("missing_request", False), ("orphan_request", True)}
    assert not r.exists(k.request(orphan))
    assert [v.kind for v in inv.check(grace=0).violations] == ["missing_request"]


def test_orphan_scan_is_bounded_by_the_budget(harness: Callable[..., Harness]) -> None:
    h = harness()
    r, k = h.rt.redis, h.rt.keys
    for i in range(30):
        r.set(k.request(f"o{i}"), b"{}")
    inv = Invariants(r, k)
    seen, cursor, steps = set(), (0, 0), 0
    while True:
        report = inv.check(grace=0, repair=True, cursor=cursor, budget=1)
        seen |= {v.job_id for v in report.violations if v.kind == "orphan_request"}
        steps += 1
        if report.cursor is None:
            break
        cursor = report.cursor
        assert steps < 10_000
    assert seen == {f"o{i}" for i in range(30)} and not r.exists(*[k.request(f"o{i}") for i in range(30)])


def test_packing_round_trips_and_pays() -> None:
    text = json.dumps({"uploadUrl": "https://files.example.org/a/song.mp3", "defaultParamFlag": True,
                       "model": "V4_5PLUS", "continueAt": 42.5, "prompt": "[Verse]\nSunlight on the water",
                       "style": "indie folk", "title": "Home", "callBackUrl": "https://jobs.example.com/kie/callback/x1",
                       "vocalGender": "f", "styleWeight": 0.65}, separators=(",", ":"))
    packed = packing.pack(text)
    assert packed.startswith(packing.PACKED_V1) and len(packed) < len(text) * 0.6
    assert packing.unpack(packed) == text
    assert packing.pack("{}") == b"{}" and packing.unpack(b"{}") == "{}"  # too short to pay: kept as text
    assert packing.unpack(text.encode()) == text
    with pytest.raises(ValueError):
        packing.unpack(b"\x02whatever")
    with pytest.raises(ValueError):
        packing.unpack(packing.PACKED_V1 + b"\xff\xff")


def test_packing_dictionary_v1_never_changes() -> None:
    """Values packed with version 1 are read back with this exact dictionary: a new one takes a new
    version byte."""
    assert hashlib.sha256(packing.DICTIONARY_V1).hexdigest() == "c8ff18c106fcf7fc76f0224dac7dc84d352da42c95d1a804051a61a25cfa3449"


def test_a_queued_job_whose_request_is_gone_fails_without_a_send(harness: Callable[..., Harness]) -> None:
    h = harness()
    job = queued(h, typical(h.sim))
    h.rt.redis.delete(h.rt.keys.request(job))
    h.rt.gates.resume_operator()
    h.run_until(h.finished(job))
    raw = h.state(job)
    err = json.loads(raw["error"])
    assert raw["state"] == "failed" and err["kind"] == "invalid_request" and err["errors"][0]["field"] == "request"
    assert not raw.get("sends") and not raw.get("kie_task_id")


def test_cancel_batch_events_carry_each_request(harness: Callable[..., Harness]) -> None:
    from kie_extend.jobs.batches import cancel_batch

    h = harness()
    jobs = [queued(h, typical(h.sim, i), batch_id="bx") for i in range(3)]
    to_old_layout(h, jobs[0])  # an old record among them
    assert cancel_batch(h.rt, "bx", h.pipeline.cancel_many) == 3
    titles = [json.loads(h.state(j)["event"])["request"]["title"] for j in jobs]
    assert titles == ["Walking Home 0", "Walking Home 1", "Walking Home 2"]
    assert all(h.rt.redis.ttl(h.rt.keys.request(j)) > 0 for j in jobs[1:])
