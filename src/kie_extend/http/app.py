"""The ASGI app behind ``kie-extend serve``: callbacks, the JSON API and the dashboard.

FastAPI (on Starlette, served by uvicorn) gives the OpenAPI document from the code and pydantic
models we already use; see the README's design notes. The callback route keeps the receiver's
behaviour (DESIGN §8): it answers 200 fast, verifies KIE's HMAC when ``KIE_CALLBACK_SECRET`` is set,
caps the body and only makes the job's next poll happen now.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..errors import describe_problems
from ..infra import is_infra_error
from ..intake import JOB_ID_PATTERN
from ..receiver import MAX_BODY, callback_task_id, signature_ok
from ..runtime import Runtime
from .auth import Auth, parse_tokens

log = logging.getLogger("kie_extend.http")

#: The parts one app can serve; ``kie-extend serve --callback-port`` splits them over two ports.
PARTS = ("callbacks", "api", "dashboard")


def error_body(kind: str, message: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """DESIGN §12's error shape: ``{"error": {"kind", "message", "errors"?}}``."""
    err: dict[str, Any] = {"kind": kind, "message": message}
    if errors is not None:
        err["errors"] = errors
    return {"error": err}


def create_app(settings: Settings, *, parts: Iterable[str] = PARTS, runtime: Runtime | None = None,
               dispatcher: Any = None) -> FastAPI:
    """The app serving ``parts`` (any of ``callbacks``, ``api``, ``dashboard``) for ``settings``.

    ``dispatcher`` sends follow-up work (a Celery dispatcher in ``serve``; None leaves it to the
    beat tick). Raises ValueError on an unknown part."""
    parts = tuple(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts: {sorted(unknown)}")
    from ..pipeline import Pipeline

    rt = runtime or Runtime(settings)
    app = FastAPI(title="kie-extend", version=_version(),
                  description="Jobs for KIE.AI's Suno Upload And Extend Audio API: the JSON API for "
                              "services that do not speak Celery (DESIGN §12).",
                  docs_url="/docs" if "api" in parts else None, redoc_url=None,
                  openapi_url="/openapi.json" if "api" in parts else None)
    app.state.settings = settings
    app.state.runtime = rt
    app.state.pipeline = Pipeline(rt, dispatcher)
    app.state.auth = Auth(parse_tokens(settings.api_tokens.get_secret_value() if settings.api_tokens else ""),
                          settings.session_secret.get_secret_value() if settings.session_secret else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"kind": "error", "message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in _field_loc(e.get("loc", ()))) or "body",
                   "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
        return JSONResponse(error_body("invalid_request", f"the request failed validation: {describe_problems(errors)}",
                                       errors), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # No detail on the wire: it could name internals; the log has the traceback.
        if is_infra_error(exc):
            log.warning("job store unavailable: %s", type(exc).__name__)
            return JSONResponse(error_body("unavailable", "the job store is unavailable; try again"),
                                status_code=503, headers={"Retry-After": "5"})
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "unexpected server error"), status_code=500)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False, response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        from ..metrics import render

        return PlainTextResponse(render(rt), media_type="text/plain; version=0.0.4")

    if "callbacks" in parts:
        _callbacks(app, settings)
    if "api" in parts:
        from .api_v1 import install

        install(app)
    if "dashboard" in parts:
        from .dashboard import mount as mount_dashboard

        mount_dashboard(app)
    return app


def _callbacks(app: FastAPI, settings: Settings) -> None:
    secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None

    @app.post("/kie/callback/{job_id}", include_in_schema=False)
    async def callback(job_id: str, request: Request) -> JSONResponse:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return JSONResponse({"error": "not found"}, status_code=404)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        if secret:
            headers = {k.lower(): v for k, v in request.headers.items()}
            if not signature_ok(body, headers, secret):
                log.warning("callback with a bad or missing signature ignored", extra={"job_id": job_id})
                return JSONResponse({"error": "bad signature"}, status_code=401)
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        kind = str(data.get("callbackType") or body.get("callbackType") or "")
        try:
            await run_in_threadpool(app.state.pipeline.hint, job_id, callback_task_id(body), kind)
        except Exception as exc:  # KIE gets its 200 anyway; polling stays the source of truth
            if is_infra_error(exc):
                log.warning("callback not recorded, job store unavailable (%s: %s); polling will find the result",
                            type(exc).__name__, exc, extra={"job_id": job_id})
            else:
                log.exception("callback handling failed", extra={"job_id": job_id})
        return JSONResponse({"status": "received"})


def openapi_text() -> str:
    """The OpenAPI document of the full app as stable JSON text (``docs/openapi.json``). Builds the
    app on default settings; nothing connects to Redis."""
    settings = Settings(_env_file=None, redis_url="redis://127.0.0.1:6379/0", api_tokens="openapi")
    return json.dumps(create_app(settings).openapi(), indent=2, ensure_ascii=False) + "\n"


def _field_loc(loc: Iterable[Any]) -> list[Any]:
    """A validation error's location without FastAPI's ``body``/``query``/``path`` head."""
    parts = list(loc)
    return parts[1:] if parts and parts[0] in ("body", "query", "path", "header") else parts


def _version() -> str:
    from .. import __version__

    return __version__
