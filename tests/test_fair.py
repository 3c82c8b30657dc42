"""Sharing one account (README "Sharing one account"): admission by priority then tenants in turn, batches, cancellation,
deadlines and the operator's pause — the domain code on a real Valkey and the simulator over HTTP,
and real workers for the order under load and the cancel/submit race."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inline import Harness, harness_factory, sample_request
from kie_extend.api import cancel, cancel_batch, enqueue_extend, enqueue_many, get_batch, get_job, pause, resume
from kie_extend.cli.devstack import DevStack
from kie_extend.errors import ValidationError
from kie_extend.store.keys import Keys
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve
from kie_extend.jobs.states import JobState


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=7, callbacks=False, rate_limit=1000))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim, tick_interval=0.1)


req = sample_request


def sent_order(h: Harness, jobs: list[str]) -> list[str]:
    """The jobs in the order they were sent to the provider (by their submit time)."""
    rows = [(float(h.state(j).get("submit_started_ts") or 0), j) for j in jobs]
    return [j for ts, j in sorted(rows) if ts]


# -- admission order -----------------------------------------------------------------------------

def test_priority_first_then_tenants_in_turn(harness: Callable[..., Harness]) -> None:
    h = harness(submit_rate="1000/1s", max_in_flight=1)
    h.rt.gates.pause_operator("hold everything while the line forms")
    a = [h.accept(req(h.sim), tenant="A") for _ in range(6)]
    b = [h.accept(req(h.sim), tenant="B") for _ in range(3)]
    urgent = [h.accept(req(h.sim), tenant="A", priority=9) for _ in range(2)]
    low = h.accept(req(h.sim), tenant="C", priority=0)
    assert h.rt.admission.waiting() == {"9": {"A": 2}, "5": {"A": 6, "B": 3}, "0": {"C": 1}}
    h.rt.gates.resume_operator()
    everyone = [*a, *b, *urgent, low]
    h.run_until(lambda: all(h.finished(j)() for j in everyone), timeout=60)
    order = sent_order(h, everyone)
    # One in flight at a time: priority 9 first, then A and B alternate until B runs out, then the
    # rest of A, and priority 0 last.
    assert order[:2] == urgent
    assert order[2:8] == [a[0], b[0], a[1], b[1], a[2], b[2]] or order[2:8] == [b[0], a[0], b[1], a[1], b[2], a[2]]
    assert order[8:11] == a[3:] and order[11] == low


def test_arrival_order_mode_ignores_tenants_and_priorities(harness: Callable[..., Harness]) -> None:
    h = harness(submit_rate="1000/1s", max_in_flight=1, admission="arrival")
    h.rt.gates.pause_operator()
    jobs = [h.accept(req(h.sim), tenant=t, priority=p) for t, p in [("A", 5), ("A", 5), ("B", 5), ("A", 9)]]
    h.rt.gates.resume_operator()
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
    assert sent_order(h, jobs) == jobs


# -- cancellation and deadlines -------------------------------------------------------------------

def test_cancel_a_queued_job_and_too_late_for_a_sent_one(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.rt.gates.pause_operator()
    waiting = h.accept(req(h.sim), metadata={"n": 1})
    assert h.pipeline.cancel(waiting) == "cancelled"
    raw = h.state(waiting)
    err = json.loads(raw["error"])
    assert raw["state"] == "cancelled" and err == {"kind": "cancelled", "reason": "operator",
                                                 "message": "cancelled before it was sent to KIE"}
    event = json.loads(raw["event"])
    assert event["event"] == "job.cancelled" and event["metadata"] == {"n": 1}
    assert h.rt.admission.waiting() == {}
    assert h.pipeline.cancel(waiting) == "finished"
    assert h.pipeline.cancel("no-such-job") == "not_found"
    h.rt.gates.resume_operator()
    sent = h.accept(req(h.sim))
    h.run_until(lambda: h.state(sent).get("state") in ("submitted", "succeeded"))
    assert h.pipeline.cancel(sent) in ("too_late", "finished")
    h.run_until(h.finished(sent))
    assert h.state(sent)["state"] == "succeeded"
    assert h.sim.simulator.stats.snapshot()["submissions_accepted"] == 1  # the cancelled one never went


def test_admitted_but_not_yet_sent_can_still_be_cancelled(harness: Callable[..., Harness]) -> None:
    """A job holding a booked slot is still queued: cancelling it wins, and the later send attempt
    finds it cancelled and sends nothing."""
    h = harness(submit_rate="1/1s")
    first = h.accept(req(h.sim))  # takes this second's slot
    second = h.accept(req(h.sim))
    admitted = h.rt.admission.admit(5, horizon=2.0)
    assert [x.job_id for x in admitted] == [second] and h.state(second).get("admitted")
    assert h.pipeline.cancel(second) == "cancelled"
    time.sleep(max(0.0, admitted[0].at - time.time()) + 0.05)
    h.pipeline.advance(second)
    h.drain()
    assert h.state(second)["state"] == "cancelled"
    h.run_until(h.finished(first))
    assert h.sim.simulator.stats.snapshot()["submissions_accepted"] == 1


def test_deadlines(harness: Callable[..., Harness]) -> None:
    h = harness()
    # A message that arrives after its deadline is cancelled at once.
    late = h.accept(req(h.sim), not_after=time.time() - 1)
    assert h.state(late)["state"] == "cancelled" and json.loads(h.state(late)["error"])["reason"] == "deadline"
    # A job still waiting when its deadline passes is cancelled by the tick.
    h.rt.gates.pause_operator()
    soon = h.accept(req(h.sim), not_after="2099-01-01T00:00:00Z")
    waits = h.accept(req(h.sim), not_after=time.time() + 0.5)
    h.run_until(lambda: h.state(waits).get("state") == "cancelled", timeout=10)
    assert json.loads(h.state(waits)["error"])["reason"] == "deadline"
    assert h.state(soon)["state"] == "queued"
    assert get_job(soon, settings=h.rt.settings)["not_after"] == "2099-01-01T00:00:00Z"
    h.rt.gates.resume_operator()
    h.run_until(h.finished(soon))
    assert h.state(soon)["state"] == "succeeded"
    assert h.sim.simulator.stats.snapshot()["submissions_accepted"] == 1


# -- batches ---------------------------------------------------------------------------------------

def test_batch_counts_and_one_finished_event(harness: Callable[..., Harness]) -> None:
    h = harness(handlers=["redis_stream"])
    batch = f"b-{uuid.uuid4().hex[:6]}"
    jobs = [str(uuid.uuid4()) for _ in range(4)]
    h.rt.store.declare_batch(batch, jobs)
    assert get_batch(batch, settings=h.rt.settings)["counts"] == {"pending": 4}
    h.rt.gates.pause_operator()
    for j in jobs[:3]:
        h.pipeline.accept(j, req(h.sim), batch_id=batch)
    h.pipeline.accept(jobs[3], {"bad": "request"}, batch_id=batch)  # fails validation, still counts
    rec = get_batch(batch, settings=h.rt.settings)
    assert rec["total"] == 4 and rec["counts"] == {"queued": 3, "failed": 1} and not rec["finished"]
    assert h.pipeline.cancel(jobs[2]) == "cancelled"
    h.rt.gates.resume_operator()
    h.run_until(lambda: get_batch(batch, settings=h.rt.settings)["finished"], timeout=30)
    rec = get_batch(batch, settings=h.rt.settings)
    assert rec["counts"] == {"succeeded": 2, "failed": 1, "cancelled": 1} and rec["finished_at"]
    r = h.rt.redis
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(h.rt.keys.results)]
    finished = [e for e in entries if e["event"] == "batch.finished"]
    assert len(finished) == 1 and finished[0]["batch_id"] == batch
    payload = json.loads(finished[0]["payload"])
    assert payload == {"event": "batch.finished", "batch_id": batch, "total": 4,
                       "counts": {"succeeded": 2, "failed": 1, "cancelled": 1}, "finished_at": rec["finished_at"]}
    assert sum(e["event"].startswith("job.") for e in entries) == 4
    h.run_until(lambda: json.loads(r.hget(h.rt.keys.batch(batch), "handler:redis_stream") or b"{}").get("state")
                == "delivered", timeout=10)


def test_cancel_batch_and_late_messages(harness: Callable[..., Harness]) -> None:
    h = harness()
    batch = "cb-" + uuid.uuid4().hex[:6]
    h.rt.gates.pause_operator()
    jobs = [str(uuid.uuid4()) for _ in range(5)]
    h.rt.store.declare_batch(batch, jobs)
    for j in jobs[:4]:
        h.pipeline.accept(j, req(h.sim), batch_id=batch)
    assert cancel_batch(batch, settings=h.rt.settings) == 4
    h.pipeline.accept(jobs[4], req(h.sim), batch_id=batch)  # its message arrives after the cancel
    assert h.state(jobs[4])["state"] == "cancelled"
    rec = get_batch(batch, settings=h.rt.settings)
    assert rec["finished"] and rec["cancelled"] and rec["counts"] == {"cancelled": 5}


def test_options_are_validated_like_the_rest(harness: Callable[..., Harness]) -> None:
    h = harness()
    with pytest.raises(ValidationError) as exc:
        enqueue_extend(req(h.sim), tenant="no spaces", priority=10, batch_id="a|b", not_after="soon",
                       settings=h.rt.settings)
    assert sorted(e["field"] for e in exc.value.errors) == ["batch_id", "not_after", "priority", "tenant"]
    with pytest.raises(ValidationError) as exc:
        enqueue_many([{"request": req(h.sim)}, {"request": req(h.sim), "priority": True}], settings=h.rt.settings)
    assert [e["field"] for e in exc.value.errors] == ["[1].priority"]
    job = str(uuid.uuid4())
    h.pipeline.accept(job, req(h.sim), tenant="x" * 65)  # another producer's bad kwarg
    err = json.loads(h.state(job)["error"])
    assert err["kind"] == "invalid_request" and err["errors"][0]["field"] == "tenant"


def test_operator_pause_and_resume(harness: Callable[..., Harness]) -> None:
    h = harness()
    pause("nightly maintenance", settings=h.rt.settings)
    jobs = [h.accept(req(h.sim)) for _ in range(3)]
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        h.scheduler.tick()
        h.drain()
        time.sleep(0.05)
    assert all(h.state(j)["state"] == "queued" for j in jobs)
    assert h.sim.simulator.stats.snapshot()["submissions_accepted"] == 0
    from kie_extend.infra.metrics import overview, render

    ov = overview(h.rt)
    assert ov["operator_paused"]["reason"] == "nightly maintenance" and ov["paused"] is None  # type: ignore[index]
    assert "kie_extend_operator_paused 1" in render(h.rt) and "kie_extend_paused 0" in render(h.rt)
    assert resume(settings=h.rt.settings) and not resume(settings=h.rt.settings)
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=30)
    assert all(h.state(j)["state"] == "succeeded" for j in jobs)


# -- real workers ----------------------------------------------------------------------------------

def _stack(tmp: Path, **env: str) -> DevStack:
    base = {"KIE_POLL_FIRST": "0.3s", "KIE_POLL_INTERVAL": "0.3s", "KIE_POLL_MAX_INTERVAL": "0.5s",
            "KIE_POLL_CALLBACK_INTERVAL": "1s", "KIE_TICK_INTERVAL": "0.1s", "KIE_LEASE": "8s",
            "KIE_READ_TIMEOUT": "5s", "KIE_CONNECT_TIMEOUT": "2s"}
    return DevStack(tmp, key_prefix=f"f{uuid.uuid4().hex[:6]}", env={**base, **env})


def requests_for(stack: DevStack, n: int, **options: Any) -> list[dict[str, Any]]:
    return [{"request": {"uploadUrl": f"{stack.sim_url}/files/source/40s.mp3", "defaultParamFlag": True,
                         "instrumental": True, "continueAt": 5, "model": "V5", "style": "rock", "title": f"F{i}"},
             **options} for i in range(n)]


def test_order_under_load_with_real_workers(tmp_path: Path) -> None:
    """200 jobs of tenant A waiting at 10 submissions per second; then 10 of B and 3 urgent ones of
    A arrive: the urgent ones go within a few slots, B gets every other slot."""
    with _stack(tmp_path, KIE_SUBMIT_RATE="10/1s", KIE_SUBMIT_RATE_MARGIN="0.05s") as stack:
        stack.start_simulator("--time-factor", "0.01", "--seed", "3", "--rate-limit", "10", "--rate-window", "1")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=3)
        stack.start_beat()
        settings = stack.settings()
        batch_a = "A-" + uuid.uuid4().hex[:6]
        a = enqueue_many(requests_for(stack, 200), tenant="A", batch_id=batch_a, settings=settings)
        rt = Runtime(settings)
        deadline = time.monotonic() + 60
        sent_states = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.SUCCEEDED)
        while sum(rt.store.count(s) for s in sent_states) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        b = enqueue_many(requests_for(stack, 10), tenant="B", settings=settings)
        urgent = enqueue_many(requests_for(stack, 3), tenant="A", priority=9, settings=settings)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (get_job(j, settings=settings).get("kie_task_id")) for j in [*b, *urgent]):
            time.sleep(0.2)
        cancel_batch(batch_a, settings=settings)
        starts, created = {}, {}
        for j in [*a, *b, *urgent]:
            raw = rt.store.get(j) or {}
            if raw.get("submit_started_ts"):
                starts[j] = float(raw["submit_started_ts"])
            created[j] = float(raw.get("created_ts") or 0)
        assert all(j in starts for j in [*b, *urgent]), "every B and urgent job was sent"

        def slots_waited(j: str, since: float) -> int:
            """Submissions that went between ``since`` and this job's own."""
            return sum(1 for ts in starts.values() if since <= ts < starts[j])

        # Counted from when a worker recorded each job (message latency on a busy machine is not
        # admission's doing): an urgent job waits only for slots already handed out.
        waited = [slots_waited(j, created[j]) for j in urgent]
        assert max(waited) < 8, waited
        first_b = min(created[j] for j in b)
        b_waits = sorted(slots_waited(j, first_b) for j in b)
        assert b_waits[0] < 8 and b_waits[-1] < 40, b_waits  # B gets about every other slot
        stats = stack.sim_stats()
        assert stats["rate_limited"] == 0


def test_cancel_racing_submit_with_real_workers(tmp_path: Path) -> None:
    """100 jobs cancelled while workers are sending them: each is cancelled or sent, never both."""
    with _stack(tmp_path, KIE_SUBMIT_RATE="50/1s") as stack:
        stack.start_simulator("--time-factor", "0.01", "--seed", "5", "--rate-limit", "50", "--rate-window", "1")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=3)
        stack.start_beat()
        settings = stack.settings()
        ids = enqueue_many(requests_for(stack, 100), settings=settings)
        outcomes = {}
        for j in ids:  # race the workers, which send each job as soon as they have recorded it
            end = time.monotonic() + 5
            while get_job(j, settings=settings)["state"] == "not_found" and time.monotonic() < end:
                time.sleep(0.001)
            outcomes[j] = cancel(j, settings=settings)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            recs = {j: get_job(j, settings=settings) for j in ids}
            if all(r["state"] in ("succeeded", "failed", "cancelled", "not_found") for r in recs.values()):
                break
            time.sleep(0.3)
        by_url = stack.sim_stats()["submissions_by_callback_url"]
        sent = {j for j in ids if any(u.endswith(f"/kie/callback/{j}") for u in by_url)}
        cancelled = {j for j, r in recs.items() if r["state"] == "cancelled"}
        assert not (sent & cancelled), "a job was both cancelled and sent"
        assert {j for j, ok in outcomes.items() if ok} == cancelled  # cancel() said so exactly for these
        assert len(sent) + len(cancelled) == len(ids)  # every job either went or was cancelled
        print(f"cancel race: {len(cancelled)} cancelled, {len(sent)} sent first")


def test_tenant_limits(harness: Callable[..., Harness]) -> None:
    """svc-a may have 2 slots a second, svc-b is not capped: svc-b takes the slots svc-a sits out."""
    h = harness(submit_rate="1000/1s", tenant_limits="svc-a=2/1s")
    assert h.rt.settings.tenant_limits == {"svc-a": (2, 1.0)}
    h.rt.gates.pause_operator()
    a = [h.accept(req(h.sim), tenant="svc-a") for _ in range(4)]
    b = [h.accept(req(h.sim), tenant="svc-b") for _ in range(3)]
    h.rt.gates.resume_operator()
    first = [x.job_id for x in h.rt.admission.admit(10)]
    assert sorted(first) == sorted([*a[:2], *b]), first  # only 2 of svc-a now
    assert h.rt.admission.admit(10) == []
    assert h.rt.admission.admit(10, horizon=0.5) == []  # svc-a's window is still full
    time.sleep(1.05)
    assert [x.job_id for x in h.rt.admission.admit(10)] == a[2:]


def test_tenant_limits_setting_is_checked() -> None:
    from kie_extend.config import load_settings
    from kie_extend.errors import ConfigError

    with pytest.raises(ConfigError, match="KIE_TENANT_LIMITS"):
        load_settings(_env_file=None, tenant_limits="svc a=5")
