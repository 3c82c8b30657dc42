"""``kie-extend dev``: the whole system in the foreground for development, until Ctrl-C.

It starts what ``kie-extend demo`` starts (an embedded Valkey unless ``KIE_REDIS_URL`` is set, the
provider simulator, ``kie-extend serve``, Celery workers and one beat; see :mod:`.devstack`), prints
every URL, and writes a ``.env`` file that another shell sources to use the running system::

    set -a; . .dev/.env; set +a
    kie-extend enqueue --upload-url "$KIE_BASE_URL/files/source/30s.mp3" ... --wait

It stays up until SIGINT (Ctrl-C) or SIGTERM and then stops every child it started; a child that
dies on its own stops the rest too (exit 1, naming the child and its log).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from collections.abc import Mapping
from typing import TextIO

from kie_extend.cli.devstack import DevStack

#: Default ports (0 = any free port); fixed so bookmarks and a sourced .env survive a restart.
DEFAULT_SERVE_PORT = 8080
DEFAULT_SIM_PORT = 8787
DEFAULT_REDIS_PORT = 6390
#: Key prefix and queue used on a Redis the user gave (KIE_REDIS_URL), so jobs of a real
#: deployment on the same Redis are never taken by these workers and sent to the simulator.
EXTERNAL_NAMESPACE = "kie_extend_dev"
#: The sample source file the simulator hosts (for a first enqueue).
SAMPLE_SOURCE = "/files/source/30s.mp3"
#: Settings the stack sets itself: a caller's own value of one of these is not handed on (the
#: stack's Redis, broker, simulator, callback URL, token and namespace win, and a real
#: ``KIE_API_KEY`` never goes to the simulator).
DEV_OWNED = frozenset({"KIE_REDIS_URL", "KIE_BROKER_URL", "KIE_SENTINEL_MASTER", "KIE_SENTINEL_PASSWORD",
                       "KIE_KEY_PREFIX", "KIE_QUEUE", "KIE_BASE_URL", "KIE_UPLOAD_BASE_URL", "KIE_API_KEY",
                       "KIE_ALLOW_PRIVATE_URLS", "KIE_CALLBACK_BASE_URL", "KIE_API_TOKENS", "KIE_DEV_URL"})
#: Handed-on settings a producer in another shell needs too, so they go into the ``.env``.
PRODUCER_SETTINGS = ("KIE_TENANTS_FILE", "KIE_TENANTS_STRICT", "KIE_DEFAULT_TENANT", "KIE_PRICES")


class DevError(Exception):
    """The development stack could not start (a port taken, a child that did not come up)."""


class _Stop(Exception):
    """Raised by the signal handler to leave the wait loop."""


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (and we may bind it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _check_ports(ports: dict[str, tuple[int, str]]) -> None:
    """Raise DevError naming the option for every requested port that is taken."""
    taken = [f"port {port} ({what}) is in use: pass {flag} N, or {flag} 0 for any free port"
             for what, (port, flag) in ports.items() if port and not port_free(port)]
    if taken:
        raise DevError("; ".join(taken))


def env_file_text(values: dict[str, str], path: str | Path = ".dev/.env") -> str:
    """The ``.env`` text: one ``NAME=value`` a line, values single-quoted for the shell.

    Both ``set -a; . FILE`` in a POSIX shell and the settings' own ``.env`` reader (python-dotenv)
    read it the same way. ``path`` is where the file goes, named in its header comment (quoted
    for the shell)."""
    import shlex

    lines = [f"# written by `kie-extend dev`; use it from another shell with:  set -a; . {shlex.quote(str(path))}; "
             "set +a"]
    for name, value in values.items():
        if "'" in value or "\n" in value:
            raise ValueError(f"{name}: a value with a quote or newline cannot be written")
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + "\n"


def handed_on(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's own ``KIE_*`` variables every child gets (``KIE_TENANTS_FILE``,
    ``KIE_TENANTS_STRICT``, ``KIE_PRICES``, …, and variables a tenants file reads with ``env:``
    such as ``KIE_ADMIN_TOKEN``): every one but :data:`DEV_OWNED`. ``{name: value}``."""
    return {k: v for k, v in environ.items() if k.startswith("KIE_") and k not in DEV_OWNED}


def run_dev(*, workdir: str | Path = ".dev", port: int = DEFAULT_SERVE_PORT, sim_port: int = DEFAULT_SIM_PORT,
            redis_port: int = DEFAULT_REDIS_PORT, sim_time_factor: float = 0.1, workers: int = 1,
            concurrency: int = 2, out: TextIO | None = None) -> int:
    """Start the development stack, print its URLs and ``.env``, wait for SIGINT/SIGTERM, stop it.

    ``workdir``: where the ``.env``, the logs (``NAME.log``), the embedded Valkey's data and beat's
    schedule go. Ports: 0 picks a free one. ``sim_time_factor`` scales the simulator's generation
    times (0.1: a ~65 s generation takes ~6.5 s). ``workers``: worker processes of ``concurrency``
    each.

    Returns 0 after a clean stop by signal, 1 when a child died or did not start, 2 for a taken
    port. Every child is stopped before it returns, whatever happened."""
    out = out or sys.stdout
    workdir = Path(workdir).resolve()
    external = os.environ.get("KIE_REDIS_URL")
    stop_reason: list[str] = []
    waiting = [False]

    def _on_signal(signum: int, frame: object) -> None:
        # While children start, only note it (an exception there could orphan a half-started
        # child); the start-up checks the note after each step's end.
        stop_reason.append(signal.Signals(signum).name)
        if waiting[0]:
            raise _Stop

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack: DevStack | None = None
    try:
        try:
            _check_ports({"serve": (port, "--port"), "simulator": (sim_port, "--sim-port"),
                          **({} if external else {"embedded Valkey": (redis_port, "--redis-port")})})
        except DevError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        workdir.mkdir(parents=True, exist_ok=True)
        print("kie-extend dev: starting " + (f"on the Redis in KIE_REDIS_URL (keys and queue {EXTERNAL_NAMESPACE!r})"
                                             if external else "an embedded Valkey"), file=out, flush=True)
        # Pinned (and written to the .env) so a .env in the working directory, which every process
        # also reads, cannot send workers and producers to different queues.
        ns = EXTERNAL_NAMESPACE if external else "kie_extend"
        namespace = {"KIE_KEY_PREFIX": ns, "KIE_QUEUE": ns}
        own = handed_on(os.environ)
        if own.get("KIE_TENANTS_FILE"):  # absolute, so the .env works from any directory
            own["KIE_TENANTS_FILE"] = str(Path(own["KIE_TENANTS_FILE"]).resolve())
        stack = DevStack(workdir, redis_url=external, env={**own, **namespace}, valkey_port=redis_port or None)
        sim = stack.start_simulator("--time-factor", str(sim_time_factor), port=sim_port or None)
        token = secrets.token_urlsafe(18)
        serve = stack.start_serve(tokens=[token], port=port or None)
        for _ in range(max(1, workers)):
            stack.start_worker(concurrency=concurrency)
        stack.start_beat()
        values = {
            "KIE_REDIS_URL": stack.redis_url,
            **namespace,
            "KIE_BASE_URL": sim,
            "KIE_UPLOAD_BASE_URL": sim,
            "KIE_API_KEY": stack.env["KIE_API_KEY"],
            "KIE_ALLOW_PRIVATE_URLS": "true",
            "KIE_CALLBACK_BASE_URL": serve,
            "KIE_API_TOKENS": token,
            "KIE_DEV_URL": serve,
            **{name: own[name] for name in PRODUCER_SETTINGS if name in own},
        }
        env_path = workdir / ".env"
        fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the token
        with os.fdopen(fd, "w") as fh:
            fh.write(env_file_text(values, env_path))
        os.chmod(env_path, 0o600)
        _print_summary(out, values, sim, serve, token, env_path, workdir, sim_time_factor,
                       len(stack.workers), concurrency)
        waiting[0] = True
        if stop_reason:
            raise _Stop
        while True:
            for child in stack.children:
                if not child.alive():
                    print(f"error: {child.name} exited (code {child.proc.returncode}); see {child.log_path}. "
                          "Stopping everything.", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.5)
    except _Stop:
        print(f"\nkie-extend dev: {stop_reason[0] if stop_reason else 'signal'} received, stopping every process",
              file=out, flush=True)
        return 0
    except RuntimeError as exc:  # a child that did not come up (DevStack names its log)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Stopping must not be cut short by a second Ctrl-C.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if stack is not None:
            stack.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stack is not None:
            print("kie-extend dev: stopped", file=out, flush=True)


def _print_summary(out: TextIO, values: dict[str, str], sim: str, serve: str, token: str, env_path: Path,
                   workdir: Path, time_factor: float, workers: int, concurrency: int) -> None:
    rows = [
        ("simulator", f"{sim}  (the provider; also hosts uploads; time factor {time_factor})"),
        ("dashboard", f"{serve}/  token: {token}"),
        ("API", f"{serve}/v1  (Authorization: Bearer {token})"),
        ("API docs", f"{serve}/docs"),
        ("callbacks", f"{serve}/kie/callback/{{job_id}}  (KIE_CALLBACK_BASE_URL={serve})"),
        ("metrics", f"{serve}/metrics"),
        ("redis", values["KIE_REDIS_URL"]),
        ("workers", f"{workers} x concurrency {concurrency}, 1 beat"),
        ("logs", f"{workdir}/*.log"),
        ("env file", str(env_path)),
    ]
    for name, text in rows:
        print(f"  {name:<10} {text}", file=out)
    print(f"\n--- {env_path} ---", file=out)
    print("".join(line + "\n" for line in env_file_text(values, env_path).splitlines()[1:]), end="", file=out)
    print("---\nIn another shell:\n"
          f"  set -a; . {env_path}; set +a\n"
          f"  kie-extend enqueue --upload-url \"$KIE_BASE_URL{SAMPLE_SOURCE}\" --model V5 --custom --instrumental \\\n"
          "      --continue-at 12 --style 'ambient piano' --title Drift --wait\n"
          "Press Ctrl-C to stop everything.", file=out, flush=True)
