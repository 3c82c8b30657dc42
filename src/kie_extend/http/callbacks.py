"""KIE's callbacks: ``POST /kie/callback/{job_id}`` turns a provider callback into a poll.

``POST /kie/callback/step/{job_id}/{n}`` does the same for a follow-up step (jobs/steps.py): its
callback also names the step's task when a 409 or a lost answer left the entry without one.

The route is part of ``kie-extend serve``'s app (``callbacks``, see app.py ``PARTS``); ``kie-extend
serve --callbacks-only`` (and its older name ``kie-extend callback-server``) serves it alone. It
answers fast, verifies the provider's HMAC headers when ``KIE_CALLBACK_SECRET`` is set, takes at
most ``KIE_HTTP_CALLBACK_MAX_BODY`` bytes of body (http/limits.py answers 413 past it) and never
marks a job done on a callback's word: it only makes the job's next poll happen now.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kie_extend.config import Settings
from kie_extend.infra.logs import Throttled
from kie_extend.http.limits import TooDeep, loads
from kie_extend.infra.errors import is_infra_error
from kie_extend.jobs.intake import JOB_ID_PATTERN

log = logging.getLogger(__name__)

#: Oldest (or furthest ahead) signature timestamp accepted, in seconds from now, against replay.
MAX_SKEW = 300
#: Path of the route; ``{job_id}`` follows the job id grammar (jobs/intake.py), else 404.
ROUTE = "/kie/callback/{job_id}"
#: Path of a follow-up step's callback (jobs/steps.py): the job and the entry's index.
STEP_ROUTE = "/kie/callback/step/{job_id}/{n}"


def callback_task_id(body: dict[str, Any]) -> str | None:
    """The provider's task id in a callback body: ``task_id`` or ``taskId``, in ``data`` or at the top
    level (the provider's pages and clients use all four); None when there is none."""
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    for where in (data, body):
        for name in ("task_id", "taskId"):
            value = where.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
    return None


def signature_ok(body: dict[str, Any], headers: dict[str, str], secret: str, now: float | None = None) -> bool:
    """Whether the provider's callback HMAC holds: ``x-webhook-signature`` (``headers`` keys in lower
    case) is base64(HMAC-SHA256(secret, task_id + "." + x-webhook-timestamp)) with the timestamp
    (epoch seconds) within :data:`MAX_SKEW` of ``now`` (default: the clock)."""
    ts = headers.get("x-webhook-timestamp", "")
    sig = headers.get("x-webhook-signature", "")
    task_id = callback_task_id(body) or ""
    if not (ts.isdigit() and sig and task_id):
        return False
    if abs((now or time.time()) - int(ts)) > MAX_SKEW:
        return False
    mac = hmac.new(secret.encode(), f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(mac).decode(), sig)


def _error(kind: str, message: str) -> dict[str, Any]:
    """The API's error shape, ``{"error": {"kind", "message"}}`` (as app.py's ``error_body``)."""
    return {"error": {"kind": kind, "message": message}}


def install(app: FastAPI, settings: Settings, log_every: float = 10.0) -> None:
    """Add the callback route to ``app`` (built by app.py: ``app.state.pipeline`` and
    ``app.state.limits`` set, BodyLimit in place). Answers: 200 ``{"status": "received"}`` (also
    for an unknown or finished job, and when the job store is unavailable: one WARNING per
    ``log_every`` seconds), 400 not a JSON object, 401 bad or missing signature (with a secret),
    404 a malformed job id, 405 not POST, 413 body too large, 422 JSON nested too deep. Every
    error is ``{"error": {"kind", "message"}}``: kinds ``invalid_json`` (400, 422), ``unauthorized``,
    ``not_found``, ``method_not_allowed``, ``too_large``."""
    secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
    unrecorded_log = Throttled(log_every)

    async def checked_body(request: Request, job_id: str) -> dict[str, Any] | JSONResponse:
        """The callback's JSON object, or the error answer (400, 422; 401 for a bad signature)."""
        raw = await request.body()  # at most KIE_HTTP_CALLBACK_MAX_BODY bytes: BodyLimit answered 413 otherwise
        try:
            body = loads(raw or b"{}", app.state.limits.json_max_depth)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except TooDeep as exc:
            return JSONResponse(_error("invalid_json", f"body {exc}"), status_code=422)
        except ValueError:
            return JSONResponse(_error("invalid_json", "the body must be a JSON object"), status_code=400)
        if secret:
            headers = {k.lower(): v for k, v in request.headers.items()}
            if not signature_ok(body, headers, secret):
                log.warning("callback with a bad or missing signature ignored", extra={"job_id": job_id})
                return JSONResponse(_error("unauthorized", "bad or missing webhook signature"), status_code=401)
        return body

    @app.post(ROUTE, include_in_schema=False)
    @app.post(ROUTE + "/", include_in_schema=False)
    async def callback(job_id: str, request: Request) -> JSONResponse:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return JSONResponse(_error("not_found", f"no such job id: {job_id[:200]}"), status_code=404)
        body = await checked_body(request, job_id)
        if isinstance(body, JSONResponse):
            return body
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        kind = str(data.get("callbackType") or body.get("callbackType") or "")
        try:
            await run_in_threadpool(app.state.pipeline.hint, job_id, callback_task_id(body), kind)
        except Exception as exc:  # KIE gets its 200 anyway; polling stays the source of truth
            if is_infra_error(exc):
                unrecorded_log.warning(log, "callback for %s not recorded, job store unavailable (%s: %s); polling "
                                            "will find the result", job_id, type(exc).__name__, exc)
            else:
                log.exception("callback handling failed", extra={"job_id": job_id})
        return JSONResponse({"status": "received"})

    @app.post(STEP_ROUTE, include_in_schema=False)
    async def step_callback(job_id: str, n: str, request: Request) -> JSONResponse:
        if not JOB_ID_PATTERN.fullmatch(job_id) or not n.isdigit() or len(n) > 3:
            return JSONResponse(_error("not_found", f"no such step: {job_id[:200]}/{n[:10]}"), status_code=404)
        body = await checked_body(request, job_id)
        if isinstance(body, JSONResponse):
            return body
        try:
            await run_in_threadpool(app.state.pipeline.steps.hint, job_id, int(n), body)
        except Exception as exc:  # the step's poll stays the source of truth
            if is_infra_error(exc):
                unrecorded_log.warning(log, "step callback for %s not recorded, job store unavailable (%s: %s)",
                                       job_id, type(exc).__name__, exc)
            else:
                log.exception("step callback handling failed", extra={"job_id": job_id})
        return JSONResponse({"status": "received"})
