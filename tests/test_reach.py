"""Provider unreachable (admission/reach.py): connect failures and edge 5xx pause submission for everyone,
a credit probe (or any answer from KIE) resumes it, and no job fails or pays for an outage.

The decision logic runs on a real Valkey; the pipeline runs in this process against the simulator
over loopback (tests/inline.py); the whole system with a killed simulator is in test_outage.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from inline import FAST_SETTINGS, Harness, harness_factory, sample_request
from kie_extend import errors as E
from kie_extend.provider.client import KieClient
from kie_extend.config import load_settings
from kie_extend.errors import ConfigError
from kie_extend.store.keys import Keys
from kie_extend.infra.metrics import overview, render
from kie_extend.admission.reach import Reachability
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve

req = sample_request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def reach(rclient: redis.Redis, prefix: str) -> Reachability:
    return Reachability(rclient, Keys(prefix), threshold=3, window=0.5, probe_interval=0.2)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=1, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim, unreachable_threshold=3, unreachable_window=30,
                           unreachable_probe_interval=0.2)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "RETRY_BASE_SECONDS", 0.02)


# ----- the decision logic ---------------------------------------------------------------------------

def test_threshold_failures_within_the_window_make_it_unreachable(reach: Reachability) -> None:
    assert reach.state()["reachable"] and not reach.unreachable()
    assert not reach.failure("could not connect")
    assert not reach.failure("could not connect")
    st = reach.state()
    assert st["streak"] == 2 and st["reachable"] and st["last_error"] == "could not connect"
    assert reach.failure("HTTP 503 from an edge")
    st = reach.state()
    assert not st["reachable"] and st["state"] == "unreachable" and st["outages"] == 1
    assert st["since"] is not None and st["next_probe"] is not None and st["last_error"] == "HTTP 503 from an edge"
    assert not reach.failure("again")  # already unreachable: not opened twice
    assert reach.state()["outages"] == 1 and reach.state()["last_error"] == "again"


def test_failures_spread_wider_than_the_window_do_not_add_up(reach: Reachability) -> None:
    reach.failure("a")
    reach.failure("b")
    time.sleep(0.6)  # the window (0.5 s) from the first failure has passed: the count starts again
    assert not reach.failure("c")
    assert reach.state()["streak"] == 1 and reach.state()["reachable"]


def test_an_answer_clears_the_count_and_ends_an_outage(reach: Reachability, rclient: redis.Redis,
                                                        prefix: str) -> None:
    reach.failure("a")
    reach.failure("b")
    assert not reach.answered()  # this process met the failures: the count is cleared
    assert reach.state()["streak"] == 0
    reach.failure("a")
    reach.failure("b")
    assert reach.failure("c")  # the third within the window: unreachable
    # Another process that never met a failure costs no round trip and ends nothing...
    other = Reachability(rclient, Keys(prefix), threshold=3, window=0.5, probe_interval=0.2)
    assert not other.answered() and reach.unreachable()
    # ...the probe always asks, and ends the outage.
    assert other.answered("probe")
    st = reach.state()
    assert st["reachable"] and st["since"] is None and st["recovered"] is not None
    assert st["last_outage_seconds"] is not None and st["last_outage_seconds"] >= 0


def test_one_probe_turn_per_interval_across_callers(reach: Reachability, rclient: redis.Redis,
                                                    prefix: str) -> None:
    assert not reach.probe_turn()  # reachable: nothing to probe
    for _ in range(3):
        reach.failure("refused")
    other = Reachability(rclient, Keys(prefix), threshold=3, window=0.5, probe_interval=0.2)
    assert not reach.probe_turn() and not other.probe_turn()  # the first probe is an interval away
    time.sleep(0.25)
    turns = [r.probe_turn() for r in (reach, other, reach, other)]
    assert turns.count(True) == 1
    reach.probe_failed("still refused")
    assert reach.state()["last_probe_error"] == "still refused" and reach.state()["last_probe"] is not None


def test_which_errors_mean_unreachable_and_which_cost_nothing() -> None:
    refused = E.ConnectError("could not connect")
    assert E.is_unreachable(refused) and E.costs_nothing(refused)
    for code in (503, 521, 522, 523, 525, 526, 530):
        assert E.is_unreachable(E.EdgeError(code)) and E.costs_nothing(E.EdgeError(code)), code
    for code in (502, 504, 520, 524):  # the edge may have handed the request on: attempts still count
        assert E.is_unreachable(E.EdgeError(code)) and not E.costs_nothing(E.EdgeError(code)), code
    timeout = E.OutcomeUnknownError("read timeout")  # no answer, but it may have reached KIE
    assert E.is_unreachable(timeout) and not E.costs_nothing(timeout)
    for exc in (E.UnavailableError(500, "x"), E.UnavailableError(503, "x"), E.RateLimitedError(429),
                E.AccountError(402), E.InvalidRequestError(422)):  # answers from KIE itself
        assert not E.is_unreachable(exc) and not E.costs_nothing(exc), exc
    edge = E.EdgeError(503, "m")
    assert isinstance(edge, E.UnavailableError) and edge.retryable
    import pickle

    assert type(pickle.loads(pickle.dumps(edge))) is E.EdgeError  # Celery can rebuild it


@pytest.mark.parametrize("name,value", [("KIE_UNREACHABLE_WINDOW", "0s"), ("KIE_UNREACHABLE_PROBE_INTERVAL", "0"),
                                        ("KIE_UNREACHABLE_THRESHOLD", "0"), ("KIE_UNREACHABLE_WINDOW", "soon")])
def test_settings_are_validated(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


# ----- the client over loopback -----------------------------------------------------------------------

@pytest.mark.parametrize("status", [502, 503, 504, 522])
def test_edge_answers_from_the_simulator_are_edge_errors(sim: SimServer, status: int) -> None:
    sim.simulator.update_config({"fault_edge": 1.0, "edge_status": status})
    client = KieClient(sim.url, "k", connect_timeout=1, read_timeout=3)
    for call in (lambda: client.submit_extend(req(sim)), lambda: client.record_info("t"), client.credits):
        with pytest.raises(E.EdgeError) as info:
            call()
        assert info.value.code == status and "<html>" not in str(info.value)
    assert sim.simulator.stats_snapshot()["submissions_accepted"] == 0  # KIE never saw it


def test_the_edge_knob_takes_only_5xx() -> None:
    with pytest.raises(ValueError, match="edge_status"):
        SimConfig(edge_status=200).check()


# ----- the pipeline ------------------------------------------------------------------------------------

def _settle(h: Harness, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        h.scheduler.tick()
        h.drain()
        time.sleep(0.05)


def test_connection_refused_pauses_then_a_probe_resumes_and_nothing_fails(make_settings: Callable[..., Any]) -> None:
    """KIE is down (nothing listens): jobs wait in queued with no attempt spent, status says why;
    KIE comes back on the same address: the probe resumes submission and every job succeeds once."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(base_url=url, **FAST_SETTINGS, unreachable_threshold=3, unreachable_window=30,
                             unreachable_probe_interval=0.2, max_submit_attempts=2)
    rt = Runtime(settings)
    h = Harness(rt, None)  # type: ignore[arg-type]
    body = {"uploadUrl": f"{url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 3, "model": "V5", "style": "jazz", "title": "T"}
    jobs = [h.accept(body) for _ in range(5)]
    _settle(h, 1.0)
    assert not rt.reach.state()["reachable"]
    for job in jobs:
        raw = h.state(job)
        assert raw["state"] == "queued" and int(raw.get("attempts") or 0) == 0, raw
    ov = overview(rt)
    assert ov["provider"]["reachable"] is False and "could not connect" in ov["provider"]["last_error"]
    assert "kie_extend_provider_reachable 0" in render(rt)
    late = h.accept(body)  # a job that arrives during the outage waits too, without a try
    assert h.state(late)["state"] == "queued" and int(h.state(late).get("attempts") or 0) == 0
    jobs.append(late)
    with serve(SimConfig(time_factor=0.02, seed=2, callbacks=False), port=port) as sim:
        h.sim = sim
        h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
        for job in jobs:
            raw = h.state(job)
            assert raw["state"] == "succeeded" and raw["attempts"] == "1" and not raw.get("retried"), raw
        assert rt.reach.state()["reachable"] and "kie_extend_provider_reachable 1" in render(rt)
        assert sim.simulator.stats_snapshot()["submissions_accepted"] == len(jobs)


def test_edge_503_pauses_submission_and_polls_outlive_the_job_timeout(harness: Callable[..., Harness]) -> None:
    """An edge answers 503 for KIE: submitted jobs keep being polled (and are not timed out while
    KIE cannot be asked), new jobs wait in queued; when KIE answers again, everything succeeds."""
    h = harness(job_timeout=1.0, max_submit_attempts=1)
    h.sim.simulator.update_config({"complete_seconds": 150})  # 3 s at this time factor
    sent = h.accept(req(h.sim))
    h.run_until(lambda: h.state(sent).get("state") == "submitted")
    h.sim.simulator.update_config({"fault_edge": 1.0, "edge_status": 503})
    waiting = [h.accept(req(h.sim)) for _ in range(4)]
    _settle(h, 4.0)  # longer than KIE_JOB_TIMEOUT and the generation itself
    assert not h.rt.reach.state()["reachable"]
    assert h.state(sent)["state"] == "submitted"  # polls fail at the edge: never timed out
    for job in waiting:
        raw = h.state(job)
        assert raw["state"] == "queued" and int(raw.get("attempts") or 0) == 0, raw
    # KIE answers again; the jobs that waited generate within KIE_JOB_TIMEOUT (0.4 s here).
    h.sim.simulator.update_config({"fault_edge": 0.0, "text_seconds": 5, "first_seconds": 10, "complete_seconds": 20})
    h.run_until(lambda: all(h.finished(j)() for j in [sent, *waiting]), timeout=60)
    for job in [sent, *waiting]:
        assert h.state(job)["state"] == "succeeded", h.state(job)


def test_edge_502_counts_attempts_but_still_pauses(harness: Callable[..., Harness]) -> None:
    """A 502 may have been handed on to KIE: the attempt counts (never-pay-twice), but the outage
    still pauses submission, so jobs do not burn KIE_MAX_SUBMIT_ATTEMPTS and fail."""
    h = harness(max_submit_attempts=5)
    h.sim.simulator.update_config({"fault_edge": 1.0, "edge_status": 502})
    jobs = [h.accept(req(h.sim)) for _ in range(4)]
    _settle(h, 2.0)
    assert not h.rt.reach.state()["reachable"]
    attempts = [int(h.state(j).get("attempts") or 0) for j in jobs]
    assert all(h.state(j)["state"] == "queued" for j in jobs)
    assert sum(attempts) <= 4, attempts  # the sends that met the outage, then nothing more
    h.sim.simulator.update_config({"fault_edge": 0.0})
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
    assert all(h.state(j)["state"] == "succeeded" for j in jobs)


def test_read_timeouts_stay_outcome_unknown_and_a_hung_kie_pauses(harness: Callable[..., Harness]) -> None:
    """A submission that went out and got no answer may be paid for: never resent, it ends
    submit_outcome_unknown as before. But a run of them pauses submission, so a KIE that hangs does
    not swallow every new job: the jobs after the threshold wait unsent and succeed later."""
    h = harness(read_timeout=0.5, submit_unknown_window=0.5)
    h.sim.simulator.update_config({"fault_slow": 1.0, "slow_seconds": 1.5})
    jobs = [h.accept(req(h.sim)) for _ in range(5)]
    sent, held = jobs[:3], jobs[3:]
    for job in sent:
        raw = h.state(job)
        assert raw["state"] == "submitting" and raw.get("outcome_unknown") == "1", raw
    assert not h.rt.reach.state()["reachable"] and "read timeout" in h.rt.reach.state()["last_error"]
    for job in held:
        assert h.state(job)["state"] == "queued" and int(h.state(job).get("attempts") or 0) == 0
    h.sim.simulator.update_config({"fault_slow": 0.0})
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
    for job in sent:
        assert json.loads(h.state(job)["error"])["kind"] == "submit_outcome_unknown"
    for job in held:
        assert h.state(job)["state"] == "succeeded"
    assert h.sim.simulator.stats_snapshot()["submissions_accepted"] == 5  # each sent once, never again


def test_kie_500_with_its_envelope_still_ends_provider_unavailable(harness: Callable[..., Harness]) -> None:
    """KIE itself answering 500 is not an outage of the connection: attempts are bounded and the
    job ends provider_unavailable, and the provider counts as reachable throughout."""
    h = harness(max_submit_attempts=2)
    h.sim.simulator.update_config({"fault_500": 1.0})
    job = h.accept(req(h.sim))
    h.run_until(h.finished(job))
    err = json.loads(h.state(job)["error"])
    assert err["kind"] == "provider_unavailable" and err["code"] == 500
    assert h.rt.reach.state()["reachable"]


def test_a_blip_below_the_threshold_costs_no_attempt_and_no_pause(harness: Callable[..., Harness]) -> None:
    h = harness(max_submit_attempts=1)
    h.sim.simulator.update_config({"fault_edge": 1.0, "edge_status": 503})
    job = h.accept(req(h.sim))
    assert h.state(job)["state"] == "queued" and int(h.state(job).get("attempts") or 0) == 0
    assert h.rt.reach.state()["streak"] == 1 and h.rt.reach.state()["reachable"]
    h.sim.simulator.update_config({"fault_edge": 0.0})
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert raw["state"] == "succeeded" and raw["attempts"] == "1"
    assert h.rt.reach.state()["streak"] == 0  # the answer cleared the count


# ----- where it shows: the dashboard and the CLI -----------------------------------------------------

def test_dashboard_and_status_show_kie_unreachable(make_settings: Callable[..., Any]) -> None:
    import os
    import re
    import subprocess
    import sys

    import requests

    from dash_server import ServedApp
    from kie_extend.http.app import create_app

    settings = make_settings(base_url="http://127.0.0.1:9", api_tokens="admin-token")
    rt = Runtime(settings)
    app = ServedApp(create_app(settings, parts=("dashboard",)))
    try:
        s = requests.Session()
        s.post(app.url + "/login", data={"token": "admin-token", "next": "/"}, headers={"Origin": app.url})

        def reach_cell() -> str:
            html = s.get(app.url + "/", timeout=10).text
            m = re.search(r'<dd id="provider-reach">(.*?)</dd>', html, re.S)
            assert m, html[:2000]
            return m.group(1)

        assert ">yes<" in reach_cell()
        for _ in range(3):
            rt.reach.failure("could not connect to http://127.0.0.1:9")
        cell = reach_cell()
        assert "unreachable" in cell and "could not connect" in cell and "next probe in" in cell
    finally:
        app.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": settings.redis_url, "KIE_KEY_PREFIX": settings.key_prefix,
                "KIE_BASE_URL": "http://127.0.0.1:9"})
    out = subprocess.run([sys.executable, "-m", "kie_extend.cli", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("submission:"))
    assert re.fullmatch(r"submission:  PAUSED: provider unreachable since \S+Z, last error: could not connect to "
                        r"http://127\.0\.0\.1:9, next probe in \d+ s", line), out.stdout + out.stderr
    js = subprocess.run([sys.executable, "-m", "kie_extend.cli", "status", "--json"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert json.loads(js.stdout)["provider"]["reachable"] is False
    resumed = subprocess.run([sys.executable, "-m", "kie_extend.cli", "resume"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert "KIE cannot be reached, so submission still waits" in resumed.stdout, resumed.stdout + resumed.stderr
