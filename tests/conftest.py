"""Shared fixtures: our own Valkey server (never a shared Redis), unique key prefixes, settings."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from kie_extend.config import Settings
from kie_extend.embedded import EmbeddedValkey


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
