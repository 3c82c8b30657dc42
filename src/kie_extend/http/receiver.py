"""The callback receiver: ``POST /kie/callback/{job_id}`` turns a provider callback into a poll.

A small WSGI app (served by waitress, a pure-Python production WSGI server). It answers fast,
verifies the provider's HMAC headers when ``KIE_CALLBACK_SECRET`` is set, caps the body size and
never marks a job done on a callback's word: it only makes the job's next poll happen now.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any, Callable, Iterable

from kie_extend.infra.errors import is_infra_error
from kie_extend.jobs.intake import JOB_ID_PATTERN
from kie_extend.jobs.pipeline import Pipeline

log = logging.getLogger("kie_extend.http.receiver")

#: Largest callback body accepted (bytes); real ones are a few KB.
MAX_BODY = 256 * 1024
#: Deepest JSON nesting a callback body may have.
JSON_MAX_DEPTH = 64
#: Oldest signature timestamp accepted (seconds), against replay.
MAX_SKEW = 300

_ROUTE = re.compile(rf"^/kie/callback/({JOB_ID_PATTERN.pattern})/?$")
StartResponse = Callable[..., Any]


def callback_task_id(body: dict[str, Any]) -> str | None:
    """The provider's task id in a callback body: ``task_id`` or ``taskId``, in ``data`` or at the top
    level (the provider's pages and clients use all four)."""
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    for where in (data, body):
        for name in ("task_id", "taskId"):
            value = where.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
    return None


def signature_ok(body: dict[str, Any], headers: dict[str, str], secret: str, now: float | None = None) -> bool:
    """The provider's callback HMAC: base64(HMAC-SHA256(secret, task_id + "." + timestamp))."""
    ts = headers.get("x-webhook-timestamp", "")
    sig = headers.get("x-webhook-signature", "")
    task_id = callback_task_id(body) or ""
    if not (ts.isdigit() and sig and task_id):
        return False
    if abs((now or time.time()) - int(ts)) > MAX_SKEW:
        return False
    mac = hmac.new(secret.encode(), f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(mac).decode(), sig)


class CallbackApp:
    """WSGI app for provider callbacks, liveness (``/healthz``, ``/livez``), readiness (``/readyz``,
    when ``ready`` is given: a callable answering ``(ready, body)``, see http/health.py) and
    ``/metrics`` (503 while the job store is unavailable)."""

    def __init__(self, pipeline: Pipeline, secret: str | None = None,
                 metrics: Callable[[], str] | None = None,
                 ready: Callable[[], tuple[bool, dict[str, Any]]] | None = None, max_body: int = MAX_BODY) -> None:
        self.pipeline = pipeline
        self.max_body = max_body
        self.secret = secret
        self.metrics = metrics
        self.ready = ready

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/livez"):
            return _reply(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz" and self.ready is not None:
            ok, state = self.ready()
            return _reply(start_response, "200 OK" if ok else "503 Service Unavailable", state)
        if path == "/metrics" and self.metrics is not None:
            try:
                body = self.metrics().encode()
            except Exception as exc:
                if not is_infra_error(exc):
                    raise
                log.warning("metrics not available, job store unavailable (%s)", type(exc).__name__)
                return _reply(start_response, "503 Service Unavailable",
                              {"error": {"kind": "unavailable", "message": "the job store is unavailable; try again"}})
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))])
            return [body]
        match = _ROUTE.match(path)
        if not match:
            return _reply(start_response, "404 Not Found", {"error": "not found"})
        if method != "POST":
            return _reply(start_response, "405 Method Not Allowed", {"error": "POST only"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > self.max_body:
            return _reply(start_response, "413 Payload Too Large", {"error": "body too large"})
        # waitress de-chunks a chunked body and sets CONTENT_LENGTH; it read at most its own limit.
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            from kie_extend.http.limits import TooDeep, loads

            body = loads(raw or b"{}", JSON_MAX_DEPTH)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except TooDeep:
            return _reply(start_response, "422 Unprocessable Entity", {"error": "body nested too deep"})
        except ValueError:
            return _reply(start_response, "400 Bad Request", {"error": "body must be a JSON object"})
        job_id = match.group(1)
        if self.secret:
            headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
            if not signature_ok(body, headers, self.secret):
                log.warning("callback with a bad or missing signature ignored", extra={"job_id": job_id})
                return _reply(start_response, "401 Unauthorized", {"error": "bad signature"})
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        task_id = callback_task_id(body)
        try:
            self.pipeline.hint(job_id, task_id, str(data.get("callbackType") or body.get("callbackType") or ""))
        except Exception as exc:  # the provider must get its 200 anyway; polling stays the source of truth
            if is_infra_error(exc):
                log.warning("callback not recorded, job store unavailable (%s: %s); polling will find the result",
                            type(exc).__name__, exc, extra={"job_id": job_id})
            else:
                log.exception("callback handling failed", extra={"job_id": job_id})
        return _reply(start_response, "200 OK", {"status": "received"})


def _reply(start_response: StartResponse, status: str, payload: dict[str, Any]) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def serve(app: CallbackApp, host: str = "127.0.0.1", port: int = 8080, threads: int = 8, *,
          max_body: int = MAX_BODY, channel_timeout: float = 30.0) -> None:
    """Serve the receiver with waitress until interrupted; bodies over ``max_body`` bytes get 413."""
    from waitress import serve as waitress_serve

    # waitress counts the body as it reads it (chunked or not) and answers 413 past the limit; a
    # connection silent for channel_timeout seconds is closed.
    waitress_serve(app, host=host, port=port, threads=threads, ident="kie-extend", _quiet=True,
                   max_request_body_size=max_body, channel_timeout=channel_timeout)
