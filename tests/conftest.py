"""Shared fixtures: our own Valkey server (never a shared Redis), unique key prefixes, settings."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedValkey]:
    """A private valkey-server on a free port for the whole test session."""
    server = EmbeddedValkey().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to this test: isolation without ever flushing."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(valkey: EmbeddedValkey, prefix: str) -> Callable[..., Settings]:
    """Build Settings on our Valkey and this test's prefix, with overrides."""

    def build(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": valkey.url,
            "key_prefix": prefix,
            "queue": prefix,
            "api_key": "test-key-0123456789",
            "callback_base_url": "http://127.0.0.1:9/unused",
            "allow_private_urls": True,
        }
        base.update(overrides)
        return Settings(_env_file=None, **base)

    return build


@pytest.fixture
def rclient(valkey: EmbeddedValkey) -> Iterator[redis.Redis]:
    """A raw client on our Valkey."""
    client = redis.Redis.from_url(valkey.url)
    yield client
    client.close()


_CHAOS_REPORT = __import__("pathlib").Path(__file__).resolve().parent.parent / ".chaos-report.jsonl"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start each run with an empty fault-suite report."""
    _CHAOS_REPORT.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault suite's table: jobs, faults, and the counts that must stay zero."""
    if not _CHAOS_REPORT.exists():
        return
    import json

    rows = [json.loads(line) for line in _CHAOS_REPORT.read_text().splitlines() if line.strip()]
    tr = terminalreporter
    tr.section("fault suite")
    tr.write_line(f"{'scenario':<32} {'jobs':>4} {'ok':>4} {'fail':>4} {'lost':>4} {'2x sub':>6} {'dup ev':>6} "
                  f"{'429s':>5}  faults")
    for r in rows:
        faults = {**r["faults"], **r["sim_faults"]}
        if r.get("transition_replays"):
            faults["transition_replays"] = r["transition_replays"]
        tr.write_line(f"{r['scenario']:<32} {r['jobs']:>4} {r['succeeded']:>4} {r['failed']:>4} {r['lost']:>4} "
                      f"{r['double_submissions']:>6} {r['duplicate_events']:>6} {r['rate_limited_429']:>5}  "
                      f"{json.dumps(faults, sort_keys=True)}  failed_by_kind={json.dumps(r['failed_by_kind'])}")
