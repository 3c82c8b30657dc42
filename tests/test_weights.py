"""Weighted fair admission and run-time tenant settings (README "Tenants as boundaries"): the admission
script on a real Valkey with many queued jobs, the settings hash every process reads, and audit entries."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inline import Harness, harness_factory, sample_request
from kie_extend.errors import ValidationError
from kie_extend.simulator import SimConfig, SimServer, serve
from kie_extend.tenants import audit
from kie_extend.tenants.settings import UnknownTenant, effective, parse_changes, set_tenant

req = sample_request

TOML = """
[tenants.light]
weight = 1
[tenants.heavy]
weight = 3
[tenants.other]
"""


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=7, callbacks=False, rate_limit=100000))
    yield server
    server.stop()


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(TOML)
    return path


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim, tick_interval=0.1)


def _fill(h: Harness, counts: dict[str, int], priority: int = 5) -> dict[str, list[str]]:
    h.rt.gates.pause_operator("hold while the queues fill")
    out = {t: [h.accept(req(h.sim), tenant=t, priority=priority) for _ in range(n)] for t, n in counts.items()}
    h.rt.gates.resume_operator()
    return out


def _admit_order(h: Harness, n: int) -> list[str]:
    """The tenants of the next ``n`` admissions, in order (one admission per call, as slots free)."""
    tenant_of = {}
    order = []
    for _ in range(n):
        got = h.rt.admission.admit(1)
        assert len(got) == 1
        job = got[0].job_id
        tenant_of[job] = tenant_of.get(job) or h.state(job)["tenant"]
        order.append(tenant_of[job])
    return order


def test_weights_share_slots_one_to_three(harness: Callable[..., Harness], tenants_file: Path) -> None:
    h = harness(submit_rate="100000/1s", max_in_flight=100000, tenants_file=str(tenants_file))
    _fill(h, {"light": 150, "heavy": 150})
    order = _admit_order(h, 200)
    shares = Counter(order)
    # Both stay backlogged for all 200 admissions: heavy takes 3 of every 4 slots.
    assert abs(shares["heavy"] / 200 - 0.75) <= 0.075 * 0.75, shares
    assert shares["heavy"] == 150 and shares["light"] == 50, shares
    # Interleaved by turns: never more than 3 of heavy in a row, never 2 of light in a row.
    runs = "".join("H" if t == "heavy" else "L" for t in order)
    assert "HHHH" not in runs and "LL" not in runs, runs


def test_weight_one_keeps_the_plain_round_robin(harness: Callable[..., Harness]) -> None:
    h = harness(submit_rate="100000/1s", max_in_flight=100000)
    _fill(h, {"A": 6, "B": 3, "C": 2})
    order = _admit_order(h, 11)
    assert order == ["A", "B", "C", "A", "B", "C", "A", "B", "A", "A", "A"], order


def test_run_time_weight_applies_at_the_next_admission(harness: Callable[..., Harness], tenants_file: Path) -> None:
    h = harness(submit_rate="100000/1s", max_in_flight=100000, tenants_file=str(tenants_file))
    _fill(h, {"light": 100, "other": 100})
    assert Counter(_admit_order(h, 20)) == {"light": 10, "other": 10}
    changes = set_tenant(h.rt.redis, h.rt.keys, h.rt.settings, "other", weight=4)
    assert [(c.field, c.old, c.new) for c in changes] == [("weight", 1, 4)]
    assert Counter(_admit_order(h, 50)) == {"light": 10, "other": 40}
    set_tenant(h.rt.redis, h.rt.keys, h.rt.settings, "other", weight="default")
    assert effective(h.rt.redis, h.rt.keys, h.rt.settings)["other"].weight == 1
    assert Counter(_admit_order(h, 20)) == {"light": 10, "other": 10}


def test_run_time_rate_cap_and_none(harness: Callable[..., Harness], tenants_file: Path) -> None:
    h = harness(submit_rate="100000/1s", max_in_flight=100000, tenants_file=str(tenants_file),
                tenant_limits="light=1/1h")
    _fill(h, {"light": 5, "other": 5})
    first = Counter(_admit_order(h, 6))
    assert first == {"light": 1, "other": 5}  # KIE_TENANT_LIMITS: one slot an hour for light
    assert h.rt.admission.admit(5) == []
    set_tenant(h.rt.redis, h.rt.keys, h.rt.settings, "light", rate="none")
    assert len(h.rt.admission.admit(10)) == 4  # the run-time "none" lifts the cap at once
    eff = effective(h.rt.redis, h.rt.keys, h.rt.settings)["light"]
    assert eff.rate is None and eff.public()["rate"] is None
    set_tenant(h.rt.redis, h.rt.keys, h.rt.settings, "light", rate="default")
    assert effective(h.rt.redis, h.rt.keys, h.rt.settings)["light"].public()["rate"] == "1/3600s"


def test_set_refuses_unknown_tenants_and_bad_values(make_settings: Callable[..., Any], tenants_file: Path) -> None:
    from kie_extend.infra.runtime import Runtime

    rt = Runtime(make_settings(tenants_file=str(tenants_file)))
    with pytest.raises(UnknownTenant):
        set_tenant(rt.redis, rt.keys, rt.settings, "invented", weight=2)
    with pytest.raises(ValidationError) as exc:
        set_tenant(rt.redis, rt.keys, rt.settings, "light", weight=0, rate="fast", budget="lots")
    assert {e["field"] for e in exc.value.errors} == {"weight", "rate", "budget"}
    for bad in (1001, "x", True, 2.5, -1):
        with pytest.raises(ValidationError):
            parse_changes(weight=bad)
    with pytest.raises(ValidationError):
        parse_changes()
    with pytest.raises(ValidationError) as exc:  # a budget's zero is told as a budget's, not a rate's
        parse_changes(budget="0/1d")
    assert exc.value.errors[0]["message"].startswith("'0/1d': the count and the window must be positive"), exc.value
    for bad, told in (("10/30s", "use 1h or longer, in hours (got 30s)"), ("10/90m", "(got 1.5h)"),
                      ("10/36d", "at most 35d")):  # spend is kept in hour buckets for 35 days
        with pytest.raises(ValidationError) as exc:
            parse_changes(budget=bad)
        assert told in exc.value.errors[0]["message"], exc.value
    assert parse_changes(budget="10/2h")["budget"] == "10 7200"
    changes = set_tenant(rt.redis, rt.keys, rt.settings, "light", budget="500/1d", rate="2/10s")
    assert {(c.field, c.old, c.new) for c in changes} == {("budget", None, "500/1d"), ("rate", None, "2/10s")}
    eff = effective(rt.redis, rt.keys, rt.settings)["light"]
    assert eff.budget == (500, 86400.0) and eff.rate == (2, 10.0)
    assert set_tenant(rt.redis, rt.keys, rt.settings, "light", budget="500/1d") == []  # nothing changed
    # Without a tenants file there is no tenant to set.
    bare = Runtime(make_settings())
    with pytest.raises(UnknownTenant):
        set_tenant(bare.redis, bare.keys, bare.settings, "light", weight=2)
    assert effective(bare.redis, bare.keys, bare.settings) == {}


def test_audit_stream_is_capped_and_newest_first(make_settings: Callable[..., Any]) -> None:
    from kie_extend.infra.runtime import Runtime

    rt = Runtime(make_settings())
    for i in range(3):
        audit.record(rt.redis, rt.keys, who="admin", via="api", action="pause", old={"paused": False},
                     new={"paused": True, "reason": f"r{i}"})
    entries = audit.recent(rt.redis, rt.keys, 2)
    assert [e["new"]["reason"] for e in entries] == ["r2", "r1"]
    assert entries[0]["who"] == "admin" and entries[0]["action"] == "pause" and entries[0]["ts"].endswith("Z")
    marker = uuid.uuid4().hex
    audit.record(rt.redis, rt.keys, who="x", via="cli", action="resume", new=marker)
    assert audit.recent(rt.redis, rt.keys, 1)[0]["new"] == marker
