"""Fault suite, high availability: the job store and broker behind Redis Sentinel, master killed
with ``kill -9`` mid-run; the sentinels promote the replica and the system carries on."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from ha_cluster import SentinelCluster
from kie_extend.api import enqueue_many, get_job
from kie_extend.cli.devstack import DevStack
from test_chaos import BASE_ENV, check_guarantees, requests_for, wait_all_terminal

pytestmark = pytest.mark.chaos


def test_sentinel_failover_kill9_master(tmp_path: Path) -> None:
    """Master kill -9 while jobs are submitted and polled: all terminal, none lost or paid twice."""
    cluster = SentinelCluster(tmp_path / "redis", replicas=1, sentinels=3, quorum=2, appendonly=True)
    try:
        cluster.wait_ready()
        prefix = f"chaosha{uuid.uuid4().hex[:6]}"
        env = {**BASE_ENV, "KIE_TEST_EVENT_LOG": str(tmp_path / "callable-events.jsonl"),
               "PYTHONPATH": str(Path(__file__).resolve().parent)}
        with DevStack(tmp_path, redis_url=cluster.url, key_prefix=prefix, env=env) as stack:
            stack.start_simulator("--time-factor", "0.05", "--seed", "21")
            stack.start_serve(callbacks_only=True)
            stack.start_worker(concurrency=2)
            stack.start_worker(concurrency=2)
            stack.start_beat()
            stack.start_beat()
            ids = enqueue_many(requests_for(stack, 30), settings=stack.settings())
            time.sleep(3.0)  # submissions and polls under way
            old = cluster.master.port
            assert cluster.master_port() == old
            settings = stack.settings()
            before = [get_job(j, settings=settings)["state"] for j in ids]
            in_progress = sum(s not in ("succeeded", "failed") for s in before)
            assert in_progress > 0, "the kill must land mid-run"
            killed_at = time.monotonic()
            cluster.master.kill()
            new = cluster.wait_failover(old)
            failover_s = time.monotonic() - killed_at
            recs = wait_all_terminal(stack, ids, timeout=180)
            # check_guarantees reads the results stream with a plain client: point it at the new master.
            stack.redis_url = f"redis://127.0.0.1:{new}/0"
            row = check_guarantees(stack, ids, recs, "sentinel failover, master kill -9",
                                   {"master_kill9": 1, "failover_ms": int(failover_s * 1000),
                                    "unfinished_at_kill": in_progress})
            dead = [c.name for c in [*stack.workers, *stack.beats] if not c.alive()]
            assert not dead, f"processes died during the failover: {dead}"
            assert row["jobs"] == 30 and row["lost"] == 0 and row["double_submissions"] == 0
    finally:
        cluster.stop()
