"""The worker's message consumer: malformed or misnamed messages become failed jobs, not silent drops.

Celery logs and acknowledges a message it cannot decode (not JSON, or a forbidden content type
such as Python's binary serializer) or whose task name it does not know (``kie_extend.Extend``,
``"kie_extend.extend "``), and a JSON body of the wrong shape even stops the whole worker with an
"unrecoverable error" (and, unacknowledged, comes back to stop the next one). For every such
message on our queue that is not one of our internal tasks and carries an id, that id (what the
producer holds as its job id) is recorded as ``failed / invalid_request`` with its result event,
a near miss of ``kie_extend.extend`` saying "did you mean", and then the message is acknowledged.
So no message can lose a job or take a worker down.

If the job store cannot take that record right now (a transient infrastructure error), the message
is not acknowledged: the error is raised as a connection error, Celery reconnects, and the message
comes back.

A message handled that way is an ordinary producer mistake, not a worker fault: Celery's own
multi-line ERROR (``Received unregistered task of type …``, ``Received invalid task message``,
``Can't decode message body``, each with a traceback) is replaced by one WARNING line from
``kie_extend.infra.consumer`` naming the message id, the job's state and the reason. A message we did not
record (one of our internal tasks, no id, the store unavailable) keeps Celery's ERROR.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.consumer import consumer as celery_consumer

from kie_extend.infra.errors import as_connection_error, is_infra_error
from kie_extend.jobs.ids import derived_job_id, is_valid
from kie_extend.jobs.intake import EXTEND_KWARGS

log = logging.getLogger("kie_extend.infra.consumer")

#: The task name producers send.
PUBLIC_TASK = "kie_extend.extend"
#: Our own tasks; a broken message naming one of these is no producer's job.
INTERNAL_TASKS = frozenset({"kie_extend.poll", "kie_extend.deliver", "kie_extend.tick"})


def did_you_mean(name: str, known: tuple[str, ...] = (PUBLIC_TASK,)) -> str:
    """``" (did you mean `kie_extend.extend`?)"`` when ``name`` is close to one of ``known``
    (case, surrounding spaces and small typos ignored), else ``""``."""
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(str(name).strip().lower(), list(lowered), n=1, cutoff=0.75)
    return f" (did you mean `{lowered[match[0]]}`?)" if match else ""


def unknown_task_reason(name: Any) -> str:
    """The error message of a job whose message named a task we do not run."""
    return (f"unknown task name {str(name)[:100]!r}{did_you_mean(str(name))}: this queue runs "
            f"`{PUBLIC_TASK}` with keyword arguments {', '.join(EXTEND_KWARGS)}")


#: Celery's log templates for the messages this consumer records as failed jobs.
CELERY_TEMPLATES = frozenset({celery_consumer.UNKNOWN_TASK_ERROR, celery_consumer.INVALID_TASK_ERROR,
                              celery_consumer.MESSAGE_DECODE_ERROR})

_handled = threading.local()


class HandledMessageFilter(logging.Filter):
    """Drops Celery's ERROR/CRITICAL record about a bad message while :func:`_recorded` is active
    (the message became a failed job and our own WARNING line says so); passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_handled, "active", False) and record.msg in CELERY_TEMPLATES)


_FILTER = HandledMessageFilter()
if not any(isinstance(f, HandledMessageFilter) for f in celery_consumer.logger.filters):
    celery_consumer.logger.addFilter(_FILTER)


@contextmanager
def _recorded(active: bool) -> Iterator[None]:
    """While inside, Celery's bad-message ERROR is dropped when ``active`` (see HandledMessageFilter)."""
    before = getattr(_handled, "active", False)
    _handled.active = active
    try:
        yield
    finally:
        _handled.active = before


def bad_headers(headers: Any) -> str | None:
    """Why a protocol-2 task message's headers would break Celery outside the message handler, or
    None: ``id`` must be a non-empty string, ``timelimit`` absent or two numbers/nulls, ``retries``
    absent or a non-negative integer."""
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "the 'id' header must be a non-empty string"
    limit = headers.get("timelimit")
    if limit is not None and not (isinstance(limit, (list, tuple)) and len(limit) == 2 and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9) for v in limit)):
        return "the 'timelimit' header must be [soft, hard] seconds (numbers or null)"
    retries = headers.get("retries")
    if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool)
                                    and 0 <= retries < 2**31):
        return "the 'retries' header must be a non-negative integer"
    return None


class KieConsumer(Consumer):
    """Celery's consumer plus a failed job (and result event) for every malformed or misnamed message.

    Gossip and Mingle are always off, as ``--without-gossip --without-mingle`` would set them (Celery
    has no setting for either): kie-extend uses neither (no remote control, no revokes to sync),
    and while the broker is away they only add tracebacks to the log."""

    def __init__(self, *args: Any, worker_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = dict(worker_options or {}, without_gossip=True, without_mingle=True)
        super().__init__(*args, worker_options=options, **kwargs)

    def _fail_malformed(self, message: Any, reason: str) -> bool:
        """Record the message's id as a failed job and log one WARNING; True when recorded, False
        when the message is not a producer's job (internal task, no id) or recording failed with a
        bug. Raises a connection error if the store is unavailable."""
        headers = getattr(message, "headers", None) or {}
        if headers.get("task") in INTERNAL_TASKS or not headers.get("id"):
            return False
        job_id = str(headers["id"])[:200]
        derived = not is_valid("job_id", headers["id"])
        if derived:
            # Never recorded under an id outside the grammar (jobs/ids.py): under a derived one.
            from kie_extend.tasks import bad_id_reason

            reason, job_id = f"{bad_id_reason(headers['id'])}; also: {reason}"[:600], derived_job_id(headers["id"])
        try:
            services = self.app.kie_services
            if services.get_pipeline().reject_malformed(job_id, reason) and derived:
                services.get_pipeline().store.stat("bad_job_ids")
        except Exception as exc:
            if is_infra_error(exc):
                log.warning("job store unavailable (%s); message %r left unacknowledged", exc, headers.get("id"))
                raise as_connection_error(exc) from exc
            log.exception("could not record a malformed message as a failed job")  # a bug: do not loop on it
            return False
        log.warning("message %s recorded as failed (invalid_request) and discarded: %s", job_id, reason,
                    extra={"job_id": job_id})
        return True

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task name we do not run: a failed job under the message's id, then Celery's discard."""
        name = (getattr(message, "headers", None) or {}).get("task")
        with _recorded(self._fail_malformed(message, unknown_task_reason(name))):
            super().on_unknown_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's message handler, guarded: a message it chokes on is failed and acknowledged."""
        handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors or ())

        def guarded(message: Any) -> Any:
            headers = getattr(message, "headers", None)
            bad = bad_headers(headers)
            if bad:
                # Celery would fail on these later, outside this guard (in the pool's callbacks): a
                # missing id read as a lost connection and the message came back forever; a bad
                # time limit ended the worker process ("Unrecoverable error"), and every worker
                # that got the message next. Fail it (when it has an id to record) and acknowledge.
                if not self._fail_malformed(message, f"message is not a valid task call: {bad}"):
                    log.error("task message without an id (task %r) acknowledged and discarded",
                              str(headers.get("task"))[:200])
                try:
                    message.ack()
                except Exception:
                    log.exception("could not acknowledge an unreadable message")
                return None
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                if not self._fail_malformed(message, f"message is not a valid task call: "
                                                     f"{type(exc).__name__}: {exc}"[:300]):
                    log.error("unreadable task message %r acknowledged: %s",
                              (getattr(message, "headers", None) or {}).get("id"), exc)
                try:
                    message.ack()
                except Exception:
                    log.exception("could not acknowledge an unreadable message")
                return None

        return guarded

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A body that is not JSON (or a forbidden content type)."""
        reason = f"message body could not be decoded as JSON: {type(exc).__name__}: {exc}"[:300]
        with _recorded(self._fail_malformed(message, reason)):
            super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A JSON body that is not a valid task call."""
        with _recorded(self._fail_malformed(message, f"message is not a valid task call: {exc}"[:300])):
            super().on_invalid_task(body, message, exc)
