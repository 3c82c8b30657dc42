"""Start-up checks against real Valkey servers: an evicting job store or broker stops the worker,
beat and serve (unless KIE_ALLOW_EVICTION=true), and the password never shows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey
from kie_extend.errors import ConfigError
from kie_extend.infra.preflight import check_eviction, endpoints_line, eviction_policy
from kie_extend.infra.clients import redis_client

PASSWORD = "hunter2-Pa55word"


@pytest.fixture(scope="module")
def lru() -> Iterator[EmbeddedValkey]:
    """A password-protected Valkey that evicts keys (allkeys-lru)."""
    server = EmbeddedValkey(args=["--maxmemory-policy", "allkeys-lru"]).start()
    redis.Redis(port=server.port).config_set("requirepass", PASSWORD)  # start() pings without a password
    yield server
    server.stop()


def _url(server: EmbeddedValkey) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


def test_evicting_job_store_is_refused_with_reason_and_fix(lru: EmbeddedValkey) -> None:
    settings = Settings(_env_file=None, redis_url=_url(lru))
    with pytest.raises(ConfigError) as info:
        check_eviction(settings)
    text = str(info.value)
    assert "allkeys-lru" in text and "lost, possibly paid job" in text
    assert "maxmemory-policy noeviction" in text and "KIE_ALLOW_EVICTION=true" in text
    assert f"redis://:***@127.0.0.1:{lru.port}/0" in text and PASSWORD not in text


def test_allow_eviction_turns_the_refusal_into_a_warning(lru: EmbeddedValkey, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(_env_file=None, redis_url=_url(lru), allow_eviction=True)
    with caplog.at_level("WARNING", logger="kie_extend.infra.preflight"):
        warnings = check_eviction(settings)
    assert len(warnings) == 1 and "allkeys-lru" in warnings[0] and "Starting anyway" in warnings[0]
    assert "allkeys-lru" in caplog.text and PASSWORD not in caplog.text


def test_noeviction_job_store_passes(valkey: EmbeddedValkey) -> None:
    assert check_eviction(Settings(_env_file=None, redis_url=valkey.url)) == []


def test_evicting_redis_broker_is_refused_too(valkey: EmbeddedValkey, lru: EmbeddedValkey) -> None:
    settings = Settings(_env_file=None, redis_url=valkey.url, broker_url=_url(lru))
    with pytest.raises(ConfigError, match=r"broker \(KIE_BROKER_URL\)"):
        check_eviction(settings)
    # A RabbitMQ broker is not Redis: nothing to check there.
    assert check_eviction(Settings(_env_file=None, redis_url=valkey.url, broker_url="amqp://guest:guest@127.0.0.1:9//")) == []


def test_policy_from_info_when_config_is_disabled(tmp_path: Path) -> None:
    with EmbeddedValkey(str(tmp_path / "v"), args=["--maxmemory-policy", "volatile-lru",
                                                   "--rename-command", "CONFIG", ""]) as server:
        client = redis_client(server.url)
        with pytest.raises(Exception):
            client.config_get("maxmemory-policy")
        assert eviction_policy(client) == "volatile-lru"
        with pytest.raises(ConfigError, match="volatile-lru"):
            check_eviction(Settings(_env_file=None, redis_url=server.url))


def test_endpoints_line_masks_passwords() -> None:
    s = Settings(_env_file=None, redis_url="redis://:pw-secret@10.0.0.5:6380/0", broker_url="amqp://u:pw2-secret@mq//")
    assert endpoints_line(s) == "job store redis://:***@10.0.0.5:6380/0, broker amqp://u:***@mq//"


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": url, "KIE_QUEUE": "preflight_test", "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.mark.parametrize("command", [
    ["-m", "celery", "-A", "kie_extend.worker", "worker", "-c", "1", "-P", "solo", "-Q", "preflight_test",
     "--without-gossip", "--without-mingle"],
    ["-m", "celery", "-A", "kie_extend.worker", "beat", "-s", "{tmp}/schedule"],
    ["-m", "kie_extend.cli.main", "serve", "--port", "0"],
    ["-m", "kie_extend.cli.main", "serve", "--callbacks-only", "--port", "0"],
    ["-m", "kie_extend.cli.main", "callback-server", "--port", "0"],
], ids=["worker", "beat", "serve", "serve-callbacks-only", "callback-server"])
def test_processes_exit_non_zero_on_an_evicting_redis(lru: EmbeddedValkey, tmp_path: Path, command: list[str]) -> None:
    args = [sys.executable, *[c.replace("{tmp}", str(tmp_path)) for c in command]]
    proc = subprocess.run(args, env=_env(_url(lru)), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "refuses to start" in out and "lost, possibly paid job" in out, out[-2000:]
    assert f"job store redis://:***@127.0.0.1:{lru.port}/0" in out, out[-2000:]
    assert PASSWORD not in out


def test_worker_starts_and_warns_with_allow_eviction(lru: EmbeddedValkey, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "kie_extend.worker", "worker", "-c", "1",
                                 "-P", "solo", "-Q", "preflight_test", "--without-gossip", "--without-mingle"],
                                env=_env(_url(lru), KIE_ALLOW_EVICTION="true"), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and " ready." not in log.read_text() and proc.poll() is None:
                time.sleep(0.2)
            out = log.read_text()
            assert proc.poll() is None and " ready." in out, out[-2000:]
            assert "WARNING" in out and "allkeys-lru" in out and "KIE_ALLOW_EVICTION=true" in out
            assert f"job store redis://:***@127.0.0.1:{lru.port}/0" in out and PASSWORD not in out
        finally:
            proc.terminate()
            proc.wait(20)
