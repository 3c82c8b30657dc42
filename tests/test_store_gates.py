"""The job store's transitions and the global gates, against a real Valkey."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kie_extend.admission.queues import Admission
from kie_extend.admission.gates import Gates
from kie_extend.store.keys import Keys
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import JobState
from kie_extend.store.jobstore import IllegalTransition


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


def _admission(rt: Runtime, limit: int, window: float, max_in_flight: int = 1000) -> Admission:
    return Admission(rt.redis, rt.keys, rate=(limit, window), margin=0.0, max_in_flight=max_in_flight,
                     probe_timeout=60)


def _queue(rt: Runtime, ids: list[str], rq: str = "5|t") -> None:
    """Queued jobs waiting in one ready queue, oldest first in the order given."""
    now = time.time()
    for i, job in enumerate(ids):
        assert rt.store.transition(job, JobState.QUEUED, expect=[None],
                                   fields={"created_ts": now + i * 1e-6, "rq": rq}, ready=True)


def test_rate_gate_books_future_slots_and_never_overfills_a_window(make_settings):
    rt = Runtime(make_settings())
    gates, admission = _gates(rt, 5, 1.0), _admission(rt, 5, 1.0)
    ids = [f"j{i}" for i in range(12)]
    _queue(rt, ids)
    admitted = admission.admit(12, horizon=5.0)
    assert [a.job_id for a in admitted] == ids  # one queue: oldest first
    now = time.time()
    waits = [a.at - now for a in admitted]
    assert all(w <= 0.05 for w in waits[:5])
    assert 0.9 <= waits[5] <= 1.05 and 1.9 <= waits[10] <= 2.05  # slots booked a window apart
    decisions = [gates.acquire(f"j{i}", f"j{i}:1") for i in range(5)]
    assert [d.verdict for d in decisions] == ["ok"] * 5
    # Coming back early is refused; on time it is let through.
    assert gates.acquire("j5", "j5:1").verdict == "wait"
    time.sleep(max(0.0, admitted[5].at - time.time()) + 0.02)
    assert gates.acquire("j5", "j5:1").verdict == "ok"
    # Without a booking there is no slot.
    assert gates.acquire("stranger", "stranger:1").verdict == "lost"


def test_rate_gate_concurrent_takers_respect_the_rolling_window(make_settings):
    rt = Runtime(make_settings())
    gates, admission = _gates(rt, 10, 0.5), _admission(rt, 10, 0.5)
    _queue(rt, [f"w{i}" for i in range(60)])
    taken: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if len(taken) >= 60:
                    return
            for a in admission.admit(3, horizon=0.05):
                while True:
                    d = gates.acquire(a.job_id, f"{a.job_id}:1")
                    if d.verdict == "ok":
                        with lock:
                            taken.append(time.time())
                        break
                    assert d.verdict == "wait", d
                    time.sleep(d.wait)
            time.sleep(0.01)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken.sort()
    assert len(taken) == 60
    # No rolling window of 0.5 s holds more than 10 (a little slack for the two clocks).
    for i in range(len(taken) - 10):
        assert taken[i + 10] - taken[i] >= 0.5 - 0.02


def test_in_flight_cap_and_pauses(make_settings):
    rt = Runtime(make_settings())
    gates, admission = _gates(rt, 100, 1.0, max_in_flight=2), _admission(rt, 100, 1.0, max_in_flight=2)
    _queue(rt, ["a", "b", "c", "d"])
    assert [x.job_id for x in admission.admit(10)] == ["a", "b"]  # the cap counts admitted jobs too
    assert gates.acquire("a", "a:1").verdict == "ok"
    assert gates.acquire("b", "b:1").verdict == "ok"
    assert admission.admit(10) == []
    gates.release("a")
    assert [x.job_id for x in admission.admit(10)] == ["c"]
    assert gates.acquire("c", "c:1").verdict == "ok"
    gates.release("b")
    gates.release("c")
    gates.pause(402, "Insufficient credits")
    assert admission.admit(10) == []
    assert gates.paused()["code"] == "402"
    gates.resume()
    gates.pause_operator("maintenance window")
    assert admission.admit(10) == [] and gates.operator_paused()["reason"] == "maintenance window"
    assert gates.paused() is None
    assert gates.resume_operator()
    assert [x.job_id for x in admission.admit(10)] == ["d"]


def test_keys_all_under_prefix():
    """Every key starts with the prefix as a hash tag, so all of them share one Redis Cluster slot."""
    from redis.crc import key_slot

    keys = Keys("p1")
    names = [keys.job("x"), keys.due, keys.ready(5, "t"), keys.tenants(5), keys.priorities, keys.batch("b"), keys.batch_jobs("b"), keys.deadlines, keys.operator_pause, keys.inflight, keys.rate_log, keys.pause, keys.results,
             keys.deliveries, keys.dead_letters, keys.stats, keys.idempotency("k", "t"), keys.job_claim("x"), keys.dedup("h", "x:y"),
             keys.breaker, keys.sweep_lock, keys.sweep_last, keys.tick_last, keys.probe_lock, *keys.states().values()]
    assert all(n.startswith("{p1}:") for n in names)
    assert len({key_slot(n.encode()) for n in names}) == 1
    # A prefix that carries its own tag is used as it is.
    assert Keys("app:{kie}").job("x") == "app:{kie}:job:x"


def test_collected_writes_run_in_order_with_once_and_only_if(make_settings):
    """Writes (one script call): ONCE guards the next write only; IFEQ stops everything after it
    unless the field holds the value; a failed move's follow-up writes never run."""
    from kie_extend.store.jobstore import OneTrip, Writes, new_op

    rt = Runtime(make_settings())
    store, r, k = rt.store, rt.redis, rt.keys
    w = Writes()
    for _ in range(2):
        w.once(k.dedup("redis_stream", "x:job.succeeded"), 60)
        w.xadd(k.results, 100, {"job_id": "x", "event": "job.succeeded", "payload": "{}"})
        w.hincrby(k.stats, "after_once", 1)
    store.send(w)
    assert r.xlen(k.results) == 1 and int(r.hget(k.stats, "after_once")) == 2

    store.transition("g1", JobState.QUEUED, expect=[None])
    with store.deferred():
        store.stat("before_guard")
        writes = store.deferring()
        op, trip = new_op(), OneTrip(r)
        store.transition("g1", JobState.SUBMITTING, expect=[JobState.QUEUED], pipe=trip, op=op)
        writes.only_if(k.job("g1"), "op", op)
        store.stat("after_guard")
        assert store.moved("g1", store.send_with(trip, writes)[0])
        store.stat("after_send")
    assert [int(r.hget(k.stats, f) or 0) for f in ("before_guard", "after_guard", "after_send")] == [1, 1, 1]

    with store.deferred():  # the same move again is refused: what follows the guard does not run
        writes = store.deferring()
        store.stat("before_guard")
        op, trip = new_op(), OneTrip(r)
        store.transition("g1", JobState.SUBMITTING, expect=[JobState.QUEUED], pipe=trip, op=op)
        writes.only_if(k.job("g1"), "op", op)
        store.stat("after_guard")
        assert not store.moved("g1", store.send_with(trip, writes)[0])
        assert not writes
    assert [int(r.hget(k.stats, f) or 0) for f in ("before_guard", "after_guard", "after_send")] == [2, 1, 1]


def test_chained_move_needs_its_predecessor_op_and_the_granted_send(make_settings):
    """A move chained to the creation (accept's one round trip) happens only if the record still holds
    the creation's op and the rate log holds the job's first send (admission granted it now)."""
    from kie_extend.store.jobstore import OneTrip, new_op

    rt = Runtime(make_settings())
    store, r, k = rt.store, rt.redis, rt.keys

    def create_then_chain(job_id: str, grant: bool, meddle: bool = False) -> tuple[bool, bool]:
        trip, created_op = OneTrip(r), new_op()
        store.transition(job_id, JobState.QUEUED, expect=[None], fields={"created_ts": 1.0}, pipe=trip, op=created_op)
        created = trip.execute()[0]
        if grant:
            r.zadd(k.rate_log, {f"s:{job_id}:1": time.time() * 1000})
        if meddle:  # another move of the job in between (it wrote its own op)
            r.hset(k.job(job_id), "op", new_op())
        trip = OneTrip(r)
        store.transition(job_id, JobState.SUBMITTING, expect=[JobState.QUEUED], fields={"sends": 1}, pipe=trip,
                         after=created_op, send=f"s:{job_id}:1")
        return bool(store.moved(job_id, created)), bool(store.moved(job_id, trip.execute()[0]))

    assert create_then_chain("c1", grant=True) == (True, True)
    assert store.get("c1")["state"] == "submitting"
    assert create_then_chain("c2", grant=False) == (True, False)
    assert store.get("c2")["state"] == "queued"
    assert create_then_chain("c3", grant=True, meddle=True) == (True, False)
    assert store.get("c3")["state"] == "queued"
