"""Quotes (`POST /v1/quote`, `kie-extend batch submit FILE --quote`): the fluid ETA model as pure
functions, then end to end on a real stack (our own Valkey, the simulator over HTTP, `serve`, a Celery
worker and beat as processes): a quote enqueues nothing, its credits are prices × jobs, its budget
left and fit follow the budget and its use, and its ETA grows with the work waiting ahead and
shrinks with the tenant's weight."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.credits.quotes import GENERATION_SECONDS, eta, fair_drain, quote
from kie_extend.credits.reconcile import record_balance
from kie_extend.infra.runtime import Runtime
from kie_extend.store.keys import Keys

# -- the model, pure ------------------------------------------------------------------------------


def test_fair_drain_shares_the_rate_by_weight_and_caps() -> None:
    assert fair_drain({"a": 10, "b": 10}, {}, {}, 2.0) == {"a": 10.0, "b": 10.0}
    # a weighs 3: it gets 1.5 jobs/s until its 10 are out (6.67 s), then b has the whole rate.
    got = fair_drain({"a": 10, "b": 10}, {"a": 3}, {}, 2.0)
    assert got["a"] == pytest.approx(20 / 3) and got["b"] == pytest.approx(10.0)
    # a capped at 0.5/s: b takes the rest of the rate; a's share it cannot use is not lost.
    got = fair_drain({"a": 10, "b": 10}, {}, {"a": 0.5}, 2.0)
    assert got["a"] == pytest.approx(20.0) and got["b"] == pytest.approx(10 / 1.5)
    assert fair_drain({"a": 5}, {}, {"a": 0.0}, 2.0) == {"a": math.inf}
    assert fair_drain({}, {}, {}, 2.0) == {}


def test_eta_counts_higher_priorities_first_and_the_tenants_own_queue() -> None:
    rate = 2.0
    assert eta({}, {("a", 5): 10}, {}, {}, rate) == {("a", 5): 5.0}
    # 20 jobs at priority 9 go first, whatever the tenant; lower priorities do not count.
    assert eta({"9": {"x": 20}, "1": {"y": 1000}}, {("a", 5): 10}, {}, {}, rate) == {("a", 5): 15.0}
    # a's own 6 waiting jobs are ahead of the quoted 4, sharing with b's 10.
    assert eta({"5": {"a": 6, "b": 10}}, {("a", 5): 4}, {}, {}, rate) == {("a", 5): 10.0}
    more = eta({"5": {"b": 100}}, {("a", 5): 10}, {}, {}, rate)[("a", 5)]
    less = eta({"5": {"b": 100}}, {("a", 5): 10}, {"a": 4}, {}, rate)[("a", 5)]
    assert more == 10.0 and less == pytest.approx(6.25)


def test_balance_is_null_with_a_reason_when_kie_cannot_be_reached(make_settings: Any) -> None:
    rt = Runtime(make_settings(base_url="http://127.0.0.1:9", connect_timeout=0.5, read_timeout=0.5))
    q = quote(rt, [("default", 5)] * 3)
    assert q["balance"] is None and q["balance_source"] is None and "KIE did not answer" in q["balance_reason"]
    assert q["jobs"] == 3 and q["credits"] == 3 * 12 and q["fits"] is True  # an unknown balance does not refuse
    assert "api_key" not in json.dumps(q).lower()


# -- end to end -----------------------------------------------------------------------------------

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
budget = "100/1d"
"""
PRICE = 7.0
RATE = "4/2s"  # 2 jobs a second
MINUTE = b":min:"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("quotes")
    tenants = workdir / "tenants.toml"
    tenants.write_text(TENANTS)
    env = {"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
           "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s", "KIE_LEASE": "8s",
           "KIE_VISIBILITY_TIMEOUT": "15s", "KIE_READ_TIMEOUT": "5s", "KIE_CONNECT_TIMEOUT": "2s",
           "KIE_HANDLERS": "redis_stream", "KIE_BALANCE_INTERVAL": "0", "KIE_TENANTS_FILE": str(tenants),
           "KIE_PRICES": f"extend={PRICE:g}", "KIE_SUBMIT_RATE": RATE, "KIE_MAX_IN_FLIGHT": "1000"}
    with DevStack(workdir, key_prefix=f"qt{uuid.uuid4().hex[:6]}", env=env) as st:
        st.start_simulator("--time-factor", "0.05", "--seed", "3")
        st.serve_url = st.start_serve()  # type: ignore[attr-defined]
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def request(stack: DevStack) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 10, "model": "V5", "style": "folk", "title": "Song"}


def post(stack: DevStack, path: str, body: Any, token: str = ADMIN) -> requests.Response:
    return requests.post(stack.serve_url + path, json=body,  # type: ignore[attr-defined]
                         headers={"Authorization": f"Bearer {token}"}, timeout=20)


def cli(stack: DevStack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", *args], env=stack.env, capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def wait_for(done: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen")


def everything(r: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key of the database with its serialized value (lists, queues, hashes alike)."""
    return {k: r.dump(k) for k in sorted(r.keys("*"))}


def waiting(stack: DevStack) -> dict[str, dict[str, int]]:
    url = stack.serve_url + "/v1/system"  # type: ignore[attr-defined]
    return requests.get(url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()["waiting_by_priority"]


def test_a_quote_enqueues_nothing_and_prices_the_jobs(stack: DevStack, tmp_path: Path) -> None:
    assert cli(stack, "pause", "--reason", "quotes").returncode == 0
    r = redis.Redis.from_url(stack.redis_url)
    time.sleep(1.5)  # the beat's first ticks have written what they write
    one = {"request": request(stack), "tenant": "shop"}
    many = {"jobs": [{"request": request(stack)} for _ in range(5)], "batch_id": "quoted-batch"}
    before = everything(r)
    # The tenant's token: its batch is checked (a new one: free) but not claimed.
    q1, q5 = post(stack, "/v1/quote", one), post(stack, "/v1/quote", many, token=SHOP)
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(json.dumps(request(stack)) + "\n" for _ in range(3)))
    out = cli(stack, "batch", "submit", str(lines), "--quote", "--json", "--tenant", "shop")
    text = cli(stack, "batch", "submit", str(lines), "--quote", "--tenant", "shop")
    after = everything(r)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # Only the beat's own bookkeeping may move meanwhile: its last tick's time and this minute's samples.
    assert len(before) > 5 and all(k.endswith(b":tick:last") or MINUTE in k for k in changed), changed
    assert q1.status_code == 200 and q5.status_code == 200, (q1.text, q5.text)
    assert q1.json()["jobs"] == 1 and q1.json()["credits"] == PRICE
    body = q5.json()
    assert body["jobs"] == 5 and body["credits"] == 5 * PRICE and body["tenants"]["shop"]["credits"] == 5 * PRICE
    assert set(body) >= {"jobs", "credits", "eta_seconds", "balance", "budget_left", "fits"}
    assert body["budget_left"] is None and body["fits"] is True  # shop has no budget
    # No beat snapshot (KIE_BALANCE_INTERVAL=0): a live call, the simulator's balance.
    assert body["balance_source"] == "live" and body["balance"] == float(stack.sim_stats()["credits"])
    assert out.returncode == 0, out.stderr
    cq = json.loads(out.stdout)
    assert cq["jobs"] == 3 and cq["credits"] == 3 * PRICE and cq["already_there"] == 0
    assert text.returncode == 0 and "credits" in text.stdout and "21" in text.stdout and "fits" in text.stdout
    assert cli(stack, "batch", "status", "quoted-batch").returncode == 3  # never created


def test_an_invalid_body_is_the_same_422_and_tenants_quote_their_own(stack: DevStack) -> None:
    bad = {"jobs": [{"request": {**request(stack), "continueAt": -1}}, {"request": request(stack), "colour": 1}]}
    quoted, submitted = post(stack, "/v1/quote", bad), post(stack, "/v1/jobs", bad)
    assert quoted.status_code == submitted.status_code == 422
    assert quoted.json() == submitted.json()
    other = post(stack, "/v1/quote", {"request": request(stack), "tenant": "blog"}, token=SHOP)
    assert other.status_code == 403 and other.json()["error"]["kind"] == "forbidden"
    # blog's batch (one job, at priority 0: below everything the ETA test counts) is not shop's to quote into.
    made = post(stack, "/v1/jobs", {"request": request(stack), "batch_id": "blogs-own", "priority": 0}, token=BLOG)
    assert made.status_code == 202, made.text
    theirs = post(stack, "/v1/quote", {"request": request(stack), "batch_id": "blogs-own"}, token=SHOP)
    assert theirs.status_code == 403 and "another tenant" in theirs.json()["error"]["message"], theirs.text
    own = post(stack, "/v1/quote", {"request": request(stack)}, token=SHOP)
    assert own.status_code == 200 and set(own.json()["tenants"]) == {"shop"}, own.text
    nobody = post(stack, "/v1/quote", {"request": request(stack)}, token="nope")
    assert nobody.status_code == 401


def test_an_invalid_file_is_reported_as_batch_submit_reports_it(stack: DevStack, tmp_path: Path) -> None:
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(request(stack)) + "\n" + json.dumps({**request(stack), "continueAt": -1}) + "\n")
    quoted = cli(stack, "batch", "submit", str(lines), "--quote")
    dry = cli(stack, "batch", "submit", str(lines), "--dry-run")
    assert quoted.returncode == dry.returncode != 0
    assert quoted.stderr == dry.stderr and "line 2" in quoted.stderr and quoted.stdout == ""


def test_eta_grows_with_work_ahead_and_shrinks_with_weight(stack: DevStack) -> None:
    settings = stack.settings()
    body = {"jobs": [{"request": request(stack)} for _ in range(10)], "tenant": "shop"}
    empty = post(stack, "/v1/quote", body).json()["eta_seconds"]
    # 10 jobs at 2 a second, nothing ahead: 5 s of submissions plus a generation.
    assert empty == math.ceil(5 + GENERATION_SECONDS), empty
    for _ in range(30):
        enqueue_extend(request(stack), tenant="blog", settings=settings)
    wait_for(lambda: waiting(stack).get("5", {}).get("blog") == 30, "blog's 30 jobs waiting (paused)")
    shared = post(stack, "/v1/quote", body).json()["eta_seconds"]
    # blog's 30 share the rate with shop's 10: shop is out after 10 s.
    assert shared == math.ceil(10 + GENERATION_SECONDS), shared
    urgent = post(stack, "/v1/quote", {**body, "priority": 1}).json()["eta_seconds"]
    assert urgent == math.ceil(15 + 5 + GENERATION_SECONDS), urgent  # below blog: all 30 go first
    put = requests.put(stack.serve_url + "/v1/tenants/shop", json={"weight": 4},  # type: ignore[attr-defined]
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert put.status_code == 200, put.text
    weighted = post(stack, "/v1/quote", body).json()["eta_seconds"]
    # shop weighs 4 of 5: 1.6 jobs/s, out after 6.25 s.
    assert weighted == math.ceil(6.25 + GENERATION_SECONDS), weighted
    assert empty < weighted < shared < urgent


def test_budget_left_and_fits_follow_the_budget_and_its_use(stack: DevStack) -> None:
    settings = stack.settings()
    five = {"jobs": [{"request": request(stack)} for _ in range(5)], "tenant": "capped"}
    q = post(stack, "/v1/quote", five).json()
    assert q["budget_left"] == 100 and q["credits"] == 35 and q["fits"] is True
    assert q["tenants"]["capped"]["budget_left"] == 100
    fifteen = {"jobs": [{"request": request(stack)} for _ in range(15)], "tenant": "capped"}
    assert post(stack, "/v1/quote", fifteen).json()["fits"] is False  # 105 > 100
    # Use some of it: resume, and two of capped's jobs run (charged the estimate, 7 each).
    assert cli(stack, "resume").returncode == 0
    jobs = [enqueue_extend(request(stack), tenant="capped", settings=settings) for _ in range(2)]
    wait_for(lambda: all(get_job(j, settings=settings)["state"] == "succeeded" for j in jobs), "capped's jobs", 120)
    q = post(stack, "/v1/quote", five).json()
    assert q["budget_left"] == 100 - 2 * PRICE and q["fits"] is True
    assert post(stack, "/v1/quote", {**five, "jobs": five["jobs"] * 3}).json()["fits"] is False  # 105 > 86
    # An admin lowers the budget at run time: the quote follows at once.
    out = cli(stack, "tenant", "set", "capped", "--budget", "40/1d")
    assert out.returncode == 0, out.stdout + out.stderr
    q = post(stack, "/v1/quote", five).json()
    assert q["budget_left"] == 40 - 2 * PRICE and q["fits"] is False  # 35 > 26


def test_balance_comes_from_the_latest_snapshot_and_fits_against_it(stack: DevStack) -> None:
    settings = stack.settings()
    r = redis.Redis.from_url(stack.redis_url)
    record_balance(r, Keys(settings.key_prefix), 20.0)  # as the tick would store it
    q = post(stack, "/v1/quote", {"jobs": [{"request": request(stack)} for _ in range(3)], "tenant": "shop"}).json()
    assert q["balance"] == 20.0 and q["balance_source"] == "snapshot" and q["credits"] == 21 and q["fits"] is False
    q = post(stack, "/v1/quote", {"request": request(stack), "tenant": "shop"}).json()
    assert q["fits"] is True
