"""Ordinary mistakes and outages give one ``error:`` line and a documented exit code, never a
traceback (unless ``--debug`` or ``KIE_LOG_LEVEL=DEBUG``): every ``kie-extend`` command against a
closed port, a refused password, a missing or malformed file, bad ``--metadata``, a bad setting;
and ``celery -A kie_extend.worker worker|beat`` with a bad setting or no Redis. Real processes."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kie_extend.cli import errors as ce
from kie_extend.cli.commands import build_parser
from kie_extend.infra.embedded import EmbeddedValkey, free_port

PASSWORD = "pw-Secret-4711"
API_KEY = "test-key-0123456789abcdef"
CLOSED = free_port()  # nothing listens here during the tests
EXE = Path(sys.executable).with_name("kie-extend")
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "kie_extend.cli"]
REQUEST = {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
           "prompt": "a calm song", "continueAt": 5}


def env_with(**kie: str) -> dict[str, str]:
    """The environment without any KIE_* variable of the caller, plus ``kie``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_API_KEY": API_KEY, "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb",
                "KIE_QUEUE": "cli_errors_test", "KIE_KEY_PREFIX": "cli_errors_test", "PYTHONUNBUFFERED": "1"})
    env.update(kie)
    return env


def closed_env(**extra: str) -> dict[str, str]:
    url = f"redis://:{PASSWORD}@127.0.0.1:{CLOSED}/0"
    return env_with(KIE_REDIS_URL=url, KIE_BROKER_URL=url, KIE_BASE_URL=f"http://127.0.0.1:{CLOSED}", **extra)


def kie(*args: str, env: dict[str, str], cwd: Path, stdin: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


#: Runs ``kie_extend.cli.commands.main`` once per argv (JSON on stdin), each in its own forked process with
#: its own stdout/stderr and exit code: a whole sweep of commands pays for one interpreter start.
FORK_DRIVER = r"""
import json, os, sys, tempfile, traceback
from kie_extend.cli.commands import main
results = []
for argv in json.load(sys.stdin):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    status = os.waitpid(pid, 0)[1]
    out.seek(0)
    err.seek(0)
    results.append([os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()])
print(json.dumps(results))
"""


def kie_many(runs: list[list[str]], env: dict[str, str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Each argv of ``runs`` as its own process (forked from one that imported kie_extend once)."""
    driver = subprocess.run([sys.executable, "-c", FORK_DRIVER], input=json.dumps(runs), env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert driver.returncode == 0, driver.stderr
    return [subprocess.CompletedProcess(argv, code, out, err)
            for argv, (code, out, err) in zip(runs, json.loads(driver.stdout))]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line on stderr; fails on a traceback, a leaked secret or more lines."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert PASSWORD not in out and API_KEY not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    path = tmp_path / "songs.jsonl"
    path.write_text(json.dumps(REQUEST) + "\n")
    return path


# -- every command against a closed port ---------------------------------------------------------

#: Every subcommand that talks to the job store or broker, with arguments that get it that far.
STORE_COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "status JOB": ["status", "job-1"],
    "status JOB --wait": ["status", "job-1", "--wait"],
    "jobs": ["jobs"],
    "jobs --json": ["jobs", "--state", "failed", "--json"],
    "enqueue": ["enqueue", "--upload-url", "https://example.org/a.mp3", "--model", "V5", "--default-mode",
                "--prompt", "a calm song", "--continue-at", "5"],
    "enqueue FILE": ["enqueue", "{dir}/request.json", "--metadata", '{"order": 7}'],
    "retry": ["retry", "job-1"],
    "cancel": ["cancel", "job-1"],
    "cancel --batch": ["cancel", "--batch", "b-1"],
    "pause": ["pause", "--reason", "maintenance"],
    "resume": ["resume"],
    "dead-letters": ["dead-letters"],
    "dead-letters --replay": ["dead-letters", "--replay"],
    "doctor": ["doctor"],
    "batch submit": ["batch", "submit", "{dir}/songs.jsonl"],
    "batch status": ["batch", "status", "b-1"],
    "batch results": ["batch", "results", "b-1"],
    "batch list": ["batch", "list", "--json"],
    "usage": ["usage", "--since", "1h"],
    "audit": ["audit"],
}

#: Subcommands covered elsewhere in this file, or that need no job store at all.
OTHER_COMMANDS = {
    "credits": "the provider: test_credits_with_the_provider_unreachable",
    "openapi": "no server at all: test_openapi_to_an_unwritable_file",
    "serve": "a server: starts anyway and warns, test_serve_starts_and_says_the_job_store_is_unreachable",
    "callback-server": "a server: port in use, test_a_port_in_use",
    "simulator": "the provider simulator, needs no job store",
    "demo": "runs its own embedded Valkey, worker and simulator",
    "dev": "runs its own embedded stack, like demo",
    "valkey": "is the job store itself (execs valkey-server): test_valkey_stops_on_sigterm",
    "tenant": "reads the tenants file first: test_tenant_commands_with_the_job_store_unreachable",
}


def test_the_tables_name_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    covered = {name.split()[0] for name in STORE_COMMANDS} | set(OTHER_COMMANDS)
    assert set(sub.choices) <= covered, set(sub.choices) - covered
    batch = sub.choices["batch"]
    bsub = next(a for a in batch._actions if isinstance(a, argparse._SubParsersAction))
    assert set(bsub.choices) <= {name.split()[1] for name in STORE_COMMANDS if name.startswith("batch ")}


def test_every_command_with_the_job_store_unreachable(tmp_path: Path, batch_file: Path) -> None:
    (tmp_path / "request.json").write_text(json.dumps(REQUEST))
    runs = [[a.replace("{dir}", str(tmp_path)) for a in args] for args in STORE_COMMANDS.values()]
    for name, proc in zip(STORE_COMMANDS, kie_many(runs, closed_env(), tmp_path)):
        line = one_error_line(proc)
        assert proc.returncode == ce.EXIT_UNREACHABLE == 6, (name, proc.returncode, line)
        assert line == (f"error: cannot use the job store and broker (KIE_REDIS_URL=redis://:***@127.0.0.1:"
                        f"{CLOSED}/0): connection refused (nothing listens there); start Redis there or point "
                        "KIE_REDIS_URL at a running server"), (name, line)


def test_tenant_commands_with_the_job_store_unreachable(tmp_path: Path) -> None:
    """With a tenants file, listing and changing tenants need the job store: the same one line, exit 6."""
    (tmp_path / "tenants.toml").write_text('[tenants.shop]\ntokens = ["shop-token-0123456789"]\n')
    env = closed_env(KIE_TENANTS_FILE=str(tmp_path / "tenants.toml"))
    runs = [["tenant", "list"], ["tenant", "set", "shop", "--weight", "2"]]
    for proc in kie_many(runs, env, tmp_path):
        line = one_error_line(proc)
        assert proc.returncode == ce.EXIT_UNREACHABLE, (proc.args, proc.returncode, line)
        assert line.startswith("error: cannot use the job store and broker (KIE_REDIS_URL=redis://:***@"), line
        assert "shop-token-0123456789" not in proc.stdout + proc.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    procs = [kie("--debug", "jobs", env=closed_env(), cwd=tmp_path)]
    procs += kie_many([["batch", "list", "--debug"], ["doctor", "--debug"]], closed_env(), tmp_path)
    procs += kie_many([["doctor"]], closed_env(KIE_LOG_LEVEL="debug"), tmp_path)
    for proc in procs:
        assert proc.returncode == 6, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr and "ConnectionError" in proc.stderr, proc.args
        assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot use the job store"), proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr


# -- broker apart from the job store, refused passwords --------------------------------------------

@pytest.fixture(scope="module")
def locked() -> Iterator[EmbeddedValkey]:
    """A private Valkey that wants PASSWORD (set after start: start() pings without one)."""
    server = EmbeddedValkey().start()
    redis.Redis(port=server.port).config_set("requirepass", PASSWORD)
    yield server
    server.stop()


def test_broker_unreachable_names_the_broker(locked: EmbeddedValkey, tmp_path: Path, batch_file: Path) -> None:
    store = f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"
    env = env_with(KIE_REDIS_URL=store, KIE_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:{CLOSED}/0")
    for args in (STORE_COMMANDS["enqueue"], ["batch", "submit", str(batch_file), "--batch-id", "broker-down"]):
        proc = kie(*args, env=env, cwd=tmp_path)
        line = one_error_line(proc)
        assert proc.returncode == 6
        assert line.startswith(f"error: cannot use the broker (KIE_BROKER_URL=redis://:***@127.0.0.1:{CLOSED}/0): "
                               "connection refused"), line
    amqp = env_with(KIE_REDIS_URL=store, KIE_BROKER_URL=f"amqp://guest:{PASSWORD}@127.0.0.1:{CLOSED}//")
    proc = kie(*STORE_COMMANDS["enqueue"], env=amqp, cwd=tmp_path)
    assert proc.returncode == 6
    assert one_error_line(proc).startswith(f"error: cannot use the broker (KIE_BROKER_URL=amqp://guest:***@127.0.0.1:"
                                           f"{CLOSED}//): connection refused")


def test_a_refused_password_is_named_and_masked(locked: EmbeddedValkey, tmp_path: Path) -> None:
    wrong = f"redis://:wrong-{PASSWORD}@127.0.0.1:{locked.port}/0"
    for url, shown in ((wrong, f"redis://:***@127.0.0.1:{locked.port}/0"),
                       (f"redis://127.0.0.1:{locked.port}/0", f"redis://127.0.0.1:{locked.port}/0")):
        proc = kie("status", env=env_with(KIE_REDIS_URL=url), cwd=tmp_path)
        line = one_error_line(proc)
        assert proc.returncode == 6 and "wrong-" not in proc.stderr
        assert line == (f"error: cannot use the job store and broker (KIE_REDIS_URL={shown}): it refused the "
                        "credentials; check the user and password in KIE_REDIS_URL (percent-encode special "
                        "characters)"), line
    good = f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"
    proc = kie("enqueue", *STORE_COMMANDS["enqueue"][1:], env=env_with(
        KIE_REDIS_URL=good, KIE_BROKER_URL=f"redis://:nope@127.0.0.1:{locked.port}/1"), cwd=tmp_path)
    assert proc.returncode == 6
    assert one_error_line(proc).startswith(f"error: cannot use the broker (KIE_BROKER_URL=redis://:***@127.0.0.1:"
                                           f"{locked.port}/1): it refused the credentials")


def test_an_unexpected_error_points_to_debug(locked: EmbeddedValkey, tmp_path: Path) -> None:
    from kie_extend.store.keys import Keys

    client = redis.Redis(port=locked.port, password=PASSWORD)
    client.set(Keys("cli_errors_test").job("wrong-type"), "not a hash")  # WRONGTYPE: no outage, a broken store
    env = env_with(KIE_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0")
    proc = kie("status", "wrong-type", env=env, cwd=tmp_path)
    assert proc.returncode == ce.EXIT_INTERNAL == 70
    line = one_error_line(proc)
    assert line.startswith("error: unexpected ResponseError: WRONGTYPE") and line.endswith(
        "(a bug: run again with --debug for the traceback and report it)"), line
    debug = kie("status", "wrong-type", "--debug", env=env, cwd=tmp_path)
    assert debug.returncode == 70 and "Traceback" in debug.stderr


def test_a_sentinel_without_that_master(locked: EmbeddedValkey, tmp_path: Path) -> None:
    from kie_extend.infra.embedded import EmbeddedSentinel

    with EmbeddedSentinel(locked.port, quorum=1) as sentinel:
        env = env_with(KIE_REDIS_URL=f"sentinel://:{PASSWORD}@127.0.0.1:{sentinel.port}/0",
                       KIE_SENTINEL_MASTER="not-monitored")
        proc = kie("jobs", env=env, cwd=tmp_path)
    assert proc.returncode == 6
    assert one_error_line(proc) == (
        f"error: cannot use the job store and broker (KIE_REDIS_URL=sentinel://:***@127.0.0.1:{sentinel.port}/0): "
        "the sentinels name no such master; check KIE_SENTINEL_MASTER (the name the sentinels monitor) and the "
        "sentinels in KIE_REDIS_URL")


# -- files and flags -----------------------------------------------------------------------------

def test_bad_request_files_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"model": "V5",,}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes(b'{"title": "caf\xe9"}')
    (tmp_path / "ok.json").write_text(json.dumps(REQUEST))
    cases = [
        (["enqueue", "missing.json"], r"error: request file missing\.json does not exist; give the path of a JSON "
                                      r"file, or '-' for stdin"),
        (["enqueue", "broken.json"], r"error: request file broken\.json is not valid JSON \(Expecting property "
                                     r"name enclosed in double quotes at line 1 column 16\); it must be one JSON "
                                     r"object such as \{\"order\": 42\}"),
        (["enqueue", "list.json"],
         r"error: request file list\.json must hold a JSON object \{\.\.\.\}, not a JSON list"),
        (["enqueue", "latin1.json"], r"error: request file latin1\.json is not UTF-8 text; save it as UTF-8 JSON"),
        (["enqueue", "."], r"error: cannot read request file \.: Is a directory"),
        (["enqueue", "ok.json", "--metadata", "{order: 7}"], r"error: --metadata is not valid JSON \(Expecting "
                                                              r"property name enclosed in double quotes .*"),
        (["enqueue", "ok.json", "--metadata", '"just text"'], r"error: --metadata must hold a JSON object \{\.\.\.\}, "
                                                               r"not a JSON str"),
        (["batch", "submit", "missing.csv"], r"error: cannot read missing\.csv: No such file or directory"),
        (["batch", "submit", "latin1.json"], r"error: latin1\.json is not UTF-8 text \(byte \d+\); save it as UTF-8"),
        (["openapi", "--out", "no/such/dir/openapi.json"],
         r"error: cannot open no/such/dir/openapi\.json: No such file or directory"),
    ]
    procs = kie_many([args for args, _ in cases], closed_env(), tmp_path)
    for (args, pattern), proc in zip(cases, procs):
        line = one_error_line(proc)
        assert proc.returncode == ce.EXIT_USAGE == 2, (args, proc.returncode, line)
        assert re.fullmatch(pattern, line), (args, line)
    piped = kie("enqueue", "-", env=closed_env(), cwd=tmp_path, stdin="not json")
    assert piped.returncode == 2 and "request file - is not valid JSON" in one_error_line(piped)


def test_an_upload_with_the_file_host_unreachable(tmp_path: Path) -> None:
    import wave

    with wave.open(str(tmp_path / "song.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 8000 * 20)
    env = closed_env(KIE_UPLOAD_BASE_URL=f"http://127.0.0.1:{CLOSED}", KIE_ALLOW_PRIVATE_URLS="true")
    proc = kie("enqueue", "--file", "song.wav", "--model", "V5", "--default-mode", "--prompt", "a calm song",
               "--continue-at", "5", env=env, cwd=tmp_path)
    assert proc.returncode == ce.EXIT_PROVIDER == 7, proc.stderr
    assert one_error_line(proc) == (f"error: upload failed: could not connect to http://127.0.0.1:{CLOSED}; "
                                    "check KIE_UPLOAD_BASE_URL and the network")


def test_openapi_to_an_unwritable_file(tmp_path: Path) -> None:
    proc = kie("openapi", "--out", str(tmp_path), env=closed_env(), cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc) == f"error: cannot open {tmp_path}: Is a directory"


# -- settings ------------------------------------------------------------------------------------

def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text(json.dumps(REQUEST))
    commands = [[a.replace("{dir}", str(tmp_path)) for a in args] for args in STORE_COMMANDS.values()]
    commands += [["credits"], ["serve", "--port", "0"], ["callback-server", "--port", "0"]]
    tick = closed_env(KIE_TICK_INTERVAL="-1")
    url = env_with(KIE_REDIS_URL=f"redis://:{PASSWORD}#x@127.0.0.1:{CLOSED}/0")
    for env, name in ((tick, "KIE_TICK_INTERVAL"), (url, "KIE_REDIS_URL")):
        procs = [kie("status", env=env, cwd=tmp_path)] + kie_many(commands, env, tmp_path)
        for proc in procs:
            assert proc.returncode == ce.EXIT_CONFIG == 5, (proc.args, proc.stderr)
            assert one_error_line(proc).startswith(f"error: invalid configuration: {name}: "), (proc.args, proc.stderr)


# -- the provider, servers -----------------------------------------------------------------------

def test_credits_with_the_provider_unreachable(tmp_path: Path) -> None:
    proc = kie("credits", env=closed_env(), cwd=tmp_path)
    assert proc.returncode == ce.EXIT_PROVIDER == 7, proc.stderr
    assert one_error_line(proc) == (f"error: cannot reach KIE (could not connect to http://127.0.0.1:{CLOSED}); "
                                    f"check KIE_BASE_URL (now http://127.0.0.1:{CLOSED}) and the network")


@pytest.mark.parametrize("command", ["serve", "callback-server"])
def test_a_port_in_use(command: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = kie(command, "--port", str(port), env=closed_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors and errors[-1].startswith("error: ") and ("in use" in proc.stderr), proc.stderr
    # No "serve on http://..." banner before the error: it is printed once the port listens.
    assert "kie-extend serve on" not in proc.stdout + proc.stderr and proc.stdout == "", proc.stdout
    # The hint names only flags this command has (callback-server has no --callback-port).
    assert errors[-1] == f"error: {command} could not start (see the line above); choose a free --port"
    if command == "callback-server":
        assert "\nnote: callback-server is `kie-extend serve --callbacks-only`" in proc.stderr


def test_a_callback_host_without_a_callback_port_is_a_usage_error(tmp_path: Path) -> None:
    proc = kie("serve", "--callbacks-only", "--callback-host", "0.0.0.0", env=closed_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc) == ("error: --callback-host needs --callback-port; with --callbacks-only the "
                                    "callbacks listen on --host/--port")
    proc = kie("serve", "--callback-host", "0.0.0.0", env=closed_env(), cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc) == "error: --callback-host needs --callback-port"


@pytest.mark.parametrize("command", ["serve", "callback-server"])
def test_server_help_explains_host_and_port(command: str, tmp_path: Path) -> None:
    out = " ".join(kie(command, "--help", env=closed_env(), cwd=tmp_path).stdout.split())
    assert "--host HOST address to listen on (default 127.0.0.1" in out, out
    assert "--port PORT port to listen on (default 8080)" in out, out
    assert ("--callback-port" in out) == (command == "serve"), out


def test_callbacks_only_with_a_callback_port_is_a_usage_error(tmp_path: Path) -> None:
    proc = kie("serve", "--callbacks-only", "--callback-port", str(CLOSED), env=closed_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc) == ("error: --callbacks-only serves the callbacks on --host/--port; "
                                    "leave out --callback-port")


def test_serve_starts_and_says_the_job_store_is_unreachable(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    port = free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen([*CMD, "serve", "--port", str(port)], env=closed_env(), cwd=tmp_path,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "kie-extend serve on" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            out = log.read_text()
            assert "kie-extend serve on" in out, out
            assert (f"job store and broker (KIE_REDIS_URL) (redis://:***@127.0.0.1:{CLOSED}/0) is not reachable: "
                    "connection refused") in out, out
            assert "Traceback" not in out and PASSWORD not in out
        finally:
            proc.terminate()
            proc.wait(20)


# -- Celery worker and beat ----------------------------------------------------------------------

CELERY = {
    "worker": [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "worker", "-c", "1", "-P", "solo",
               "-Q", "cli_errors_test", "--without-gossip", "--without-mingle"],
    "beat": [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "beat", "-s", "{dir}/schedule"],
}


@pytest.mark.parametrize("process", list(CELERY))
def test_celery_with_a_bad_setting_prints_our_line(process: str, tmp_path: Path) -> None:
    args = [a.replace("{dir}", str(tmp_path)) for a in CELERY[process]]
    for env, variable in ((closed_env(KIE_LEASE="1s"), "KIE_LEASE must be longer"),
                          (closed_env(KIE_HANDLERS="redis_stream,webhook"), "KIE_HANDLERS includes 'webhook'"),
                          (env_with(KIE_REDIS_URL=f"redis://:{PASSWORD}@host:port/0"), "KIE_REDIS_URL")):
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 5, proc.stdout + proc.stderr
        line = one_error_line(proc)
        assert line.startswith("error: invalid configuration: ") and variable in line, line
    debug = subprocess.run(args, env=closed_env(KIE_LEASE="1s", KIE_LOG_LEVEL="DEBUG"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert debug.returncode == 5 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: invalid configuration: ")


@pytest.mark.parametrize("process", list(CELERY))
def test_celery_with_redis_unreachable_says_so(process: str, tmp_path: Path) -> None:
    args = [a.replace("{dir}", str(tmp_path)) for a in CELERY[process]]
    log = tmp_path / "celery.log"
    want = (f"job store and broker (KIE_REDIS_URL) (redis://:***@127.0.0.1:{CLOSED}/0) is not reachable: "
            "connection refused (nothing listens there); start Redis there or point KIE_REDIS_URL at a running server")
    with log.open("w") as fh:
        proc = subprocess.Popen(args, env=closed_env(), cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and want not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            out = log.read_text()
            assert want in out, out[-3000:]
            assert PASSWORD not in out
        finally:
            proc.terminate()
            proc.wait(30)


# -- the classifier itself (no process) ----------------------------------------------------------

def test_mask_text_hides_passwords_and_the_key() -> None:
    from kie_extend.config import Settings

    s = Settings(_env_file=None, redis_url=f"redis://:{PASSWORD}@10.0.0.1:6379/0", api_key=API_KEY)
    text = f"boom redis://u:{PASSWORD}@h:1/0 key={API_KEY} raw {PASSWORD}"
    assert ce.mask_text(text, s) == "boom redis://u:***@h:1/0 key=*** raw ***"
