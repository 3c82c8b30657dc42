"""Metrics kept in Redis, so every prefork process and machine adds up: the Prometheus text of ``/metrics``,
the system overview (``kie-extend status``, ``/v1/system``, the dashboard) and the per-minute series."""

from __future__ import annotations

import math
import re
import time
import weakref
from typing import Any

from kie_extend.store.jobstore import run_script
from kie_extend.store.keys import MINUTE_TTL
from kie_extend.store.record import iso_s
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import JobState

#: Histogram bucket bounds (seconds): one record-info call, and a job's time to result.
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RESULT_BUCKETS = (10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 3600.0)
#: Every histogram render() exports, by name, with its bounds.
HISTOGRAMS = {"poll_seconds": POLL_BUCKETS, "time_to_result_seconds": RESULT_BUCKETS}


def _iso_since(paused: dict[str, str] | None) -> dict[str, str] | None:
    if paused and paused.get("since"):
        try:
            paused = {**paused, "since": iso_s(float(paused["since"]))}
        except ValueError:
            pass
    return paused


def redis_memory(rt: Runtime) -> dict[str, object]:
    """The job store's memory: ``used`` and ``max`` bytes (0 = no limit), ``policy``, ``evicted_keys``."""
    memory, stats = rt.redis.info("memory"), rt.redis.info("stats")
    return {"used": int(memory.get("used_memory", 0)), "max": int(memory.get("maxmemory", 0)),
            "policy": str(memory.get("maxmemory_policy", "")), "evicted_keys": int(stats.get("evicted_keys", 0))}


def overview(rt: Runtime) -> dict[str, object]:
    """Jobs by state, gate use and pause, for ``kie-extend status``, ``/v1/system`` and ``/metrics``.

    ``infrastructure`` is ``{"job_store": state, "broker": state}`` (infra.check.InfraProbe.check:
    up, reason, detail, setting, masked url); the broker is probed here (up to
    infra.check.PROBE_TIMEOUT seconds), since nothing else in this view touches it.

    ``submission`` is :func:`submission`'s answer (paused or not, and why)."""
    store, gates = rt.store, rt.gates
    by_priority = rt.admission.waiting()
    waiting = sum(n for tenants in by_priority.values() for n in tenants.values())
    out: dict[str, Any] = {
        "jobs": {s.value: store.count(s) for s in JobState if s is not JobState.NOT_FOUND},
        "in_flight": gates.in_flight(),
        "max_in_flight": gates.max_in_flight,
        "rate_window_use": gates.window_use(),
        "rate_limit": f"{gates.limit}/{gates.window:g}s",
        "paused": _iso_since(gates.paused()),
        "operator_paused": _iso_since(gates.operator_paused()),
        "due": int(rt.redis.zcard(rt.keys.due)),
        "waiting": waiting,
        "waiting_by_priority": by_priority,
        "dead_letters": int(rt.redis.llen(rt.keys.dead_letters)),
        "breaker": _breaker(rt),
        "provider": provider_reach(rt),
        "infrastructure": rt.infra.check(),
        "redis_memory": redis_memory(rt),
    }
    out["submission"] = submission(out)
    return out


#: Why submission can be paused, in the order ``status`` names them.
PAUSE_REASONS = ("operator", "account", "breaker", "unreachable")


def submission(view: dict[str, Any]) -> dict[str, Any]:
    """Whether jobs are being sent to KIE now, and why not: ``{"paused": bool, "reasons": [{"reason":
    one of PAUSE_REASONS, "since": ISO-8601 UTC or None, "detail": text}, …]}``. The one answer
    ``kie-extend status``, ``GET /v1/system`` and ``/metrics`` give, from an :func:`overview`:
    ``operator`` (``kie-extend pause``), ``account`` (KIE's 401/402/433: the ``paused`` record),
    ``breaker`` (open after failed generations in a row), ``unreachable`` (KIE cannot be reached)."""
    reasons: list[dict[str, Any]] = []
    op, account, breaker, reach = (view.get("operator_paused"), view.get("paused"), view.get("breaker") or {},
                                   view.get("provider") or {})
    if op:
        reasons.append({"reason": "operator", "since": op.get("since"), "detail": op.get("reason") or ""})
    if account:
        reasons.append({"reason": "account", "since": account.get("since"),
                        "detail": f"code {account.get('code')}: {account.get('reason')}"})
    if breaker.get("state", "closed") != "closed":
        reasons.append({"reason": "breaker", "since": breaker.get("since"),
                        "detail": f"{breaker.get('threshold')} failed generations in a row; next probe at "
                                  f"{breaker.get('until')}"})
    if not reach.get("reachable", True):
        reasons.append({"reason": "unreachable", "since": reach.get("since"),
                        "detail": f"last error: {reach.get('last_error') or '?'}"})
    return {"paused": bool(reasons), "reasons": reasons}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_s(ts)


def provider_reach(rt: Runtime) -> dict[str, object]:
    """Whether KIE can be reached (admission/reach.py): Reachability.state() with its times as ISO-8601 UTC,
    plus ``next_probe_in`` (seconds, or None when reachable)."""
    st: dict[str, object] = rt.reach.state()
    nxt = st.get("next_probe")
    st["next_probe_in"] = None if st["reachable"] or nxt is None else round(max(0.0, float(nxt) - time.time()), 1)  # type: ignore[arg-type]
    for name in ("since", "next_probe", "last_failure", "last_probe", "recovered"):
        st[name] = _iso(st.get(name))  # type: ignore[arg-type]
    return st


def _breaker(rt: Runtime) -> dict[str, object]:
    """The provider breaker with its times as ISO-8601 UTC."""
    st = rt.breaker.state()
    for name in ("since", "until"):
        if st.get(name):
            st[name] = iso_s(float(st[name]))  # type: ignore[arg-type]
    return st


def last_tick(rt: Runtime) -> float:
    """When any beat last finished a tick, in unix seconds; 0.0 when none ever has (or the value
    is unreadable)."""
    raw = rt.redis.hget(rt.keys.tick_last, "at")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


# -- the per-minute series behind the dashboard's charts -----------------------------------------

#: Minutes the dashboard charts (the last hour).
SERIES_MINUTES = 60
#: Counters of a minute's hash (``Keys.minute``) that :func:`minute_series` returns, 0 when absent.
SERIES_COUNTS = ("submitted", "finished", "succeeded", "failed", "cancelled")
#: Gauges of a minute's hash, None for a minute no tick sampled.
SERIES_GAUGES = ("queued", "in_flight")

# The tick's last write: its time, and this minute's highest queue depth and in-flight count, in
# one round trip. KEYS: tick_last, state:queued, inflight, this minute's hash. ARGV: now, ttl.
_TICK = """
redis.call('HSET', KEYS[1], 'at', ARGV[1])
local q, f = redis.call('ZCARD', KEYS[2]), redis.call('SCARD', KEYS[3])
if q > tonumber(redis.call('HGET', KEYS[4], 'queued') or '-1') then redis.call('HSET', KEYS[4], 'queued', q) end
if f > tonumber(redis.call('HGET', KEYS[4], 'in_flight') or '-1') then redis.call('HSET', KEYS[4], 'in_flight', f) end
redis.call('EXPIRE', KEYS[4], ARGV[2])
return q
"""


def record_tick(rt: Runtime, now: float | None = None) -> None:
    """Mark a finished tick (``Keys.tick_last``) and sample the queue depth (queued jobs) and the
    in-flight count into this minute's series hash, keeping the minute's highest; one round trip."""
    now = time.time() if now is None else now
    k = rt.keys
    script = _tick_scripts.get(rt.redis)
    if script is None:
        script = _tick_scripts[rt.redis] = rt.redis.register_script(_TICK)
    run_script(script, [k.tick_last, k.state_index(JobState.QUEUED.value), k.inflight, k.minute(int(now // 60))],
               [repr(now), MINUTE_TTL])


#: The tick script registered on each client (EVALSHA: its text is not sent every tick).
_tick_scripts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def minute_series(rt: Runtime, minutes: int = SERIES_MINUTES, now: float | None = None) -> dict[str, Any]:
    """The last ``minutes`` whole and current minutes, oldest first, in one pipelined read:
    ``{"start": unix seconds of the first minute, "minutes": n, <each of SERIES_COUNTS>: [int],
    <each of SERIES_GAUGES>: [int | None], "time_to_result": [{le: count}]}`` (``le`` as text,
    ``"+Inf"`` last, per minute)."""
    now = time.time() if now is None else now
    last = int(now // 60)
    first = last - minutes + 1
    pipe = rt.redis.pipeline(transaction=False)
    for m in range(first, last + 1):
        pipe.hgetall(rt.keys.minute(m))
    rows = [{_text(k): _text(v) for k, v in row.items()} for row in pipe.execute()]
    out: dict[str, Any] = {"start": first * 60, "minutes": minutes}
    for name in SERIES_COUNTS:
        out[name] = [int(row.get(name, 0)) for row in rows]
    for name in SERIES_GAUGES:
        out[name] = [int(row[name]) if name in row else None for row in rows]
    prefix = "time_to_result_seconds:"
    out["time_to_result"] = [{f[len(prefix):]: int(v) for f, v in row.items() if f.startswith(prefix)} for row in rows]
    return out


def quantile(bins: dict[str, int], q: float) -> float | None:
    """The ``q`` quantile (0 < q < 1) of histogram ``bins`` (``{le: count}``, not cumulative, ``le``
    a bucket's upper bound in seconds as text or ``"+Inf"``), by linear interpolation inside the
    bucket as Prometheus's ``histogram_quantile`` does; None when empty. A quantile in ``+Inf``
    is reported as the highest finite bound."""
    bounds = sorted(((math.inf if le == "+Inf" else float(le)), n) for le, n in bins.items() if n > 0)
    total = sum(n for _, n in bounds)
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    finite = [b for b, _ in bounds if b != math.inf]
    for upper, n in bounds:
        if seen + n >= rank:
            if upper == math.inf:
                return max(finite) if finite else None
            return lower + (upper - lower) * ((rank - seen) / n)
        seen += n
        lower = upper
    return None  # pragma: no cover - rank <= total always ends the loop


def merge_bins(rows: list[dict[str, int]]) -> dict[str, int]:
    """Histogram bins of several minutes added up."""
    merged: dict[str, int] = {}
    for row in rows:
        for le, n in row.items():
            merged[le] = merged.get(le, 0) + n
    return merged


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _budget_lines(rt: Runtime) -> list[str]:
    """Each budgeted tenant's budget use (charged plus reserved in its window over its budget) and
    whether its jobs wait for budget now (credits/budgets.py)."""
    from kie_extend.credits.budgets import budgets, used, waiting

    caps = budgets(rt.settings, rt.redis, rt.keys)
    if not caps:
        return []
    spent = used(rt.redis, rt.keys, caps)
    held = waiting(rt.redis, rt.keys)
    lines = ["# HELP kie_extend_tenant_budget_used_ratio A tenant's charged plus reserved credits in its budget's "
             "rolling window, over its budget (1: used up; its jobs wait).",
             "# TYPE kie_extend_tenant_budget_used_ratio gauge"]
    for tenant, (credits, _) in sorted(caps.items()):
        ratio = spent.get(tenant, 0.0) / credits if credits > 0 else (1.0 if spent.get(tenant) else 0.0)
        lines.append(f'kie_extend_tenant_budget_used_ratio{{tenant="{tenant}"}} {round(ratio, 6):g}')
    lines += ["# HELP kie_extend_tenant_budget_credits A tenant's budget: credits per rolling window.",
              "# TYPE kie_extend_tenant_budget_credits gauge"]
    lines += [f'kie_extend_tenant_budget_credits{{tenant="{t}"}} {c:g}' for t, (c, _) in sorted(caps.items())]
    lines += ["# HELP kie_extend_tenant_budget_waiting 1 while a tenant's jobs wait in queued for budget.",
              "# TYPE kie_extend_tenant_budget_waiting gauge"]
    lines += [f'kie_extend_tenant_budget_waiting{{tenant="{t}"}} {1 if t in held else 0}' for t in sorted(caps)]
    return lines


def render(rt: Runtime) -> str:
    """The metrics in Prometheus text format (each family grouped, with its TYPE line)."""
    ov = overview(rt)
    lines = ["# TYPE kie_extend_jobs gauge"]
    for state, n in ov["jobs"].items():  # type: ignore[union-attr]
        lines.append(f'kie_extend_jobs{{state="{state}"}} {n}')
    for name in ("in_flight", "max_in_flight", "due", "waiting", "dead_letters", "rate_window_use"):
        lines += [f"# TYPE kie_extend_{name} gauge", f"kie_extend_{name} {ov[name]}"]
    lines += ["# TYPE kie_extend_paused gauge", f"kie_extend_paused {1 if ov['paused'] else 0}",
              "# TYPE kie_extend_operator_paused gauge", f"kie_extend_operator_paused {1 if ov['operator_paused'] else 0}"]
    sub = ov["submission"]
    lines += ["# HELP kie_extend_submission_paused 1 while no job is sent to KIE, for any reason "
              "(kie_extend_submission_paused_reason says which).",
              "# TYPE kie_extend_submission_paused gauge",
              f"kie_extend_submission_paused {1 if sub['paused'] else 0}",  # type: ignore[index]
              "# TYPE kie_extend_submission_paused_reason gauge"]
    held = {r["reason"] for r in sub["reasons"]}  # type: ignore[index]
    lines += [f'kie_extend_submission_paused_reason{{reason="{r}"}} {1 if r in held else 0}' for r in PAUSE_REASONS]
    lines.append("# TYPE kie_extend_waiting_jobs gauge")
    for prio, tenants in ov["waiting_by_priority"].items():  # type: ignore[union-attr]
        for tenant, n in tenants.items():
            lines.append(f'kie_extend_waiting_jobs{{priority="{prio}",tenant="{tenant}"}} {n}')
    breaker = ov["breaker"]
    lines += ["# TYPE kie_extend_breaker_open gauge",
              f"kie_extend_breaker_open {0 if breaker['state'] == 'closed' else 1}",  # type: ignore[index]
              "# TYPE kie_extend_breaker_failure_streak gauge",
              f"kie_extend_breaker_failure_streak {breaker['streak']}"]  # type: ignore[index]
    reach = ov["provider"]
    lines += ["# HELP kie_extend_provider_reachable 1 while KIE can be reached; 0 while connect failures, "
              "edge 5xx or unanswered requests hold submission (provider unreachable).",
              "# TYPE kie_extend_provider_reachable gauge",
              f"kie_extend_provider_reachable {1 if reach['reachable'] else 0}"]  # type: ignore[index]
    infra: dict[str, dict[str, Any]] = ov["infrastructure"]  # type: ignore[assignment]
    lines += ["# HELP kie_extend_infra_up 1 while a part (job_store, broker) answers us; 0 with the reason "
              "(refused_credentials, unreachable, timeout, not_ready, error).",
              "# TYPE kie_extend_infra_up gauge"]
    for part, st in infra.items():
        lines.append(f'kie_extend_infra_up{{part="{part}",reason="{st["reason"]}"}} {1 if st["up"] else 0}')
    mem: dict[str, object] = ov["redis_memory"]  # type: ignore[assignment]
    lines += ["# HELP kie_extend_redis_used_memory_bytes Memory the job store's Redis uses.",
              "# TYPE kie_extend_redis_used_memory_bytes gauge", f"kie_extend_redis_used_memory_bytes {mem['used']}",
              "# HELP kie_extend_redis_maxmemory_bytes The job store's maxmemory (0: no limit).",
              "# TYPE kie_extend_redis_maxmemory_bytes gauge", f"kie_extend_redis_maxmemory_bytes {mem['max']}",
              "# HELP kie_extend_redis_evicted_keys_total Keys the job store's Redis evicted since it started.",
              "# TYPE kie_extend_redis_evicted_keys_total counter",
              f"kie_extend_redis_evicted_keys_total {mem['evicted_keys']}"]
    lines += ["# HELP kie_extend_last_tick_timestamp_seconds When a beat last finished a tick (unix seconds; 0: never).",
              "# TYPE kie_extend_last_tick_timestamp_seconds gauge",
              f"kie_extend_last_tick_timestamp_seconds {last_tick(rt):.3f}"]
    lines += _budget_lines(rt)
    stats = {k.decode(): v.decode() for k, v in rt.redis.hgetall(rt.keys.stats).items()}
    responses: list[str] = []
    counters: dict[str, str] = {}
    hists: dict[str, dict[str, str]] = {}
    for name, value in sorted(stats.items()):
        h = re.match(r"^hist:([a-z_]+):(.+)$", name)
        m = re.match(r"^(submit|poll)_code_(.+)$", name)
        if h:
            hists.setdefault(h.group(1), {})[h.group(2)] = value
        elif m:
            responses.append(f'kie_extend_provider_responses_total{{call="{m.group(1)}",code="{m.group(2)}"}} {value}')
        else:
            counters[re.sub(r"[^a-zA-Z0-9_]", "_", name)] = value
    if responses:
        lines += ["# TYPE kie_extend_provider_responses_total counter", *responses]
    for metric, value in counters.items():
        lines += [f"# TYPE kie_extend_{metric}_total counter", f"kie_extend_{metric}_total {value}"]
    for metric, bounds in sorted(HISTOGRAMS.items()):
        parts = hists.get(metric, {})
        lines.append(f"# TYPE kie_extend_{metric} histogram")
        running = 0
        for le in [f"{b:g}" for b in bounds] + ["+Inf"]:  # every bucket, even empty ones
            running += int(parts.get(f"bin:{le}", 0))
            lines.append(f'kie_extend_{metric}_bucket{{le="{le}"}} {running}')
        lines += [f"kie_extend_{metric}_sum {parts.get('sum', '0')}",
                  f"kie_extend_{metric}_count {parts.get('count', '0')}"]
    return "\n".join(lines) + "\n"
