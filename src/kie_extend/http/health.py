"""Liveness, readiness and the "job store unavailable" condition of the HTTP app.

- Liveness (``/healthz``, alias ``/livez``) answers 200 while the process serves HTTP; it touches
  nothing else, so a restart policy never restarts ``serve`` because Redis is down (that would not
  bring Redis back).
- Readiness (``/readyz``) answers 200 only when the job store and the Celery broker answer, within
  :data:`READY_TIMEOUT` seconds in all; otherwise 503 with a JSON reason. The body names the failed
  dependency and the error's type, never a URL, password or token.
- :class:`Throttled` logs "job store unavailable" once per interval instead of once per request.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import Settings
from ..endpoints import is_redis
from ..runtime import REDIS_OPTIONS, redis_client

#: Seconds a readiness check may take in all (each connection attempt gets the same bound).
READY_TIMEOUT = 2.0

log = logging.getLogger("kie_extend.http")


class Readiness:
    """Checks the job store and the broker for ``/readyz``; clients are built once and reused."""

    def __init__(self, settings: Settings, timeout: float = READY_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readyz")

    def _redis(self, url: str) -> redis.Redis:
        with self._lock:
            if url not in self._clients:
                password = self.settings.sentinel_password
                client = redis_client(url, sentinel_master=self.settings.sentinel_master,
                                      sentinel_password=password.get_secret_value() if password else None,
                                      socket_timeout=self.timeout)
                # Short connect timeout too, and no retries: a probe answers now or says why not.
                for pool in _pools(client):
                    pool.connection_kwargs.update(socket_connect_timeout=self.timeout, retry_on_error=[],
                                                  retry=Retry(NoBackoff(), 0))
                    if "orig_socket_connect_timeout" in pool.connection_kwargs:
                        pool.connection_kwargs["orig_socket_connect_timeout"] = self.timeout
                self._clients[url] = client
            return self._clients[url]

    def _ping_redis(self, url: str) -> None:
        self._redis(url).ping()

    def _ping_broker(self, url: str) -> None:
        if is_redis(url):
            self._ping_redis(url)
            return
        from kombu import Connection

        with Connection(url, connect_timeout=self.timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=self.timeout)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``: body is ``{"status": "ready"|"not_ready", "checks": {"job_store":
        {"ok": bool, "error"?: str}, "broker": {...}}, "reason"?: str}``; at most ``timeout`` seconds."""
        broker = self.settings.effective_broker_url
        jobs = {"job_store": self._pool.submit(self._ping_redis, self.settings.redis_url)}
        jobs["broker"] = jobs["job_store"] if broker == self.settings.redis_url else \
            self._pool.submit(self._ping_broker, broker)
        deadline = time.monotonic() + self.timeout
        checks: dict[str, dict[str, Any]] = {}
        for name, fut in jobs.items():
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
                checks[name] = {"ok": True}
            except FutureTimeout:
                checks[name] = {"ok": False, "error": f"no answer within {self.timeout:g} s"}
            except Exception as exc:  # any failure is "not ready"; only its type goes on the wire
                checks[name] = {"ok": False, "error": type(exc).__name__}
        failed = [n for n, c in checks.items() if not c["ok"]]
        body: dict[str, Any] = {"status": "not_ready" if failed else "ready", "checks": checks}
        if failed:
            body["reason"] = "; ".join(f"{n.replace('_', ' ')} unreachable ({checks[n]['error']})" for n in failed)
        return not failed, body


def _pools(client: redis.Redis) -> list[Any]:
    pool = client.connection_pool
    return [pool] if hasattr(pool, "connection_kwargs") else []


class Throttled:
    """One warning per ``every`` seconds for a repeated condition, counting the ones left out."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, logger: logging.Logger, message: str, *args: Any) -> bool:
        """Log ``message % args`` at WARNING unless one was logged less than ``every`` s ago; returns
        whether it was logged. A logged line says how many were left out since the previous one."""
        with self._lock:
            now = time.monotonic()
            if self._last and now - self._last < self.every:
                self._skipped += 1
                return False
            skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} more like it in the last {self.every:g} s not logged)" if skipped else ""
        logger.warning(message + suffix, *args)
        return True


__all__ = ["Readiness", "Throttled", "READY_TIMEOUT", "REDIS_OPTIONS"]
