"""Credits end to end: the simulator over HTTP, `serve` (callbacks, /v1, tenants), Celery workers and
beat as processes on our own Valkey. The ledger survives kill -9 of a worker without charging twice
and agrees with the simulator's balance (`kie-extend credits --reconcile`); usage is scoped by token;
a tenant at its budget waits in queued while another tenant's jobs flow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.store.keys import Keys

ADMIN = "adm-" + uuid.uuid4().hex
SHOP = "shop-" + uuid.uuid4().hex
BLOG = "blog-" + uuid.uuid4().hex
TENANTS = f"""
[admin]
tokens = ["{ADMIN}"]

[tenants.shop]
tokens = ["{SHOP}"]

[tenants.blog]
tokens = ["{BLOG}"]

[tenants.capped]
tokens = ["capped-{uuid.uuid4().hex}"]
budget = "36/1d"

[tenants.free]
tokens = ["free-{uuid.uuid4().hex}"]
"""
PRICE = 12.0
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("credits")
    tenants = workdir / "tenants.toml"
    tenants.write_text(TENANTS)
    env = {"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
           "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s", "KIE_LEASE": "8s",
           "KIE_VISIBILITY_TIMEOUT": "15s", "KIE_SUBMIT_UNKNOWN_WINDOW": "30s", "KIE_READ_TIMEOUT": "5s",
           "KIE_CONNECT_TIMEOUT": "2s", "KIE_HANDLERS": "redis_stream", "KIE_BREAKER_THRESHOLD": "50",
           "KIE_BALANCE_INTERVAL": "1s", "KIE_TENANTS_FILE": str(tenants), "KIE_PRICES": f"extend={PRICE:g}"}
    with DevStack(workdir, key_prefix=f"cr{uuid.uuid4().hex[:6]}", env=env) as st:
        st.start_simulator("--time-factor", "0.05", "--seed", "11", "--fault-generation-fail", "0.4",
                           "--fail-codes", "501,531")
        st.serve_url = st.start_serve()  # type: ignore[attr-defined]
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def request(stack: DevStack) -> dict:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 10, "model": "V5", "style": "folk", "title": "Song"}


def wait_for(stack: DevStack, done, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-3000:] for c in stack.children)
    raise AssertionError(f"{what} did not happen\n{logs}")


def cli(stack: DevStack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", *args], env=stack.env, capture_output=True,
                          text=True, timeout=60)


def test_ledger_survives_kill9_and_agrees_with_the_balance(stack: DevStack) -> None:
    settings = stack.settings()
    # Reconciliation starts at the tick's first balance reading: wait for one before any job.
    r = redis.Redis.from_url(stack.redis_url)
    wait_for(stack, lambda: r.zcard(Keys(settings.key_prefix).balance) >= 1, "a first balance snapshot", timeout=30)
    jobs = [enqueue_extend(request(stack), tenant="shop" if i % 2 else "blog", settings=settings) for i in range(16)]
    time.sleep(1.0)
    stack.workers[0].kill9()  # mid-run: some jobs submitting, some submitted
    stack.start_worker(concurrency=2)
    wait_for(stack, lambda: all(get_job(j, settings=settings)["state"] in TERMINAL for j in jobs), "all jobs ending")
    recs = {j: get_job(j, settings=settings) for j in jobs}
    states = [r["state"] for r in recs.values()]
    kinds = [(r["error"] or {}).get("code") for r in recs.values() if r["state"] == "failed"]
    assert "succeeded" in states and 531 in kinds and 501 in kinds, (states, kinds)
    charged = 0.0
    for job, rec in recs.items():
        c = rec["credits"]
        # Reserved once per admission; each reservation settled once: charged + refunded = reserved.
        assert c["reserved"] >= PRICE and c["charged"] + c["refunded"] == c["reserved"], (job, rec)
        if rec["state"] == "succeeded" or (rec["error"] or {}).get("code") == 501:
            assert c["charged"] == PRICE, rec
        if (rec["error"] or {}).get("code") == 531:
            assert c["charged"] == 0 and c["refunded"] == PRICE, rec
        charged += c["charged"]
    time.sleep(2.5)  # a balance snapshot after every refund has shown
    out = cli(stack, "credits", "--reconcile", "--since", "1h", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    sim_fall = 10000 - float(stack.sim_stats()["credits"])
    assert report["fall"] == sim_fall == charged == report["charged"], (report, sim_fall, charged)
    assert report["difference"] == 0 and report["complete"], report
    text = cli(stack, "credits", "--reconcile", "--since", "1h")
    assert text.returncode == 0 and "difference 0" in text.stdout, text.stdout
    usage = json.loads(cli(stack, "usage", "--since", "1h", "--json").stdout)
    assert usage["total"]["charged"] == charged and usage["total"]["open"] == 0
    assert set(usage["tenants"]) >= {"shop", "blog"}


def test_usage_is_scoped_by_token(stack: DevStack) -> None:
    url = stack.serve_url  # type: ignore[attr-defined]

    def get(token: str, **params: str) -> requests.Response:
        return requests.get(url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    every = get(ADMIN, since="1h").json()
    assert {"shop", "blog"} <= set(every["tenants"])
    own = get(SHOP, since="1h")
    assert own.status_code == 200 and set(own.json()["tenants"]) == {"shop"}, own.text
    assert own.json()["tenants"]["shop"] == every["tenants"]["shop"]
    assert own.json()["total"]["charged"] == every["tenants"]["shop"]["charged"]
    other = get(SHOP, tenant="blog")
    assert other.status_code == 403 and other.json()["error"]["kind"] == "forbidden"
    assert "blog" not in other.text.replace("tenant blog", "")  # nothing of blog's beyond the name asked for
    assert get(ADMIN, tenant="blog", since="1h").json()["tenants"].keys() == {"blog"}
    for bad in ("1y", "abc"):  # the error says what a window looks like, not the schema's pattern
        refused = get(ADMIN, since=bad)
        assert refused.status_code == 422 and refused.json()["error"]["kind"] == "invalid_request", refused.text
        assert f"'{bad}' is not a duration such as 500ms" in refused.text and "[0-9]" not in refused.text
    cmd = cli(stack, "usage", "--tenant", "shop", "--since", "1h")
    assert cmd.returncode == 0 and "shop" in cmd.stdout and "blog" not in cmd.stdout
    assert "warning" not in cmd.stderr, cmd.stderr
    typo = cli(stack, "usage", "--tenant", "shopp")  # an empty table, and a warning naming the declared tenants
    assert "'shopp' is not a tenant of KIE_TENANTS_FILE" in typo.stderr and "shop" in typo.stderr, typo.stderr


def test_budget_holds_one_tenant_while_another_flows(stack: DevStack) -> None:
    settings = stack.settings()
    stack.sim_config(fault_generation_fail=0.0)
    capped = [enqueue_extend(request(stack), tenant="capped", settings=settings) for _ in range(5)]
    free = [enqueue_extend(request(stack), tenant="free", settings=settings) for _ in range(5)]
    wait_for(stack, lambda: all(get_job(j, settings=settings)["state"] == "succeeded" for j in free), "free jobs")
    # 36 credits a day at 12 a job: three of capped's jobs run, two wait in queued for budget.
    wait_for(stack, lambda: sum(get_job(j, settings=settings)["state"] == "succeeded" for j in capped) == 3,
             "three capped jobs")
    time.sleep(2.0)  # a few more ticks: nothing more is admitted
    recs = [get_job(j, settings=settings) for j in capped]
    held = [r for r in recs if r["state"] == "queued"]
    assert len(held) == 2 and all(r["waiting_for"] == "budget" for r in held), recs
    assert all(r["credits"] == {"reserved": 0, "charged": 0, "refunded": 0} for r in held)
    api = requests.get(stack.serve_url + f"/v1/jobs/{held[0]['job_id']}",  # type: ignore[attr-defined]
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert api["state"] == "queued" and api["waiting_for"] == "budget"
    # The CLI says why too: on the job's line, and on the overview.
    one = cli(stack, "status", held[0]["job_id"])
    assert one.returncode == 0 and "queued" in one.stdout and "waiting_for=budget" in one.stdout, one.stdout
    overview = cli(stack, "status")
    assert "held at their budget: capped" in overview.stdout, overview.stdout + overview.stderr
    usage = requests.get(stack.serve_url + "/v1/usage", params={"tenant": "capped"},  # type: ignore[attr-defined]
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert usage["tenants"]["capped"]["budget"] == {"credits": 36, "window": 86400, "used": 36, "ratio": 1}
    metrics = requests.get(stack.serve_url + "/metrics", timeout=10).text  # type: ignore[attr-defined]
    assert 'kie_extend_tenant_budget_used_ratio{tenant="capped"} 1' in metrics
    assert 'kie_extend_tenant_budget_waiting{tenant="capped"} 1' in metrics


def test_listings_and_the_tenants_list_show_budget_waits_and_usage(stack: DevStack) -> None:
    """After the budget test: capped's two held jobs say ``waiting_for: "budget"`` in every listing
    (GET /v1/jobs, ``kie-extend jobs``, the dashboard's jobs page), its three run ones do not; GET
    /v1/tenants and ``kie-extend tenant list`` give each tenant's credits over its window."""
    url = stack.serve_url  # type: ignore[attr-defined]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    page = requests.get(url + "/v1/jobs", params={"tenant": "capped"}, headers=auth, timeout=10).json()["jobs"]
    shown = sorted((j["state"], j["waiting_for"]) for j in page)
    assert shown == [("queued", "budget")] * 2 + [("succeeded", None)] * 3, page
    everyone = requests.get(url + "/v1/jobs", params={"limit": 500}, headers=auth, timeout=10).json()["jobs"]
    assert {j["tenant"] for j in everyone if j["waiting_for"] == "budget"} == {"capped"}
    assert sum(j["waiting_for"] == "budget" for j in everyone) == 2
    listed = cli(stack, "jobs", "--tenant", "capped", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted((j["state"], j["waiting_for"]) for j in json.loads(listed.stdout)["jobs"]) == shown
    text = cli(stack, "jobs", "--tenant", "capped")
    assert text.stdout.count("waiting_for=budget") == 2, text.stdout
    with requests.Session() as admin:
        admin.post(url + "/login", data={"token": ADMIN, "next": "/"}, headers={"Origin": url}, timeout=10)
        html = admin.get(url + "/jobs", params={"tenant": "capped"}, timeout=10).text
        assert html.count("waiting for budget") == 2, html

    tenants = requests.get(url + "/v1/tenants", headers=auth, timeout=10)
    assert tenants.status_code == 200, tenants.text
    got = {t["name"]: t["usage"] for t in tenants.json()["tenants"]}
    # capped: 3 jobs of 12 charged in its 1-day window, its 36 used up; free: 5 jobs, no budget (24 h).
    assert got["capped"] == {"window": 86400, "reserved": 36, "charged": 36, "refunded": 0, "open": 0,
                             "budget_left": 0}, got
    assert got["free"] == {"window": 86400, "reserved": 60, "charged": 60, "refunded": 0, "open": 0,
                           "budget_left": None}, got
    day = requests.get(url + "/v1/usage", params={"since": "1d"}, headers=auth, timeout=10).json()["tenants"]
    for name in ("shop", "blog"):  # the ledger's own numbers over the same 24 h
        assert {k: got[name][k] for k in ("reserved", "charged", "refunded", "open")} == \
            {k: day[name][k] for k in ("reserved", "charged", "refunded", "open")}, (got[name], day[name])
        assert got[name]["charged"] > 0 and got[name]["budget_left"] is None
    assert requests.get(url + "/v1/tenants", headers={"Authorization": f"Bearer {SHOP}"}, timeout=10).status_code == 403
    cmd = cli(stack, "tenant", "list", "--json")
    assert cmd.returncode == 0, cmd.stderr
    assert {t["name"]: t["usage"] for t in json.loads(cmd.stdout)["tenants"]} == got
    line = next(ln for ln in cli(stack, "tenant", "list").stdout.splitlines() if ln.startswith("capped "))
    assert "[1d] charged=36 reserved=36 refunded=0 open=0 budget_left=0" in line, line


def test_dashboard_shows_spend_per_tenant_scoped_by_session(stack: DevStack) -> None:
    url = stack.serve_url  # type: ignore[attr-defined]
    with requests.Session() as admin:
        admin.post(url + "/login", data={"token": ADMIN, "next": "/"}, headers={"Origin": url}, timeout=10)
        page = admin.get(url + "/", timeout=10).text
        assert 'id="spend"' in page and 'data-tenant="shop"' in page and 'data-tenant="blog"' in page
    with requests.Session() as shop:
        shop.post(url + "/login", data={"token": SHOP, "next": "/"}, headers={"Origin": url}, timeout=10)
        page = shop.get(url + "/jobs", timeout=10).text
        assert 'id="spend"' in page and 'data-tenant="shop"' in page
        assert 'data-tenant="blog"' not in page and 'data-tenant="capped"' not in page
    # A job held at its budget says so on its page (as GET /v1/jobs/{id} and `kie-extend status`).
    settings = stack.settings()
    held = [j for j in _capped_jobs(stack) if get_job(j, settings=settings)["state"] == "queued"]
    assert held
    with requests.Session() as admin:
        admin.post(url + "/login", data={"token": ADMIN, "next": "/"}, headers={"Origin": url}, timeout=10)
        page = admin.get(url + f"/jobs/{held[0]}", timeout=10).text
        assert '<dd id="waiting-for">budget' in page, page
        done = [j for j in _capped_jobs(stack) if j not in held][0]
        assert 'id="waiting-for"' not in admin.get(url + f"/jobs/{done}", timeout=10).text


def test_a_raised_budget_releases_the_waiting_jobs_at_run_time(stack: DevStack) -> None:
    """After the budget test: capped's two jobs wait; an admin raises its budget at run time and
    they run, without a restart of any worker or beat."""
    settings = stack.settings()
    waiting = [r for r in (get_job(j, settings=settings) for j in _capped_jobs(stack)) if r["state"] == "queued"]
    assert len(waiting) == 2 and all(r["waiting_for"] == "budget" for r in waiting)
    out = cli(stack, "tenant", "set", "capped", "--budget", "60/1d")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(stack, lambda: all(get_job(r["job_id"], settings=settings)["state"] == "succeeded" for r in waiting),
             "the waiting jobs running after the raise", timeout=60)
    rec = get_job(waiting[0]["job_id"], settings=settings)
    assert rec["waiting_for"] is None and rec["credits"] == {"reserved": 12, "charged": 12, "refunded": 0}


def _capped_jobs(stack: DevStack) -> list[str]:
    from kie_extend.jobs.listing import list_jobs
    from kie_extend.infra.runtime import Runtime

    jobs, _ = list_jobs(Runtime(stack.settings()), tenant="capped", limit=50)
    return [j["job_id"] for j in jobs]
