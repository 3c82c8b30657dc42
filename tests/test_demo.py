"""``kie-extend demo`` (what ``make demo`` runs): it prints the dashboard's URL and a fresh token,
``serve`` answers there with that token while the jobs run, every job ends as expected, and when
the demo ends no process of it is left."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _stat(pid: str) -> tuple[int, int] | None:
    """(parent pid, process group) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2])


def _all_pids() -> list[str]:
    return [e.name for e in Path("/proc").iterdir() if e.name.isdigit()]


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid``."""
    return {int(p) for p in _all_pids() if (st := _stat(p)) and st[0] == pid}


def alive_in_groups(groups: set[int]) -> list[int]:
    """Pids of live (not zombie) processes in any of the process ``groups``."""
    out = []
    for p in _all_pids():
        st = _stat(p)
        if st and st[1] in groups:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append(int(p))
    return out


def test_demo_prints_a_dashboard_and_token_and_leaves_nothing_behind() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    proc = subprocess.Popen([sys.executable, "-m", "kie_extend.cli", "demo", "--jobs", "3", "--hold"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    out: list[str] = []

    def read_until(pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert proc.poll() is None, "demo exited early:\n" + "".join(out)
                continue
            out.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(out))

    try:
        dash = read_until(r"^dashboard: (http://127\.0\.0\.1:\d+)/  token: (\S+)$", 60)
        url, token = dash.group(1), dash.group(2)
        assert len(token) >= 16
        read_until(r"logs in (\S+)", 30)
        auth = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        missing = requests.get(f"{url}/v1/jobs/no-such-job", headers=auth, timeout=5)
        assert missing.status_code == 404 and missing.json()["state"] == "not_found"
        assert requests.get(f"{url}/v1/jobs/no-such-job", timeout=5).status_code == 401
        assert requests.get(f"{url}/v1/jobs/no-such-job", headers={"Authorization": "Bearer wrong"},
                            timeout=5).status_code == 401
        read_until(r"^demo finished: every job reached the expected state", 120)
        read_until(r"Press Enter", 10)
        job_ids = re.findall(rf"^({UUID}) .* succeeded ", "".join(out), re.M)
        assert len(job_ids) == 2, "".join(out)
        for job_id in job_ids:  # the same jobs, as the dashboard's API sees them
            got = requests.get(f"{url}/v1/jobs/{job_id}", headers=auth, timeout=5)
            assert got.status_code == 200 and got.json()["state"] == "succeeded", got.text
        # Every part (Valkey, simulator, serve, worker, beat) runs in its own process group.
        groups = children_of(proc.pid)
        assert len(groups) >= 5 and alive_in_groups(groups), "the demo's children run while it holds"
        proc.stdin.write("\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.wait(60) == 0, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Nothing left: no process in any child's group (worker pool processes included), and serve
    # no longer answers.
    deadline = time.monotonic() + 10
    while alive_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive_in_groups(groups)
    try:
        requests.get(f"{url}/healthz", timeout=2)
        raise AssertionError("serve still answers after the demo ended")
    except requests.ConnectionError:
        pass
