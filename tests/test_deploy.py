"""The monitoring kit in deploy/: the Prometheus rules pass ``promtool check rules`` and their unit
tests (``promtool test rules``), and every metric the Grafana dashboard and the rules query is one
that ``metrics.render`` really emits after real jobs ran (a real Valkey, the simulator over HTTP).

promtool comes from Debian's ``prometheus`` package; the test installs it when it is missing, so a
fresh CI machine runs these checks instead of skipping them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from inline import Harness
from kie_extend.infra.metrics import render
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "kie-extend.json"
RULES = ROOT / "deploy" / "prometheus" / "kie-extend-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "kie-extend-rules.test.yml"
METRIC = re.compile(r"\bkie_extend_[a-zA-Z0-9_]+")
#: The label lists of ``by (...)`` and ``without (...)`` in a PromQL expression.
_PROMQL_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _install_promtool() -> str | None:
    """promtool's path, installing Debian's ``prometheus`` package (non-interactive, bounded in
    time) when it is missing. None when it cannot be had."""
    found = shutil.which("promtool")
    if found or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", "prometheus"]
    for step in (install, ["apt-get", "update", "-o", "DPkg::Lock::Timeout=120"], install):
        try:
            subprocess.run(step, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=420, check=False)
        except subprocess.TimeoutExpired:
            break
        found = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def promtool() -> str:
    path = _install_promtool()
    if path is None:
        if shutil.which("apt-get") or os.environ.get("CI"):
            pytest.fail("promtool is missing and `apt-get install prometheus` did not provide it")
        pytest.skip("promtool is missing and this machine has no apt-get (install Prometheus' promtool)")
    return path


def test_rules_pass_promtool_check(promtool: str) -> None:
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    out = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """A rule changed under its unit test makes ``promtool test rules`` fail (the tests check
    something)."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    rules = RULES.read_text()
    assert "> 0.9\n" in rules
    (tmp_path / RULES.name).write_text(rules.replace("> 0.9\n", "> 0.99\n"))
    out = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout


def test_rules_cover_the_alerts_the_runbook_names() -> None:
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert {"KieExtendProviderPaused", "KieExtendOperatorPauseLong", "KieExtendBreakerOpen",
            "KieExtendDeadLettersGrowing", "KieExtendTickStalled", "KieExtendRedisMemoryNearMax",
            "KieExtendRedisEvictions"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    readme = (ROOT / "README.md").read_text()
    for name in alerts:
        assert f"`{name}`" in readme, f"README's alerts table lacks {name}"


# -- the metric names: what the dashboard and the rules query vs what render() emits ---------------

def refuse_event(event: dict[str, Any]) -> None:
    """A result handler that always fails (KIE_HANDLERS=callable:test_deploy:refuse_event)."""
    raise RuntimeError("receiver down")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=11, callbacks=False, rate_limit=1000))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rendered(sim: SimServer, valkey: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Metric name -> label names, from render() after real jobs: two succeed, one generation
    fails and opens the breaker (threshold 1), a failing handler dead-letters every event; tenant
    studio-a has a credit budget."""
    from kie_extend.config import Settings

    tenants = tmp_path_factory.mktemp("deploy") / "tenants.toml"
    tenants.write_text('[tenants.studio-a]\ntokens = ["studio-a-token-0123456789"]\nbudget = "1000/1d"\n')

    settings = Settings(_env_file=None, redis_url=valkey.url, key_prefix=f"dep{os.getpid()}x{time.time_ns() % 10**6}",
                        queue="deploy-test", api_key="test-key-0123456789", base_url=sim.url,
                        callback_base_url="http://127.0.0.1:9/unused", allow_private_urls=True,
                        handlers="redis_stream,callable:test_deploy:refuse_event", handler_max_attempts=1,
                        breaker_threshold=1, poll_first=0.2, poll_interval=0.2, poll_max_interval=0.3,
                        poll_min_gap=0.0, handler_retry_base=0.05, lease=5, tick_interval=0.1,
                        connect_timeout=1, read_timeout=3, poll_callback_interval=0.4,
                        tenants_file=str(tenants))
    h = Harness(Runtime(settings), sim)
    assert render(h.rt).count("kie_extend_last_tick_timestamp_seconds 0.000") == 1  # never ticked yet
    body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 3, "model": "V5", "style": "jazz", "title": "T"}
    good = [h.accept(dict(body), tenant="studio-a", priority=7) for _ in range(2)]
    h.run_until(lambda: all(h.finished(j)() for j in good), timeout=60)
    requests.post(sim.url + "/_sim/config", json={"fault_generation_fail": 1.0}, timeout=5).raise_for_status()
    try:
        bad = h.accept(dict(body))
        h.run_until(h.finished(bad), timeout=60)
    finally:
        requests.post(sim.url + "/_sim/config", json={"fault_generation_fail": 0.0}, timeout=5)
    assert h.state(bad)["state"] == "failed"
    h.run_until(lambda: h.rt.redis.llen(h.rt.keys.dead_letters) >= 3, timeout=30)
    h.rt.gates.pause_operator("deploy test: a job waits by priority and tenant")
    h.accept(dict(body), tenant="studio-b", priority=3)
    text = render(h.rt)
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
        names.setdefault(m.group(1), set()).update(labels)
    tick = float(re.search(r"^kie_extend_last_tick_timestamp_seconds (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert abs(time.time() - tick) < 30, "the tick's finish time is exported"
    return names


def _dashboard_targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((sub["title"], target))
    return out


def test_dashboard_parses_and_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["panels"], list)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    targets = _dashboard_targets(dash)
    assert len(targets) >= 20
    for title, target in targets:
        expr = target["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        assert METRIC.search(expr), (title, expr)


def test_dashboard_covers_the_operators_questions() -> None:
    """The figures the issue asks for each have a panel."""
    exprs = " ".join(t["expr"] for _, t in _dashboard_targets(json.loads(DASHBOARD.read_text())))
    for needed in ("kie_extend_jobs{", "kie_extend_submissions_total", "kie_extend_in_flight",
                   "kie_extend_max_in_flight", "kie_extend_rate_window_use", "kie_extend_waiting_jobs",
                   "kie_extend_paused", "kie_extend_operator_paused", "kie_extend_breaker_open",
                   "kie_extend_dead_letters", "histogram_quantile(0.99, sum by (le) (max without (instance) "
                   "(rate(kie_extend_poll_seconds_bucket", "kie_extend_time_to_result_seconds_bucket",
                   "kie_extend_redis_used_memory_bytes", "kie_extend_redis_maxmemory_bytes",
                   "kie_extend_redis_evicted_keys_total", "kie_extend_last_tick_timestamp_seconds"):
        assert needed in exprs, needed


def test_dashboard_queries_only_metrics_render_emits(rendered: dict[str, set[str]]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    for title, target in _dashboard_targets(dash):
        used = set(METRIC.findall(target["expr"]))
        missing = used - set(rendered)
        assert not missing, f"panel {title!r} queries {sorted(missing)}, which render() does not emit"
        # A legend like {{state}} names a label the queried series really carry.
        have = set().union(*(rendered[n] for n in used)) | {"job", "instance"}
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            assert label in have, f"panel {title!r}: legend label {label!r} is on none of {sorted(used)}"
        for group in _PROMQL_LABELS.findall(target["expr"]):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in have | {"le"}, f"panel {title!r}: groups by {label!r}, which no series has"


def test_rules_query_only_metrics_render_emits(rendered: dict[str, set[str]]) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            used = set(METRIC.findall(rule["expr"]))
            assert used, rule["alert"]
            missing = used - set(rendered)
            assert not missing, f"alert {rule['alert']} queries {sorted(missing)}, which render() does not emit"


def test_name_check_can_fail(rendered: dict[str, set[str]]) -> None:
    """The comparison above is not vacuous: a misspelt family is reported."""
    assert "kie_extend_submission_total" not in rendered
    assert {"kie_extend_submissions_total", "kie_extend_breaker_opened_total",
            "kie_extend_handler_dead_letters_total", "kie_extend_poll_seconds_bucket"} <= set(rendered)
    assert {"priority", "tenant"} <= rendered["kie_extend_waiting_jobs"]
