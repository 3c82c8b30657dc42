"""The broker transport: kombu's Redis transport, with infrastructure errors treated as a lost connection.

kombu's Redis transport counts redis-py's ``ResponseError`` as a *channel* error, and Celery's
consumer stops the whole worker on one ("Unrecoverable error"). But the replies a Redis server
gives while it cannot serve us for a while are ``ResponseError`` s too:

- ``UNBLOCKED force unblock … (master -> replica?)`` to a blocked BRPOP when the server turns into
  a replica, then ``READONLY`` on every write (ack, restore, publish);
- ``OOM command not allowed`` on every write when ``maxmemory`` is reached with ``noeviction``,
  including the unacked-index write kombu makes right after BRPOP took a message;
- ``LOADING``, ``MASTERDOWN``, ``BUSY``, ``TRYAGAIN``, ``CLUSTERDOWN``.

Here every such reply (see :func:`kie_extend.infra.errors.is_infra_error`) is raised as redis-py's
``ConnectionError`` by the connection that read it, so kombu drops the connection and Celery
reconnects with its backoff instead of exiting, and kombu's publish retry treats it as a
connection loss. Other ``ResponseError`` s keep their meaning.

A message BRPOP already took whose unacked record could not be written (OOM) is not dropped: it
is kept in this process and pushed back onto its queue as soon as the server accepts writes
again (checked before every BRPOP).

Used by the worker, beat and producer apps for ``redis://`` and ``rediss://`` brokers
(``broker_transport = "kie_extend.infra.transport:Transport"``, see :func:`broker_conf`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import redis
from kombu.transport import redis as kredis
from redis import exceptions as rx
from redis.sentinel import SentinelManagedConnection

from kie_extend.infra.endpoints import celery_broker_url, sentinel_transport_options
from kie_extend.infra.errors import as_connection_error, is_infra_error

if TYPE_CHECKING:
    from celery import Celery

    from kie_extend.config import Settings

log = logging.getLogger("kie_extend.infra.transport")

#: Seconds a broker socket may stay silent on a blocking read or write before it counts as lost.
SOCKET_TIMEOUT = 30.0
#: Seconds to establish a broker connection.
SOCKET_CONNECT_TIMEOUT = 5.0
#: Seconds between health checks (PING on an idle connection before reuse; kombu's BRPOP and
#: pub/sub health checks run at this interval too).
HEALTH_CHECK_INTERVAL = 10
#: Redis URL schemes that get this transport (``sentinel`` gets :class:`SentinelTransport`).
REDIS_SCHEMES = ("redis", "rediss", "sentinel")


class _InfraAwareConnection:
    """Mixin for redis-py connections: a transient error reply becomes a ``ConnectionError``."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except rx.ResponseError as exc:
            # NOSCRIPT stays itself: redis-py's Script objects reload the script on it.
            if is_infra_error(exc) and not isinstance(exc, rx.NoScriptError):
                raise as_connection_error(exc) from exc
            raise


class InfraConnection(_InfraAwareConnection, redis.Connection):
    """A plain TCP broker connection (see the mixin)."""


class InfraSSLConnection(_InfraAwareConnection, redis.SSLConnection):
    """A TLS broker connection (see the mixin)."""


class InfraSentinelConnection(_InfraAwareConnection, SentinelManagedConnection):
    """A connection to the master a Sentinel names (see the mixin)."""


class InfraSentinelSSLConnection(_InfraAwareConnection, kredis.SentinelManagedSSLConnection):
    """A TLS connection to the master a Sentinel names (see the mixin)."""


class _Unsaved:
    """Messages taken from a queue whose unacked record could not be written; pushed back later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[dict[str, Any], str, str]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, payload: dict[str, Any], exchange: str, routing_key: str) -> None:
        with self._lock:
            self._items.append((payload, exchange, routing_key))

    def take(self) -> list[tuple[dict[str, Any], str, str]]:
        with self._lock:
            items, self._items = self._items, []
            return items

    def give_back(self, items: list[tuple[dict[str, Any], str, str]]) -> None:
        with self._lock:
            self._items[:0] = items


#: Process-wide: a reconnect builds new channels, the kept messages must outlive them.
UNSAVED = _Unsaved()


class QoS(kredis.QoS):
    """kombu's ack emulation; a message whose unacked record fails to be written is kept, not lost."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            super().append(message, delivery_tag)
        except Exception as exc:
            delivery = message.delivery_info
            UNSAVED.keep(message._raw, delivery["exchange"], delivery["routing_key"])
            log.error("broker refused the unacked record of message %s (%s: %s); kept in memory, "
                      "it goes back on its queue when the broker accepts writes",
                      (message.headers or {}).get("id"), type(exc).__name__, exc)
            if is_infra_error(exc):
                raise as_connection_error(exc) from exc
            raise

    def ack(self, delivery_tag: Any) -> None:
        """kombu's ack; on a channel whose connection is already torn down (an ack or reject that
        Celery ran after the broker connection was lost and rebuilt: kombu then fails with
        AttributeError, which stopped the worker) the message is only forgotten here: its unacked
        record stays in the broker, which restores it after the visibility timeout (a redelivered
        message is harmless)."""
        try:
            super().ack(delivery_tag)
        except AttributeError as exc:
            self._closed_channel("acknowledged", delivery_tag, exc)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """kombu's reject (``requeue``: put it back on its queue at once); on a channel whose
        connection is already torn down, as :meth:`ack`."""
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            self._closed_channel("requeued" if requeue else "rejected", delivery_tag, exc)

    def _closed_channel(self, what: str, delivery_tag: Any, exc: Exception) -> None:
        log.warning("message %s not %s: its broker connection is already closed (%s); the broker restores "
                    "it after the visibility timeout", delivery_tag, what, exc)
        kredis.virtual.QoS.ack(self, delivery_tag)  # forgotten here, as an ack would

    def restore_unacked(self, client: Any = None) -> Any:
        """Put this channel's unacknowledged messages back on their queues, as kombu does; when the
        connection is already torn down (kombu then fails to rebuild its pool with AttributeError,
        seen during a Sentinel failover) leave them in the broker's unacked index, which restores
        them after the visibility timeout, instead of stopping the worker."""
        try:
            return super().restore_unacked(client)
        except AttributeError as exc:
            log.warning("%d unacknowledged message(s) left for the broker to restore after the visibility "
                        "timeout (connection already closed: %s)", len(self._delivered), exc)
            return None


class Channel(kredis.Channel):
    """kombu's Redis channel with infra-aware connections and the kept messages put back."""

    QoS = QoS
    connection_class = InfraConnection
    connection_class_ssl = InfraSSLConnection
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new redis-py client object for every publish, ack and unacked record
        (each one copies redis-py's table of reply parsers); the client over the channel's pool is
        built once here instead. It holds no connection of its own (the pool does), so sharing it
        across threads is what redis-py allows."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._sync_client = super()._create_client()
        return cached

    def _brpop_start(self, timeout: Any = None) -> Any:
        if UNSAVED:
            self.put_back_unsaved()
        return super()._brpop_start(timeout)

    def put_back_unsaved(self) -> int:
        """Push kept messages back onto their queues; returns how many went back."""
        items = UNSAVED.take()
        for i, (payload, exchange, routing_key) in enumerate(items):
            try:
                with self.conn_or_acquire() as client:
                    with client.pipeline() as pipe:
                        self._do_restore_message(payload, exchange, routing_key, pipe)
                        pipe.execute()
            except Exception as exc:
                UNSAVED.give_back(items[i:])
                log.warning("%d kept message(s) not yet back on their queue: %s: %s", len(items) - i,
                            type(exc).__name__, exc)
                return i
        if items:
            log.warning("%d kept message(s) back on their queue", len(items))
        return len(items)


class SentinelChannel(Channel, kredis.SentinelChannel):
    """kombu's Sentinel channel (the master found through the sentinels) with the same handling."""

    connection_class = InfraSentinelConnection
    connection_class_ssl = InfraSentinelSSLConnection


class Transport(kredis.Transport):
    """kombu's Redis transport with :class:`Channel`; transient server replies count as connection errors."""

    Channel = Channel
    connection_errors = kredis.Transport.connection_errors + (
        rx.ReadOnlyError, rx.OutOfMemoryError, rx.TryAgainError, rx.ClusterDownError,
    )

    @property
    def supports_batch_publish(self) -> bool:
        """kombu's check, but False (not AttributeError) once the transport's connection is closed."""
        if self.client is None:
            return False
        return bool(super().supports_batch_publish)


def broker_conf(broker_url: str, visibility_timeout: float | None = None) -> dict[str, Any]:
    """Celery settings for the broker connection: this transport, socket timeouts, keepalive and
    health checks for Redis; unchanged transport for RabbitMQ (its heartbeats detect dead links).

    ``visibility_timeout`` (seconds) is set on Redis when given (workers; producers need none).
    """
    scheme = urlparse(broker_url).scheme.lower()
    if scheme not in REDIS_SCHEMES:
        return {"broker_connection_retry_on_startup": True}
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        # Not retry_on_timeout: a publish that timed out may have been applied, and with it set
        # kombu also gives up batched publishing. A timeout is a connection loss; Celery's publish
        # retry and the consumer's reconnect handle it.
        "retry_on_timeout": False,
    }
    if visibility_timeout is not None:
        options["visibility_timeout"] = int(visibility_timeout)
        # kombu sweeps for messages left unacknowledged (a worker killed, a Redis restart in the
        # middle of a delivery) only every interval x throttle seconds (10 x 10 by default), so
        # one could wait 100 s past its visibility timeout; sweep every few seconds instead.
        options["unacked_restore_interval"] = max(1, min(10, int(visibility_timeout) // 3))
        options["unacked_restore_throttle"] = 1
    conf: dict[str, Any] = {
        "broker_transport": "kie_extend.infra.transport:SentinelTransport" if scheme == "sentinel"
        else "kie_extend.infra.transport:Transport",
        "broker_transport_options": options,
        "broker_connection_retry_on_startup": True,
    }
    if scheme == "rediss" and not any(k.startswith("ssl_") for k in parse_qs(urlparse(broker_url).query)):
        # What kombu does for a bare rediss:// URL (it keys that on the scheme name, which an
        # explicit transport replaces): TLS without certificate checks.
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}
    return conf


__all__ = ["Transport", "Channel", "SentinelTransport", "SentinelChannel", "QoS", "InfraConnection", "InfraSSLConnection", "UNSAVED", "broker_conf"]


class SentinelTransport(kredis.SentinelTransport):
    """kombu's Sentinel transport with :class:`SentinelChannel`; same connection errors as :class:`Transport`."""

    Channel = SentinelChannel
    connection_errors = Transport.connection_errors

    @property
    def supports_batch_publish(self) -> bool:
        """kombu's check, but False (not AttributeError) once the transport's connection is closed."""
        if self.client is None:
            return False
        return bool(super().supports_batch_publish)


def configure_broker(app: Celery, settings: Settings) -> None:
    """Point a Celery app (worker or producer) at ``settings``' broker: the URL in the form kombu
    reads, plus the Sentinel transport options merged into ``broker_transport_options``."""
    url = settings.effective_broker_url
    password = settings.sentinel_password.get_secret_value() if settings.sentinel_password else None
    app.conf.broker_url = celery_broker_url(url)
    extra = sentinel_transport_options(url, settings.sentinel_master, password)
    if extra:
        app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), **extra}
