"""Shared machinery of the benchmarks: the stack, waiting for jobs, reading records, results table."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import requests

from kie_extend.cli.devstack import Child, DevStack
from kie_extend.store.keys import Keys

BENCH = Path(__file__).resolve().parent
TERMINAL = ("succeeded", "failed")


# --------------------------------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------------------------------
class BenchStack(DevStack):
    """DevStack whose simulator also answers ``GET /_sim/bench/tasks`` (see simtap.py)."""

    def start_simulator(self, *flags: str) -> str:
        """Start bench/simtap.py (the simulator + one timing route) with ample credits (10k jobs and more)."""
        return super().start_simulator("--credits", "1000000000", *flags,
                                       command=[sys.executable, str(BENCH / "simtap.py")])

    def sim_tasks(self) -> dict[str, dict[str, Any]]:
        """Every simulator task: wall-clock ``created`` and ``done``, ``duration``, ``callback_url``."""
        assert self.sim_url
        return requests.get(self.sim_url + "/_sim/bench/tasks", timeout=30).json()  # type: ignore[no-any-return]

    def sim_reset(self) -> None:
        """Forget the simulator's tasks, counters and limits."""
        assert self.sim_url
        requests.post(self.sim_url + "/_sim/reset", timeout=10).raise_for_status()

    def start_naive_worker(self, concurrency: int, queue: str, name: str = "naive") -> Child:
        """A worker of bench/naive.py's own Celery app, on the same broker."""
        env = {"PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "NAIVE_BROKER_URL": self.redis_url}
        child = self._spawn(name, [sys.executable, "-m", "celery", "-A", "naive", "worker", "-c", str(concurrency),
                                   "-P", "prefork", "-Q", queue, "-n", f"{name}@%h", "--without-gossip",
                                   "--without-mingle", "--loglevel", "INFO"], env=env)
        return child

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def tail_logs(self, chars: int = 1500) -> str:
        out = []
        for child in self.children:
            try:
                out.append(f"--- {child.name} ({child.log_path})\n" + Path(child.log_path).read_text()[-chars:])
            except OSError:
                pass
        return "\n".join(out)


def extend_request(sim_url: str, i: int, callback_url: str | None = None) -> dict[str, Any]:
    """A valid extend request (the same shape as the end-to-end tests)."""
    req: dict[str, Any] = {
        "uploadUrl": f"{sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
        "continueAt": 10, "model": "V5", "prompt": f"[Verse]\nbench take {i}", "style": "folk",
        "title": f"Bench {i}",
    }
    if callback_url:
        req["callBackUrl"] = callback_url
    return req


# --------------------------------------------------------------------------------------------------
# waiting and reading
# --------------------------------------------------------------------------------------------------
def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> float:
    """Poll ``predicate`` until true; returns the wall time it became true; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def job_states(r: redis.Redis, prefix: str, ids: list[str]) -> list[str | None]:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(Keys(prefix).job(job_id), "state")
    return [s.decode() if s else None for s in pipe.execute()]


def wait_terminal(r: redis.Redis, prefix: str, ids: list[str], timeout: float, interval: float = 0.1) -> float:
    """Wait until every job is succeeded or failed; returns the wall time that was first seen."""
    pending = list(ids)

    def done() -> bool:
        nonlocal pending
        states = job_states(r, prefix, pending)
        pending = [j for j, s in zip(pending, states) if s not in TERMINAL]
        return not pending

    try:
        return wait_until(done, timeout, interval, "jobs to finish")
    except TimeoutError:
        raise TimeoutError(f"{len(pending)} of {len(ids)} jobs not finished after {timeout:.0f}s") from None


def job_records(r: redis.Redis, prefix: str, ids: Iterable[str]) -> dict[str, dict[str, str]]:
    ids = list(ids)
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(Keys(prefix).job(job_id))
    out = {}
    for job_id, raw in zip(ids, pipe.execute()):
        out[job_id] = {k.decode(): v.decode() for k, v in raw.items()}
    return out


def iso_ts(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stats_hash(r: redis.Redis, prefix: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in r.hgetall(Keys(prefix).stats).items()}


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), nearest-rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_cpu(st: DevStack) -> dict[str, float]:
    """CPU seconds so far of every child of the stack (Celery workers with their pool processes),
    the embedded Valkey, and this process."""
    out: dict[str, float] = {}
    for child in st.children:
        if child.alive():
            out[child.name] = cpu_seconds(child.pid) + sum(cpu_seconds(p) for p in children_of(child.pid))
    if st.valkey is not None and st.valkey.proc is not None:
        out["valkey"] = cpu_seconds(st.valkey.proc.pid)
    out["bench (producer)"] = cpu_seconds(os.getpid())
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], per: float = 1.0) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0.0)) / per * 1000, 3) for k in after}


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (the prefork pool processes of a Celery worker)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return sorted(kids)


def queue_drained(r: redis.Redis, queue: str) -> bool:
    """No message waiting in ``queue`` and none delivered-but-unacked (kombu's ``unacked`` hash)."""
    pipe = r.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen("unacked")
    waiting, unacked = pipe.execute()
    return waiting == 0 and unacked == 0


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    metric: str
    value: float | int | str | None
    target: str
    status: str  # PASS, MISS, INFO, ERROR
    unit: str = ""
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, scenario: str, metric: str, value: Any, target: str = "", ok: bool | None = None,
            unit: str = "", note: str = "") -> Row:
        status = "INFO" if ok is None else ("PASS" if ok else "MISS")
        if isinstance(value, float) and math.isnan(value):
            status = "ERROR" if ok is not None else status
        row = Row(scenario, metric, _round(value), target, status, unit, note)
        self.rows.append(row)
        shown = f"{fmt(row.value)}{(' ' + unit) if unit else ''}"
        print(f"  [{scenario}] {metric}: {shown}" + (f"   target {target}" if target else "") + f"   {status}"
              + (f"   ({note})" if note else ""), flush=True)
        return row

    def error(self, scenario: str, message: str) -> None:
        self.rows.append(Row(scenario, "scenario error", None, "", "ERROR", note=message[:300]))
        print(f"  [{scenario}] ERROR: {message}", flush=True)

    def detail(self, scenario: str, **values: Any) -> None:
        self.details.setdefault(scenario, {}).update(values)

    def table(self) -> str:
        headers = ("scenario", "metric", "value", "target", "result")
        lines = [(r.scenario, r.metric, f"{fmt(r.value)}{(' ' + r.unit) if r.unit else ''}", r.target, r.status)
                 for r in self.rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
        widths[1] = min(widths[1], 62)
        out = []
        sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"
        out.append(sep)
        out.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
        out.append(sep)
        for line in lines:
            out.append("| " + " | ".join(str(c)[:w].ljust(w) for c, w in zip(line, widths)) + " |")
        out.append(sep)
        judged = [r for r in self.rows if r.status in ("PASS", "MISS", "ERROR")]
        passed = sum(r.status == "PASS" for r in judged)
        out.append(f"{passed} of {len(judged)} targets met; "
                   f"{sum(r.status == 'MISS' for r in judged)} missed; {sum(r.status == 'ERROR' for r in judged)} errors")
        notes = [(i, r) for i, r in enumerate(self.rows) if r.note]
        if notes:
            out.append("notes:")
            for _, r in notes:
                out.append(f"  - [{r.scenario}] {r.metric}: {r.note}")
        return "\n".join(out)

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        doc = {"meta": {**meta, "started": datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
                        "elapsed_seconds": round(time.time() - self.started, 1)},
               "results": [asdict(r) for r in self.rows], "details": self.details}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(path)


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        if abs(value) >= 100:
            return round(value, 1)
        if abs(value) >= 1:
            return round(value, 3)
        return round(value, 4)
    return value


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine_meta() -> dict[str, Any]:
    load = os.getloadavg()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load]}


class ScenarioTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ScenarioTimeout in the main thread after ``seconds`` (every scenario is bounded)."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise ScenarioTimeout(f"scenario exceeded its {seconds}s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
