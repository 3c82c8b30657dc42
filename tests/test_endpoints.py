"""Redis and broker URLs: start-up validation that never echoes the password, masking for logs,
Sentinel URLs for the job store and for Celery."""

from __future__ import annotations

import pytest

from kie_extend.config import load_settings
from kie_extend.infra.endpoints import (
    EndpointError,
    celery_broker_url,
    check_url,
    mask_url,
    sentinel_endpoint,
    sentinel_transport_options,
)
from kie_extend.errors import ConfigError

SECRET = "S3cr#tPa55"

BAD_REDIS_URLS = [
    # (url, what the message must mention, the password fragments that must never appear)
    ("redis://:S3cr#tPa55@db.example:6380/0", "'#'", ["S3cr", "tPa55"]),
    ("redis://:Pa[ss-wordX@db.example:6380/0", "parsed", ["Pa[ss", "ss-wordX"]),
    ("redis://:Pa]ss-wordX@db.example:6380/0", "parsed", ["Pa]ss", "ss-wordX"]),
    ("redis://:p@ss-wordX@db.example:6380/0", "'@'", ["ss-wordX"]),
    ("redis://:pa/ss-wordX@db.example:6380/0", "parsed", ["ss-wordX"]),
    ("redis://:pa?ss-wordX@db.example:6380/0", "parsed", ["ss-wordX"]),
    ("redis://:pa%ss-wordX@db.example:6380/0", "'%'", ["ss-wordX"]),
    ("redis://:hunter2pass@:6380/0", "no host", ["hunter2pass"]),
    ("redis://:hunter2pass@db.example:63x0/0", "port", ["hunter2pass"]),
    ("redis://:hunter2pass@db.example:99999/0", "port", ["hunter2pass"]),
    ("redis://:hunter2pass@db.example:6380/zero", "database", ["hunter2pass"]),
    ("http://:hunter2pass@db.example:6380/0", "unknown scheme", ["hunter2pass"]),
    ("db.example:6380", "scheme", []),
    (":hunter2pass@db.example:6380", "scheme", ["hunter2pass"]),
    ("amqp://guest:hunter2pass@rabbit:5672//", "unknown scheme", ["hunter2pass"]),
    ("unix://:hunter2pass@", "socket path", ["hunter2pass"]),
    ("redis://:hunter2pass@a:1/0;redis://b:2/0", "';'", ["hunter2pass"]),
    ("sentinel://:hunter2pass@s1:26379;redis://s2:26379/0", "sentinel://", ["hunter2pass"]),
    ("sentinel://s1:26379/0;sentinel://s2:26379/1", "different databases", []),
]


@pytest.mark.parametrize("url,needle,fragments", BAD_REDIS_URLS)
def test_bad_redis_url_is_refused_without_echoing_the_password(
        monkeypatch: pytest.MonkeyPatch, url: str, needle: str, fragments: list[str]) -> None:
    monkeypatch.setenv("KIE_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    text = str(info.value)
    assert "KIE_REDIS_URL" in text and needle in text, text
    if fragments and needle != "unknown scheme":
        assert "percent-encode" in text, text
    for fragment in fragments:
        assert fragment not in text, (fragment, text)


def test_bad_broker_url_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_BROKER_URL", f"amqp://guest:{SECRET}@rabbit:5672//")
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    text = str(info.value)
    assert "KIE_BROKER_URL" in text and "'#'" in text and "S3cr" not in text and "tPa55" not in text


def test_unix_socket_job_store_needs_its_own_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_REDIS_URL", "unix:///run/redis.sock?db=0")
    with pytest.raises(ConfigError, match="KIE_BROKER_URL"):
        load_settings(_env_file=None)
    monkeypatch.setenv("KIE_BROKER_URL", "redis://127.0.0.1:6379/1")
    assert load_settings(_env_file=None).redis_url == "unix:///run/redis.sock?db=0"


@pytest.mark.parametrize("url", [
    "redis://localhost:6379/0", "redis://127.0.0.1:6380", "rediss://:pa%23ss%5B%40@cache.example:6380/2",
    "redis://user:pa%2Fss@[::1]:6379/0", "redis://:pa:ss@db.example:6379/0", "unix://:pw@/run/redis.sock?db=1",
    "sentinel://s1:26379;sentinel://s2:26380;sentinel://s3:26381/0", "sentinel://:pw@s1/3",
])
def test_good_redis_urls(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize("url", ["amqp://guest:guest@localhost:5672//", "pyamqp://rabbit//", "amqps://u:p@r:5671/v",
                                 "redis://localhost:6379/1", "sentinel://a:26379;sentinel://b:26379/0"])
def test_good_broker_urls(url: str) -> None:
    assert check_url(url, broker=True) == url


def test_encoded_password_reaches_the_client(make_settings) -> None:  # type: ignore[no-untyped-def]
    from kie_extend.infra.clients import redis_client

    client = redis_client("redis://:pa%23ss%5Bw%40rd@127.0.0.1:6380/4")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == "pa#ss[w@rd" and kwargs["host"] == "127.0.0.1" and kwargs["db"] == 4


@pytest.mark.parametrize("url,masked", [
    ("redis://:hunter2@127.0.0.1:6380/0", "redis://:***@127.0.0.1:6380/0"),
    ("redis://app:hunter2@127.0.0.1:6380/0", "redis://app:***@127.0.0.1:6380/0"),
    ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0"),
    ("amqp://guest:hunter2@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ("sentinel://:hunter2@s1:26379;sentinel://:hunter2@s2:26379/0",
     "sentinel://:***@s1:26379;sentinel://:***@s2:26379/0"),
    ("redis://hunter2@127.0.0.1:6380/0", "redis://***@127.0.0.1:6380/0"),
    ("redis://:hun#ter2@127.0.0.1", "redis://:***@127.0.0.1"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url) and "ter2" not in mask_url(url)


def test_sentinel_url_parts() -> None:
    ep = sentinel_endpoint("sentinel://:p%40ss@s1:26379;sentinel://s2:26380;sentinel://s3/2")
    assert ep.sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26379)] and ep.db == 2
    assert ep.password == "p@ss" and ep.username is None
    # kombu reads credentials and database from the first part only: Celery gets them on every part.
    assert celery_broker_url("sentinel://:p%40ss@s1:26379;sentinel://s2:26380/2") == \
        "sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@s2:26380/2"
    assert celery_broker_url("redis://h:1/0") == "redis://h:1/0"
    assert sentinel_transport_options("redis://h:1/0", "mymaster") == {}
    opts = sentinel_transport_options("sentinel://a:1;sentinel://b:2", "prod", "sentpw")
    assert opts["master_name"] == "prod" and opts["sentinel_kwargs"]["password"] == "sentpw"
    with pytest.raises(EndpointError, match="different credentials"):
        sentinel_endpoint("sentinel://:a@s1:1;sentinel://:b@s2:2")


def test_worker_and_producer_get_sentinel_transport_options() -> None:
    from kie_extend.api import producer_app
    from kie_extend.worker import create_app

    settings = load_settings(_env_file=None, redis_url="redis://127.0.0.1:9/0",
                             broker_url="sentinel://:pw@127.0.0.1:26390;sentinel://127.0.0.1:26391/1",
                             sentinel_master="kie-prod", queue="ha_opts_test")
    for app in (create_app(settings), producer_app(settings)):
        opts = app.conf.broker_transport_options
        assert opts["master_name"] == "kie-prod", opts
        assert app.conf.broker_url.count("/1") == 2 and app.conf.broker_url.count(":pw@") == 2
    plain = load_settings(_env_file=None, redis_url="redis://127.0.0.1:9/0", queue="ha_opts_plain")
    assert "master_name" not in (create_app(plain).conf.broker_transport_options or {})
    assert producer_app(plain).conf.broker_url == "redis://127.0.0.1:9/0"
    assert "master_name" not in (producer_app(plain).conf.broker_transport_options or {})
