"""The overview's charts: the SVG module (pure), the quantile arithmetic, the per-minute series the
transition script and the tick write (real Valkey, real pipeline against the simulator), and the
overview page that draws them (served by uvicorn)."""

from __future__ import annotations

import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from redis.crc import key_slot

from dash_server import ServedApp
from inline import Harness, harness_factory, sample_request
from kie_extend.config import Settings
from kie_extend.http import charts
from kie_extend.http.app import create_app
from kie_extend.store.keys import MINUTE_TTL, Keys
from kie_extend.infra.metrics import merge_bins, minute_series, quantile, record_tick
from kie_extend.simulator import SimConfig, SimServer, serve

SVG = "{http://www.w3.org/2000/svg}"


# -- charts.py: pure ---------------------------------------------------------------------------------

def _parse(markup: str) -> ET.Element:
    return ET.fromstring(markup)  # well-formed XML, or this raises


def test_line_chart_draws_one_polyline_per_run_scaled_to_a_round_top() -> None:
    labels = [f"12:{m:02d}" for m in range(5)]
    s = charts.Series("submitted", [0, 3, None, 7, 7], "c-1")
    root = _parse(charts.line_chart([s], labels, title="Subs <per> minute", chart_id="c"))
    assert root.get("id") == "c" and root.get("aria-label") == "Subs <per> minute"
    lines = root.findall(f"{SVG}polyline")
    assert [len(p.get("points", "").split()) for p in lines] == [2, 2]  # the None breaks the line
    ys = [float(pt.split(",")[1]) for p in lines for pt in p.get("points", "").split()]
    bottom, top = charts.HEIGHT - charts.PAD_B, charts.PAD_T
    assert ys[0] == pytest.approx(bottom)  # 0 on the axis
    assert min(ys) == pytest.approx(bottom - (bottom - top) * 7 / 10)  # 7 on an axis topped at 10
    axis = [t.text for t in root.iter(f"{SVG}text")]
    assert axis[:3] == ["0", "5", "10"] and "12:00" in axis and "12:04" in axis
    hovers = [t.text for c in root.iter(f"{SVG}circle") for t in c.findall(f"{SVG}title")]
    assert "12:03 · submitted: 7" in hovers and len(hovers) == 4
    assert "style=" not in charts.line_chart([s], labels, title="t")  # the CSP forbids inline styles
    assert "<script" not in charts.line_chart([s], labels, title="t")


def test_line_chart_edge_cases() -> None:
    empty = _parse(charts.line_chart([charts.Series("x", [None] * 3)], ["a", "b", "c"], title="none"))
    assert empty.findall(f"{SVG}polyline") == []  # no data, still a valid chart with its axis
    single = _parse(charts.line_chart([charts.Series("x", [None, 2.0, None])], ["a", "b", "c"], title="t"))
    assert len([c for c in single.iter(f"{SVG}circle") if "line" in (c.get("class") or "")]) == 1
    one = _parse(charts.line_chart([charts.Series("x", [4.0])], ["only"], title="t"))
    assert one.findall(f"{SVG}circle")
    with pytest.raises(ValueError):
        charts.line_chart([charts.Series("x", [1, 2])], ["a"], title="t")
    assert "&lt;b&gt;" in charts.legend([charts.Series("<b>", [1])])
    assert [charts.nice_max(v) for v in (0, 0.3, 1, 1.2, 3, 7, 24, 250, 251)] == [1, 1, 1, 2, 5, 10, 25, 250, 500]
    assert charts.fmt(2.0) == "2" and charts.fmt(2.25) == "2.2"


def test_quantile_interpolates_inside_buckets_like_prometheus() -> None:
    assert quantile({}, 0.5) is None and quantile({"10": 0}, 0.5) is None
    bins = {"10": 10, "30": 10}  # 10 in (0, 10], 10 in (10, 30]
    assert quantile(bins, 0.5) == pytest.approx(10.0)
    assert quantile(bins, 0.75) == pytest.approx(20.0)
    assert quantile(bins, 0.25) == pytest.approx(5.0)
    assert quantile({"60": 1, "+Inf": 9}, 0.9) == 60.0  # in +Inf: the highest finite bound
    assert quantile({"+Inf": 3}, 0.5) is None
    assert merge_bins([{"10": 1}, {"10": 2, "+Inf": 1}]) == {"10": 3, "+Inf": 1}


# -- the series in Redis and the page ----------------------------------------------------------------

@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=5, callbacks=False, rate_limit=1000))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Harness:
    return harness_factory(make_settings, sim, tick_interval=0.1)()


def test_jobs_fill_the_minute_series_and_the_overview_draws_it(harness: Harness, sim: SimServer,
                                                               make_settings: Callable[..., Settings]) -> None:
    rt = harness.rt
    keys = rt.keys
    assert key_slot(keys.minute(1).encode()) == key_slot(keys.job("x").encode())  # one hash slot
    ok = [harness.accept(sample_request(sim, title=f"ok {i}")) for i in range(3)]
    bad = harness.accept({**sample_request(sim), "uploadUrl": "not a url"})  # fails at once: invalid
    harness.run_until(lambda: all(harness.finished(j)() for j in ok))
    assert harness.state(bad)["state"] == "failed"
    series = minute_series(rt)
    assert len(series["submitted"]) == 60 and series["start"] % 60 == 0
    assert sum(series["submitted"]) == 3  # the invalid one was never sent
    assert sum(series["finished"]) == 4 and sum(series["succeeded"]) == 3 and sum(series["failed"]) == 1
    assert sum(merge_bins(series["time_to_result"]).values()) == 4
    assert any(v is not None for v in series["queued"])  # the ticks sampled the depth
    rt.gates.pause_operator("hold one")  # a queued job cancelled counts as finished and cancelled
    held = harness.accept(sample_request(sim, title="held"))
    assert harness.pipeline.cancel(held) == "cancelled"
    rt.gates.resume_operator()
    series = minute_series(rt)
    assert sum(series["finished"]) == 5 and sum(series["cancelled"]) == 1 and sum(series["submitted"]) == 3
    ttl = rt.redis.ttl(keys.minute(int(time.time() // 60)))
    assert 0 < ttl <= MINUTE_TTL
    # A deeper queue in the same minute raises the minute's figure; the highest one stays.
    now = time.time()
    rt.redis.zadd(keys.state_index("queued"), {f"fake-{i}": now for i in range(7)})
    record_tick(rt, now)
    rt.redis.zrem(keys.state_index("queued"), *[f"fake-{i}" for i in range(7)])
    record_tick(rt, now)
    assert minute_series(rt, now=now)["queued"][-1] == 7

    app = ServedApp(create_app(make_settings(base_url=sim.url), parts=("dashboard",)))
    try:
        html = requests.get(app.url + "/", timeout=10).text
    finally:
        app.stop()
    for chart_id in ("chart-throughput", "chart-depth", "chart-ttr"):
        m = re.search(rf'<svg class="chart"[^>]*id="{chart_id}".*?</svg>', html, re.S)
        assert m, chart_id
        root = _parse(m.group(0))
        assert root.findall(f"{SVG}polyline") or root.findall(f"{SVG}circle"), chart_id
    assert re.search(r"Last hour: 3 submitted, 5 finished\s+\(1 failed, 1 cancelled\)", html)
    assert re.search(r"p50 [0-9.]+ s, p90 [0-9.]+ s, p99 [0-9.]+ s", html)
    assert "<script" not in html


def test_an_empty_store_draws_empty_charts(make_settings: Callable[..., Settings]) -> None:
    app = ServedApp(create_app(make_settings(base_url="http://127.0.0.1:9"), parts=("dashboard",)))
    try:
        r = requests.get(app.url + "/", timeout=10)
    finally:
        app.stop()
    assert r.status_code == 200
    assert "Last hour: 0 submitted, 0 finished" in r.text and "p50 –, p90 –, p99 –" in r.text
    assert r.text.count('<svg class="chart"') == 3


def test_minute_keys_are_named_in_keys_py() -> None:
    assert Keys("p").minute(29_000_000) == "{p}:min:29000000"
    assert not math.isnan(MINUTE_TTL) and MINUTE_TTL >= 3600
