"""Writes safe to repeat, the provider breaker, success needing audio, the invariant sweep and
``kie-extend doctor``, callback task-id spellings, and job-id reuse — on a real Valkey and the
simulator over HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from inline import Harness, harness_factory, sample_request
from kie_extend.api import enqueue_extend
from kie_extend.admission.queues import Admission
from kie_extend.admission.breaker import Breaker
from kie_extend.infra.embedded import EmbeddedValkey
from kie_extend.errors import JobExistsError
from kie_extend.admission.gates import Gates
from kie_extend.store.invariants import Invariants
from kie_extend.store.keys import Keys
from kie_extend.jobs.request import parse_request
from kie_extend.http.callbacks import callback_task_id, signature_ok
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve
from kie_extend.jobs.states import JobState
from kie_extend.store.jobstore import JobStore


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=4, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim)


req = sample_request


# -- writes that are safe to repeat -------------------------------------------------------------

def test_transition_resent_after_a_frozen_server_is_applied_once() -> None:
    """SIGSTOP the server during a transition: the client times out and re-sends the script, the
    server (resumed) runs it twice. The second run recognises its operation id: done, not a lost race."""
    server = EmbeddedValkey().start()
    try:
        client = redis.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1)
        keys = Keys(f"t{uuid.uuid4().hex[:8]}")
        store = JobStore(client, keys)
        assert store.transition("j1", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}})
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        timer = threading.Timer(2.5, os.kill, (server.proc.pid, signal.SIGCONT))
        timer.start()
        try:
            ok = store.transition("j1", JobState.SUBMITTING, expect=[JobState.QUEUED], due=time.time() + 30)
        finally:
            timer.join()
        assert ok, "a re-sent transition must report success, not a lost race"
        assert store.get("j1")["state"] == "submitting"  # type: ignore[index]
        replays = int(client.hget(keys.stats, "transition_replays") or 0)
        assert replays >= 1, "the script should have run more than once (the fault did not happen)"
        assert client.zscore(keys.due, "j1") is not None
        assert client.sismember(keys.inflight, "j1")
    finally:
        server.stop()


def _queue(store: JobStore, ids: list[str]) -> None:
    now = time.time()
    for i, job in enumerate(ids):
        assert store.transition(job, JobState.QUEUED, expect=[None], fields={"created_ts": now + i * 1e-6, "rq": "5|t"},
                                ready=True)


def test_rate_token_granted_twice_takes_one_slot(rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    gates = Gates(rclient, keys, rate=(2, 10.0), margin=0.1, max_in_flight=10)
    admission = Admission(rclient, keys, rate=(2, 10.0), margin=0.1, max_in_flight=10, probe_timeout=60)
    _queue(JobStore(rclient, keys), ["a", "b", "c"])
    assert [x.job_id for x in admission.admit(5)] == ["a", "b"]
    assert gates.acquire("a", "a:1").verdict == "ok"
    assert gates.acquire("a", "a:1").verdict == "ok"  # the same call, re-sent
    assert gates.window_use() == 1
    assert gates.acquire("b", "b:1").verdict == "ok"
    assert admission.admit(5) == []  # the window is full: c waits in its ready queue


# -- provider breaker ---------------------------------------------------------------------------

def test_breaker_opens_probes_backs_off_and_closes(rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    store = JobStore(rclient, keys)
    breaker = Breaker(rclient, keys, threshold=3, cooldown=0.5)
    gates = Gates(rclient, keys, rate=(100, 1.0), margin=0.0, max_in_flight=100)
    admission = Admission(rclient, keys, rate=(100, 1.0), margin=0.0, max_in_flight=100, probe_timeout=60)
    _queue(store, ["x"])
    assert [a.job_id for a in admission.admit(5)] == ["x"]
    assert not breaker.failure("j1") and not breaker.failure("j2")
    assert breaker.failure("j3")  # the third in a row opens it
    assert breaker.state()["state"] == "open"
    assert gates.acquire("x", "x:1").verdict == "breaker"  # admitted before, held now
    assert store.enqueue_ready("x")  # back in line, as the pipeline does
    _queue(store, ["a", "b"])
    assert admission.admit(5) == []
    assert not breaker.probe_due()
    time.sleep(0.6)
    assert breaker.probe_due()
    assert [a.job_id for a in admission.admit(5)] == ["x"]  # the one probe (the oldest waiting)
    st = breaker.state()
    assert st["state"] == "half_open" and st["probe"] == "x"
    assert gates.acquire("x", "x:1").verdict == "ok"
    assert admission.admit(5) == []  # everyone else waits for the probe
    assert not breaker.failure("j1")  # an older job's failure does not decide the probe
    assert breaker.failure("x")  # the probe failed: open again, twice as long
    st = breaker.state()
    assert st["state"] == "open" and 0.8 < st["until"] - time.time() <= 1.0
    time.sleep(1.05)
    assert [a.job_id for a in admission.admit(5)] == ["a"]
    assert gates.acquire("a", "a:1").verdict == "ok"
    assert breaker.success("a")  # the probe succeeded: closed
    assert breaker.state()["state"] == "closed" and breaker.state()["streak"] == 0
    assert [a.job_id for a in admission.admit(5)] == ["b"]


def test_breaker_stops_paid_resubmission_during_an_outage(harness: Callable[..., Harness]) -> None:
    """Every generation fails: after the threshold no job is sent (and none regenerated) until a probe."""
    h = harness(breaker_threshold=3, breaker_cooldown=1.0, regenerate=2)
    h.sim.simulator.update_config({"fault_generation_fail": 1.0})
    jobs = [h.accept(req(h.sim, title=f"T{i}")) for i in range(8)]
    h.run_until(lambda: h.rt.breaker.state()["opens"] >= 1, timeout=30)
    sent_at_open = h.sim.simulator.stats.snapshot()["submissions_accepted"]
    # Within the cooldown nothing more is sent.
    end = time.monotonic() + 0.7
    while time.monotonic() < end:
        h.scheduler.tick()
        h.drain()
        time.sleep(0.05)
    assert h.sim.simulator.stats.snapshot()["submissions_accepted"] == sent_at_open
    # The outage ends: the probe succeeds, the breaker closes, every job finishes.
    h.sim.simulator.update_config({"fault_generation_fail": 0.0})
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
    assert h.rt.breaker.state()["state"] == "closed"
    total = h.sim.simulator.stats.snapshot()["submissions_accepted"]
    assert total < 8 * 3, "regeneration during the outage would have paid for every job three times"
    assert sum(h.state(j)["state"] == "succeeded" for j in jobs) >= 1


# -- success needs audio --------------------------------------------------------------------------

def test_success_without_audio_is_a_failed_generation(harness: Callable[..., Harness]) -> None:
    h = harness(empty_success_polls=2)
    h.sim.simulator.update_config({"fault_empty_success": 1.0})
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    raw = h.state(job)
    err = json.loads(raw["error"])
    assert raw["state"] == "failed" and err["kind"] == "generation_failed"
    assert "SUCCESS without audio" in err["message"]
    assert int(raw["empty_success"]) == 2 and int(raw["polls"]) >= 3
    event = json.loads(raw["event"])
    assert event["event"] == "job.failed" and not any(t["audio_url"] for t in event["tracks"])


# -- invariant sweep and doctor -------------------------------------------------------------------

def test_sweep_finds_and_repairs_every_kind(harness: Callable[..., Harness]) -> None:
    h = harness()
    rt, keys = h.rt, h.rt.keys
    store, r = rt.store, rt.redis
    # A queued job on no schedule (as a lost write would leave it).
    store.transition("q1", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}})
    # A submitted job whose due entry vanished, and which is missing from the in-flight set.
    store.transition("s1", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}})
    store.transition("s1", JobState.SUBMITTING, expect=[JobState.QUEUED])
    store.transition("s1", JobState.SUBMITTED, expect=[JobState.SUBMITTING], fields={"kie_task_id": "x"})
    r.zrem(keys.due, "s1")
    r.srem(keys.inflight, "s1")
    # An in-flight slot held by a queued job, an evicted record, a finished job still on the schedule.
    r.sadd(keys.inflight, "q1")
    store.transition("gone", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}}, due=time.time())
    r.delete(keys.job("gone"))
    store.transition("f1", JobState.FAILED, expect=[None], fields={"created_ts": time.time(), "request": {}},
                     event={"event": "job.failed"}, handlers=[])
    r.zadd(keys.due, {"f1": time.time()})
    inv = Invariants(r, keys)
    report = inv.check(grace=0)
    kinds = report.counts()
    # The evicted record left its request key behind: an orphan.
    assert kinds == {"unscheduled": 2, "inflight_missing": 1, "inflight_leak": 1, "missing_record": 2,
                     "finished_scheduled": 1, "orphan_request": 1}, kinds
    fixed = inv.check(repair=True, grace=0)
    assert fixed.repaired == len(fixed.violations)
    assert inv.check(grace=0).violations == []
    assert r.zscore(keys.due, "q1") is not None and r.zscore(keys.due, "s1") is not None
    assert r.sismember(keys.inflight, "s1") and not r.sismember(keys.inflight, "q1")
    assert not r.exists(keys.request("gone")) and r.exists(keys.request("q1"))
    # A young job is not reported (it may be between two writes of a normal step).
    store.transition("young", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}})
    assert inv.check(grace=30).violations == []


def test_tick_sweep_puts_a_stranded_job_back_and_it_finishes(harness: Callable[..., Harness]) -> None:
    h = harness(sweep_interval=0.2, sweep_grace=0.0)
    job = h.accept(req(h.sim))
    h.run_until(lambda: h.state(job).get("state") == "submitted")
    h.rt.redis.zrem(h.rt.keys.due, job)  # the poll schedule entry is lost
    h.dispatch.pending.clear()
    h.run_until(h.finished(job), timeout=30)
    assert h.state(job)["state"] == "succeeded"
    assert int(h.rt.redis.hget(h.rt.keys.stats, "sweep_unscheduled") or 0) >= 1


def test_doctor_command(make_settings: Callable[..., Any], valkey: EmbeddedValkey, prefix: str) -> None:
    settings = make_settings()
    rt = Runtime(settings)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KIE_")},
           "KIE_REDIS_URL": valkey.url, "KIE_KEY_PREFIX": prefix}
    cmd = [sys.executable, "-m", "kie_extend.cli", "doctor", "--grace", "0"]
    clean = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and "0 violation(s)" in clean.stdout, clean.stdout + clean.stderr
    rt.store.transition("lost1", JobState.QUEUED, expect=[None], fields={"created_ts": time.time(), "request": {}})
    found = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 1
    assert json.loads(found.stdout)["by_kind"] == {"unscheduled": 1}
    fixed = subprocess.run([*cmd, "--repair"], env=env, capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 0 and "1 repaired" in fixed.stdout, fixed.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "0 violation(s)" in again.stdout


# -- callbacks, job ids, continueAt ---------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"data": {"task_id": "T1"}}, {"data": {"taskId": "T1"}}, {"taskId": "T1", "data": {}},
    {"task_id": "T1"}, {"taskId": "T1", "data": {"callbackType": "complete", "data": []}},
])
def test_callback_task_id_in_every_spelling(body: dict[str, Any]) -> None:
    import base64
    import hashlib
    import hmac

    assert callback_task_id(body) == "T1"
    ts = str(int(time.time()))
    sig = base64.b64encode(hmac.new(b"s3", f"T1.{ts}".encode(), hashlib.sha256).digest()).decode()
    assert signature_ok(body, {"x-webhook-timestamp": ts, "x-webhook-signature": sig}, "s3")


def test_callback_with_camel_case_task_id_resolves_an_unknown_submit(harness: Callable[..., Harness]) -> None:
    h = harness()
    job = str(uuid.uuid4())
    h.rt.store.transition(job, JobState.QUEUED, expect=[None],
                          fields={"created_ts": time.time(), "request": req(h.sim, callBackUrl=f"http://cb/{job}")})
    h.rt.store.transition(job, JobState.SUBMITTING, expect=[JobState.QUEUED],
                          fields={"submit_started_ts": time.time(), "outcome_unknown": 1}, due=time.time() + 60)
    task_id = h.rt.client.submit_extend(req(h.sim, callBackUrl=f"http://cb/{job}"))
    assert h.pipeline.hint(job, callback_task_id({"data": {"taskId": task_id, "callbackType": "complete"}}),
                           "complete")
    h.pipeline.advance(job)
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "succeeded" and h.state(job)["kie_task_id"] == task_id


def test_reused_job_id(harness: Callable[..., Harness], make_settings: Callable[..., Any],
                       caplog: pytest.LogCaptureFixture) -> None:
    h = harness()
    job = str(uuid.uuid4())
    h.pipeline.accept(job, req(h.sim, title="first"))
    h.drain()
    with caplog.at_level(logging.INFO, logger="kie_extend.jobs.pipeline"):
        h.pipeline.accept(job, req(h.sim, title="first"))  # a redelivery: quiet
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        h.pipeline.accept(job, req(h.sim, title="second"))  # another request under the same id
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "different request" in warnings[0].getMessage()
    assert int(h.rt.redis.hget(h.rt.keys.stats, "job_id_conflicts") or 0) == 1
    assert json.loads(h.state(job)["request"])["title"] == "first"
    with pytest.raises(JobExistsError) as exc:
        enqueue_extend(req(h.sim), job_id=job, settings=h.rt.settings)
    assert exc.value.errors[0]["field"] == "job_id"


def test_continue_at_below_one_second_warns() -> None:
    parsed = parse_request({"uploadUrl": "https://example.com/a.mp3", "defaultParamFlag": True,
                            "instrumental": True, "continueAt": 0.5, "model": "V5", "style": "s", "title": "t"})
    assert any("continueAt" in w and "below 1" in w for w in parsed.warnings)


# -- Redis Cluster -------------------------------------------------------------------------------

def test_scripts_run_on_a_redis_cluster(tmp_path: Any) -> None:
    """A one-node Valkey cluster refuses any script whose keys span hash slots: the
    store, gates, breaker and sweep all run on it through redis-py's cluster client."""
    from kie_extend.infra.embedded import free_port, valkey_binary

    port = free_port()
    while port + 10000 > 65535:  # a cluster node also listens on port + 10000 (the cluster bus)
        port = free_port()
    proc = subprocess.Popen([valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(tmp_path),
                             "--cluster-config-file", str(tmp_path / "nodes.conf"),
                             "--logfile", str(tmp_path / "valkey.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        plain = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                plain.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        plain.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in plain.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = redis.RedisCluster(host="127.0.0.1", port=port)
        keys = Keys("cl")
        store, breaker = JobStore(client, keys), Breaker(client, keys, threshold=2, cooldown=60)
        gates = Gates(client, keys, rate=(5, 1.0), margin=0.0, max_in_flight=10)
        # A script on two keys of different slots is refused (by the server, and by the client
        # before it): what the hash tag prevents.
        with pytest.raises(redis.ResponseError, match="same slot"):
            plain.eval("return redis.call('MGET', KEYS[1], KEYS[2])", 2, "a", "b")
        with pytest.raises(redis.RedisClusterException, match="same key slot"):
            client.eval("return redis.call('MGET', KEYS[1], KEYS[2])", 2, "a", "b")
        now = time.time()
        assert store.transition("j", JobState.QUEUED, expect=[None], fields={"created_ts": now, "rq": "5|t",
                                                                             "batch_id": "b1"}, ready=True)
        store.declare_batch("b1", ["j"])
        admission = Admission(client, keys, rate=(5, 1.0), margin=0.0, max_in_flight=10, probe_timeout=60)
        assert [a.job_id for a in admission.admit(5)] == ["j"]
        assert gates.acquire("j", "j:1").verdict == "ok"
        assert store.transition("j", JobState.SUBMITTING, expect=[JobState.QUEUED], due=now + 30)
        assert store.transition("j", JobState.SUBMITTED, expect=[JobState.SUBMITTING], due=now)
        assert store.claim_due(now + 1, 10, 10) == [("j", now)]
        moved = store.transition("j", JobState.SUCCEEDED, expect=[JobState.SUBMITTED],
                                 event={"event": "job.succeeded"}, handlers=["redis_stream"])
        assert moved and moved.batch_finished == "b1"
        assert sorted(store.claim_deliveries(time.time() + 1, 10, 10)) == [("@batch:b1", "redis_stream"),
                                                                           ("j", "redis_stream")]
        assert not breaker.failure("x") and breaker.failure("y") and breaker.success("z")
        store.transition("q", JobState.QUEUED, expect=[None], fields={"created_ts": now, "rq": "5|t"}, ready=True)
        assert [a.job_id for a in admission.admit(5)] == ["q"]
        assert store.transition("q", JobState.CANCELLED, expect=[JobState.QUEUED],
                                event={"event": "job.cancelled"}, handlers=[])
        store.create_pointer("dup", {"duplicate_of": "j"}, ttl=60)
        assert Invariants(client, keys).check(repair=True, grace=0).violations == []
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
