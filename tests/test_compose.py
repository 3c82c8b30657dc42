"""docker-compose.yml without a Docker engine: the file is parsed and interpolated as Compose would
(``${VAR:-default}``, ``${VAR:?error}``, the ``<<`` merges), and each service of the demo profile
runs its own ``command`` with its own ``environment`` as a real process on loopback. Compose's
host names (``redis``, ``simulator``, ``serve``) become 127.0.0.1, container ports become free
ports, and the redis service is an embedded Valkey started with the service's own options. A job
enqueued with the Python API then has to succeed through them: the workers submit to the
simulator, the simulator calls back ``serve``, the beat ticks, and ``serve`` answers ``/v1`` with
the token from the environment."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kie_extend.api import enqueue_extend, get_job
from kie_extend.config import Settings
from kie_extend.cli.devstack import Child, _wait_http
from kie_extend.infra.embedded import EmbeddedValkey, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEMO_ENV = ROOT / "deploy" / "demo.env"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)|\$\$")


class InterpolationError(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty (Compose refuses to start)."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution of one string."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        if op in (":-", ":?"):
            missing = not have
        else:
            missing = have is None
        if op in (":-", "-"):
            return arg if missing else str(have)
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return str(have)
        return have or ""

    return _VAR.sub(sub, value)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml with its merges resolved and ``env`` substituted."""
    return _walk(yaml.safe_load(COMPOSE.read_text()), env)  # type: ignore[no-any-return]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose env file (comments and blanks skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def active_services(doc: dict[str, Any], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """The services Compose starts with ``profiles`` on."""
    return {name: svc for name, svc in doc["services"].items()
            if not svc.get("profiles") or profiles & set(svc["profiles"])}


def container_ports(svc: dict[str, Any]) -> list[int]:
    """The container side of each ``ports`` entry (``[HOST_IP:][HOST_PORT:]CONTAINER_PORT``)."""
    return [int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in svc.get("ports", [])]


# -- the file itself ------------------------------------------------------------------------------

def test_serve_replaces_the_callback_service() -> None:
    doc = load_compose({"KIE_API_TOKENS": "t0ken"})
    services = doc["services"]
    assert "callback" not in services
    serve = services["serve"]
    assert serve["command"][:2] == ["kie-extend", "serve"] and "0.0.0.0" in serve["command"]
    assert serve["environment"]["KIE_API_TOKENS"] == "t0ken"
    for name in ("worker", "beat", "serve"):
        assert services[name]["environment"]["KIE_CALLBACK_BASE_URL"] == "http://serve:8080", name
    assert services["simulator"]["profiles"] == ["demo"]
    # The redis service keeps AOF on and publishes on loopback only (the README says so).
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["ports"] == ["127.0.0.1:6379:6379"]


def test_serve_needs_tokens_and_private_urls_are_off_by_default() -> None:
    with pytest.raises(InterpolationError, match="KIE_API_TOKENS"):
        load_compose({})
    doc = load_compose({"KIE_API_TOKENS": "t0ken"})
    assert doc["services"]["worker"]["environment"]["KIE_ALLOW_PRIVATE_URLS"] == "false"
    demo = load_compose({**read_env_file(DEMO_ENV), "KIE_API_TOKENS": "t0ken"})
    assert demo["services"]["worker"]["environment"]["KIE_ALLOW_PRIVATE_URLS"] == "true"
    assert demo["services"]["serve"]["ports"] == ["127.0.0.1:8080:8080"]
    assert "demo" in read_env_file(DEMO_ENV)["COMPOSE_PROFILES"].split(",")


def test_the_image_is_built_once_and_every_service_restarts() -> None:
    doc = load_compose({"KIE_API_TOKENS": "t0ken"})
    services = doc["services"]
    ours = {name: svc for name, svc in services.items() if name != "redis"}
    # One service builds kie-extend:local; the others run it by its tag and never pull it.
    assert [name for name, svc in ours.items() if "build" in svc] == ["worker"]
    assert {svc["image"] for svc in ours.values()} == {"kie-extend:local"}
    assert all(svc["pull_policy"] == "never" for name, svc in ours.items() if name != "worker")
    # The build context holds only what the Dockerfile copies.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:4] == ["*", "!pyproject.toml", "!README.md", "!src/"]
    for name, svc in services.items():
        if name != "simulator":
            assert svc.get("restart") == "unless-stopped", name
    assert services["simulator"]["ports"] == ["127.0.0.1:8787:8787"]
    moved = load_compose({"KIE_API_TOKENS": "t0ken", "KIE_SIMULATOR_PUBLISH": "127.0.0.1:18787"})
    assert moved["services"]["simulator"]["ports"] == ["127.0.0.1:18787:8787"]


# -- the demo profile as real processes -----------------------------------------------------------

class ComposeRun:
    """The demo profile's services as processes on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.token = secrets.token_urlsafe(24)
        file_env = read_env_file(DEMO_ENV)
        self.profiles = set(file_env["COMPOSE_PROFILES"].split(","))
        doc = load_compose({**file_env, "KIE_API_TOKENS": self.token})
        self.services = active_services(doc, self.profiles)
        # Each (service, container port) gets a free loopback port.
        self.ports = {(name, cport): free_port() for name, svc in self.services.items() for cport in container_ports(svc)}
        self.children: list[Child] = []
        self.valkey: EmbeddedValkey | None = None
        self.envs: dict[str, dict[str, str]] = {}

    def host_url(self, service: str, cport: int) -> str:
        """Where ``service:cport`` answers here."""
        if service == "redis":
            assert self.valkey is not None
            return f"127.0.0.1:{self.valkey.port}"
        return f"127.0.0.1:{self.ports[(service, cport)]}"

    def rewrite(self, text: str) -> str:
        """Compose host names (``//serve:8080``) to loopback addresses."""
        def sub(m: re.Match[str]) -> str:
            name, port = m.group(1), int(m.group(2))
            if name not in self.services or (name != "redis" and (name, port) not in self.ports):
                return m.group(0)
            return "//" + self.host_url(name, port)

        return re.sub(r"//([a-z][a-z0-9_-]*):(\d+)", sub, text)

    def command(self, name: str) -> list[str]:
        """The service's command with its own port and paths made local."""
        svc, args = self.services[name], list(self.services[name]["command"])
        own = container_ports(svc)
        out = []
        for i, arg in enumerate(args):
            prev = args[i - 1] if i else ""
            if prev == "--port" and int(arg) in own:
                arg = str(self.ports[(name, int(arg))])
            elif prev == "--host" and arg == "0.0.0.0":
                arg = "127.0.0.1"  # loopback here; the container binds all interfaces
            elif arg.startswith("/tmp/"):
                arg = str(self.workdir / f"{name}-{Path(arg).name}")
            out.append(self.rewrite(arg))
        bindir = str(Path(sys.executable).parent)  # celery and kie-extend as the image installs them
        exe = os.path.join(bindir, out[0])
        return [exe if os.path.exists(exe) else out[0], *out[1:]]

    def environment(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: self.rewrite(str(v)) for k, v in (self.services[name].get("environment") or {}).items()})
        return env

    def start(self) -> None:
        redis_cmd = self.services["redis"]["command"]
        assert redis_cmd[0] == "redis-server"
        self.valkey = EmbeddedValkey(str(self.workdir / "redis"), appendonly=True, args=redis_cmd[1:]).start()
        order = ["simulator", "serve", "worker", "beat"]
        assert set(order) == set(self.services) - {"redis"}, sorted(self.services)
        for name in order:
            env = self.environment(name)
            self.envs[name] = env
            for value in env.values():
                assert ":6379" not in value, f"{name} would reach a Redis this test did not start: {value}"
            child = Child(name, self.command(name), env, self.workdir / f"{name}.log")
            self.children.append(child)
            if name in ("simulator", "serve"):
                cport = container_ports(self.services[name])[0]
                probe = "/_sim/stats" if name == "simulator" else "/healthz"
                _wait_http(f"http://{self.host_url(name, cport)}{probe}", 60, child)

    def logs(self, tail: int = 3000) -> str:
        """Each child's log (its last ``tail`` characters; 0: all of it)."""
        return "\n".join(f"--- {c.name}\n" + c.log_path.read_text(errors="replace")[-tail:] for c in self.children)

    def close(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception:
                pass
        if self.valkey is not None:
            self.valkey.stop()


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeRun]:
    run = ComposeRun(tmp_path_factory.mktemp("compose"))
    try:
        run.start()
        yield run
    finally:
        run.close()


def test_a_job_succeeds_through_the_compose_services(compose: ComposeRun) -> None:
    worker_env = compose.envs["worker"]
    settings = Settings(_env_file=None, **{k[4:].lower(): v for k, v in worker_env.items()
                                          if k.startswith("KIE_") and k != "KIE_LOG_FORMAT"})
    sim = "http://" + compose.host_url("simulator", 8787)
    assert settings.base_url == sim and settings.allow_private_urls
    serve = "http://" + compose.host_url("serve", 8080)
    assert settings.callback_base_url == serve
    request = {"uploadUrl": f"{sim}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
               "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Compose"}
    job_id = enqueue_extend(request, settings=settings)
    deadline = time.monotonic() + 90
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rec = get_job(job_id, settings=settings)
        if rec["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert rec.get("state") == "succeeded", f"{rec}\n{compose.logs()}"
    assert len(rec["tracks"]) == 2
    # The simulator called serve back (the compose callback URL reached it) ...
    by_url = requests.get(f"{sim}/_sim/stats", timeout=5).json()["submissions_by_callback_url"]
    assert any(url == f"{serve}/kie/callback/{job_id}" for url in by_url), by_url
    metrics = requests.get(f"{serve}/metrics", timeout=5).text
    assert re.search(r"^kie_extend_callbacks_total [1-9]", metrics, re.M), metrics
    assert re.search(r"^kie_extend_last_tick_timestamp_seconds [1-9]", metrics, re.M), "the beat ticks"
    # ... and serve's /v1 answers with the token from the environment, and only with it.
    got = requests.get(f"{serve}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {compose.token}"}, timeout=5)
    assert got.status_code == 200 and got.json()["state"] == "succeeded", got.text
    assert requests.get(f"{serve}/v1/jobs/{job_id}", timeout=5).status_code == 401
    # The token never reaches a log line.
    assert compose.token not in compose.logs(tail=0)


def test_serve_healthcheck_command_passes(compose: ComposeRun) -> None:
    check = compose.services["serve"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    args = [compose.rewrite(a).replace("127.0.0.1:8080", compose.host_url("serve", 8080)) for a in check[1:]]
    args[0] = sys.executable if args[0] == "python" else args[0]
    assert subprocess.run(args, timeout=30).returncode == 0


def test_serve_healthcheck_is_readiness_and_fails_while_redis_is_down(compose: ComposeRun) -> None:
    """Last in the module: it stops the compose run's Redis."""
    check = compose.services["serve"]["healthcheck"]["test"]
    assert any("/readyz" in a for a in check), check
    args = [compose.rewrite(a).replace("127.0.0.1:8080", compose.host_url("serve", 8080)) for a in check[1:]]
    args[0] = sys.executable if args[0] == "python" else args[0]
    assert compose.valkey is not None
    compose.valkey.stop()
    out = subprocess.run(args, timeout=30, capture_output=True, text=True)
    assert out.returncode != 0 and "503" in out.stderr, out.stderr[-2000:]
    serve = f"http://{compose.host_url('serve', 8080)}"
    assert requests.get(f"{serve}/livez", timeout=5).json() == {"status": "ok"}  # liveness stays cheap
    ready = requests.get(f"{serve}/readyz", timeout=10)
    assert ready.status_code == 503 and "job store unreachable" in ready.json()["reason"]
