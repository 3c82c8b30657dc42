"""Job listings with cursor pagination, newest first (``GET /v1/jobs``).

The sources are sorted sets scored by a job's creation time (epoch seconds): a state's index
(``Keys.state_index``), a batch's job set (``Keys.batch_jobs``), or, with no state given, every
state's index merged. Order is (score, id) descending, which is Redis' own reverse order, ties
included. A cursor is ``<score>~<id>`` of the last job returned (opaque to callers; its form is in the
OpenAPI document); the next page resumes just after it, so jobs that change state meanwhile neither repeat nor shift
the rest.

Filters read the job records (tenant; state within a batch). One page looks at no more than
``SCAN_BUDGET`` candidates: with a rare filter a page may hold fewer than ``limit`` jobs while
``next_cursor`` is still set; keep following it until it is ``None``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

from kie_extend.credits.budgets import budgets, held_back
from kie_extend.credits.ledger import job_credits
from kie_extend.errors import ValidationError
from kie_extend.jobs.events import status_record
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import JobState
from kie_extend.store.record import EMPTY, JobRecord

#: Default and largest page size.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Ids read per round trip from a sorted set.
CHUNK = 200
#: Candidates one page may examine when filters drop most of them.
SCAN_BUDGET = 5000
#: State shown for a batch's declared job whose message no worker has recorded yet.
PENDING = "pending"

Entry = tuple[float, str]


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_cursor(score: float, job_id: str) -> str:
    """The cursor for resuming after ``(score, job_id)``: ``<score>~<job id>`` (URL-safe; treat it as
    opaque; its form is stated so API tools can tell a well-formed one)."""
    return f"{score!r}~{job_id}"


def decode_cursor(cursor: str) -> Entry:
    """``(score, job_id)`` from a cursor; raises ValidationError (field ``cursor``) on a bad one."""
    score, sep, job_id = cursor.partition("~")
    try:
        value = float(score)
    except ValueError:
        value = math.nan
    if not sep or not job_id or not math.isfinite(value) or value < 0:
        raise ValidationError([{"field": "cursor", "message": "not a cursor this API returned"}])
    return value, job_id


def _walk(rt: Runtime, key: str, after: Entry | None) -> Iterator[Entry]:
    """``(score, id)`` of a sorted set, descending, strictly after ``after``."""
    r = rt.redis
    if after is None:
        start = 0
        while True:
            rows = r.zrevrange(key, start, start + CHUNK - 1, withscores=True)
            for member, score in rows:
                yield float(score), _t(member)
            if len(rows) < CHUNK:
                return
            start += CHUNK
    score, last = after
    offset = 0
    pipe = r.pipeline(transaction=False)
    pipe.zscore(key, last)
    pipe.zrevrank(key, last)
    pipe.zcount(key, f"({score!r}", "+inf")
    there, rank, higher = pipe.execute()
    if there is not None and float(there) == score and rank is not None:
        # Ties sit in reverse lexical order after every higher score: skip straight past ``last``.
        offset = int(rank) - int(higher) + 1
    while True:
        rows = r.zrevrangebyscore(key, repr(score), "-inf", start=offset, num=CHUNK, withscores=True)
        for member, s in rows:
            entry = (float(s), _t(member))
            if entry[0] == score and entry[1] >= last:
                continue  # a tie at or before the cursor (only when ``last`` left the set)
            yield entry
        if len(rows) < CHUNK:
            return
        offset += CHUNK


def _records(rt: Runtime, ids: list[str]) -> tuple[list[JobRecord | None], set[str]]:
    """The jobs' records (one ``HGETALL`` each, in one round trip; None for a job without one) and the
    tenants whose queued jobs wait for budget (credits/budgets.py ``held_back``), read in the same
    round trip when a tenants file is set."""
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(rt.keys.job(job_id))
    tenants = rt.settings.tenants is not None
    if tenants:
        pipe.hkeys(rt.keys.budget_wait)
        pipe.hgetall(rt.keys.tenant_settings)
    found = pipe.execute()
    held = held_back(rt.settings, found[-2], found[-1]) if tenants else set()
    raws = found[:len(ids)]
    return [JobRecord.from_hash({_t(k): _t(v) for k, v in raw.items()}) if raw else None for raw in raws], held


def list_jobs(rt: Runtime, *, state: str | None = None, batch_id: str | None = None, tenant: str | None = None,
              limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of job status records (the shape of ``status_record``), newest first, and the next page's cursor
    (``None`` on the last page).

    ``state``: a JobState value (``pending`` too with ``batch_id``: declared, not yet recorded);
    ``batch_id``: that batch's jobs; ``tenant``: jobs of that tenant. ``limit``: 1..``MAX_LIMIT``.
    Raises ValidationError naming each bad argument (``state``, ``limit``, ``cursor``)."""
    problems = []
    states = [s.value for s in JobState if s is not JobState.NOT_FOUND]
    allowed = states + ([PENDING] if batch_id is not None else [])
    if state == PENDING and batch_id is None:
        problems.append({"field": "state", "message": "pending (declared but not yet recorded) exists only within a "
                         "batch: give the batch too (--batch BATCH_ID, or batch_id in the HTTP API)"})
    elif state is not None and state not in allowed:
        problems.append({"field": "state", "message": f"must be one of {', '.join(allowed)}"
                         + (" (pending too, with a batch)" if batch_id is None else "")})
    if not 1 <= limit <= MAX_LIMIT:
        problems.append({"field": "limit", "message": f"must be 1-{MAX_LIMIT}"})
    after = None
    if cursor:
        try:
            after = decode_cursor(cursor)
        except ValidationError as exc:
            problems += exc.errors
    if problems:
        raise ValidationError(problems)

    if batch_id is not None:
        source: Iterator[Entry] = _walk(rt, rt.keys.batch_jobs(batch_id), after)
    elif state is not None:
        source = _walk(rt, rt.keys.state_index(state), after)
    else:
        source = heapq.merge(*(_walk(rt, rt.keys.state_index(s), after) for s in states), reverse=True)

    page: list[dict[str, Any]] = []
    shown: set[str] = set()
    last: Entry | None = None
    seen = 0
    # Records are read a chunk at a time; without filters that drop jobs a page's worth is enough.
    size = min(CHUNK, limit) if tenant is None and not (batch_id is not None and state is not None) else CHUNK
    for chunk in _chunks(source, size):
        stop = False
        raws, held = _records(rt, [job_id for _, job_id in chunk])
        for entry, raw in zip(chunk, raws):
            seen += 1
            last = entry
            record = _record(rt, entry[1], raw, in_batch=batch_id is not None, held=held)
            # A job that moved between two state indexes while they were read appears once.
            if record is not None and entry[1] not in shown and _keep(record, state, tenant):
                shown.add(entry[1])
                page.append(record)
            if len(page) == limit or seen >= SCAN_BUDGET:
                stop = True
                break
        if stop:
            break
    else:
        return page, None  # the source ran out: this is the last page
    assert last is not None
    if _peek_empty(rt, state, batch_id, last, states):
        return page, None
    return page, encode_cursor(*last)


def _chunks(source: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    while True:
        chunk = list(islice(source, size))
        if not chunk:
            return
        yield chunk


def _peek_empty(rt: Runtime, state: str | None, batch_id: str | None, last: Entry, states: list[str]) -> bool:
    """Whether nothing at all follows ``last`` (so a full last page gets no cursor)."""
    if batch_id is not None:
        keys = [rt.keys.batch_jobs(batch_id)]
    elif state is not None:
        keys = [rt.keys.state_index(state)]
    else:
        keys = [rt.keys.state_index(s) for s in states]
    return all(next(_walk(rt, key, last), None) is None for key in keys)


def _record(rt: Runtime, job_id: str, rec: JobRecord | None, *, in_batch: bool,
            held: set[str]) -> dict[str, Any] | None:
    if rec is None:
        # A batch names jobs before any worker records them; in a state index it is an expired job.
        return {"job_id": job_id, "state": PENDING} if in_batch else None
    if rec.is_pointer:
        return _duplicate_status(rt, job_id, rec)
    record = status_record(rec, job_id)
    # A queued job of a tenant the admission script holds back for budget (as in job_status).
    if record["state"] == JobState.QUEUED.value and rec.tenant and rec.tenant in held:
        record["waiting_for"] = "budget"
    return record


def job_status(rt: Runtime, job_id: str) -> dict[str, Any]:
    """One job's status record (README "Job status"), the rule ``get_job``, the CLI and ``/v1`` share:
    its record's fields; for a duplicate (an idempotency key seen before), the first job's status
    under its own id with ``duplicate_of``; ``waiting_for: "budget"`` for a queued job its tenant's
    budget holds back; ``{"job_id", "state": "not_found"}`` for an unknown id. Raises Redis errors."""
    rec = rt.store.get_record(job_id)
    if rec is None:
        return {"job_id": job_id, "state": JobState.NOT_FOUND.value}
    if rec.is_pointer:
        return _duplicate_status(rt, job_id, rec)
    record = status_record(rec, job_id)
    if held_for_budget(rt, rec):
        record["waiting_for"] = "budget"
    return record


def held_for_budget(rt: Runtime, rec: JobRecord) -> bool:
    """Whether a queued job waits because the admission script holds its tenant back for budget
    (credits/budgets.py): its tenant is marked waiting and still has a budget in force."""
    return bool(rec.state is JobState.QUEUED and rec.tenant and rt.settings.tenants is not None
                and rt.redis.hexists(rt.keys.budget_wait, rec.tenant)
                and rec.tenant in budgets(rt.settings, rt.redis, rt.keys))


def _duplicate_status(rt: Runtime, job_id: str, rec: JobRecord) -> dict[str, Any]:
    """A duplicate's status: its first job's, under its own id, metadata and creation time."""
    first = rec.duplicate_of
    original = rt.store.get_record(first)  # type: ignore[arg-type]
    record = status_record(original or EMPTY, job_id)
    if original is None:
        record["state"] = JobState.NOT_FOUND.value
    record["duplicate_of"] = first
    record["metadata"] = rec.metadata
    record["created_at"] = rec.created_at
    record["handlers"] = {}
    record["credits"] = job_credits(rec.raw)  # a duplicate costs nothing itself
    record["waiting_for"] = None
    return record


def _keep(record: dict[str, Any], state: str | None, tenant: str | None) -> bool:
    if state is not None and record.get("state") != state:
        return False
    if tenant is not None and record.get("tenant") != tenant:
        return False
    return True


__all__ = ["list_jobs", "job_status", "held_for_budget", "encode_cursor", "decode_cursor", "DEFAULT_LIMIT", "MAX_LIMIT"]
