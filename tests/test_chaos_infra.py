"""Fault suite, infrastructure part (``make chaos``): Valkey out of memory, a failover that leaves
the job store and/or broker read-only for a while, and misnamed or unreadable messages on our queue.

Each run checks the shared guarantees (tests/test_chaos.py) and that no worker or beat exited.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from kie_extend.api import enqueue_many, get_job, producer_app
from kie_extend.cli.devstack import DevStack
from kie_extend.infra.embedded import EmbeddedValkey
from kie_extend.store.keys import Keys

from test_chaos import check_guarantees, make_stack, requests_for, wait_all_terminal

pytestmark = pytest.mark.chaos


def assert_processes_survived(stack: DevStack) -> None:
    """Every worker and beat still runs, and no worker stopped on an "Unrecoverable error"."""
    for child in stack.workers + stack.beats:
        log = Path(child.log_path).read_text(errors="replace")
        assert child.alive(), f"{child.name} exited (rc {child.proc.returncode}); see {child.log_path}"
        assert "Unrecoverable error" not in log, f"{child.name}: {child.log_path}"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _offset(client: redis.Redis) -> int:
    info = client.info("replication")
    return int(info.get("master_repl_offset") or 0)


@contextmanager
def read_only(primary: redis.Redis, primary_port: int, spare: EmbeddedValkey) -> Iterator[None]:
    """A failover as clients see it when nobody repoints them: ``spare`` takes over ``primary``'s
    data and ``primary`` becomes its replica (read-only, blocked BRPOPs get UNBLOCKED) until the
    block ends, then ``primary`` is promoted again (REPLICAOF NO ONE). No write is lost on the way:
    ``primary``'s writes are paused while ``spare`` catches up."""
    other = redis.Redis(port=spare.port)
    other.replicaof("127.0.0.1", primary_port)
    deadline = time.monotonic() + 20
    while other.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "spare did not sync"
        time.sleep(0.05)
    primary.client_pause(5000, all=False)  # writes wait; reads go on
    try:
        while _offset(other) < _offset(primary):
            assert time.monotonic() < deadline, "spare did not catch up"
            time.sleep(0.02)
        other.replicaof("NO", "ONE")
        primary.replicaof("127.0.0.1", spare.port)
    finally:
        primary.client_unpause()
    try:
        yield
    finally:
        primary.replicaof("NO", "ONE")
        other.close()


def test_out_of_memory_noeviction(workdir: Path) -> None:
    """maxmemory drops below use (noeviction) for ~5 s while jobs flow, then rises again."""
    with make_stack(workdir) as stack:
        stack.start_simulator("--time-factor", "0.03", "--seed", "21")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=2)
        stack.start_worker(concurrency=1)
        stack.start_beat()
        admin = redis.Redis.from_url(stack.redis_url)
        admin.config_set("maxmemory-policy", "noeviction")
        ids = enqueue_many(requests_for(stack, 30), settings=stack.settings())
        time.sleep(1.0)
        admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.set(f"probe:{uuid.uuid4().hex}", "x")
            time.sleep(5.0)
        finally:
            admin.config_set("maxmemory", 0)
        ids += enqueue_many(requests_for(stack, 10), settings=stack.settings())
        recs = wait_all_terminal(stack, ids, timeout=150)
        check_guarantees(stack, ids, recs, "valkey OOM (noeviction) 5 s", {"oom_seconds": 5})
        assert_processes_survived(stack)


def test_failover_read_only_store_and_broker(workdir: Path) -> None:
    """The one server (job store and broker) turns replica for ~10 s, then is promoted again."""
    with make_stack(workdir) as stack, EmbeddedValkey(str(workdir / "spare")) as spare:
        stack.start_simulator("--time-factor", "0.03", "--seed", "22")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=2)
        stack.start_worker(concurrency=1)
        stack.start_beat()
        ids = enqueue_many(requests_for(stack, 30), settings=stack.settings())
        time.sleep(1.0)
        primary = redis.Redis.from_url(stack.redis_url)
        with read_only(primary, _port(stack.redis_url), spare):
            with pytest.raises(redis.exceptions.ReadOnlyError):
                primary.set(f"probe:{uuid.uuid4().hex}", "x")
            time.sleep(10.0)
        ids += enqueue_many(requests_for(stack, 10), settings=stack.settings())
        recs = wait_all_terminal(stack, ids, timeout=150)
        check_guarantees(stack, ids, recs, "failover: store+broker read-only 10 s", {"read_only_seconds": 10})
        assert_processes_survived(stack)


def test_read_only_job_store_separate_broker(workdir: Path) -> None:
    """Broker on its own server; the job store turns read-only and 20 extend messages arrive then."""
    with EmbeddedValkey(str(workdir / "broker")) as broker, EmbeddedValkey(str(workdir / "spare")) as spare:
        with make_stack(workdir, KIE_BROKER_URL=broker.url) as stack:
            stack.start_simulator("--time-factor", "0.03", "--seed", "23")
            stack.start_serve(callbacks_only=True)
            stack.start_worker(concurrency=2)
            stack.start_worker(concurrency=1)
            stack.start_beat()
            settings = stack.settings()
            assert settings.effective_broker_url == broker.url != settings.redis_url
            ids = enqueue_many(requests_for(stack, 10), settings=settings)
            time.sleep(1.0)
            primary = redis.Redis.from_url(stack.redis_url)
            with read_only(primary, _port(stack.redis_url), spare):
                window = enqueue_many(requests_for(stack, 20), settings=settings)
                time.sleep(10.0)
                # Nothing could record them: the messages are still waiting, none was dropped.
                assert all(get_job(j, settings=settings)["state"] == "not_found" for j in window)
            ids += window
            recs = wait_all_terminal(stack, ids, timeout=150)
            row = check_guarantees(stack, ids, recs, "job store read-only 10 s, broker apart",
                                   {"read_only_seconds": 10, "arrived_read_only": len(window)})
            assert row["succeeded"] == len(ids)
            assert_processes_survived(stack)


def test_misnamed_and_unreadable_messages(workdir: Path) -> None:
    """Unknown task names (a near miss, a trailing space, a stranger) and a pickled message on our
    queue each become one failed ``invalid_request`` job with one result event; the worker stays up."""
    with make_stack(workdir) as stack:
        stack.start_simulator("--time-factor", "0.03", "--seed", "24")
        stack.start_serve(callbacks_only=True)
        worker = stack.start_worker(concurrency=1)
        stack.start_beat()
        settings = stack.settings()
        app = producer_app(settings)
        body = requests_for(stack, 1)[0]
        names = {"kie_extend.Extend": True, "kie_extend.extend ": True, "billing.charge_card": False}
        sent: dict[str, tuple[str, bool]] = {}
        for name, near in names.items():
            job_id = f"misnamed-{uuid.uuid4().hex[:8]}"
            app.send_task(name, kwargs={"request": body["request"]}, task_id=job_id, queue=settings.queue)
            sent[job_id] = (name, near)
        pickled: list[str] = []
        with app.producer_or_acquire() as producer:
            for name in ("kie_extend.extend", "kie_extend.Extend"):
                job_id = f"pickled-{uuid.uuid4().hex[:8]}"
                headers, properties, payload, _ = app.amqp.create_task_message(
                    job_id, name, (), {"request": body["request"]})
                producer.publish(pickle.dumps(payload), exchange="", routing_key=settings.queue,
                                 content_type="application/x-python-serialize", content_encoding="binary",
                                 headers=headers, **properties)
                pickled.append(job_id)
        good = enqueue_many(requests_for(stack, 3), settings=settings)  # the worker keeps working
        ids = [*sent, *pickled, *good]
        recs = wait_all_terminal(stack, ids, timeout=90)
        check_guarantees(stack, ids, recs, "misnamed / pickled messages", {"misnamed": len(sent) + len(pickled)})
        for job_id in [*sent, *pickled]:
            rec = recs[job_id]
            assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
        for job_id, (name, near) in sent.items():
            message = recs[job_id]["error"]["message"]
            assert repr(name) in message, message
            assert ("did you mean `kie_extend.extend`?" in message) is near, message
        keys = Keys(settings.key_prefix)
        r = redis.Redis.from_url(stack.redis_url)
        events = [json.loads(f[b"payload"]) for _, f in r.xrange(keys.results)]
        for job_id in [*sent, *pickled]:
            mine = [e for e in events if e["job_id"] == job_id]
            assert len(mine) == 1 and mine[0]["event"] == "job.failed", mine
        assert all(recs[j]["state"] == "succeeded" for j in good)
        assert worker.alive()
        assert_processes_survived(stack)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
