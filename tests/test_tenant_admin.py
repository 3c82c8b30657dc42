"""Run-time tenant settings, audit entries and the strictness rules over the real HTTP API
(``PUT /v1/tenants/{t}``, ``GET /v1/audit``), the real ``kie-extend`` command, and a real
serve + worker + beat applying a weight changed while they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from kie_extend.api import enqueue_many, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.config import Settings
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.intake import check_message
from kie_extend.jobs.states import JobState

from test_tenants import (ADMIN, BLOG, ENV, SHOP, SHOP_READ, Api, _no_secret, _submit, api, req_body,  # noqa: F401
                          sim, tenants_file)


# ----- PUT /v1/tenants/{tenant} and GET /v1/audit --------------------------------------------------

def test_put_tenant_is_admin_only_and_checked(api: Api) -> None:  # noqa: F811
    for token in (SHOP, BLOG, SHOP_READ):
        r = api.call("PUT", "/v1/tenants/shop", token, json={"weight": 5})
        assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden", r.text
        assert api.call("GET", "/v1/audit", token).status_code == 403
    r = api.call("PUT", "/v1/tenants/invented", ADMIN, json={"weight": 5})
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    r = api.call("PUT", "/v1/tenants/shop", ADMIN, json={"weight": 0, "rate": "fast", "budget": "lots"})
    assert r.status_code == 422 and {e["field"] for e in r.json()["error"]["errors"]} == {"weight", "rate", "budget"}
    r = api.call("PUT", "/v1/tenants/shop", ADMIN, json={"weigth": 3})
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "weigth"
    assert api.call("PUT", "/v1/tenants/shop", ADMIN, json={}).status_code == 422
    assert api.call("PUT", "/v1/tenants/shop", ADMIN, json=[1]).status_code == 422
    assert api.call("GET", "/v1/audit", ADMIN).json() == {"entries": []}  # nothing was changed so far

    r = api.call("PUT", "/v1/tenants/shop", ADMIN, json={"weight": 5, "budget": "100/1h"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changes"] == [{"field": "weight", "old": 2, "new": 5},
                               {"field": "budget", "old": "2000/1d", "new": "100/1h"}]
    assert body["tenant"]["weight"] == 5 and body["tenant"]["overridden"] == ["weight", "budget"]
    listed = {t["name"]: t for t in api.call("GET", "/v1/tenants", ADMIN).json()["tenants"]}
    assert listed["shop"]["weight"] == 5 and listed["shop"]["budget"] == "100/1h"
    assert listed["blog"]["overridden"] == [] and listed["blog"]["weight"] == 1
    r = api.call("PUT", "/v1/tenants/shop", ADMIN, json={"weight": "default", "rate": "none"})
    assert r.json()["changes"] == [{"field": "weight", "old": 5, "new": 2},
                                   {"field": "rate", "old": "5/10s", "new": None}]

    entries = api.call("GET", "/v1/audit?limit=5", ADMIN).json()["entries"]
    assert [e["action"] for e in entries] == ["tenant.set", "tenant.set"]
    newest = entries[0]
    assert (newest["who"], newest["via"], newest["target"]) == ("admin", "api", "shop")
    assert newest["old"] == {"weight": 5, "rate": "5/10s"} and newest["new"] == {"weight": 2, "rate": None}
    assert entries[1]["new"] == {"weight": 5, "budget": "100/1h"}
    _no_secret(json.dumps(entries))


def test_pause_and_resume_are_audited(api: Api) -> None:  # noqa: F811
    assert api.call("POST", "/v1/pause", ADMIN, json={"reason": "maintenance"}).status_code == 200
    assert api.call("POST", "/v1/resume", ADMIN).status_code == 200
    entries = api.call("GET", "/v1/audit", ADMIN).json()["entries"]
    assert [e["action"] for e in entries] == ["resume", "pause"]
    assert entries[1]["old"] is None and entries[1]["new"]["reason"] == "maintenance"
    assert entries[0]["old"]["reason"] == "maintenance" and entries[0]["new"] is None
    assert all(e["who"] == "admin" and e["via"] == "api" for e in entries)
    _no_secret(json.dumps(entries))


def test_dashboard_pause_and_python_resume_are_audited(make_settings: Any, sim: Any,  # noqa: F811
                                                       tenants_file: Path) -> None:  # noqa: F811
    import re

    from dash_server import ServedApp
    from inline import Harness
    from kie_extend.api import resume
    from kie_extend.http.app import create_app

    settings = make_settings(api_tokens=ADMIN, tenants_file=str(tenants_file), base_url=sim.url)
    rt = Runtime(settings)
    app = ServedApp(create_app(settings, runtime=rt, dispatcher=Harness(rt, sim).dispatch))
    try:
        s = requests.Session()
        s.post(app.url + "/login", data={"token": ADMIN, "next": "/"}, headers={"Origin": app.url})
        csrf = re.search(r'name="csrf" value="([^"]+)"', s.get(app.url + "/").text).group(1)  # type: ignore[union-attr]
        r = s.post(app.url + "/pause", data={"csrf": csrf, "reason": "from the page"}, headers={"Origin": app.url},
                   allow_redirects=False)
        assert r.status_code in (200, 303) and rt.gates.operator_paused()
        assert resume(settings=settings) is True
    finally:
        app.stop()
    from kie_extend.tenants import audit

    entries = audit.recent(rt.redis, rt.keys)
    assert [(e["action"], e["via"]) for e in entries] == [("resume", "python"), ("pause", "dashboard")]
    assert entries[1]["who"] == "admin" and entries[1]["new"]["reason"] == "from the page"
    assert entries[0]["who"].startswith("python:")
    _no_secret(json.dumps(entries))


def test_a_tenant_names_only_job_ids_of_its_own(api: Api) -> None:  # noqa: F811
    """A tenant's explicit job ids live under ``<tenant>.``: another tenant cannot name them, so
    the answer is the same whether such an id exists or not (no 409 revealing it)."""
    taken = f"shop.{uuid.uuid4().hex[:8]}"
    assert _submit(api, SHOP, job_id=taken) == taken
    r = api.call("POST", "/v1/jobs", SHOP, json={"request": req_body(api), "job_id": f"blog.{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "job_id"
    free = f"shop.{uuid.uuid4().hex[:8]}"
    answers = [api.call("POST", "/v1/jobs", BLOG, json={"request": req_body(api), "job_id": i}) for i in (taken, free)]
    assert [a.status_code for a in answers] == [422, 422]
    assert answers[0].text.replace(taken, "ID") == answers[1].text.replace(free, "ID")
    r = api.call("POST", "/v1/jobs", BLOG, json={"jobs": [{"request": req_body(api), "job_id": "x1"}]})
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "[0].job_id"
    # Its own id again, same submission: idempotent as before; an admin may use any id.
    r = api.call("POST", "/v1/jobs", SHOP, json={"request": req_body(api), "job_id": taken})
    assert r.status_code in (202, 409)
    assert _submit(api, ADMIN, job_id=f"free-{uuid.uuid4().hex[:8]}", tenant="blog")


def test_strict_mode_runs_no_tenant_as_the_default_only_when_declared(tmp_path: Path, make_settings: Any) -> None:
    body = {"uploadUrl": "https://example.com/a.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 5, "model": "V5", "style": "rock", "title": "T", "callBackUrl": "https://example.com/cb"}
    path = tmp_path / "t.toml"
    path.write_text("[tenants.shop]\n")
    strict = make_settings(tenants_file=str(path), tenants_strict=True)
    out = check_message(body, settings=strict)
    assert [p["field"] for p in out.problems] == ["tenant"] and "KIE_DEFAULT_TENANT" in out.problems[0]["message"]
    assert check_message(body, settings=strict, tenant="shop").problems == []
    assert check_message(body, settings=make_settings(tenants_file=str(path))).problems == []  # not strict
    path.write_text("[tenants.shop]\n[tenants.default]\n")
    assert check_message(body, settings=make_settings(tenants_file=str(path), tenants_strict=True)).problems == []


# ----- a real system: serve, worker, beat, the command line ----------------------------------------

ADMIN_TOKEN = "wadm-" + uuid.uuid4().hex


def _kie(stack: DevStack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", *argv], env=stack.env, capture_output=True,
                          text=True, timeout=60, cwd=stack.workdir)


def test_a_weight_set_at_run_time_applies_within_a_tick_on_running_workers(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[admin]\ntokens = ["env:T_WADMIN"]\n[tenants.light]\n[tenants.heavy]\n')
    env = {"KIE_TENANTS_FILE": str(path), "KIE_TENANTS_STRICT": "true", "T_WADMIN": ADMIN_TOKEN,
           "KIE_SUBMIT_RATE": "10/1s", "KIE_SUBMIT_RATE_MARGIN": "0.05s", "KIE_TICK_INTERVAL": "0.1s",
           "KIE_POLL_FIRST": "0.3s", "KIE_POLL_INTERVAL": "0.3s", "KIE_POLL_MAX_INTERVAL": "0.5s", "KIE_LEASE": "8s",
           "KIE_READ_TIMEOUT": "5s", "KIE_CONNECT_TIMEOUT": "2s"}
    with DevStack(tmp_path / "stack", key_prefix=f"w{uuid.uuid4().hex[:6]}", env=env) as stack:
        sim_url = stack.start_simulator("--time-factor", "0.01", "--seed", "9", "--rate-limit", "10",
                                        "--rate-window", "1")
        url = stack.start_serve()
        stack.start_worker(concurrency=3)
        stack.start_beat()
        settings: Settings = stack.settings()
        rt = Runtime(settings)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert requests.post(url + "/v1/pause", headers=auth, json={"reason": "fill"}, timeout=10).status_code == 200

        def reqs(n: int) -> list[dict[str, Any]]:
            return [{"request": {"uploadUrl": f"{sim_url}/files/source/40s.mp3", "defaultParamFlag": True,
                                 "instrumental": True, "continueAt": 5, "model": "V5", "style": "rock",
                                 "title": f"W{i}"}} for i in range(n)]

        light = enqueue_many(reqs(80), tenant="light", settings=settings)
        heavy = enqueue_many(reqs(80), tenant="heavy", settings=settings)
        deadline = time.monotonic() + 60
        while sum(n for p in rt.admission.waiting().values() for n in p.values()) < 160:
            assert time.monotonic() < deadline, rt.admission.waiting()
            time.sleep(0.1)
        assert requests.post(url + "/v1/resume", headers=auth, timeout=10).status_code == 200
        sent_states = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.SUCCEEDED)

        def sent() -> int:
            return sum(rt.store.count(s) for s in sent_states)

        while sent() < 20:
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        r = requests.put(url + "/v1/tenants/heavy", headers=auth, json={"weight": 3}, timeout=10)
        assert r.status_code == 200 and r.json()["changes"] == [{"field": "weight", "old": 1, "new": 3}]
        changed = time.time()
        while sent() < 110:
            assert time.monotonic() < deadline + 90, sent()
            time.sleep(0.1)
        requests.post(url + "/v1/pause", headers=auth, timeout=10)
        starts = {}
        for j in [*light, *heavy]:
            ts = (rt.store.get(j) or {}).get("submit_started_ts")
            if ts:
                starts[j] = float(ts)
        heavy_ids = set(heavy)
        order = [("H" if j in heavy_ids else "L") for j, _ in sorted(starts.items(), key=lambda kv: kv[1])]
        before = Counter(order[:20])
        assert abs(before["H"] - before["L"]) <= 2, order[:20]  # weights 1:1 before the change
        # Admission decides at most one tick (0.1 s) ahead: every send from 0.5 s after the change on
        # was chosen under the new weight.
        after = [("H" if j in heavy_ids else "L") for j, ts in sorted(starts.items(), key=lambda kv: kv[1])
                 if ts >= changed + 0.5][:40]
        assert len(after) == 40, len(after)
        shares = Counter(after)
        print(f"sends before the change {''.join(order[:20])}; 40 after it {''.join(after)}")
        assert 27 <= shares["H"] <= 33, "".join(after)  # 3:1 within 10 %

        # The command line: list, set, audit; unknown tenant exit 3, bad value exit 2.
        listed = _kie(stack, "tenant", "list")
        assert listed.returncode == 0 and "heavy" in listed.stdout and "weight=3*" in listed.stdout, listed
        done = _kie(stack, "tenant", "set", "light", "--rate", "2/1s", "--budget", "10/1h")
        assert done.returncode == 0 and "light: rate - -> 2/1s" in done.stdout, done
        assert _kie(stack, "tenant", "set", "nobody", "--weight", "2").returncode == 3
        assert _kie(stack, "tenant", "set", "light").returncode == 2  # nothing to set
        bad = _kie(stack, "tenant", "set", "light", "--weight", "0")
        assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad
        shown = _kie(stack, "audit", "--json")
        entries = json.loads(shown.stdout)["entries"]
        assert [e["action"] for e in entries[:4]] == ["tenant.set", "pause", "tenant.set", "resume"], entries
        assert entries[0]["who"].startswith("cli:") and entries[0]["via"] == "cli"
        assert entries[2]["who"] == "admin" and entries[2]["new"] == {"weight": 3}
        assert ADMIN_TOKEN not in shown.stdout + listed.stdout + done.stdout
        for log in stack.workdir.glob("*.log"):
            assert ADMIN_TOKEN not in log.read_text(errors="replace")
        assert get_job(light[0], settings=settings)["tenant"] == "light"
        # Strict, and KIE_DEFAULT_TENANT ("default") is not declared: a Celery message naming no
        # tenant is refused by the worker like one naming an undeclared tenant.
        from kie_extend.api import producer_app

        nameless = f"nameless-{uuid.uuid4().hex[:8]}"
        producer_app(settings).send_task("kie_extend.extend", kwargs={"request": reqs(1)[0]["request"]},
                                         task_id=nameless, queue=settings.queue)
        end = time.monotonic() + 30
        while get_job(nameless, settings=settings)["state"] != "failed" and time.monotonic() < end:
            time.sleep(0.1)
        rec = get_job(nameless, settings=settings)
        assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
        assert [e["field"] for e in rec["error"]["errors"]] == ["tenant"], rec["error"]
    os.environ.pop("T_WADMIN", None)
