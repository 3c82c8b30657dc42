"""Redis clients for the job store: timeouts, retries, and Redis Sentinel, from a URL or Settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from redis.sentinel import Sentinel

from kie_extend.infra.endpoints import scheme_of, sentinel_endpoint

if TYPE_CHECKING:
    from kie_extend.config import Settings


#: Timeouts (seconds) and retries of every job-store connection, direct or through Sentinel.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 15,
    "health_check_interval": 30,
    # Re-send a command after a read timeout too (redis-py otherwise re-sends only on connection
    # errors). A slow server may have run the first copy: every state-changing script here is safe
    # to run twice (store/jobstore.py), and a transition must not fail just because its reply was late.
    "retry_on_error": [redis.exceptions.TimeoutError],
}


def redis_client(url: str, *, sentinel_master: str = "mymaster", sentinel_password: str | None = None,
                 socket_timeout: float | None = None) -> redis.Redis:
    """A Redis client with sane timeouts and retries for the job store.

    ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``sentinel://h1:26379;…/db``
    URL: then the client asks the sentinels for the master named ``sentinel_master`` (and again
    after a failover); ``sentinel_password`` authenticates to the sentinels themselves. Connects
    lazily; raises EndpointError (ValueError) on a malformed sentinel URL. ``socket_timeout``
    (seconds) overrides the default 15 s.
    """
    options = dict(REDIS_OPTIONS)
    if socket_timeout:
        options["socket_timeout"] = socket_timeout
    if scheme_of(url) != "sentinel":
        return redis.Redis.from_url(url, **options)
    endpoint = sentinel_endpoint(url)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 5}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(endpoint.sentinels, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(sentinel_master, redis_class=redis.Redis, db=endpoint.db,
                               username=endpoint.username, password=endpoint.password, **options)


def settings_redis(settings: Settings, url: str | None = None) -> redis.Redis:
    """``redis_client`` for the job store (or ``url``, e.g. a Redis broker) with the settings' Sentinel options."""
    password = settings.sentinel_password.get_secret_value() if settings.sentinel_password else None
    return redis_client(url or settings.redis_url, sentinel_master=settings.sentinel_master,
                        sentinel_password=password, socket_timeout=settings.redis_socket_timeout)
