"""``kie-extend dev``: the whole system in the foreground, a ``.env`` another shell sources, and
nothing left running after Ctrl-C or SIGTERM. Real processes throughout."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from kie_extend.cli.dev import env_file_text, handed_on
from test_demo import alive_in_groups, children_of

BIN = Path(sys.executable).parent


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class DevRun:
    """``kie-extend dev`` started in ``cwd`` with its output read line by line."""

    def __init__(self, cwd: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([str(BIN / "kie-extend"), "dev", *flags], cwd=cwd, env=env or _clean_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def read_until(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "dev exited early:\n" + "".join(self.out)
                continue
            self.out.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.out))

    def rest(self) -> str:
        while True:
            try:
                self.out.append(self.lines.get(timeout=1))
            except queue.Empty:
                return "".join(self.out)

    def groups(self) -> set[int]:
        """Process groups of every child (each runs in its own session)."""
        return {os.getpgid(p) for p in children_of(self.proc.pid)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _assert_all_gone(groups: set[int], url: str, cwd: Path) -> None:
    deadline = time.monotonic() + 10
    while (alive_in_groups(groups) or _running_in(cwd)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive_in_groups(groups), "a child of `kie-extend dev` is still running"
    assert not _running_in(cwd), "a process started by `kie-extend dev` is still running"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)


def test_dev_runs_the_stack_a_sourced_env_enqueues_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    # A project .env in the working directory is read by every process; the queue and prefix dev
    # pins (and writes to .dev/.env) must win over it, or workers and producers would drift apart.
    (tmp_path / ".env").write_text("KIE_QUEUE=elsewhere\nKIE_KEY_PREFIX=elsewhere\n")
    dev = DevRun(tmp_path, "--port", "0", "--sim-port", "0", "--redis-port", "0", "--sim-time-factor", "0.05")
    try:
        dash = dev.read_until(r"dashboard\s+(http://127\.0\.0\.1:\d+)/  token: (\S+)", 90)
        url, token = dash.group(1), dash.group(2)
        dev.read_until(r"Press Ctrl-C to stop everything", 30)
        printed = "".join(dev.out)
        for label in ("simulator", "API", "API docs", "callbacks", "redis", "env file"):
            assert re.search(rf"^  {label}\s+\S", printed, re.M), printed
        env_path = tmp_path / ".dev" / ".env"
        assert oct(env_path.stat().st_mode & 0o777) == "0o600"  # it holds the token
        groups = dev.groups()
        assert len(groups) >= 5, "Valkey, simulator, serve, worker and beat each run in their own group"

        # Another shell, exactly as printed: source the file, then use the CLI against the stack.
        script = ("set -e; set -a; . .dev/.env; set +a\n"
                  'kie-extend enqueue --upload-url "$KIE_BASE_URL/files/source/30s.mp3" --model V5 --custom '
                  "--instrumental --continue-at 12 --style 'ambient piano' --title Drift --wait\n")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_clean_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = done.stdout.splitlines()[0].strip()
        assert "succeeded" in done.stdout.splitlines()[-1], done.stdout
        # Python's enqueue_extend in a shell that sourced the same file.
        (tmp_path / "enqueue.py").write_text(
            "import os\nfrom kie_extend import enqueue_extend\n"
            "print(enqueue_extend({'uploadUrl': os.environ['KIE_BASE_URL'] + '/files/source/30s.mp3',\n"
            "                      'defaultParamFlag': False, 'model': 'V5', 'prompt': 'calm piano', 'continueAt': 8}))\n")
        # (a job still in the broker answers not_found: wait until a worker has recorded it)
        py = (f'set -e; set -a; . .dev/.env; set +a\nid=$({sys.executable} enqueue.py)\n'
              'for i in $(seq 100); do kie-extend status "$id" >/dev/null && break; sleep 0.2; done\n'
              'kie-extend status "$id" --wait\n')
        by_python = subprocess.run(["bash", "-c", py], cwd=tmp_path, env=_clean_env(), capture_output=True,
                                   text=True, timeout=120)
        assert by_python.returncode == 0 and "succeeded" in by_python.stdout.splitlines()[-1], \
            by_python.stdout + by_python.stderr
        # The same job through the printed API URL and token, and through `kie-extend status`.
        got = requests.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert got.status_code == 200 and got.json()["state"] == "succeeded", got.text
        status = subprocess.run(["bash", "-c", f"set -a; . .dev/.env; set +a; kie-extend status {job_id}"],
                                cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "succeeded" in status.stdout, status.stdout + status.stderr
        assert requests.get(f"{url}/docs", timeout=5).status_code == 200

        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(60) == 0, dev.rest()
    finally:
        dev.kill()
    assert "stopped" in dev.rest()
    _assert_all_gone(groups, url, tmp_path)


def test_dev_on_a_given_redis_uses_its_own_namespace_and_stops_every_child_on_sigterm(tmp_path: Path,
                                                                                      valkey: object) -> None:
    import redis

    url_of_redis = valkey.url  # type: ignore[attr-defined]
    env = {**_clean_env(), "KIE_REDIS_URL": url_of_redis}
    dev = DevRun(tmp_path, "--port", "0", "--sim-port", "0", "--workers", "2", env=env)
    try:
        url = dev.read_until(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", 90).group(1)
        dev.read_until(r"Press Ctrl-C", 30)
        printed = "".join(dev.out)
        assert "2 x concurrency 2, 1 beat" in printed and "keys and queue 'kie_extend_dev'" in printed
        written = (tmp_path / ".dev" / ".env").read_text()
        for line in (f"KIE_REDIS_URL='{url_of_redis}'", "KIE_KEY_PREFIX='kie_extend_dev'", "KIE_QUEUE='kie_extend_dev'"):
            assert line in written, written
        groups = dev.groups()
        assert len(groups) >= 5, "simulator, serve, two workers and beat (the Redis is not ours)"
        dev.proc.send_signal(signal.SIGTERM)
        assert dev.proc.wait(60) == 0, dev.rest()
    finally:
        dev.kill()
    _assert_all_gone(groups, url, tmp_path)
    assert redis.Redis.from_url(url_of_redis).ping(), "the given Redis is left running"


def test_handed_on_keeps_the_callers_settings_but_not_what_the_stack_sets() -> None:
    got = handed_on({"KIE_TENANTS_FILE": "t.toml", "KIE_ADMIN_TOKEN": "x" * 16, "KIE_PRICES": "extend=10",
                     "KIE_API_KEY": "real-key", "KIE_REDIS_URL": "redis://prod:6379/0", "KIE_QUEUE": "prod",
                     "KIE_API_TOKENS": "t" * 16, "PATH": "/bin"})
    assert got == {"KIE_TENANTS_FILE": "t.toml", "KIE_ADMIN_TOKEN": "x" * 16, "KIE_PRICES": "extend=10"}


def test_dev_with_a_tenants_file_takes_tenant_tokens_and_strict_mode(tmp_path: Path) -> None:
    """The README's two services under `kie-extend dev`: the file, strict mode and the tokens it
    reads with env: (KIE_ADMIN_TOKEN too) reach serve and the workers; the .env names the file."""
    (tmp_path / "tenants.toml").write_text('[admin]\ntokens = ["env:KIE_ADMIN_TOKEN"]\n'
                                           '[tenants.shop]\ntokens = ["env:SHOP_TOKEN"]\n'
                                           '[tenants.blog]\ntokens = ["env:BLOG_TOKEN"]\n')
    tokens = {"KIE_ADMIN_TOKEN": "a" * 24, "SHOP_TOKEN": "s" * 24, "BLOG_TOKEN": "b" * 24}
    env = {**_clean_env(), **tokens, "KIE_TENANTS_FILE": "tenants.toml", "KIE_TENANTS_STRICT": "true"}
    dev = DevRun(tmp_path, "--port", "0", "--sim-port", "0", "--redis-port", "0", "--sim-time-factor", "0.05",
                 env=env)
    try:
        url = dev.read_until(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", 90).group(1)
        dev.read_until(r"Press Ctrl-C", 30)
        written = (tmp_path / ".dev" / ".env").read_text()
        assert f"KIE_TENANTS_FILE='{tmp_path / 'tenants.toml'}'" in written and "KIE_TENANTS_STRICT='true'" in written
        assert "s" * 24 not in written and "a" * 24 not in written  # the tokens stay in the caller's shell
        sim = re.search(r"KIE_BASE_URL='([^']+)'", written).group(1)  # type: ignore[union-attr]
        body = {"request": {"uploadUrl": f"{sim}/files/source/30s.mp3", "model": "V5", "defaultParamFlag": True,
                            "instrumental": True, "continueAt": 12, "style": "ambient", "title": "Drift"}}
        shop = {"Authorization": f"Bearer {tokens['SHOP_TOKEN']}"}
        made = requests.post(f"{url}/v1/jobs", json=body, headers=shop, timeout=10)
        assert made.status_code in (200, 201, 202), made.text
        job = made.json()["job_id"]
        blog = {"Authorization": f"Bearer {tokens['BLOG_TOKEN']}"}
        assert requests.get(f"{url}/v1/jobs/{job}", headers=blog, timeout=5).status_code == 404
        admin = {"Authorization": f"Bearer {tokens['KIE_ADMIN_TOKEN']}"}
        assert requests.get(f"{url}/v1/tenants", headers=admin, timeout=5).status_code == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = requests.get(f"{url}/v1/jobs/{job}", headers=shop, timeout=5).json()
            if got["state"] == "succeeded":
                break
            time.sleep(0.3)
        assert got["state"] == "succeeded" and got["tenant"] == "shop", got
        # Another shell that sourced the .env (and has the tokens the file reads): strict mode there too.
        script = ("set -a; . .dev/.env; set +a\n"
                  'kie-extend enqueue --upload-url "$KIE_BASE_URL/files/source/30s.mp3" --model V5 --custom '
                  "--instrumental --continue-at 12 --style ambient --title Drift --tenant nobody\n")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**_clean_env(), **tokens},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "'nobody' is not a tenant" in done.stderr, done.stdout + done.stderr
        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(60) == 0, dev.rest()
    finally:
        dev.kill()


def test_a_child_that_dies_stops_the_rest_and_dev_exits_1_naming_its_log(tmp_path: Path) -> None:
    dev = DevRun(tmp_path, "--port", "0", "--sim-port", "0", "--redis-port", "0")
    try:
        url = dev.read_until(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", 90).group(1)
        dev.read_until(r"Press Ctrl-C", 30)
        groups = dev.groups()
        sim = [p for p in children_of(dev.proc.pid)
               if b"kie_extend.simulator" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(sim) == 1
        os.kill(sim[0], signal.SIGKILL)
        assert dev.proc.wait(60) == 1, dev.rest()
    finally:
        dev.kill()
    out = dev.rest()
    assert "error: simulator exited (code -9); see " in out and "simulator.log. Stopping everything." in out, out
    _assert_all_gone(groups, url, tmp_path)


def _running_in(cwd: Path) -> list[int]:
    """Live processes whose working directory is ``cwd`` (every child of dev inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "cwd") == str(cwd) and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_ctrl_c_while_starting_still_stops_everything(tmp_path: Path) -> None:
    dev = DevRun(tmp_path, "--port", "0", "--sim-port", "0", "--redis-port", "0")
    try:
        dev.read_until(r"kie-extend dev: starting", 30)
        time.sleep(1.0)  # some children are up, some not yet
        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(90) == 0, dev.rest()
    finally:
        dev.kill()
    assert "stopping every process" in dev.rest()
    deadline = time.monotonic() + 10
    while _running_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running_in(tmp_path), "a child started before Ctrl-C is still running"


def test_dev_refuses_a_taken_port_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([str(BIN / "kie-extend"), "dev", "--port", str(port), "--sim-port", "0",
                               "--redis-port", "0"], cwd=tmp_path, env=_clean_env(), capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {port} (serve) is in use: pass --port N, or --port 0" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / ".dev" / ".env").exists()


def test_env_file_is_read_alike_by_the_shell_and_the_settings(tmp_path: Path) -> None:
    from kie_extend.config import Settings

    values = {"KIE_REDIS_URL": "redis://127.0.0.1:6390/0", "KIE_API_TOKENS": "a-b_c", "KIE_QUEUE": "q 1"}
    path = tmp_path / ".env"
    path.write_text(env_file_text(values))
    shell = subprocess.run(["bash", "-c", f"set -a; . {path}; set +a; echo \"$KIE_QUEUE|$KIE_API_TOKENS\""],
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=10)
    assert shell.stdout.strip() == "q 1|a-b_c"
    settings = Settings(_env_file=str(path))
    assert settings.queue == "q 1" and settings.redis_url == "redis://127.0.0.1:6390/0"
    with pytest.raises(ValueError):
        env_file_text({"KIE_X": "it's"})


# -- README "Run it yourself": the manual commands, run as written -----------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
#: The documented ports; the test swaps each for a free one.
DOC_PORTS = ("6390", "8787", "8080")


def readme_commands(text: str) -> tuple[dict[str, str], list[list[str]]]:
    """The exported settings and the commands (argv lists, in order) of the README's marked
    "by hand" section: every ```bash block between the two run-it-yourself markers."""
    import shlex

    start = text.index("<!-- run-it-yourself:")
    end = text.index("<!-- run-it-yourself: end -->")
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], re.S)
    env: dict[str, str] = {}
    commands: list[list[str]] = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if argv[0] == "export":
                for assignment in argv[1:]:
                    name, _, value = assignment.partition("=")
                    env[name] = value
            else:
                commands.append(argv)
    return env, commands


def _wait_until(check: object, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()}"
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up:\n{log.read_text()}")


def test_readme_run_it_yourself_commands_work_as_written(tmp_path: Path) -> None:
    import redis

    from kie_extend.infra.embedded import free_port

    text = README.read_text()
    for port in DOC_PORTS:
        text = re.sub(rf"\b{port}\b", str(free_port()), text)
    exports, commands = readme_commands(text)
    assert set(exports) == {"KIE_REDIS_URL", "KIE_BASE_URL", "KIE_UPLOAD_BASE_URL", "KIE_API_KEY",
                            "KIE_ALLOW_PRIVATE_URLS", "KIE_CALLBACK_BASE_URL"}
    shape = [" ".join(c[:2]) if c[0] == "kie-extend" else " ".join(c[:1] + c[3:4]) if c[0] == "celery" else c[0]
             for c in commands]
    assert shape == ["kie-extend valkey", "kie-extend simulator", "kie-extend serve", "celery worker", "celery beat",
                     "kie-extend enqueue", "curl", "kie-extend enqueue"], shape
    services, foreground = commands[:5], commands[5:]
    env = {**_clean_env(), **exports}
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        checks = [
            lambda: redis.Redis.from_url(exports["KIE_REDIS_URL"], socket_connect_timeout=1).ping(),
            lambda: requests.get(exports["KIE_BASE_URL"] + "/_sim/stats", timeout=1).ok,
            lambda: requests.get(exports["KIE_CALLBACK_BASE_URL"] + "/healthz", timeout=1).ok,
            None, None,
        ]
        for i, (argv, check) in enumerate(zip(services, checks)):
            log = tmp_path / f"service{i}.log"
            # The valkey command is for shell 1, before the exports: it gets no KIE_ settings.
            proc = subprocess.Popen(argv, cwd=tmp_path, env=_clean_env() if i == 0 else env,
                                    stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            started.append((proc, log))
            if check is not None:
                _wait_until(check, argv[0], proc, log)
        for argv in foreground:
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
            logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in started)
            assert done.returncode == 0, argv[:2] + [done.stdout, done.stderr, logs]
            if argv[0] == "kie-extend":
                assert "succeeded" in done.stdout.splitlines()[-1], done.stdout
        assert "uploaded song.mp3" in done.stderr, done.stderr
        # Each one "keeps running until Ctrl-C": a terminal's Ctrl-C is SIGINT to the process group.
        for proc, log in started:
            assert proc.poll() is None, f"{log.name} stopped on its own:\n{log.read_text()}"
        for proc, _ in reversed(started):
            os.killpg(proc.pid, signal.SIGINT)
        for proc, log in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"Ctrl-C did not stop {log.name}") from None
    finally:
        for proc, _ in started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
