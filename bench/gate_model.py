"""The submission-rate gate alone: the real ``Gates.acquire`` (its Lua script, on Valkey's clock), driven
by an ideal single-threaded dispatcher that only adds a chosen lateness to every due time.

It separates the gate's own efficiency from the rest of the system (Celery queues, the beat tick, CPU
contention): ``N`` jobs arrive at once; each asks the gate; a ``wait`` verdict puts it back on a
schedule at ``now + wait``, and its next turn happens at that due time plus a random lateness drawn
from ``U(0, lateness)`` (what the beat tick and a busy queue add in the real system). The result is
the achieved rate over the span of the accepted sends, as in the ``limit`` scenario.

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

from kie_extend.gates import Gates
from kie_extend.keys import Keys


def run_model(redis_url: str, *, n: int = 300, limit: int = 20, window: float = 1.0, margin: float = 0.02,
              lateness: float = 0.1, seed: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    """Drive ``n`` jobs through the gate; returns sends, verdict counts and the achieved rate / limit."""
    client = redis.Redis.from_url(redis_url)
    keys = Keys(f"gatemodel-{uuid.uuid4().hex[:8]}")
    gates = Gates(client, keys, rate=(limit, window), margin=margin, max_in_flight=10**9)
    rng = random.Random(seed)
    start = time.time()
    heap: list[tuple[float, int]] = [(start, i) for i in range(n)]
    heapq.heapify(heap)
    sends: list[float] = []
    waits = 0
    deadline = start + timeout
    while heap and time.time() < deadline:
        at, job = heapq.heappop(heap)
        pause = at - time.time()
        if pause > 0:
            time.sleep(pause)
        decision = gates.acquire(f"job{job}", f"job{job}:1")
        if decision.verdict == "ok":
            sends.append(time.time())
        elif decision.verdict == "wait":
            waits += 1
            heapq.heappush(heap, (time.time() + decision.wait + rng.uniform(0, lateness), job))
        else:  # pragma: no cover - no pause, no in-flight cap here
            raise RuntimeError(f"unexpected verdict {decision.verdict}")
    client.delete(keys.rate_log, keys.inflight)
    sends.sort()
    span = sends[-1] - sends[0] if len(sends) > 1 else float("nan")
    rate = (len(sends) - limit) / span if span else float("nan")
    return {"lateness": lateness, "sent": len(sends), "wait_verdicts": waits, "span": span,
            "rate": rate, "ratio": rate / (limit / window), "unfinished": len(heap)}


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
    from kie_extend.embedded import EmbeddedValkey

    lats = [float(x) for x in sys.argv[1:]] or [0.0, 0.02, 0.1]
    with EmbeddedValkey() as valkey:
        for row in run_models(valkey.url, lats):
            print(row)
