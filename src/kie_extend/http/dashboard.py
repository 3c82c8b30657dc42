"""The operator dashboard at ``/``: server-rendered pages, a token login into a
signed session cookie, CSRF-protected forms. No JavaScript; CSS is vendored under ``static/``.

Pages (all need a session once ``KIE_API_TOKENS`` is set; without tokens, loopback only, they are
open): ``/login``, ``/`` (overview), ``/jobs`` (filters, search, paging), ``/jobs/{id}`` (timeline,
request, tracks), ``/batches``, ``/batches/{id}``, ``/dead-letters``. Every change is a POST that
carries the session's CSRF token and a same-origin ``Origin`` (or ``Referer``); a read-only session
sees no buttons and its POSTs answer 403. The token a user pastes is never logged or echoed.

A session opened with a tenant's token (KIE_TENANTS_FILE) sees that tenant alone: ``/`` leads to
its jobs, the job and batch lists hold only its own, another tenant's job or batch answers 404 as an
unknown one does, and the account-wide pages and actions (dead letters, pause, resume, replay)
answer 403.

While the job store is unreachable every page answers 503 with ``unavailable.html``: the usual
navigation, what is wrong, and a reload every :data:`UNAVAILABLE_REFRESH` seconds (app.py's
handler for infrastructure errors calls ``app.state.unavailable_page``).

What the pages read lives in ``dashboard_data.py`` (the charts' SVG in ``charts.py``); this module
is the routes and the guards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from kie_extend.credits.prices import format_credits
from kie_extend.jobs.batches import cancel_batch, get_batch
from kie_extend.handlers.delivery import Delivery
from kie_extend.infra.endpoints import mask_url
from kie_extend.errors import ValidationError
from kie_extend.admission.gates import MAX_PAUSE_REASON
from kie_extend.jobs.intake import JOB_ID_PATTERN
from kie_extend.http import dashboard_data as data
from kie_extend.http.auth import SESSION_COOKIE, SESSION_MAX_AGE, Principal, client_address
from kie_extend.tenants.scope import owns_batch, tenant_filter
from kie_extend.tenants import audit

log = logging.getLogger("kie_extend.http.dashboard")

HERE = Path(__file__).resolve().parent

#: Short outcome codes a POST redirects with (``?m=``) and the sentence each one shows.
MESSAGES = {
    "retried": "The job was requeued; it will be submitted again (this may cost credits).",
    "not_retried": "Not retried: the job is not failed, or its request is invalid (fix the request instead).",
    "cancelled": "The job was cancelled.",
    "too_late": "Too late to cancel: the job was already sent to KIE, which has no cancel call.",
    "finished": "Nothing to cancel: the job has already finished.",
    "not_found": "No such job.",
    "batch_cancelled": "Every job of the batch not yet sent was cancelled.",
    "paused": "Submission is paused by an operator. Jobs already sent keep going.",
    "resumed": "The operator's pause was lifted.",
    "not_paused": "There was no operator pause to lift.",
    "replayed": "Dead letters were put back on the delivery schedule.",
    "logged_out": "You are logged out.",
}

#: Seconds between reloads of the "job store unreachable" page.
UNAVAILABLE_REFRESH = 5

#: Headers every dashboard page carries: no framing, no foreign scripts, no caching of pages.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src http: https:; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Redirect(Exception):
    """Raised by a guard to answer with a redirect (to the login page)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class _Forbidden(Exception):
    """Raised by a guard to answer 403 with a short reason."""


def mount(app: FastAPI) -> None:
    """Add the dashboard's routes and static files (``/static``) to ``app``."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["max_pause_reason"] = MAX_PAUSE_REASON
    templates.env.filters["credits"] = format_credits
    templates.env.filters["iso"] = data.iso
    templates.env.filters["pretty"] = data.pretty
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    auth = app.state.auth
    rt = app.state.runtime
    pipeline = app.state.pipeline

    @app.exception_handler(_Redirect)
    async def _redirect(request: Request, exc: _Redirect) -> Response:
        return RedirectResponse(exc.url, status_code=303)

    @app.exception_handler(_Forbidden)
    async def _forbidden(request: Request, exc: _Forbidden) -> Response:
        return _page(request, "error.html", {"status": 403, "message": str(exc)}, None, status=403)

    def principal_of(request: Request) -> Principal:
        """The logged-in user, or a redirect to the login page."""
        if not auth.enabled:
            return Principal("loopback", False)
        who = auth.from_session(request)
        if who is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _Redirect("/login?next=" + quote(target, safe=""))
        return who

    def owns_job(who: Principal, job_id: str) -> bool:
        """Whether ``who`` may act on the job (a tenant's session: its own jobs only)."""
        if who.tenant is None:
            return True
        rec = rt.store.get_record(job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
        return rec is not None and rec.tenant == who.tenant

    def writer(request: Request, csrf: str | None) -> Principal:
        """The user of a state-changing POST: logged in, allowed to write, same origin, right CSRF token."""
        who = principal_of(request)
        if not who.can_write:
            raise _Forbidden("This session is read-only: it may look at everything and change nothing.")
        if not same_origin(request):
            raise _Forbidden("The form did not come from this dashboard (Origin/Referer check).")
        if not auth.csrf_ok(request, csrf):
            raise _Forbidden("The form's CSRF token does not match this session; reload the page and try again.")
        return who

    def admin_only(who: Principal) -> None:
        """403 for a tenant's session: account-wide pages and actions are an admin's."""
        if not who.is_admin:
            raise _Forbidden("This session acts for one tenant; this page and action are for admin tokens.")

    def _not_found(request: Request, who: Principal, what: str) -> Response:
        return _page(request, "error.html", {"status": 404, "message": f"No {what}."}, who, status=404)

    def _page(request: Request, name: str, ctx: dict[str, Any], who: Principal | None, status: int = 200,
              store_down: bool = False) -> Response:
        session = auth.session(request, check_revoked=not store_down)
        fresh = None
        if session is None and not auth.enabled:
            # Open dashboard (loopback, no tokens): still a session, so forms carry a CSRF token.
            fresh = auth.new_session()
            session = auth._sessions.loads(fresh)
        context = {"request": request, "who": who, "can_write": bool(who and who.can_write),
                   "csrf": (session or {}).get("csrf", ""), "auth_enabled": auth.enabled,
                   "message": MESSAGES.get(request.query_params.get("m", "")),
                   "page_url": lambda n: _page_url(request, n), **ctx}
        resp = templates.TemplateResponse(request, name, context, status_code=status)
        resp.headers.update(SECURITY_HEADERS)
        if fresh:
            _set_cookie(request, resp, fresh)
        return resp

    def unavailable(request: Request, exc: Exception) -> Response:
        """The page every dashboard route answers while the job store is unreachable: 503, the usual
        navigation, what is wrong (the store's URL with its password masked, for a logged-in user
        only) and a reload every :data:`UNAVAILABLE_REFRESH` seconds."""
        who = (auth.from_session(request, check_revoked=False) if auth.enabled else Principal("loopback", False))
        ctx = {"status": 503, "error": type(exc).__name__, "refresh": True, "refresh_seconds": UNAVAILABLE_REFRESH,
               "store_url": mask_url(rt.settings.redis_url) if who else None}
        resp = _page(request, "unavailable.html", ctx, who, status=503, store_down=True)
        resp.headers["Retry-After"] = str(UNAVAILABLE_REFRESH)
        return resp

    app.state.unavailable_page = unavailable

    # -- login ---------------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> Response:
        return _page(request, "login.html", {"next": _local(next), "error": None}, None)

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    def login(request: Request, token: str = Form(""), next: str = Form("/")) -> Response:
        if not same_origin(request):
            raise _Forbidden("The form did not come from this dashboard (Origin/Referer check).")
        if not auth.enabled:
            resp = RedirectResponse(_local(next), status_code=303)
            _set_cookie(request, resp, auth.new_session())
            return resp
        wait = auth.failures.retry_after(client_address(request))
        if wait > 0:
            resp = _page(request, "login.html", {"next": _local(next), "error": "Too many failed logins from this "
                                                 f"address; try again in {int(wait) + 1} s."}, None, status=429)
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        match = auth.match(token.strip())
        if match is None and not token.strip():
            # An empty form guesses nothing: not counted, as a /v1 request without a header is not.
            return _page(request, "login.html", {"next": _local(next), "error": "Enter a token."}, None, status=401)
        if match is None:
            auth.failures.failed(client_address(request))
            log.warning("dashboard login refused: unknown token")  # never the token itself
            return _page(request, "login.html", {"next": _local(next), "error": "That token is not valid."}, None,
                         status=401)
        who = Principal(auth.name(match[0]), match[1], match[2])
        log.info("dashboard login by token %s%s%s", who.name, " (read-only)" if who.read_only else "",
                 f" for tenant {who.tenant}" if who.tenant else "")
        resp = RedirectResponse(_local(next), status_code=303)
        _set_cookie(request, resp, auth.new_session(match[0]))
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: str = Form("")) -> Response:
        if not (same_origin(request) and auth.csrf_ok(request, csrf)):
            raise _Forbidden("The form's CSRF token does not match this session.")
        auth.end_session(request)
        resp = RedirectResponse("/login?m=logged_out" if auth.enabled else "/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    # -- pages ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> Response:
        who = principal_of(request)
        if not who.is_admin:
            return RedirectResponse("/jobs", status_code=303)  # the account's overview is an admin's
        return _page(request, "overview.html", {"ov": data.overview(rt), "credits": data.credits(rt),
                                                "spend": data.spend(rt),
                                                "charts": data.chart_data(rt),
                                                "refresh": request.query_params.get("refresh") == "1"}, who)

    @app.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs(request: Request, state: str = "", batch: str = "", tenant: str = "", q: str = "",
             page: int = 1) -> Response:
        who = principal_of(request)
        if who.tenant is not None:
            scoped = tenant_filter(rt, who.tenant, batch or None)
            if scoped is False:
                batch = "-"  # no batch has this id: an empty list, as for an unknown batch
            tenant = "" if scoped is None else who.tenant  # None: the tenant's own batch, pending jobs too
        listing = data.list_jobs(rt, state=state, batch=batch, tenant=tenant, q=q, page=max(1, page))
        return _page(request, "jobs.html", {"listing": listing, "states": data.STATE_NAMES,
                                            "spend": data.spend(rt, who.tenant) if who.tenant is not None else None,
                                            "f": {"state": state, "batch": batch, "tenant": tenant, "q": q}}, who)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job(request: Request, job_id: str) -> Response:
        who = principal_of(request)
        detail = data.job_detail(rt, job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
        if detail is None or not who.sees(detail.get("tenant")):
            return _page(request, "error.html", {"status": 404, "message": f"No job {job_id}."}, who, status=404)
        return _page(request, "job.html", {"job": detail}, who)

    @app.get("/batches", response_class=HTMLResponse, include_in_schema=False)
    def batches(request: Request) -> Response:
        who = principal_of(request)
        listed = data.batches(rt)
        if who.tenant is not None:
            listed = [b for b in listed if owns_batch(rt, b["batch_id"], who.tenant)]
        return _page(request, "batches.html", {"batches": listed}, who)

    @app.get("/batches/{batch_id}", response_class=HTMLResponse, include_in_schema=False)
    def batch(request: Request, batch_id: str) -> Response:
        who = principal_of(request)
        info = get_batch(rt, batch_id)
        if info.get("state") == "not_found" or not owns_batch(rt, batch_id, who.tenant):
            return _page(request, "error.html", {"status": 404, "message": f"No batch {batch_id}."}, who, status=404)
        scoped = tenant_filter(rt, who.tenant, batch_id) if who.tenant is not None else None
        listing = data.list_jobs(rt, batch=batch_id, tenant=scoped or "",
                                 page=max(1, int(request.query_params.get("page", 1) or 1)))
        return _page(request, "batch.html", {"b": data.with_progress(info), "listing": listing}, who)

    @app.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    def dead_letters(request: Request) -> Response:
        who = principal_of(request)
        admin_only(who)
        letters = Delivery(rt).dead_letters(limit=200)
        total = int(rt.redis.llen(rt.keys.dead_letters))
        return _page(request, "dead_letters.html", {"letters": letters, "total": total,
                                                    "replayed": request.query_params.get("n")}, who)

    # -- actions (POST, CSRF, Origin, write rights) --------------------------------------------
    @app.post("/jobs/{job_id}/retry", include_in_schema=False)
    def retry(request: Request, job_id: str, csrf: str = Form("")) -> Response:
        who = writer(request, csrf)
        if not owns_job(who, job_id):
            return _not_found(request, who, f"job {job_id}")
        ok = pipeline.retry(job_id)
        log.warning("dashboard: retry %s by %s: %s", job_id, who.name, "requeued" if ok else "refused")
        return _back(f"/jobs/{quote(job_id, safe='')}", "retried" if ok else "not_retried")

    @app.post("/jobs/{job_id}/cancel", include_in_schema=False)
    def cancel(request: Request, job_id: str, csrf: str = Form("")) -> Response:
        who = writer(request, csrf)
        if not owns_job(who, job_id):
            return _not_found(request, who, f"job {job_id}")
        outcome = pipeline.cancel(job_id)
        log.warning("dashboard: cancel %s by %s: %s", job_id, who.name, outcome)
        return _back(f"/jobs/{quote(job_id, safe='')}", outcome)

    @app.post("/batches/{batch_id}/cancel", include_in_schema=False)
    def cancel_a_batch(request: Request, batch_id: str, csrf: str = Form("")) -> Response:
        who = writer(request, csrf)
        if get_batch(rt, batch_id).get("state") == "not_found" or not owns_batch(rt, batch_id, who.tenant):
            return _page(request, "error.html", {"status": 404, "message": f"No batch {batch_id}."}, who, status=404)
        n = cancel_batch(rt, batch_id, pipeline.cancel_many)
        log.warning("dashboard: cancel batch %s by %s: %d cancelled", batch_id, who.name, n)
        return _back(f"/batches/{quote(batch_id, safe='')}", "batch_cancelled")

    @app.post("/pause", include_in_schema=False)
    def pause(request: Request, csrf: str = Form(""), reason: str = Form("")) -> Response:
        who = writer(request, csrf)
        admin_only(who)
        try:
            audit.pause(rt, who=who.tenant or "admin", via="dashboard",
                        reason=reason.strip() or f"paused from the dashboard ({who.name})")
        except ValidationError as exc:
            return _page(request, "error.html", {"status": 422, "message": f"Not paused: the reason "
                         f"{exc.errors[0]['message']}."}, who, status=422)
        log.warning("dashboard: submission paused by %s", who.name)
        return _back("/", "paused")

    @app.post("/resume", include_in_schema=False)
    def resume(request: Request, csrf: str = Form("")) -> Response:
        who = writer(request, csrf)
        admin_only(who)
        ok = audit.resume(rt, who=who.tenant or "admin", via="dashboard")
        log.warning("dashboard: resume by %s: %s", who.name, "lifted" if ok else "no pause")
        return _back("/", "resumed" if ok else "not_paused")

    @app.post("/dead-letters/replay", include_in_schema=False)
    def replay(request: Request, csrf: str = Form(""), job_id: str = Form("")) -> Response:
        who = writer(request, csrf)
        admin_only(who)
        n = Delivery(rt).replay(job_id or None)
        log.warning("dashboard: %d dead letter(s) replayed by %s", n, who.name)
        return RedirectResponse(f"/dead-letters?m=replayed&n={n}", status_code=303)


def same_origin(request: Request) -> bool:
    """Whether a POST came from a page of this server: its ``Origin`` (or, without one, its
    ``Referer``) names the host the request was sent to. A request with neither is refused."""
    host = request.headers.get("host", "")
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc.lower() == host.lower()


def _set_cookie(request: Request, resp: Response, value: str) -> None:
    resp.set_cookie(SESSION_COOKIE, value, max_age=SESSION_MAX_AGE, path="/", httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")


def _local(target: str) -> str:
    """``target`` if it is a path on this site, else ``/`` (no open redirects after login)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _page_url(request: Request, page: int) -> str:
    """This page's URL with the same filters and page number ``page``."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "m")]
    return request.url.path + "?" + urlencode([*params, ("page", str(page))])


def _back(path: str, code: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?m={code}", status_code=303)
