"""Credits: prices, the ledger (reserved at admission, settled with the terminal move), usage and
reconciliation against the simulator's balance. Real Valkey and the simulator over HTTP, the domain
code in this process (tests/inline.py); test_credits_e2e.py runs serve, workers and beat."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from inline import Harness, harness_factory, sample_request
from kie_extend.config import load_settings
from kie_extend.credits.ledger import job_credits, usage
from kie_extend.credits.prices import DEFAULT_PRICES, format_credits, parse_prices
from kie_extend.credits.reconcile import reconcile, record_balance
from kie_extend.errors import ConfigError
from kie_extend.simulator import SimConfig, SimServer, serve


def test_prices_parse_over_the_defaults() -> None:
    assert parse_prices("") == DEFAULT_PRICES
    got = parse_prices("extend=10, wav=0.5")
    assert got["extend"] == 10 and got["wav"] == 0.5 and got["stems"] == DEFAULT_PRICES["stems"]
    for bad, says in [("extnd=3", "unknown operation 'extnd'"), ("extend", "OPERATION=CREDITS"),
                      ("extend=-1", "at least 0"), ("extend=x", "a number of credits"), ("extend=1,extend=2", "twice"),
                      ("extend=inf", "finite")]:
        with pytest.raises(ValueError, match=says):
            parse_prices(bad)
    assert format_credits(12.0) == "12" and format_credits(0.4) == "0.4"


def test_prices_setting_refused_with_the_variable_named() -> None:
    with pytest.raises(ConfigError, match="KIE_PRICES.*unknown operation"):
        load_settings(_env_file=None, prices="extend=12,vidoe=2")
    assert load_settings(_env_file=None, prices="extend=7").prices["extend"] == 7


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=5, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim, balance_interval=0.1)


def _run_mix(h: Harness, n: int, **sim_knobs: Any) -> list[str]:
    h.sim.simulator.update_config({"fault_generation_fail": 0.5, **sim_knobs})
    h.scheduler.tick()  # the first balance snapshot, before any job
    model = "V6" if h.rt.settings.route == "jobs" else "V5"
    jobs = [h.accept(sample_request(h.sim, model=model), tenant="shop" if i % 2 else "blog") for i in range(n)]
    h.run_until(lambda: all(h.finished(j)() for j in jobs), timeout=60)
    time.sleep(0.15)
    h.scheduler.tick()  # a snapshot after every refund has shown
    return jobs


@pytest.mark.parametrize("route,codes,price", [("legacy", "501,531", 12), ("jobs", "400,501", 10)])
def test_ledger_adds_up_and_matches_the_balance(harness: Callable[..., Harness], route: str, codes: str,
                                                price: float) -> None:
    """Some jobs succeed, some fail charged (501), some fail refunded (531, createTask's 400). The
    simulator costs 12 a task; on createTask its creditsConsumed wins over a lower estimate."""
    h = harness(route=route, prices=f"extend={price}")
    cost = 12.0
    start = float(h.sim.simulator.credits)
    jobs = _run_mix(h, 12, fail_codes=codes)
    refunded_jobs = charged_failures = succeeded = 0
    for job in jobs:
        raw = h.state(job)
        credits = job_credits(raw)
        assert credits["reserved"] == price and "cr_open" not in raw, raw
        if raw["state"] == "succeeded":
            succeeded += 1
            assert credits == {"reserved": price, "charged": cost, "refunded": 0}
        else:
            err = json.loads(raw["error"])
            assert err["kind"] == "generation_failed", err
            if err.get("code") == 531:  # refunded by the provider (createTask's 400 is reported as 531)
                refunded_jobs += 1
                assert credits == {"reserved": price, "charged": 0, "refunded": price}
            else:
                charged_failures += 1
                assert credits == {"reserved": price, "charged": cost, "refunded": 0}
    assert succeeded and refunded_jobs and charged_failures, (succeeded, refunded_jobs, charged_failures)
    report = usage(h.rt.redis, h.rt.keys, 3600)
    total = report["total"]
    assert total == {"reserved": 12 * price, "charged": cost * (succeeded + charged_failures),
                     "refunded": price * refunded_jobs, "open": 0}
    assert set(report["tenants"]) == {"shop", "blog"}
    assert report["tenants"]["shop"]["operations"]["extend"]["reserved"] == 6 * price
    # The simulator's balance fell by exactly what the ledger charged; reconcile says so.
    assert start - float(h.sim.simulator.credits) == total["charged"]
    rec = reconcile(h.rt.redis, h.rt.keys, 3600)
    assert rec["fall"] == total["charged"] and rec["difference"] == 0 and rec["complete"], rec


def test_reconcile_with_the_balance_now_counts_a_job_after_the_last_snapshot(
        harness: Callable[..., Harness]) -> None:
    """A job settled after the tick's last snapshot is in the ledger but not in that snapshot's
    fall; the balance read now (what `credits --reconcile` passes) ends the window after it."""
    h = harness(balance_interval=3600)  # one snapshot per hour: the first tick's
    h.scheduler.tick()
    time.sleep(0.01)
    record_balance(h.rt.redis, h.rt.keys, h.rt.client.credits())  # a second one, as the tick would store it
    job = h.accept(sample_request(h.sim))
    h.run_until(h.finished(job), timeout=60)
    assert h.state(job)["state"] == "succeeded"
    stale = reconcile(h.rt.redis, h.rt.keys, 3600)  # both readings precede the job
    assert stale["snapshots"] == 2 and stale["fall"] == 0 and stale["difference"] == -12, stale
    rec = reconcile(h.rt.redis, h.rt.keys, 3600, balance_now=h.rt.client.credits())
    assert rec["fall"] == rec["charged"] == 12 and rec["difference"] == 0 and rec["complete"], rec


def test_redelivery_after_the_end_charges_nothing_more(harness: Callable[..., Harness]) -> None:
    """A redelivered message and a late due step of a finished job find no open reservation."""
    h = harness()
    request = sample_request(h.sim)
    job = h.accept(request)
    h.run_until(h.finished(job))
    before = usage(h.rt.redis, h.rt.keys, 3600)["total"]
    h.pipeline.accept(job, request)  # the same message again (acks late, worker lost)
    h.pipeline.advance(job)
    h.scheduler.tick()
    h.drain()
    assert usage(h.rt.redis, h.rt.keys, 3600)["total"] == before == {"reserved": 12, "charged": 12, "refunded": 0,
                                                                      "open": 0}
    assert job_credits(h.state(job)) == {"reserved": 12, "charged": 12, "refunded": 0}


def test_cancelled_and_invalid_jobs_cost_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.rt.gates.pause_operator("hold")  # admission stops: a queued job is not admitted
    queued = h.accept(sample_request(h.sim))
    assert h.pipeline.cancel(queued) == "cancelled"
    bad = h.accept({"model": "V9"})
    assert h.state(bad)["state"] == "failed"
    for job in (queued, bad):
        assert job_credits(h.state(job)) == {"reserved": 0, "charged": 0, "refunded": 0}
    assert usage(h.rt.redis, h.rt.keys, 3600)["total"]["reserved"] == 0


def test_held_back_needs_a_wait_mark_and_a_budget_in_force(make_settings: Callable[..., Any], tmp_path: Any) -> None:
    """Who listings mark ``waiting_for: "budget"``: a tenant the admission script held back
    (``budget_wait``) that still has a budget, the file's or one set at run time."""
    from kie_extend.credits.budgets import held_back
    from kie_extend.tenants.settings import NONE

    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.capped]\nbudget = "36/1d"\n[tenants.free]\n[tenants.lifted]\nbudget = "10/1h"\n')
    settings = make_settings(tenants_file=str(path))
    marks = [b"capped", b"free", b"lifted", "gone"]
    assert held_back(settings, marks, {}) == {"capped", "lifted"}
    runtime = {b"lifted|budget": NONE.encode(), "free|budget": "100 86400"}  # lifted, and one set at run time
    assert held_back(settings, marks, runtime) == {"capped", "free"}
    assert held_back(settings, [], runtime) == set()
    assert held_back(make_settings(), marks, runtime) == set()  # no tenants file: no budgets
