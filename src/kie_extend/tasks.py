"""Celery tasks: thin adapters that parse arguments and call the domain code.

Stable names (other producers send them by name): ``kie_extend.extend``. Internal:
``kie_extend.poll`` (a due job's next step), ``kie_extend.deliver`` (one handler delivery),
``kie_extend.tick`` (hands due work to workers; beat runs it in-process every KIE_TICK_INTERVAL,
see admission/beat.py, and it can also be sent as a message).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

from celery import Celery, Task
from celery.exceptions import Reject

from kie_extend.handlers.delivery import Delivery
from kie_extend.infra.errors import MAX_UNEXPECTED_RETRIES, infra_retry_delay, is_infra_error
from kie_extend.jobs.ids import derived_job_id, is_valid, rule
from kie_extend.jobs.intake import POSITIONAL_FIELD
from kie_extend.jobs.pipeline import Pipeline
from kie_extend.jobs.states import JobState
from kie_extend.infra import tracing
from kie_extend.infra.runtime import Runtime
from kie_extend.store.jobstore import BATCH_REF
from kie_extend.store.steps import SEP as SUB_ID_SEP
from kie_extend.admission.tick import Scheduler

log = logging.getLogger("kie_extend.tasks")

#: Most jobs one ``kie_extend.poll`` message runs (KIE_POLL_BATCH is at most this).
MAX_POLL_BATCH = 100


def retry_later(task: Task, exc: Exception, kwargs: dict[str, Any] | None = None) -> NoReturn:
    """Retry ``task`` after a capped, jittered backoff (raises Celery's ``Retry``, which acks this
    message once the retry message is published). The task must have ``max_retries=None``: an
    explicit ``max_retries=None`` here would mean "the task's default" to Celery.

    If the retry cannot be published (the broker refuses writes), raises ``Reject(requeue=True)``:
    the message goes back to its queue, or, when even that write fails, stays unacknowledged and the
    broker redelivers it after its visibility timeout. Never acked without a successor.
    ``kwargs``: the retry's own keyword arguments instead of this message's.
    """
    delay = infra_retry_delay(task.request.retries)
    log.warning("%s[%s] retried in %.1fs: %s: %s", task.name, task.request.id, delay, type(exc).__name__, exc)
    try:
        raise task.retry(exc=exc, countdown=delay, kwargs=kwargs)
    except Reject as unsent:  # Celery's retry() turns a failed publish into Reject(requeue=False)
        log.warning("retry of %s[%s] not published (%s); message requeued", task.name, task.request.id,
                    unsent.reason)
        raise Reject(f"retry not published: {unsent.reason}", requeue=True) from exc


class CeleryDispatcher:
    """Sends follow-up work as Celery messages on our queue."""

    def __init__(self, app: Celery, queue: str, runtime: Runtime | None = None) -> None:
        self.app, self.queue, self.runtime = app, queue, runtime

    def poll(self, job_id: str, at: float | None = None) -> None:
        """Queue a job's next step, to run at ``at`` (a sub-second countdown at most: see Pipeline.later)."""
        countdown = None if at is None else max(0.0, at - time.time())
        with tracing.attached(self._traceparent(job_id)):
            self.app.send_task("kie_extend.poll", kwargs={"job_id": job_id}, queue=self.queue,
                               countdown=countdown or None)

    def poll_many(self, job_ids: list[str], at: float | None = None) -> None:
        """Queue several due jobs' next steps as one message (one job: as :meth:`poll`)."""
        if len(job_ids) == 1:
            self.poll(job_ids[0], at)
            return
        countdown = None if at is None else max(0.0, at - time.time())
        self.app.send_task("kie_extend.poll", kwargs={"job_ids": list(job_ids)}, queue=self.queue,
                           countdown=countdown or None)

    def deliver(self, job_id: str, handler: str) -> None:
        """Queue one handler delivery."""
        with tracing.attached(self._traceparent(job_id)):
            self.app.send_task("kie_extend.deliver", kwargs={"job_id": job_id, "handler": handler},
                               queue=self.queue)

    def _traceparent(self, job_id: str) -> str | None:
        """The job's stored trace context when tracing is on (one HGET), so the message joins the
        job's trace whatever span is current (the tick's none, an HTTP request's another trace);
        None when off (no read), for a batch's delivery, or when the job has none."""
        if not tracing.enabled() or self.runtime is None or job_id.startswith(BATCH_REF):
            return None
        return tracing.job_traceparent(self.runtime.redis, self.runtime.keys.job(job_id.split(SUB_ID_SEP)[0]))


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
            self.pipeline = Pipeline(self.runtime, CeleryDispatcher(self.app, settings.queue, self.runtime))
            self.delivery = Delivery(self.runtime)
            self.scheduler = Scheduler(self.runtime, CeleryDispatcher(self.app, settings.queue, self.runtime))
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

    @app.task(name="kie_extend.extend", shared=False, bind=True, max_retries=None)
    def extend(self: Task, *args: Any, request: Any = None, idempotency_key: Any = None,
               metadata: Any = None, tenant: Any = None, priority: Any = None, batch_id: Any = None,
               not_after: Any = None, steps: Any = None, takes: Any = None, **kwargs: Any) -> None:
        """Accept one extend request (job id = this task's id) and try to submit it.

        Never acked before the job record is written: any error is retried (infrastructure errors
        forever); an unexpected error that outlasts MAX_UNEXPECTED_RETRIES fails the job instead.
        """
        extra = dict(kwargs)
        if args:
            extra[POSITIONAL_FIELD] = args
        if not is_valid("job_id", self.request.id):
            _bad_task_id(self, services.get_pipeline(), self.request.id)
            return
        try:
            services.get_pipeline().accept(self.request.id, request, idempotency_key, metadata, extra,
                                           tenant=tenant, priority=priority, batch_id=batch_id, not_after=not_after,
                                           steps=steps, takes=takes)
        except Exception as exc:
            if is_infra_error(exc) or self.request.retries < MAX_UNEXPECTED_RETRIES:
                retry_later(self, exc)
            _give_up_extend(services.get_pipeline(), str(self.request.id), exc)

    @app.task(name="kie_extend.poll", shared=False, bind=True, max_retries=None)
    def poll(self: Task, job_id: Any = None, job_ids: Any = None) -> None:
        """Do a due job's next step (submit when queued, poll when submitted); ``job_ids``: several
        due jobs' steps, one after the other (the tick groups them when many fall due at once)."""
        if job_ids is None:
            try:
                services.get_pipeline().advance(str(job_id))
            except Exception as exc:
                if not is_infra_error(exc):
                    raise  # the due schedule's lease brings the job back
                retry_later(self, exc)
            return
        _poll_many(self, services, job_ids)

    @app.task(name="kie_extend.deliver", shared=False, bind=True, max_retries=None)
    def deliver(self: Task, job_id: str, handler: str) -> None:
        """Deliver one job's result event to one handler."""
        try:
            services.get_delivery().deliver(str(job_id), str(handler))
        except Exception as exc:
            if not is_infra_error(exc):
                raise  # the delivery schedule's lease brings it back
            retry_later(self, exc)

    @app.task(name="kie_extend.tick", shared=False, ignore_result=True)
    def tick() -> dict[str, int]:
        """Hand due work to workers (run by beat every KIE_TICK_INTERVAL; several beats are safe)."""
        return services.get_scheduler().tick()


def _poll_many(task: Task, services: _Services, job_ids: Any) -> None:
    """Advance each job of a grouped poll message in turn. An infrastructure error retries the
    message with the jobs not yet done; another error is logged, the rest still run, and the first
    is raised at the end (the due schedule's lease brings its job back). The records are read (and
    polls claimed) for all of them in one round trip first. Past a third of KIE_LEASE the jobs left
    go out as a message of their own, their claims released, so none waits on its neighbours until
    its claim runs out."""
    if not isinstance(job_ids, (list, tuple)):
        log.error("kie_extend.poll[%s]: job_ids must be a list of job ids, not %s; ignored", task.request.id,
                  type(job_ids).__name__)
        return
    ids = list(dict.fromkeys(str(one) for one in job_ids[:MAX_POLL_BATCH]))
    pipeline = services.get_pipeline()
    budget = time.monotonic() + pipeline.s.lease / 3
    try:
        reads = pipeline.read_steps(ids)  # one round trip for every record (and poll claim)
    except Exception as exc:
        if not is_infra_error(exc):
            raise  # the due schedule's leases bring the jobs back
        retry_later(task, exc)
    first: Exception | None = None
    for i, job_id in enumerate(ids):
        if i and time.monotonic() > budget:
            rest = ids[i:]
            pipeline.unclaim({j: reads[j] for j in rest if j in reads})
            pipeline.dispatch.poll_many(rest)
            break
        try:
            pipeline.advance(job_id, reads.pop(job_id, None))
        except Exception as exc:
            if is_infra_error(exc):
                retry_later(task, exc, kwargs={"job_ids": ids[i:]})
            log.exception("kie_extend.poll[%s]: job %s failed: %s", task.request.id, job_id, exc)
            first = first or exc
    if first is not None:
        raise first


def bad_id_reason(raw: Any) -> str:
    """The error message of a job recorded under a derived id (see :func:`record_bad_task_id`)."""
    shown = str(raw)[:200].encode("ascii", "backslashreplace").decode("ascii")
    return (f"the message's task id {shown!r} is not a valid job id ({rule('job_id')}); the job is recorded "
            f"under the derived id {derived_job_id(raw)} and nothing was sent")


def record_bad_task_id(pipeline: Pipeline, raw: Any) -> str:
    """Record a message whose task id breaks the id grammar: never under that id, but as a
    ``failed / invalid_request`` job under :func:`~kie_extend.jobs.ids.derived_job_id` (the same message
    always maps to the same id, so a redelivery changes nothing), counted as ``bad_job_ids``.
    Returns the derived id."""
    job_id = derived_job_id(raw)
    log.warning("extend message with an invalid task id %r recorded as failed job %s", str(raw)[:200], job_id,
                extra={"job_id": job_id})
    if pipeline.reject_malformed(job_id, bad_id_reason(raw)):
        pipeline.store.stat("bad_job_ids")
    return job_id


def _bad_task_id(task: Task, pipeline: Pipeline, raw: Any) -> None:
    try:
        record_bad_task_id(pipeline, raw)
    except Exception as exc:
        if is_infra_error(exc):
            retry_later(task, exc)
        raise


def _give_up_extend(pipeline: Pipeline, job_id: str, exc: Exception) -> None:
    """An extend message that kept failing for a non-infrastructure reason: make sure its job is
    recorded (failed as an unprocessable message when it has no record yet) before the ack."""
    log.error("extend %s failed %d times: %s: %s", job_id, MAX_UNEXPECTED_RETRIES + 1, type(exc).__name__, exc,
              extra={"job_id": job_id})
    try:
        rec = pipeline.store.get_record(job_id)
        if rec is None:
            reason = f"the worker could not process this message: {type(exc).__name__}: {exc}"[:300]
            if not pipeline.reject_malformed(job_id, reason) and pipeline.store.get(job_id) is None:
                raise RuntimeError("the failed job was not recorded")
        elif rec.state is JobState.QUEUED:
            pipeline.store.schedule(job_id, time.time() + pipeline.s.lease)  # the tick drives it from here
    except Exception as again:
        raise Reject(f"job record not written: {type(again).__name__}: {again}", requeue=True) from exc
