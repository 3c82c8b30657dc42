"""The life of one job, as plain domain code: accept, submit, poll, finish.

Celery tasks are thin adapters over these methods. Nothing here sleeps: a job that must wait
(rate slot, in-flight room, pause, next poll) is put on a Redis schedule and the beat tick hands
it back to a worker when it is due.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from kie_extend import errors as E
from kie_extend.provider.client import FAILED_STATUSES, TaskRecord, track_has_audio
from kie_extend.credits.prices import estimate
from kie_extend.handlers.delivery import Delivery
from kie_extend.jobs.events import build_event
from kie_extend.infra import tracing
from kie_extend.infra.errors import is_infra_error
from kie_extend.jobs.idempotency import CONFLICT_MESSAGE, Idempotency, message_digest, request_fingerprint
from kie_extend.jobs.intake import check_message
from kie_extend.infra.metrics import POLL_BUCKETS, RESULT_BUCKETS
from kie_extend.admission.queues import Admitted
from kie_extend.credits.ledger import charge_of
from kie_extend.admission.gates import Decision
from kie_extend.infra.runtime import Dispatcher, NoDispatch, Runtime
from kie_extend.store.jobstore import BATCH_REF, Moved, OneTrip, new_op
from kie_extend.store.record import EMPTY, JobRecord, as_record, iso_ms
from kie_extend.jobs.progress import STAGES as PROGRESS_STAGES, Progress
from kie_extend.jobs.steps import Steps, has_plan
from kie_extend.store.steps import SEP as SUB_ID_SEP
from kie_extend.jobs.states import TERMINAL, JobState

log = logging.getLogger("kie_extend.jobs.pipeline")

#: Callback types that only report progress; the final ones (complete, error) trigger a poll.
PROGRESS_CALLBACKS = frozenset({"text", "first"})
#: ``error.message`` of a cancelled job, by ``error.reason``.
CANCEL_MESSAGES = {
    "operator": "cancelled before it was sent to KIE",
    "deadline": "not sent to KIE before its not_after deadline",
}
#: Seconds a submit attempt may take before the due schedule looks at it again.
SUBMIT_LEASE_SLACK = 5.0


#: A due job's record as read for its next step: (epoch seconds of the read, the raw record or None,
#: the poll claim as JobStore.get_for_step returns it).
StepRead = tuple[float, "dict[str, str] | None", "float | None | str"]


def _jitter(seconds: float, spread: float = 0.2) -> float:
    return seconds * (1 - spread + 2 * spread * random.random())


def _error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "message": message, **{k: v for k, v in extra.items() if v is not None}}


def _log(job_id: str, level: int, msg: str, *args: Any, task_id: str | None = None) -> None:
    log.log(level, msg, *args, extra={"job_id": job_id, "kie_task_id": task_id})


class Pipeline:
    """Moves jobs through ``queued → submitting → submitted → succeeded | failed``."""

    def __init__(self, rt: Runtime, dispatcher: Dispatcher | None = None) -> None:
        self.rt = rt
        self.s = rt.settings
        self.store = rt.store
        self.gates = rt.gates
        self.dispatch = dispatcher or NoDispatch()
        self.delivery = Delivery(rt)
        self.idem = Idempotency(rt.redis, rt.keys, self.s.idempotency_window)
        self.steps = Steps(self)
        self.progress = Progress(rt)

    def later(self, job_id: str, at: float) -> None:
        """Run ``job_id``'s next step at ``at``: a wait shorter than a tick goes out now as a short
        countdown message (claimed under a lease); a longer one waits on the due schedule."""
        now = time.time()
        if at - now <= self.s.tick_interval and not isinstance(self.dispatch, NoDispatch):
            self.store.schedule(job_id, max(at, now) + self.s.lease)
            self.dispatch.poll(job_id, at=at)
        else:
            self.store.schedule(job_id, at)

    # -- accept ------------------------------------------------------------------------------
    def accept(self, job_id: str, request: Any, idempotency_key: Any = None, metadata: Any = None,
               extra_kwargs: dict[str, Any] | None = None, *, tenant: Any = None, priority: Any = None,
               batch_id: Any = None, not_after: Any = None, steps: Any = None, takes: Any = None) -> None:
        """Record a new job from an extend message and try to submit it at once (see :meth:`_accept`).
        The step's bookkeeping writes (counters, histograms) go out in one round trip at its end."""
        with tracing.job_span("kie.accept", job_id), self.store.deferred():
            self._accept(job_id, request, idempotency_key, metadata, extra_kwargs, tenant=tenant, priority=priority,
                         batch_id=batch_id, not_after=not_after, steps=steps, takes=takes)

    def _accept(
        self,
        job_id: str,
        request: Any,
        idempotency_key: Any = None,
        metadata: Any = None,
        extra_kwargs: dict[str, Any] | None = None,
        *,
        tenant: Any = None,
        priority: Any = None,
        batch_id: Any = None,
        not_after: Any = None,
        steps: Any = None,
        takes: Any = None,
    ) -> None:
        """Record a new job from an extend message and try to submit it at once.

        Redelivered messages are harmless: an existing record is only advanced. A message that
        breaks the rules becomes a failed job with ``invalid_request`` and its result event; one
        whose ``not_after`` has passed, or whose batch was cancelled, ends ``cancelled``.
        """
        options = {"tenant": tenant, "priority": priority, "batch_id": batch_id, "not_after": not_after,
                   "steps": steps, "takes": takes}
        digest = message_digest(request, idempotency_key, metadata, options)
        if idempotency_key:
            # A redelivery must not use its key a second time. Without a key, no read up front: the
            # first write expects no record and finds a redelivery (or a reused id) itself.
            rec = self.store.get_record(job_id)
            if rec is not None:
                self._known(job_id, rec, digest)
                return
        intake = check_message(request, settings=self.s, idempotency_key=idempotency_key, metadata=metadata,
                               job_id=job_id, extra_kwargs=extra_kwargs, **options)
        problems, body, warnings = intake.problems, intake.body, intake.warnings
        metadata, idempotency_key = intake.metadata, intake.idempotency_key
        if not problems and not body.get("callBackUrl"):
            if self.s.callback_base_url:
                body["callBackUrl"] = f"{self.s.callback_base_url}/kie/callback/{job_id}"
            else:
                problems.append({
                    "field": "callBackUrl",
                    "message": "the provider requires a callBackUrl: set KIE_CALLBACK_BASE_URL "
                    "or put callBackUrl in the request",
                })
        now = time.time()
        # The hash holds what cannot be derived: the id is its key, ``created_at`` is ``created_ts``
        # as text (store/record.py), a counter not yet counted reads 0, no metadata reads ``{}``.
        # A queued backlog's hashes stay within one small listpack (README "Backlog memory").
        base = {
            "request": _safe_json(body),
            "metadata": metadata or None,
            "created_ts": now,
            "idempotency_key": idempotency_key,
            "msg_sha": digest,
            "tenant": intake.tenant,
            "priority": intake.priority,
            "batch_id": intake.batch_id,
            "not_after": intake.not_after,
            "rq": self.rt.admission.queue_of(intake.tenant, intake.priority),
            # The estimate its admission reserves (credits/ledger.py), fixed when the job is accepted.
            "price": estimate(self.s.prices),
            # The follow-up steps asked for (jobs/plan.py), run once the extension has succeeded.
            "steps_plan": {"steps": intake.steps, "takes": intake.takes} if intake.steps else None,
            # The W3C trace context of this accept (infra/tracing.py): the parent of the job's later spans.
            "traceparent": tracing.current_traceparent(),
        }
        tracing.annotate_current(kie_tenant=intake.tenant, kie_batch_id=intake.batch_id, kie_priority=intake.priority)
        for w in warnings:
            _log(job_id, logging.WARNING, "request warning: %s", w)
        if problems:
            _log(job_id, logging.WARNING, "invalid request: %s", problems)
            error = _error("invalid_request", f"request failed validation: {E.describe_problems(problems)}",
                           errors=problems)
            if not self._finish(job_id, EMPTY, JobState.FAILED, {**base, "error": error}, expect=[None]):
                self._known(job_id, self.store.get_record(job_id) or EMPTY, digest)
            return
        reason = self._too_late_to_start(intake.not_after, intake.batch_id, now)
        if reason:
            error = _error("cancelled", CANCEL_MESSAGES[reason], reason=reason)
            if not self._finish(job_id, EMPTY, JobState.CANCELLED, {**base, "error": error}, expect=[None]):
                self._known(job_id, self.store.get_record(job_id) or EMPTY, digest)
            return
        if idempotency_key:
            outcome, first = self.idem.use_key(idempotency_key, intake.tenant, job_id,
                                               request_fingerprint(request, intake.tenant))
            if outcome == "conflict":
                self.refuse_conflict(job_id, base)
                return
            if outcome == "duplicate":
                if not self.store.create_pointer(job_id, {**base, "duplicate_of": first},
                                                 ttl=self.s.idempotency_window,
                                                 handlers=self.rt.routes.names_for(intake.tenant)):
                    self._known(job_id, self.store.get_record(job_id) or EMPTY, digest)
                    return
                _log(job_id, logging.INFO, "duplicate of %s (idempotency key), not submitted", first)
                return
        # The new record, the admission that follows it (try_submit's) and, when that admission
        # grants this job a send slot now, its move to submitting go out in one round trip. The
        # move is chained: it happens only if nothing moved the job since its creation and the rate
        # log holds its first send; otherwise try_submit takes over from the admission's answer.
        trip = OneTrip(self.rt.redis)
        created_op = new_op()
        self.store.transition(job_id, JobState.QUEUED, expect=[None], fields=base, stat="jobs_accepted", ready=True,
                              pipe=trip, op=created_op)
        self.rt.admission.admit(self.s.submit_rate[0], own=job_id, lease=self.s.lease, pipe=trip)
        started = time.time()
        self.store.transition(
            job_id, JobState.SUBMITTING, expect=[JobState.QUEUED],
            fields={"attempts": 1, "sends": 1, "submit_started_ts": started, "submit_error": None, "admitted": None},
            due=started + self.s.connect_timeout + self.s.read_timeout + SUBMIT_LEASE_SLACK, stat="submissions",
            pipe=trip, after=created_op, send=f"s:{job_id}:1")
        with tracing.job_span("kie.admit", job_id, kie_admission__inline=True) as span:
            created, found, sending = trip.execute()
            mine = self._admitted(job_id, self.rt.admission.admitted(found))
            if span is not None:  # tracing on
                granted = self.store.moved(job_id, sending) or (mine and mine.granted)
                tracing.annotate(span, kie_admission__granted=bool(granted))
        if not self.store.moved(job_id, created):
            # Another delivery of this message (or another producer's message under the same id)
            # created the record first: look at it and carry on from there (a slot the admission
            # just gave it is found there, on its record).
            self._known(job_id, self.store.get_record(job_id) or EMPTY, digest)
            return
        _log(job_id, logging.INFO, "queued")
        rec = JobRecord.from_hash({
            "state": JobState.QUEUED.value, "request": json.dumps(base["request"]), "created_ts": repr(now),
            "attempts": "0", "batch_id": intake.batch_id or "",
            "not_after": "" if intake.not_after is None else repr(intake.not_after)})
        if self.store.moved(job_id, sending):
            self._send(job_id, rec, 1)
            return
        self.try_submit(job_id, rec, in_ready=True, admission=(mine,))

    def refuse_conflict(self, job_id: str, base: dict[str, Any]) -> bool:
        """Record a job whose idempotency key another request holds (in its tenant) as failed with
        ``invalid_request`` and its own result event; False when ``job_id`` already has a record."""
        self.store.stat("idempotency_conflicts")
        error = _error("invalid_request", CONFLICT_MESSAGE,
                       errors=[{"field": "idempotency_key", "message": CONFLICT_MESSAGE}])
        return bool(self._finish(job_id, EMPTY, JobState.FAILED, {**base, "error": error}, expect=[None]))

    def _too_late_to_start(self, not_after: float | None, batch_id: str | None, now: float) -> str | None:
        """``"deadline"`` or ``"operator"`` (its batch was cancelled) when a new job must not start."""
        if not_after is not None and not_after <= now:
            return "deadline"
        if batch_id and self.rt.redis.hget(self.rt.keys.batch(batch_id), "cancelled"):
            return "operator"
        return None

    def _known(self, job_id: str, rec: JobRecord, digest: str) -> None:
        """A message for a job id that already has a record: a redelivery, or a reused id."""
        if rec.msg_sha and rec.msg_sha != digest:
            self.store.stat("job_id_conflicts")
            _log(job_id, logging.WARNING, "job id %s already holds a different request: this message is "
                 "ignored (job ids must be unique; the first request keeps the id)", job_id)
        else:
            _log(job_id, logging.INFO, "message for an existing job (a redelivery): nothing new to do")
        if rec.state is JobState.QUEUED:
            self.try_submit(job_id)

    def reject_malformed(self, job_id: str, reason: str) -> bool:
        """Record an extend message that could not even be read as a failed job with its event."""
        now = time.time()
        fields = {"request": {}, "created_ts": now,
                  "error": _error("invalid_request", reason, errors=[{"field": "message", "message": reason}])}
        _log(job_id, logging.WARNING, "malformed message: %s", reason)
        return self._finish(job_id, EMPTY, JobState.FAILED, fields, expect=[None])

    # -- submit ------------------------------------------------------------------------------
    def try_submit(self, job_id: str, raw: JobRecord | Mapping[str, str] | None = None, in_ready: bool = False,
                   admission: tuple[Admitted | None] | None = None) -> None:
        """Send a queued job to the provider when admission has given it a slot; otherwise put it
        in its ready queue and let admission decide (now, or at a later tick).

        ``raw`` is the record (a JobRecord, or its raw hash) when the caller has just written it
        (saves a read); ``in_ready`` says it is already in its ready queue; ``admission``: ``(its
        admission or None,)`` when the caller already ran admission for it (the other jobs
        admitted then already handed on)."""
        rec = (as_record(raw) if raw else None) or self.store.get_record(job_id)
        if rec is None or rec.state is not JobState.QUEUED:
            return
        now = time.time()
        if rec.not_after is not None and rec.not_after <= now:
            self.cancel(job_id, "deadline", rec)
            return
        if rec.request_text is None:
            # Its request key was evicted or deleted (doctor: missing_request): it can never be sent.
            message = "the stored request is gone (evicted or deleted from Redis); enqueue it again"
            self._finish(job_id, rec, JobState.FAILED, {"error": _error(
                "invalid_request", message, errors=[{"field": "request", "message": message}])},
                expect=[JobState.QUEUED])
            return
        granted = False
        if not rec.admitted:
            if not in_ready:
                self.store.enqueue_ready(job_id)
            if admission is None:
                with tracing.job_span("kie.admit", job_id, rec.raw.get(tracing.FIELD)) as span:
                    mine = self._admit_now(job_id)
                    tracing.annotate(span, kie_admission__granted=bool(mine and mine.granted))
            else:
                mine = admission[0]  # the caller's admission (its own kie.admit span)
            if mine is None:
                return  # waits in its ready queue; the tick admits it when its turn comes
            if not mine.granted:
                self.later(job_id, mine.at)
                return
            granted = True
        attempt = rec.attempts + 1
        # The rate-slot token names this send; it changes after every real send, never reused.
        send = rec.sends + 1
        decision = Decision("ok") if granted else self.gates.acquire(job_id, f"{job_id}:{send}")
        if decision.verdict in ("paused", "unreachable", "breaker", "inflight", "lost"):
            self.store.enqueue_ready(job_id)  # back in line, at its age; admission picks it again
            # A breaker probe that is not sent now frees its turn, or no other probe could go
            # until the probe timeout (about KIE_JOB_TIMEOUT) ran out.
            self.rt.breaker.neutral(job_id)
            self.store.stat(f"gate_wait_{decision.verdict}")
            return
        if decision.verdict == "wait":
            self.later(job_id, time.time() + decision.wait)
            self.store.stat("gate_wait_rate")
            return
        now = time.time()
        lease_end = now + self.s.connect_timeout + self.s.read_timeout + SUBMIT_LEASE_SLACK
        if not self.store.transition(
            job_id, JobState.SUBMITTING, expect=[JobState.QUEUED],
            fields={"attempts": attempt, "sends": send, "submit_started_ts": now, "submit_error": None,
                    "admitted": None},
            due=lease_end, stat="submissions",
        ):
            now_rec = self.store.get_record(job_id)
            if now_rec is None or now_rec.state not in (JobState.SUBMITTING, JobState.SUBMITTED):
                self.gates.release(job_id)
            return
        self._send(job_id, rec, attempt)

    def _send(self, job_id: str, rec: JobRecord, attempt: int) -> None:
        """Send a job this process has just moved to ``submitting`` (attempt ``attempt``) and record the outcome."""
        with tracing.job_span("kie.submit", job_id, rec.raw.get(tracing.FIELD), kie_attempt=attempt):
            self._send_traced(job_id, rec, attempt)

    def _send_traced(self, job_id: str, rec: JobRecord, attempt: int) -> None:
        body = rec.request
        if body is None:
            raise ValueError(f"job {job_id}'s record holds no readable request")
        try:
            task_id = self.rt.client.submit_extend(body)
        except E.ProviderError as exc:
            self._submit_failed(job_id, rec, attempt, exc)
            return
        tracing.annotate_current(kie_task_id=task_id)
        self._record_submitted(job_id, task_id, callbacks=self._ours(body))
        self._answered()

    def _record_submitted(self, job_id: str, task_id: str, callbacks: bool) -> None:
        """Write down a task KIE accepted. Its id exists only in this process until then, so an
        infrastructure error (Redis out of memory, read-only, failing over) is retried here with
        backoff for up to KIE_LEASE rather than given up: otherwise the paid task could only be
        found again through a callback."""
        delay, deadline = 0.2, time.monotonic() + self.s.lease
        while True:
            try:
                self._submitted(job_id, task_id, stat="submit_code_200", callbacks=callbacks)
                return
            except Exception as exc:
                if not is_infra_error(exc) or time.monotonic() + delay > deadline:
                    _log(job_id, logging.ERROR, "KIE accepted task %s but it could not be recorded (%s: %s)",
                         task_id, type(exc).__name__, exc, task_id=task_id)
                    raise
                _log(job_id, logging.WARNING, "recording accepted task %s failed (%s); trying again in %.1fs",
                     task_id, type(exc).__name__, delay, task_id=task_id)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _admit_now(self, job_id: str) -> Admitted | None:
        """Run admission for the slots free right now; hand the other admitted jobs to workers and
        return this job's admission, or None when it still waits."""
        return self._admitted(job_id, self.rt.admission.admit(self.s.submit_rate[0], own=job_id, lease=self.s.lease))

    def _admitted(self, job_id: str, admitted: list[Admitted]) -> Admitted | None:
        """Hand the jobs an admission gave slots to on (each at its slot), but ``job_id``'s own, returned."""
        mine = None
        for one in admitted:
            if one.job_id == job_id:
                mine = one
            else:
                self.later(one.job_id, one.at)
        return mine

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "operator", raw: JobRecord | Mapping[str, str] | None = None) -> str:
        """Cancel a job not yet sent to KIE: ``"cancelled"``; else why not: ``"too_late"`` (sent:
        KIE has no cancel call, it keeps going), ``"finished"``, ``"not_found"``.

        Cancel and submit race in one atomic step (the move out of ``queued``): never both."""
        rec = as_record(raw) if raw is not None else self.store.get_record(job_id)
        if rec is None or not rec.state_text:
            return "not_found"
        if rec.state is JobState.QUEUED:
            error = _error("cancelled", CANCEL_MESSAGES.get(reason, reason), reason=reason)
            if self._finish(job_id, rec, JobState.CANCELLED, {"error": error}, expect=[JobState.QUEUED]):
                return "cancelled"
            rec = self.store.get_record(job_id) or EMPTY
        if rec.state in (JobState.SUBMITTING, JobState.SUBMITTED):
            return "too_late"
        return "finished" if rec.state_text else "not_found"

    def cancel_many(self, jobs: list[tuple[str, JobRecord | Mapping[str, str]]], reason: str = "operator") -> int:
        """Cancel many queued jobs in one round trip (``(job_id, record)`` pairs, as read: JobRecord or raw hash); returns
        how many were cancelled. Each move is the same atomic step as :meth:`cancel`; their events
        go through the outbox (the tick hands the deliveries out) instead of inline delivery."""
        if not jobs:
            return 0
        error = _error("cancelled", CANCEL_MESSAGES.get(reason, reason), reason=reason)
        routes = self.rt.routes
        now = time.time()
        records = [(job_id, as_record(raw) or EMPTY) for job_id, raw in jobs]
        pipe = self.rt.redis.pipeline(transaction=False)
        for job_id, rec in records:
            fields = {"error": error, "finished_at": iso_ms()}
            event = build_event(rec, JobState.CANCELLED, {"job_id": job_id, **fields})
            self.store.transition(job_id, JobState.CANCELLED, expect=[JobState.QUEUED], fields=fields, event=event,
                                  handlers=list(routes.names_for(rec.tenant)), retention=self.s.retention,
                                  deliveries_at=now, pipe=pipe)
        results = pipe.execute()
        n = 0
        for (job_id, rec), result in zip(records, results):
            if int(result[0]):
                n += 1
                if rec.admitted:
                    self.rt.breaker.neutral(job_id)  # it may have been the breaker's probe
        if n:
            log.warning("%d job(s) cancelled (%s)", n, reason)
        return n

    def _ours(self, body: dict[str, Any]) -> bool:
        """Whether the provider's callbacks for this request come to our callback route (serve)."""
        base = self.s.callback_base_url
        return bool(base) and str(body.get("callBackUrl") or "").startswith(f"{base}/kie/callback/")

    def _submitted(self, job_id: str, task_id: str, stat: str = "", callbacks: bool = False) -> bool:
        # With our callback route in place the final callback wakes the job, so the first safety-net
        # poll can wait longer; without one, polling starts after KIE_POLL_FIRST.
        first = max(self.s.poll_first, self.s.poll_callback_interval / 2) if callbacks else self.s.poll_first
        now = time.time()
        ok = self.store.transition(
            job_id, JobState.SUBMITTED, expect=[JobState.SUBMITTING],
            fields={"kie_task_id": task_id, "submitted_at": iso_ms(now), "submitted_ts": now,
                    "poll_interval": self.s.poll_interval, "outcome_unknown": None, "unreached": None},
            due=now + _jitter(first, 0.1), stat=stat,
        )
        if ok:
            _log(job_id, logging.INFO, "submitted", task_id=task_id)
        return ok

    def _unreachable(self, exc: E.ProviderError, job_id: str, task_id: str | None = None) -> bool:
        """Count a failure with no answer from KIE itself (connect-level, edge 5xx, read timeout;
        errors.is_unreachable) towards "provider unreachable" (admission/reach.py); True when the provider
        counts as unreachable now (this failure, or an earlier run of them)."""
        if self.rt.reach.failure(str(exc)):
            self.store.stat("provider_unreachable")
            _log(job_id, logging.ERROR, "KIE cannot be reached (%d connect failures, edge errors or timeouts within %gs, "
                 "the last: %s); submission paused for every job, probing every %gs", self.s.unreachable_threshold,
                 self.s.unreachable_window, exc, self.s.unreachable_probe_interval, task_id=task_id)
            return True
        return self.rt.reach.unreachable()

    def _answered(self) -> None:
        """KIE answered this process: clear its run of connect failures (ends an outage too)."""
        if self.rt.reach.answered():
            self.store.stat("provider_reachable_again")
            log.warning("KIE answers again; submission resumed")

    def _submit_failed(self, job_id: str, rec: JobRecord, attempt: int, exc: E.ProviderError) -> None:
        code = getattr(exc, "code", None)
        self._record_code(code if code is not None else type(exc).__name__)
        now = time.time()
        if E.is_unreachable(exc):
            paused = self._unreachable(exc, job_id)
            if E.costs_nothing(exc):
                # It never reached KIE: the attempt is given back. While KIE is unreachable the job
                # waits in its ready queue (admission holds it); before that, it tries again after
                # a backoff that grows with its own run of such failures.
                unreached = rec.unreached + 1
                fields = {"attempts": attempt - 1, "submit_error": str(exc), "unreached": unreached}
                if paused:
                    self.store.transition(job_id, JobState.QUEUED, expect=[JobState.SUBMITTING], fields=fields,
                                          due=None, ready=True)
                    _log(job_id, logging.WARNING, "KIE cannot be reached (%s); waiting in queued", exc)
                else:
                    delay = E.retry_delay(exc, unreached, rate_window=self.gates.window)
                    self.store.transition(job_id, JobState.QUEUED, expect=[JobState.SUBMITTING], fields=fields,
                                          due=now + delay)
                    _log(job_id, logging.WARNING, "KIE could not be reached (%s); trying again in %.1fs "
                         "(no attempt counted)", exc, delay)
                return
        elif isinstance(exc, E.ProviderCodeError):
            self._answered()  # KIE itself answered, with an error
        if isinstance(exc, E.OutcomeUnknownError):
            # Never resend: the provider may hold (and bill) this request. A callback on the job's
            # own URL can still tell us its taskId; otherwise it fails after the window.
            self.store.update(job_id, outcome_unknown=1, submit_error=str(exc))
            self.store.schedule(job_id, now + self.s.submit_unknown_window)
            self.store.stat("submit_outcome_unknown")
            _log(job_id, logging.WARNING, "submit outcome unknown (%s); waiting for a callback", exc)
            return
        if isinstance(exc, E.GenerationFailedError):
            self._generation_failed(job_id)
        if isinstance(exc, E.AccountError):
            self.gates.pause(exc.code, exc.msg or type(exc).__name__)
            self.store.transition(job_id, JobState.QUEUED, expect=[JobState.SUBMITTING],
                                  fields={"attempts": attempt - 1, "submit_error": str(exc)}, due=None, ready=True)
            _log(job_id, logging.ERROR, "provider refused the account (%s); submission paused", exc)
            return
        if exc.retryable and attempt < self.s.max_submit_attempts:
            delay = E.retry_delay(exc, attempt, rate_window=self.gates.window,
                                  maintenance=self.s.maintenance_backoff)
            self.store.transition(job_id, JobState.QUEUED, expect=[JobState.SUBMITTING],
                                  fields={"submit_error": str(exc)}, due=now + delay)
            _log(job_id, logging.WARNING, "submit attempt %d failed (%s); retry in %.1fs", attempt, exc, delay)
            return
        kind = "provider_unavailable" if exc.retryable else exc.kind
        error = _error(kind, str(exc), code=code)
        self._finish(job_id, rec, JobState.FAILED, {"error": error}, expect=[JobState.SUBMITTING])

    # -- advance: whatever is due next -------------------------------------------------------
    def read_steps(self, job_ids: list[str]) -> dict[str, StepRead]:
        """Read several due jobs' records (and claim the submitted ones' polls) in one round trip,
        for :meth:`advance`'s ``read``: ``{job_id: (epoch seconds of the read, record or None, claim)}``.
        Follow-up steps' sub-ids are not read here (jobs/steps.py reads its own). Raises what Redis raises."""
        plain = [job_id for job_id in job_ids if SUB_ID_SEP not in job_id]
        if not plain:
            return {}
        now = time.time()
        found = self.store.get_for_steps(plain, now, self.s.poll_min_gap, self.s.lease)
        return {job_id: (now, one[0], one[1]) for job_id, one in zip(plain, found) if one is not None}

    def unclaim(self, reads: dict[str, StepRead]) -> None:
        """Undo the poll claims that :meth:`read_steps` took for jobs not advanced after all (one round
        trip): they can be polled at once, and their poll counts stay true."""
        with self.store.deferred():
            for job_id, (at, raw, claim) in reads.items():
                if claim is None:
                    self.store.unclaim_poll(job_id, at, self.s.lease, raw)

    def advance(self, job_id: str, read: StepRead | None = None) -> None:
        """Do a due job's next step: submit it, resolve an unknown submit, or poll it. The record is
        read (and a submitted job's poll claimed) in one round trip, or comes as ``read`` from
        :meth:`read_steps`; the step's bookkeeping writes go out in one more at its end. A follow-up
        step's sub-id (``<job>~<n>``) goes to jobs/steps.py."""
        if SUB_ID_SEP in job_id:
            self.steps.advance(job_id)
            return
        with self.store.deferred():
            if read is None:
                now = time.time()
                raw, claim = self.store.get_for_step(job_id, now, self.s.poll_min_gap, self.s.lease)
            else:
                now, raw, claim = read
            rec = None if raw is None else JobRecord.from_hash(raw)
            if rec is None or rec.state_text is None:
                self.store.unschedule(job_id)
                return
            if rec.state is JobState.QUEUED:
                self.try_submit(job_id, rec)
            elif rec.state is JobState.SUBMITTING:
                self._resolve_submitting(job_id, rec)
            elif rec.state is JobState.SUBMITTED and rec.raw.get("steps_n"):
                if claim is None:
                    self.store.release_poll(job_id)
                self.steps.watch(job_id, rec)  # the extension is done; its steps run
            elif rec.state is JobState.SUBMITTED:
                self.poll(job_id, rec, claimed=(now, claim))
            else:
                self.store.unschedule(job_id)

    def _resolve_submitting(self, job_id: str, rec: JobRecord) -> None:
        now = time.time()
        started = rec.submit_started_ts if rec.submit_started_ts is not None else now
        hint = rec.hint_task_id
        if hint:
            try:
                record = self.rt.client.record_info(hint)
            except E.ProviderError as exc:
                _log(job_id, logging.WARNING, "could not confirm hinted task %s: %s", hint, exc)
                record = None
            body = rec.request or {}
            if record is not None and (record.param or {}).get("callBackUrl") == body.get("callBackUrl"):
                if self._submitted(job_id, hint, callbacks=True):
                    self.poll(job_id, self.store.get_record(job_id) or EMPTY)
                return
        if not rec.outcome_unknown:
            # The worker that was sending died (or is still stuck): the request may have left.
            self.store.update(job_id, outcome_unknown=1, submit_error="worker lost while submitting")
            _log(job_id, logging.WARNING, "submit interrupted; outcome unknown, waiting for a callback")
        deadline = started + self.s.submit_unknown_window
        if now < deadline:
            self.store.schedule(job_id, deadline)
            return
        error = _error("submit_outcome_unknown",
                       "the submission's outcome is unknown and no callback named its task; "
                       "`kie-extend retry` resubmits on purpose (it may cost credits twice)")
        self._finish(job_id, rec, JobState.FAILED, {"error": error}, expect=[JobState.SUBMITTING])

    # -- poll ----------------------------------------------------------------------------------
    def poll(self, job_id: str, raw: JobRecord | Mapping[str, str],
             claimed: tuple[float, float | None | str] | None = None) -> None:
        """Ask the provider about a submitted job (``raw``: its record, a JobRecord or its raw
        hash); finish it or put it back on the schedule. ``claimed``: ``(now, claim)`` when the
        poll was already claimed with the read of ``raw`` (JobStore.get_for_step)."""
        rec = as_record(raw) or EMPTY
        now = time.time() if claimed is None else claimed[0]
        task_id = rec.kie_task_id or ""
        # One poll of a job in flight at a time, KIE_POLL_MIN_GAP apart, across every worker: a
        # refused claim leaves the job on the due schedule (never sooner) for the tick, and sends
        # no message of its own, so hints (forged callbacks included) cannot multiply polls.
        if claimed is None or claimed[1] == "":
            wait = self.store.claim_poll(job_id, now, self.s.poll_min_gap, self.s.lease)
        else:
            wait = claimed[1]  # type: ignore[assignment]
        if wait is not None:
            if wait >= 0:
                self.store.schedule(job_id, max(wait, now + self.s.poll_min_gap), only_earlier=True)
            return
        if self.store.deferring() is not None:
            # Within a step the release is only queued: it goes out with the step's writes once the
            # poll's answer is handled (with the terminal move, if it is one), no round trip of its own.
            self.store.release_poll(job_id)
            self._poll_claimed(job_id, rec, task_id, now)
            return
        try:
            self._poll_claimed(job_id, rec, task_id, now)
        finally:
            self.store.release_poll(job_id)

    def _poll_claimed(self, job_id: str, rec: JobRecord, task_id: str, now: float) -> None:
        with tracing.job_span("kie.poll", job_id, rec.raw.get(tracing.FIELD), kie_task_id=task_id or None,
                              kie_poll=rec.polls + 1):
            self._poll_traced(job_id, rec, task_id, now)

    def _poll_traced(self, job_id: str, rec: JobRecord, task_id: str, now: float) -> None:
        submitted = rec.submitted_ts if rec.submitted_ts is not None else now
        started = time.monotonic()
        try:
            record = self.rt.client.record_info(task_id)
        except E.ProviderError as exc:
            # The latency and the answer's code are written in one round trip.
            self.store.observe("poll_seconds", time.monotonic() - started, POLL_BUCKETS,
                               stat=f"poll_code_{getattr(exc, 'code', None) or type(exc).__name__}")
            self._poll_failed(job_id, rec, exc, now, submitted)
            return
        self.store.observe("poll_seconds", time.monotonic() - started, POLL_BUCKETS, stat="poll_code_200")
        tracing.annotate_current(kie_status=record.status)
        self._answered()
        self._apply_record(job_id, rec, record, now, submitted)

    def _poll_failed(self, job_id: str, rec: JobRecord, exc: E.ProviderError, now: float, submitted: float) -> None:
        task_id = rec.kie_task_id
        code = getattr(exc, "code", None)
        if isinstance(exc, E.ProviderCodeError) and not E.is_unreachable(exc):
            self._answered()  # KIE itself answered, with an error
        if code in (404, 422) and now - submitted > self.s.poll_not_found_grace:
            error = _error("rejected", f"the provider no longer knows task {task_id}: {exc}", code=code)
            self._finish(job_id, rec, JobState.FAILED, {"error": error}, expect=[JobState.SUBMITTED])
            return
        if isinstance(exc, E.AccountError):
            self.gates.pause(exc.code, exc.msg)
        if E.is_unreachable(exc):
            # KIE could not be asked: that says nothing about the task, so it is never timed out on
            # such a poll (KIE_JOB_TIMEOUT is judged by the first poll KIE answers); it backs off.
            self._unreachable(exc, job_id, task_id)
            _log(job_id, logging.WARNING, "poll could not reach KIE (%s); polling again later", exc, task_id=task_id)
            self.later(job_id, now + self._next_interval(job_id, rec))
            return
        if not self._timed_out(job_id, rec, now, submitted):
            _log(job_id, logging.WARNING, "poll failed (%s); polling again later", exc, task_id=task_id)
            self.later(job_id, now + self._next_interval(job_id, rec))

    def _apply_record(self, job_id: str, rec: JobRecord, record: TaskRecord, now: float, submitted: float) -> None:
        task_id = rec.kie_task_id
        tracks = record.tracks
        with_audio = any(map(track_has_audio, tracks))
        if record.status == "SUCCESS" and not with_audio:
            # Success needs audio: the provider may fill the takes a moment later; after a few
            # re-polls it counts as a failed generation.
            empty = rec.empty_success + 1
            if empty <= self.s.empty_success_polls:
                self.store.update(job_id, empty_success=empty, kie_status=record.status)
                _log(job_id, logging.WARNING, "provider reported SUCCESS without audio (%d of %d); polling again",
                     empty, self.s.empty_success_polls, task_id=task_id)
                if not self._timed_out(job_id, rec, now, submitted):
                    self.later(job_id, now + max(self.s.poll_min_gap, min(self.s.poll_interval, 5.0)))
                return
            self._task_failed(job_id, rec, record, message="provider reported SUCCESS without audio")
            return
        if (record.status == "SUCCESS" or (record.status == "CALLBACK_EXCEPTION" and with_audio)) and has_plan(rec):
            # The extension is done; the job stays submitted while its follow-up steps run.
            self.steps.begin(job_id, rec, tracks, record.status, settle=charge_of(record))
            return
        if record.status == "SUCCESS" or (record.status == "CALLBACK_EXCEPTION" and with_audio):
            fields = {"kie_status": record.status, "tracks": tracks}
            moved = self._finish(job_id, rec, JobState.SUCCEEDED, fields, expect=[JobState.SUBMITTED],
                                 settle=charge_of(record))
            if moved and moved.breaker_closed:  # the same step reset the breaker (store.transition)
                _log(job_id, logging.WARNING, "provider breaker closed: a generation succeeded", task_id=task_id)
            return
        if record.failed:
            self._task_failed(job_id, rec, record)
            return
        if record.status in PROGRESS_STAGES and self.s.progress_events:
            self.progress.reached(job_id, rec, record.status, tracks)
        if record.status != rec.kie_status or (tracks and not rec.tracks):
            self.store.update(job_id, kie_status=record.status, tracks=tracks or None)
            _log(job_id, logging.INFO, "provider status %s", record.status, task_id=task_id)
        if not self._timed_out(job_id, rec, now, submitted):
            self.later(job_id, now + self._next_interval(job_id, rec))

    def _task_failed(self, job_id: str, rec: JobRecord, record: TaskRecord, message: str | None = None) -> None:
        code = record.error_code
        message = message or record.error_message or record.status
        if record.status == "SENSITIVE_WORD_ERROR" or code in (400, 413):
            kind = "invalid_request"
        else:
            kind = "generation_failed"
        task_id = rec.kie_task_id
        regenerated = rec.regenerations
        charge = charge_of(record)  # a refunded failure (531) settles at 0
        # No regeneration while the breaker is open: every resubmission would be paid for.
        if kind == "generation_failed" and regenerated < self.s.regenerate and not self.rt.breaker.is_open():
            if self.store.transition(
                job_id, JobState.QUEUED, expect=[JobState.SUBMITTED],
                fields={"regenerations": regenerated + 1, "kie_task_id": None, "kie_status": None,
                        "tracks": None, "last_poll_ts": None, "attempts": 0, "empty_success": None},
                due=time.time(), settle=charge,
            ):
                _log(job_id, logging.WARNING, "generation failed (%s); regenerating (%d of %d)",
                     message, regenerated + 1, self.s.regenerate, task_id=task_id)
                self._generation_failed(job_id, task_id)
            return
        error = _error(kind, str(message), code=code, status=record.status)
        if self._finish(job_id, rec, JobState.FAILED, {"kie_status": record.status, "error": error},
                        expect=[JobState.SUBMITTED], settle=charge) and kind == "generation_failed":
            self._generation_failed(job_id, task_id)

    def _generation_failed(self, job_id: str, task_id: str | None = None) -> None:
        """Count one failed generation towards the provider breaker (once per failed generation)."""
        if self.rt.breaker.failure(job_id):
            self.store.stat("breaker_opened")
            _log(job_id, logging.ERROR, "provider breaker opened after %d failed generations in a row; "
                 "submission waits for a probe job", self.s.breaker_threshold, task_id=task_id)

    def _timed_out(self, job_id: str, rec: JobRecord, now: float, submitted: float) -> bool:
        if now - submitted < self.s.job_timeout:
            return False
        error = _error("timed_out", f"not finished {self.s.job_timeout:.0f}s after submission")
        if self._finish(job_id, rec, JobState.FAILED, {"error": error}, expect=[JobState.SUBMITTED]):
            self._generation_failed(job_id, rec.kie_task_id)  # a provider that never finishes fails too
        return True

    def _next_interval(self, job_id: str, rec: JobRecord) -> float:
        if rec.callbacks_seen:
            return _jitter(max(self.s.poll_callback_interval, self.s.poll_interval))
        current = rec.poll_interval if rec.poll_interval is not None else float(self.s.poll_interval)
        nxt = min(self.s.poll_max_interval, current * 1.5)
        self.store.update(job_id, poll_interval=nxt)
        # Jitter only downwards: no gap between two polls ever exceeds KIE_POLL_MAX_INTERVAL.
        return current * (0.8 + 0.2 * random.random())

    # -- finish --------------------------------------------------------------------------------
    def _finish(self, job_id: str, rec: JobRecord, state: JobState, fields: dict[str, Any],
                expect: list[JobState | None], settle: str | float | None = None) -> Moved | bool:
        """The terminal move: state, result event, handler deliveries and the settlement of the
        job's credit reservation in one atomic step; the store's Moved (true) when it happened,
        False when the job was no longer in ``expect``. ``rec`` is the record as last read
        (``EMPTY`` for a job without one yet); ``settle`` as JobStore.transition (default: charged
        when the provider accepted the job, refunded when it never did)."""
        fields = {**fields, "finished_at": iso_ms()}
        event = build_event(rec, state, {"job_id": job_id, **fields})
        handlers = list(self.rt.routes.names_for(event["tenant"]))  # the global ones, plus the tenant's own
        created = rec.created_ts if rec.created_ts is not None else float(fields.get("created_ts") or time.time())
        # The deliveries are queued with the event, already leased to this process: if it dies
        # before handing them on, the tick finds them when the lease runs out.
        move = dict(expect=expect, fields=fields, event=event, handlers=handlers, retention=self.s.retention,
                    deliveries_at=time.time() + self.s.lease, settle=settle)
        writes = self.store.deferring()
        sent: set[str] = set()
        if writes is None:
            moved = self.store.transition(job_id, state, **move)  # type: ignore[arg-type]
            if moved and state is not JobState.CANCELLED:  # a cancelled job never had a result to wait for
                self.store.observe("time_to_result_seconds", time.time() - created, RESULT_BUCKETS)
        else:
            # Within a step: the move and the step's writes go out in one round trip, and the writes
            # that follow from the move (the time-to-result bin; the inline deliveries a handler can
            # queue as writes, with their marks) run only if the move happened: it wrote ``op``.
            op, trip = new_op(), OneTrip(self.rt.redis)
            self.store.transition(job_id, state, pipe=trip, op=op, **move)  # type: ignore[arg-type]
            writes.only_if(self.store.keys.job(job_id), "op", op)
            if state is not JobState.CANCELLED:
                self.store.observe("time_to_result_seconds", time.time() - created, RESULT_BUCKETS)
            for name in handlers:
                if getattr(self.rt.handlers.get(name), "inline", False) and hasattr(self.rt.handlers[name], "queue"):
                    self.delivery.deliver(job_id, name, event=event)
                    sent.add(name)
            moved = self.store.moved(job_id, self.store.send_with(trip, writes)[0])
        if not moved:
            return False
        error = fields.get("error")
        if (error and error.get("kind") not in ("generation_failed", "timed_out") and rec.state_text
                and (state is not JobState.CANCELLED or rec.admitted)):
            self.rt.breaker.neutral(job_id)  # a probe that ended neither way frees the probe turn
        _log(job_id, logging.INFO if state == JobState.SUCCEEDED else logging.WARNING, "%s%s", state.value,
             f" ({error['kind']}: {error['message']})" if error else "", task_id=event.get("kie_task_id"))
        refs = [job_id]
        if moved.batch_finished:
            _log(job_id, logging.INFO, "batch %s finished", moved.batch_finished)
            refs.append(BATCH_REF + moved.batch_finished)
        for ref in refs:
            for name in handlers:
                if ref == job_id and name in sent:
                    continue  # delivered with the move
                if getattr(self.rt.handlers.get(name), "inline", False):
                    # fast and local: no extra message
                    self.delivery.deliver(ref, name, event=event if ref == job_id else None)
                else:
                    self.dispatch.deliver(ref, name)
        return moved

    # -- callbacks, operators ------------------------------------------------------------------
    def hint(self, job_id: str, task_id: str | None, callback_type: str | None) -> bool:
        """A provider callback for ``job_id``: never trusted alone, it only makes a poll happen now."""
        rec = self.store.get_record(job_id)
        if rec is None or rec.state in TERMINAL or rec.duplicate_of:
            return False
        with tracing.job_span("kie.callback", job_id, rec.raw.get(tracing.FIELD), kie_task_id=task_id,
                              kie_callback__type=callback_type):
            return self._hint(job_id, rec, task_id, callback_type)

    def _hint(self, job_id: str, rec: JobRecord, task_id: str | None, callback_type: str | None) -> bool:
        if rec.state is JobState.SUBMITTING and task_id and not rec.kie_task_id:
            self.store.update(job_id, hint_task_id=str(task_id)[:128])
        elif rec.state not in (JobState.SUBMITTED, JobState.SUBMITTING):
            return False
        self.store.stat("callbacks")
        # A text/first callback wakes nobody, unless early audio wants its stage (jobs/progress.py).
        progress_only = (callback_type in PROGRESS_CALLBACKS and rec.state is JobState.SUBMITTED
                         and not self.s.progress_events)
        if progress_only:
            # Callbacks reach us for this job: the final one will wake it, so the safety-net polls
            # can be spaced out (KIE_POLL_CALLBACK_INTERVAL).
            if not rec.callbacks_seen:
                self.store.update(job_id, callbacks_seen=1)
                self.store.schedule(job_id, time.time() + _jitter(self.s.poll_callback_interval))
            _log(job_id, logging.INFO, "callback %s", callback_type, task_id=task_id)
            return True
        if not rec.callbacks_seen:
            self.store.update(job_id, callbacks_seen=1)  # a late progress callback must not delay this poll
        # A callback needs no token (unless KIE_CALLBACK_SECRET), so it never makes a poll sooner
        # than KIE_POLL_MIN_GAP after the last one, nor a second one while a poll is in flight.
        now = time.time()
        not_before = (rec.last_poll_ts or 0.0) + self.s.poll_min_gap
        if not_before > now or (rec.poll_lease or 0.0) > now:
            _log(job_id, logging.INFO, "callback %s: polling soon", callback_type or "?", task_id=task_id)
            self.store.schedule(job_id, max(not_before, now + self.s.poll_min_gap), only_earlier=True)
            return True
        _log(job_id, logging.INFO, "callback %s: polling now", callback_type or "?", task_id=task_id)
        if isinstance(self.dispatch, NoDispatch):
            self.store.schedule(job_id, time.time(), only_earlier=True)  # the tick claims it
        else:
            self.store.schedule(job_id, time.time() + self.s.lease)  # claimed here, under a lease
            self.dispatch.poll(job_id)
        return True

    def retry(self, job_id: str) -> bool:
        """Operator's resubmission of a failed job (it may cost credits again)."""
        rec = self.store.get_record(job_id)
        if rec is None or rec.state is not JobState.FAILED:
            return False
        if rec.invalid_fields:
            return False
        if rec.error_kind == "step_failed":
            return self.steps.retry(job_id, rec)
        ok = self.store.transition(
            job_id, JobState.QUEUED, expect=[JobState.FAILED],
            fields={"error": None, "finished_at": None, "kie_task_id": None, "kie_status": None, "tracks": None,
                    "attempts": 0, "outcome_unknown": None, "hint_task_id": None, "last_poll_ts": None,
                    "event": None, "retried": rec.retried + 1},
            due=time.time(),
        )
        if ok:
            self.rt.redis.delete(*[self.rt.keys.dedup(h, f"{job_id}:job.failed")
                                   for h in self.rt.routes.names_for(rec.tenant)])
            _log(job_id, logging.WARNING, "retried by operator")
        return ok

    def _record_code(self, code: Any, prefix: str = "submit") -> None:
        self.store.stat(f"{prefix}_code_{code}")


def _safe_json(value: Any) -> Any:
    """A JSON-safe copy (request bodies from other producers may carry odd values)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["Pipeline", "FAILED_STATUSES"]
