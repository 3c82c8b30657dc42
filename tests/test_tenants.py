"""Tenants as boundaries (KIE_TENANTS_FILE): a real ``serve`` app over loopback on our own Valkey,
the simulator, real worker processes for strict mode, the real ``kie-extend`` command for bad files.

Two tenants, ``shop`` and ``blog``, each with a write and a ``read:`` token; an admin token from
KIE_API_TOKENS and one from the file's ``[admin]``. Every /v1 route is tried with each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dash_server import ServedApp
from inline import Harness
from kie_extend.api import get_job, producer_app
from kie_extend.cli.devstack import DevStack
from kie_extend.config import Settings
from kie_extend.http.app import create_app
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve

from test_http_api import Served, req

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "adm-" + uuid.uuid4().hex
FILE_ADMIN = "fadm-" + uuid.uuid4().hex
SHOP = "shop-" + uuid.uuid4().hex
SHOP_READ = "shopr-" + uuid.uuid4().hex
BLOG = "blog-" + uuid.uuid4().hex
BLOG_READ = "blogr-" + uuid.uuid4().hex
HOOK_SECRET = "hook-" + uuid.uuid4().hex
SECRETS = (ADMIN, FILE_ADMIN, SHOP, SHOP_READ, BLOG, BLOG_READ, HOOK_SECRET)

TENANTS_TOML = f"""
[admin]
tokens = ["env:T_FILE_ADMIN"]

[tenants.shop]
tokens = ["env:T_SHOP", "read:env:T_SHOP_READ"]
weight = 2
rate = "5/10s"
budget = "2000/1d"
webhook_url = "https://shop.example/hooks/kie"
webhook_secret = "env:T_HOOK"
stream = true

[tenants.blog]
tokens = ["{BLOG}", "read:{BLOG_READ}"]
"""
ENV = {"T_FILE_ADMIN": FILE_ADMIN, "T_SHOP": SHOP, "T_SHOP_READ": SHOP_READ, "T_HOOK": HOOK_SECRET}


@pytest.fixture
def tenants_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS_TOML)
    return path


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=5, callbacks=False))
    yield server
    server.stop()


class Api:
    def __init__(self, url: str, settings: Settings, rt: Runtime, h: Harness) -> None:
        self.url, self.settings, self.rt, self.h = url, settings, rt, h

    def call(self, method: str, path: str, token: str, **kw: Any) -> requests.Response:
        return requests.request(method, self.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10,
                                **kw)

    def consume(self) -> None:
        """Accept every waiting broker message in this process, as a worker would."""
        import base64
        import json

        raw = self.rt.redis.lrange(self.settings.queue, 0, -1)
        self.rt.redis.delete(self.settings.queue)
        for item in raw[::-1]:
            message = json.loads(item)
            _a, kw, _e = json.loads(base64.b64decode(message["body"]))
            self.h.pipeline.accept(message["headers"]["id"], kw.pop("request"), kw.pop("idempotency_key", None),
                                   kw.pop("metadata", None), **kw)


@pytest.fixture
def api(make_settings: Callable[..., Settings], sim: SimServer, tenants_file: Path) -> Iterator[Api]:
    settings = make_settings(api_tokens=f"{ADMIN}", tenants_file=str(tenants_file), base_url=sim.url,
                             http_auth_failures=(10_000, 60.0))
    rt = Runtime(settings)
    h = Harness(rt, sim)
    served = Served(create_app(settings, runtime=rt, dispatcher=h.dispatch))
    try:
        yield Api(served.url, settings, rt, h)
    finally:
        served.stop()


def _no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def _submit(api: Api, token: str, **extra: Any) -> str:
    r = api.call("POST", "/v1/jobs", token, json={"request": req_body(api), **extra})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def req_body(api: Api) -> dict[str, Any]:
    return req(api.h.sim)


def test_settings_read_the_file(make_settings: Callable[..., Settings], tenants_file: Path) -> None:
    settings = make_settings(tenants_file=str(tenants_file))
    reg = settings.tenants
    assert sorted(reg.tenants) == ["blog", "shop"]
    shop = reg.tenants["shop"]
    assert (shop.weight, shop.rate, shop.budget, shop.stream) == (2, (5, 10.0), (2000, 86400.0), True)
    assert shop.webhook_secret == HOOK_SECRET and HOOK_SECRET not in repr(shop)
    assert settings.tenant_limits["shop"] == (5, 10.0)  # the file's rate joins KIE_TENANT_LIMITS
    assert reg.match(SHOP).tenant == "shop" and not reg.match(SHOP).read_only
    assert reg.match(SHOP_READ).read_only and reg.match("read:" + SHOP_READ).read_only
    assert reg.match("read:" + SHOP) is None and reg.match(FILE_ADMIN).tenant is None
    # KIE_TENANT_LIMITS naming the tenant wins over the file.
    assert make_settings(tenants_file=str(tenants_file), tenant_limits="shop=1/1s").tenant_limits["shop"] == (1, 1.0)


def test_tenant_tokens_see_only_their_own_jobs(api: Api) -> None:
    mine = _submit(api, SHOP)
    theirs = _submit(api, BLOG, tenant="blog")
    api.consume()
    assert api.call("GET", f"/v1/jobs/{mine}", SHOP).json()["tenant"] == "shop"
    assert api.call("GET", f"/v1/jobs/{mine}", SHOP_READ).status_code == 200
    unknown = "nope-" + uuid.uuid4().hex
    for token, other in ((SHOP, theirs), (BLOG, mine), (SHOP_READ, theirs)):
        r_other = api.call("GET", f"/v1/jobs/{other}", token)
        r_none = api.call("GET", f"/v1/jobs/{unknown}", token)
        assert r_other.status_code == r_none.status_code == 404
        assert r_other.text.replace(other, "ID") == r_none.text.replace(unknown, "ID")
    for action in ("cancel", "retry"):
        r_other = api.call("POST", f"/v1/jobs/{theirs}/{action}", SHOP)
        r_none = api.call("POST", f"/v1/jobs/{unknown}/{action}", SHOP)
        assert r_other.status_code == r_none.status_code == 404
        assert r_other.text.replace(theirs, "ID") == r_none.text.replace(unknown, "ID")
    assert get_job(theirs, settings=api.settings)["state"] != "cancelled"
    listed = api.call("GET", "/v1/jobs", SHOP).json()["jobs"]
    assert [j["job_id"] for j in listed] == [mine]
    # Naming another tenant is refused as on /v1/usage and POST /v1/jobs; the answer names no job of it.
    other = api.call("GET", "/v1/jobs?tenant=blog", SHOP)
    assert other.status_code == 403 and other.json()["error"]["kind"] == "forbidden", other.text
    assert theirs not in other.text
    assert [j["job_id"] for j in api.call("GET", "/v1/jobs?tenant=shop", SHOP).json()["jobs"]] == [mine]
    every = {j["job_id"] for j in api.call("GET", "/v1/jobs", ADMIN).json()["jobs"]}
    assert {mine, theirs} <= every
    assert {j["job_id"] for j in api.call("GET", "/v1/jobs", FILE_ADMIN).json()["jobs"]} == every
    # Its own job reaches the action (cancelled, or too late if it was sent already).
    r = api.call("POST", f"/v1/jobs/{mine}/cancel", SHOP)
    assert r.status_code in (200, 409), r.text


def test_submissions_take_the_token_tenant(api: Api) -> None:
    r = api.call("POST", "/v1/jobs", SHOP, json={"request": req_body(api), "tenant": "blog"})
    assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
    r = api.call("POST", "/v1/jobs", SHOP, json={"jobs": [{"request": req_body(api)},
                                                          {"request": req_body(api), "tenant": "blog"}]})
    assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
    r = api.call("POST", "/v1/jobs", SHOP, json={"jobs": [{"request": req_body(api)}], "tenant": "blog"})
    assert r.status_code == 403
    assert api.rt.redis.llen(api.settings.queue) == 0  # nothing was enqueued
    r = api.call("POST", "/v1/jobs", SHOP_READ, json={"request": req_body(api)})
    assert r.status_code == 403 and r.json()["error"]["message"] == "this token is read-only"
    ok = _submit(api, SHOP, tenant="shop")
    api.consume()
    assert get_job(ok, settings=api.settings)["tenant"] == "shop"
    # An admin may name any tenant.
    other = _submit(api, ADMIN, tenant="blog")
    api.consume()
    assert get_job(other, settings=api.settings)["tenant"] == "blog"


def test_batches_are_scoped(api: Api) -> None:
    shop_batch = "sb-" + uuid.uuid4().hex[:8]
    blog_batch = "bb-" + uuid.uuid4().hex[:8]
    r = api.call("POST", "/v1/jobs", SHOP, json={"jobs": [{"request": req_body(api)}] * 2, "batch_id": shop_batch})
    assert r.status_code == 202, r.text
    # Seen before any worker recorded a job of it.
    assert api.call("GET", f"/v1/batches/{shop_batch}", SHOP).json()["total"] == 2
    pending = api.call("GET", f"/v1/jobs?batch_id={shop_batch}", SHOP).json()["jobs"]
    assert [j["state"] for j in pending] == ["pending", "pending"]
    r = api.call("POST", "/v1/jobs", BLOG, json={"jobs": [{"request": req_body(api)}], "batch_id": blog_batch})
    assert r.status_code == 202
    # Another tenant's batch cannot be joined.
    r = api.call("POST", "/v1/jobs", BLOG, json={"jobs": [{"request": req_body(api)}], "batch_id": shop_batch})
    assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
    api.consume()
    unknown = "nb-" + uuid.uuid4().hex[:8]
    for method, suffix in (("GET", ""), ("POST", "/cancel")):
        r_other = api.call(method, f"/v1/batches/{blog_batch}{suffix}", SHOP)
        r_none = api.call(method, f"/v1/batches/{unknown}{suffix}", SHOP)
        assert r_other.status_code == r_none.status_code == 404
        assert r_other.text.replace(blog_batch, "ID") == r_none.text.replace(unknown, "ID")
    assert [b["batch_id"] for b in api.call("GET", "/v1/batches", SHOP).json()["batches"]] == [shop_batch]
    assert [b["batch_id"] for b in api.call("GET", "/v1/batches", BLOG_READ).json()["batches"]] == [blog_batch]
    assert {shop_batch, blog_batch} <= {b["batch_id"] for b in api.call("GET", "/v1/batches", ADMIN).json()["batches"]}
    assert api.call("GET", f"/v1/jobs?batch_id={blog_batch}", SHOP).json()["jobs"] == []
    assert api.call("POST", f"/v1/batches/{shop_batch}/cancel", SHOP_READ).status_code == 403
    r = api.call("POST", f"/v1/batches/{shop_batch}/cancel", SHOP)
    assert r.status_code == 200 and r.json()["batch_id"] == shop_batch


def test_account_wide_routes_need_an_admin(api: Api) -> None:
    for token in (SHOP, BLOG, SHOP_READ):
        for path in ("/v1/pause", "/v1/resume"):
            r = api.call("POST", path, token)
            assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden", (token[:4], path)
        assert api.call("GET", "/v1/tenants", token).status_code == 403
    assert api.call("POST", "/v1/pause", FILE_ADMIN, json={"reason": "x"}).status_code == 200
    assert api.call("POST", "/v1/resume", ADMIN).json()["resumed"] is True
    r = api.call("GET", "/v1/tenants", FILE_ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["strict"] is False
    shop = next(t for t in body["tenants"] if t["name"] == "shop")
    assert shop == {"name": "shop", "weight": 2, "rate": "5/10s", "budget": "2000/1d",
                    "webhook_url": "https://shop.example/hooks/kie", "webhook_secret_set": True, "stream": True,
                    "overridden": [],
                    # nothing admitted yet: its budget's whole window left
                    "usage": {"window": 86400, "reserved": 0, "charged": 0, "refunded": 0, "open": 0,
                              "budget_left": 2000}}
    _no_secret(r.text)


def test_system_shows_a_tenant_its_own_counts(api: Api) -> None:
    assert api.call("POST", "/v1/pause", ADMIN).status_code == 200  # so the jobs wait for a slot
    _submit(api, SHOP)
    _submit(api, BLOG)
    _submit(api, BLOG)
    api.consume()
    mine = api.call("GET", "/v1/system", SHOP).json()
    assert mine["waiting_by_tenant"] == {"shop": 1} and mine["waiting"] == 1
    assert all(set(t) == {"shop"} for t in mine["waiting_by_priority"].values())
    assert "jobs" not in mine and "dead_letters" not in mine and "in_flight" in mine and "submission" in mine
    every = api.call("GET", "/v1/system", ADMIN).json()
    assert every["waiting_by_tenant"] == {"shop": 1, "blog": 2} and "jobs" in every


def test_unknown_tokens_and_no_secret_in_answers(api: Api) -> None:
    assert api.call("GET", "/v1/jobs", "read:" + SHOP).status_code == 401
    assert api.call("GET", "/v1/jobs", "read:" + SHOP_READ).status_code == 200
    r = api.call("GET", "/v1/system", SHOP)
    _no_secret(r.text)


# ----- dashboard --------------------------------------------------------------------------------

def test_dashboard_tenant_session_sees_only_its_jobs(make_settings: Callable[..., Settings], sim: SimServer,
                                                     tenants_file: Path) -> None:
    settings = make_settings(api_tokens=ADMIN, tenants_file=str(tenants_file), base_url=sim.url)
    rt = Runtime(settings)
    h = Harness(rt, sim)
    app = ServedApp(create_app(settings, runtime=rt, dispatcher=h.dispatch))
    try:
        api = Api(app.url, settings, rt, h)
        mine = _submit(api, SHOP)
        theirs = _submit(api, BLOG)
        batch = "db-" + uuid.uuid4().hex[:8]
        assert api.call("POST", "/v1/jobs", BLOG, json={"jobs": [{"request": req_body(api)}],
                                                        "batch_id": batch}).status_code == 202
        api.consume()
        s = requests.Session()
        r = s.post(app.url + "/login", data={"token": SHOP, "next": "/"}, headers={"Origin": app.url})
        assert r.status_code == 200 and r.url == app.url + "/jobs"  # "/" leads a tenant to its jobs
        assert mine in r.text and theirs not in r.text and 'id="who-tenant"' in r.text
        _no_secret(r.text)
        r = s.get(app.url + "/jobs?tenant=blog")
        assert mine in r.text and theirs not in r.text
        assert s.get(app.url + f"/jobs/{mine}").status_code == 200
        assert s.get(app.url + f"/jobs/{theirs}").status_code == 404
        assert s.get(app.url + f"/batches/{batch}").status_code == 404
        assert batch not in s.get(app.url + "/batches").text
        assert s.get(app.url + "/dead-letters").status_code == 403
        csrf = re.search(r'name="csrf" value="([^"]+)"', s.get(app.url + "/jobs").text).group(1)  # type: ignore[union-attr]
        r = s.post(app.url + f"/jobs/{theirs}/cancel", data={"csrf": csrf}, headers={"Origin": app.url},
                   allow_redirects=False)
        assert r.status_code == 404 and get_job(theirs, settings=settings)["state"] != "cancelled"
        r = s.post(app.url + "/pause", data={"csrf": csrf}, headers={"Origin": app.url}, allow_redirects=False)
        assert r.status_code == 403 and not rt.gates.operator_paused()
        blog = requests.Session()
        blog.post(app.url + "/login", data={"token": BLOG_READ, "next": "/"}, headers={"Origin": app.url})
        r = blog.get(app.url + f"/batches/{batch}")
        assert r.status_code == 200 and mine not in r.text
        assert batch in blog.get(app.url + "/batches").text and theirs in blog.get(app.url + "/jobs").text
        admin = requests.Session()
        r = admin.post(app.url + "/login", data={"token": ADMIN, "next": "/jobs"}, headers={"Origin": app.url})
        assert mine in r.text and theirs in r.text
    finally:
        app.stop()


# ----- strict mode, with a real worker -------------------------------------------------------------

def test_strict_mode_fails_an_undeclared_tenant_in_the_worker(tmp_path: Path, tenants_file: Path) -> None:
    env = {**ENV, "KIE_TENANTS_FILE": str(tenants_file), "KIE_TENANTS_STRICT": "true", "KIE_TICK_INTERVAL": "0.2s"}
    with DevStack(tmp_path, key_prefix=f"t{uuid.uuid4().hex[:6]}", env=env) as stack:
        sim_url = stack.start_simulator("--time-factor", "0.01", "--seed", "4")
        stack.start_worker(concurrency=1)
        settings = stack.settings()
        body = {"uploadUrl": f"{sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
                "continueAt": 5, "model": "V5", "style": "rock", "title": "T", "callBackUrl": "https://example.com/cb"}
        app = producer_app(settings)
        bad, good = f"strict-{uuid.uuid4().hex[:8]}", f"strict-{uuid.uuid4().hex[:8]}"
        app.send_task("kie_extend.extend", kwargs={"request": body, "tenant": "invented"}, task_id=bad,
                      queue=settings.queue)
        app.send_task("kie_extend.extend", kwargs={"request": body, "tenant": "shop"}, task_id=good,
                      queue=settings.queue)
        deadline = time.monotonic() + 60
        recs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            recs = {j: get_job(j, settings=settings) for j in (bad, good)}
            if recs[bad]["state"] == "failed" and recs[good]["state"] not in ("not_found",):
                break
            time.sleep(0.2)
        assert recs[bad]["state"] == "failed" and recs[bad]["error"]["kind"] == "invalid_request", recs[bad]
        assert any(e["field"] == "tenant" for e in recs[bad]["error"].get("errors", [])), recs[bad]
        assert recs[good]["state"] != "failed", recs[good].get("error")
    # A producer in this process is refused before anything is sent.
    from kie_extend.api import enqueue_extend
    from kie_extend.errors import ValidationError

    with pytest.raises(ValidationError) as exc:
        enqueue_extend(body, tenant="invented", settings=settings)
    assert exc.value.errors[0]["field"] == "tenant"


def test_batch_submit_tenant_flag_is_the_default_tenant_of_lines_in_strict_mode(tmp_path: Path,
                                                                                tenants_file: Path) -> None:
    """`batch submit FILE --tenant shop` checks lines without a tenant as shop's,
    as it then enqueues them; without the flag strict mode refuses them (no [tenants.default])."""
    body = {"uploadUrl": "https://example.com/a.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 5, "model": "V5", "style": "rock", "title": "T"}
    (tmp_path / "songs.jsonl").write_text(json.dumps(body) + "\n" + json.dumps({**body, "title": "U"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({**ENV, "KIE_TENANTS_FILE": str(tenants_file), "KIE_TENANTS_STRICT": "true",
                "KIE_REDIS_URL": "redis://127.0.0.1:9/0"})

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kie_extend.cli", "batch", "submit", "songs.jsonl", *flags],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    ok = run("--dry-run", "--tenant", "shop")
    assert ok.returncode == 0 and "every line is valid" in ok.stdout, ok.stdout + ok.stderr
    refused = run("--dry-run")
    assert refused.returncode == 2 and "line 1: tenant:" in refused.stderr, refused.stdout + refused.stderr
    invented = run("--dry-run", "--tenant", "invented")
    assert invented.returncode == 2 and "'invented' is not a tenant" in invented.stderr, invented.stderr


# ----- bad files: one line, exit 5, no secret ------------------------------------------------------

BAD_FILES = [
    ("missing", None, "no such file"),
    ("toml", "[tenants.shop\ntokens = 1", "not valid TOML"),
    ("unknown key", '[tenants.shop]\ntokens = ["env:T_SHOP"]\ncolour = "red"\n', "tenants.shop.colour"),
    ("bad name", '[tenants."no:colons"]\ntokens = ["env:T_SHOP"]\n', "tenants.no:colons"),
    ("env unset", '[tenants.shop]\ntokens = ["env:T_NOT_SET_ANYWHERE"]\n', "T_NOT_SET_ANYWHERE"),
    ("same token", '[tenants.shop]\ntokens = ["env:T_SHOP"]\n[tenants.blog]\ntokens = ["env:T_SHOP"]\n',
     "tenants.blog.tokens"),
    ("bad rate", '[tenants.shop]\ntokens = ["env:T_SHOP"]\nrate = "fast"\n', "tenants.shop.rate"),
    ("bad budget", '[tenants.shop]\ntokens = ["env:T_SHOP"]\nbudget = "lots"\n', "tenants.shop.budget"),
    ("budget under an hour", '[tenants.shop]\ntokens = ["env:T_SHOP"]\nbudget = "10/30m"\n',
     "tenants.shop.budget: a budget's window is counted in whole hours"),
    ("budget past 35 days", '[tenants.shop]\ntokens = ["env:T_SHOP"]\nbudget = "10/36d"\n',
     "a budget's window can be at most 35d"),
    ("admin key", '[admin]\ntokens = ["env:T_SHOP"]\nweight = 3\n', "admin.weight"),
]


@pytest.mark.parametrize("name,text,expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_tenants_file_stops_the_cli_with_one_line(tmp_path: Path, name: str, text: str | None,
                                                         expected: str) -> None:
    path = tmp_path / "tenants.toml"
    if text is not None:
        path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({**ENV, "KIE_TENANTS_FILE": str(path), "KIE_REDIS_URL": "redis://127.0.0.1:9/0"})
    proc = subprocess.run([sys.executable, "-m", "kie_extend.cli", "jobs"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 5, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: KIE_TENANTS_FILE " + str(path)), proc.stderr
    assert expected in lines[0] and "Traceback" not in proc.stderr
    # Where to fix it: the setting, the environment (env: never reads .env), or the file itself.
    hint = {"missing": "(set it in the environment or in .env)",
            "env unset": "(export it to every process that reads the file: env: is not read from .env)"}
    assert lines[0].endswith(hint.get(name, "(fix the file)")), lines[0]
    _no_secret(proc.stdout + proc.stderr)


@pytest.mark.parametrize("command", [["-m", "celery", "-A", "kie_extend.worker", "worker"],
                                     ["-m", "celery", "-A", "kie_extend.worker", "beat"],
                                     ["-m", "kie_extend.cli", "serve"]], ids=["worker", "beat", "serve"])
def test_a_bad_tenants_file_stops_serve_worker_and_beat(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.shop]\ntokens = ["env:T_SHOP", "env:T_SHOP"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({**ENV, "KIE_TENANTS_FILE": str(path), "KIE_REDIS_URL": "redis://127.0.0.1:9/0"})
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 5, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: KIE_TENANTS_FILE") and "tenants.shop.tokens" in lines[0]
    assert lines[0].endswith("(fix the file)"), lines[0]
    _no_secret(proc.stdout + proc.stderr)


def test_serve_binds_beyond_loopback_with_tokens_from_the_file_alone(tmp_path: Path, tenants_file: Path) -> None:
    """Tokens in the tenants file count as tokens: no refusal naming KIE_API_TOKENS (serve goes on
    to its start-up checks, here waiting for an unreachable job store), no token in its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({**ENV, "KIE_TENANTS_FILE": str(tenants_file), "KIE_REDIS_URL": "redis://127.0.0.1:9/0"})
    proc = subprocess.Popen([sys.executable, "-m", "kie_extend.cli", "serve", "--host", "0.0.0.0", "--port", "9"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        code = proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
    out, err = proc.communicate(timeout=10)
    assert code != 2 and "refusing to serve" not in err, (code, err)
    _no_secret(out + err)
