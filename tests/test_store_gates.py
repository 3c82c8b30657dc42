"""The job store's transitions and the global gates, against a real Valkey."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kie_extend.gates import Gates
from kie_extend.keys import Keys
from kie_extend.runtime import Runtime
from kie_extend.states import JobState
from kie_extend.store import IllegalTransition


def test_transition_compare_and_set(make_settings):
    rt = Runtime(make_settings())
    store = rt.store
    assert store.transition("j1", JobState.QUEUED, expect=[None], fields={"created_ts": 1.0})
    assert not store.transition("j1", JobState.QUEUED, expect=[None])  # already exists
    assert store.transition("j1", JobState.SUBMITTING, expect=[JobState.QUEUED])
    assert rt.redis.sismember(rt.keys.inflight, "j1")
    assert not store.transition("j1", JobState.SUBMITTING, expect=[JobState.QUEUED])
    assert store.list_ids(JobState.SUBMITTING) == ["j1"] and store.list_ids(JobState.QUEUED) == []
    with pytest.raises(IllegalTransition):
        store.transition("j1", JobState.SUCCEEDED, expect=[JobState.QUEUED], event={"event": "job.succeeded"})


def test_terminal_transition_writes_event_and_deliveries_atomically(make_settings):
    rt = Runtime(make_settings())
    store = rt.store
    store.transition("j2", JobState.QUEUED, expect=[None])
    store.transition("j2", JobState.SUBMITTING, expect=[JobState.QUEUED])
    store.transition("j2", JobState.SUBMITTED, expect=[JobState.SUBMITTING], due=time.time() + 5)
    event = {"event": "job.succeeded", "job_id": "j2"}
    ok = [store.transition("j2", JobState.SUCCEEDED, expect=[JobState.SUBMITTED], event=event,
                           handlers=["redis_stream", "x"]) for _ in range(3)]
    assert ok == [True, False, False]
    raw = store.get("j2")
    assert raw["state"] == "succeeded" and json.loads(raw["event"]) == event
    assert json.loads(raw["handler:x"]) == {"state": "pending", "attempts": 0}
    assert rt.redis.zscore(rt.keys.due, "j2") is None
    assert not rt.redis.sismember(rt.keys.inflight, "j2")
    assert rt.redis.zcard(rt.keys.deliveries) == 2
    assert rt.redis.ttl(rt.keys.job("j2")) > 0


def test_terminal_needs_event(make_settings):
    rt = Runtime(make_settings())
    with pytest.raises(IllegalTransition):
        rt.store.transition("j3", JobState.FAILED, expect=[None])


def test_claim_due_is_exclusive_and_leased(make_settings):
    rt = Runtime(make_settings())
    now = time.time()
    for i in range(50):
        rt.store.schedule(f"j{i}", now - 1)
    got: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        ids = rt.store.claim_due(time.time(), 30, 7)
        while ids:
            with lock:
                got.extend(job for job, _ in ids)
            ids = rt.store.claim_due(time.time(), 30, 7)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"j{i}" for i in range(50))  # each exactly once
    assert rt.store.claim_due(time.time(), 30, 100) == []
    assert rt.store.claim_due(time.time() + 31, 30, 100)  # lease ran out: due again


def _gates(rt: Runtime, limit: int, window: float, max_in_flight: int = 1000) -> Gates:
    return Gates(rt.redis, rt.keys, rate=(limit, window), margin=0.0, max_in_flight=max_in_flight)


def test_rate_gate_books_future_slots_and_never_overfills_a_window(make_settings):
    rt = Runtime(make_settings())
    gates = _gates(rt, 5, 1.0)
    decisions = [gates.acquire(f"j{i}", f"j{i}:1") for i in range(12)]
    assert [d.verdict for d in decisions[:5]] == ["ok"] * 5
    waits = [d.wait for d in decisions[5:]]
    assert all(d.verdict == "wait" for d in decisions[5:])
    assert 0.9 <= waits[0] <= 1.01 and 1.9 <= waits[-2] <= 2.01  # slots booked a window apart
    # Coming back early is refused; on time it is let through.
    assert gates.acquire("j5", "j5:1").verdict == "wait"
    time.sleep(waits[0] + 0.02)
    assert gates.acquire("j5", "j5:1").verdict == "ok"


def test_rate_gate_concurrent_takers_respect_the_rolling_window(make_settings):
    rt = Runtime(make_settings())
    gates = _gates(rt, 10, 0.5)
    taken: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(15):
            job = f"w{n}-{i}"
            while True:
                d = gates.acquire(job, f"{job}:1")
                if d.verdict == "ok":
                    with lock:
                        taken.append(time.time())
                    break
                time.sleep(d.wait)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken.sort()
    assert len(taken) == 60
    # No rolling window of 0.5 s holds more than 10 (a little slack for the two clocks).
    for i in range(len(taken) - 10):
        assert taken[i + 10] - taken[i] >= 0.5 - 0.02


def test_in_flight_cap_and_pause(make_settings):
    rt = Runtime(make_settings())
    gates = _gates(rt, 100, 1.0, max_in_flight=2)
    assert gates.acquire("a", "a:1").verdict == "ok"
    assert gates.acquire("b", "b:1").verdict == "ok"
    assert gates.acquire("c", "c:1").verdict == "inflight"
    assert gates.acquire("a", "a:2").verdict == "ok"  # a job already holding a slot keeps it
    gates.release("a")
    assert gates.acquire("c", "c:1").verdict == "ok"
    gates.pause(402, "Insufficient credits")
    assert gates.acquire("d", "d:1").verdict == "paused"
    assert gates.paused()["code"] == "402"
    gates.resume()
    assert gates.paused() is None


def test_keys_all_under_prefix():
    """Every key starts with the prefix as a hash tag, so all of them share one Redis Cluster slot."""
    from redis.crc import key_slot

    keys = Keys("p1")
    names = [keys.job("x"), keys.due, keys.blocked, keys.inflight, keys.rate_log, keys.pause, keys.results,
             keys.deliveries, keys.dead_letters, keys.stats, keys.idempotency("k"), keys.dedup("h", "x:y"),
             keys.breaker, keys.sweep_lock, keys.sweep_last, keys.probe_lock, *keys.states().values()]
    assert all(n.startswith("{p1}:") for n in names)
    assert len({key_slot(n.encode()) for n in names}) == 1
    # A prefix that carries its own tag is used as it is.
    assert Keys("app:{kie}").job("x") == "app:{kie}:job:x"
