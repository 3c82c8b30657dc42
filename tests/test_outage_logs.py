"""Redis going away under a running worker and beat (kill -9 of their Valkey for ~10 s, then a
restart on the same port) costs a bounded number of log lines, no Gossip/Mingle tracebacks, and no
job: real processes, the worker started as the README's "Run it yourself" starts it."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.infra.embedded import EmbeddedValkey

OUTAGE = 10.0
FAST_POLLS = {"KIE_TICK_INTERVAL": "1", "KIE_POLL_FIRST": "2", "KIE_POLL_INTERVAL": "1", "KIE_POLL_MAX_INTERVAL": "2"}


@pytest.mark.chaos  # about a minute: the jobs claimed at the kill wait out their leases
def test_a_redis_outage_is_a_few_lines_in_the_worker_and_beat_logs(tmp_path: Path) -> None:
    with DevStack(tmp_path, appendonly=True, key_prefix=f"ol{uuid.uuid4().hex[:6]}",
                  env={"KIE_QUEUE": f"ol{uuid.uuid4().hex[:6]}", **FAST_POLLS}) as stack:
        stack.start_simulator("--time-factor", "0.05", "--seed", "3")
        stack.start_serve()
        settings = stack.settings()
        # As the README runs it: no --without-gossip / --without-mingle on the command line.
        worker = stack._spawn("worker", [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "worker",
                                         "-Q", settings.queue, "-c", "2", "--loglevel", "INFO"])
        beat = stack.start_beat()
        ids = [enqueue_extend({"uploadUrl": f"{stack.sim_url}/files/source/40s.mp3", "defaultParamFlag": True,
                               "instrumental": True, "continueAt": 5 + i, "model": "V5", "style": "rock",
                               "title": f"outage {i}"}, settings=settings) for i in range(4)]
        deadline = time.monotonic() + 60
        while not all(get_job(j, settings=settings)["state"] == "submitted" for j in ids):
            assert time.monotonic() < deadline, [get_job(j, settings=settings)["state"] for j in ids]
            time.sleep(0.3)
        assert stack.valkey is not None
        stack.valkey.kill()
        time.sleep(OUTAGE)
        stack.valkey.start()
        deadline = time.monotonic() + 90
        while True:
            states = [get_job(j, settings=settings)["state"] for j in ids]
            if all(s == "succeeded" for s in states):
                break
            assert time.monotonic() < deadline and "failed" not in states, states
            time.sleep(0.5)
        assert worker.alive() and beat.alive()
        worker_log = Path(worker.log_path).read_text(errors="replace")
        beat_log = Path(beat.log_path).read_text(errors="replace")
    assert "Gossip" not in worker_log and "Mingle" not in worker_log and "mingle:" not in worker_log, worker_log
    assert worker_log.count("Traceback") <= 2, worker_log
    assert beat_log.count("Traceback") == 0, beat_log
    failures = [ln for ln in beat_log.splitlines() if "tick failed" in ln or "could not run its schedule" in ln]
    # At most one warning per 10 s for each of the two kinds, not one a second.
    assert len(failures) <= 6, beat_log
    print(f"worker log: {len(worker_log.splitlines())} lines, {worker_log.count('Traceback')} tracebacks; "
          f"beat log: {len(beat_log.splitlines())} lines")
    assert len(beat_log.splitlines()) <= 30, beat_log


def test_beat_with_its_job_store_away_logs_one_warning_per_interval(tmp_path: Path) -> None:
    """The store gone, the broker still there: every tick fails, and beat says so once per 10 s,
    counting the ones it left out, then once that the tick runs again."""
    with EmbeddedValkey(str(tmp_path / "broker")) as broker, \
            DevStack(tmp_path, key_prefix=f"ob{uuid.uuid4().hex[:6]}",
                     env={"KIE_TICK_INTERVAL": "0.5"}) as stack:
        stack.env["KIE_BROKER_URL"] = broker.url
        beat = stack.start_beat()
        time.sleep(3)  # beat is up and ticking
        assert stack.valkey is not None
        stack.valkey.kill()
        time.sleep(OUTAGE + 2)
        stack.valkey.start()
        time.sleep(3)
        assert beat.alive()
        log = Path(beat.log_path).read_text(errors="replace")
    failed = [ln for ln in log.splitlines() if "tick failed" in ln]
    assert 1 <= len(failed) <= 3, log  # ~24 failed ticks in 12 s
    assert any("more like it in the last 10 s not logged" in ln for ln in failed[1:]) or len(failed) == 1, log
    assert "Traceback" not in log, log
    assert "tick runs again after" in log, log
