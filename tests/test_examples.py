"""examples/consume_results.py, run for real against a stream a real system wrote.

A whole local system (Valkey, simulator, serve, worker, beat) produces every kind of result
event: ``job.succeeded``, ``job.failed`` (an invalid message), ``job.cancelled`` (a queued job
cancelled while submission was paused) and ``batch.finished``. The reader runs as its own process,
as a user would run it; a few tests run it through a small wrapper that slows a handler down or
makes it fail for one job (the reader's own code is unchanged: ``main(handlers=...)``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kie_extend.api import cancel, enqueue_extend, get_batch, get_job, pause, producer_app, resume
from kie_extend.cli.devstack import DevStack
from kie_extend.store.keys import Keys

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "consume_results.py"
KINDS = {"job.succeeded", "job.failed", "job.cancelled", "batch.finished"}

# Runs the example's main() with its own handlers wrapped: READER_SLOW (seconds) sleeps after each
# event is handled, READER_FAIL_JOB makes the handler raise for that job id.
WRAPPER = """
import os, runpy, sys, time
example = runpy.run_path(sys.argv[1])
slow, fail = float(os.environ.get("READER_SLOW") or 0), os.environ.get("READER_FAIL_JOB")
def wrap(handler):
    def run(entry_id, event, fields):
        if fail and event.get("job_id") == fail:
            raise RuntimeError("this handler refuses job " + fail)
        handler(entry_id, event, fields)
        time.sleep(slow)
    return run
handlers = {kind: wrap(h) for kind, h in example["HANDLERS"].items()}
sys.exit(example["main"](sys.argv[2:], handlers=handlers))
"""


def _request(stack: DevStack, title: str) -> dict:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 5, "model": "V5", "style": "lofi", "title": title}


def _wait(cond, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("reader")
    with DevStack(workdir, key_prefix=f"rd{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
                       "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s",
                       "KIE_HANDLERS": "redis_stream"}) as st:
        st.start_simulator("--time-factor", "0.03", "--seed", "5")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


@pytest.fixture(scope="module")
def events(stack: DevStack) -> dict[str, object]:
    """Every event kind on the stream, written by the system: returns the ids involved and the entries."""
    settings = stack.settings()
    batch_id = f"b-{uuid.uuid4().hex[:8]}"
    pause("reader test: hold the batch while one job is cancelled", settings=settings)
    kept = enqueue_extend(_request(stack, "Kept"), batch_id=batch_id, metadata={"n": 1}, settings=settings)
    dropped = enqueue_extend(_request(stack, "Dropped"), batch_id=batch_id, metadata={"n": 2}, settings=settings)
    invalid = f"bad-{uuid.uuid4()}"
    producer_app(settings).send_task("kie_extend.extend", task_id=invalid, queue=settings.queue,
                                     kwargs={"request": {"uploadUrl": "ftp://nowhere", "model": "V5"}})
    _wait(lambda: get_job(kept, settings=settings)["state"] == "queued"
          and get_job(dropped, settings=settings)["state"] == "queued", "the batch's jobs to be queued")
    assert cancel(dropped, settings=settings)
    resume(settings=settings)
    plain = enqueue_extend(_request(stack, "Plain"), settings=settings)
    stream = Keys(settings.key_prefix).results
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    _wait(lambda: client.xlen(stream) >= 5 and get_batch(batch_id, settings=settings).get("finished"),
          "five result events")
    entries = client.xrange(stream)
    assert len(entries) == 5, entries
    assert {f["event"] for _, f in entries} == KINDS
    return {"stream": stream, "entries": entries, "batch_id": batch_id, "kept": kept, "dropped": dropped,
            "invalid": invalid, "plain": plain}


def _reader(stack: DevStack, *args: str, wrapped: bool = False) -> list[str]:
    base = [sys.executable, "-c", WRAPPER, str(EXAMPLE)] if wrapped else [sys.executable, str(EXAMPLE)]
    return [*base, *args]


def _run(stack: DevStack, args: list[str], env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env={**stack.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"reader exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _pending(stack: DevStack, stream: str, group: str) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    return int(client.xpending(stream, group)["pending"])


@pytest.mark.timeout(120)
def test_reader_handles_every_event_kind(stack: DevStack, events: dict) -> None:
    """One line per entry, every kind with its own fields; all acknowledged; a second run finds nothing."""
    group = f"g-{uuid.uuid4().hex[:6]}"
    proc = _run(stack, _reader(stack, "--group", group, "--consumer", "c1", "--timeout", "2"))
    out = _lines(proc.stdout)
    assert [o["entry"] for o in out] == [e for e, _ in events["entries"]]
    by_kind = {o["event"]: o for o in out}
    assert set(by_kind) == KINDS
    succeeded = [o for o in out if o["event"] == "job.succeeded"]
    assert {o["job_id"] for o in succeeded} == {events["kept"], events["plain"]}
    assert all(len(o["tracks"]) == 2 and o["kie_task_id"] for o in succeeded)
    assert next(o for o in succeeded if o["job_id"] == events["kept"])["batch_id"] == events["batch_id"]
    assert by_kind["job.failed"]["job_id"] == events["invalid"]
    assert by_kind["job.failed"]["error"] == "invalid_request"
    assert by_kind["job.cancelled"]["job_id"] == events["dropped"]
    assert by_kind["job.cancelled"]["metadata"] == {"n": 2}
    assert by_kind["batch.finished"]["batch_id"] == events["batch_id"]
    assert by_kind["batch.finished"]["total"] == 2
    assert by_kind["batch.finished"]["counts"] == {"succeeded": 1, "cancelled": 1}
    assert _pending(stack, events["stream"], group) == 0
    assert "handled 5 event(s)" in proc.stderr

    again = _run(stack, _reader(stack, "--group", group, "--consumer", "c1", "--timeout", "1"))
    assert again.stdout == ""


@pytest.mark.timeout(120)
def test_reader_killed_and_restarted_loses_nothing(stack: DevStack, events: dict) -> None:
    """kill -9 mid-way, restart under the same (default) name: every entry handled, none pending."""
    group = f"g-{uuid.uuid4().hex[:6]}"
    env = {**stack.env, "READER_SLOW": "0.5"}
    first = subprocess.Popen(_reader(stack, "--group", group, wrapped=True), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    seen = [json.loads(first.stdout.readline()), json.loads(first.stdout.readline())]  # type: ignore[union-attr]
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    seen += _lines(first.stdout.read())  # type: ignore[union-attr]
    first.stdout.close()  # type: ignore[union-attr]
    all_ids = [e for e, _ in events["entries"]]
    assert 2 <= len(seen) < len(all_ids), "the reader was not killed mid-way"
    assert _pending(stack, events["stream"], group) > 0  # read, not all acknowledged

    second = _run(stack, _reader(stack, "--group", group, "--timeout", "2"))  # the same host name
    again = _lines(second.stdout)
    handled = [o["entry"] for o in seen + again]
    assert set(handled) == set(all_ids)
    assert len(handled) - len(set(handled)) <= 1  # only the entry in hand when killed is handled twice
    assert _pending(stack, events["stream"], group) == 0


@pytest.mark.timeout(120)
def test_reader_takes_over_an_abandoned_consumer(stack: DevStack, events: dict) -> None:
    """Entries a consumer read and never acknowledged (it never came back) go to another one after --min-idle."""
    group = f"g-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.xgroup_create(events["stream"], group, id="0")
    ghost = client.xreadgroup(group, "ghost", {events["stream"]: ">"}, count=3)[0][1]
    assert len(ghost) == 3
    proc = _run(stack, _reader(stack, "--group", group, "--consumer", "heir", "--min-idle", "0.3",
                               "--claim-interval", "0.3", "--timeout", "2"))
    out = _lines(proc.stdout)
    assert sorted(o["entry"] for o in out) == sorted(e for e, _ in events["entries"])
    assert _pending(stack, events["stream"], group) == 0
    assert not [c for c in client.xinfo_consumers(events["stream"], group) if c["name"] == "ghost" and c["pending"]]


@pytest.mark.timeout(120)
def test_reader_sets_aside_a_poison_entry_and_an_unknown_kind(stack: DevStack, events: dict) -> None:
    """A handler that always fails for one entry, and an event kind the reader does not know: both end
    on the unhandled stream with their reason and are acknowledged; every other entry is handled."""
    prefix = f"poison{uuid.uuid4().hex[:6]}"
    stream = Keys(prefix).results
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    for _, fields in events["entries"]:  # the system's own entries, copied to a stream of their own
        client.xadd(stream, fields)
    client.xadd(stream, {"job_id": "j-from-the-future", "event": "job.teleported", "payload": "{}"})
    group = "g1"
    proc = _run(stack, _reader(stack, "--group", group, "--consumer", "c1", "--max-deliveries", "2",
                               "--min-idle", "0.3", "--claim-interval", "0.3", "--timeout", "2", wrapped=True),
                env={"KIE_KEY_PREFIX": prefix, "READER_FAIL_JOB": events["plain"]})
    out = _lines(proc.stdout)
    assert {o.get("job_id") or o.get("batch_id") for o in out} == \
        {events["kept"], events["dropped"], events["invalid"], events["batch_id"]}
    aside = {f["reason"].split(":")[0]: f for _, f in client.xrange(stream + ":unhandled")}
    assert set(aside) == {"handler failed", "unknown event kind 'job.teleported'"}
    assert aside["handler failed"]["job_id"] == events["plain"]
    assert aside["handler failed"]["deliveries"] == "2"
    assert json.loads(aside["handler failed"]["payload"])["event"] == "job.succeeded"
    assert aside["unknown event kind 'job.teleported'"]["job_id"] == "j-from-the-future"
    assert client.xpending(stream, group)["pending"] == 0
    assert "left pending" in proc.stderr and "set aside" in proc.stderr


@pytest.mark.timeout(60)
def test_reader_stops_cleanly_on_sigterm_and_sigint(stack: DevStack, events: dict) -> None:
    """SIGTERM or SIGINT while it waits for entries: exit 0 with its summary line."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        group = f"g-{uuid.uuid4().hex[:6]}"
        proc = subprocess.Popen(_reader(stack, "--group", group, "--consumer", "c1"), env=stack.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [proc.stdout.readline() for _ in events["entries"]]  # type: ignore[union-attr]
        assert all(lines)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "stopping" in err and "handled 5 event(s)" in err and "Traceback" not in err
        assert _pending(stack, events["stream"], group) == 0


@pytest.mark.timeout(30)
def test_reader_reports_an_unreachable_redis_in_one_line(stack: DevStack) -> None:
    """No traceback and exit 2 when Redis cannot be reached; the URL's password is not printed."""
    from kie_extend.infra.embedded import free_port

    proc = subprocess.run([sys.executable, str(EXAMPLE), "--timeout", "1"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "KIE_REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr
    assert "Redis at 127.0.0.1" in proc.stderr


@pytest.mark.timeout(90)
def test_reader_rides_out_a_redis_restart(stack: DevStack, events: dict, tmp_path: Path) -> None:
    """Its Redis killed (kill -9) and started again under it: the reader reconnects, takes back what
    it held and goes on with new entries; nothing is lost or left pending."""
    from kie_extend.infra.embedded import EmbeddedValkey

    server = EmbeddedValkey(str(tmp_path / "valkey"), appendonly=True).start()
    prefix = f"restart{uuid.uuid4().hex[:6]}"
    stream = Keys(prefix).results
    entries = [fields for _, fields in events["entries"]]
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        for fields in entries[:2]:
            client.xadd(stream, fields)
        env = {**stack.env, "KIE_REDIS_URL": server.url, "KIE_KEY_PREFIX": prefix}
        proc = subprocess.Popen(_reader(stack, "--group", "g", "--consumer", "c1"), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = [json.loads(proc.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
        server.kill()
        time.sleep(1.5)  # the reader notices and backs off
        server.start()
        client = redis.Redis.from_url(server.url, decode_responses=True)
        for fields in entries[2:]:
            client.xadd(stream, fields)
        ids = [entry_id for entry_id, _ in client.xrange(stream)]
        assert len(ids) == len(entries)

        def caught_up() -> bool:
            try:
                group = next(g for g in client.xinfo_groups(stream) if g["name"] == "g")
            except (redis.RedisError, StopIteration):
                return False
            return group["last-delivered-id"] == ids[-1] and group["pending"] == 0

        _wait(caught_up, "the reader to handle the entries added after the restart", timeout=40)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "lost Redis at 127.0.0.1" in err and "Traceback" not in err
        handled = [o["entry"] for o in first + _lines(out)]
        assert set(handled) == set(ids)
        assert len(handled) - len(set(handled)) <= 1  # an entry handled but not acknowledged when Redis died
    finally:
        server.stop()
