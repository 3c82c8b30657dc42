"""A job store or broker that refuses our credentials (wrong password, unknown ACL user, NOAUTH):
every ``kie-extend`` command stops at start-up with one line and exit 6 naming the setting (URL
masked), ``kie-extend status``, ``/v1/system``, ``/readyz`` and ``/metrics`` show which part refuses
us, and a real Celery worker and beat retry saying why, then recover when the password becomes
right. Real processes against this test's own two Valkeys (job store, broker) with ``requirepass``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from test_cli_errors import CMD, STORE_COMMANDS, env_with, kie_many
from test_http_api import Served

from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey
from kie_extend.http.app import create_app
from kie_extend.infra.check import REASONS
from kie_extend.store.keys import Keys

STORE_PW = "store-Pw-8813"
BROKER_PW = "broker-Pw-2209"
WRONG = "wrong-Pw-5150"
SECRETS = (STORE_PW, BROKER_PW, WRONG)
REQUEST = {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
           "prompt": "a calm song", "continueAt": 5}
FIX = "it refused the credentials; check the user and password in {var} (percent-encode special characters)"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[EmbeddedValkey, EmbeddedValkey]]:
    """(job store, broker): two private Valkeys, each with its own password."""
    store, broker = EmbeddedValkey().start(), EmbeddedValkey().start()
    redis.Redis(port=store.port).config_set("requirepass", STORE_PW)
    redis.Redis(port=broker.port).config_set("requirepass", BROKER_PW)
    yield store, broker
    store.stop()
    broker.stop()


def urls(servers: tuple[EmbeddedValkey, EmbeddedValkey], store: str = f":{STORE_PW}@",
         broker: str = f":{BROKER_PW}@") -> dict[str, str]:
    return {"KIE_REDIS_URL": f"redis://{store}127.0.0.1:{servers[0].port}/0",
            "KIE_BROKER_URL": f"redis://{broker}127.0.0.1:{servers[1].port}/0"}


def the_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line on stderr; no traceback, no password anywhere."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert not any(s in out for s in SECRETS), out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_every_command_stops_on_refused_credentials(servers: tuple[EmbeddedValkey, EmbeddedValkey],
                                                    tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text(json.dumps(REQUEST))
    (tmp_path / "songs.jsonl").write_text(json.dumps(REQUEST) + "\n")
    runs = [[a.replace("{dir}", str(tmp_path)) for a in args] for args in STORE_COMMANDS.values()]
    store_port, broker_port = servers[0].port, servers[1].port
    few = [runs[list(STORE_COMMANDS).index(n)] for n in ("status JOB", "jobs", "enqueue", "batch submit")]
    cases = [  # (what refuses us, the setting, the URL shown, the environment, the commands)
        ("broker", "KIE_BROKER_URL", f"redis://:***@127.0.0.1:{broker_port}/0",
         urls(servers, broker=f":{WRONG}@"), runs),
        ("job store", "KIE_REDIS_URL", f"redis://:***@127.0.0.1:{store_port}/0", urls(servers, store=f":{WRONG}@"),
         runs),
        ("broker", "KIE_BROKER_URL", f"redis://ghost:***@127.0.0.1:{broker_port}/0",  # unknown ACL user
         urls(servers, broker=f"ghost:{BROKER_PW}@"), few),
        ("broker", "KIE_BROKER_URL", f"redis://127.0.0.1:{broker_port}/0", urls(servers, broker=""), few),  # NOAUTH
        ("job store", "KIE_REDIS_URL", f"redis://127.0.0.1:{store_port}/0", urls(servers, store=""), few),
    ]
    for what, var, shown, env, argvs in cases:
        for name, proc in zip([" ".join(a) for a in argvs], kie_many(argvs, env_with(**env), tmp_path)):
            line = the_line(proc)
            assert proc.returncode == 6, (what, name, proc.returncode, line)
            assert line == f"error: cannot use the {what} ({var}={shown}): {FIX.format(var=var)}", (name, line)
    # Nothing was sent: the broker's queue is empty and the job store holds no job.
    assert redis.Redis(port=broker_port, password=BROKER_PW).dbsize() == 0
    assert not redis.Redis(port=store_port, password=STORE_PW).keys("cli_errors_test:job:*")


def test_status_shows_each_part(servers: tuple[EmbeddedValkey, EmbeddedValkey], tmp_path: Path) -> None:
    store_port, broker_port = servers[0].port, servers[1].port
    ok = subprocess.run([*CMD, "status"], env=env_with(**urls(servers)), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"job store:   up at redis://:***@127.0.0.1:{store_port}/0 (KIE_REDIS_URL)" in ok.stdout
    assert f"broker:      up at redis://:***@127.0.0.1:{broker_port}/0 (KIE_BROKER_URL)" in ok.stdout

    env = env_with(**urls(servers, broker=f":{WRONG}@"))
    proc = subprocess.run([*CMD, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 6
    assert the_line(proc) == (f"error: cannot use the broker (KIE_BROKER_URL=redis://:***@127.0.0.1:{broker_port}"
                              f"/0): {FIX.format(var='KIE_BROKER_URL')}")
    assert f"job store:   up at redis://:***@127.0.0.1:{store_port}/0 (KIE_REDIS_URL)" in proc.stdout
    assert (f"broker:      REFUSED credentials (wrong user or password) at redis://:***@127.0.0.1:{broker_port}/0; "
            "check KIE_BROKER_URL") in proc.stdout
    assert "jobs:" in proc.stdout  # the rest of the view is still there
    js = subprocess.run([*CMD, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert js.returncode == 6
    infra = json.loads(js.stdout)["infrastructure"]
    assert infra["broker"] == {"up": False, "reason": "refused_credentials",
                               "detail": "refused the credentials (wrong user or password)",
                               "setting": "KIE_BROKER_URL", "url": f"redis://:***@127.0.0.1:{broker_port}/0"}
    assert infra["job_store"]["up"] is True and infra["job_store"]["reason"] == "ok"


def _settings(servers: tuple[EmbeddedValkey, EmbeddedValkey], **kw: str) -> Settings:
    env = urls(servers, **kw)
    return Settings(api_key="test-key-0123456789abcdef", redis_url=env["KIE_REDIS_URL"],
                    broker_url=env["KIE_BROKER_URL"], callback_base_url="http://127.0.0.1:9/cb",
                    key_prefix="infra_creds", queue="infra_creds")


def test_system_readyz_and_metrics_show_a_refusing_broker(servers: tuple[EmbeddedValkey, EmbeddedValkey]) -> None:
    broker_port = servers[1].port
    for broker, ready in ((f":{BROKER_PW}@", True), (f":{WRONG}@", False), ("", False)):
        served = Served(create_app(_settings(servers, broker=broker), parts=("api",)))
        try:
            r = requests.get(served.url + "/readyz", timeout=10)
            assert r.status_code == (200 if ready else 503), r.text
            body = r.json()
            assert body["checks"]["job_store"] == {"ok": True, "reason": "ok", "setting": "KIE_REDIS_URL"}
            broker_check = body["checks"]["broker"]
            assert broker_check["reason"] == ("ok" if ready else "refused_credentials"), body
            if not ready:
                assert body["reason"] == ("broker refused credentials (refused the credentials (wrong user or "
                                          "password); check KIE_BROKER_URL)"), body
                assert "unreachable" not in body["reason"]
            assert "127.0.0.1" not in r.text and not any(s in r.text for s in SECRETS)

            system = requests.get(served.url + "/v1/system", timeout=10)
            assert system.status_code == 200, system.text
            infra = system.json()["infrastructure"]
            assert infra["broker"]["up"] is ready and infra["broker"]["setting"] == "KIE_BROKER_URL"
            assert infra["broker"]["url"] == f"redis://{':***@' if broker else ''}127.0.0.1:{broker_port}/0"
            assert infra["job_store"]["up"] is True
            assert not any(s in system.text for s in SECRETS)

            metrics = requests.get(served.url + "/metrics", timeout=10).text
            ups = dict(re.findall(r'^kie_extend_infra_up\{part="(\w+)",reason="(\w+)"\} [01]$', metrics, re.M))
            assert ups == {"job_store": "ok", "broker": "ok" if ready else "refused_credentials"}, metrics
            assert set(ups.values()) <= set(REASONS)
            assert f'kie_extend_infra_up{{part="broker",reason="{ups["broker"]}"}} {int(ready)}' in metrics
        finally:
            served.stop()


CELERY = {
    "worker": [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "worker", "-c", "1", "-P", "solo",
               "-Q", "infra_creds", "--without-gossip", "--without-mingle"],
    "beat": [sys.executable, "-m", "celery", "-A", "kie_extend.worker", "beat", "-s", "{dir}/schedule"],
}


def test_worker_and_beat_retry_saying_why_then_recover(tmp_path: Path) -> None:
    """A worker and a beat started with the broker refusing their password log, at each retry
    (2, 4, 6 … s apart: never a flood), the setting, its masked URL and why; once the broker takes
    that password (CONFIG SET requirepass), the worker consumes and beat's ticks arrive."""
    store, broker = EmbeddedValkey().start(), EmbeddedValkey().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis.Redis(port=store.port).config_set("requirepass", STORE_PW)
        admin = redis.Redis(port=broker.port)
        admin.config_set("requirepass", BROKER_PW)
        admin = redis.Redis(port=broker.port, password=BROKER_PW)
        env = env_with(**urls((store, broker), broker=f":{WRONG}@"), KIE_QUEUE="infra_creds",
                       KIE_KEY_PREFIX="infra_creds", KIE_TICK_INTERVAL="1")
        logs = {name: tmp_path / f"{name}.log" for name in CELERY}
        for name, args in CELERY.items():
            with logs[name].open("w") as fh:
                procs.append(subprocess.Popen([a.replace("{dir}", str(tmp_path)) for a in args], env=env, cwd=tmp_path,
                                              stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        note = (f"[broker KIE_BROKER_URL=redis://:***@127.0.0.1:{broker.port}/0: "
                f"{FIX.format(var='KIE_BROKER_URL')}]")

        def text(name: str) -> str:
            return logs[name].read_text()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(text(n).count(note) >= 2 for n in CELERY):
            assert all(p.poll() is None for p in procs), text("worker")[-3000:] + text("beat")[-3000:]
            time.sleep(0.2)
        for name in CELERY:
            out = text(name)
            assert out.count(note) >= 2, out[-3000:]
            assert "Traceback" not in out and not any(s in out for s in SECRETS), out[-3000:]
            stamps = [line[:23] for line in out.splitlines() if note in line or "Trying again" in line and "[" in line]
            assert len(stamps) <= 4, stamps  # Celery's backoff paces the lines: 2 s, then 4 s, 6 s …
        assert "(attempt 1; retrying until it answers)" in text("worker")

        admin.config_set("requirepass", WRONG)  # the password the processes have becomes the right one
        broker_db = redis.Redis(port=broker.port, password=WRONG)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "celery@" not in "".join(
                ln for ln in text("worker").splitlines() if ln.rstrip().endswith("ready.")):
            time.sleep(0.2)
        assert any(ln.rstrip().endswith("ready.") for ln in text("worker").splitlines()), text("worker")[-3000:]
        # Beat's ticks reach the broker and the worker runs them: the tick's record appears in the job store.
        store_db = redis.Redis(port=store.port, password=STORE_PW)
        tick = Keys("infra_creds").tick_last
        while time.monotonic() < deadline and not store_db.exists(tick):
            time.sleep(0.2)
        assert store_db.exists(tick), (store_db.keys("*"), broker_db.keys("*"), text("beat")[-2000:])
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        store.stop()
        broker.stop()


def _rabbit_up() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_up(), reason="no RabbitMQ answers on 127.0.0.1:5672 (the amqp case needs one)")
def test_rabbitmq_access_refused(servers: tuple[EmbeddedValkey, EmbeddedValkey], tmp_path: Path) -> None:
    """A RabbitMQ broker that refuses the password (ACCESS_REFUSED): the same line, exit 6. Only a
    login is attempted on it; nothing is declared or published."""
    env = env_with(KIE_REDIS_URL=urls(servers)["KIE_REDIS_URL"], KIE_BROKER_URL=f"amqp://guest:{WRONG}@127.0.0.1:5672//")
    runs = [["status"], ["jobs"], STORE_COMMANDS["enqueue"]]
    for argv, proc in zip(runs, kie_many(runs, env, tmp_path)):
        assert proc.returncode == 6, (argv, proc.stderr)
        assert the_line(proc) == ("error: cannot use the broker (KIE_BROKER_URL=amqp://guest:***@127.0.0.1:5672//): "
                                  f"{FIX.format(var='KIE_BROKER_URL')}"), argv
        if argv == ["status"]:
            assert ("broker:      REFUSED credentials (wrong user or password) at amqp://guest:***@127.0.0.1:5672//; "
                    "check KIE_BROKER_URL") in proc.stdout


def test_the_python_api_names_refused_credentials(servers: tuple[EmbeddedValkey, EmbeddedValkey]) -> None:
    """A wrong password through the Python API: InfraUnavailable (a KieExtendError) naming the
    setting and the masked URL, not the Redis client's or kombu's own error; no password in it."""
    from kie_extend import api
    from kie_extend.config import load_settings
    from kie_extend.errors import KieExtendError
    from kie_extend.infra.check import InfraUnavailable

    base = {"api_key": "test-key-0123456789", "callback_base_url": "http://127.0.0.1:9/cb",
            "key_prefix": "creds_api", "queue": "creds_api"}
    good = {k.lower().removeprefix("kie_"): v for k, v in urls(servers).items()}
    bad_store = {k.lower().removeprefix("kie_"): v for k, v in urls(servers, store=f":{WRONG}@").items()}
    bad_broker = {k.lower().removeprefix("kie_"): v for k, v in urls(servers, broker=f":{WRONG}@").items()}
    for urls_, setting, part in ((bad_store, "KIE_REDIS_URL", "job_store"), (bad_broker, "KIE_BROKER_URL", "broker")):
        settings = load_settings(**base, **urls_)
        calls = [lambda: api.enqueue_extend(REQUEST, idempotency_key="k", settings=settings)]
        if part == "job_store":
            calls += [lambda: api.get_job("x", settings=settings), lambda: api.pause(settings=settings)]
        for call in calls:
            with pytest.raises(InfraUnavailable) as exc:
                call()
            assert isinstance(exc.value, KieExtendError) and exc.value.part == part
            assert setting in str(exc.value) and "refused the credentials" in str(exc.value)
            assert exc.value.state["setting"] == setting and not any(s in str(exc.value) for s in SECRETS)
    assert api.get_job("x", settings=load_settings(**base, **good))["state"] == "not_found"
