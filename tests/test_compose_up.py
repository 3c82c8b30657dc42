"""docker-compose.yml started for real by a container engine: podman with podman-compose, as root.
Run with ``make compose`` (marker ``compose``; the default ``make test`` leaves it out, it is slow).

The compose file is started **unmodified** with ``deploy/demo.env``, the demo profile and
``--scale worker=2``, under a project name of its own and with its published ports on free loopback
ports (``KIE_REDIS_PUBLISH``, ``KIE_SERVE_PUBLISH``, ``KIE_SIMULATOR_PUBLISH``). The test then:

- checks every service runs (two worker replicas), the one ``kie-extend:local`` image is shared by
  all of them, and the Redis and serve healthchecks pass (``podman healthcheck run``);
- sends jobs through serve's published ``/v1`` and through the published Redis with the Python API,
  waits until every one has been submitted and kills one worker container (``podman kill``) while
  they generate, sends more, and checks that every job ends ``succeeded`` exactly once: one
  terminal event per job in the result stream, one submission per job at the simulator, nothing
  lost. The kill waits for the submissions because an ``extend`` message a killed worker held
  comes back only after ``KIE_VISIBILITY_TIMEOUT`` (300 s, which the compose file does not let the
  environment change; README "Celery's visibility timeout and our leases"); the later steps a
  worker dies in come back within ``KIE_LEASE`` (60 s);
- tears everything down (``podman-compose down -v``, then what ``down`` misses: scaled replicas,
  the network, the volume, all found by the project label) and checks nothing of the project is
  left.

What this machine lacks is installed when missing, as root, non-interactive and time-bounded:
Debian's ``podman``, ``runc``, ``netavark``, ``aardvark-dns``, ``iptables``, ``uidmap``,
``slirp4netns`` and ``mmdebstrap``; podman-compose from PyPI into this Python's environment
(Debian's is too old for ``--env-file`` and ``dockerfile_inline``). Without root and without them
the test is skipped and says so.

Public images cannot be pulled here, so the two the file names are stand-ins built locally once
(kept in podman's storage for the next run): ``python:3.11-slim`` is a Debian bookworm minbase root
fs (``mmdebstrap``) with python3 (3.11), venv and pip, ``python`` on PATH and pip allowed to install
system-wide as in the official image; ``redis:7-alpine`` is one with Debian's redis-server and
redis-cli, working directory ``/data`` and protected mode off as in the official image. The host's
extra CA certificates go into the python stand-in, so the image build's ``pip install`` trusts the
same TLS interceptors the host does.

Podman on this kind of machine (a VM without systemd, hybrid cgroups) needs a containers.conf,
written per run and passed as ``CONTAINERS_CONF``: runc (crun refuses the hybrid cgroups), the
cgroupfs manager, file events, and default ulimits no higher than the host's. Without systemd
podman runs no healthcheck timers, so a thread here runs ``podman healthcheck run`` every few
seconds, and podman-compose ignores ``depends_on: service_healthy`` on podman < 4.6 (the services
connect with retries).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from kie_extend.api import enqueue_extend, get_job
from kie_extend.config import Settings
from kie_extend.infra.embedded import free_port
from kie_extend.store.keys import Keys

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEMO_ENV = ROOT / "deploy" / "demo.env"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"
#: Debian packages the run needs, by a file each one provides.
PACKAGES = {"podman": "/usr/bin/podman", "runc": "/usr/sbin/runc", "netavark": "/usr/lib/podman/netavark",
            "aardvark-dns": "/usr/lib/podman/aardvark-dns", "iptables": "/usr/sbin/iptables",
            "uidmap": "/usr/bin/newuidmap", "slirp4netns": "/usr/bin/slirp4netns",
            "mmdebstrap": "/usr/bin/mmdebstrap"}
SUITE = "bookworm"  # its python3 is 3.11, as the tag says
MIRROR = "http://deb.debian.org/debian"
STAND_IN_LABEL = "org.kie-extend.stand-in"
IMAGE = "kie-extend:local"
TERMINAL = {"succeeded", "failed", "cancelled"}
REQUEST = {"uploadUrl": "http://simulator:8787/files/source/30s.mp3", "defaultParamFlag": True,
           "instrumental": False, "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la",
           "style": "folk", "title": "Compose up"}


def _run(cmd: list[str], timeout: float, *, env: dict[str, str] | None = None, check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``cmd`` to completion within ``timeout`` seconds, output captured; fails the test when it
    exits non-zero and ``check`` is set."""
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# -- what the run needs -----------------------------------------------------------------------------

def _ensure_tools() -> None:
    """Debian's podman and friends, and podman-compose from PyPI, installed when missing."""
    missing = [pkg for pkg, path in PACKAGES.items() if not os.path.exists(path)]
    if missing:
        if os.geteuid() != 0:
            pytest.skip(f"missing {', '.join(missing)} and installing them needs root: "
                        f"sudo apt-get install -y {' '.join(missing)}, then make compose")
        apt = shutil.which("apt-get")
        if apt is None:
            pytest.fail(f"missing {', '.join(missing)} and this machine has no apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run([apt, "update", "-o", "DPkg::Lock::Timeout=120"], 300, env=env, check=False)
        _run([apt, "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *missing], 600, env=env)
        still = [pkg for pkg in missing if not os.path.exists(PACKAGES[pkg])]
        if still:
            pytest.fail(f"apt-get installed {', '.join(missing)} but these are still missing: {still}")
    elif os.geteuid() != 0:
        pytest.skip("the compose run uses rootful podman: run make compose as root")
    if not PODMAN_COMPOSE.exists():
        _run([sys.executable, "-m", "pip", "install", "--quiet", "podman-compose>=1.3"], 300)
        if not PODMAN_COMPOSE.exists():
            pytest.fail(f"pip installed podman-compose but {PODMAN_COMPOSE} is missing")


def _containers_conf(path: Path) -> Path:
    """A containers.conf for this machine (see the module docstring); returns ``path``."""
    def limit(which: int, cap: int) -> int:
        hard = resource.getrlimit(which)[1]
        return cap if hard == resource.RLIM_INFINITY else min(hard, cap)

    nofile = limit(resource.RLIMIT_NOFILE, 16384)
    nproc = limit(resource.RLIMIT_NPROC, 16384)
    path.write_text(
        "# written by kie-extend's tests/test_compose_up.py\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[network]\n"
        'network_backend = "netavark"\n')
    return path


def _host_ca_files() -> list[Path]:
    """The host's extra CA certificates: /usr/local/share/ca-certificates, and the bundle pip or
    requests is told to use (PIP_CERT, REQUESTS_CA_BUNDLE, pip's ``cert``) when it is not the system
    bundle the stand-in makes itself."""
    found = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    named = [os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE")]
    pip_conf = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                              capture_output=True, text=True, timeout=60)
    named.append(pip_conf.stdout.strip() if pip_conf.returncode == 0 else None)
    for name in named:
        if name and Path(name).is_file() and Path(name).resolve() != Path("/etc/ssl/certs/ca-certificates.crt"):
            found.append(Path(name))
    return found


def _stand_in(tag: str, include: list[str], hooks: list[str], changes: list[str], workdir: Path,
              env: dict[str, str]) -> None:
    """Build the local stand-in image ``tag`` (a Debian minbase root fs with ``include``, then
    ``hooks`` run as mmdebstrap customize hooks with the root fs as ``$1``, imported with the
    Dockerfile ``changes``) unless podman has an image of that name already."""
    if _run(["podman", "image", "exists", tag], 60, env=env, check=False).returncode == 0:
        return
    tar = workdir / (tag.replace(":", "_").replace("/", "_") + ".tar")
    cmd = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(include)]
    cmd += [f"--customize-hook={hook}" for hook in hooks]
    _run([*cmd, SUITE, str(tar), MIRROR], 600)
    changes = [*changes, f"LABEL {STAND_IN_LABEL}={tag}"]
    _run(["podman", "import", *[a for c in changes for a in ("--change", c)], str(tar), tag], 300, env=env)
    tar.unlink()


def _ensure_stand_ins(workdir: Path, env: dict[str, str]) -> None:
    """``python:3.11-slim`` and ``redis:7-alpine`` as the module docstring describes them."""
    path = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    cas = workdir / "host-ca"
    cas.mkdir(exist_ok=True)
    for i, src in enumerate(_host_ca_files()):
        shutil.copyfile(src, cas / f"host-{i}-{src.stem}.crt")
    py_hooks = [
        f'cp {cas}/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null; chroot "$1" update-ca-certificates',
        # The official image's pip installs into its own Python: no PEP 668 marker there.
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    ]
    ca_env = "/etc/ssl/certs/ca-certificates.crt"
    _stand_in("python:3.11-slim", ["python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"],
              py_hooks, [path, f"ENV PIP_CERT={ca_env}", f"ENV REQUESTS_CA_BUNDLE={ca_env}", 'CMD ["python3"]'],
              workdir, env)
    wrapper = ("#!/bin/sh\n# The official image builds Redis with protected mode off (pointless in a container).\n"
               'exec /usr/bin/redis-server "$@" --protected-mode no\n')
    redis_hooks = [f"printf '%s' '{wrapper}' > \"$1/usr/local/bin/redis-server\" && "
                   'chmod 755 "$1/usr/local/bin/redis-server" && mkdir -p "$1/data"']
    _stand_in("redis:7-alpine", ["redis-server", "redis-tools"], redis_hooks,
              [path, "WORKDIR /data", 'CMD ["redis-server"]'], workdir, env)


# -- the stack --------------------------------------------------------------------------------------

class Stack:
    """One compose project of the demo profile, started by podman-compose."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.project = "kiecompose" + secrets.token_hex(3)
        self.token = secrets.token_urlsafe(24)
        self.ports = {"redis": free_port(), "serve": free_port(), "simulator": free_port()}
        conf = _containers_conf(workdir / "containers.conf")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KIE_", "COMPOSE_"))}
        #: What podman itself needs (no KIE_ settings of this shell leak into the compose file).
        self.podman_env = {**base, "CONTAINERS_CONF": str(conf)}
        self.env = {**self.podman_env, "KIE_API_TOKENS": self.token,
                    "KIE_REDIS_PUBLISH": f"127.0.0.1:{self.ports['redis']}",
                    "KIE_SERVE_PUBLISH": f"127.0.0.1:{self.ports['serve']}",
                    "KIE_SIMULATOR_PUBLISH": f"127.0.0.1:{self.ports['simulator']}"}
        self.serve = f"http://127.0.0.1:{self.ports['serve']}"
        self.simulator = f"http://127.0.0.1:{self.ports['simulator']}"
        self.redis_url = f"redis://127.0.0.1:{self.ports['redis']}/0"
        #: Exit codes of ``podman healthcheck run`` by service, and errors of rounds that failed.
        self.health: dict[str, list[int]] = {}
        self.health_errors: list[str] = []
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None

    def compose(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman-compose -p PROJECT --env-file deploy/demo.env ARGS`` in the repository."""
        return _run([str(PODMAN_COMPOSE), "-p", self.project, "--env-file", str(DEMO_ENV), *args], timeout,
                    env=self.env, cwd=ROOT, check=check)

    def podman(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["podman", *args], timeout, env=self.podman_env, check=check)

    def containers(self) -> list[dict[str, Any]]:
        """``podman ps -a`` of this project's containers (JSON records)."""
        label = f"label=com.docker.compose.project={self.project}"
        out = self.podman("ps", "-a", "--format", "json", "--filter", label)
        return json.loads(out.stdout or "[]")  # type: ignore[no-any-return]

    def by_service(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for c in self.containers():
            out.setdefault(c["Labels"]["com.docker.compose.service"], []).append(c)
        return out

    def _check_health(self) -> None:
        """What systemd's timers would do: run each healthcheck every few seconds."""
        while not self._stop.wait(3):
            try:
                for name in ("redis", "serve"):
                    for c in self.by_service().get(name, []):
                        if c["State"] == "running":
                            rc = self.podman("healthcheck", "run", c["Names"][0], timeout=30, check=False).returncode
                            self.health.setdefault(name, []).append(rc)
            except BaseException as exc:  # noqa: BLE001 - a slow or failed round is retried, not fatal
                self.health_errors.append(repr(exc)[:500])

    def image_id(self, ref: str) -> str | None:
        got = self.podman("image", "inspect", ref, "--format", "{{.Id}}", check=False)
        return got.stdout.strip() or None if got.returncode == 0 else None

    def up(self) -> None:
        """Build the image, start the project, start the healthcheck runner. A kie-extend:local the
        build replaced is removed, so runs over changing sources do not pile up images."""
        old = self.image_id(IMAGE)
        self.compose("build", timeout=420)
        new = self.image_id(IMAGE)
        if old and new and old != new:
            self.podman("rmi", old, timeout=120, check=False)  # refused while a container uses it
        self.compose("up", "-d", "--scale", "worker=2", timeout=180)
        self._checker = threading.Thread(target=self._check_health, name="healthchecks", daemon=True)
        self._checker.start()

    def logs(self) -> str:
        """The last lines of every container's log."""
        out = []
        for c in self.containers():
            got = self.podman("logs", "--tail", "40", c["Names"][0], check=False)
            out.append(f"--- {c['Names'][0]} ({c['State']})\n{got.stdout[-4000:]}{got.stderr[-4000:]}")
        return "\n".join(out)

    def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, networks and volumes that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.podman("ps", "-a", "-q", "--filter", label).stdout.split(),
            "networks": self.podman("network", "ls", "-q", "--filter", label).stdout.split(),
            "volumes": self.podman("volume", "ls", "-q", "--filter", label).stdout.split(),
        }

    def has_leftovers(self) -> bool:
        return any(self.leftovers().values())

    def down(self, timeout: float = 120) -> list[str]:
        """``down -v``, then whatever it missed (scaled replicas first: they hold the network),
        again until nothing is left or ``timeout`` seconds pass; returns the errors met on the way."""
        self._stop.set()
        if self._checker is not None:
            self._checker.join(timeout=40)
        errors = []
        got = self.compose("down", "-v", "-t", "5", timeout=180, check=False)
        if got.returncode != 0:
            errors.append(f"down: {got.stderr[-1000:]}")
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and any(left.values()) and time.monotonic() < deadline:
            for kind, cmd in (("containers", ["rm", "-f", "-t", "2"]), ("networks", ["network", "rm", "-f"]),
                              ("volumes", ["volume", "rm", "-f"])):
                if left[kind]:
                    got = self.podman(*cmd, *left[kind], timeout=120, check=False)
                    if got.returncode != 0:
                        errors.append(f"{' '.join(cmd)}: {got.stderr[-1000:]}")
            time.sleep(1)
        return errors


def _wait(what: str, check: Any, timeout: float, interval: float = 1.0, detail: Any = lambda: "") -> Any:
    """Poll ``check()`` until it returns a truthy value (returned) or ``timeout`` seconds pass (fail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (requests.RequestException, redis.RedisError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _ensure_tools()
    workdir = tmp_path_factory.mktemp("compose-up")
    st = Stack(workdir)
    _ensure_stand_ins(workdir, st.podman_env)
    digest = hashlib.sha256(COMPOSE.read_bytes()).hexdigest()
    try:
        st.up()
        _wait("serve's /readyz", lambda: requests.get(f"{st.serve}/readyz", timeout=5).status_code == 200, 120,
              detail=st.logs)
        yield st
    finally:
        st.down()
    assert hashlib.sha256(COMPOSE.read_bytes()).hexdigest() == digest, "the compose file was started as it is"


# -- the tests --------------------------------------------------------------------------------------

def test_every_service_runs_from_one_image_and_is_healthy(stack: Stack) -> None:
    services = stack.by_service()
    assert sorted(services) == ["beat", "redis", "serve", "simulator", "worker"], sorted(services)
    assert len(services["worker"]) == 2, [c["Names"] for c in services["worker"]]
    for name, cs in services.items():
        for c in cs:
            assert c["State"] == "running", f"{c['Names']} is {c['State']}\n{stack.logs()}"
    ours = {c["ImageID"] for name, cs in services.items() if name != "redis" for c in cs}
    assert len(ours) == 1, f"one image for every service, not {ours}"
    built = stack.podman("images", "-q", "--filter", f"reference={IMAGE}").stdout.split()
    assert len(set(built)) == 1 and built[0].startswith(next(iter(ours))[:12])
    # Both healthchecks pass (run here as systemd's timers would), and podman says so.
    for name in ("redis", "serve"):
        _wait(f"{name}'s healthcheck", lambda n=name: 0 in stack.health.get(n, []), 60,
              detail=lambda: f"{stack.health_errors}\n{stack.logs()}")
        c = stack.by_service()[name][0]
        state = stack.podman("inspect", c["Names"][0], "--format", "{{.State.Health.Status}}").stdout.strip()
        assert state == "healthy", (name, state)
    # Serve and the simulator answer on their published loopback ports; /v1 wants the token.
    assert requests.get(f"{stack.simulator}/_sim/stats", timeout=5).status_code == 200
    assert requests.get(f"{stack.serve}/v1/jobs", timeout=5).status_code == 401


def test_jobs_end_exactly_once_when_a_worker_is_killed(stack: Stack) -> None:
    settings = Settings(_env_file=None, redis_url=stack.redis_url, base_url="http://simulator:8787",
                        callback_base_url="http://serve:8080", allow_private_urls=True, api_key="sim-key")
    auth = {"Authorization": f"Bearer {stack.token}"}
    via_http: list[str] = []
    via_api: list[str] = []

    def send(n: int, tag: str) -> None:
        for i in range(n):
            req = {**REQUEST, "title": f"{tag} http {i}"}
            got = requests.post(f"{stack.serve}/v1/jobs", json={"request": req}, headers=auth, timeout=10)
            assert got.status_code in (200, 201, 202), got.text
            via_http.append(got.json()["job_id"])
            via_api.append(enqueue_extend({**REQUEST, "title": f"{tag} api {i}"}, settings=settings))

    def states() -> dict[str, str]:
        return {j: get_job(j, settings=settings)["state"] for j in via_http + via_api}

    send(8, "before")
    # Every job submitted (its extend message acknowledged), most still generating: kill a worker.
    _wait("every job submitted", lambda: all(s not in ("queued", "submitting") for s in states().values()), 120,
          interval=0.3, detail=lambda: f"{Counter(states().values())}\n{stack.logs()}")
    running = Counter(states().values())
    victim = sorted(c["Names"][0] for c in stack.by_service()["worker"])[0]
    stack.podman("kill", victim)
    assert sum(n for s, n in running.items() if s not in TERMINAL) >= 1, f"the kill came mid-run: {running}"
    send(4, "after")

    _wait("every job terminal", lambda: all(s in TERMINAL for s in states().values()), 240,
          detail=lambda: f"{Counter(states().values())}\n{stack.logs()}")
    final = states()
    assert set(final.values()) == {"succeeded"}, Counter(final.values())
    for job_id in via_http:  # serve's /v1 says the same
        got = requests.get(f"{stack.serve}/v1/jobs/{job_id}", headers=auth, timeout=10)
        assert got.status_code == 200 and got.json()["state"] == "succeeded", got.text

    # Exactly one terminal event per job in the result stream, none for a job we did not send.
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True, socket_timeout=10)
    terminal: Counter[str] = Counter()
    for _id, fields in client.xrange(Keys(settings.key_prefix).results):
        if fields.get("event") in ("job.succeeded", "job.failed", "job.cancelled"):
            terminal[fields["job_id"]] += 1
    assert terminal == Counter({j: 1 for j in final}), terminal
    # One submission per job at the simulator: nothing lost, nothing paid twice.
    by_url = requests.get(f"{stack.simulator}/_sim/stats", timeout=10).json()["submissions_by_callback_url"]
    for job_id in final:
        assert by_url.get(f"http://serve:8080/kie/callback/{job_id}") == 1, (job_id, by_url)
    # The other worker kept working; the killed one is restarted by its policy or stays exited.
    workers = {c["Names"][0]: c["State"] for c in stack.by_service()["worker"]}
    assert sum(1 for s in workers.values() if s == "running") >= 1, workers


def test_teardown_leaves_nothing(stack: Stack) -> None:
    """Last in the module: takes the project down early and checks what is left."""
    assert stack.has_leftovers()
    errors = stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}, errors
