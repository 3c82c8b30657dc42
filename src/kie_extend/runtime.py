"""The objects one process needs, built once from Settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.sentinel import Sentinel

from .admission import Admission
from .breaker import Breaker
from .reach import Reachability
from .client import KieClient
from .client_jobs import JobsClient
from .config import Settings
from .endpoints import scheme_of, sentinel_endpoint
from .gates import Gates
from .handlers import Handler, HandlerContext, build_handlers
from .keys import Keys
from .store import JobStore

if TYPE_CHECKING:
    from .infra_check import InfraProbe


class Dispatcher(Protocol):
    """How domain code asks for follow-up work without knowing Celery."""

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Run the next step of ``job_id`` at ``at`` (or now); it is already claimed on the due schedule."""

    def deliver(self, job_id: str, handler: str) -> None:
        """Deliver ``job_id``'s event to ``handler`` soon (already claimed)."""


class NoDispatch:
    """A dispatcher that leaves follow-up work to the beat tick (CLI, receiver without Celery)."""

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Nothing: the tick will claim it."""

    def deliver(self, job_id: str, handler: str) -> None:
        """Nothing: the tick will claim it."""


#: Timeouts (seconds) and retries of every job-store connection, direct or through Sentinel.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 15,
    "health_check_interval": 30,
    # Re-send a command after a read timeout too (redis-py otherwise re-sends only on connection
    # errors). A slow server may have run the first copy: every state-changing script here is safe
    # to run twice (store.py), and a transition must not fail just because its reply was late.
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


@dataclass
class Runtime:
    """Settings plus the Redis client, store, gates, provider client and handlers built from them."""

    settings: Settings
    redis: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.redis = settings_redis(self.settings)

    @cached_property
    def keys(self) -> Keys:
        """Key names under the configured prefix."""
        return Keys(self.settings.key_prefix)

    @cached_property
    def store(self) -> JobStore:
        """The job store."""
        return JobStore(self.redis, self.keys)

    @cached_property
    def gates(self) -> Gates:
        """The global submission gates."""
        s = self.settings
        return Gates(
            self.redis, self.keys, rate=s.submit_rate, margin=s.submit_rate_margin, max_in_flight=s.max_in_flight
        )

    @cached_property
    def admission(self) -> Admission:
        """Who gets the next submission slot: priority, then tenants in turn, then age."""
        s = self.settings
        return Admission(self.redis, self.keys, rate=s.submit_rate, margin=s.submit_rate_margin,
                         max_in_flight=s.max_in_flight, mode=s.admission, tenant_limits=s.tenant_limits,
                         probe_timeout=s.job_timeout + s.connect_timeout + s.read_timeout + s.lease)

    @cached_property
    def breaker(self) -> Breaker:
        """The provider breaker (README "The provider breaker")."""
        s = self.settings
        return Breaker(self.redis, self.keys, threshold=s.breaker_threshold, cooldown=s.breaker_cooldown)

    @cached_property
    def reach(self) -> Reachability:
        """Whether KIE can be reached at all (connect failures, edge 5xx); see reach.py."""
        s = self.settings
        return Reachability(self.redis, self.keys, threshold=s.unreachable_threshold, window=s.unreachable_window,
                            probe_interval=s.unreachable_probe_interval)

    @cached_property
    def infra(self) -> InfraProbe:
        """Probes whether the job store and the broker answer, and why not (infra_check.py)."""
        from .infra_check import InfraProbe

        return InfraProbe(self.settings)

    @cached_property
    def client(self) -> KieClient:
        """The provider client: the legacy route, or the createTask route when ``KIE_ROUTE=jobs``."""
        s = self.settings
        adapter = JobsClient if s.route == "jobs" else KieClient
        return adapter(
            s.base_url, s.api_key_value(), connect_timeout=s.connect_timeout, read_timeout=s.read_timeout
        )

    @cached_property
    def handlers(self) -> dict[str, Handler]:
        """The configured result handlers by name."""
        return build_handlers(self.settings.handlers, HandlerContext(self.settings, self.redis, self.keys))
