"""Whether the job store and the broker answer us, and if not, why: one probe for ``kie-extend
status``, ``/v1/system``, ``/readyz``, ``/metrics`` and the command line's start-up check.

A part's state (:meth:`InfraProbe.check`) is a dict::

    {"up": bool,
     "reason": one of REASONS,           # a closed set, safe as a metric label
     "detail": str,                      # what happened, in words; never a password
     "setting": "KIE_REDIS_URL" | "KIE_BROKER_URL",
     "url": str}                         # the server, password masked (endpoints.mask_url)

:data:`REASONS`: ``ok``; ``refused_credentials`` (wrong password, unknown ACL user, NOAUTH,
RabbitMQ ACCESS_REFUSED); ``unreachable`` (nothing listens, the name does not resolve, the
connection was reset); ``timeout`` (no answer within the probe's bound); ``not_ready`` (the server
answers but cannot serve: loading, read-only, the sentinels name no such master); ``error``
(anything else).

When the broker is the job store (``KIE_BROKER_URL`` unset or equal), one probe serves both.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kie_extend.config import Settings
from kie_extend.infra.endpoints import is_redis, mask_url
from kie_extend.errors import KieExtendError

#: Seconds a probe of both parts may take in all (each connection attempt gets the same bound).
PROBE_TIMEOUT = 2.0
#: Every value of a part's ``reason``.
REASONS = ("ok", "refused_credentials", "unreachable", "timeout", "not_ready", "error")
#: The parts, in the order they are reported.
PARTS = ("job_store", "broker")


class InfraUnavailable(KieExtendError, ConnectionError):
    """The job store or the broker cannot be used; ``part`` is ``"job_store"`` or ``"broker"``,
    ``state`` the part's state dict (see the module docstring). The cause is chained."""

    def __init__(self, part: str, state: dict[str, Any]) -> None:
        super().__init__(state["detail"])
        self.part = part
        self.state = state


def classify(exc: BaseException) -> tuple[str, str]:
    """``(reason, detail)`` of a Redis/broker error: reason from :data:`REASONS`, detail in words
    (no password, no URL)."""

    detail = unreachable_reason(exc)[0]
    if detail == "it refused the credentials":
        return "refused_credentials", "refused the credentials (wrong user or password)"
    if detail.startswith("connection refused") or detail == "the host name does not resolve":
        return "unreachable", detail
    if detail == "the connection timed out":
        return "timeout", detail
    if detail.startswith("it cannot serve requests") or detail == "the sentinels name no such master":
        return "not_ready", detail
    if isinstance(exc, (redis.ConnectionError, ConnectionError, OSError)):
        return "unreachable", detail
    return "error", detail


class InfraProbe:
    """Pings the job store and the broker; clients are built once and reused (thread-safe)."""

    def __init__(self, settings: Settings, timeout: float = PROBE_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="infra-probe")

    @property
    def shared(self) -> bool:
        """Whether the broker is the job store's server (one probe serves both)."""
        return self.settings.effective_broker_url == self.settings.redis_url

    def _redis(self, url: str) -> redis.Redis:
        from kie_extend.infra.clients import redis_client

        with self._lock:
            if url not in self._clients:
                password = self.settings.sentinel_password
                client = redis_client(url, sentinel_master=self.settings.sentinel_master,
                                      sentinel_password=password.get_secret_value() if password else None,
                                      socket_timeout=self.timeout)
                # Short connect timeout too, and no retries: a probe answers now or says why not.
                pool = client.connection_pool
                if hasattr(pool, "connection_kwargs"):
                    pool.connection_kwargs.update(socket_connect_timeout=self.timeout, retry_on_error=[],
                                                  retry=Retry(NoBackoff(), 0))
                    if "orig_socket_connect_timeout" in pool.connection_kwargs:
                        pool.connection_kwargs["orig_socket_connect_timeout"] = self.timeout
                self._clients[url] = client
            return self._clients[url]

    def _ping(self, url: str) -> None:
        if is_redis(url):
            self._redis(url).ping()
            return
        from kombu import Connection

        with Connection(url, connect_timeout=self.timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=self.timeout)

    def _targets(self, parts: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        s = self.settings
        every = {"job_store": ("KIE_REDIS_URL", s.redis_url),
                 "broker": ("KIE_REDIS_URL" if self.shared else "KIE_BROKER_URL", s.effective_broker_url)}
        return {p: every[p] for p in parts}

    def check(self, parts: tuple[str, ...] = PARTS) -> dict[str, dict[str, Any]]:
        """``{part: state}`` for ``parts`` (see the module docstring), within ``timeout`` seconds in all."""
        return {p: public(s) for p, s in self._check(parts).items()}

    def _check(self, parts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        targets = self._targets(parts)
        futures: dict[str, Any] = {}
        for part, (_, url) in targets.items():
            same = next((p for p in futures if targets[p][1] == url), None)
            futures[part] = futures[same] if same else self._pool.submit(self._ping, url)
        deadline = time.monotonic() + self.timeout
        out: dict[str, dict[str, Any]] = {}
        for part, fut in futures.items():
            setting, url = targets[part]
            state: dict[str, Any] = {"up": True, "reason": "ok", "detail": "answers", "setting": setting,
                                     "url": mask_url(url)}
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                state.update(up=False, reason="timeout", detail=f"no answer within {self.timeout:g} s")
            except Exception as exc:  # noqa: BLE001 - any failure is a state; only its class of cause is kept
                reason, detail = classify(exc)
                state.update(up=False, reason=reason, detail=detail)
                state["_exc"] = exc
            out[part] = state
        return out

    def require(self, parts: tuple[str, ...] = PARTS) -> None:
        """Raise :class:`InfraUnavailable` (its cause the original error) when one of ``parts``
        refuses our credentials; other failures are left to the first real use, which says why.
        With the broker on the job store's server, one probe serves both."""
        for part, state in self._check(parts).items():
            if state["reason"] == "refused_credentials":
                raise InfraUnavailable(part, public(state)) from state.get("_exc")

    def close(self) -> None:
        """Close the probe's connections and threads."""
        self._pool.shutdown(wait=False)
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def public(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without its private entries (the exception kept for :meth:`InfraProbe.require`)."""
    return {k: v for k, v in state.items() if not k.startswith("_")}


def state_line(part: str, state: dict[str, Any]) -> str:
    """One line of ``kie-extend status``: ``job store: up at redis://:***@h:p/0 (KIE_REDIS_URL)`` or
    ``broker: REFUSED credentials (wrong user or password) at redis://:***@h:p/0; check KIE_BROKER_URL``."""
    name = part.replace("_", " ")
    if state["up"]:
        return f"{name}: up at {state['url']} ({state['setting']})"
    said = {"refused_credentials": "REFUSED credentials (wrong user or password)",
            "unreachable": f"UNREACHABLE ({state['detail']})", "timeout": f"NO ANSWER ({state['detail']})",
            "not_ready": f"NOT READY ({state['detail']})"}.get(state["reason"], f"FAILING ({state['detail']})")
    return f"{name}: {said} at {state['url']}; check {state['setting']}"


#: Loggers of Celery's "cannot connect to the broker, trying again" lines (worker and beat).
RETRY_LOGGERS = ("celery.worker.consumer.consumer", "celery.beat")
_RETRY_MARKERS = ("Cannot connect to", "Connection error:", "Connection to broker lost")


class BrokerRetryNote(logging.Filter):
    """Completes Celery's "cannot connect to the broker, trying again" lines of workers and beat
    with the setting to check, its URL (masked) and why, in our words::

        consumer: Cannot connect to …: invalid username-password pair …. Trying again in 10.00 seconds...
        (attempt 5; retrying until it answers) [broker KIE_BROKER_URL=redis://:***@h:p/0: it refused
        the credentials; check the user and password in KIE_BROKER_URL …]

    The lines keep Celery's pace (its backoff: 2, 4, … up to 30 s apart), so a broker that refuses
    us for hours is a line every 30 s, not a flood. Install with :meth:`install`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        shared = settings.effective_broker_url == settings.redis_url
        self.what = "job store and broker" if shared else "broker"
        self.setting = "KIE_REDIS_URL" if shared else "KIE_BROKER_URL"
        self.url = mask_url(settings.effective_broker_url)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record we cannot format is left to the handler
            return True
        if record.levelno < logging.WARNING or self.setting in text or not any(m in text for m in _RETRY_MARKERS):
            return True

        from kie_extend.infra.errors import is_infra_error

        args = record.args if isinstance(record.args, tuple) else ()
        exc = next((a for a in args if isinstance(a, BaseException)), None)
        if exc is not None and not is_infra_error(exc):
            return True  # not the broker's fault (a bug, a poison message): no note that blames it
        happened, fix = unreachable_reason(exc) if exc is not None else ("it does not answer", "check {var}")
        text = re.sub(r"\((\d+)/(None|0)\)", r"(attempt \1; retrying until it answers)", text.rstrip())
        record.msg = (f"{text} [{self.what} {self.setting}={self.url}: {happened}; "
                      f"{fix.format(var=self.setting)}]")
        record.args = ()
        return True

    @classmethod
    def install(cls, settings: Settings) -> BrokerRetryNote:
        """Add one note to each of :data:`RETRY_LOGGERS` (replacing an earlier one); returns it."""
        note = cls(settings)
        for name in RETRY_LOGGERS:
            logger = logging.getLogger(name)
            for old in [f for f in logger.filters if isinstance(f, cls)]:
                logger.removeFilter(old)
            logger.addFilter(note)
        return note


def _from_broker(exc: BaseException) -> bool:
    """Whether the error came out of the broker client (kombu/Celery/py-amqp) rather than the job store."""
    for e in chain(exc):
        if type(e).__module__.split(".")[0] in ("kombu", "amqp", "celery"):
            return True
        tb = e.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_globals.get("__name__", "")
            if module.split(".")[0] in ("kombu", "amqp", "celery") or module == "kie_extend.infra.transport":
                return True
            tb = tb.tb_next
    return False


def endpoint_of(exc: BaseException, settings: Any) -> tuple[str, str, str]:
    """``(what, variable, masked URL)`` of the server ``exc`` came from: the job store, the broker, or
    both when they share a URL; ``settings`` may be None when they could not be loaded."""
    if settings is None:
        return "the job store or broker", "KIE_REDIS_URL / KIE_BROKER_URL", "?"
    if settings.broker_url is None or settings.broker_url == settings.redis_url:
        return "the job store and broker", "KIE_REDIS_URL", mask_url(settings.redis_url)

    part = next((e.part for e in chain(exc) if isinstance(e, InfraUnavailable)), None)
    if part == "broker" or (part is None and _from_broker(exc)):
        return "the broker", "KIE_BROKER_URL", mask_url(settings.broker_url)
    return "the job store", "KIE_REDIS_URL", mask_url(settings.redis_url)

__all__ = ["InfraProbe", "BrokerRetryNote", "RETRY_LOGGERS", "InfraUnavailable", "classify", "endpoint_of", "public", "state_line", "PROBE_TIMEOUT", "REASONS",
           "PARTS"]


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes and contexts, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable_reason(exc: BaseException) -> tuple[str, str]:
    """``(what happened, how to fix it)`` of a Redis/broker connection error; ``{var}`` in the fix
    stands for the setting's name. Neither part contains a password."""
    from redis import exceptions as rx

    texts = " | ".join(f"{type(e).__name__}: {e}" for e in chain(exc))
    low = texts.lower()
    probed = next((e.state["reason"] for e in chain(exc) if isinstance(e, InfraUnavailable)), None)
    if probed == "refused_credentials" or any(isinstance(e, rx.AuthenticationError) for e in chain(exc)) or any(
            m in low for m in ("wrongpass", "noauth", "invalid password", "invalid username-password",
                               "authentication required", "access_refused", "auth <password> called without")):
        return "it refused the credentials", "check the user and password in {var} (percent-encode special characters)"
    if any(type(e).__name__ == "MasterNotFoundError" for e in chain(exc)) and "refused" not in low:
        return ("the sentinels name no such master", "check KIE_SENTINEL_MASTER (the name the sentinels "
                "monitor) and the sentinels in {var}")
    if "connection refused" in low or "errno 111" in low or "error 111" in low:
        return "connection refused (nothing listens there)", "start Redis there or point {var} at a running server"
    if any(m in low for m in ("name or service not known", "nodename nor servname", "temporary failure in name",
                              "name resolution", "getaddrinfo failed", "no address associated")):
        return "the host name does not resolve", "check the host in {var}"
    if probed == "timeout" or any(isinstance(e, (rx.TimeoutError, TimeoutError)) for e in chain(exc)) \
            or "timed out" in low:
        return "the connection timed out", "check that the host and port in {var} are reachable from here"
    inner = list(chain(exc))[-1]
    detail = f"{inner}".strip() or type(inner).__name__
    if isinstance(inner, rx.ResponseError):
        return f"it cannot serve requests right now ({detail})", "try again shortly; check the server's state"
    return detail, "check {var} and that the server is up"
