"""Listing commands on a real Valkey: ``jobs``, ``batch list``, ``dead-letters`` and ``batch results``
all list newest first (results: file order), take one ``--limit`` (at most that many in all,
1-500), and ``--json`` prints one JSON document: ``jobs`` the same page as ``GET /v1/jobs``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kie_extend.cli.commands import main
from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey
from kie_extend.jobs.listing import list_jobs
from kie_extend.jobs.pipeline import Pipeline
from kie_extend.infra.runtime import Runtime

REQUEST = {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
           "prompt": "a calm song", "continueAt": 5}


@pytest.fixture
def cli_env(valkey: EmbeddedValkey, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test process's environment for in-process ``main()`` runs on our Valkey and prefix."""
    for name in [k for k in os.environ if k.startswith("KIE_")]:
        monkeypatch.delenv(name)
    env = {"KIE_REDIS_URL": valkey.url, "KIE_KEY_PREFIX": prefix, "KIE_QUEUE": prefix,
           "KIE_API_KEY": "test-key-0123456789", "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb",
           "KIE_ALLOW_PRIVATE_URLS": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    return env


@pytest.fixture
def jobs(cli_env: dict[str, str], make_settings: Callable[..., Settings]) -> list[tuple[str, str]]:
    """Twelve jobs created in order, oldest first: ``(job_id, state)``; queued, failed and cancelled.

    Submission is paused by an operator, so nothing is sent anywhere."""
    rt = Runtime(make_settings())
    rt.gates.pause_operator("listing test")
    pipeline = Pipeline(rt)
    made = []
    for n in range(12):
        job_id = f"job-{n:02d}"
        if n % 4 == 1:
            pipeline.accept(job_id, {**REQUEST, "model": "V9"}, tenant="b")  # invalid: failed at once
        else:
            pipeline.accept(job_id, REQUEST, tenant="a" if n % 2 else "b")
            if n % 4 == 2:
                assert pipeline.cancel(job_id) == "cancelled"
        made.append((job_id, rt.store.get(job_id)["state"]))
        time.sleep(0.003)  # distinct creation times
    assert {s for _, s in made} == {"queued", "failed", "cancelled"}
    return made


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def ids_of(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def test_jobs_limit_is_the_newest_n_in_all(jobs: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    newest = [j for j, _ in reversed(jobs)]
    code, out, err = run(capsys, "jobs", "--limit", "5")
    assert code == 0 and ids_of(out) == newest[:5], out  # not 5 per state
    assert err.startswith("more: add --cursor ")
    cursor = err.split()[-1]
    code, out, _ = run(capsys, "jobs", "--limit", "5", "--cursor", cursor)
    assert ids_of(out) == newest[5:10]
    code, out, err = run(capsys, "jobs")
    assert ids_of(out) == newest and err == ""  # default 50: all of them, no "more"
    for state in ("queued", "failed", "cancelled"):
        mine = [j for j, s in reversed(jobs) if s == state]
        code, out, _ = run(capsys, "jobs", "--state", state, "--limit", "2")
        assert code == 0 and ids_of(out) == mine[:2], (state, out)
        assert all(f"  {state}" in line for line in out.splitlines())
    code, out, _ = run(capsys, "jobs", "--tenant", "a", "--state", "queued")
    assert ids_of(out) == [j for j, s in reversed(jobs) if s == "queued" and int(j[-2:]) % 2]


def test_jobs_json_is_the_http_page(jobs: list[tuple[str, str]], capsys: pytest.CaptureFixture[str],
                                    make_settings: Callable[..., Settings]) -> None:
    rt = Runtime(make_settings())
    seen: list[str] = []
    cursor: str | None = None
    while True:
        code, out, _ = run(capsys, "jobs", "--json", "--limit", "5", *(["--cursor", cursor] if cursor else []))
        page = json.loads(out)  # one document, not JSON Lines
        assert code == 0 and set(page) == {"jobs", "next_cursor"}
        assert page == dict(zip(("jobs", "next_cursor"), list_jobs(rt, limit=5, cursor=cursor)))
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [j for j, _ in reversed(jobs)]
    code, out, _ = run(capsys, "jobs", "--json", "--state", "succeeded")
    assert json.loads(out) == {"jobs": [], "next_cursor": None}


def test_limits_and_cursors_are_checked(jobs: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["jobs"], ["batch", "list"], ["dead-letters"]):
        for bad in ("0", "501", "ten"):
            with pytest.raises(SystemExit) as info:
                main([*command, "--limit", bad])
            assert info.value.code == 2
            assert "--limit: must be" in capsys.readouterr().err
    code, _, err = run(capsys, "jobs", "--cursor", "not-a-cursor")
    assert code == 2 and err == "error: invalid input: cursor: not a cursor this API returned\n"


def test_batch_list_newest_first(cli_env: dict[str, str], make_settings: Callable[..., Settings],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rt = Runtime(make_settings())
    for n in range(4):
        rt.store.declare_batch(f"b{n}", [f"b{n}-{i}" for i in range(n + 1)])
        time.sleep(0.003)
    code, out, _ = run(capsys, "batch", "list", "--limit", "3")
    assert code == 0 and ids_of(out) == ["b3", "b2", "b1"], out
    code, out, _ = run(capsys, "batch", "list", "--json", "--limit", "3")
    doc = json.loads(out)
    assert [b["batch_id"] for b in doc["batches"]] == ["b3", "b2", "b1"] and set(doc) == {"batches"}
    assert [b["total"] for b in doc["batches"]] == [4, 3, 2] and all(b["done"] == 0 for b in doc["batches"])


def test_dead_letters_newest_first(cli_env: dict[str, str], make_settings: Callable[..., Settings],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rt = Runtime(make_settings())
    # The entries Delivery pushes (LPUSH: newest at the head) when a handler runs out of attempts.
    for n in range(5):
        rt.redis.lpush(rt.keys.dead_letters, json.dumps({
            "job_id": f"job-{n % 2}", "handler": "webhook", "event": "job.succeeded", "attempts": 8,
            "error": f"ConnectionError: refused #{n}", "at": f"2026-12-03T12:00:0{n}Z"}))
    code, out, _ = run(capsys, "dead-letters", "--limit", "3")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
        "2026-12-03T12:00:04Z", "2026-12-03T12:00:03Z", "2026-12-03T12:00:02Z"], out
    assert "job-0  webhook  job.succeeded  attempts=8  ConnectionError: refused #4" in out
    code, out, _ = run(capsys, "dead-letters", "--json", "--job-id", "job-1")
    doc = json.loads(out)
    assert set(doc) == {"dead_letters"} and [d["error"][-2:] for d in doc["dead_letters"]] == ["#3", "#1"]
    code, out, _ = run(capsys, "dead-letters", "--json", "--limit", "1")
    assert [d["error"][-2:] for d in json.loads(out)["dead_letters"]] == ["#4"]


def test_batch_results_json_is_one_document(cli_env: dict[str, str], make_settings: Callable[..., Settings],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rt = Runtime(make_settings())
    rt.gates.pause_operator("listing test")
    rt.store.declare_batch("album", ["album-2", "album-3"])
    Pipeline(rt).accept("album-3", REQUEST, batch_id="album")
    code, out, _ = run(capsys, "jobs", "--batch", "album", "--state", "pending")
    assert code == 0 and out == "album-2  pending   \n", repr(out)
    code, _, err = run(capsys, "jobs", "--state", "pending")  # pending exists only within a batch
    assert code == 2 and err.startswith("error: invalid input: state: pending (declared but not yet recorded) "
                                        "exists only within a batch")
    code, out, _ = run(capsys, "batch", "results", "album", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["batch_id"] == "album"
    assert [(r["job_id"], r["line"], r["state"]) for r in doc["results"]] == [("album-2", 2, "pending"),
                                                                               ("album-3", 3, "queued")]
    code, out, _ = run(capsys, "batch", "results", "album")  # a results file: JSON Lines, as before
    assert [json.loads(line)["job_id"] for line in out.splitlines()] == ["album-2", "album-3"]
    code, out, _ = run(capsys, "batch", "results", "album", "--format", "csv")
    assert out.splitlines()[0].startswith("job_id,line,state")
    code, _, err = run(capsys, "batch", "results", "album", "--json", "--format", "csv")
    assert code == 2 and "--json prints one JSON document" in err


def test_jobs_json_from_the_installed_command(jobs: list[tuple[str, str]], cli_env: dict[str, str],
                                              tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("kie-extend")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kie_extend.cli"]
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")} | cli_env
    proc = subprocess.run([*cmd, "jobs", "--json", "--limit", "3", "--state", "queued"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = json.loads(proc.stdout)
    assert [j["job_id"] for j in page["jobs"]] == [j for j, s in reversed(jobs) if s == "queued"][:3]
    assert page["next_cursor"]


def test_a_closed_pipe_is_quiet(jobs: list[tuple[str, str]], cli_env: dict[str, str], tmp_path: Path) -> None:
    """``kie-extend jobs | head -0``: the reader is gone before anything is written."""
    exe = Path(sys.executable).with_name("kie-extend")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kie_extend.cli"]
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")} | cli_env
    proc = subprocess.Popen([*cmd, "jobs"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == "", err
