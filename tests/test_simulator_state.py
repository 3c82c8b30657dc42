"""The simulator's state file: a restarted simulator still knows its tasks.

In-process tests restart the HTTP simulator on the same port with the same file; the last test
runs the whole system with a real simulator process that is killed (SIGKILL) and started again
while a job is in flight, and the job must succeed with one submission.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.simulator import SimConfig, main, mp3_bytes, serve
from kie_extend.simulator.state import StateError

KEY = "state-test-key-0123"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def body(url: str, callback: str = "http://127.0.0.1:9/cb") -> dict[str, Any]:
    return {"uploadUrl": f"{url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 5, "model": "V5", "style": "lofi", "title": "T", "callBackUrl": callback}


def submit(url: str) -> str:
    reply = requests.post(f"{url}/api/v1/generate/upload-extend", json=body(url), headers=auth(), timeout=5).json()
    assert reply["code"] == 200, reply
    return str(reply["data"]["taskId"])


def poll(url: str, task_id: str) -> dict[str, Any]:
    return requests.get(f"{url}/api/v1/generate/record-info", params={"taskId": task_id}, headers=auth(),
                        timeout=5).json()  # type: ignore[no-any-return]


CONFIG = {"seed": 3, "time_factor": 0.01, "poll_limit": 1000, "callbacks": False, "api_key": KEY}


@pytest.mark.timeout(30)
def test_tasks_credits_counters_and_uploads_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    first = serve(SimConfig(**CONFIG), state_file=state)
    port = first.port
    try:
        task_ids = [submit(first.url) for _ in range(2)]
        uploaded = requests.post(f"{first.url}/api/file-base64-upload", headers=auth(), timeout=5, json={
            "base64Data": base64.b64encode(mp3_bytes(1.0)).decode(), "uploadPath": "t", "fileName": "a.mp3"}).json()
        assert uploaded["code"] == 200, uploaded
        credits = requests.get(f"{first.url}/api/v1/chat/credit", headers=auth(), timeout=5).json()["data"]
    finally:
        first.stop()

    saved = state.read_text()
    assert KEY not in saved  # the API key is never written
    assert all(t in saved for t in task_ids)

    second = serve(SimConfig(**CONFIG), port=port, state_file=state)
    try:
        for task_id in task_ids:
            deadline = time.monotonic() + 10  # a task ends 0.65 s after its submission
            while (record := poll(second.url, task_id))["data"]["status"] != "SUCCESS":
                assert record["code"] == 200 and time.monotonic() < deadline, record
                time.sleep(0.05)
            audio = record["data"]["response"]["sunoData"][0]["audioUrl"]
            assert requests.get(audio, timeout=5).status_code == 200  # its takes are served again
        assert requests.get(f"{second.url}/api/v1/chat/credit", headers=auth(), timeout=5).json()["data"] == credits
        stats = requests.get(f"{second.url}/_sim/stats", timeout=5).json()
        assert stats["tasks"] == 2 and stats["submissions_accepted"] == 2 and stats["uploads"] == 1
        download = requests.get(uploaded["data"]["downloadUrl"], timeout=5)
        assert download.status_code == 200 and download.content == mp3_bytes(1.0)
        # The seeded generator goes on where it stopped: no task id is handed out twice.
        assert submit(second.url) not in task_ids
    finally:
        second.stop()


@pytest.mark.timeout(30)
def test_a_task_killed_mid_way_finishes_on_time_and_its_callbacks_go_out(tmp_path: Path) -> None:
    """Time passes while the simulator is down; the callback stages not yet sent are sent after the restart."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    got: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["data"]["callbackType"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    cb = f"http://127.0.0.1:{receiver.server_address[1]}/cb"
    state = tmp_path / "sim.json"
    cfg = {**CONFIG, "callbacks": True, "time_factor": 0.02}  # first at 0.5 s, complete at 1.3 s
    first = serve(SimConfig(**cfg), state_file=state)
    port = first.port
    try:
        reply = requests.post(f"{first.url}/api/v1/generate/upload-extend", json=body(first.url, cb), headers=auth(),
                              timeout=5).json()
        task_id = reply["data"]["taskId"]
    finally:
        first.stop()  # before any callback went out
    assert got == []
    second = serve(SimConfig(**cfg), port=port, state_file=state)
    try:
        deadline = time.monotonic() + 10
        while got != ["first", "complete"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == ["first", "complete"]
        assert poll(second.url, task_id)["data"]["status"] == "SUCCESS"
        assert json.loads(state.read_text())["tasks"][0]["done_stages"] == ["first", "complete"]
    finally:
        second.stop()
        receiver.shutdown()
        receiver.server_close()


def test_reset_empties_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    with serve(SimConfig(**CONFIG), state_file=state) as sim:
        submit(sim.url)
        assert json.loads(state.read_text())["tasks"]
        requests.post(f"{sim.url}/_sim/reset", timeout=5)
        assert json.loads(state.read_text())["tasks"] == []


def test_a_damaged_state_file_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "sim.json"
    state.write_text("{not json")
    with pytest.raises(StateError, match="sim.json"):
        serve(SimConfig(**CONFIG), state_file=state)
    assert main(["--port", "0", "--state-file", str(state)]) == 1
    err = capsys.readouterr().err
    assert "sim.json cannot be read" in err and "Traceback" not in err
    state.write_text(json.dumps({"version": 1, "tasks": [{"task_id": "x"}]}))
    with pytest.raises(StateError, match="damaged"):
        serve(SimConfig(**CONFIG), state_file=state)


# ----- the whole system: a real simulator process killed and restarted with a job in flight ------

@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    with DevStack(tmp_path, key_prefix=f"st{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
                       "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s"}) as st:
        yield st


@pytest.mark.timeout(120)
def test_job_in_flight_survives_a_killed_simulator(stack: DevStack, tmp_path: Path) -> None:
    state = tmp_path / "kie-sim-state.json"
    # A task takes 65 s x 0.08 = 5.2 s: the simulator is killed while it runs, and down for 2 s.
    stack.start_simulator("--time-factor", "0.08", "--seed", "9", "--state-file", str(state))
    stack.start_serve(callbacks_only=True)
    stack.start_worker(concurrency=2)
    stack.start_beat()
    settings = stack.settings()
    job_id = enqueue_extend({k: v for k, v in body(stack.sim_url).items() if k != "callBackUrl"},
                            settings=settings)
    deadline = time.monotonic() + 30
    while get_job(job_id, settings=settings)["state"] != "submitted":
        assert time.monotonic() < deadline, get_job(job_id, settings=settings)
        time.sleep(0.1)
    task_id = get_job(job_id, settings=settings)["kie_task_id"]
    sim = next(c for c in stack.children if c.name == "simulator")
    sim.kill9()
    time.sleep(2)
    assert get_job(job_id, settings=settings)["state"] == "submitted"  # still in flight
    sim.restart()
    deadline = time.monotonic() + 60
    while (rec := get_job(job_id, settings=settings))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, rec
        time.sleep(0.2)
    assert rec["state"] == "succeeded", rec
    assert rec["kie_task_id"] == task_id and len(rec["tracks"]) == 2
    stats = stack.sim_stats()
    assert stats["submissions_accepted"] == 1  # never sent again
    assert "restored" in Path(sim.log_path).read_text()
