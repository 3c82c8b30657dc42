"""The worker's message consumer: malformed extend messages become failed jobs, not silent drops.

Celery logs and acknowledges a message it cannot decode (not JSON, or a forbidden content type
such as Python's binary serializer), and a JSON body of the wrong shape even stops the whole
worker with an "unrecoverable error" (and, unacknowledged, comes back to stop the next one). For ``kie_extend.extend`` the job id
from the message headers is recorded as ``failed / invalid_request`` with its result event, and
the message is acknowledged, so no message can lose a job or take a worker down.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger("kie_extend.consumer")


class KieConsumer(Consumer):
    """Celery's consumer plus a failed job (and result event) for every malformed extend message."""

    def _fail_malformed(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        if headers.get("task") != "kie_extend.extend" or not headers.get("id"):
            return
        try:
            services = self.app.kie_services
            services.get_pipeline().reject_malformed(str(headers["id"])[:200], reason)
        except Exception:  # never let bookkeeping crash the consumer
            log.exception("could not record a malformed message as a failed job")

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's message handler, guarded: a message it chokes on is failed and acknowledged."""
        handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors or ())

        def guarded(message: Any) -> Any:
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                log.error("unreadable task message %r acknowledged: %s",
                          (getattr(message, "headers", None) or {}).get("id"), exc)
                self._fail_malformed(message, f"message is not a valid task call: {type(exc).__name__}: {exc}"[:300])
                try:
                    message.ack()
                except Exception:
                    log.exception("could not acknowledge an unreadable message")
                return None

        return guarded

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A body that is not JSON (or a forbidden content type)."""
        self._fail_malformed(message, f"message body could not be decoded as JSON: {type(exc).__name__}: {exc}"[:300])
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A JSON body that is not a valid task call."""
        self._fail_malformed(message, f"message is not a valid task call: {exc}"[:300])
        super().on_invalid_task(body, message, exc)
