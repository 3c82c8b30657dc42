"""Liveness, readiness and the "job store unavailable" condition of the HTTP app.

- Liveness (``/healthz``, alias ``/livez``) answers 200 while the process serves HTTP; it touches
  nothing else, so a restart policy never restarts ``serve`` because Redis is down (that would not
  bring Redis back).
- Readiness (``/readyz``) answers 200 only when the job store and the Celery broker answer, within
  :data:`READY_TIMEOUT` seconds in all; otherwise 503 with a JSON reason. The body names the failed
  dependency, why (credentials refused, unreachable, not ready: a closed set) and the setting to
  check, never a URL, password or token.
"""

from __future__ import annotations

import logging
from typing import Any

from kie_extend.config import Settings
from kie_extend.infra.check import PROBE_TIMEOUT, InfraProbe
from kie_extend.infra.clients import REDIS_OPTIONS

#: Seconds a readiness check may take in all (each connection attempt gets the same bound).
READY_TIMEOUT = PROBE_TIMEOUT

log = logging.getLogger(__name__)


#: What ``/readyz``'s reason says for each failure reason (infra.check.REASONS).
_SAYS = {"refused_credentials": "refused credentials", "unreachable": "unreachable", "timeout": "unreachable",
         "not_ready": "not ready", "error": "unreachable"}


class Readiness:
    """Checks the job store and the broker for ``/readyz`` (infra.check.InfraProbe, clients reused)."""

    def __init__(self, settings: Settings, timeout: float = READY_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self.probe = InfraProbe(settings, timeout)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``: body is ``{"status": "ready"|"not_ready", "checks": {"job_store":
        {"ok": bool, "reason": str, "error"?: str, "setting": str}, "broker": {...}}, "reason"?: str}``.

        A check's ``reason`` is one of infra.check.REASONS (``refused_credentials`` apart from
        ``unreachable``, ``timeout``, ``not_ready``, ``error``); ``error`` says what happened in words;
        ``setting`` names the variable to fix. No URL, password or token. At most ``timeout`` seconds."""
        states = self.probe.check()
        checks: dict[str, dict[str, Any]] = {}
        for name, st in states.items():
            checks[name] = {"ok": st["up"], "reason": st["reason"], "setting": st["setting"]}
            if not st["up"]:
                checks[name]["error"] = st["detail"]
        failed = [n for n, c in checks.items() if not c["ok"]]
        body: dict[str, Any] = {"status": "not_ready" if failed else "ready", "checks": checks}
        if failed:
            body["reason"] = "; ".join(
                f"{n.replace('_', ' ')} {_SAYS.get(checks[n]['reason'], 'unreachable')} ({checks[n]['error']}; "
                f"check {checks[n]['setting']})" for n in failed)
        return not failed, body


__all__ = ["Readiness", "READY_TIMEOUT", "REDIS_OPTIONS"]
