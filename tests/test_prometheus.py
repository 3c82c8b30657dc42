"""A real Prometheus (Debian's ``prometheus`` package) with the shipped alert rules, scraping a real
``kie-extend serve`` on loopback. Run with ``make prometheus``.

The system is DevStack's: an embedded Valkey, the provider simulator, ``serve``, one Celery worker
and one beat. Prometheus listens on a free loopback port, scrapes serve's ``/metrics`` every second
and evaluates the rules every second. It loads ``deploy/prometheus/kie-extend-rules.yml`` twice:
as shipped, and as a copy whose ``for:`` durations are 1 s (group ``kie-extend-1s``), because the
shipped ones are minutes to hours long. The test checks:

- ``promtool check rules`` passes on the shipped file;
- every scrape target is up, and every rule of both groups evaluates without error;
- an operator pause made with ``kie-extend pause`` makes ``KieExtendOperatorPauseLong`` pending
  in the shipped group and firing in the 1 s copy, and both clear after ``kie-extend resume``; the
  jobs enqueued meanwhile are what the KEDA ScaledObject's Prometheus query (keda.yaml) returns;
- KIE's own pause, made for real (the simulator's account runs out of credits: 402), makes
  ``KieExtendProviderPaused`` pending / firing, and both clear once credits are back and the pause
  probe lifts it;
- the breaker, opened for real (the simulator fails every generation, threshold 1), makes
  ``KieExtendBreakerOpen`` pending / firing, and both clear once a probe job succeeds and closes
  it.

Debian's package is installed when missing (as root, non-interactive, bounded in time). Without
root and without the package, the test is skipped and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import Child, DevStack, _wait_http
from kie_extend.infra.embedded import free_port

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "kie-extend-rules.yml"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
#: The group of the copy with 1 s ``for:`` durations.
FAST = "kie-extend-1s"
#: Seconds any one wait below may take.
WAIT = 45.0


# -- what the run needs: Debian's prometheus --------------------------------------------------------

def _ensure_prometheus() -> None:
    """Install Debian's ``prometheus`` when missing (root, non-interactive, bounded). Services are
    kept from starting during the install (a policy-rc.d that refuses, when the machine has none),
    so nothing listens on :9090 afterwards."""
    if os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL):
        return
    if os.geteuid() != 0:
        pytest.skip(f"{PROMETHEUS} is not installed and installing it needs root: "
                    "sudo apt-get install -y prometheus, then make prometheus")
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.fail(f"{PROMETHEUS} is missing and this machine has no apt-get to install Debian's prometheus")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# written by kie-extend's tests/test_prometheus.py during apt-get\nexit 101\n")
        policy.chmod(0o755)
    try:
        install = [apt, "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", "prometheus"]
        for cmd in ([apt, "update", "-o", "DPkg::Lock::Timeout=120"], install):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            if out.returncode != 0 and cmd is install:
                pytest.fail(f"apt-get install prometheus failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    if not (os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL)):
        pytest.fail(f"prometheus was installed but {PROMETHEUS} or {PROMTOOL} is missing")


# -- the system and Prometheus ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """Valkey, simulator, serve, one worker and one beat; the breaker opens on one failed
    generation and lets a probe through after 6 s; a provider pause is probed every second."""
    _ensure_prometheus()
    workdir = tmp_path_factory.mktemp("prom-stack")
    env = {"KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "0.5s", "KIE_POLL_MAX_INTERVAL": "1s",
           "KIE_POLL_CALLBACK_INTERVAL": "1s", "KIE_TICK_INTERVAL": "0.5s", "KIE_HANDLERS": "redis_stream",
           "KIE_BREAKER_THRESHOLD": "1", "KIE_BREAKER_COOLDOWN": "6s", "KIE_REGENERATE": "0",
           "KIE_PAUSE_PROBE_INTERVAL": "1s"}
    with DevStack(workdir, key_prefix="prom", env=env) as st:
        st.start_simulator("--time-factor", "0.02", "--seed", "5")
        st.start_serve()
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def fast_copy(rules: dict[str, Any]) -> dict[str, Any]:
    """The shipped rules as one more group whose ``for:`` durations are 1 s."""
    rules = yaml.safe_load(yaml.safe_dump(rules))
    groups = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
        groups.append({**group, "name": FAST if len(rules["groups"]) == 1 else f"{group['name']}-1s"})
    return {"groups": groups}


@pytest.fixture(scope="module")
def prom(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping serve every second with both rule files; its URL."""
    workdir = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, workdir / RULES.name)
    (workdir / "fast-rules.yml").write_text(yaml.safe_dump(fast_copy(yaml.safe_load(RULES.read_text()))))
    target = stack.env["KIE_CALLBACK_BASE_URL"].removeprefix("http://")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [RULES.name, "fast-rules.yml"],
        "scrape_configs": [{"job_name": "kie-extend", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    child = Child("prometheus", [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                  {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}, workdir / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/-/ready", 30, child)  # it answers: 503 while it starts, then 200
        wait_for("Prometheus ready", lambda: requests.get(url + "/-/ready", timeout=2).status_code == 200, timeout=30)
        yield url
    finally:
        child.stop()
        if child.proc.returncode not in (0, -15):
            print((workdir / "prometheus.log").read_text()[-3000:], file=sys.stderr)


def api(prom: str, path: str) -> Any:
    r = requests.get(prom + "/api/v1/" + path, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


def rule_states(prom: str, alert: str) -> dict[str, str]:
    """``{group: state}`` of one alert (``inactive``, ``pending``, ``firing``) in every group that has it."""
    out = {}
    for group in api(prom, "rules?type=alert")["groups"]:
        for rule in group["rules"]:
            if rule["name"] == alert:
                out[group["name"]] = rule["state"]
    return out


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT, logs: DevStack | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    detail = ""
    if logs is not None:
        detail = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-1500:] for c in logs.children)
    raise AssertionError(f"not within {timeout:g} s: {what}{detail}")


def kie(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``kie-extend`` command with the stack's settings."""
    out = subprocess.run([sys.executable, "-m", "kie_extend.cli", *args], env=stack.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def request(stack: DevStack) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 10, "model": "V5", "style": "folk", "title": "Song"}


# -- the tests (file order: one system) -------------------------------------------------------------

def test_promtool_checks_the_shipped_rules() -> None:
    _ensure_prometheus()
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"SUCCESS: \d+ rules found", out.stdout), out.stdout


def test_the_1s_copy_changes_only_the_durations() -> None:
    shipped = yaml.safe_load(RULES.read_text())
    fast = fast_copy(shipped)
    for a, b in zip(shipped["groups"], fast["groups"]):
        assert len(a["rules"]) == len(b["rules"])
        for ra, rb in zip(a["rules"], b["rules"]):
            assert {**ra, "for": None} == {**rb, "for": None} and rb.get("for", "1s") == "1s"
    assert any(r.get("for") not in (None, "1s") for g in shipped["groups"] for r in g["rules"])


def test_targets_are_up_and_every_rule_evaluates(prom: str, stack: DevStack) -> None:
    def targets_up() -> bool:
        active = api(prom, "targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    wait_for("every scrape target up", targets_up, logs=stack)
    shipped = yaml.safe_load(RULES.read_text())
    expected = {g["name"] for g in shipped["groups"]} | {FAST}

    def evaluated() -> bool:
        groups = api(prom, "rules")["groups"]
        return ({g["name"] for g in groups} == expected and
                all(r["lastEvaluation"] > "2000" for g in groups for r in g["rules"]))

    wait_for("both rule groups loaded and evaluated", evaluated)
    for group in api(prom, "rules")["groups"]:
        assert len(group["rules"]) == len(shipped["groups"][0]["rules"]), group["name"]
        for rule in group["rules"]:
            assert rule["health"] == "ok", (group["name"], rule["name"], rule.get("lastError"))
    samples = api(prom, "query?query=kie_extend_paused")["result"]
    assert samples and samples[0]["value"][1] == "0", samples  # a real scrape of a real serve
    # Nothing is wrong yet: neither alert under test is pending or firing.
    for alert in ("KieExtendOperatorPauseLong", "KieExtendProviderPaused", "KieExtendBreakerOpen"):
        assert set(rule_states(prom, alert).values()) == {"inactive"}, alert


def keda_waiting_query() -> str:
    """The PromQL of the KEDA ScaledObject's prometheus trigger (deploy/kubernetes/base/keda.yaml)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / "keda.yaml").read_text()))
    so = next(d for d in docs if d and d["kind"] == "ScaledObject")
    return next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["query"]


def scalar(prom: str, query: str) -> list[float]:
    """The values of an instant query (KEDA's prometheus scaler wants exactly one)."""
    result = api(prom, "query?" + requests.compat.urlencode({"query": query}))["result"]
    return [float(r["value"][1]) for r in result]


def test_operator_pause_fires_and_clears(prom: str, stack: DevStack) -> None:
    """Also: jobs enqueued during the pause wait for a slot, and the KEDA trigger's query counts them."""
    alert = "KieExtendOperatorPauseLong"
    settings = stack.settings()
    query = keda_waiting_query()
    assert scalar(prom, query) == [0.0]
    kie(stack, "pause", "--reason", "prometheus test")
    try:
        jobs = [enqueue_extend(request(stack), settings=settings) for _ in range(3)]
        wait_for(f"{alert} firing in {FAST}", lambda: rule_states(prom, alert).get(FAST) == "firing")
        # The shipped rule (for: 2h) sees the same condition: pending.
        assert rule_states(prom, alert)["kie-extend"] == "pending"
        firing = [a for a in api(prom, "alerts")["alerts"] if a["labels"]["alertname"] == alert and a["state"] == "firing"]
        assert firing and firing[0]["labels"]["severity"] == "warning"
        wait_for("KEDA's query sees the 3 jobs waiting for a slot", lambda: scalar(prom, query) == [3.0], logs=stack)
    finally:
        kie(stack, "resume")
    wait_for(f"{alert} inactive in both groups", lambda: set(rule_states(prom, alert).values()) == {"inactive"})
    wait_for("the paused jobs ran", lambda: all(get_job(j, settings=settings)["state"] == "succeeded" for j in jobs),
             logs=stack)
    wait_for("KEDA's query back to 0", lambda: scalar(prom, query) == [0.0])


def test_breaker_open_fires_and_clears_after_recovery(prom: str, stack: DevStack) -> None:
    alert = "KieExtendBreakerOpen"
    settings = stack.settings()
    stack.sim_config(fault_generation_fail=1.0)
    try:
        bad = enqueue_extend(request(stack), settings=settings)
        wait_for("the failing job failed", lambda: get_job(bad, settings=settings)["state"] == "failed", logs=stack)
        assert get_job(bad, settings=settings)["error"]["kind"] == "generation_failed"
        wait_for(f"{alert} firing in {FAST}", lambda: rule_states(prom, alert).get(FAST) == "firing", logs=stack)
        assert rule_states(prom, alert)["kie-extend"] == "pending"  # the shipped rule's for: 5m
        value = api(prom, "query?query=kie_extend_breaker_open")["result"][0]["value"][1]
        assert value == "1"
    finally:
        stack.sim_config(fault_generation_fail=0.0)
    # Recovery: after the cooldown the next job goes through as the probe; it succeeds and closes
    # the breaker.
    probe = enqueue_extend(request(stack), settings=settings)
    wait_for("the probe job succeeded", lambda: get_job(probe, settings=settings)["state"] == "succeeded",
             logs=stack)
    wait_for(f"{alert} inactive in both groups", lambda: set(rule_states(prom, alert).values()) == {"inactive"})
    assert api(prom, "query?query=kie_extend_breaker_open")["result"][0]["value"][1] == "0"


def test_provider_pause_fires_and_clears(prom: str, stack: DevStack) -> None:
    alert = "KieExtendProviderPaused"
    settings = stack.settings()
    stack.sim_config(credits=0)
    try:
        job = enqueue_extend(request(stack), settings=settings)
        wait_for(f"{alert} firing in {FAST}", lambda: rule_states(prom, alert).get(FAST) == "firing", logs=stack)
        assert rule_states(prom, alert)["kie-extend"] == "pending"  # the shipped rule's for: 10m
        assert get_job(job, settings=settings)["state"] == "queued"  # refused for credits, not paid, waiting
    finally:
        stack.sim_config(credits=10000)
    wait_for("the job went through after the pause lifted",
             lambda: get_job(job, settings=settings)["state"] == "succeeded", logs=stack)
    wait_for(f"{alert} inactive in both groups", lambda: set(rule_states(prom, alert).values()) == {"inactive"})
