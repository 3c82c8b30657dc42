"""The domain code without Celery: a real Valkey, the simulator over HTTP, and an inline dispatcher
that runs follow-up work in this process (the Celery dispatcher is exercised by the e2e tests)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from inline import Harness, harness_factory, sample_request
from kie_extend.simulator import SimConfig, SimServer, serve


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=1, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim)


req = sample_request


def test_happy_path_inline(harness: Callable[..., Harness]) -> None:
    h = harness()
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert raw["state"] == "succeeded" and len(json.loads(raw["tracks"])) == 2
    h.run_until(lambda: json.loads(h.state(job)["handler:redis_stream"])["state"] == "delivered")


def test_missing_callback_url_fails_with_both_fixes_named(harness: Callable[..., Harness]) -> None:
    h = harness(callback_base_url=None)
    job = h.accept(req(h.sim))
    err = json.loads(h.state(job)["error"])
    assert err["kind"] == "invalid_request"
    assert "KIE_CALLBACK_BASE_URL" in err["errors"][0]["message"] and "callBackUrl" in err["errors"][0]["message"]


def test_generation_failure_and_opt_in_regeneration(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sim.simulator.update_config({"fault_generation_fail": 1.0})
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    assert json.loads(h.state(job)["error"])["kind"] == "generation_failed"

    h2 = harness(regenerate=1)
    job2 = h2.accept(req(h2.sim))
    h2.run_until(lambda: int(h2.state(job2).get("regenerations") or 0) == 1)
    h2.sim.simulator.update_config({"fault_generation_fail": 0.0})
    h2.run_until(h2.finished(job2))
    assert h2.state(job2)["state"] == "succeeded"
    assert int(h2.state(job2)["sends"]) == 2  # the regeneration was a second, deliberate, submission


def test_job_timeout(harness: Callable[..., Harness]) -> None:
    h = harness(job_timeout=0.5)
    h.sim.simulator.update_config({"complete_seconds": 10_000, "first_seconds": 5000, "text_seconds": 10})
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    assert json.loads(h.state(job)["error"])["kind"] == "timed_out"


def test_unknown_outcome_is_never_resent_then_fails_then_operator_retry(harness: Callable[..., Harness]) -> None:
    h = harness(submit_unknown_window=0.5)
    h.sim.simulator.update_config({"fault_drop_after_accept": 1.0})
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert json.loads(raw["error"])["kind"] == "submit_outcome_unknown"
    assert h.sim.simulator.stats_snapshot()["submissions_accepted"] == 1  # sent once, never again
    h.sim.simulator.update_config({"fault_drop_after_accept": 0.0})
    assert h.pipeline.retry(job)
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "succeeded"
    assert h.sim.simulator.stats_snapshot()["submissions_accepted"] == 2


def test_retryable_codes_back_off_then_give_up(harness: Callable[..., Harness]) -> None:
    h = harness(max_submit_attempts=3, maintenance_backoff=0.01)
    h.sim.simulator.update_config({"fault_455": 1.0})
    import kie_extend.errors as errors_module

    saved = errors_module.RETRY_BASE_SECONDS
    errors_module.RETRY_BASE_SECONDS = 0.01
    try:
        job = h.accept(req(h.sim))
        h.run_until(h.finished(job))
    finally:
        errors_module.RETRY_BASE_SECONDS = saved
    raw = h.state(job)
    err = json.loads(raw["error"])
    assert err["kind"] == "provider_unavailable" and err["code"] == 455 and int(raw["attempts"]) == 3


def test_permanent_codes_fail_at_once(harness: Callable[..., Harness]) -> None:
    h = harness()
    job = h.accept(req(h.sim, uploadUrl=f"{h.sim.url}/uploads/never-uploaded.mp3"))  # provider answers 451
    raw = h.state(job)
    assert raw["state"] == "failed" and json.loads(raw["error"])["kind"] == "rejected"
    assert int(raw["attempts"]) == 1


def test_401_pauses_without_failing_and_probe_resumes(harness: Callable[..., Harness]) -> None:
    h = harness(pause_probe_interval=0.1)
    h.sim.simulator.update_config({"api_key": "another-key"})
    job = h.accept(req(h.sim))
    assert h.state(job)["state"] == "queued"
    assert h.rt.gates.paused()["code"] == "401"
    job2 = h.accept(req(h.sim))
    assert h.state(job2)["state"] == "queued"  # parked, not sent: the gate is closed
    h.scheduler.tick()
    assert h.rt.gates.paused() is not None  # the probe still fails
    h.sim.simulator.update_config({"api_key": None})
    h.run_until(lambda: h.finished(job)() and h.finished(job2)())
    assert h.state(job)["state"] == h.state(job2)["state"] == "succeeded"


def test_failing_handler_is_retried_then_dead_lettered_and_replayed(harness: Callable[..., Harness]) -> None:
    h = harness(handlers=["redis_stream", "callable:tests_flaky_handler:fail"], handler_max_attempts=3)
    import sys
    import types

    calls: list[str] = []
    mod = types.ModuleType("tests_flaky_handler")
    state = {"fail": True}

    def fail(event: dict[str, Any]) -> None:
        calls.append(event["job_id"])
        if state["fail"]:
            raise RuntimeError("receiver down")

    mod.fail = fail  # type: ignore[attr-defined]
    sys.modules["tests_flaky_handler"] = mod
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    h.run_until(lambda: json.loads(h.state(job)["handler:callable:tests_flaky_handler:fail"])["state"] == "dead")
    assert json.loads(h.state(job)["handler:redis_stream"])["state"] == "delivered"  # not blocked
    assert len(calls) == 3
    dead = h.delivery.dead_letters()
    assert dead[0]["job_id"] == job and dead[0]["attempts"] == 3 and "receiver down" in dead[0]["error"]
    state["fail"] = False
    assert h.delivery.replay(job) == 1
    h.run_until(lambda: json.loads(h.state(job)["handler:callable:tests_flaky_handler:fail"])["state"] == "delivered")
    assert h.delivery.dead_letters() == []
    assert h.state(job)["state"] == "succeeded"


def test_in_flight_cap_parks_jobs_in_redis(harness: Callable[..., Harness]) -> None:
    h = harness(max_in_flight=2)
    jobs = [h.accept(req(h.sim)) for _ in range(5)]
    states = [h.state(j)["state"] for j in jobs]
    assert states.count("submitted") == 2 and states.count("queued") == 3
    assert h.rt.admission.waiting() == {"5": {"default": 3}}  # waiting in their ready queue
    peak = 0

    def done() -> bool:
        nonlocal peak
        peak = max(peak, h.rt.gates.in_flight())
        return all(h.finished(j)() for j in jobs)

    h.run_until(done)
    assert peak <= 2 and all(h.state(j)["state"] == "succeeded" for j in jobs)


def test_steps_after_the_script_cache_was_emptied(harness: Callable[..., Harness]) -> None:
    """A new job's record and its admission go out in one round trip, and a due step reads its record
    and claims its poll in one: after SCRIPT FLUSH (what a Redis restart does) each is loaded again."""
    h = harness()
    h.rt.redis.script_flush()
    job = h.accept(req(h.sim))
    assert h.state(job)["state"] in ("submitting", "submitted")
    h.rt.redis.script_flush()
    h.run_until(h.finished(job))
    assert h.state(job)["state"] == "succeeded" and int(h.state(job)["polls"]) >= 1


def test_a_redelivered_message_changes_nothing(harness: Callable[..., Harness]) -> None:
    """The first write of a new job expects no record, so a second delivery of its message (no read
    up front) finds the job and leaves it as it is; an idempotency duplicate's pointer counts as a record."""
    h = harness()
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    before = h.state(job)
    h.pipeline.accept(job, req(h.sim))
    h.pipeline.accept(job, {"bad": "request"})  # another request under the same id
    after = h.state(job)
    assert after["state"] == "succeeded" and after["state_ts"] == before["state_ts"]
    assert int(h.rt.redis.hget(h.rt.keys.stats, "jobs_accepted") or 0) == 1
    assert int(h.rt.redis.hget(h.rt.keys.stats, "job_id_conflicts") or 0) == 1
    h.rt.redis.hset(h.rt.keys.job("pointer-1"), mapping={"job_id": "pointer-1", "duplicate_of": job})
    h.pipeline.accept("pointer-1", req(h.sim))
    assert h.state("pointer-1").get("state") is None
