"""Start-up checks of the Redis servers a process depends on, run by the worker, beat and serve.

The one check today: the job store (and a Redis broker) must not evict keys. An evicted job record
is a lost, possibly paid job; an evicted broker message is a job that never runs. So a process
refuses to start unless ``maxmemory-policy`` is ``noeviction``, or ``KIE_ALLOW_EVICTION=true``
turns the refusal into a loud warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from kie_extend.config import Settings
from kie_extend.infra.endpoints import is_redis, mask_url
from kie_extend.errors import ConfigError

log = logging.getLogger("kie_extend.infra.preflight")

#: The only maxmemory-policy under which Redis never drops one of our keys.
SAFE_POLICY = "noeviction"


def endpoints_line(settings: Settings) -> str:
    """``job store redis://:***@host:6380/0, broker …``: where this process connects, passwords masked."""
    return f"job store {mask_url(settings.redis_url)}, broker {mask_url(settings.effective_broker_url)}"


def eviction_policy(client: redis.Redis) -> str | None:
    """The server's ``maxmemory-policy``: CONFIG GET, else ``INFO memory`` when CONFIG is disabled
    (renamed away, or not allowed by an ACL or a managed service); None if neither answers.

    Raises redis.ConnectionError / TimeoutError when the server cannot be reached.
    """
    try:
        value = client.config_get("maxmemory-policy").get("maxmemory-policy")
        if value:
            return str(value.decode() if isinstance(value, bytes) else value)
    except redis.ResponseError:
        pass
    try:
        value = client.info("memory").get("maxmemory_policy")
    except redis.ResponseError:
        return None
    return str(value) if value else None


def _message(what: str, url: str, policy: str | None, allowed: bool) -> str:
    where = f"{what} ({mask_url(url)})"
    if policy is None:
        return (f"{where}: could not read maxmemory-policy (CONFIG GET and INFO memory both refused); make "
                f"sure it is '{SAFE_POLICY}': an evicted job record is a lost, possibly paid job")
    text = (f"{where} has maxmemory-policy '{policy}': when it reaches maxmemory it will delete keys, and an "
            f"evicted job record is a lost, possibly paid job (an evicted broker message is a job that never "
            f"runs). Fix: set 'maxmemory-policy {SAFE_POLICY}' in its configuration (redis.conf / valkey.conf, "
            f"or the managed service's parameter group), or at run time CONFIG SET maxmemory-policy "
            f"{SAFE_POLICY}, and give it enough maxmemory.")
    if allowed:
        return text + " Starting anyway because KIE_ALLOW_EVICTION=true."
    return text + " To start anyway (not recommended), set KIE_ALLOW_EVICTION=true."


def check_eviction(settings: Settings, connect: Callable[[str], redis.Redis] | None = None) -> list[str]:
    """Check the job store and, when it is Redis, the broker; returns the warnings logged.

    Raises ConfigError naming the server, the policy, why it matters and how to fix it when a
    server may evict keys and ``KIE_ALLOW_EVICTION`` is false. A server that cannot be reached is
    only a warning here (workers and beat retry their connections).
    """
    if connect is None:
        from kie_extend.infra.clients import settings_redis

        def connect(url: str) -> redis.Redis:
            return settings_redis(settings, url)

    targets = [("job store (KIE_REDIS_URL)", settings.redis_url)]
    broker = settings.effective_broker_url
    if broker != settings.redis_url and is_redis(broker):
        targets.append(("broker (KIE_BROKER_URL)", broker))
    elif broker == settings.redis_url:
        targets = [("job store and broker (KIE_REDIS_URL)", settings.redis_url)]
    warnings: list[str] = []
    for what, url in targets:
        client = connect(url)
        try:
            policy = eviction_policy(client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            from kie_extend.infra.check import unreachable_reason

            happened, fix = unreachable_reason(exc)
            var = what[what.index("(") + 1:what.index(")")]
            state = "cannot be used" if happened == "it refused the credentials" else "is not reachable"
            warnings.append(f"{what} ({mask_url(url)}) {state}: {happened}; {fix.format(var=var)}. "
                            "Starting anyway: connections are retried until it answers "
                            "(its maxmemory-policy could not be checked)")
            continue
        finally:
            client.close()
        if policy == SAFE_POLICY:
            continue
        message = _message(what, url, policy, settings.allow_eviction)
        if policy is not None and not settings.allow_eviction:
            raise ConfigError(message)
        warnings.append(message)
    for warning in warnings:
        log.warning("WARNING: %s", warning)
    return warnings


def run(settings: Settings, process: str) -> None:
    """Log where ``process`` connects (passwords masked), then run every start-up check.

    Raises ConfigError when a check refuses the start.
    """
    log.info("%s: %s", process, endpoints_line(settings))
    check_eviction(settings)
