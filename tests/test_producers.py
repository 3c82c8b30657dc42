"""The producer examples in examples/ and docs/producers.md, run for real.

A whole local system (Valkey, simulator, serve, worker, beat) serves the module; each example
runs as its own process with the environment a user would give it, and its jobs must succeed with
exactly one submission each. The Node example needs ``node`` and ``npm``; its ``npm install`` is
cached under the pytest cache directory, keyed by the package files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kie_extend.store.keys import Keys
from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TERMINAL = {"succeeded", "failed"}

# Runs an example file as __main__ and fails if it imported kie_extend (plain-Celery producers must not).
NO_KIE_EXTEND = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
if any(name == "kie_extend" or name.startswith("kie_extend.") for name in sys.modules):
    sys.exit("the example imported kie_extend")
sys.exit(code)
"""

# npm's codes for "the registry could not be reached"; any other install failure fails the test.
NPM_OFFLINE = re.compile(r"\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH)\b")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("producers")
    with DevStack(workdir, key_prefix=f"prod{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s", "KIE_POLL_CALLBACK_INTERVAL": "2s",
                       "KIE_TICK_INTERVAL": "0.5s", "KIE_HANDLERS": "redis_stream"}) as st:
        st.start_simulator("--time-factor", "0.04", "--seed", "11")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=4)
        st.start_beat()
        yield st


@pytest.fixture(scope="module")
def finished_jobs() -> list[str]:
    """Ids of the jobs this module's producers created and saw succeed (read back by the consumer)."""
    return []


def upload_url(stack: DevStack) -> str:
    return f"{stack.sim_url}/files/source/30s.mp3"


def run(args: list[str], stack: DevStack, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=stack.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_terminal(stack: DevStack, job_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    """Every job's record once all are terminal with their handlers delivered."""
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    recs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in job_ids}
        if all(r["state"] in TERMINAL and r["handlers"]
               and all(h.get("state") == "delivered" for h in r["handlers"].values()) for r in recs.values()):
            return recs
        time.sleep(0.25)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-3000:] for c in stack.children)
    raise AssertionError(f"jobs did not finish: {[(j, r['state']) for j, r in recs.items()]}\n{logs}")


def submissions(stack: DevStack) -> dict[str, int]:
    """Submissions the simulator received, by the job id at the end of their callBackUrl."""
    by_url = stack.sim_stats()["submissions_by_callback_url"]
    counts: dict[str, int] = {}
    for url, n in by_url.items():  # type: ignore[union-attr]
        job_id = url.rsplit("/kie/callback/", 1)[-1]
        counts[job_id] = counts.get(job_id, 0) + int(n)
    return counts


@pytest.mark.timeout(120)
def test_python_send_task_example(stack: DevStack, finished_jobs: list[str]) -> None:
    """examples/send_task.py: plain Celery, by name, without importing kie_extend."""
    job_id = f"py-{uuid.uuid4()}"
    proc = run([sys.executable, "-c", NO_KIE_EXTEND, str(EXAMPLES / "send_task.py"), upload_url(stack),
                "--job-id", job_id, "--metadata", '{"producer": "python"}'], stack, timeout=60)
    assert proc.stdout.strip() == job_id
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded", rec
    assert rec["metadata"] == {"producer": "python"} and len(rec["tracks"]) == 2
    assert submissions(stack).get(job_id) == 1
    finished_jobs.append(job_id)


@pytest.mark.timeout(120)
def test_raw_redis_envelope_example(stack: DevStack, finished_jobs: list[str]) -> None:
    """examples/lpush_envelope.py: the envelope written with a bare Redis client is a valid job."""
    job_id = f"raw-{uuid.uuid4()}"
    proc = run([sys.executable, "-c", NO_KIE_EXTEND, str(EXAMPLES / "lpush_envelope.py"), upload_url(stack),
                "--job-id", job_id], stack, timeout=60)
    assert proc.stdout.strip() == job_id
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded", rec
    assert rec["metadata"] == {"producer": "raw"}
    assert submissions(stack).get(job_id) == 1
    finished_jobs.append(job_id)


@pytest.mark.timeout(120)
def test_invalid_messages_become_failed_jobs(stack: DevStack) -> None:
    """What docs/producers.md promises for bad messages: a failed job with invalid_request, never a submission."""
    from kie_extend.api import producer_app

    settings = stack.settings()
    app = producer_app(settings)
    bad_fields = f"badfields-{uuid.uuid4()}"
    app.send_task("kie_extend.extend", task_id=bad_fields, queue=settings.queue,
                  kwargs={"request": {"uploadUrl": upload_url(stack), "defaultParamFlag": "true", "model": "V5",
                                      "styleWeight": 1.5}, "priority": "high"})
    positional = f"positional-{uuid.uuid4()}"
    app.send_task("kie_extend.extend", task_id=positional, queue=settings.queue, args=[{"uploadUrl": "x"}])
    recs = wait_terminal(stack, [bad_fields, positional])
    assert all(r["state"] == "failed" and r["error"]["kind"] == "invalid_request" for r in recs.values())
    assert {"defaultParamFlag", "styleWeight", "priority"} <= {e["field"] for e in recs[bad_fields]["error"]["errors"]}
    assert "positional arguments" in {e["field"] for e in recs[positional]["error"]["errors"]}
    counts = submissions(stack)
    assert counts.get(bad_fields) is None and counts.get(positional) is None


@pytest.fixture(scope="module")
def node_project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/node with its dependencies installed (cached across runs, keyed by the package files)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the Node example needs node and npm on PATH (not installed here)")
    source = EXAMPLES / "node"
    package_files = [p for p in (source / "package.json", source / "package-lock.json") if p.exists()]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in package_files)).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    project = (Path(cache.mkdir(f"kie-extend-node-{digest}")) if cache is not None
               else tmp_path_factory.mktemp("node"))
    marker = project / ".installed"
    if not marker.exists():
        for path in package_files:
            shutil.copy(path, project / path.name)
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=project, capture_output=True,
                              text=True, timeout=300)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 and NPM_OFFLINE.search(output):
            pytest.skip(f"npm could not reach its registry to install celery-node: {NPM_OFFLINE.search(output)[0]}")
        assert proc.returncode == 0, f"npm install failed:\n{output[-3000:]}"
        marker.write_text(digest)
    shutil.copy(source / "enqueue.js", project / "enqueue.js")  # always the current example
    return project


@pytest.mark.timeout(420)
def test_node_celery_node_example(stack: DevStack, node_project: Path, finished_jobs: list[str]) -> None:
    """examples/node/enqueue.js: celery-node publishes a protocol-2 JSON message the worker accepts."""
    job_id = f"node-{uuid.uuid4()}"
    proc = run(["node", "enqueue.js", upload_url(stack), job_id], stack, timeout=60, cwd=node_project)
    assert proc.stdout.strip() == job_id
    rec = wait_terminal(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded", rec
    assert rec["metadata"] == {"producer": "node"} and len(rec["tracks"]) == 2
    assert submissions(stack).get(job_id) == 1
    finished_jobs.append(job_id)


@pytest.mark.timeout(240)
def test_enqueue_many_example(stack: DevStack, finished_jobs: list[str]) -> None:
    """examples/enqueue_many.py: 20 jobs through kie_extend.enqueue_many, all succeed, each submitted once."""
    proc = run([sys.executable, str(EXAMPLES / "enqueue_many.py"), upload_url(stack), "--count", "20",
                "--wait", "150"], stack, timeout=200)
    lines = proc.stdout.splitlines()
    job_ids = lines[:20]
    assert len(set(job_ids)) == 20
    assert [line.split()[:2] for line in lines[20:]] == [[j, "succeeded"] for j in job_ids]
    recs = wait_terminal(stack, job_ids)
    assert all(r["state"] == "succeeded" for r in recs.values())
    assert sorted(recs[j]["metadata"]["batch_index"] for j in job_ids) == list(range(20))
    counts = submissions(stack)
    assert [counts.get(j) for j in job_ids] == [1] * 20
    finished_jobs.extend(job_ids)


@pytest.mark.timeout(60)
def test_enqueue_many_example_rejects_a_bad_batch(stack: DevStack) -> None:
    """An invalid batch is refused as a whole, naming each bad item's field; nothing reaches the queue."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "enqueue_many.py"), "ftp://example.org/a.mp3",
                           "--count", "2"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing was enqueued" in proc.stderr
    assert "[0].uploadUrl" in proc.stderr and "[1].uploadUrl" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.timeout(120)
def test_consume_results_example(stack: DevStack, finished_jobs: list[str]) -> None:
    """examples/consume_results.py reads every event once through a consumer group and acknowledges it."""
    own = enqueue_extend({"uploadUrl": upload_url(stack), "defaultParamFlag": True, "instrumental": True,
                          "continueAt": 5, "model": "V4", "style": "lofi", "title": "Consumer"},
                         metadata={"producer": "api"}, settings=stack.settings())
    wait_terminal(stack, [own])
    expected = [*finished_jobs, own]

    stream = Keys(stack.settings().key_prefix).results
    client = redis.Redis.from_url(stack.redis_url)
    total = client.xlen(stream)
    group = f"test-{uuid.uuid4().hex[:8]}"
    consume = [sys.executable, str(EXAMPLES / "consume_results.py"), "--group", group, "--consumer", "c1"]

    proc = run([*consume, "--count", str(total), "--timeout", "10"], stack, timeout=60)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) == total
    seen = [e["job_id"] for e in events]
    for job_id in expected:
        assert seen.count(job_id) == 1, job_id
    mine = [e for e in events if e["job_id"] in expected]
    assert all(e["event"] == "job.succeeded" and len(e["tracks"]) == 2 and e["kie_task_id"] for e in mine)
    assert next(e for e in events if e["job_id"] == own)["metadata"] == {"producer": "api"}
    failed = [e for e in events if e["event"] == "job.failed"]  # the invalid messages sent above, if run
    assert all(e["error"] == "invalid_request" and "tracks" not in e for e in failed)
    assert client.xpending(stream, group)["pending"] == 0

    again = run([*consume, "--timeout", "1.5"], stack, timeout=30)
    assert again.stdout == ""  # the group already acknowledged everything
