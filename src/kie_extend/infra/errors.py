"""Transient infrastructure errors: one place that says "Redis or the broker cannot serve us right now".

A transient infrastructure error is one that goes away by itself (a failover ends, memory is
freed, a restart finishes loading) and says nothing about the job. Work that meets one is retried,
never failed, and a message is never acknowledged because of one.

Shapes recognised by :func:`is_infra_error` (``exc`` is any exception instance):

- redis-py ``ConnectionError`` (incl. ``BusyLoadingError``, ``AuthenticationError``) and
  ``TimeoutError``;
- redis-py ``ResponseError`` subclasses ``ReadOnlyError`` (READONLY, a replica), ``OutOfMemoryError``
  (OOM with ``maxmemory-policy noeviction``), ``NoScriptError``, ``TryAgainError``,
  ``ClusterDownError`` / ``MasterDownError``;
- a plain ``ResponseError`` whose message starts with one of :data:`TRANSIENT_PREFIXES` (redis-py
  strips the code of the errors it maps, keeps it on the others: ``UNBLOCKED force unblock from
  blocking operation, instance state changed (master -> replica?)``, ``BUSY Redis is busy running
  a script``, …);
- kombu's ``OperationalError`` (a publish that failed after kombu's own retries) and py-amqp's
  connection errors; the built-in ``ConnectionError`` (refused, reset, broken pipe) and
  ``TimeoutError`` (``socket.timeout``).

Anything else (a bug, a WRONGTYPE, a validation problem) is not infrastructure.
"""

from __future__ import annotations

import random

from redis import exceptions as rx

#: Error codes (first word of a Redis error reply) that mean "not now", never "not this".
TRANSIENT_PREFIXES = ("READONLY", "UNBLOCKED", "MASTERDOWN", "LOADING", "BUSY", "OOM", "NOSCRIPT", "TRYAGAIN",
                      "CLUSTERDOWN")

#: redis-py classes that are always transient.
_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.OutOfMemoryError, rx.NoScriptError,
    rx.TryAgainError, rx.ClusterDownError, ConnectionError, TimeoutError,
)

#: First retry delay (seconds) of work that met an infrastructure error; doubles per retry.
RETRY_BASE = 1.0
#: Longest retry delay (seconds). Kept well below the broker's visibility timeout so a retry
#: message held by a worker is not also redelivered.
RETRY_MAX = 10.0
#: Retries of an extend message for an unexpected (non-infrastructure) error before the job is
#: recorded as failed; infrastructure errors are retried forever.
MAX_UNEXPECTED_RETRIES = 5


def _other_transient_classes() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    try:
        from kombu.exceptions import OperationalError

        found.append(OperationalError)
    except ImportError:  # pragma: no cover - kombu is a dependency
        pass
    try:
        from amqp.exceptions import ConnectionError as AmqpConnectionError
        from amqp.exceptions import RecoverableConnectionError

        found += [AmqpConnectionError, RecoverableConnectionError]
    except ImportError:  # amqp is only there with RabbitMQ support
        pass
    return tuple(found)


_TRANSIENT_CLASSES += _other_transient_classes()


def is_infra_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient Redis/broker error (see the module docstring for the shapes)."""
    if isinstance(exc, _TRANSIENT_CLASSES):
        return True
    if isinstance(exc, rx.ResponseError):
        code = str(exc).lstrip().split(" ", 1)[0].upper()
        return code in TRANSIENT_PREFIXES
    return False


def as_connection_error(exc: BaseException) -> rx.ConnectionError:
    """A redis-py ``ConnectionError`` standing for ``exc`` (kombu and Celery reconnect on it)."""
    if isinstance(exc, rx.ConnectionError):
        return exc
    return rx.ConnectionError(f"{type(exc).__name__}: {exc}"[:300])


def infra_retry_delay(retries: int, base: float = RETRY_BASE, cap: float = RETRY_MAX) -> float:
    """Seconds before a task's retry number ``retries + 1`` after an infrastructure error (Redis or the
    broker): exponential, capped at ``cap``, full jitter in [50 %, 100 %]. A provider error's backoff is
    :func:`kie_extend.errors.retry_delay`."""
    delay = min(cap, base * 2 ** min(max(retries, 0), 30))
    return delay * (0.5 + 0.5 * random.random())


__all__ = ["TRANSIENT_PREFIXES", "RETRY_BASE", "RETRY_MAX", "MAX_UNEXPECTED_RETRIES", "is_infra_error",
           "as_connection_error", "infra_retry_delay"]
