"""kie-extend benchmarks: ``make bench`` or ``.venv/bin/python bench/run.py [--only NAME[,NAME]]``.

Every scenario starts its own local system with DevStack (embedded Valkey, the simulator,
``kie-extend serve --callbacks-only``, Celery workers and beat) on loopback, runs under a time
budget, prints each figure next to its target, and the run ends with one table and
``bench/results.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from celery import Celery  # noqa: E402

from harness import (  # noqa: E402
    BenchStack,
    Results,
    ScenarioTimeout,
    children_of,
    cpu_delta,
    extend_request,
    iso_ts,
    job_records,
    machine_meta,
    median,
    pct,
    queue_drained,
    rss_kib,
    stack_cpu,
    stats_hash,
    time_limit,
    wait_terminal,
    wait_until,
)
from gate_model import run_models  # noqa: E402
from kie_extend.api import enqueue_many, get_job  # noqa: E402
from kie_extend.store.keys import Keys  # noqa: E402

BENCH = Path(__file__).resolve().parent
PREFIX = "bench"
# Key names as the project builds them (under the prefix's hash tag: "{bench}:job:...").
K = Keys(PREFIX)

# The provider allows 20 new submissions per 10 s; the benchmarks scale that window to 1 s.
LIMIT, WINDOW = 20, 1.0
MARGIN = "0.02s"
SIM_LIMIT = ("--rate-limit", str(LIMIT), "--rate-window", f"{WINDOW:g}")
KIE_LIMIT = {"KIE_SUBMIT_RATE": f"{LIMIT}/{WINDOW:g}s", "KIE_SUBMIT_RATE_MARGIN": MARGIN}
# The beat tick (default 1 s against a 10 s provider window) scaled by the same 1/10.
TICK = "0.1s"
NO_LIMIT_SIM = ("--rate-limit", "100000000")
NO_LIMIT_KIE = {"KIE_SUBMIT_RATE": "100000000/1s", "KIE_MAX_IN_FLIGHT": "1000000"}
# The project's poll schedule settings; the scaled scenarios use their defaults times the time factor.
POLL_KNOBS = ("poll_first", "poll_interval", "poll_max_interval", "poll_callback_interval")


def poll_env(factor: float) -> dict[str, str]:
    """KIE_POLL_* = the project's own defaults (read from Settings) scaled by ``factor``."""
    from kie_extend.config import Settings

    out = {}
    for name in POLL_KNOBS:
        if name in Settings.model_fields:
            out[f"KIE_{name.upper()}"] = f"{round(float(Settings.model_fields[name].default) * factor, 3)}s"
    return out


def wait_ready(*children: Any, timeout: float = 60) -> None:
    """Wait until each Celery worker logged ``ready.``."""
    for child in children:
        def ready(child: Any = child) -> bool:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited; see {child.log_path}")
            return " ready." in Path(child.log_path).read_text(errors="replace")
        wait_until(ready, timeout, 0.1, f"{child.name} to be ready")


def enqueue(st: BenchStack, n: int, callback_url: str | None = None) -> tuple[list[str], float, float]:
    """enqueue_many ``n`` valid jobs; returns (ids, wall time before, seconds the call took)."""
    settings = st.settings()
    assert st.sim_url
    items = [{"request": extend_request(st.sim_url, i, callback_url)} for i in range(n)]
    t0 = time.time()
    ids = enqueue_many(items, settings=settings)
    return ids, t0, time.time() - t0


def sim_times(st: BenchStack, records: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """job id -> the simulator's record of its task (created/done wall times, duration)."""
    tasks = st.sim_tasks()
    return {j: tasks[rec["kie_task_id"]] for j, rec in records.items() if rec.get("kie_task_id") in tasks}


def window_max(times: list[float], window: float) -> int:
    """Most events inside any half-open window of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def rate_ratio(times: list[float]) -> tuple[float, float, float]:
    """(ratio to the limit, unbiased rate, span) of submissions under a rolling LIMIT/WINDOW limit.

    A rolling-window limiter lets the first LIMIT go at once, so N submissions need at least
    (ceil(N/LIMIT) - 1) * WINDOW from first to last; rate = (N - LIMIT) / span is exact for a sender that
    keeps every window full, and ratio = rate / (LIMIT / WINDOW).
    """
    times = sorted(times)
    span = times[-1] - times[0]
    n = len(times)
    rate = (n - LIMIT) / span if span > 0 else float("nan")
    return rate / (LIMIT / WINDOW), rate, span


# ==================================================================================================
# 1. at the limit
# ==================================================================================================
def scenario_limit(res: Results, workdir: Path) -> None:
    """300 jobs against a 20/1 s provider limit: the submission rate achieved and 429s received."""
    n, tf = 300, 0.01
    env = {**KIE_LIMIT, "KIE_TICK_INTERVAL": TICK, "KIE_MAX_IN_FLIGHT": "1000",
           "KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s"}
    with BenchStack(workdir / "limit", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", str(tf), *SIM_LIMIT, "--seed", "1")
        st.start_serve(callbacks_only=True)
        workers = [st.start_worker(concurrency=1), st.start_worker(concurrency=1)]
        st.start_beat()
        wait_ready(*workers)
        r = st.redis()
        ids, t0, _ = enqueue(st, n)
        wait_terminal(r, PREFIX, ids, timeout=120)
        recs = job_records(r, PREFIX, ids)
        sim = st.sim_stats()
        created = [t["created"] for t in st.sim_tasks().values()]
        ratio, rate, span = rate_ratio(created)
        submitted = [float(x["submitted_ts"]) for x in recs.values() if x.get("submitted_ts")]
        ratio_ts, _, span_ts = rate_ratio(submitted)
        states = [x.get("state") for x in recs.values()]
        kstats = stats_hash(r, PREFIX)
        res.detail("limit", jobs=n, workers="2 instances x concurrency 1", time_factor=tf, env=env,
                   sim_flags=["--time-factor", tf, *SIM_LIMIT], accepted=sim["submissions_accepted"],
                   rate_limited=sim["rate_limited"], span_s=span, span_submitted_ts_s=span_ts,
                   naive_rate_n_over_span=len(created) / span if span else None,
                   max_in_any_window=window_max(created, WINDOW), first_submission_after_enqueue_s=min(created) - t0,
                   succeeded=states.count("succeeded"), kie_stats=kstats, sim_codes=sim.get("codes"))
        ideal = (math.ceil(n / LIMIT) - 1) * WINDOW
        res.add("limit", "achieved submit rate / limit (sim arrival times)", ratio, ">= 0.95", ratio >= 0.95,
                note=f"{len(created)} accepted over {span:.2f}s, ideal span {ideal:.0f}s; rate=(N-{LIMIT})/span="
                     f"{rate:.2f}/s vs {LIMIT / WINDOW:g}/s; KIE_SUBMIT_RATE_MARGIN={MARGIN}; 2 workers x c=1")
        res.add("limit", "achieved submit rate / limit (job submitted_ts)", ratio_ts, ">= 0.95", None)
        res.add("limit", "429 answers received (sim rate_limited)", int(sim["rate_limited"]), "== 0",
                sim["rate_limited"] == 0)
        res.add("limit", "most accepted in any 1 s window", window_max(created, WINDOW), f"<= {LIMIT}", None)
        # A booked slot is the send LIMIT earlier plus window + margin: any lateness between the slot and the
        # real send is carried into every later window. Spacing of sends LIMIT apart shows it.
        srt = sorted(created)
        spacing = [srt[k] - srt[k - LIMIT] for k in range(LIMIT, len(srt))]
        book = WINDOW + float(MARGIN.rstrip("s"))
        res.detail("limit", spacing_limit_apart_s={"p50": pct(spacing, 0.5), "p90": pct(spacing, 0.9),
                                                   "max": max(spacing), "min": min(spacing)})
        res.add("limit", f"spacing of sends {LIMIT} apart, median", pct(spacing, 0.5), f"ideal {book:g} s", None, "s",
                note=f"p90 {pct(spacing, 0.9):.3f}s, min {min(spacing):.3f}s; the excess over window + margin is "
                     f"the lateness from booked slot to the provider's acceptance, paid once per window")
        res.add("limit", "jobs succeeded", states.count("succeeded"), f"== {n}", states.count("succeeded") == n)

        # ---- the gate alone: real Gates.acquire, an ideal dispatcher plus chosen lateness -----------
        for child in st.children:
            if child.name != "simulator":
                child.stop()
        tick = float(TICK.rstrip("s"))
        models = run_models(st.redis_url, [0.0, tick], n=n, limit=LIMIT, window=WINDOW,
                            margin=float(MARGIN.rstrip("s")), tick=tick, timeout=60)
        res.detail("limit", gate_model=models)
        for m in models:
            res.add("limit", f"gate alone: rate / limit, dispatch lateness U(0, {m['lateness']:g}s)", m["ratio"],
                    "", None, note=f"real Admission.admit (tick {tick:g}s ahead) + Gates.acquire on Valkey, no "
                                   f"Celery; {m['wait_verdicts']} wait / {m['lost_verdicts']} lost verdicts "
                                   f"(bench/gate_model.py)")


# ==================================================================================================
# 2. few slots: kie-extend vs a naive sleep-and-poll task on the same two processes
# ==================================================================================================
def scenario_slots(res: Results, workdir: Path) -> None:
    n, tf, dmin, dmax = 300, 0.35, 40.0, 120.0
    naive_n, naive_cap = 6, 200.0
    polls = poll_env(tf)
    env = {**KIE_LIMIT, "KIE_TICK_INTERVAL": TICK, "KIE_MAX_IN_FLIGHT": "1000", **polls}
    with BenchStack(workdir / "slots", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", str(tf), "--duration-min", str(dmin), "--duration-max", str(dmax),
                           *SIM_LIMIT, "--seed", "2")
        st.start_serve(callbacks_only=True)
        worker = st.start_worker(concurrency=2)
        beat = st.start_beat()
        wait_ready(worker)
        r = st.redis()
        ids, t0, _ = enqueue(st, n)
        wait_terminal(r, PREFIX, ids, timeout=240, interval=0.2)
        recs = job_records(r, PREFIX, ids)
        finished = [iso_ts(x.get("finished_at")) or 0.0 for x in recs.values()]
        makespan = max(finished) - t0
        tasks = sorted(sim_times(st, recs).values(), key=lambda t: t["created"])
        # Ideal rate-bound schedule: the k-th submission (in the simulator's order) at floor(k/L)*W,
        # then its own generation time; the makespan is the latest of those.
        ideal_exact = max(math.floor(k / LIMIT) * WINDOW + t["duration"] for k, t in enumerate(tasks))
        ideal_formula = (math.ceil(n / LIMIT) - 1) * WINDOW + dmax * tf
        sim = st.sim_stats()
        states = [x.get("state") for x in recs.values()]
        res.detail("slots", jobs=n, time_factor=tf, generation_s=[dmin * tf, dmax * tf], env=env,
                   workers="1 instance x concurrency 2", callbacks=True, makespan_s=makespan,
                   ideal_exact_s=ideal_exact, ideal_formula_s=ideal_formula, polls=sim["polls"],
                   callbacks_sent=sim["callbacks_sent"], rate_limited=sim["rate_limited"],
                   succeeded=states.count("succeeded"),
                   submit_span_s=max(t["created"] for t in tasks) - min(t["created"] for t in tasks))
        ratio = makespan / ideal_exact
        res.add("slots", "kie-extend makespan (300 jobs, 2 processes)", makespan, "", None, "s",
                note=f"gen {dmin * tf:.0f}-{dmax * tf:.0f}s (40-120 s x {tf}), callbacks on, polls {polls}")
        res.add("slots", "rate-bound ideal makespan", ideal_exact, "", None, "s",
                note=f"max_k(floor(k/{LIMIT})*{WINDOW:g}s + gen_k) over the actual generation times; "
                     f"formula bound (ceil(N/L)-1)*W + max gen = {ideal_formula:.1f}s")
        res.add("slots", "makespan / ideal", ratio, "<= 1.10", ratio <= 1.10)
        sim_by_job = sim_times(st, recs)
        lat = [iso_ts(recs[j]["finished_at"]) - t["done"] for j, t in sim_by_job.items()  # type: ignore[operator]
               if recs[j].get("finished_at")]
        span = max(t["created"] for t in tasks) - min(t["created"] for t in tasks)
        res.detail("slots", done_to_finished_p95_s=pct(lat, 0.95), done_to_finished_max_s=max(lat),
                   first_submission_after_enqueue_s=min(t["created"] for t in tasks) - t0)
        res.add("slots", "where the gap is: submission span / ideal span", span / ((math.ceil(n / LIMIT) - 1) * WINDOW),
                "", None, note=f"first to last accepted submission {span:.1f}s vs {(math.ceil(n / LIMIT) - 1) * WINDOW:g}s "
                               f"at the limit; provider done -> finished_at p95 {pct(lat, 0.95):.2f}s, "
                               f"max {max(lat):.2f}s")

        # ---- the naive design on the same two slots ----------------------------------------------
        for child in (worker, beat):
            child.stop()
        naive = st.start_naive_worker(concurrency=2, queue="bench_naive")
        wait_ready(naive)
        producer = Celery("bench_naive_producer", broker=st.redis_url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        run = uuid.uuid4().hex[:8]
        interval = float(polls["KIE_POLL_INTERVAL"].rstrip("s"))
        assert st.sim_url
        t1 = time.time()
        for i in range(naive_n):
            producer.send_task("naive.extend", queue="bench_naive", kwargs={
                "run": run, "job": f"n{i}", "sim_url": st.sim_url, "api_key": "naive-key",
                "body": {**extend_request(st.sim_url, i), "callBackUrl": "http://127.0.0.1:9/unused"},
                "poll_interval": interval, "rate_window": WINDOW, "timeout": 300})
        key = f"bench:naive:{run}"
        try:
            wait_until(lambda: r.hlen(key) >= naive_n, naive_cap, 0.25, "naive jobs")
            capped = False
        except TimeoutError:
            capped = True
        done = [json.loads(v) for v in r.hgetall(key).values()]
        naive.stop(timeout=3)
        if not done:
            raise RuntimeError(f"no naive job finished within {naive_cap:.0f}s")
        occupancy = [d["finished"] - d["started"] for d in done]
        if not capped:
            naive_make = max(d["finished"] for d in done) - t1
            naive_300 = naive_make * n / naive_n
            how = f"measured on {naive_n} jobs ({naive_make:.1f}s), scaled linearly x{n / naive_n:.0f}"
        else:
            naive_make = float("nan")
            naive_300 = sum(occupancy) / len(occupancy) * n / 2
            how = f"capped at {naive_cap:.0f}s: {len(done)} jobs done; mean occupancy x {n} / 2 slots"
        naive_occ_300 = sum(occupancy) / len(occupancy) * n / 2
        res.detail("slots", naive_jobs=naive_n, naive_done=len(done), naive_makespan_subset_s=naive_make,
                   naive_poll_interval_s=interval, naive_mean_occupancy_s=sum(occupancy) / len(occupancy),
                   naive_makespan_300_extrapolated_s=naive_300, naive_makespan_300_by_occupancy_s=naive_occ_300,
                   naive_polls_per_job=sum(d["polls"] for d in done) / len(done))
        res.add("slots", "naive makespan for 300 (EXTRAPOLATED)", naive_300, "", None, "s",
                note=how + f"; sleep-and-poll every {interval:g}s; by mean occupancy: {naive_occ_300:.0f}s")
        speed = naive_300 / makespan
        res.add("slots", "speed-up kie-extend vs naive", speed, ">= 10x", speed >= 10, "x")


# ==================================================================================================
# 3. polling cost, with and without callbacks
# ==================================================================================================
def scenario_polling(res: Results, workdir: Path) -> None:
    """Polls per job and provider-done -> finished_at, in a deployment without callbacks (no callback route,
    the simulator sends none) and with them (serve --callbacks-only started, the simulator sends text/first/complete)."""
    n, tf, dmin, dmax = 100, 0.1, 40.0, 120.0
    polls = poll_env(tf)
    env = {**KIE_LIMIT, "KIE_TICK_INTERVAL": TICK, "KIE_MAX_IN_FLIGHT": "1000", **polls}
    max_interval = float(polls["KIE_POLL_MAX_INTERVAL"].rstrip("s"))
    # An extra, unjudged run: the first poll near the shortest generation (35 provider seconds)
    # instead of the default, to show what the schedule itself costs.
    late_first = {"KIE_POLL_FIRST": f"{round(35 * tf, 3)}s"}
    no_callbacks = "http://127.0.0.1:9/kie/callback/unused"  # the provider requires a callBackUrl
    phases = (("without callbacks", False, {}, True),
              (f"without callbacks, KIE_POLL_FIRST=35s x {tf}", False, late_first, False),
              ("with callbacks", True, {"KIE_POLL_FIRST": polls["KIE_POLL_FIRST"]}, True))
    with BenchStack(workdir / "polling", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", str(tf), "--duration-min", str(dmin), "--duration-max", str(dmax),
                           *SIM_LIMIT, "--seed", "3")
        worker, beat = None, None
        r = st.redis()
        for number, (label, callbacks, extra_env, judged) in enumerate(phases):
            for child in (worker, beat):
                if child is not None:
                    child.stop()
            st.env.update(extra_env)
            if callbacks:
                st.start_serve(callbacks_only=True)  # sets KIE_CALLBACK_BASE_URL for the worker started next
            worker = st.start_worker(concurrency=2, name=f"worker-{number + 1}")
            beat = st.start_beat()
            wait_ready(worker)
            st.sim_reset()
            st.sim_config(callbacks=callbacks)
            ids, _, _ = enqueue(st, n, callback_url=None if callbacks else no_callbacks)
            wait_terminal(r, PREFIX, ids, timeout=120)
            time.sleep(0.5)  # late callbacks' polls land in the counters too
            recs = job_records(r, PREFIX, ids)
            sim = st.sim_stats()
            times = sim_times(st, recs)
            lat = [iso_ts(recs[j]["finished_at"]) - t["done"] for j, t in times.items()  # type: ignore[operator]
                   if recs[j].get("finished_at")]
            per_job = sim["polls"] / n
            p95 = pct(lat, 0.95)
            res.detail("polling", **{label: {
                "jobs": n, "polls": sim["polls"], "callbacks_sent": sim["callbacks_sent"], "env": {**polls, **extra_env},
                "callbacks_served": callbacks, "poll_codes": sim["codes"].get("GET /api/v1/generate/record-info"),
                "latency_p50_s": pct(lat, 0.5), "latency_p95_s": p95, "latency_max_s": max(lat),
                "latency_min_s": min(lat), "states": {s: [x.get("state") for x in recs.values()].count(s)
                                                      for s in ("succeeded", "failed")}}})
            if not judged:
                res.add("polling", f"record-info calls per job {label}", per_job, "", None,
                        note=f"p95 done -> finished_at {p95:.2f}s (max {max(lat):.2f}s)")
            elif callbacks:
                res.add("polling", f"record-info calls per job {label}", per_job, "<= 1.2", per_job <= 1.2,
                        note=f"{sim['callbacks_sent']} callbacks for {n} jobs (text, first, complete per task)")
                res.add("polling", f"provider done -> finished_at p95 {label}", p95, "<= 1 s", p95 <= 1.0, "s",
                        note=f"p50 {pct(lat, 0.5):.3f}s, max {max(lat):.2f}s")
            else:
                res.add("polling", f"record-info calls per job {label}", per_job, "<= 4", per_job <= 4,
                        note=f"no callback route; gen {dmin * tf:.0f}-{dmax * tf:.0f}s (40-120 s x {tf}); poll settings "
                             f"= project defaults x {tf}: {polls}; tick {TICK}")
                res.add("polling", f"provider done -> finished_at p95 {label}", p95,
                        f"<= {max_interval:g} s (KIE_POLL_MAX_INTERVAL)", p95 <= max_interval, "s",
                        note=f"p50 {pct(lat, 0.5):.2f}s, max {max(lat):.2f}s; 'done' = simulator task "
                             f"creation + its total generation time (exact, from bench/simtap.py)")


# ==================================================================================================
# 4. overhead against a raw Celery no-op
# ==================================================================================================
def noop_round(st: BenchStack, n: int) -> tuple[float, float, dict[str, float]]:
    """Send ``n`` no-op tasks to the running no-op worker and wait until its queue is drained:
    ``(tasks per second, seconds, CPU seconds so far by process before the run)``."""
    r = st.redis()
    producer = Celery("bench_noop_producer", broker=st.redis_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    producer.send_task("naive.noop", queue="bench_noop")  # connect and warm the pool
    wait_until(lambda: queue_drained(r, "bench_noop"), 30, 0.01, "no-op warm-up")
    cpu0 = stack_cpu(st)
    t0 = time.time()
    with producer.producer_or_acquire() as prod:
        for _ in range(n):
            producer.send_task("naive.noop", queue="bench_noop", producer=prod)
    t1 = wait_until(lambda: queue_drained(r, "bench_noop"), 120, 0.005, "no-op tasks")
    return n / (t1 - t0), t1 - t0, cpu0


def freeze(children: list[Any], stop: bool) -> None:
    """SIGSTOP (or SIGCONT) each Celery process and its pool processes, so an idle side of a
    side-by-side measurement takes no CPU (beat's ticks, idle polling) from the side measured."""
    sig = signal.SIGSTOP if stop else signal.SIGCONT
    for child in children:
        for pid in [child.pid, *children_of(child.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    if not stop:
        time.sleep(0.3)  # let the resumed side reconnect and settle before it is measured


def finished_count(r: Any) -> tuple[int, int]:
    s = stats_hash(r, PREFIX)
    return int(s.get("jobs_succeeded", 0) + s.get("jobs_failed", 0)), int(r.xlen(K.results))


def run_instant(st: BenchStack, n: int, timeout: float) -> float:
    """Enqueue ``n`` jobs and wait until all are finished and their events are in the results stream."""
    r = st.redis()
    done0, stream0 = finished_count(r)
    ids, t0, _ = enqueue(st, n, callback_url="http://127.0.0.1:9/kie/callback/unused")

    def all_done() -> bool:
        done, stream = finished_count(r)
        return done - done0 >= n and stream - stream0 >= n
    t1 = wait_until(all_done, timeout, 0.02, f"{n} jobs end to end")
    return n / (t1 - t0)


INSTANT_ENV = {**NO_LIMIT_KIE, "KIE_TICK_INTERVAL": TICK, "KIE_POLL_FIRST": "0.01s", "KIE_POLL_INTERVAL": "0.05s",
               "KIE_POLL_MAX_INTERVAL": "0.1s"}
INSTANT_SIM = ("--time-factor", "0.0001", *NO_LIMIT_SIM, "--no-callbacks")


def scenario_overhead(res: Results, workdir: Path) -> None:
    """kie-extend against a raw Celery no-op on the same broker, side by side: three rounds, each a
    no-op run then a kie-extend run, the side not measured frozen (SIGSTOP); the median round's ratio
    counts (a shared machine's CPU speed drifts over seconds, so one pair alone is noisy)."""
    n, conc, rounds = 2000, 2, 3
    with BenchStack(workdir / "overhead", env=INSTANT_ENV, key_prefix=PREFIX) as st:
        st.start_simulator(*INSTANT_SIM, "--seed", "4")
        noop_worker = st.start_naive_worker(concurrency=conc, queue="bench_noop", name="noop")
        worker = st.start_worker(concurrency=conc)
        beat = st.start_beat()
        wait_ready(noop_worker)
        wait_ready(worker)
        run_instant(st, 200, 120)  # warm-up: connections, imports
        r = st.redis()
        offset = Path(worker.log_path).stat().st_size
        pairs: list[tuple[float, float]] = []
        noop_cpu: Counter[str] = Counter()
        kie_cpu: Counter[str] = Counter()
        commands: Counter[str] = Counter()
        for _ in range(rounds):
            freeze([worker, beat], stop=True)
            noop, _, c0 = noop_round(st, n)
            noop_cpu.update(cpu_delta(c0, stack_cpu(st), n * rounds))
            freeze([worker, beat], stop=False)
            freeze([noop_worker], stop=True)
            c0, cmd0 = stack_cpu(st), r.info("commandstats")
            kie = run_instant(st, n, 240)
            kie_cpu.update(cpu_delta(c0, stack_cpu(st), n * rounds))
            commands.update({k.replace("cmdstat_", ""): v["calls"] - cmd0.get(k, {}).get("calls", 0)
                             for k, v in r.info("commandstats").items()})
            freeze([noop_worker], stop=False)
            pairs.append((noop, kie))
        ratios = sorted(k / nop for nop, k in pairs)
        noop, kie = sorted(pairs, key=lambda p: p[1] / p[0])[rounds // 2]
        ratio = kie / noop
        msgs = worker_messages(str(worker.log_path), offset, n * rounds)
        cpu_ms = {k: round(v, 3) for k, v in kie_cpu.items()}
        res.detail("overhead", noop_cpu_ms_per_task={k: round(v, 3) for k, v in noop_cpu.items()})
        res.detail("overhead", cpu_ms_per_job=cpu_ms, rounds=[{"noop_per_s": round(a, 1), "kie_per_s": round(b, 1),
                                                                "ratio": round(b / a, 3)} for a, b in pairs])
        per_job = {k: round(v / (n * rounds), 2) for k, v in commands.most_common() if v > 0}
        res.detail("overhead", redis_commands_per_job=per_job, redis_commands_per_job_total=sum(per_job.values()))
        res.detail("overhead", jobs=n, concurrency=conc, env=INSTANT_ENV, sim_flags=list(INSTANT_SIM),
                   noop_tasks_per_s=noop, kie_jobs_per_s=kie, kie_stats=stats_hash(r, PREFIX))
        res.add("overhead", "raw Celery no-op tasks/s (same broker, c=2)", noop, "", None, "/s",
                note=f"median round of {rounds}; each round {n} no-op tasks then {n} jobs, the other side frozen")
        res.add("overhead", "kie-extend jobs/s end to end (c=2)", kie, "", None, "/s",
                note="enqueue_many -> submit -> poll -> finish -> redis_stream event; instant simulator, "
                     "no rate limit, no callbacks")
        res.add("overhead", "kie-extend jobs/s / no-op tasks/s", ratio, ">= 25 %", ratio >= 0.25,
                note="rounds: " + ", ".join(f"{x:.3f}" for x in ratios)
                     + f"; {sum(per_job.values()):.0f} Redis commands per job (broker included), "
                     f"EVALSHA {per_job.get('evalsha', 0):g}")
        worker_ms = sum(v for k, v in cpu_ms.items() if k.startswith("worker"))
        noop_ms = noop_cpu.get("noop", float("nan"))
        res.add("overhead", "kie-extend worker CPU per job (parent + pool processes)", worker_ms, "<= 5 ms",
                worker_ms <= 5.0, "ms",
                note=f"no-op worker {noop_ms:.3g} ms per task; per job also: beat {cpu_ms.get('beat1', 0):.3g} ms, "
                     f"Valkey {cpu_ms.get('valkey', 0):.3g} ms, simulator {cpu_ms.get('simulator', 0):.3g} ms "
                     f"(all {rounds} rounds)")
        res.detail("overhead", celery_messages_per_job=msgs)
        res.add("overhead", "Celery messages received per job (worker log)", round(sum(msgs.values()), 3), "", None,
                note=", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in msgs.items()))
        prof = roundtrip_profile(st)
        res.detail("overhead", roundtrip_profile=prof)
        top = list(prof["by_site"].items())[:6]
        res.add("overhead", "Redis round trips per job (in-process Pipeline, no Celery)", prof["round_trips_per_job"],
                "", None, note=f"{prof['redis_ms_per_job']:.2f} ms of {prof['wall_ms_per_job']:.2f} ms per job waiting on "
                "Redis; top: " + ", ".join(f"{k} {v['per_job']:g}" for k, v in top))


# ==================================================================================================
# 5. memory and growth
# ==================================================================================================
def pool_rss(worker: Any) -> int:
    return sum(rss_kib(p) for p in children_of(worker.pid))


def scenario_memory(res: Results, workdir: Path) -> None:
    inflight_bytes(res, workdir)
    rss_and_retention(res, workdir)


def inflight_bytes(res: Results, workdir: Path) -> None:
    n = 2000
    env = {**NO_LIMIT_KIE, "KIE_TICK_INTERVAL": "0.5s", "KIE_POLL_FIRST": "1h", "KIE_POLL_INTERVAL": "1h",
           "KIE_POLL_MAX_INTERVAL": "1h"}
    with BenchStack(workdir / "memory", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", "1", "--duration-min", "7200", "--duration-max", "7200",
                           *NO_LIMIT_SIM, "--no-callbacks", "--seed", "5")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        time.sleep(1.0)
        before = int(r.info("memory")["used_memory"])
        ids, _, _ = enqueue(st, n, callback_url="http://127.0.0.1:9/kie/callback/unused")
        wait_until(lambda: r.zcard(K.state_index("submitted")) >= n and queue_drained(r, "kie_extend"),
                   180, 0.2, f"{n} jobs in flight")
        time.sleep(2.5)  # the submission-rate log expires ~2 s after the last submission
        after = int(r.info("memory")["used_memory"])
        per_job = (after - before) / n
        sample = random.Random(5).sample(ids, 50)
        key_bytes = [int(r.memory_usage(K.job(j), samples=0) or 0) for j in sample]
        encoding = r.object("encoding", K.job(sample[0]))
        encoding = encoding.decode() if isinstance(encoding, bytes) else encoding
        fields = r.hlen(K.job(sample[0]))
        struct = {name: int(r.memory_usage(key, samples=0) or 0)
                  for name, key in (("state:submitted", K.state_index("submitted")), ("due", K.due),
                                    ("inflight", K.inflight))}
        longest = max(len(v) for v in r.hvals(K.job(sample[0])))
        res.detail("memory", inflight_jobs=n, used_memory_before=before, used_memory_after=after,
                   bytes_per_job_used_memory=per_job, job_hash_bytes_mean=sum(key_bytes) / len(key_bytes),
                   job_hash_encoding=encoding,
                   job_hash_fields=fields, job_hash_longest_value=longest,
                   index_bytes=struct, index_bytes_per_job={k: v / n for k, v in struct.items()})
        res.add("memory", "Redis bytes per in-flight job (used_memory delta)", per_job, "<= 2048 B",
                per_job <= 2048, "B", note=f"{n} jobs submitted, generation 2 h; job hash "
                f"{sum(key_bytes) / len(key_bytes):.0f} B ({fields} fields, {encoding}, longest value {longest} B) + indexes "
                f"{sum(struct.values()) / n:.0f} B")

        # ---- beat tick cost: O(due) or O(all scheduled)? ------------------------------------------
        tick_cost(res, st)


def tick_cost(res: Results, st: BenchStack) -> None:
    from kie_extend.admission.tick import Scheduler
    from kie_extend.infra.runtime import NoDispatch, Runtime

    # No invariant sweep inside the timed ticks: the due members here have no job records, and the sweep
    # (once per KIE_SWEEP_INTERVAL) would "repair" them away mid-measurement. Its own cost is in `backlog`.
    settings = st.settings(key_prefix="tickbench", sweep_interval=0)
    rt = Runtime(settings)
    pipeline = Scheduler(rt, NoDispatch())  # the tick alone
    r = rt.redis
    due_key = rt.keys.due
    due_ids = [f"due-{i}" for i in range(100)]

    def trial_set(label: str, future: int, trials: int = 60) -> float:
        existing = r.zcard(due_key) - 0
        if future > existing:
            pipe = r.pipeline(transaction=False)
            far = time.time() + 86400
            for i in range(existing, future):
                pipe.zadd(due_key, {f"future-{i}": far + i})
                if i % 5000 == 0:
                    pipe.execute()
            pipe.execute()
        samples = []
        for _ in range(trials):
            r.zadd(due_key, {j: time.time() - 1 for j in due_ids})
            t = time.perf_counter()
            out = pipeline.tick()
            samples.append(time.perf_counter() - t)
            assert out["due"] == len(due_ids), out
        return median(samples)

    r.delete(due_key)
    small = trial_set("100", 0)
    r.zrem(due_key, *due_ids)
    big = trial_set("10k", 10_000)
    r.zrem(due_key, *due_ids)
    huge = trial_set("100k", 100_000)
    r.delete(due_key)
    ratio = big / small
    res.detail("memory", tick_median_s={"100 due of 100": small, "100 due of 10,100": big,
                                         "100 due of 100,100": huge})
    res.add("memory", "Scheduler.tick() 100 due among 10,100 / among 100", ratio, "~1 (<= 1.5)", ratio <= 1.5,
            note=f"median tick {small * 1e3:.2f} ms vs {big * 1e3:.2f} ms; with 100,000 future jobs "
                 f"{huge * 1e3:.2f} ms")


def rss_and_retention(res: Results, workdir: Path) -> None:
    warm, n = 500, 5000
    with BenchStack(workdir / "rss", env=INSTANT_ENV, key_prefix=PREFIX) as st:
        st.start_simulator(*INSTANT_SIM, "--seed", "6")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        run_instant(st, warm, 180)
        rss0 = pool_rss(worker)
        main0 = rss_kib(worker.pid)
        t0 = time.time()
        rate = run_instant(st, n, 420)
        rss1 = pool_rss(worker)
        main1 = rss_kib(worker.pid)
        growth = (rss1 - rss0) / rss0
        res.detail("memory", rss_pool_kib_after_warmup=rss0, rss_pool_kib_end=rss1, rss_main_kib=[main0, main1],
                   rss_jobs=n, rss_run_s=time.time() - t0, rss_run_jobs_per_s=rate,
                   pool_pids=children_of(worker.pid))
        res.add("memory", f"worker pool RSS growth over {n:,} jobs", growth * 100, "< 10 %", growth < 0.10, "%",
                note=f"pool processes {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB after a {warm}-job warm-up")

        # TTL of a finished job with the default retention
        ttls = [r.ttl(k) for k in list(r.scan_iter(K.job("*"), count=1000))[:20]]
        retention = 7 * 86400
        ok = all(retention - 600 <= t <= retention for t in ttls)
        res.add("memory", "TTL of finished job keys (default KIE_RETENTION 7 d)", min(ttls), f"== {retention} s",
                ok, "s", note=f"min..max of 20 keys: {min(ttls)}..{max(ttls)}")
        stream_len = r.xlen(K.results)
        stream_bytes = int(r.memory_usage(K.results, samples=0) or 0)
        from kie_extend.config import Settings

        cap = Settings.model_fields["results_maxlen"].default if "results_maxlen" in Settings.model_fields else None
        bound = (f"KIE_RESULTS_MAXLEN default {cap:,} entries -> about {cap * stream_bytes / stream_len / 1e9:.1f} GB"
                 if cap else "no MAXLEN: the stream grows without bound")
        res.add("memory", "results stream bytes per finished job", stream_bytes / stream_len,
                "", None, "B", note=f"{stream_len} entries, {stream_bytes / 1e6:.1f} MB; {bound}")

        # short retention: the keys go away
        worker.stop()
        st.env["KIE_RETENTION"] = "5s"
        worker2 = st.start_worker(concurrency=2, name="worker-ret")
        wait_ready(worker2)
        before_stream = r.xlen(K.results)
        ids, _, _ = enqueue(st, 20, callback_url="http://127.0.0.1:9/kie/callback/unused")
        wait_until(lambda: r.xlen(K.results) - before_stream >= 20, 60, 0.05, "retention jobs")
        ttl = [r.ttl(K.job(j)) for j in ids]
        time.sleep(6.0)
        left = sum(r.exists(K.job(j)) for j in ids)
        in_index = sum(r.zscore(K.state_index("succeeded"), j) is not None for j in ids)
        dedup = sum(r.exists(K.dedup("redis_stream", f"{j}:job.succeeded")) for j in ids)
        res.detail("memory", short_retention={"ttl": ttl, "job_keys_left_after_6s": left,
                                              "state_index_members_left": in_index, "dedup_keys_left": dedup})
        res.add("memory", "KIE_RETENTION=5s: TTL of finished job keys", max(ttl), "<= 5 s",
                all(0 < t <= 5 for t in ttl), "s")
        res.add("memory", "KIE_RETENTION=5s: job keys left 6 s later (of 20)", left, "== 0", left == 0,
                note=f"left behind: {in_index} of 20 ids in state:succeeded (removed by trim_indexes on ~1 % of "
                     f"ticks), {dedup} dedup keys (TTL max(retention, 60 s)); stream entries stay until MAXLEN")


# ==================================================================================================
# 6. scale: enqueue_many and get_job
# ==================================================================================================
def scenario_scale(res: Results, workdir: Path) -> None:
    from kie_extend.api import check_extend
    from kie_extend.store.record import iso_ms as now_iso
    from kie_extend.infra.runtime import Runtime
    from kie_extend.jobs.states import JobState

    n = 10_000
    with BenchStack(workdir / "scale", key_prefix=PREFIX, env={"KIE_ALLOW_PRIVATE_URLS": "true"}) as st:
        settings = st.settings()
        url = "http://127.0.0.1:9"
        enqueue_many([{"request": extend_request(url, -1)}], settings=settings)  # connect, build the app
        items = [{"request": extend_request(url, i), "metadata": {"i": i}} for i in range(n)]
        t = time.perf_counter()
        ids = enqueue_many(items, settings=settings)
        took = time.perf_counter() - t
        assert len(set(ids)) == n
        t = time.perf_counter()
        for item in items[:2000]:
            check_extend(item["request"], metadata=item["metadata"], settings=settings)
        validate_per_job = (time.perf_counter() - t) / 2000
        r = st.redis()
        queued = r.llen(settings.queue)
        rate = n / took
        res.detail("scale", enqueue_seconds=took, enqueue_jobs_per_s=rate, messages_in_queue=queued,
                   validation_us_per_job=validate_per_job * 1e6,
                   send_us_per_job=(took / n - validate_per_job) * 1e6)
        res.add("scale", f"enqueue_many({n:,}) jobs/s (no workers)", rate, ">= 2,000 /s", rate >= 2000, "/s",
                note=f"{took:.2f}s; validation {validate_per_job * 1e6:.0f} us/job, "
                     f"send {(took / n - validate_per_job) * 1e6:.0f} us/job; {queued} messages queued")

        # get_job with 100 vs 10,000 job records in the store
        rt = Runtime(settings)
        store = rt.store
        job_ids = [str(uuid.uuid4()) for _ in range(n)]

        def create(batch: list[str]) -> None:
            for j in batch:
                store.transition(j, JobState.QUEUED, expect=[None], fields={
                    "job_id": j, "request": json.dumps(extend_request(url, 0)), "metadata": {"i": 1},
                    "created_at": now_iso(), "created_ts": time.time(), "attempts": 0, "polls": 0})

        def lookup(pool: list[str], k: int = 3000) -> float:
            rng = random.Random(6)
            sample = [rng.choice(pool) for _ in range(k)]
            for j in sample[:100]:
                get_job(j, settings=settings)
            t = time.perf_counter()
            for j in sample:
                assert get_job(j, settings=settings)["state"] == "queued"
            return (time.perf_counter() - t) / k

        create(job_ids[:100])
        small = lookup(job_ids[:100])
        create(job_ids[100:])
        big = lookup(job_ids)
        ratio = big / small
        res.detail("scale", get_job_us={"100 jobs": small * 1e6, "10,000 jobs": big * 1e6})
        res.add("scale", "get_job time with 10,000 / with 100 jobs", ratio, "~1 (<= 1.5)", ratio <= 1.5,
                note=f"{small * 1e6:.0f} us vs {big * 1e6:.0f} us per call")


# ==================================================================================================
# 7. fairness: one account shared by tenants and priorities
# ==================================================================================================
DEAD_CB = "http://127.0.0.1:9/kie/callback/unused"  # the provider requires a callBackUrl; nobody listens
FAIR_ENV = {**KIE_LIMIT, "KIE_TICK_INTERVAL": TICK, "KIE_MAX_IN_FLIGHT": "100000",
            "KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s"}
FAIR_SIM = ("--time-factor", "0.01", *SIM_LIMIT, "--no-callbacks")


def all_recorded(settings: Any, batch_id: str) -> bool:
    """Every declared job of the batch has a record (no extend message left in the broker)."""
    from kie_extend.api import get_batch

    return not get_batch(batch_id, settings=settings)["counts"].get("pending")


def fairness_run(workdir: Path, mode: str, n_a: int = 5000, n_b: int = 20, n_hi: int = 5,
                 slots: int = 300, n_waves: int = 1) -> dict[str, Any]:
    """5,000 jobs of tenant A waiting and flowing; then 20 of B and 5 of A at priority 9 arrive in one
    enqueue_many call. Returns the submission ranks (1 = the first submission after they arrived)."""
    from kie_extend.api import cancel_batch

    env = {**FAIR_ENV, "KIE_ADMISSION": mode}
    with BenchStack(workdir / f"fairness-{mode}", env=env, key_prefix=PREFIX) as st:
        st.start_simulator(*FAIR_SIM, "--seed", "7")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        settings = st.settings()
        assert st.sim_url
        batch_a, batch_late = f"fair-A-{mode}", f"fair-late-{mode}"
        items = [{"request": extend_request(st.sim_url, i, DEAD_CB)} for i in range(n_a)]
        t_a = time.time()
        enqueue_many(items, settings=settings, batch_id=batch_a, tenant="A", priority=5)
        wait_until(lambda: all_recorded(settings, batch_a), 120, 0.2, f"{n_a} A jobs recorded")
        wait_until(lambda: int(st.sim_stats()["submissions_accepted"]) >= 2 * LIMIT, 30, 0.1, "submissions flowing")
        t_recorded = time.time()
        # Each wave: 20 of B + 5 of A at priority 9 in one call, at a random phase of the provider window
        # (where the arrival falls against the bursts of booked slots changes what it meets).
        rng = random.Random(7)
        waves: list[dict[str, Any]] = []
        all_late: list[str] = []
        for w in range(n_waves):
            time.sleep(rng.uniform(0, WINDOW))
            late = [{"request": extend_request(st.sim_url, 10_000 + 100 * w + i, DEAD_CB), "tenant": "B",
                     "priority": 5} for i in range(n_b)]
            late += [{"request": extend_request(st.sim_url, 20_000 + 100 * w + i, DEAD_CB), "tenant": "A",
                      "priority": 9} for i in range(n_hi)]
            t_arr = time.time()
            late_ids = enqueue_many(late, settings=settings, batch_id=batch_late)
            all_late += late_ids
            waves.append({"t_arr": t_arr, "ids_b": late_ids[:n_b], "ids_hi": late_ids[n_b:]})
            if w + 1 < n_waves:  # the next wave once this one is all sent (or 8 s)
                try:
                    wait_until(lambda ids=late_ids: all(x.get("kie_task_id") for x in
                                                        job_records(r, PREFIX, ids).values()), 8, 0.2, "wave sent")
                except TimeoutError:
                    pass
        t_first = waves[0]["t_arr"]

        def after() -> int:
            return sum(1 for t in st.sim_tasks().values() if t["created"] >= t_first)
        wait_until(lambda: after() >= slots and time.time() >= t_first + 11, 90, 0.5, f"{slots} submissions")
        tasks = st.sim_tasks()
        sim = st.sim_stats()
        recs = job_records(r, PREFIX, all_late)
        t = time.perf_counter()
        cancelled = cancel_batch(batch_a, settings=settings) + cancel_batch(batch_late, settings=settings)
        cancel_s = time.perf_counter() - t
        out_waves = []
        for wave in waves:
            order = sorted((t["created"], tid) for tid, t in tasks.items() if t["created"] >= wave["t_arr"])
            rank = {tid: i + 1 for i, (_, tid) in enumerate(order)}

            def ranks(ids: list[str]) -> list[int | None]:
                return sorted((rank.get(recs[j].get("kie_task_id", "")) for j in ids),
                              key=lambda x: (x is None, x or 0))
            out_waves.append({"ranks_hi": ranks(wave["ids_hi"]), "ranks_b": ranks(wave["ids_b"]),
                              "observed_slots": len(order),
                              "phase_s": round(wave["t_arr"] - t_first, 3)})
        first = sorted(t["created"] for t in tasks.values() if t["created"] >= t_first)
        in_10 = sum(1 for c in first if c < t_first + 10.0)
        util, _, span = rate_ratio(first[:slots])  # as in `limit`: (N - LIMIT) / span over the rate
        return {"mode": mode, "waves": out_waves, "utilisation": util, "util_span_s": span,
                "util_n": len(first[:slots]), "utilisation_10s": in_10 / (10 * LIMIT / WINDOW), "sent_in_10s": in_10,
                "rate_limited": int(sim["rate_limited"]), "accepted_total": int(sim["submissions_accepted"]),
                "a_record_s": t_recorded - t_a, "cancelled_after": cancelled, "cancel_s": cancel_s}


def scenario_fairness(res: Results, workdir: Path) -> None:
    """Fair admission vs arrival order (KIE_ADMISSION=arrival), side by side."""
    # Fair: three waves at random phases, judged on the worst; arrival order: one wave (it never gets
    # past A's backlog in the observed slots).
    runs = {mode: fairness_run(workdir, mode, n_waves=3 if mode == "fair" else 1) for mode in ("fair", "arrival")}
    res.detail("fairness", env=FAIR_ENV, sim_flags=list(FAIR_SIM), runs=runs,
               setup="worker c=2 + beat; 5,000 A (prio 5, one batch) recorded and flowing; then one enqueue_many "
                     "of 20 B (prio 5) + 5 A (prio 9); ranks count submissions accepted by the simulator after "
                     "that call (1 = the first)")

    def worst(values: list[int | None], k: int, seen: int) -> tuple[Any, bool]:
        """The k-th smallest rank, or '> seen' when fewer than k were sent in the observed slots."""
        got = [v for v in values if v is not None]
        return (got[k - 1], True) if len(got) >= k else (f"> {seen}", False)

    for mode, run in runs.items():
        judged = mode == "fair"
        label = "fair" if judged else "KIE_ADMISSION=arrival"
        per = []
        for wave in run["waves"]:
            seen = wave["observed_slots"]
            per.append((worst(wave["ranks_hi"], len(wave["ranks_hi"]), seen), worst(wave["ranks_b"], 1, seen),
                        worst(wave["ranks_b"], len(wave["ranks_b"]), seen)))

        def pick(i: int) -> tuple[Any, bool]:
            """The worst wave's figure: an unsent '> N' beats any rank."""
            vals = [p[i] for p in per]
            missing = [v for v, ok in vals if not ok]
            return (missing[0], False) if missing else (max(v for v, _ in vals), True)
        hi, hi_ok = pick(0)
        b1, b1_ok = pick(1)
        b20, b20_ok = pick(2)
        waves_note = "; ".join(f"wave {k + 1} (+{w['phase_s']:.1f}s): prio-9 {w['ranks_hi']}, B first "
                               f"{w['ranks_b'][0]}, B last {w['ranks_b'][-1]}" for k, w in enumerate(run["waves"]))
        res.add("fairness", f"[{label}] all 5 prio-9 sent by slot (worst wave)", hi, "<= 8",
                (hi_ok and hi <= 8) if judged else None,
                note=f"{len(run['waves'])} wave(s) of 20 B + 5 A prio 9 at random phases; slots counted from each "
                     f"wave's enqueue_many; {waves_note}")
        res.add("fairness", f"[{label}] B's first job sent at slot (worst wave)", b1, "<= 8",
                (b1_ok and b1 <= 8) if judged else None)
        res.add("fairness", f"[{label}] all 20 B sent by slot (worst wave)", b20, "<= 50",
                (b20_ok and b20 <= 50) if judged else None)
        res.add("fairness", f"[{label}] provider utilisation over the measured span", run["utilisation"],
                ">= 0.95", run["utilisation"] >= 0.95 if judged else None,
                note=f"first {run['util_n']} submissions after the first wave over {run['util_span_s']:.2f}s: "
                     f"(N-{LIMIT})/span / {LIMIT / WINDOW:g}/s as in `limit`; {run['sent_in_10s']} accepted in the "
                     f"first 10 windows; 5,000 A recorded {run['a_record_s']:.1f}s after enqueue_many")
        res.add("fairness", f"[{label}] 429 answers received", run["rate_limited"], "== 0",
                run["rate_limited"] == 0 if judged else None)


# ==================================================================================================
# 8. cancel a 5,000-job batch while submissions flow
# ==================================================================================================
def scenario_cancel(res: Results, workdir: Path) -> None:
    from kie_extend.api import cancel_batch, get_batch

    n, batch = 5000, "cancel-1"
    with BenchStack(workdir / "cancel", env=FAIR_ENV, key_prefix=PREFIX) as st:
        st.start_simulator(*FAIR_SIM, "--seed", "8")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        settings = st.settings()
        assert st.sim_url
        # Explicit job ids in the callback URLs: the simulator's tasks name their jobs by themselves.
        items = [{"job_id": f"cx{i}", "request": extend_request(st.sim_url, i, f"http://127.0.0.1:9/kie/callback/cx{i}")}
                 for i in range(n)]
        ids = enqueue_many(items, settings=settings, batch_id=batch)
        wait_until(lambda: all_recorded(settings, batch), 120, 0.2, f"{n} jobs recorded")
        wait_until(lambda: int(st.sim_stats()["submissions_accepted"]) >= 2 * LIMIT, 30, 0.1, "submissions flowing")
        sent_before = int(st.sim_stats()["submissions_accepted"])
        cmd0 = r.info("commandstats")
        with count_roundtrips() as (trips, _):
            t = time.perf_counter()
            cancelled = cancel_batch(batch, settings=settings)
            took = time.perf_counter() - t
        t_end = time.time()
        per_site = {k: round(v / max(cancelled, 1), 2) for k, v in trips.most_common()}
        cmd1 = r.info("commandstats")
        time.sleep(3.0)  # settle: a few windows; submits in flight at the cancel finish
        recs = job_records(r, PREFIX, ids)
        by_job = {str(t["callback_url"]).rsplit("/", 1)[-1]: t for t in st.sim_tasks().values()}
        state = {j: x.get("state") for j, x in recs.items()}
        cancelled_ids = [j for j, s in state.items() if s == "cancelled"]
        bad_records = [j for j in cancelled_ids if recs[j].get("kie_task_id") or int(recs[j].get("sends") or 0) > 0]
        bad_sim = [j for j in cancelled_ids if j in by_job]
        sent_after = sorted(j for j, t in by_job.items() if t["created"] > t_end)
        batch_view = get_batch(batch, settings=settings)
        calls = sum(v["calls"] - cmd0.get(k, {}).get("calls", 0) for k, v in cmd1.items())
        res.detail("cancel", jobs=n, cancelled=cancelled, cancel_seconds=took, sent_before_cancel=sent_before,
                   sim_tasks=len(by_job), sent_after_cancel_returned=sent_after[:50], batch=batch_view,
                   redis_commands_during_cancel=calls, redis_commands_per_cancelled_job=calls / max(cancelled, 1),
                   cancel_round_trips_per_job_by_site=per_site,
                   states={s: list(state.values()).count(s) for s in set(state.values())})
        res.add("cancel", f"cancel_batch of {n:,} queued jobs (call time)", took, "<= 5 s", took <= 5.0, "s",
                note=f"{cancelled:,} cancelled ({cancelled / took:,.0f}/s) while submissions flowed at "
                     f"{LIMIT}/{WINDOW:g}s; {calls / max(cancelled, 1):.0f} Redis commands (all clients) and "
                     f"{sum(per_site.values()):.1f} round trips of the cancelling process per cancelled job: "
                     + ", ".join(f"{k} {v:g}" for k, v in list(per_site.items())[:5]))
        res.add("cancel", "cancelled jobs sent to the provider", len(set(bad_records) | set(bad_sim)), "== 0",
                not bad_records and not bad_sim,
                note=f"checked 3 s after the call: records (kie_task_id/sends) and simulator tasks by callback "
                     f"URL; {len(sent_after)} batch jobs accepted by the provider after the call returned "
                     f"(too late to cancel: already submitting), batch counts {batch_view['counts']}")


# ==================================================================================================
# 9. a 100,000-job backlog
# ==================================================================================================
#: Bytes per queued job this scenario measured while the request JSON was a field of the job hash
#: (commit 8333950), for the comparison row.
BACKLOG_BYTES_BEFORE = 1596.0


def scenario_backlog(res: Results, workdir: Path) -> None:
    from kie_extend.api import pause, resume
    from kie_extend.store.invariants import Invariants
    from kie_extend.infra.runtime import NoDispatch, Runtime
    from kie_extend.admission.tick import Scheduler

    small, n = 1000, 100_000
    batch = "backlog-1"
    with BenchStack(workdir / "backlog", env={**FAIR_ENV, "KIE_SWEEP_INTERVAL": "0"}, key_prefix=PREFIX) as st:
        st.start_simulator(*FAIR_SIM, "--seed", "9")
        r = st.redis()
        settings = st.settings()
        assert st.sim_url
        pause("bench: backlog", settings=settings)
        url = st.sim_url

        def items(lo: int, hi: int) -> list[dict[str, Any]]:
            return [{"request": extend_request(url, i, DEAD_CB)} for i in range(lo, hi)]
        enqueue_many(items(-1, 0), settings=settings, batch_id=batch)  # warm-up: connections, the producer app
        worker = st.start_worker(concurrency=2)
        wait_ready(worker)
        wait_until(lambda: all_recorded(settings, batch), 30, 0.1, "warm-up job")
        time.sleep(0.5)
        before = int(r.info("memory")["used_memory"])
        enqueue_many(items(0, small - 1), settings=settings, batch_id=batch)
        wait_until(lambda: all_recorded(settings, batch) and queue_drained(r, settings.queue), 120, 0.1,
                   f"{small} jobs recorded")
        rt = Runtime(settings.model_copy(update={"sweep_interval": 0.0}))
        tick_small, admit_small = backlog_tick(rt)
        waiting_small = sum(sum(t.values()) for t in rt.admission.waiting().values())
        pause("bench: backlog", settings=settings)

        # The big enqueue alone: the worker is stopped so it takes no CPU from the producer.
        worker.stop()
        big = items(small - 1, n - 1)
        t = time.perf_counter()
        enqueue_many(big, settings=settings, batch_id=batch)
        enq_s = time.perf_counter() - t
        worker = st.start_worker(concurrency=2, name="worker-2")
        wait_ready(worker)
        t = time.perf_counter()
        wait_until(lambda: all_recorded(settings, batch) and queue_drained(r, settings.queue), 900, 0.5,
                   f"{n:,} jobs recorded")
        record_s = time.perf_counter() - t
        time.sleep(1.0)
        after = int(r.info("memory")["used_memory"])
        per_job = (after - before) / (n - 1)
        waiting = sum(sum(t.values()) for t in rt.admission.waiting().values())
        sample = random.Random(9).sample(range(n), 50)
        ids = [j.decode() for j in r.zrange(K.state_index("queued"), 0, -1)]
        sample_ids = [ids[i % len(ids)] for i in sample]
        hash_bytes = [int(r.memory_usage(K.job(j), samples=0) or 0) for j in sample_ids]
        req_bytes = [int(r.memory_usage(K.request(j), samples=0) or 0) for j in sample_ids]
        structs = {"ready queue": K.ready(5, settings.default_tenant), "state:queued": K.state_index("queued"),
                   "batch jobs": K.batch_jobs(batch)}
        struct_bytes = {name: int(r.memory_usage(key, samples=0) or 0) / n for name, key in structs.items()}
        tick_big, admit_big = backlog_tick(rt)
        worker.stop()
        raw = r.hgetall(K.job(sample_ids[0]))
        enc = r.object("encoding", K.job(sample_ids[0]))
        enc = enc.decode() if isinstance(enc, bytes) else enc
        big_fields = {k.decode(): len(v) for k, v in raw.items() if len(v) > 64}
        t = time.perf_counter()
        report = Invariants(rt.redis, rt.keys).check(repair=False, grace=3600)
        sweep_s = time.perf_counter() - t
        resume(settings=settings)
        rate = (n - small) / enq_s
        res.detail("backlog", jobs=n, used_memory_before=before, used_memory_after=after, bytes_per_job=per_job,
                   job_hash_bytes_mean=sum(hash_bytes) / len(hash_bytes), index_bytes_per_job=struct_bytes,
                   waiting_small=waiting_small, waiting_big=waiting, enqueue_s=enq_s, record_s=record_s,
                   worker_accept_per_s=(n - small) / record_s, tick_ms={"1k": tick_small, "100k": tick_big},
                   admit_ms={"1k": admit_small, "100k": admit_big}, sweep_check_s=sweep_s,
                   sweep_checked=getattr(report, "checked", None), job_hash_fields=len(raw),
                   job_hash_encoding=enc, job_hash_fields_over_64_bytes=big_fields,
                   request_key_bytes_mean=sum(req_bytes) / len(req_bytes))
        res.add("backlog", f"Redis bytes per queued job ({n:,} queued, used_memory delta)", per_job, "<= 1024 B",
                per_job <= 1024, "B", note=f"job hash {sum(hash_bytes) / len(hash_bytes):.0f} B ({enc}, {len(raw)} "
                f"fields, values over 64 B: {big_fields or 'none'}) + request key {sum(req_bytes) / len(req_bytes):.0f} B"
                " + per job: " + ", ".join(f"{k} {v:.0f} B" for k, v in struct_bytes.items())
                + f"; worker recorded {(n - small) / record_s:,.0f} jobs/s (c=2), operator pause on")
        res.add("backlog", "the same with the request JSON inside the job hash (before {p}:req:<id>)",
                BACKLOG_BYTES_BEFORE, "(comparison)", None, "B",
                note="measured by this scenario at commit 8333950: job hash 1,240 B (hashtable: the request "
                     "value, 262 B, is over hash-max-listpack-value) + the same indexes")
        res.add("backlog", f"enqueue_many({n - small:,}) jobs/s (batch, no worker running)", rate, ">= 5,000 /s",
                rate >= 5000, "/s", note=f"{enq_s:.1f}s")
        ratio = tick_big["median"] / tick_small["median"]
        res.add("backlog", f"Scheduler.tick() admitting 20: {waiting:,} waiting / {waiting_small:,}", ratio,
                "~1 (<= 1.5)", ratio <= 1.5,
                note=f"median tick {tick_small['median']:.2f} ms vs {tick_big['median']:.2f} ms; the admit script "
                     f"alone {admit_small['median']:.2f} vs {admit_big['median']:.2f} ms (20 admitted per call)")
        res.add("backlog", f"invariant sweep (kie-extend doctor check) over {n:,} queued jobs", sweep_s, "", None, "s",
                note="the tick runs it once per KIE_SWEEP_INTERVAL (60 s default): O(all unfinished jobs)")


def backlog_tick(rt: Any, trials: int = 40) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds of Scheduler.tick() (no dispatch) and of the admit script alone, each
    admitting a full window (20) from the waiting jobs; the admitted jobs go back in line after each."""
    from kie_extend.infra.runtime import NoDispatch
    from kie_extend.admission.tick import Scheduler

    r, k = rt.redis, rt.keys
    rt.gates.resume_operator()
    sched = Scheduler(rt, NoDispatch())

    def restore() -> int:
        ids = [x.decode() for x in r.zrange(k.due, 0, -1)]
        for j in ids:
            rt.store.enqueue_ready(j)
        r.delete(k.due, k.rate_log)
        return len(ids)

    restore()
    out = []
    for fn in (lambda: sched.tick(), lambda: rt.admission.admit(LIMIT, horizon=0.1)):
        samples, admitted = [], []
        for _ in range(trials):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
            admitted.append(restore())
        out.append({"median": median(samples), "p90": pct(samples, 0.9), "admitted_per_call": median(admitted)})
    return out[0], out[1]


# ==================================================================================================
# overhead profile: Redis round trips per job by call site, in-process
# ==================================================================================================
@contextmanager
def count_roundtrips() -> Iterator[tuple[Counter[str], Counter[str]]]:
    """Count every Redis round trip this process makes (a command, a pipeline, a script call) and the
    seconds spent in it, by the project function that made it (``module.function``)."""
    import redis as _redis

    trips: Counter[str] = Counter()
    secs: Counter[str] = Counter()

    # The store's helpers that only send what their caller built: the caller is the call site.
    relays = {"run_script", "send"}

    def site() -> str:
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            if "/kie_extend/" in fn and f.f_code.co_name not in relays:
                return f"{Path(fn).stem}.{f.f_code.co_name}"
            f = f.f_back  # type: ignore[assignment]
        return "other"

    orig_cmd, orig_pipe = _redis.Redis.execute_command, _redis.client.Pipeline.execute

    def cmd(self: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_cmd(self, *args, **kw)
        finally:
            s = site()
            trips[s] += 1
            secs[s] += time.perf_counter() - t

    def pipe(self: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_pipe(self, *args, **kw)
        finally:
            s = site() + " (pipeline)"
            trips[s] += 1
            secs[s] += time.perf_counter() - t

    _redis.Redis.execute_command, _redis.client.Pipeline.execute = cmd, pipe  # type: ignore[method-assign]
    try:
        yield trips, secs
    finally:
        _redis.Redis.execute_command, _redis.client.Pipeline.execute = orig_cmd, orig_pipe  # type: ignore[method-assign]


def roundtrip_profile(st: BenchStack, n: int = 200) -> dict[str, Any]:
    """Drive ``n`` jobs through the real Pipeline in this process (accept -> submit -> poll -> finish ->
    inline redis_stream delivery; follow-up steps run in time order instead of as Celery messages) and
    count every Redis round trip (a command, a pipeline, a script call) by the project function that made it."""
    import heapq as _heapq
    from collections import Counter

    from kie_extend.jobs.pipeline import Pipeline
    from kie_extend.infra.runtime import Runtime
    from kie_extend.admission.tick import Scheduler

    settings = st.settings(key_prefix="rtprof")
    rt = Runtime(settings)
    heap: list[tuple[float, int, str, str]] = []
    seq = iter(range(10**9))

    class Inline:
        def poll(self, job_id: str, at: float | None = None) -> None:
            _heapq.heappush(heap, (at or 0.0, next(seq), "poll", job_id))

        def poll_many(self, job_ids: list[str], at: float | None = None) -> None:
            for job_id in job_ids:
                self.poll(job_id, at)

        def deliver(self, job_id: str, handler: str) -> None:
            _heapq.heappush(heap, (0.0, next(seq), "deliver:" + handler, job_id))

    pipeline = Pipeline(rt, Inline())
    sched = Scheduler(rt.__class__(settings.model_copy(update={"sweep_interval": 0.0})), Inline())
    messages: Counter[str] = Counter()
    tick_trips: Counter[str] = Counter()
    finished = {"succeeded", "failed", "cancelled"}

    assert st.sim_url
    reqs = [extend_request(st.sim_url, i, DEAD_CB) for i in range(n)]
    pipeline.accept("rtprof-warm", reqs[0])  # scripts loaded, connections open
    slept = ticks = 0.0
    with count_roundtrips() as (trips, secs):
        t0 = time.perf_counter()
        for i in range(n):
            job_id = f"rtprof-{i}"
            messages["kie_extend.extend"] += 1
            pipeline.accept(job_id, reqs[i])
            while True:
                while heap:
                    at, _, kind, job = _heapq.heappop(heap)
                    if at > time.time():
                        pause = at - time.time()
                        time.sleep(pause)
                        slept += pause
                    if kind == "poll":
                        messages["kie_extend.poll"] += 1
                        pipeline.advance(job)
                    else:
                        messages["kie_extend.deliver"] += 1
                        pipeline.delivery.deliver(job, kind.split(":", 1)[1])
                if rt.redis.hget(rt.keys.job(job_id), "state").decode() in finished:  # site "other"
                    break
                # The beat's tick claims what is due (the first poll) for every job at once: counted
                # apart, it is shared by all the jobs of a tick in a real system.
                before = Counter(trips)
                t = time.perf_counter()
                sched.tick()
                ticks += time.perf_counter() - t
                for k, v in (trips - before).items():
                    tick_trips[k] += v
                    trips[k] -= v
                if not heap:
                    time.sleep(0.002)
                    slept += 0.002
        wall = time.perf_counter() - t0 - slept - ticks  # not the waits for a poll's due time, not the ticks
    trips.pop("other", None)
    states = Counter(rt.store.get(f"rtprof-{i}").get("state") for i in range(n))  # type: ignore[union-attr]
    by_site = {k: {"per_job": round(v / n, 2), "ms_per_job": round(secs[k] / n * 1000, 3)}
               for k, v in trips.most_common() if v}
    return {"jobs": n, "states": dict(states), "round_trips_per_job": round(sum(trips.values()) / n, 2),
            "redis_ms_per_job": round(sum(secs[k] for k in by_site) / n * 1000, 3),
            "wall_ms_per_job": round(wall / n * 1000, 3), "by_site": by_site,
            "messages_per_job": {k: v / n for k, v in messages.items()},
            "tick_round_trips_not_counted_above": dict(tick_trips)}


def worker_messages(log_path: str, offset: int, n: int) -> dict[str, float]:
    """Celery messages received per job, by task name, from a worker's log after ``offset``."""
    import re
    from collections import Counter

    with open(log_path, errors="replace") as fh:
        fh.seek(offset)
        text = fh.read()
    found = Counter(re.findall(r"Task (kie_extend\.\w+)\[[^\]]+\] received", text))
    return {k: round(v / n, 3) for k, v in found.most_common()}


# ==================================================================================================
# 10. tenants: weighted shares, and invented tenant names under KIE_TENANTS_STRICT
# ==================================================================================================
TENANTS_TOML = "[tenants.light]\nweight = 1\n[tenants.heavy]\nweight = 3\n"


def shares_of(r: Any, ids: dict[str, str], tasks: dict[str, dict[str, Any]], since: float, n: int) -> Counter[str]:
    """Tenants of the first ``n`` submissions the simulator accepted at or after ``since``."""
    recs = job_records(r, PREFIX, ids)
    tenant_of_task = {rec["kie_task_id"]: ids[j] for j, rec in recs.items() if rec.get("kie_task_id")}
    order = sorted((t["created"], tid) for tid, t in tasks.items() if t["created"] >= since)
    return Counter(tenant_of_task.get(tid, "?") for _, tid in order[:n])


def admission_cost(workdir: Path, weights: str, n: int = 20_000, calls: int = 5_000) -> float:
    """Server-side microseconds per admission (EVALSHA ``usec_per_call``, ``INFO commandstats``) with
    two tenants of ``n`` queued jobs each at one priority and ``weights`` as the tenants file's
    (``"1:1"`` or ``"1:3"``); the rate log is emptied between calls so only admission itself is timed."""
    from kie_extend.config import Settings
    from kie_extend.infra.embedded import EmbeddedValkey
    from kie_extend.infra.runtime import Runtime

    light, heavy = weights.split(":")
    path = workdir / f"cost-{light}-{heavy}.toml"
    path.write_text(f"[tenants.A]\nweight = {light}\n[tenants.B]\nweight = {heavy}\n")
    server = EmbeddedValkey(str(workdir / f"cost-valkey-{light}-{heavy}")).start()
    try:
        settings = Settings(_env_file=None, redis_url=server.url, key_prefix=PREFIX, queue=PREFIX, api_key="k" * 20,
                            submit_rate="100000000/1s", max_in_flight=100_000_000, tenants_file=str(path))
        rt = Runtime(settings)
        r = rt.redis
        pipe = r.pipeline(transaction=False)
        for i in range(2 * n):
            tenant = "AB"[i % 2]
            pipe.hset(rt.keys.job(f"c{i}"), mapping={"state": "queued", "rq": f"5|{tenant}", "created_ts": i})
            pipe.zadd(rt.keys.ready(5, tenant), {f"c{i}": i})
        pipe.zadd(rt.keys.tenants(5), {"A": 0, "B": 1})
        pipe.zadd(rt.keys.priorities, {"5": 5})
        pipe.execute()
        r.config_resetstat()
        for _ in range(calls):
            rt.admission.admit(1)
            r.delete(rt.keys.rate_log, rt.keys.due)
        stats = r.info("commandstats")
        return float((stats.get("cmdstat_evalsha") or stats["cmdstat_eval"])["usec_per_call"])
    finally:
        server.stop()


def scenario_tenants(res: Results, workdir: Path) -> None:
    """Weights 1 and 3 both backlogged; then a producer spreading work over 20 invented names."""
    from kie_extend.api import cancel_batch, producer_app

    tenants_file = workdir / "tenants.toml"
    tenants_file.write_text(TENANTS_TOML)
    env = {**FAIR_ENV, "KIE_TENANTS_FILE": str(tenants_file), "KIE_TENANTS_STRICT": "true"}
    n_slots = 200
    with BenchStack(workdir / "tenants", env=env, key_prefix=PREFIX) as st:
        st.start_simulator(*FAIR_SIM, "--seed", "11")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        settings = st.settings()
        assert st.sim_url
        ids: dict[str, str] = {}
        for tenant, n in (("light", 250), ("heavy", 700)):
            items = [{"request": extend_request(st.sim_url, len(ids) + i, DEAD_CB)} for i in range(n)]
            for j in enqueue_many(items, settings=settings, batch_id=f"ten-{tenant}", tenant=tenant):
                ids[j] = tenant
        wait_until(lambda: all_recorded(settings, "ten-light") and all_recorded(settings, "ten-heavy"), 120, 0.2,
                   "both tenants' jobs recorded")
        t0 = time.time()
        wait_until(lambda: sum(1 for t in st.sim_tasks().values() if t["created"] >= t0) >= n_slots, 60, 0.3,
                   f"{n_slots} submissions")
        first = shares_of(r, ids, st.sim_tasks(), t0, n_slots)
        # A producer sends 400 jobs over 20 invented tenant names straight as Celery messages (a
        # producer that skips the Python API's check): the worker fails each as invalid_request.
        app = producer_app(settings)
        invented: dict[str, str] = {}
        t1 = time.time()
        for i in range(400):
            name = f"invented-{i % 20:02d}"
            job_id = f"inv-{uuid.uuid4().hex[:12]}"
            app.send_task("kie_extend.extend", kwargs={"request": extend_request(st.sim_url, 50_000 + i, DEAD_CB),
                                                       "tenant": name}, task_id=job_id, queue=settings.queue)
            invented[job_id] = name
        wait_until(lambda: all(rec.get("state") == "failed" for rec in job_records(r, PREFIX, invented).values()),
                   60, 0.3, "the invented tenants' jobs failed")
        t_failed = time.time()
        wait_until(lambda: sum(1 for t in st.sim_tasks().values() if t["created"] >= t1) >= n_slots, 60, 0.3,
                   f"{n_slots} submissions after the spread")
        tasks = st.sim_tasks()
        second = shares_of(r, {**ids, **invented}, tasks, t1, n_slots)
        recs = job_records(r, PREFIX, invented)
        kinds = Counter(json.loads(rec.get("error") or "{}").get("kind", rec.get("state")) for rec in recs.values())
        sent_invented = sum(1 for rec in recs.values() if rec.get("kie_task_id"))
        sim = st.sim_stats()
        cancel_batch("ten-light", settings=settings)
        cancel_batch("ten-heavy", settings=settings)
    res.detail("tenants", env={k: v for k, v in env.items() if k != "KIE_TENANTS_FILE"}, tenants_file=TENANTS_TOML,
               sim_flags=list(FAIR_SIM), first=dict(first), second=dict(second), invented_kinds=dict(kinds),
               invented_failed_after_s=round(t_failed - t1, 2), rate_limited=int(sim["rate_limited"]),
               setup="worker c=2 + beat; 250 light (weight 1) + 700 heavy (weight 3) recorded and flowing; shares "
                     f"of the first {n_slots} submissions after both were recorded; then 400 Celery messages over "
                     f"20 invented tenant names and the shares of the next {n_slots} submissions")

    def ratio(c: Counter[str]) -> float:
        return c["heavy"] / c["light"] if c["light"] else float("inf")

    for label, c in (("both backlogged", first), ("while 20 invented names send 400 jobs", second)):
        rt_ = ratio(c)
        res.add("tenants", f"heavy:light slot ratio, {label} (weights 3:1)", rt_, "3 ± 10 % (2.7-3.3)",
                2.7 <= rt_ <= 3.3, note=f"first {n_slots} submissions: {dict(c)}")
    res.add("tenants", "slots taken by the 20 invented names (strict)", sent_invented + second.get("?", 0), "== 0",
            sent_invented + second.get("?", 0) == 0,
            note=f"400 jobs over 20 names: {dict(kinds)}; all failed {t_failed - t1:.1f}s after the first was sent")
    res.add("tenants", "invented-name jobs failed invalid_request", kinds.get("invalid_request", 0), "== 400",
            kinds.get("invalid_request", 0) == 400)
    res.add("tenants", "429 answers received", int(sim["rate_limited"]), "== 0", int(sim["rate_limited"]) == 0)
    plain, weighted = admission_cost(workdir, "1:1"), admission_cost(workdir, "1:3")
    res.add("tenants", "admission script, server time per admission, weights 1:1", plain, unit="us",
            note="EVALSHA usec_per_call over 5,000 admissions, 2 tenants x 20,000 queued, rate log emptied between "
                 "calls (admission alone, on Valkey's own clock)")
    res.add("tenants", "admission script, server time per admission, weights 1:3", weighted, unit="us",
            note=f"the same with weights 1 and 3: {weighted / plain:.2f}x the 1:1 figure (one HINCRBY per admission "
                 "while a weighted tenant keeps its turn)")


# ==================================================================================================
# 11. budget: one tenant held at its budget while another keeps the account's whole rate
# ==================================================================================================
BUDGET_PRICE, BUDGET_CREDITS = 12.0, 120.0  # ten jobs' worth
BUDGET_TOML = f'[tenants.capped]\nbudget = "{BUDGET_CREDITS:g}/1d"\n[tenants.busy]\n'


def steady_ratio(times: list[float]) -> tuple[float, float, int]:
    """(ratio to the limit, rate, sends) of submissions that start mid-stream, phase-free: over
    ``m`` whole groups of LIMIT sends, rate = LIMIT * m / (t[LIMIT * m] - t[0]). The two ends sit at
    the same place of a rolling window's burst, so where the stream was cut does not bias it (the
    limit scenario's (N - LIMIT) / span assumes the first LIMIT went at once)."""
    times = sorted(times)
    m = (len(times) - 1) // LIMIT
    span = times[LIMIT * m] - times[0]
    rate = LIMIT * m / span if m and span > 0 else float("nan")
    return rate / (LIMIT / WINDOW), rate, LIMIT * m + 1


def scenario_budget(res: Results, workdir: Path) -> None:
    """A tenant with a 10-job budget and a backlogged one: the backlogged one keeps the rate."""
    import threading

    from kie_extend.api import cancel_batch, pause, resume
    from kie_extend.credits.budgets import used
    from kie_extend.infra.runtime import Runtime
    from kie_extend.jobs.listing import list_jobs

    tenants_file = workdir / "budget-tenants.toml"
    tenants_file.write_text(BUDGET_TOML)
    env = {**FAIR_ENV, "KIE_TENANTS_FILE": str(tenants_file), "KIE_PRICES": f"extend={BUDGET_PRICE:g}"}
    n_capped, n_busy, n_after = 60, 700, 300
    with BenchStack(workdir / "budget", env=env, key_prefix=PREFIX) as st:
        st.start_simulator(*FAIR_SIM, "--seed", "13")
        worker = st.start_worker(concurrency=2)
        st.start_beat()
        wait_ready(worker)
        r = st.redis()
        settings = st.settings()
        rt = Runtime(settings)
        assert st.sim_url
        # Paused while both backlogs are recorded, so the run starts with both tenants waiting.
        pause("bench: record both backlogs first", settings=settings)
        ids: dict[str, str] = {}
        for tenant, n in (("capped", n_capped), ("busy", n_busy)):
            items = [{"request": extend_request(st.sim_url, len(ids) + i, DEAD_CB)} for i in range(n)]
            for j in enqueue_many(items, settings=settings, batch_id=f"bud-{tenant}", tenant=tenant):
                ids[j] = tenant
        wait_until(lambda: all_recorded(settings, "bud-capped") and all_recorded(settings, "bud-busy"), 120, 0.2,
                   "both tenants' jobs recorded")
        # capped's charged + reserved in its window, as admission counts it, sampled all run long.
        peak = {"used": 0.0, "samples": 0}
        stop = threading.Event()

        def sample() -> None:
            budget = {"capped": (BUDGET_CREDITS, 86400.0)}
            while not stop.is_set():
                peak["used"] = max(peak["used"], used(r, K, budget).get("capped", 0.0))
                peak["samples"] += 1
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.time()
        resume(settings=settings)
        want = n_after + int(BUDGET_CREDITS // BUDGET_PRICE) + LIMIT
        wait_until(lambda: sum(1 for t in st.sim_tasks().values() if t["created"] >= t0) >= want, 90, 0.3,
                   f"{want} submissions")
        # While busy still flows: capped's queued jobs, as the listing and the single read show them.
        listed, _ = list_jobs(rt, tenant="capped", state="queued", limit=500)
        waiting_list = Counter(j["waiting_for"] for j in listed)
        one = get_job(listed[0]["job_id"], settings=settings)["waiting_for"] if listed else None
        held = sorted(h.decode() if isinstance(h, bytes) else str(h) for h in r.hkeys(K.budget_wait))
        stop.set()
        sampler.join(5)
        tasks = st.sim_tasks()
        recs = job_records(r, PREFIX, ids)
        sim = st.sim_stats()
        cancel_batch("bud-capped", settings=settings)
        cancel_batch("bud-busy", settings=settings)
    tenant_of_task = {rec["kie_task_id"]: ids[j] for j, rec in recs.items() if rec.get("kie_task_id")}
    accepted = sorted((t["created"], tenant_of_task.get(tid, "?")) for tid, t in tasks.items() if t["created"] >= t0)
    capped_at = [t for t, who in accepted if who == "capped"]
    last_capped = max(capped_at) if capped_at else t0
    account = [t for t, _ in accepted]
    busy_after = [t for t, who in accepted if who == "busy" and t > last_capped]
    acc_ratio, acc_rate, acc_span = rate_ratio(account)
    b_ratio, b_rate, b_n = steady_ratio(busy_after)
    b_naive, b_naive_rate, b_span = rate_ratio(busy_after)
    acc_steady, acc_steady_rate, acc_n = steady_ratio(account)
    capped_spend = len(capped_at) * BUDGET_PRICE
    res.detail("budget", env={k: v for k, v in env.items() if k != "KIE_TENANTS_FILE"}, tenants_file=BUDGET_TOML,
               sim_flags=list(FAIR_SIM), capped_accepted=len(capped_at), busy_after=len(busy_after),
               capped_last_accepted_after_s=round(last_capped - t0, 3), account_span_s=round(acc_span, 3),
               peak_used=peak["used"], used_samples=peak["samples"], waiting_for_listing=dict(waiting_list),
               waiting_for_get_job=one, budget_wait=held, rate_limited=int(sim["rate_limited"]),
               setup=f"worker c=2 + beat; {n_capped} capped (budget {BUDGET_CREDITS:g}/1d at {BUDGET_PRICE:g} a "
                     f"job) + {n_busy} busy recorded under an operator pause, then resumed; measured until "
                     f"{want} acceptances")
    res.add("budget", "account submit rate / limit (sim acceptance times)", acc_ratio, ">= 0.95", acc_ratio >= 0.95,
            note=f"{len(account)} accepted over {acc_span:.2f}s from the resume; rate=(N-{LIMIT})/span="
                 f"{acc_rate:.2f}/s vs {LIMIT / WINDOW:g}/s; capped's {len(capped_at)} included")
    res.add("budget", "account rate / limit, whole groups of LIMIT", acc_steady, "", None,
            note=f"{acc_n} acceptances: {acc_steady_rate:.2f}/s (the estimator of busy's row, on the account)")
    res.add("budget", "busy's submit rate / limit while capped waits", b_ratio, ">= 0.95", b_ratio >= 0.95,
            note=f"{b_n} busy acceptances after capped's last ({last_capped - t0:.2f}s after the resume), whole "
                 f"groups of {LIMIT}: {b_rate:.2f}/s")
    res.add("budget", "busy's rate / limit, (N - LIMIT) / span", b_naive, "", None,
            note=f"{len(busy_after)} over {b_span:.2f}s; biased low when the stream is cut mid-window")
    want_wait = n_capped - len(capped_at)
    res.add("budget", 'capped\'s queued jobs listed with waiting_for "budget"', waiting_list.get("budget", 0),
            f"== {want_wait}", waiting_list.get("budget", 0) == want_wait == len(listed) and one == "budget"
            and held == ["capped"],
            note=f"list_jobs(tenant=capped, state=queued): {dict(waiting_list)}; get_job: {one}; budget_wait: "
                 f"{held}")
    res.add("budget", "capped's charged + reserved, highest seen", peak["used"], f"<= {BUDGET_CREDITS:g}",
            peak["used"] <= BUDGET_CREDITS and capped_spend <= BUDGET_CREDITS, unit="credits",
            note=f"{peak['samples']} samples of its window (credits/budgets.used) every 20 ms; the simulator "
                 f"accepted {len(capped_at)} of its jobs = {capped_spend:g} credits")
    res.add("budget", "429 answers received", int(sim["rate_limited"]), "== 0", int(sim["rate_limited"]) == 0)


# ==================================================================================================
# ==================================================================================================
# 12. follow-up steps at the account limit
# ==================================================================================================
def scenario_steps(res: Results, workdir: Path) -> None:
    """100 jobs, each with WAV and stems on both takes: 500 provider submissions through one 20/1 s
    limit (extensions and follow-ups share it): 429s, the rate kept while work waits, every call paid once."""
    n, tf = 100, 0.01
    env = {**KIE_LIMIT, "KIE_TICK_INTERVAL": TICK, "KIE_MAX_IN_FLIGHT": "1000",
           "KIE_POLL_FIRST": "0.3s", "KIE_POLL_INTERVAL": "0.3s", "KIE_POLL_MAX_INTERVAL": "0.6s"}
    steps = [{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}]
    with BenchStack(workdir / "steps", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", str(tf), *SIM_LIMIT, "--seed", "12", "--credits", "1e9")
        st.start_serve(callbacks_only=True)
        workers = [st.start_worker(concurrency=2), st.start_worker(concurrency=2)]
        st.start_beat()
        wait_ready(*workers)
        r = st.redis()
        assert st.sim_url
        items = [{"request": extend_request(st.sim_url, i), "steps": steps} for i in range(n)]
        t0 = time.time()
        ids = enqueue_many(items, settings=st.settings())
        wait_terminal(r, PREFIX, ids, timeout=180)
        t1 = time.time()
        recs = job_records(r, PREFIX, ids)
        sim = st.sim_stats()
        tasks = st.sim_tasks()
        created = sorted(t["created"] for t in tasks.values())
        ratio, rate, span = rate_ratio(created)
        paid = sim.get("followup_paid") or {}
        states = [x.get("state") for x in recs.values()]
        res.detail("steps", jobs=n, steps=steps, env=env, time_factor=tf, submissions=len(created),
                   extensions=sim["submissions_accepted"], followups=sim.get("followups_accepted"),
                   rate_limited=sim["rate_limited"], followup_rate_limited=sim.get("followup_rate_limited"),
                   span_s=span, makespan_s=t1 - t0, paid_keys=len(paid), paid_twice=sim.get("followups_paid_twice"),
                   max_in_any_window=window_max(created, WINDOW))
        res.add("steps", "429 answers of any kind (sim rate_limited)", int(sim["rate_limited"]), "== 0",
                sim["rate_limited"] == 0, note=f"{len(created)} submissions: {sim['submissions_accepted']} extensions, "
                f"{sum((sim.get('followups_accepted') or {}).values())} follow-ups, one 20/1 s account limit")
        res.add("steps", "provider utilisation: submit rate / limit while work waits", ratio, ">= 0.95",
                ratio >= 0.95, note=f"(N-{LIMIT})/span over all {len(created)} submissions, span {span:.2f}s, "
                f"most in any 1 s window {window_max(created, WINDOW)}")
        twice = int(sim.get("followups_paid_twice") or 0)
        res.add("steps", "(operation, task, take) paid more than once", twice, "== 0", twice == 0,
                note=f"{len(paid)} paid keys for {n} jobs x 2 takes x 2 steps; extensions accepted "
                     f"{sim['submissions_accepted']} for {n} jobs")
        mem = [int(r.memory_usage(K.job(j)) or 0) for j in ids[:20]]
        res.add("steps", "Redis bytes per finished job record with 4 steps", round(sum(mem) / len(mem)), "", None,
                "B", note="MEMORY USAGE of the job hash (takes, 4 step entries with results, event), mean of 20")
        res.add("steps", "jobs succeeded with every step", states.count("succeeded"), f"== {n}",
                states.count("succeeded") == n and len(paid) == 4 * n and sim["submissions_accepted"] == n)


# ==================================================================================================
# 13. early audio: time to the first progress event vs the result event
# ==================================================================================================
def scenario_progress(res: Results, workdir: Path) -> None:
    """60 jobs with KIE_PROGRESS_EVENTS=true and callbacks: enqueue -> first stream URL (job.progress
    'first') against enqueue -> job.succeeded, from the results stream's own entry times."""
    n, tf = 60, 0.05
    env = {**NO_LIMIT_KIE, "KIE_TICK_INTERVAL": TICK, "KIE_PROGRESS_EVENTS": "true", **poll_env(tf)}
    with BenchStack(workdir / "progress", env=env, key_prefix=PREFIX) as st:
        st.start_simulator("--time-factor", str(tf), *NO_LIMIT_SIM, "--seed", "13", "--duration-min", "40",
                           "--duration-max", "120")
        st.start_serve(callbacks_only=True)
        workers = [st.start_worker(concurrency=2)]
        st.start_beat()
        wait_ready(*workers)
        r = st.redis()
        ids, t0, _ = enqueue(st, n)
        wait_terminal(r, PREFIX, ids, timeout=120)
        time.sleep(1.0)
        created = {j: float(rec.get("created_ts") or t0) for j, rec in job_records(r, PREFIX, ids).items()}
        first: dict[str, float] = {}
        final: dict[str, float] = {}
        stages: Counter[str] = Counter()
        for entry_id, fields in r.xrange(K.results):
            event = json.loads(fields[b"payload"])
            job = event.get("job_id")
            if job not in created:
                continue
            at = int(entry_id.decode().split("-")[0]) / 1000.0
            if event["event"] == "job.progress":
                stages[event["stage"]] += 1
                if event["stage"] == "first":
                    first.setdefault(job, at)
            elif event["event"].startswith("job."):
                final[job] = at
        to_first = [first[j] - created[j] for j in first]
        to_final = [final[j] - created[j] for j in final]
        res.detail("progress", jobs=n, time_factor=tf, env=env, stages=dict(stages),
                   to_first_s={"p50": pct(to_first, 0.5), "p95": pct(to_first, 0.95)},
                   to_final_s={"p50": pct(to_final, 0.5), "p95": pct(to_final, 0.95)})
        res.add("progress", "time to first audio (job.progress first), p50 / p95",
                f"{pct(to_first, 0.5):.2f} / {pct(to_first, 0.95):.2f} s", "", None,
                note=f"{len(first)} of {n} jobs; scaled time (x{tf:g}): KIE's first take at 25 s of a 65 s "
                     "generation, scaled by each task's random 40-120 s length")
        res.add("progress", "time to the result event, p50 / p95",
                f"{pct(to_final, 0.5):.2f} / {pct(to_final, 0.95):.2f} s", "", None,
                note=f"first audio arrives at {median([a / b for a, b in zip(sorted(to_first), sorted(to_final))]):.2f}"
                     " of the time to the result (median of ranked pairs)")
        res.add("progress", "progress events per stage (text, first) / jobs",
                f"{stages['text']} / {stages['first']} of {n}", "each once", stages["first"] == n and
                stages["text"] <= n)


# ==================================================================================================
# 14. custody: the store handler's copy rate to an S3 API server
# ==================================================================================================
def scenario_store(res: Results, workdir: Path) -> None:
    """20 succeeded jobs, each 2 takes (4 MB) and WAV + stems on both takes (8 + 4 + 4 MB each), copied
    by the store handler from a loopback file server to moto's S3 server: MB/s, and each job's record."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import boto3
    from moto.server import ThreadedMotoServer

    from kie_extend.config import Settings
    from kie_extend.handlers.store import StoreHandler

    mb = 1024 * 1024
    mp3 = b"ID3" + bytes(4 * mb - 3)
    wav = b"RIFF" + bytes(4) + b"WAVE" + bytes(8 * mb - 12)
    bodies = {"mp3": (mp3, "audio/mpeg"), "wav": (wav, "audio/wav")}

    class Files(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body, kind = bodies[self.path.rsplit(".", 1)[-1]]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    files = f"http://127.0.0.1:{httpd.server_address[1]}"
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
    try:
        s3 = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket="bench")
        handler = StoreHandler(Settings(store_url="s3://bench/kept", store_endpoint_url=s3, store_region="us-east-1",
                                        allow_private_urls=True))
        n, copied = 20, 0
        t0 = time.perf_counter()
        for j in range(n):
            steps = [{"op": op, "take": t, "state": "succeeded", "result": result}
                     for t in (0, 1) for op, result in (("wav", {"wav_url": f"{files}/{j}-{t}.wav"}),
                                                        ("stems", {"vocal_url": f"{files}/{j}-{t}-v.mp3",
                                                                   "instrumental_url": f"{files}/{j}-{t}-i.mp3"}))]
            event = {"event": "job.succeeded", "job_id": f"bench-{j}", "tenant": "bench", "steps": steps,
                     "tracks": [{"id": f"t{t}", "audio_url": f"{files}/{j}-{t}.mp3"} for t in (0, 1)]}
            handler.deliver(event, f"bench-{j}:job.succeeded")
            copied += 2 * len(mp3) + 2 * (len(wav) + 2 * len(mp3))
        secs = time.perf_counter() - t0
    finally:
        moto.stop()
        httpd.shutdown()
    rate = copied / mb / secs
    res.detail("store", jobs=n, bytes=copied, seconds=secs, objects_per_job=10)
    res.add("store", "store handler copy rate, loopback files -> S3 API (moto)", round(rate, 1), "", None, "MB/s",
            note=f"{n} jobs x 10 objects ({copied / n / mb:.0f} MB per job: 2 takes, WAV and vocals + instrumental "
                 f"on both) in {secs:.1f}s; fetch checks and sha256 included, one delivery at a time")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SCENARIOS: dict[str, tuple[Callable[[Results, Path], None], int, str]] = {
    "limit": (scenario_limit, 240, "1. at the limit: submission rate vs 20/1 s, no 429"),
    "slots": (scenario_slots, 480, "2. few slots: makespan vs rate-bound ideal, naive design"),
    "polling": (scenario_polling, 300, "3. polling cost with and without callbacks"),
    "overhead": (scenario_overhead, 300, "4. overhead vs raw Celery no-op"),
    "memory": (scenario_memory, 540, "5. memory per in-flight job, RSS growth, TTL, tick cost"),
    "scale": (scenario_scale, 240, "6. enqueue_many rate, get_job O(1)"),
    "fairness": (scenario_fairness, 240, "7. fairness: tenants and priorities vs arrival order"),
    "cancel": (scenario_cancel, 150, "8. cancel a 5,000-job batch while submissions flow"),
    "backlog": (scenario_backlog, 1200, "9. 100,000 queued: memory, enqueue rate, tick cost"),
    "tenants": (scenario_tenants, 240, "10. tenants: weighted shares, invented names under strict"),
    "budget": (scenario_budget, 180, "11. budget: a capped tenant waits, a backlogged one keeps the rate"),
    "steps": (scenario_steps, 240, "12. follow-up steps: WAV + stems on both takes at the account limit"),
    "progress": (scenario_progress, 180, "13. early audio: time to first stream URL vs the result"),
    "store": (scenario_store, 180, "14. custody: the store handler's copy rate to an S3 API"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--list", action="store_true", help="list scenarios and exit")
    parser.add_argument("--out", default=str(BENCH / "results.json"), help="where to write results JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, budget, title) in SCENARIOS.items():
            print(f"{name:9} {title} (budget {budget}s)")
        return 0
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    workdir = Path(tempfile.mkdtemp(prefix="kie-bench-"))
    res = Results()
    git_start = git_meta()
    print(f"kie-extend benchmarks: {', '.join(names)}  (work dir {workdir})", flush=True)
    failed = False
    for name in names:
        func, budget, title = SCENARIOS[name]
        load = os.getloadavg()[0]
        print(f"\n== {title}  (load average {load:.2f})", flush=True)
        res.detail(name, loadavg_1m_at_start=round(load, 2))
        t = time.time()
        try:
            with time_limit(budget):
                func(res, workdir)
        except (Exception, ScenarioTimeout) as exc:
            failed = True
            res.error(name, f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        res.detail(name, scenario_seconds=round(time.time() - t, 1), loadavg_1m_at_end=round(os.getloadavg()[0], 2))
        print(f"   ({time.time() - t:.0f}s)", flush=True)
    print("\n" + res.table())
    out = Path(args.out)
    git_end = git_meta()
    changed = git_start != git_end
    if changed:
        print("\nWARNING: the code under test changed during the run (commit or uncommitted src/ files); "
              "see meta.git_at_start / meta.git_at_end in the results file")
    res.write(out, {**machine_meta(), "git_at_start": git_start, "git_at_end": git_end,
                    "code_changed_during_run": changed, "scenarios": names, "workdir": str(workdir)})
    print(f"\nwrote {out}  (total {time.time() - res.started:.0f}s)")
    if args.keep or failed:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def git_meta() -> dict[str, Any]:
    """The commit measured and whether src/ had uncommitted changes."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=BENCH.parent, capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line.split(maxsplit=1)[-1] for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    diff = git("diff", "HEAD", "--", "src")
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_uncommitted_files": dirty,
            "src_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


if __name__ == "__main__":
    raise SystemExit(main())
