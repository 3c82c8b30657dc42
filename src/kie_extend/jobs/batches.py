"""Batches (README "Sharing one account"): groups of jobs with counts by state and one ``batch.finished`` event.

A batch's counts move in the same atomic step as each of its jobs' transitions (store/lua.py), so
reading them is O(1) whatever the batch's size. Its total is the number of its jobs: the ids a
producer declared before sending (``enqueue_many(batch_id=…)``, ``kie-extend batch submit``) plus any
job that arrived naming it. When the last of them ends, the transition that ends it writes the
``batch.finished`` event and queues it for every handler (dedup key ``{batch_id}:batch.finished``).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from kie_extend.jobs.ids import is_valid
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import TERMINAL, JobState
from kie_extend.store.record import JobRecord, iso_ms

#: Batch ids read per round trip when listing a batch's jobs.
CHUNK = 500

log = logging.getLogger("kie_extend.jobs.batches")


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _iso(ts: str | None) -> str | None:
    return iso_ms(float(ts)) if ts else None


def get_batch(rt: Runtime, batch_id: str) -> dict[str, Any]:
    """``{"batch_id", "total", "counts": {state: n}, "finished", "cancelled", "created_at",
    "finished_at"}``; ``{"batch_id", "state": "not_found"}`` for an unknown batch or an id outside
    the grammar (ids.py; such an id is never looked up). Raises ValueError for a record that cannot
    be read (a corrupt count)."""
    if not is_valid("batch_id", batch_id):
        return {"batch_id": batch_id, "state": "not_found"}
    pipe = rt.redis.pipeline(transaction=True)
    pipe.hgetall(rt.keys.batch(batch_id))
    pipe.zcard(rt.keys.batch_jobs(batch_id))
    raw, total = pipe.execute()
    if not raw and not total:
        return {"batch_id": batch_id, "state": "not_found"}
    rec = {_t(k): _t(v) for k, v in raw.items()}
    counts = {k[2:]: int(v) for k, v in rec.items() if k.startswith("c:") and int(v)}
    # Declared jobs no worker has recorded yet are still in the broker.
    seen = sum(counts.values())
    if total > seen:
        counts["pending"] = total - seen
    done = sum(n for s, n in counts.items() if s in {x.value for x in TERMINAL} or s == "duplicate")
    return {
        "batch_id": batch_id,
        "total": int(total),
        "counts": counts,
        "finished": bool(rec.get("finished_ts")) or (total > 0 and done >= total),
        "cancelled": bool(rec.get("cancelled")),
        "created_at": _iso(rec.get("created_ts")),
        "finished_at": rec.get("finished_at"),
    }


def list_batches(rt: Runtime, limit: int = 50) -> list[dict[str, Any]]:
    """The newest batches, newest first, each as :func:`get_batch` gives it.

    An entry that cannot be read (an id outside the grammar written by an earlier version, a key of
    another type under its name, a corrupt count) is left out and logged: one bad record never
    takes the listing down."""
    out = []
    for b in rt.redis.zrevrange(rt.keys.batches, 0, limit - 1):
        batch_id = b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
        if not is_valid("batch_id", batch_id):
            log.warning("batch list: skipping batch id %r (outside the id grammar)", batch_id[:200])
            continue
        try:
            out.append(get_batch(rt, batch_id))
        except Exception as exc:
            if type(exc).__module__.startswith("redis") and "WRONGTYPE" not in str(exc):
                raise  # the store is unavailable: that is no bad record
            log.warning("batch list: skipping unreadable batch %r: %s: %s", batch_id, type(exc).__name__, exc)
    return out


def migrate_legacy_job_lists(rt: Runtime, limit: int = 100_000) -> int:
    """Move every batch job list written under its old name (``{p}:batch:<id>:jobs``, up to 0.1.0)
    to :meth:`Keys.batch_jobs`; returns how many were moved. Idempotent; run by every worker and beat
    at start-up. A list present under both names is merged (earliest score wins)."""
    moved = 0
    batch_ids = [_t(b) for b in rt.redis.zrange(rt.keys.batches, 0, limit - 1)]
    types = []
    for i in range(0, len(batch_ids), CHUNK):  # one round trip per CHUNK batches
        pipe = rt.redis.pipeline(transaction=False)
        for batch_id in batch_ids[i:i + CHUNK]:
            pipe.type(rt.keys.legacy_batch_jobs(batch_id))
        types += pipe.execute()
    for batch_id, kind in zip(batch_ids, types):
        if _t(kind) != "zset":
            continue
        old, new = rt.keys.legacy_batch_jobs(batch_id), rt.keys.batch_jobs(batch_id)
        pipe = rt.redis.pipeline(transaction=True)
        pipe.zunionstore(new, [new, old], aggregate="MIN")
        pipe.delete(old)
        pipe.execute()
        moved += 1
    if moved:
        log.info("moved %d batch job lists to their new key names", moved)
    return moved


def batch_job_ids(rt: Runtime, batch_id: str) -> Iterator[list[str]]:
    """A batch's job ids, oldest first, in chunks."""
    start = 0
    while True:
        ids = rt.redis.zrange(rt.keys.batch_jobs(batch_id), start, start + CHUNK - 1)
        if not ids:
            return
        yield [_t(i) for i in ids]
        start += CHUNK


def cancel_batch(rt: Runtime, batch_id: str, cancel_many: Any) -> int:
    """Cancel every job of a batch not yet sent; returns how many were cancelled.

    The batch is marked cancelled first, so a job whose message arrives later is cancelled when a
    worker accepts it. ``cancel_many([(job_id, JobRecord), …])`` is ``Pipeline.cancel_many`` (one round
    trip per chunk of CHUNK jobs). An unknown batch, or an id outside the grammar, cancels nothing
    and is not created."""
    if not is_valid("batch_id", batch_id):
        return 0
    if not rt.redis.exists(rt.keys.batch(batch_id), rt.keys.batch_jobs(batch_id)):
        return 0
    rt.redis.hset(rt.keys.batch(batch_id), "cancelled", "1")
    n = 0
    for ids in batch_job_ids(rt, batch_id):
        queued = []
        for job_id, raw in zip(ids, rt.store.get_many(ids)):
            rec = JobRecord.from_hash(raw or {})
            if rec.state is JobState.QUEUED:
                queued.append((job_id, rec))
        n += cancel_many(queued, "operator")
    return n


__all__ = ["get_batch", "list_batches", "batch_job_ids", "cancel_batch", "migrate_legacy_job_lists"]
