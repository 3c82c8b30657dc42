"""What the dashboard's pages show, read from the job store (no HTTP, no templates here).

Every function takes the process's :class:`~kie_extend.infra.runtime.Runtime` and returns plain dicts and
lists for the templates. Listings read the state indexes (sorted sets scored by creation time), so
"newest first" is by creation; filters that have no index of their own (tenant, a state inside a
batch) look at the newest :data:`SCAN_LIMIT` candidates only, and the page says so.
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime, timezone
from typing import Any

from kie_extend.jobs.batches import get_batch, list_batches
from kie_extend.jobs.events import status_record
from kie_extend.jobs.idempotency import Idempotency
from kie_extend.jobs.listing import held_for_budget
from kie_extend.credits.budgets import held_back
from kie_extend.credits.usage import usage_report
from kie_extend.infra.metrics import merge_bins, minute_series, quantile
from kie_extend.infra.metrics import overview as metrics_overview
from kie_extend.http import charts as svg
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import TERMINAL, JobState
from kie_extend.store.record import JobRecord

#: Rows per page of the jobs table.
PAGE_SIZE = 50
#: Most candidate jobs a filtered listing looks at (newest first).
SCAN_LIMIT = 5000
#: Seconds the credit balance is cached, and the timeouts (connect, read) of the call that reads it.
CREDITS_TTL = 30.0
CREDITS_TIMEOUT = (1.5, 2.5)
#: Jobs (newest by creation, in states that were sent) whose ``submitted_ts`` give the submission rate.
RATE_SAMPLE = 2000

#: Every state a job can be in, in the order the pages list them.
STATE_NAMES = [s.value for s in JobState if s is not JobState.NOT_FOUND]

_credits_lock = threading.Lock()
_credits_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def iso(ts: Any) -> str:
    """Epoch seconds (number or text) as ``YYYY-MM-DD HH:MM:SS.mmmZ``; ISO text passes through; ``""`` for none."""
    if ts in (None, ""):
        return ""
    try:
        when = datetime.fromtimestamp(float(ts), timezone.utc)
    except (TypeError, ValueError):
        return str(ts)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def pretty(value: Any) -> str:
    """Indented JSON for a ``<pre>`` block."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


# -- overview ------------------------------------------------------------------------------------

def overview(rt: Runtime) -> dict[str, Any]:
    """``metrics.overview`` plus ``submissions`` (the shared counter's total) and ``rate``:
    ``{"last_1m", "last_5m", "last_15m", "per_min_15m", "sample"}`` counted from the ``submitted_ts``
    of the newest :data:`RATE_SAMPLE` jobs that were sent."""
    ov = dict(metrics_overview(rt))
    ov["submissions"] = int(rt.redis.hget(rt.keys.stats, "submissions") or 0)
    ov["rate"] = submission_rate(rt)
    ov["total"] = sum(ov["jobs"].values())  # type: ignore[union-attr]
    return ov


def submission_rate(rt: Runtime, now: float | None = None) -> dict[str, Any]:
    """Submissions in the last 1, 5 and 15 minutes and the 15-minute average per minute, from the
    ``submitted_ts`` of recent jobs (a job retried counts once, at its latest submission)."""
    now = now or time.time()
    ids: list[str] = []
    for state in (JobState.SUBMITTED, JobState.SUCCEEDED, JobState.FAILED):
        ids += [_t(i) for i in rt.redis.zrevrange(rt.keys.state_index(state.value), 0, RATE_SAMPLE - 1)]
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(rt.keys.job(job_id), "submitted_ts")
    stamps = [float(x) for x in pipe.execute() if x] if ids else []
    ages = [now - s for s in stamps]
    n1, n5, n15 = (sum(1 for a in ages if 0 <= a <= w * 60) for w in (1, 5, 15))
    return {"last_1m": n1, "last_5m": n5, "last_15m": n15, "per_min_15m": round(n15 / 15, 2), "sample": len(ids)}


#: Minutes per point of the time-to-result percentile chart.
TTR_WINDOW = 5


def _hhmm(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M")


def chart_data(rt: Runtime, now: float | None = None) -> dict[str, Any]:
    """The overview's charts of the last hour from the per-minute series (``metrics.minute_series``):
    ``{"throughput", "depth", "ttr"}``, each ``{"svg": markup, "legend": markup}``, plus ``hour``:
    ``{"submitted", "finished", "failed", "cancelled", "p50", "p90", "p99"}`` (percentiles in seconds
    or None; ``finished`` counts succeeded, failed and cancelled jobs)."""
    series = minute_series(rt, now=now)
    n, start = series["minutes"], series["start"]
    labels = [_hhmm(start + 60 * i) + " UTC" * (i == n - 1) for i in range(n)]
    flow = [svg.Series("submitted", series["submitted"], "c-1"), svg.Series("finished", series["finished"], "c-2"),
            svg.Series("failed", series["failed"], "c-3")]
    depth = [svg.Series("queued", series["queued"], "c-1"), svg.Series("in flight", series["in_flight"], "c-4")]
    windows = [series["time_to_result"][i:i + TTR_WINDOW] for i in range(0, n, TTR_WINDOW)]
    merged = [merge_bins(w) for w in windows]
    ttr = [svg.Series(name, [quantile(b, q) for b in merged], css)
           for name, q, css in (("p50", 0.5, "c-1"), ("p90", 0.9, "c-4"), ("p99", 0.99, "c-3"))]
    ttr_labels = [_hhmm(start + 60 * TTR_WINDOW * i) for i in range(len(windows))]
    hour = merge_bins(series["time_to_result"])
    return {
        "throughput": {"svg": svg.line_chart(flow, labels, title="Submissions and finished jobs per minute",
                                             chart_id="chart-throughput"), "legend": svg.legend(flow)},
        "depth": {"svg": svg.line_chart(depth, labels, title="Queue depth (highest per minute)",
                                        chart_id="chart-depth"), "legend": svg.legend(depth)},
        "ttr": {"svg": svg.line_chart(ttr, ttr_labels, title=f"Time to result per {TTR_WINDOW} minutes",
                                      unit=" s", chart_id="chart-ttr"), "legend": svg.legend(ttr)},
        "hour": {"submitted": sum(series["submitted"]), "finished": sum(series["finished"]),
                 "failed": sum(series["failed"]), "cancelled": sum(series["cancelled"]), **{name: quantile(hour, q) for name, q in
                                                      (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}},
    }


def credits(rt: Runtime) -> dict[str, Any]:
    """The provider's credit balance: ``{"ok": True, "credits": float, "at": epoch}`` or
    ``{"ok": False, "error": str, "at": epoch}``; cached :data:`CREDITS_TTL` seconds, short timeouts,
    never raises."""
    s = rt.settings
    key = f"{s.base_url}|{s.route}"
    with _credits_lock:
        hit = _credits_cache.get(key)
        if hit and time.monotonic() - hit[0] < CREDITS_TTL:
            return hit[1]
    try:
        client = type(rt.client)(s.base_url, s.api_key_value(), connect_timeout=CREDITS_TIMEOUT[0],
                                 read_timeout=CREDITS_TIMEOUT[1])
        result: dict[str, Any] = {"ok": True, "credits": client.credits(), "at": time.time()}
    except Exception as exc:  # any failure is shown as "unavailable", never breaks the page
        result = {"ok": False, "error": type(exc).__name__, "at": time.time()}
    with _credits_lock:
        _credits_cache[key] = (time.monotonic(), result)
    return result


def spend(rt: Runtime, tenant: str | None = None) -> dict[str, Any]:
    """The last 24 hours' credits by tenant (credits/usage.py ``usage_report``): every tenant, or
    ``tenant``'s alone (a tenant's session)."""
    return usage_report(rt, 86400, tenant)


# -- jobs ----------------------------------------------------------------------------------------

_ROW_FIELDS = ("state", "tenant", "priority", "batch_id", "created_at", "created_ts", "kie_status", "attempts", "error",
               "idempotency_key", "retried", "duplicate_of")


def _candidates(rt: Runtime, *, state: str, batch: str) -> list[tuple[str, float]]:
    """(job id, creation time) pairs, newest first, from the narrowest index the filters allow."""
    if batch:
        pairs = rt.redis.zrevrange(rt.keys.batch_jobs(batch), 0, SCAN_LIMIT - 1, withscores=True)
        return [(_t(j), float(s)) for j, s in pairs]
    states = [state] if state in STATE_NAMES else STATE_NAMES
    found: list[tuple[str, float]] = []
    for st in states:
        pairs = rt.redis.zrevrange(rt.keys.state_index(st), 0, SCAN_LIMIT - 1, withscores=True)
        found += [(_t(j), float(s)) for j, s in pairs]
    found.sort(key=lambda p: p[1], reverse=True)
    return found[:SCAN_LIMIT]


def _search_ids(rt: Runtime, q: str) -> list[str]:
    """Job ids a search matches: the id itself, the first job of an idempotency key, a batch's jobs."""
    out: list[str] = []
    if rt.redis.exists(rt.keys.job(q)):
        out.append(q)
    first = Idempotency(rt.redis, rt.keys, rt.settings.idempotency_window).first_job(q, rt.settings.default_tenant)
    if first:
        out.append(_t(first))
    out += [_t(j) for j in rt.redis.zrevrange(rt.keys.batch_jobs(q), 0, SCAN_LIMIT - 1)]
    return out


def list_jobs(rt: Runtime, *, state: str = "", batch: str = "", tenant: str = "", q: str = "",
              page: int = 1) -> dict[str, Any]:
    """One page of jobs, newest first: ``{"rows": [{job_id, state, tenant, priority, batch_id,
    created_at, kie_status, attempts, error_kind, retried, waiting_for}], "page", "pages", "total", "capped"}``.

    ``state``, ``batch`` and ``tenant`` filter exactly; ``q`` matches a job id, an idempotency key,
    a batch id or a tenant. ``capped`` is true when only the newest :data:`SCAN_LIMIT` were looked at."""
    q = q.strip()
    pairs = _candidates(rt, state=state, batch=batch)
    capped = len(pairs) >= SCAN_LIMIT
    ids = [j for j, _ in pairs]
    matched: set[str] = set()
    if q:
        found = _search_ids(rt, q)
        matched = set(found)
        seen = set(ids)
        ids = [j for j in dict.fromkeys(found) if j not in seen] + ids
    rows = []
    for rec in _rows(rt, ids):
        if not rec.get("state"):
            if not batch:
                continue  # expired since it was indexed
            rec["state"] = "pending"  # declared to its batch, message not yet taken by a worker
        if state and rec["state"] != state:
            continue
        if tenant and (rec.get("tenant") or "default") != tenant:
            continue
        if q and not (rec["job_id"] in matched or rec.get("idempotency_key") == q or rec.get("batch_id") == q
                      or (rec.get("tenant") or "default") == q):
            continue
        rows.append(rec)
    total = len(rows)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(page, pages)
    return {"rows": rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE], "page": page, "pages": pages, "total": total,
            "capped": capped}


def _rows(rt: Runtime, ids: list[str]) -> list[dict[str, Any]]:
    """The table fields of each job (one pipelined round trip)."""
    if not ids:
        return []
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(rt.keys.job(job_id), *_ROW_FIELDS)
    tenants = rt.settings.tenants is not None
    if tenants:  # who waits for budget, in the same round trip (credits/budgets.py held_back)
        pipe.hkeys(rt.keys.budget_wait)
        pipe.hgetall(rt.keys.tenant_settings)
    found = pipe.execute()
    held = held_back(rt.settings, found[-2], found[-1]) if tenants else set()
    out = []
    for job_id, values in zip(ids, found[:len(ids)]):
        rec: dict[str, Any] = {"job_id": job_id, **{f: (_t(v) if v is not None else None)
                                                    for f, v in zip(_ROW_FIELDS, values)}}
        rec["waiting_for"] = "budget" if rec.get("state") == "queued" and rec.get("tenant") in held else None
        # Newer records keep their creation time once, as created_ts (store/record.py).
        rec["created_at"] = JobRecord.from_hash({"created_at": rec["created_at"] or "",
                                                 "created_ts": rec.pop("created_ts") or ""}).created_at
        # The table shows the fields as stored (text); only the error is read, for its kind.
        rec["error_kind"] = JobRecord.from_hash({"error": rec.pop("error") or ""}).error_kind
        if rec.get("duplicate_of") and not rec.get("state"):
            rec["state"] = "duplicate"
        out.append(rec)
    return out


def job_detail(rt: Runtime, job_id: str) -> dict[str, Any] | None:
    """One job for its page: the status record plus ``timeline`` (``[{"at", "from", "to",
    "after"}]``, ``after`` = seconds since the previous move), ``request``, ``last_poll_at`` (epoch
    seconds or None), ``retried``, ``idempotency_key``, ``can_retry``, ``can_cancel``, ``waiting_for``
    (``"budget"`` while its tenant's budget holds it, as ``get_job``); None for an unknown job."""
    job = rt.store.get_record(job_id)
    if job is None:
        return None
    rec = status_record(job, job_id)
    timeline: list[dict[str, Any]] = []
    prev = None
    for at, frm, to in job.history:
        timeline.append({"at": at, "from": frm or "(new)", "to": to,
                         "after": None if prev is None else round(at - prev, 3)})
        prev = at
    rec.update({
        "timeline": timeline,
        "request": job.request or {},
        "last_poll_at": job.last_poll_ts,
        "retried": job.retried,
        "idempotency_key": job.idempotency_key,
        "can_retry": job.state is JobState.FAILED and not job.invalid_fields,
        "can_cancel": job.state is JobState.QUEUED,
        "terminal": job.state in TERMINAL,
        "tracks": [t for t in rec["tracks"]],
    })
    if held_for_budget(rt, job):
        rec["waiting_for"] = "budget"
    for track in rec["tracks"]:
        url = str(track.get("audio_url") or "")
        track["playable"] = url if url.startswith(("http://", "https://")) else None
    rec["step_rows"] = step_rows(rec.get("steps"), rec["tracks"])
    return rec


#: Result fields of a step that are audio to play on the job's page, with their labels.
_AUDIO = {"wav_url": "WAV", "vocal_url": "vocals", "instrumental_url": "instrumental"}


def _web(url: Any) -> str | None:
    text = str(url or "")
    return text if text.startswith(("http://", "https://")) else None


def step_rows(steps: list[dict[str, Any]] | None, tracks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job page's follow-up steps: ``[{"op", "take", "take_title", "state", "kie_task_id", "error",
    "players": [(label, url)], "links": [(label, url)], "words"}]``: the WAV and the vocals and
    instrumental (and every other stem) as players, the video and the MIDI notes' count as links or
    text, the lyrics' word count; only http(s) URLs."""
    rows = []
    for step in steps or []:
        result = step.get("result") or {}
        take = step.get("take")
        title = None
        if isinstance(take, int) and 0 <= take < len(tracks):
            title = tracks[take].get("title") or tracks[take].get("id")
        players = [(label, _web(result.get(key))) for key, label in _AUDIO.items() if _web(result.get(key))]
        players += [(key.removesuffix("_url").replace("_", " "), _web(url)) for key, url in result.items()
                    if key.endswith("_url") and key not in _AUDIO and key != "video_url" and _web(url)]
        links = [("video (MP4)", _web(result.get("video_url")))] if _web(result.get("video_url")) else []
        notes = sum(len(i.get("notes") or []) for i in result.get("notes") or [] if isinstance(i, dict))
        rows.append({"op": step.get("op"), "take": take, "take_title": title, "state": step.get("state"),
                     "kie_task_id": step.get("kie_task_id"), "error": step.get("error"), "players": players,
                     "links": links, "notes": notes if "notes" in result else None,
                     "words": len(result.get("aligned_words") or []) if "aligned_words" in result else None})
    return rows


# -- batches -------------------------------------------------------------------------------------

def with_progress(info: dict[str, Any]) -> dict[str, Any]:
    """A batch record plus ``done`` (jobs that ended), ``percent`` (0-100) and ``segments``
    (``[(state, n, percent)]`` for the progress bar)."""
    total = int(info.get("total") or 0)
    counts: dict[str, int] = info.get("counts") or {}
    ended = {s.value for s in TERMINAL} | {"duplicate"}
    done = sum(n for s, n in counts.items() if s in ended)
    order = ["succeeded", "duplicate", "failed", "cancelled", "submitted", "submitting", "queued", "pending"]
    segments = [(s, counts[s], round(100 * counts[s] / total, 2) if total else 0) for s in order if counts.get(s)]
    return {**info, "done": done, "percent": round(100 * done / total) if total else 0, "segments": segments}


def batches(rt: Runtime, limit: int = 100) -> list[dict[str, Any]]:
    """The newest batches with their progress (see :func:`with_progress`)."""
    return [with_progress(b) for b in list_batches(rt, limit) if b.get("state") != "not_found"]


__all__ = ["overview", "chart_data", "credits", "submission_rate", "list_jobs", "job_detail", "batches", "with_progress",
           "get_batch", "iso", "pretty"]
