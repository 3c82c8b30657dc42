"""The objects one process needs, built once from Settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import redis

from kie_extend.admission.queues import Admission
from kie_extend.admission.breaker import Breaker
from kie_extend.admission.reach import Reachability
from kie_extend.provider.client import KieClient
from kie_extend.provider.jobs_route import JobsClient
from kie_extend.config import Settings
from kie_extend.infra.clients import settings_redis
from kie_extend.admission.gates import Gates
from kie_extend.handlers import Handler, HandlerContext, build_handlers
from kie_extend.handlers.tenants import TenantRoutes, build_tenant_handlers, own_handler_names
from kie_extend.store.keys import Keys
from kie_extend.credits.budgets import file_budgets
from kie_extend.store.jobstore import JobStore

if TYPE_CHECKING:
    from kie_extend.infra.check import InfraProbe


class Dispatcher(Protocol):
    """How domain code asks for follow-up work without knowing Celery."""

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Run the next step of ``job_id`` at ``at`` (or now); it is already claimed on the due schedule."""

    def poll_many(self, job_ids: list[str], at: float | None = None) -> None:
        """Run the next step of each of ``job_ids`` (all claimed) at ``at`` (or now), one after the
        other in one worker: one message for them all."""

    def deliver(self, job_id: str, handler: str) -> None:
        """Deliver ``job_id``'s event to ``handler`` soon (already claimed)."""


class NoDispatch:
    """A dispatcher that leaves follow-up work to the beat tick (CLI, an app served without Celery)."""

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Nothing: the tick will claim it."""

    def poll_many(self, job_ids: list[str], at: float | None = None) -> None:
        """Nothing: the tick will claim them."""

    def deliver(self, job_id: str, handler: str) -> None:
        """Nothing: the tick will claim it."""


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
                         weights={t.name: t.weight for t in s.tenants.tenants.values()} if s.tenants else None,
                         budgets=file_budgets(s),
                         probe_timeout=s.job_timeout + s.connect_timeout + s.read_timeout + s.lease)

    @cached_property
    def breaker(self) -> Breaker:
        """The provider breaker (README "The provider breaker")."""
        s = self.settings
        return Breaker(self.redis, self.keys, threshold=s.breaker_threshold, cooldown=s.breaker_cooldown)

    @cached_property
    def reach(self) -> Reachability:
        """Whether KIE can be reached at all (connect failures, edge 5xx); see admission/reach.py."""
        s = self.settings
        return Reachability(self.redis, self.keys, threshold=s.unreachable_threshold, window=s.unreachable_window,
                            probe_interval=s.unreachable_probe_interval)

    @cached_property
    def infra(self) -> InfraProbe:
        """Probes whether the job store and the broker answer, and why not (check.py)."""
        from kie_extend.infra.check import InfraProbe

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
        """Every result handler by name: the configured ones (``KIE_HANDLERS``), then each tenant's
        own from the tenants file (``webhook@<tenant>``, ``redis_stream@<tenant>``)."""
        ctx = HandlerContext(self.settings, self.redis, self.keys)
        return {**build_handlers(self.settings.handlers, ctx), **build_tenant_handlers(self.settings.tenants, ctx)}

    @cached_property
    def routes(self) -> TenantRoutes:
        """Which handlers a job's event goes to, by its tenant (no Redis read)."""
        return TenantRoutes(self.settings.handlers, own_handler_names(self.settings.tenants))
