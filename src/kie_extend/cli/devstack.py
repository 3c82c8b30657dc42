"""A whole local system in child processes: Valkey, simulator, ``serve``, workers, beat.

Used by ``kie-extend demo``, the end-to-end and fault tests and the benchmarks, so all three run
exactly the commands the README shows. Every child runs in its own process group and is stopped
(or killed) by :meth:`DevStack.close`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import requests

from kie_extend.config import Settings, load_settings
from kie_extend.infra.embedded import EmbeddedValkey, die_with_parent, free_port


class Child:
    """One child process with its log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.log: IO[bytes] = open(log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group (a worker and its pool children)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stray pool children, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()

    def restart(self) -> None:
        """Start the same command again."""
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)


def _wait_http(url: str, timeout: float, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early; see {child.log_path}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{child.name} did not answer at {url}; see {child.log_path}")


class DevStack:
    """Starts and stops the parts of a local kie-extend system."""

    def __init__(self, workdir: str | Path, *, redis_url: str | None = None, appendonly: bool = False,
                 env: dict[str, str] | None = None, key_prefix: str | None = None,
                 valkey_port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.valkey: EmbeddedValkey | None = None
        if redis_url is None:
            self.valkey = EmbeddedValkey(str(self.workdir / "valkey"), appendonly=appendonly,
                                         port=valkey_port).start()
            redis_url = self.valkey.url
        self.redis_url = redis_url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
        self.env.update({"KIE_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"})
        if key_prefix:
            self.env["KIE_KEY_PREFIX"] = key_prefix
        self.env.update(env or {})
        self.children: list[Child] = []
        self.sim_url: str | None = None
        self.workers: list[Child] = []
        self.beats: list[Child] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, args, {**self.env, **(env or {})}, self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    def settings(self, **overrides: object) -> Settings:
        """Settings as the children see them (for producers and checks in this process)."""
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(self.env)
            return load_settings(**overrides)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start_simulator(self, *flags: str, command: list[str] | None = None, port: int | None = None) -> str:
        """Start the provider simulator (or ``command``, a compatible one) on ``port`` (default: a
        free one); its URL becomes ``KIE_BASE_URL`` and ``KIE_UPLOAD_BASE_URL`` (it hosts uploads
        too) for what starts later."""
        port = port or free_port()
        command = command or [sys.executable, "-m", "kie_extend.simulator"]
        child = self._spawn("simulator", [*command, "--port", str(port), *flags])
        self.sim_url = f"http://127.0.0.1:{port}"
        _wait_http(self.sim_url + "/_sim/stats", 30, child)
        self.env.update({"KIE_BASE_URL": self.sim_url, "KIE_UPLOAD_BASE_URL": self.sim_url})
        self.env.setdefault("KIE_API_KEY", "sim-key")
        self.env.setdefault("KIE_ALLOW_PRIVATE_URLS", "true")
        return self.sim_url

    def start_serve(self, tokens: str | Sequence[str] | None = None, port: int | None = None,
                    callbacks_only: bool = False) -> str:
        """Start ``kie-extend serve`` (callbacks, the /v1 API, the dashboard; ``callbacks_only``:
        ``serve --callbacks-only``) on a free loopback port; its URL (``http://127.0.0.1:PORT``)
        becomes ``KIE_CALLBACK_BASE_URL`` for what starts later.

        ``tokens`` (one string, a comma list, or a sequence; ``read:`` marks a read-only one) is set
        as ``KIE_API_TOKENS`` for this child only, so no other child or log sees it. ``port``:
        default a free one. Raises RuntimeError when the server exits early or does not answer
        ``/healthz`` within 30 s."""
        port = port or free_port()
        env: dict[str, str] = {}
        if tokens:
            env["KIE_API_TOKENS"] = tokens if isinstance(tokens, str) else ",".join(tokens)
        child = self._spawn("serve", [sys.executable, "-m", "kie_extend.cli.main", "serve", "--host", "127.0.0.1",
                                      "--port", str(port), *(["--callbacks-only"] if callbacks_only else [])],
                            env=env)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/healthz", 30, child)
        self.env["KIE_CALLBACK_BASE_URL"] = url
        return url

    def start_worker(self, concurrency: int = 2, name: str | None = None, pool: str = "prefork") -> Child:
        """Start one Celery worker (``celery -A kie_extend.worker worker``)."""
        name = name or f"worker{len(self.workers) + 1}"
        queue = self.env.get("KIE_QUEUE", "kie_extend")
        child = self._spawn(name, [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "worker",
                                   "-c", str(concurrency), "-P", pool, "-Q", queue, "-n", f"{name}@%h",
                                   "--without-gossip", "--without-mingle", "--loglevel", "INFO"])
        self.workers.append(child)
        return child

    def start_beat(self) -> Child:
        """Start one beat (``celery -A kie_extend.worker beat``); several are safe."""
        name = f"beat{len(self.beats) + 1}"
        child = self._spawn(name, [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "beat",
                                   "-s", str(self.workdir / f"{name}-schedule"), "--loglevel", "WARNING"])
        self.beats.append(child)
        return child

    def sim_stats(self) -> dict[str, object]:
        """The simulator's counters."""
        assert self.sim_url
        return requests.get(self.sim_url + "/_sim/stats", timeout=5).json()  # type: ignore[no-any-return]

    def sim_config(self, **changes: object) -> dict[str, object]:
        """Change simulator knobs at run time."""
        assert self.sim_url
        return requests.post(self.sim_url + "/_sim/config", json=changes, timeout=5).json()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop every child (workers first), then the embedded Valkey."""
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception:
                pass
        if self.valkey is not None:
            self.valkey.stop()

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
