"""Celery tasks: thin adapters that parse arguments and call the domain code.

Stable names (other producers send them by name): ``kie_extend.extend``. Internal:
``kie_extend.poll`` (a due job's next step), ``kie_extend.deliver`` (one handler delivery),
``kie_extend.tick`` (hands due work to workers; beat runs it in-process every KIE_TICK_INTERVAL,
see beat.py, and it can also be sent as a message).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .delivery import Delivery
from .pipeline import Pipeline
from .runtime import Runtime
from .scheduler import Scheduler

_INFRA_ERRORS = (RedisConnectionError, RedisTimeoutError)


class CeleryDispatcher:
    """Sends follow-up work as Celery messages on our queue."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app, self.queue = app, queue

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Queue a job's next step, to run at ``at`` (a sub-second countdown at most: see Pipeline.later)."""
        countdown = None if at is None else max(0.0, at - time.time())
        self.app.send_task("kie_extend.poll", kwargs={"job_id": job_id}, queue=self.queue,
                           countdown=countdown or None)

    def deliver(self, job_id: str, handler: str) -> None:
        """Queue one handler delivery."""
        self.app.send_task("kie_extend.deliver", kwargs={"job_id": job_id, "handler": handler}, queue=self.queue)


class _Services:
    """Per-process domain objects, built on first use (after the worker forks)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._pid: int | None = None

    def _build(self) -> None:
        import os

        if self._pid != os.getpid():
            settings = self.app.kie_settings  # type: ignore[attr-defined]
            self.runtime = Runtime(settings)
            self.pipeline = Pipeline(self.runtime, CeleryDispatcher(self.app, settings.queue))
            self.delivery = Delivery(self.runtime)
            self.scheduler = Scheduler(self.runtime, CeleryDispatcher(self.app, settings.queue))
            self._pid = os.getpid()

    def get_pipeline(self) -> Pipeline:
        self._build()
        return self.pipeline

    def get_delivery(self) -> Delivery:
        self._build()
        return self.delivery

    def get_scheduler(self) -> Scheduler:
        self._build()
        return self.scheduler


def register(app: Celery) -> None:
    """Register the tasks on ``app``."""
    services = _Services(app)
    app.kie_services = services  # type: ignore[attr-defined]
    retry = {"autoretry_for": _INFRA_ERRORS, "retry_backoff": 1, "retry_backoff_max": 30, "max_retries": None}

    @app.task(name="kie_extend.extend", bind=True, **retry)
    def extend(self: Task, *args: Any, request: Any = None, idempotency_key: Any = None,
               metadata: Any = None, **kwargs: Any) -> None:
        """Accept one extend request (job id = this task's id) and try to submit it."""
        extra = dict(kwargs)
        if args:
            extra["positional arguments"] = args
        services.get_pipeline().accept(self.request.id, request, idempotency_key, metadata, extra)

    @app.task(name="kie_extend.poll", **retry)
    def poll(job_id: str) -> None:
        """Do a due job's next step (submit when queued, poll when submitted)."""
        services.get_pipeline().advance(str(job_id))

    @app.task(name="kie_extend.deliver", **retry)
    def deliver(job_id: str, handler: str) -> None:
        """Deliver one job's result event to one handler."""
        services.get_delivery().deliver(str(job_id), str(handler))

    @app.task(name="kie_extend.tick", ignore_result=True)
    def tick() -> dict[str, int]:
        """Hand due work to workers (run by beat every KIE_TICK_INTERVAL; several beats are safe)."""
        return services.get_scheduler().tick()
