"""The ASGI app behind ``kie-extend serve``: callbacks, the JSON API and the dashboard.

FastAPI (on Starlette, served by uvicorn) gives the OpenAPI document from the code and pydantic
models we already use; see the README's design notes. It is the project's one HTTP stack: the
callback route (http/callbacks.py) answers 200 fast, verifies KIE's HMAC when
``KIE_CALLBACK_SECRET`` is set, caps the body and only makes the job's next poll happen now.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kie_extend.config import Settings
from kie_extend.errors import describe_problems
from kie_extend.infra.errors import is_infra_error
from kie_extend.infra.runtime import Runtime
from kie_extend.http.auth import Auth, FailureLimit, Revocations, parse_tokens
from kie_extend.http.health import Readiness
from kie_extend.infra.logs import Throttled
from kie_extend.http.limits import BodyLimit, Limits

log = logging.getLogger(__name__)

#: The parts one app can serve; ``kie-extend serve --callback-port`` splits them over two ports.
PARTS = ("callbacks", "api", "dashboard")
#: Where ``/docs`` loads Swagger UI's script and stylesheet from (vendored, version in its README).
DOCS_ASSETS = "/docs/assets"
#: The vendored Swagger UI (``static/swagger-ui``).
SWAGGER_UI_VERSION = "5.35.0"
#: Seconds a client is told to wait (``Retry-After``) while the job store is unavailable.
RETRY_AFTER = 5
#: Seconds between two "job store unavailable" log lines (the ones between are counted, not logged).
UNAVAILABLE_LOG_EVERY = 10.0
#: Path prefixes that are not dashboard pages: they answer JSON (or text) even with the dashboard on.
NOT_PAGES = ("/v1/", "/v1", "/kie/", "/metrics", "/healthz", "/livez", "/readyz", "/openapi.json", "/docs", "/static/")


#: The error ``kind`` of an HTTP status answered without one of its own (an unknown path, a wrong method).
STATUS_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "timeout", 409: "conflict", 413: "too_large",
                415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
                503: "unavailable"}


def status_kind(status: int) -> str:
    """The error ``kind`` for an HTTP ``status`` (``internal`` for a 5xx not listed, ``error`` else)."""
    return STATUS_KINDS.get(status, "internal" if status >= 500 else "error")


def _status_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return f"no such path: {request.url.path[:200]}"
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        return f"method {request.method} not allowed on {request.url.path[:200]}" + (f"; allowed: {allow}" if allow else "")
    return str(exc.detail)


def error_body(kind: str, message: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The API's error shape: ``{"error": {"kind", "message", "errors"?}}``."""
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
    from kie_extend.jobs.pipeline import Pipeline

    rt = runtime or Runtime(settings)
    app = FastAPI(title="kie-extend", version=_version(),
                  description="Jobs for KIE.AI's Suno Upload And Extend Audio API: the JSON API for "
                              "services that do not speak Celery.",
                  docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if "api" in parts else None)
    app.state.settings = settings
    app.state.runtime = rt
    app.state.pipeline = Pipeline(rt, dispatcher)
    app.state.auth = Auth(parse_tokens(settings.api_tokens.get_secret_value() if settings.api_tokens else ""),
                          settings.session_secret.get_secret_value() if settings.session_secret else None,
                          failures=FailureLimit(*settings.http_auth_failures),
                          revocations=Revocations(rt.redis, rt.keys.session_revoked),
                          tenant_tokens=[(t.value, t.read_only, t.tenant) for t in settings.tenants.tokens]
                          if settings.tenants is not None else None)
    app.state.limits = limits = Limits.from_settings(settings)
    # Outermost of the app's own middleware: no route ever sees more body than its limit allows.
    app.add_middleware(BodyLimit, limits=limits)

    # Starlette's own HTTPException (an unknown path's 404, a wrong method's 405) is the base class
    # of FastAPI's: one handler gives both the API's error shape.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict) and "kind" in exc.detail:
            detail = exc.detail
        else:
            detail = {"kind": status_kind(exc.status_code), "message": _status_message(request, exc)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in _field_loc(e.get("loc", ()))) or "body",
                   "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
        return JSONResponse(error_body("invalid_request", f"the request failed validation: {describe_problems(errors)}",
                                       errors), status_code=422)

    unavailable_log = Throttled(UNAVAILABLE_LOG_EVERY)

    async def _unavailable(request: Request, exc: Exception) -> Response:
        """A transient Redis/broker error: 503 and one throttled WARNING line, no traceback. Handlers
        registered per exception class run inside Starlette's ExceptionMiddleware, which (unlike the
        catch-all ``Exception`` handler) does not re-raise to the server after answering."""
        if not is_infra_error(exc):
            raise exc  # e.g. a WRONGTYPE reply: a bug, answered 500 with its traceback below
        unavailable_log.warning(log, "job store unavailable (%s) on %s %s; answering 503", type(exc).__name__,
                                request.method, request.url.path)
        page = getattr(app.state, "unavailable_page", None)
        if page is not None and _is_page(request.url.path):
            return page(request, exc)
        return JSONResponse(error_body("unavailable", "the job store is unavailable; try again"),
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER)})

    for cls in _infra_classes():
        app.add_exception_handler(cls, _unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # No detail on the wire: it could name internals; the log has the traceback.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "unexpected server error"), status_code=500)

    app.state.readiness = Readiness(settings)

    @app.get("/healthz", include_in_schema=False)
    @app.get("/livez", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP. Touches nothing else (see health.py)."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        """Readiness: the job store and the broker answer (200), or 503 with the reason."""
        ready, body = app.state.readiness.check()
        if not ready:  # the report as it is, plus the error shape every other answer uses
            body["error"] = {"kind": "unavailable", "message": body.get("reason", "not ready")}
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers={"Cache-Control": "no-store", **({} if ready else {"Retry-After": str(RETRY_AFTER)})})

    @app.get("/metrics", include_in_schema=False, response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        from kie_extend.infra.metrics import render

        return PlainTextResponse(render(rt), media_type="text/plain; version=0.0.4")

    if "callbacks" in parts:
        from kie_extend.http.callbacks import install as install_callbacks

        install_callbacks(app, settings, log_every=UNAVAILABLE_LOG_EVERY)
    if "api" in parts:
        from kie_extend.http.api_v1 import install

        install(app)
        _docs(app)
    if "dashboard" in parts:
        from kie_extend.http.dashboard import mount as mount_dashboard

        mount_dashboard(app)
    return app


def _docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the vendored files under ``static/swagger-ui`` (no CDN, so it
    works offline and behind a proxy that blocks one; see that folder's README)."""
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(Path(__file__).resolve().parent / "static" / "swagger-ui")),
              name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API docs",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css", swagger_favicon_url="data:,")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def openapi_text() -> str:
    """The OpenAPI document of the full app as stable JSON text (``docs/openapi.json``). Builds the
    app on default settings; nothing connects to Redis."""
    settings = Settings(_env_file=None, redis_url="redis://127.0.0.1:6379/0", api_tokens="openapi")
    return json.dumps(create_app(settings).openapi(), indent=2, ensure_ascii=False) + "\n"


def _is_page(path: str) -> bool:
    """Whether ``path`` is a dashboard page (HTML) rather than the API, callbacks or probes."""
    return not any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in NOT_PAGES)


def _infra_classes() -> tuple[type[BaseException], ...]:
    """The exception classes that may be transient infrastructure errors (``is_infra_error`` decides)."""
    import redis

    classes: list[type[BaseException]] = [redis.exceptions.RedisError, ConnectionError, TimeoutError]
    try:
        from kombu.exceptions import OperationalError

        classes.append(OperationalError)
    except ImportError:  # pragma: no cover - kombu is a dependency
        pass
    return tuple(classes)


def _field_loc(loc: Iterable[Any]) -> list[Any]:
    """A validation error's location without FastAPI's ``body``/``query``/``path`` head."""
    parts = list(loc)
    return parts[1:] if parts and parts[0] in ("body", "query", "path", "header") else parts


def _version() -> str:
    from kie_extend import __version__

    return __version__
