"""The submission-rate gate alone: the real admission script (``Admission.admit``, which books each
job's rate slot at slot time) and the real ``Gates.acquire`` (which accepts only a booked slot), both
Lua on Valkey's clock, driven by an ideal single-threaded dispatcher that only adds a chosen lateness.

It separates the gate's own efficiency from the rest of the system (Celery queues, CPU contention):
``N`` queued job records wait in one ready queue (real records, written by ``JobStore.transition``
with ``ready=True``, as a worker's accept does). Every ``tick`` seconds the model admits what falls
within the next tick (``admit(claim_batch, horizon=tick)``, as ``Scheduler.tick`` does); each admitted
job is dispatched at its booked slot plus a random lateness drawn from ``U(0, lateness)`` (what a busy
queue and a countdown add in the real system) and asks ``acquire``. ``wait`` puts it back at
``now + wait`` (+ lateness); ``lost``/``paused``/... put it back in its ready queue (as
``Pipeline.try_submit`` does). The result is the achieved rate over the span of the accepted sends,
as in the ``limit`` scenario.

``python bench/gate_model.py`` runs it against an embedded Valkey for a few lateness values.
"""

from __future__ import annotations

import heapq
import random
import sys
import threading
import time
import uuid
from typing import Any

import redis

from kie_extend.admission.queues import Admission
from kie_extend.admission.gates import Gates
from kie_extend.store.keys import Keys
from kie_extend.jobs.states import JobState
from kie_extend.store.jobstore import JobStore


def run_model(redis_url: str, *, n: int = 300, limit: int = 20, window: float = 1.0, margin: float = 0.02,
              lateness: float = 0.1, tick: float = 0.1, seed: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    """Drive ``n`` jobs through admission and the gate; returns sends, verdict counts and the rate / limit."""
    client = redis.Redis.from_url(redis_url)
    keys = Keys(f"gatemodel-{uuid.uuid4().hex[:8]}")
    gates = Gates(client, keys, rate=(limit, window), margin=margin, max_in_flight=10**9)
    admission = Admission(client, keys, rate=(limit, window), margin=margin, max_in_flight=10**9,
                          probe_timeout=60.0, mode="arrival")
    store = JobStore(client, keys)
    now0 = time.time()
    for i in range(n):
        store.transition(f"job{i}", JobState.QUEUED, expect=[None], ready=True, fields={
            "job_id": f"job{i}", "request": "{}", "created_ts": now0 + i * 1e-6, "attempts": 0,
            "tenant": "model", "priority": 5, "rq": admission.queue_of("model", 5)})
    rng = random.Random(seed)
    start = time.time()
    heap: list[tuple[float, int, str]] = []  # (time, kind 0=admit tick / 1=job turn, job id)
    heapq.heappush(heap, (start, 0, ""))
    sends: list[float] = []
    waits = lost = admitted_total = 0
    deadline = start + timeout
    while len(sends) < n and heap and time.time() < deadline:
        at, kind, job = heapq.heappop(heap)
        pause = at - time.time()
        if pause > 0:
            time.sleep(pause)
        if kind == 0:
            for a in admission.admit(200, horizon=tick):
                admitted_total += 1
                heapq.heappush(heap, (a.at + rng.uniform(0, lateness), 1, a.job_id))
            heapq.heappush(heap, (at + tick, 0, ""))
            continue
        decision = gates.acquire(job, f"{job}:1")
        if decision.verdict == "ok":
            sends.append(time.time())
        elif decision.verdict == "wait":
            waits += 1
            heapq.heappush(heap, (time.time() + decision.wait + rng.uniform(0, lateness), 1, job))
        else:  # lost / paused / ...: back in its ready queue, admission picks it again
            lost += 1
            store.enqueue_ready(job)
    client.delete(keys.rate_log, keys.inflight, keys.due, keys.priorities, keys.admission_seq, keys.stats,
                  keys.ready(*admission.queue_of("model", 5).split("|")), keys.tenants(5),
                  keys.state_index(JobState.QUEUED.value), *(keys.job(f"job{i}") for i in range(n)))
    sends.sort()
    span = sends[-1] - sends[0] if len(sends) > 1 else float("nan")
    rate = (len(sends) - limit) / span if span else float("nan")
    return {"lateness": lateness, "tick": tick, "sent": len(sends), "admitted": admitted_total,
            "wait_verdicts": waits, "lost_verdicts": lost, "span": span, "rate": rate,
            "ratio": rate / (limit / window), "unfinished": n - len(sends)}


def run_models(redis_url: str, latenesses: list[float], **kwargs: Any) -> list[dict[str, Any]]:
    """Several lateness values at once (each model mostly sleeps), separate keys."""
    out: dict[float, dict[str, Any]] = {}

    def one(lat: float) -> None:
        out[lat] = run_model(redis_url, lateness=lat, **kwargs)

    threads = [threading.Thread(target=one, args=(lat,)) for lat in latenesses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [out[lat] for lat in latenesses if lat in out]


if __name__ == "__main__":
    from kie_extend.infra.embedded import EmbeddedValkey

    lats = [float(x) for x in sys.argv[1:]] or [0.0, 0.02, 0.1]
    with EmbeddedValkey() as valkey:
        for row in run_models(valkey.url, lats):
            print(row)
