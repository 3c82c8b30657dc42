"""What a new user of ``kie-extend`` runs into, each as a real process against a private Valkey:
``enqueue FILE`` takes ``batch submit``'s line keys as options and warns about (or, for a near miss
of an option, refuses) keys it does not know, as JSONL and CSV batches do; a word too many is
reported under the subcommand's own usage; no such job or batch is exit 3 everywhere; one
pause-reason limit for the CLI, the HTTP API and the dashboard; one "is submission paused, and
why" for ``status``, ``/v1/system`` and ``/metrics``; ``kie-extend valkey`` stops on SIGTERM."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from dash_server import ServedApp
from kie_extend.cli.commands import build_parser
from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey, free_port
from kie_extend.admission.gates import MAX_PAUSE_REASON
from kie_extend.http.app import create_app
from kie_extend.infra.runtime import Runtime

EXE = Path(sys.executable).with_name("kie-extend")
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "kie_extend.cli"]
REQUEST = {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
           "prompt": "a calm song", "continueAt": 5}
TOKEN = "usage-token-0123456789"


@pytest.fixture
def env(valkey: EmbeddedValkey, prefix: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    out.update({"KIE_REDIS_URL": valkey.url, "KIE_KEY_PREFIX": prefix, "KIE_QUEUE": prefix,
                "KIE_API_KEY": "test-key-0123456789", "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb",
                "KIE_ALLOW_PRIVATE_URLS": "true", "PYTHONUNBUFFERED": "1"})
    return out


def kie(*args: str, env: dict[str, str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def queued_calls(valkey: EmbeddedValkey, queue: str) -> list[dict[str, Any]]:
    """The kwargs of every task message waiting in the broker queue ``queue`` (Celery's protocol 2)."""
    client = redis.Redis.from_url(valkey.url)
    calls = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        calls.append(body[1])
    return calls


# -- 1. enqueue FILE: options as options, unknown keys warned, near misses refused ---------------

def test_enqueue_file_takes_the_line_keys_of_batch_submit_as_options(env: dict[str, str], tmp_path: Path,
                                                                     valkey: EmbeddedValkey) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**REQUEST, "tenant": "t1", "priority": 9, "metadata": {"order": 42},
                                "idempotency_key": "order-42"}))
    done = kie("enqueue", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    [call] = queued_calls(valkey, env["KIE_QUEUE"])
    assert call["request"] == REQUEST  # the body sent to KIE holds no option
    assert (call["tenant"], call["priority"], call["metadata"], call["idempotency_key"]) == (
        "t1", 9, {"order": 42}, "order-42")

    # The flags override the file, and --batch-id counts the job in a batch.
    done = kie("enqueue", str(path), "--tenant", "t2", "--priority", "3", "--batch-id", "b-7",
               "--not-after", "2999-01-01T00:00:00Z", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    call = queued_calls(valkey, env["KIE_QUEUE"])[0]  # LPUSH: the newest first
    assert (call["tenant"], call["priority"], call["batch_id"]) == ("t2", 3, "b-7") and call["not_after"]

    # A not_after already past is refused, from the file and from the flag, and nothing is sent.
    path.write_text(json.dumps({**REQUEST, "not_after": "2020-01-01T00:00:00Z"}))
    for extra in ([], ["--not-after", "2020-01-01T00:00:00Z"]):
        done = kie("enqueue", str(path) if not extra else "-", *extra, env=env, cwd=tmp_path,
                   stdin=json.dumps(REQUEST) if extra else None)
        assert done.returncode == 2 and "not_after: is already past" in done.stderr, done.stderr
    assert len(queued_calls(valkey, env["KIE_QUEUE"])) == 2


def test_enqueue_file_warns_about_unknown_keys_and_refuses_near_misses(env: dict[str, str], tmp_path: Path,
                                                                       valkey: EmbeddedValkey) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**REQUEST, "foo": 1}))
    done = kie("enqueue", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 0
    assert "warning: key 'foo' is not a field of the KIE request; it is sent to KIE as it is" in done.stderr
    for key, option in (("idempotencyKey", "idempotency_key"), ("Tenant", "tenant"), ("notAfter", "not_after")):
        path.write_text(json.dumps({**REQUEST, key: "x"}))
        done = kie("enqueue", str(path), env=env, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert f"{key}: is not a field of the KIE request; did you mean the option {option}?" in done.stderr
    path.write_text(json.dumps({**REQUEST, "job_id": "mine"}))
    done = kie("enqueue", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 2 and "job_id: enqueue names the job itself" in done.stderr
    assert len(queued_calls(valkey, env["KIE_QUEUE"])) == 1  # only the "foo" one


def test_batch_dry_run_warns_about_unknown_keys_in_jsonl_as_in_csv(env: dict[str, str], tmp_path: Path) -> None:
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text(json.dumps({**REQUEST, "foo": 1}) + "\n" + json.dumps({**REQUEST, "titel": "x"}) + "\n")
    done = kie("batch", "submit", str(jsonl), "--dry-run", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: line 1: key 'foo' is not a field of the KIE request; it is sent to KIE as it is" in done.stderr
    assert "warning: line 2: key 'titel' is not a field of the KIE request (did you mean title?)" in done.stderr
    csv = tmp_path / "u.csv"
    csv.write_text("uploadUrl,defaultParamFlag,model,prompt,continueAt,foo\n"
                   "https://example.org/a.mp3,false,V5,a song,5,1\n")
    done = kie("batch", "submit", str(csv), "--dry-run", env=env, cwd=tmp_path)
    assert done.returncode == 0 and "warning: column 'foo' is not a field of the KIE request" in done.stderr
    jsonl.write_text(json.dumps({**REQUEST, "idempotencyKey": "k"}) + "\n")
    done = kie("batch", "submit", str(jsonl), "--dry-run", env=env, cwd=tmp_path)
    assert done.returncode == 2 and "line 1: idempotencyKey: " in done.stderr and "idempotency_key" in done.stderr


# -- 2. a word too many: the subcommand's own usage -------------------------------------------------

def _leaf_commands() -> list[list[str]]:
    """Every subcommand (``batch submit`` etc. too), as the argv that reaches it with its required words."""
    def positionals(p: argparse.ArgumentParser) -> list[str]:
        return ["x" for a in p._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]

    out: list[list[str]] = []
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in top.choices.items():
        if name in ("simulator", "cancel"):  # flags pass through to the simulator; cancel takes any number of ids
            continue
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            out += [[name, n, *positionals(p)] for n, p in nested[0].choices.items()]
        else:
            out.append([name, *positionals(sub)])
    return out


def test_extra_words_are_reported_under_the_subcommands_usage(tmp_path: Path) -> None:
    runs = [[*argv, "surplus-word"] for argv in _leaf_commands()] + [["status", "a", "b"]]
    script = ("import json, sys, contextlib, io\nfrom kie_extend.cli.commands import main\nout = []\n"
              "for argv in json.load(sys.stdin):\n    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n        try:\n            code = main(argv)\n"
              "        except SystemExit as exc:\n            code = exc.code\n"
              "    out.append([code, err.getvalue()])\nprint(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(runs), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for argv, (code, err) in zip(runs, json.loads(done.stdout)):
        words = [w for w in argv if w not in ("x", "surplus-word", "a", "b")]
        prog = "kie-extend " + " ".join(words)
        assert code == 2, (argv, err)
        assert err.startswith(f"usage: {prog} ") or err.startswith(f"usage: {prog}\n"), (argv, err)
        assert f"{prog}: error: unrecognized arguments: " in err, (argv, err)
        assert "{enqueue,status" not in err, (argv, err)  # not the top-level list of subcommands
    pause = dict(zip(map(tuple, runs), json.loads(done.stdout)))[("pause", "surplus-word")][1]
    assert "kie-extend pause: error: unrecognized arguments: surplus-word (give a reason with --reason)" in pause


def test_pending_without_a_batch_says_it_needs_one(env: dict[str, str], tmp_path: Path) -> None:
    done = kie("jobs", "--state", "pending", env=env, cwd=tmp_path)
    assert done.returncode == 2 and "pending" in done.stderr and "--batch BATCH_ID" in done.stderr, done.stderr


# -- 4. exit codes: 3 = no such job or batch, everywhere ---------------------------------------

def test_no_such_job_or_batch_is_exit_3_on_every_command(env: dict[str, str], tmp_path: Path) -> None:
    for argv in (["status", "nosuchjob"], ["status", "nosuchjob", "--wait"], ["status", "nosuchjob", "--json"],
                 ["retry", "nosuchjob"], ["cancel", "nosuchjob"], ["cancel", "--batch", "nosuchbatch"],
                 ["batch", "status", "nosuchbatch"], ["batch", "results", "nosuchbatch"]):
        done = kie(*argv, env=env, cwd=tmp_path)
        assert done.returncode == 3, (argv, done.stdout, done.stderr)
        if "--json" not in argv:
            assert done.stderr.startswith("error: "), (argv, done.stderr)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "| 3 | no such job or batch:" in readme and "the job failed or is unknown" not in readme


# -- 5. one pause-reason limit ------------------------------------------------------------------

def test_one_pause_reason_limit_for_cli_api_and_dashboard(env: dict[str, str], tmp_path: Path,
                                                          make_settings: Callable[..., Settings]) -> None:
    rt = Runtime(make_settings())
    too_long, longest = "x" * (MAX_PAUSE_REASON + 1), "y" * MAX_PAUSE_REASON
    done = kie("pause", "--reason", too_long, env=env, cwd=tmp_path)
    assert done.returncode == 2 and f"at most {MAX_PAUSE_REASON} characters" in done.stderr
    assert rt.gates.operator_paused() is None
    done = kie("pause", env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("submission paused by an operator; "), done.stdout
    assert rt.gates.resume_operator()

    app = ServedApp(create_app(make_settings(api_tokens=TOKEN), parts=("api", "dashboard")))
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.post(app.url + "/v1/pause", json={"reason": too_long}, headers=auth).status_code == 422
        s = requests.Session()
        r = s.post(app.url + "/login", data={"token": TOKEN, "next": "/"}, headers={"Origin": app.url})
        assert f'maxlength="{MAX_PAUSE_REASON}"' in r.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]
        r = s.post(app.url + "/pause", data={"csrf": csrf, "reason": too_long}, headers={"Origin": app.url})
        assert r.status_code == 422 and f"at most {MAX_PAUSE_REASON} characters" in r.text
        assert rt.gates.operator_paused() is None
        r = s.post(app.url + "/pause", data={"csrf": csrf, "reason": longest}, headers={"Origin": app.url})
        assert r.status_code == 200 and rt.gates.operator_paused()["reason"] == longest  # type: ignore[index]
    finally:
        app.stop()


# -- 7. one answer to "is submission paused, and why" ------------------------------------------

def test_status_system_and_metrics_agree_about_an_outage(env: dict[str, str], tmp_path: Path,
                                                         make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=TOKEN)
    rt = Runtime(settings)
    while not rt.reach.unreachable():  # what the client records on each failed connect
        rt.reach.failure("could not connect to http://127.0.0.1:9")
    rt.gates.pause_operator("maintenance")
    app = ServedApp(create_app(settings, parts=("api",)))
    try:
        status = kie("status", env=env, cwd=tmp_path).stdout
        as_json = json.loads(kie("status", "--json", env=env, cwd=tmp_path).stdout)
        system = requests.get(app.url + "/v1/system", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        metrics = requests.get(app.url + "/metrics").text
    finally:
        app.stop()
    assert "submission:  PAUSED: provider unreachable since" in status
    assert "submission:  PAUSED: by an operator since" in status and "submission:  open" not in status
    for view in (as_json, system):
        assert view["submission"]["paused"] is True
        assert [r["reason"] for r in view["submission"]["reasons"]] == ["operator", "unreachable"]
    assert "kie_extend_submission_paused 1" in metrics
    assert 'kie_extend_submission_paused_reason{reason="unreachable"} 1' in metrics
    assert 'kie_extend_submission_paused_reason{reason="operator"} 1' in metrics
    assert 'kie_extend_submission_paused_reason{reason="account"} 0' in metrics


# -- 8. wording -----------------------------------------------------------------------------------

def test_refusals_all_start_with_error(env: dict[str, str], tmp_path: Path) -> None:
    for argv in (["cancel", "nosuchjob"], ["retry", "nosuchjob"]):
        done = kie(*argv, env=env, cwd=tmp_path)
        assert done.stdout == "" and re.match(r"error: not (cancelled|retried): ", done.stderr), done


def test_consume_results_names_refused_credentials(valkey: EmbeddedValkey, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "consume_results.py"
    with EmbeddedValkey() as locked:
        redis.Redis(port=locked.port).config_set("requirepass", "right-pass")  # after start(), which pings
        url = f"redis://:wrong-pass@127.0.0.1:{locked.port}/0"
        done = subprocess.run([sys.executable, str(example), "--group", "g", "--consumer", "c"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("KIE_")},
                                   "KIE_REDIS_URL": url})
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "refused the credentials" in out and "cannot be reached" not in out, out
    assert "wrong-pass" not in out


def test_dev_env_file_names_its_own_path() -> None:
    from kie_extend.cli.dev import env_file_text

    assert ". /tmp/x/.env; set +a" in env_file_text({"KIE_X": "1"}, "/tmp/x/.env").splitlines()[0]
    ops = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert ops.count("`due` counts steps on the schedule") == 1


# -- 9. kie-extend valkey stops on SIGTERM, leaving nothing -------------------------------------

def test_valkey_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([*CMD, "valkey", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                assert proc.poll() is None and time.monotonic() < deadline, "valkey did not start"
                time.sleep(0.1)
        # The process we started is the server itself: no child to leave behind.
        assert Path(f"/proc/{proc.pid}/exe").resolve().name.startswith("valkey-server")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(20)
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_connect_timeout=1).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_wait_on_a_job_still_in_the_broker_says_so_before_anything_else(
        make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]) -> None:
    """``enqueue --wait`` right after sending: no record yet, so the first line is "in the broker",
    never a ``not_found`` that reads like a lost job; ``not_found`` comes only after the grace."""
    from kie_extend.cli.errors import EXIT_NOT_FOUND
    from kie_extend.cli.commands import _wait

    code = _wait(make_settings(), "fresh-job-1", as_json=False, fresh=True, fresh_grace=1.0)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert code == EXIT_NOT_FOUND, out
    assert "in the broker, waiting for a worker" in lines[0] and "not_found" not in lines[0], lines
    assert len(lines) == 2 and "not_found" in lines[1], lines
    assert out.err.startswith("error: no job fresh-job-1")


def test_the_simulator_main_module_runs_only_as_a_script() -> None:
    """Importing ``kie_extend.simulator.__main__`` (docs tools, test collectors) starts nothing."""
    code = "import kie_extend.simulator.__main__ as m; print('imported', m.main.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported kie_extend.simulator.cli", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kie_extend.simulator", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
