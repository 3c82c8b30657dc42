"""A provider outage against the whole system: real Valkey, Celery worker and beat processes,
``kie-extend serve`` and the simulator, which is killed (connections refused) while jobs arrive and
started again on the same port. No job may fail, be retried or be paid for twice; ``kie-extend
status``, ``/v1/system`` and ``/metrics`` must say KIE is unreachable while it is.

The simulator keeps its tasks in memory only, so the jobs sent before the outage are finished
before it is killed; the ones under test arrive during the outage.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from kie_extend.api import enqueue_many, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.store.keys import Keys

TOKEN = "outage-test-token-5d1c"
ENV = {
    "KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s", "KIE_POLL_CALLBACK_INTERVAL": "2s",
    "KIE_TICK_INTERVAL": "0.5s", "KIE_LEASE": "8s", "KIE_READ_TIMEOUT": "5s", "KIE_CONNECT_TIMEOUT": "1s",
    "KIE_HANDLERS": "redis_stream",
    # Today's limit would fail a job after two refused connections; the outage must cost none.
    "KIE_MAX_SUBMIT_ATTEMPTS": "2",
    "KIE_UNREACHABLE_THRESHOLD": "3", "KIE_UNREACHABLE_WINDOW": "30s", "KIE_UNREACHABLE_PROBE_INTERVAL": "1s",
}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    with DevStack(tmp_path, key_prefix=f"outage{uuid.uuid4().hex[:6]}", env=ENV) as st:
        st.start_simulator("--time-factor", "0.02", "--seed", "4")
        st.start_serve(tokens=TOKEN)
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def _requests(stack: DevStack, n: int, tag: str) -> list[dict]:
    return [{"request": {"uploadUrl": f"{stack.sim_url}/files/source/40s.mp3", "defaultParamFlag": True,
                         "instrumental": True, "continueAt": 5 + i, "model": "V5", "style": "rock",
                         "title": f"{tag} {i}"}} for i in range(n)]


def _wait_terminal(stack: DevStack, ids: list[str], timeout: float) -> dict[str, dict]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    recs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in ids}
        if all(r["state"] in ("succeeded", "failed", "cancelled") for r in recs.values()):
            return recs
        time.sleep(0.5)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text(errors="replace")[-2000:] for c in stack.children)
    raise AssertionError(f"not finished: {Counter(r['state'] for r in recs.values())}\n{logs}")


def _views(stack: DevStack, serve_url: str) -> dict[str, bool]:
    """What `kie-extend status`, /v1/system and /metrics say right now."""
    out = subprocess.run([sys.executable, "-m", "kie_extend.cli", "status"], env=stack.env, capture_output=True,
                         text=True, timeout=60)
    system = requests.get(serve_url + "/v1/system", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    metrics = requests.get(serve_url + "/metrics", timeout=10).text
    return {"status": "PAUSED: provider unreachable since" in out.stdout and "submission:  open" not in out.stdout,
            "system": system["provider"]["reachable"] is False and bool(system["provider"]["last_error"]),
            "metrics": "kie_extend_provider_reachable 0" in metrics}


def run_outage(stack: DevStack, outage: float, arriving: int) -> None:
    settings = stack.settings()
    serve_url = stack.env["KIE_CALLBACK_BASE_URL"]
    before = enqueue_many(_requests(stack, 3, "before"), settings=settings)
    _wait_terminal(stack, before, 90)
    sim = next(c for c in stack.children if c.name == "simulator")
    sim.kill9()  # KIE is gone: every connection is refused
    started = time.monotonic()
    arrived: list[str] = []
    seen: Counter[str] = Counter()
    while time.monotonic() - started < outage:
        if len(arrived) < arriving:
            arrived += enqueue_many(_requests(stack, 2, f"during {len(arrived)}"), settings=settings)
        if time.monotonic() - started > 3:  # past the threshold of refused connections
            for view, ok in _views(stack, serve_url).items():
                seen[view] += ok
        time.sleep(1.0)
    recs = {j: get_job(j, settings=settings) for j in arrived}
    assert Counter(r["state"] for r in recs.values()) == {"queued": len(arrived)}, recs
    assert seen["status"] and seen["system"] and seen["metrics"], seen
    sim.restart()  # the same command: the same port
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{stack.sim_url}/_sim/stats", timeout=1)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline, "the simulator did not come back"
            time.sleep(0.2)
    recs = _wait_terminal(stack, arrived, 120)
    assert Counter(r["state"] for r in recs.values()) == {"succeeded": len(arrived)}, recs
    r = redis.Redis.from_url(stack.redis_url)
    keys = Keys(settings.key_prefix)
    for job in arrived:
        raw = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job)).items()}
        assert raw["attempts"] == "1" and not raw.get("retried"), raw  # the outage spent no attempt
    by_url = stack.sim_stats()["submissions_by_callback_url"]
    assert all(by_url.get(f"{serve_url}/kie/callback/{j}") == 1 for j in arrived), by_url  # paid once each
    assert _views(stack, serve_url) == {"status": False, "system": False, "metrics": False}


def test_a_short_outage_fails_no_job(stack: DevStack) -> None:
    """Killed for 10 s while jobs arrive; started again: every job succeeds at its first attempt."""
    run_outage(stack, outage=10.0, arriving=6)


@pytest.mark.chaos
def test_a_45_second_outage_fails_no_job(stack: DevStack) -> None:
    """The issue's scenario: the provider stopped for 45 s while jobs keep arriving."""
    run_outage(stack, outage=45.0, arriving=20)
