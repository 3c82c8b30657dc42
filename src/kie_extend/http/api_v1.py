"""The JSON API under ``/v1``. Every route needs a bearer token (``auth.py``); routes
that change anything need a write token (403 for a ``read:`` one).

A tenant's token (KIE_TENANTS_FILE) acts as its tenant: its submissions take that tenant (a body
naming another is 403), and it sees, cancels and retries only that tenant's jobs and batches:
another tenant's id answers 404 exactly as an unknown one does. Pause, resume and the tenants list
need an admin token (KIE_API_TOKENS, or the file's ``[admin]`` tokens).

Bodies are parsed here and validated by the Python API's own code path, so a field error reads the
same from every language; every error is ``{"error": {"kind", "message", "errors"?}}``. Store and
broker calls block, so they run in the thread pool and the event loop stays free for callbacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import WithJsonSchema
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from kie_extend import api

from kie_extend.jobs import actions
from kie_extend.jobs.actions import ActionResult
from kie_extend.jobs.batches import get_batch, list_batches
from kie_extend.errors import IdempotencyConflictError, JobExistsError, ValidationError, describe_problems
from kie_extend.admission.gates import check_pause_reason
from kie_extend.jobs.ids import id_problem, rule, schema_pattern
from kie_extend.jobs.intake import EXTEND_KWARGS, EXTEND_OPTIONS, unknown_name_message
from kie_extend.infra.jsontext import DuplicateKeyError
from kie_extend.jobs.listing import DEFAULT_LIMIT, MAX_LIMIT, list_jobs
from kie_extend.infra.metrics import overview
from kie_extend.config import parse_duration
from kie_extend.credits.prices import steps_price
from kie_extend.credits.quotes import quote
from kie_extend.credits.usage import tenant_views_with_usage, usage_report
from kie_extend.store.keys import LEDGER_TTL
from kie_extend.jobs.states import JobState
from kie_extend.http.auth import Auth, Principal
from kie_extend.http.limits import TooDeep, loads
from kie_extend.tenants import audit
from kie_extend.tenants.scope import batch_tenants_of_jobs, claim_batch, owns_batch, system_for, tenant_filter
from kie_extend.tenants.settings import UnknownTenant, views
from kie_extend.http.schemas import (BATCH_ID_SCHEMA_PATTERN, CURSOR_SCHEMA_PATTERN, JOB_ID_SCHEMA_PATTERN, MAX_JOBS_PER_REQUEST,
                      MAX_PAUSE_REASON, Batch, BatchCancelled, BatchList, BatchSubmission, CancelOutcome, ErrorBody,
                      JobAccepted, JobPage, JobRecord, JobsAccepted, JobSubmission, PauseRequest, PauseState,
                      ResumeOutcome, RetryOutcome, SystemOverview, TenantList, TenantUpdate, TenantUpdated,
                      AuditList, Quote, Usage)

#: Fields of one job object (``audio_file`` is the Python API's only: a server-side path is no input).
ITEM_FIELDS = (*EXTEND_KWARGS, "job_id")
#: Fields of ``{"jobs": [...]}`` besides ``jobs``: defaults for every job.
BATCH_FIELDS = EXTEND_OPTIONS

T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="A token from KIE_API_TOKENS; a read: token may only read.")


def reader(request: Request, _: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Principal:
    """Any valid token; raises 401 (JSON) otherwise."""
    return request.app.state.auth.from_request(request)


def writer(request: Request, principal: Principal = Depends(reader)) -> Principal:
    """A token that may change things; raises 403 for a read-only one, and, without KIE_API_TOKENS,
    for a request a browser sent from another site (see :func:`_cross_site`; with tokens, a page
    cannot add the Authorization header without a CORS preflight this app never grants)."""
    Auth.require_write(principal)
    if not request.app.state.auth.enabled and _cross_site(request):
        raise fail(403, "forbidden", "a browser request from another site (Origin/Sec-Fetch-Site) may not change "
                                     "anything here; call the API from a program, or use the dashboard")
    return principal


def admin(request: Request, principal: Principal = Depends(reader)) -> Principal:
    """An admin token (KIE_API_TOKENS or the tenants file's ``[admin]``); 403 for a tenant's."""
    Auth.require_admin(principal)
    return principal


def operator(request: Request, principal: Principal = Depends(writer)) -> Principal:
    """An admin token that may change things (pause, resume); 403 for a tenant's or a read-only one."""
    Auth.require_admin(principal)
    return principal


def _cross_site(request: Request) -> bool:
    """Whether a browser sent this request from another site: ``Sec-Fetch-Site: cross-site`` or an
    ``Origin`` other than this server's. Without KIE_API_TOKENS (loopback only) a web page could
    otherwise make the visitor's browser enqueue paid jobs or pause submission with a plain form
    (``text/plain``, no preflight). Programs send neither header."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("origin")
    if not origin:
        return False
    host = request.headers.get("host", "")
    return origin.rstrip("/").lower() not in {f"http://{host}".lower(), f"https://{host}".lower()}


def _errors(*codes: int, success: tuple[int, dict[str, Any]] | None = None) -> dict[int | str, dict[str, Any]]:
    """The documented error answers: 401 and 503 on every route, and ``codes``; ``success`` is
    ``(status, entry)`` merged into the success answer (its description and links)."""
    described = {401: "no valid bearer token", 403: "read-only token; a tenant's token naming another tenant or "
                                                    "on an admin route (without tokens: a browser request from "
                                                    "another site)",
                 404: "unknown id",
                 408: "the body did not arrive within KIE_HTTP_BODY_TIMEOUT",
                 409: "conflict with the job's state", 413: "the body is larger than KIE_HTTP_API_MAX_BODY bytes",
                 422: "invalid request: every bad field listed (also the rules the schema can only describe)",
                 429: "too many failed authentications from this address (Retry-After: seconds)",
                 503: "the job store is unavailable (Retry-After: seconds)"}
    if 413 in codes:
        codes = (408, *codes)
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody, "description": described[c]}
                                            for c in sorted((401, *codes, 429, 503))}
    if success is not None:
        out[success[0]] = success[1]
    return out


#: Path parameters as documented: ids this API can have issued (others answer 404).
JobIdPath = Annotated[str, Path(description=f"a job id: {rule('job_id').removeprefix('must be ')}"),
                      WithJsonSchema({"type": "string", "pattern": JOB_ID_SCHEMA_PATTERN})]
BatchIdPath = Annotated[str, Path(description=f"a batch id: {rule('batch_id').removeprefix('must be ')}"),
                        WithJsonSchema({"type": "string", "pattern": BATCH_ID_SCHEMA_PATTERN})]


def _job_links(expr: str, where: str, suffix: str = "") -> dict[str, Any]:
    """OpenAPI links from an answer naming a job (``expr``: a runtime expression) to the job routes."""
    return {name + suffix: {"operationId": op, "parameters": {"job_id": expr}, "description": f"{what} {where}"}
            for name, op, what in (("GetJob", "getJob", "The status record of the job"),
                                   ("CancelJob", "cancelJob", "Cancel the job"),
                                   ("RetryJob", "retryJob", "Retry the job"))}


def _batch_links(expr: str, where: str) -> dict[str, Any]:
    """OpenAPI links from an answer or request naming a batch to the batch routes."""
    return {"GetBatch": {"operationId": "getBatch", "parameters": {"batch_id": expr},
                         "description": f"The progress of the batch {where}"},
            "CancelBatch": {"operationId": "cancelBatch", "parameters": {"batch_id": expr},
                            "description": f"Cancel the batch {where}"},
            "ListBatchJobs": {"operationId": "listJobs", "parameters": {"batch_id": expr},
                              "description": f"The jobs of the batch {where}"}}


_SUBMIT_LINKS = {
    **_job_links("$response.body#/job_id", "just submitted (a single job)"),
    **_job_links("$response.body#/job_ids/0", 'first in a {"jobs": [...]} submission', "First"),
    **_batch_links("$request.body#/batch_id", "named by the submission's batch_id"),
}


def fail(status: int, kind: str, message: str, errors: list[dict[str, str]] | None = None) -> HTTPException:
    """An HTTPException the app renders in the API's error shape."""
    detail: dict[str, Any] = {"kind": kind, "message": message}
    if errors is not None:
        detail["errors"] = errors
    return HTTPException(status, detail=detail)


def invalid(errors: list[dict[str, str]]) -> HTTPException:
    """422 listing every bad field."""
    return fail(422, "invalid_request", f"the request failed validation ({len(errors)} problem(s)): "
                f"{describe_problems(errors)}", errors)


async def _blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


async def _json_body(request: Request, *, optional: bool = False) -> Any:
    raw = await request.body()  # bounded while read: limits.BodyLimit answers 413 past KIE_HTTP_API_MAX_BODY
    if not raw.strip() and optional:
        return {}
    try:
        return loads(raw, request.app.state.limits.json_max_depth, unique=True)
    except TooDeep as exc:
        raise invalid([{"field": "body", "message": f"JSON {exc} (KIE_HTTP_JSON_MAX_DEPTH)"}]) from None
    except DuplicateKeyError as exc:
        raise invalid([{"field": "body", "message": f"is ambiguous: {exc}"}]) from None
    except ValueError as exc:
        raise invalid([{"field": "body", "message": f"not valid JSON ({exc})"}]) from None


def _schema_ref(*names: str) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{n}"} for n in names]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


router = APIRouter(prefix="/v1", tags=["v1"])


# -- jobs --------------------------------------------------------------------------------------

@router.post("/jobs", status_code=202, response_model=JobAccepted | JobsAccepted, operation_id="submitJobs",
             responses=_errors(403, 409, 413, 422, success=(202, {"description": "Accepted: the job ids, in the order "
                                                                               "given", "links": _SUBMIT_LINKS})),
             openapi_extra=_schema_ref("JobSubmission", "BatchSubmission"))
async def submit_jobs(request: Request, principal: Principal = Depends(writer)) -> JSONResponse:
    """Validate and enqueue one job (a ``JobSubmission``) or several (``{"jobs": [...]}``).

    202 ``{"job_id"}`` or ``{"job_ids": [...]}`` in the order given. 422 lists every bad field with
    the Python API's names and messages (``continueAt``; ``[2].model`` in a list)
    and nothing is enqueued; it also covers the rules the schema can only describe (the JSON size of
    ``request`` and ``metadata``). 409 ``job_exists`` when an explicit ``job_id`` is held by another
    request (nothing enqueued; the same submission again is answered 202 with the same id). 409
    ``conflict`` when the ``idempotency_key`` is held, in the tenant, by a different request (the
    refusal is recorded as a failed job with its own event; ``job_ids`` names it)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise invalid([{"field": "body", "message": 'must be a JSON object: one job, or {"jobs": [...]}'}])
    settings = request.app.state.settings
    if principal.tenant is not None:
        await _blocking(_as_tenant, body, principal.tenant, request.app.state.runtime)
    try:
        if "jobs" in body:
            ids = await _blocking(_submit_many, body, settings)
            return JSONResponse({"job_ids": ids}, status_code=202)
        job_id = await _blocking(_submit_one, body, settings)
        return JSONResponse({"job_id": job_id}, status_code=202)
    except JobExistsError as exc:
        raise fail(409, "job_exists", exc.errors[0]["message"], exc.errors) from None
    except IdempotencyConflictError as exc:
        # The refusal was recorded as a failed job with its own event: its id comes with the error.
        error = fail(409, "conflict", exc.errors[0]["message"], exc.errors)
        error.detail["job_ids"] = exc.job_ids
        raise error from None
    except ValidationError as exc:
        raise invalid(exc.errors) from None


def _as_tenant(body: dict[str, Any], tenant: str, rt: Any, claim: bool = True) -> None:
    """Make a tenant's submission its own: 403 when the body (or a job in it) names another tenant,
    or a batch another tenant's submission created; otherwise ``tenant`` becomes the body's tenant
    and the batches it names are recorded as the tenant's (``claim`` False, for a quote: only
    checked, nothing written)."""
    items = body["jobs"] if isinstance(body.get("jobs"), list) else []
    named = [body.get("tenant"), *(i.get("tenant") for i in items if isinstance(i, dict))]
    if any(t is not None and t != tenant for t in named):
        raise fail(403, "forbidden", f"this token acts for tenant {tenant}; a submission may name no other tenant")
    declared = list(rt.settings.tenants.tenants) if rt.settings.tenants is not None else [tenant]
    problems = []
    for where, item in [("", body), *((f"[{i}].", it) for i, it in enumerate(items))]:
        job_id = item.get("job_id") if isinstance(item, dict) else None
        if isinstance(job_id, str) and id_problem("job_id", job_id) is None and id_owner(job_id, declared) != tenant:
            problems.append({"field": f"{where}job_id", "message": f"with a tenant's token an explicit job_id must "
                             f"start with {tenant + '.'!r} (the tenant's own ids; see README \"Tenants as "
                             "boundaries\"), or be left out to get a generated one"})
    if problems:
        raise invalid(problems)
    body["tenant"] = tenant
    batches = {b for b in [body.get("batch_id"), *(i.get("batch_id") for i in items if isinstance(i, dict))]
               if b is not None and id_problem("batch_id", b) is None}
    for batch_id in sorted(batches):
        if not (claim_batch(rt, batch_id, tenant) if claim else _may_join(rt, batch_id, tenant)):
            raise fail(403, "forbidden", f"batch {batch_id} belongs to another tenant; choose another batch_id")


def _may_join(rt: Any, batch_id: str, tenant: str) -> bool:
    """Whether ``tenant`` could add jobs to the batch (claim_batch's answer), read only."""
    owner = rt.redis.get(rt.keys.batch_owner(batch_id))
    if owner is not None:
        return (owner.decode() if isinstance(owner, bytes) else str(owner)) == tenant
    known = batch_tenants_of_jobs(rt, batch_id)
    return not known or tenant in known


def id_owner(job_id: str, tenants: list[str]) -> str | None:
    """The tenant whose namespace an explicit job id is in: the longest declared tenant ``T`` such that
    the id starts with ``T.`` (None: no tenant's; such ids are for admins and Celery producers). Each
    id has one owner, so a tenant's token can never name, and so never probe, another tenant's id."""
    owners = [t for t in tenants if job_id.startswith(t + ".") and len(job_id) > len(t) + 1]
    return max(owners, key=len) if owners else None


def _unknown(obj: dict[str, Any], known: tuple[str, ...], prefix: str = "") -> list[dict[str, str]]:
    return [{"field": f"{prefix}{k}", "message": unknown_name_message(k, known, "field")}
            for k in sorted(set(obj) - set(known))]


def _bad_job_id(job_id: Any, prefix: str = "") -> list[dict[str, str]]:
    problem = None if job_id is None else id_problem("job_id", job_id)
    return [{**problem, "field": f"{prefix}job_id"}] if problem else []


def _submit_one(body: dict[str, Any], settings: Any, send: bool = True) -> Any:
    """Validate one job body and enqueue it: its id; ``send`` False (a quote): enqueue nothing and
    return ``[(tenant, priority)]``."""
    problems = _unknown(body, ITEM_FIELDS) + _bad_job_id(body.get("job_id"))
    kwargs = {k: body.get(k) for k in ITEM_FIELDS if k != "request"}
    if problems:
        # Report the rest too, from the same checks, and send nothing.
        try:
            api.check_extend(body.get("request"), settings=settings,
                             **{k: v for k, v in kwargs.items() if k != "job_id"})
        except ValidationError as exc:
            problems += exc.errors
        raise ValidationError(problems)
    if not send:
        checked = api.check_many([{k: v for k, v in body.items() if k in ITEM_FIELDS}], settings=settings)
        return [(o["tenant"], o["priority"], steps_price(settings.prices, o.get("steps"), o.get("takes")))
                for o in checked]
    return api.enqueue_extend(body.get("request"), settings=settings, **kwargs)  # type: ignore[arg-type]


def _submit_many(body: dict[str, Any], settings: Any, send: bool = True) -> list[Any]:
    """Validate ``{"jobs": [...]}`` and enqueue every job: the ids; ``send`` False (a quote): enqueue
    nothing and return ``[(tenant, priority)]`` in order."""
    jobs = body["jobs"]
    problems = _unknown(body, ("jobs", *BATCH_FIELDS))
    if not isinstance(jobs, list) or not jobs:
        raise ValidationError(problems + [{"field": "jobs", "message": "must be a non-empty list of job objects"}])
    if len(jobs) > MAX_JOBS_PER_REQUEST:
        raise ValidationError(problems + [{"field": "jobs", "message": f"at most {MAX_JOBS_PER_REQUEST} jobs per "
                                           "request; send several with the same batch_id"}])
    for i, item in enumerate(jobs):
        if not isinstance(item, dict):
            problems.append({"field": f"[{i}]", "message": "must be a JSON object"})
        else:
            problems += _unknown(item, ITEM_FIELDS, f"[{i}].")
    if problems:
        # Run the item checks as well (skipping non-objects) so the answer lists every problem.
        items = [{k: v for k, v in item.items() if k in ITEM_FIELDS} if isinstance(item, dict) else None
                 for item in jobs]
        for i, item in enumerate(items):
            if item is None:
                continue
            try:
                api.check_extend(item.get("request"), settings=settings,
                                 **{k: item.get(k, body.get(k)) for k in ("idempotency_key", "metadata",
                                                                         *BATCH_FIELDS)})
            except ValidationError as exc:
                problems += [{"field": f"[{i}].{e['field']}", "message": e["message"]} for e in exc.errors]
            problems += _bad_job_id(item.get("job_id"), f"[{i}].")
        raise ValidationError(problems)
    if not send:
        return [(o["tenant"], o["priority"], steps_price(settings.prices, o.get("steps"), o.get("takes")))
                for o in api.check_many(jobs, settings=settings, **{k: body.get(k) for k in BATCH_FIELDS})]
    return api.enqueue_many(jobs, settings=settings, **{k: body.get(k) for k in BATCH_FIELDS})


@router.post("/quote", response_model=Quote, responses=_errors(403, 413, 422), operation_id="quoteJobs",
             openapi_extra=_schema_ref("JobSubmission", "BatchSubmission"))
async def quote_jobs(request: Request, principal: Principal = Depends(writer)) -> JSONResponse:
    """What ``POST /v1/jobs`` with the same body would cost and when it would be done, enqueuing
    nothing and writing nothing: ``{"jobs", "credits", "eta_seconds", "balance", "budget_left",
    "fits", ...}`` (see README "Credits"). The body is validated as ``POST /v1/jobs`` validates it
    (the same 422, the same 403 for a tenant's token naming another tenant or its batch)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise invalid([{"field": "body", "message": 'must be a JSON object: one job, or {"jobs": [...]}'}])
    settings = request.app.state.settings
    rt = request.app.state.runtime
    if principal.tenant is not None:
        await _blocking(_as_tenant, body, principal.tenant, rt, False)
    try:
        jobs = await _blocking(_submit_many if "jobs" in body else _submit_one, body, settings, False)
    except ValidationError as exc:
        raise invalid(exc.errors) from None
    return JSONResponse(await _blocking(quote, rt, jobs))


@router.get("/jobs/{job_id}", response_model=JobRecord, responses=_errors(404), operation_id="getJob")
async def read_job(job_id: JobIdPath, request: Request, principal: Principal = Depends(reader)) -> JSONResponse:
    """One job's status record; 404 with ``state: not_found`` for an unknown id (and, for a
    tenant's token, for another tenant's job)."""
    rec = await _blocking(api.get_job, job_id, settings=request.app.state.settings)
    if rec["state"] == JobState.NOT_FOUND.value or not principal.sees(rec.get("tenant")):
        return JSONResponse({"job_id": job_id, "state": "not_found",
                             "error": {"kind": "not_found", "message": actions.not_found(job_id)}}, status_code=404)
    return JSONResponse(rec)


_LISTED_STATES = [s.value for s in JobState if s is not JobState.NOT_FOUND]


@router.get("/jobs", response_model=JobPage, operation_id="listJobs",
            responses=_errors(403, 422, success=(200, {"description": "One page of jobs", "links": {
                **_job_links("$response.body#/jobs/0/job_id", "first on the page"),
                "NextPage": {"operationId": "listJobs", "parameters": {"cursor": "$response.body#/next_cursor"},
                             "description": "The next page (same filters); absent on the last page"}}})))
async def list_jobs_route(
    request: Request,
    state: Annotated[str | None, Query(description=(
        "only jobs in this state. With batch_id, also pending: declared in the batch, not yet recorded by a "
        "worker (OpenAPI cannot tie one parameter's values to another's, so the enum lists the states valid "
        "without batch_id; 422 for pending without batch_id)")),
        WithJsonSchema({"type": "string", "enum": _LISTED_STATES})] = None,
    batch_id: Annotated[str | None, Query(description="only this batch's jobs"),
                        WithJsonSchema({"type": "string"})] = None,
    tenant: Annotated[str | None, Query(description="only this tenant's jobs (a tenant's token sees its own only)"),
                      WithJsonSchema({"type": "string"})] = None,
    limit: Annotated[int, Query(description=f"jobs per page, 1-{MAX_LIMIT}"),
                     WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page (opaque; its form is "
                                                    "<creation time>~<job id>)"),
                      WithJsonSchema({"type": "string", "pattern": CURSOR_SCHEMA_PATTERN})] = None,
    principal: Principal = Depends(reader),
) -> JSONResponse:
    """Jobs newest first (by creation time), filtered, one page at a time: follow ``next_cursor``
    until it is null. A page may be short while ``next_cursor`` is set when filters skip many."""
    if principal.tenant is not None:
        if tenant is not None and tenant != principal.tenant:  # as GET /v1/usage and POST /v1/jobs answer
            raise fail(403, "forbidden", f"this token acts for tenant {principal.tenant}; it lists no other tenant's jobs")
        scoped = await _blocking(tenant_filter, request.app.state.runtime, principal.tenant,
                                 batch_id if batch_id and id_problem("batch_id", batch_id) is None else None)
        if scoped is False:
            return JSONResponse({"jobs": [], "next_cursor": None})
        tenant = scoped  # type: ignore[assignment]
    try:
        jobs, nxt = await _blocking(list_jobs, request.app.state.runtime, state=state, batch_id=batch_id,
                                    tenant=tenant, limit=limit, cursor=cursor)
    except ValidationError as exc:
        raise invalid(exc.errors) from None
    return JSONResponse({"jobs": jobs, "next_cursor": nxt})


_STATUS = {"not_found": 404}


async def _own_job(request: Request, principal: Principal, job_id: str) -> None:
    """For a tenant's token, 404 (as for an unknown id) unless the job is the tenant's."""
    if principal.tenant is None:
        return
    rec = await _blocking(api.get_job, job_id, settings=request.app.state.settings)
    if rec["state"] == JobState.NOT_FOUND.value or rec.get("tenant") != principal.tenant:
        raise fail(404, "not_found", actions.not_found(job_id))


def _refused(result: ActionResult) -> HTTPException:
    """The HTTP error for a refused retry or cancel: the same outcome code and sentence as the CLI."""
    return fail(_STATUS.get(result.outcome, 409), result.outcome, result.message)


@router.post("/jobs/{job_id}/cancel", response_model=CancelOutcome, responses=_errors(403, 404, 409),
             operation_id="cancelJob")
async def cancel_job(job_id: JobIdPath, request: Request, principal: Principal = Depends(writer)) -> JSONResponse:
    """Cancel a job not yet sent to KIE. 409 ``too_late`` once it was sent (it keeps going), 409
    ``finished`` when it already ended, 404 for an unknown id."""
    await _own_job(request, principal, job_id)
    result = await _blocking(actions.cancel_job, request.app.state.pipeline, job_id)
    if not result.ok:
        raise _refused(result)
    return JSONResponse({"job_id": job_id, "outcome": "cancelled"})


@router.post("/jobs/{job_id}/retry", response_model=RetryOutcome, responses=_errors(403, 404, 409),
             operation_id="retryJob")
async def retry_job(job_id: JobIdPath, request: Request, principal: Principal = Depends(writer)) -> JSONResponse:
    """Send a failed job to KIE again (it may cost credits again). 409 when the job is not failed,
    or failed on field errors (fix the request and enqueue a new job); 404 for an unknown id."""
    await _own_job(request, principal, job_id)
    result = await _blocking(actions.retry_job, request.app.state.pipeline, job_id)
    if not result.ok:
        raise _refused(result)
    return JSONResponse({"job_id": job_id, "outcome": "queued"})


# -- batches -----------------------------------------------------------------------------------

@router.get("/batches", response_model=BatchList, operation_id="listBatches",
            responses=_errors(422, success=(200, {"description": "The newest batches", "links": _batch_links(
                "$response.body#/batches/0/batch_id", "listed first")})))
async def list_batches_route(request: Request, limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT,
                                                                  description=f"batches to list, 1-{MAX_LIMIT}"),
                             principal: Principal = Depends(reader)) -> JSONResponse:
    """The newest batches, newest first (a tenant's token: its own, among the newest ``MAX_LIMIT``)."""
    rt = request.app.state.runtime
    if principal.tenant is None:
        return JSONResponse({"batches": await _blocking(list_batches, rt, limit)})
    batches = await _blocking(list_batches, rt, MAX_LIMIT)
    mine = [b for b in batches if await _blocking(owns_batch, rt, b["batch_id"], principal.tenant)][:limit]
    return JSONResponse({"batches": mine})


@router.get("/batches/{batch_id}", response_model=Batch, responses=_errors(404), operation_id="getBatch")
async def read_batch(batch_id: BatchIdPath, request: Request, principal: Principal = Depends(reader)) -> JSONResponse:
    """A batch's counts by state; 404 for an unknown batch (and, for a tenant's token, another's)."""
    rec = await _blocking(get_batch, request.app.state.runtime, batch_id)
    if rec.get("state") == "not_found" or not await _blocking(owns_batch, request.app.state.runtime, batch_id,
                                                              principal.tenant):
        raise fail(404, "not_found", f"no batch {batch_id}")
    return JSONResponse(rec)


@router.post("/batches/{batch_id}/cancel", response_model=BatchCancelled, responses=_errors(403, 404),
             operation_id="cancelBatch")
async def cancel_batch_route(batch_id: BatchIdPath, request: Request, principal: Principal = Depends(writer)) -> JSONResponse:
    """Cancel every job of the batch not yet sent, and any that arrives later; ``cancelled`` counts
    the jobs cancelled now. 404 for an unknown batch."""
    settings = request.app.state.settings
    rt = request.app.state.runtime
    if ((await _blocking(get_batch, rt, batch_id)).get("state") == "not_found"
            or not await _blocking(owns_batch, rt, batch_id, principal.tenant)):
        raise fail(404, "not_found", f"no batch {batch_id}")
    n = await _blocking(api.cancel_batch, batch_id, settings=settings)
    return JSONResponse({"batch_id": batch_id, "cancelled": n})


# -- operator pause and the system view ----------------------------------------------------------

@router.post("/pause", response_model=PauseState, responses=_errors(403, 413, 422), operation_id="pause",
             openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/PauseRequest"}}}}})
async def pause(request: Request, principal: Principal = Depends(operator)) -> JSONResponse:
    """An operator's pause: no job is sent to KIE until resume (jobs already sent keep going).
    Body optional: ``{"reason": "..."}``."""
    body = await _json_body(request, optional=True)
    reason = body.get("reason", "") if isinstance(body, dict) else None
    problems = [] if isinstance(body, dict) else [{"field": "body", "message": "must be a JSON object"}]
    if isinstance(body, dict):
        problems += _unknown(body, ("reason",))
        try:
            check_pause_reason(reason)
        except ValidationError as exc:
            problems += exc.errors
    if problems:
        raise invalid(problems)
    rt = request.app.state.runtime
    try:
        await _blocking(audit.pause, rt, who=_who(principal), via="api", reason=reason)
    except ValidationError as exc:
        raise invalid(exc.errors) from None
    return JSONResponse({"operator_paused": (await _blocking(_system, rt))["operator_paused"]})


@router.post("/resume", response_model=ResumeOutcome, responses=_errors(403), operation_id="resume")
async def resume(request: Request, principal: Principal = Depends(operator)) -> JSONResponse:
    """Lift an operator's pause (the provider's pause, 401/402 or the breaker, lifts by itself)."""
    rt = request.app.state.runtime
    resumed = await _blocking(audit.resume, rt, who=_who(principal), via="api")
    return JSONResponse({"resumed": bool(resumed), "operator_paused": (await _blocking(_system, rt))["operator_paused"]})


@router.get("/system", response_model=SystemOverview, responses=_errors(), operation_id="getSystem")
async def system(request: Request, principal: Principal = Depends(reader)) -> JSONResponse:
    """Gates, pauses (the provider's and an operator's apart), breaker, in-flight, rate use,
    waiting jobs by priority and tenant, dead letters and the job store's memory. A tenant's token
    sees the account's gates and pauses and only its own waiting jobs (no account-wide counts)."""
    return JSONResponse(system_for(await _blocking(_system, request.app.state.runtime), principal.tenant))


@router.get("/tenants", response_model=TenantList, responses=_errors(403), operation_id="listTenants")
async def tenants(request: Request, principal: Principal = Depends(admin)) -> JSONResponse:
    """The tenants KIE_TENANTS_FILE declares, with the settings in force now (the file's, a
    KIE_TENANT_LIMITS cap, an admin's run-time changes; never a token or secret) and each one's
    ``usage``: credits reserved, charged, refunded and open over its budget's window (24 h without
    a budget) and ``budget_left``; an admin token only (403 for a tenant's)."""
    settings = request.app.state.settings
    rt = request.app.state.runtime
    listed = await _blocking(tenant_views_with_usage, rt)
    return JSONResponse({"tenants": list(listed.values()),
                         "strict": bool(settings.tenants_strict and settings.tenants is not None)})


#: A tenant as a path parameter.
TenantPath = Annotated[str, Path(description=f"a tenant: {rule('tenant').removeprefix('must be ')}"),
                       WithJsonSchema({"type": "string", "pattern": schema_pattern("tenant")})]


@router.put("/tenants/{tenant}", response_model=TenantUpdated, responses=_errors(403, 404, 413, 422),
            operation_id="setTenant", openapi_extra=_schema_ref("TenantUpdate"))
async def set_tenant(tenant: TenantPath, request: Request, principal: Principal = Depends(operator)) -> JSONResponse:
    """Change a declared tenant's weight, rate cap or budget at run time (a body such as
    ``{"weight": 3, "rate": "10/10s", "budget": "2000/1d"}``; ``"default"`` goes back to the
    file's value, ``"none"`` lifts a cap or budget). Every worker and beat applies it at its next
    admission, within one tick. Audited. An admin token that may write only (403 otherwise); 404
    for a tenant the file does not declare; 422 lists every bad value."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object such as {\"weight\": 3}"}])
    problems = _unknown(body, ("weight", "rate", "budget"))
    if problems:
        raise invalid(problems)
    rt = request.app.state.runtime
    try:
        changes = await _blocking(audit.set_tenant, rt, tenant, who=_who(principal), via="api",
                                  **{k: body.get(k) for k in ("weight", "rate", "budget")})
    except UnknownTenant:
        raise fail(404, "not_found", f"no tenant {tenant} in KIE_TENANTS_FILE") from None
    except ValidationError as exc:
        raise invalid(exc.errors) from None
    view = (await _blocking(views, rt.redis, rt.keys, rt.settings))[tenant]
    return JSONResponse({"tenant": view, "changes": [{"field": c.field, "old": c.old, "new": c.new} for c in changes]})


@router.get("/audit", response_model=AuditList, responses=_errors(403, 422), operation_id="listAudit")
async def audit_route(request: Request, limit: int = Query(audit.DEFAULT_COUNT, ge=1, le=audit.MAX_COUNT,
                                                           description=f"entries, 1-{audit.MAX_COUNT}"),
                      principal: Principal = Depends(admin)) -> JSONResponse:
    """The newest admin actions (pause, resume, tenant set) first: who (never a token), what, old
    and new. An admin token only (403 for a tenant's)."""
    rt = request.app.state.runtime
    return JSONResponse({"entries": await _blocking(audit.recent, rt.redis, rt.keys, limit)})


def _who(principal: Principal) -> str:
    """The audit identity of a caller: its tenant's name, or "admin" (never the token)."""
    return principal.tenant or "admin"


@router.get("/usage", response_model=Usage, responses=_errors(403, 422), operation_id="getUsage")
async def usage_route(
    request: Request,
    principal: Principal = Depends(reader),
    tenant: Annotated[str | None, Query(description="only this tenant (a tenant's token: its own, the default)")] = None,
    since: Annotated[str, Query(description="the window: 30m, 24h, 7d (a longer one than 35d counts 35d)"),
                     WithJsonSchema({"type": "string",
                                     "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?(ms|s|m|h|d)?$"})] = "24h",
) -> JSONResponse:
    """Credits reserved, charged, refunded and still open by tenant and by operation, of the jobs
    admitted in the window, with each tenant's budget use. A tenant's token sees only its own
    tenant (naming another is 403); an admin token sees every tenant."""
    try:
        seconds = min(parse_duration(since), float(LEDGER_TTL))
    except ValueError as exc:
        raise invalid([{"field": "since", "message": str(exc)}]) from None
    if principal.tenant is not None:
        if tenant is not None and tenant != principal.tenant:
            raise fail(403, "forbidden", f"this token acts for tenant {principal.tenant}; it sees no other tenant's usage")
        tenant = principal.tenant
    return JSONResponse(await _blocking(usage_report, request.app.state.runtime, seconds, tenant))


def _system(rt: Any) -> dict[str, Any]:
    view = overview(rt)
    by_priority = {str(p): {str(t): int(n) for t, n in tenants.items()}
                   for p, tenants in view["waiting_by_priority"].items()}  # type: ignore[attr-defined]
    by_tenant: dict[str, int] = {}
    for tenants in by_priority.values():
        for t, n in tenants.items():
            by_tenant[t] = by_tenant.get(t, 0) + n
    return {**view, "waiting_by_priority": by_priority, "waiting_by_tenant": by_tenant}


def install(app: FastAPI) -> None:
    """Add the /v1 routes, and put the documented body models (parsed by hand, see above) in the
    OpenAPI document's components. FastAPI's own 422 shape (``HTTPValidationError``) is dropped: this
    app answers every invalid request in the API's error shape, documented where a 422 can happen."""
    app.include_router(router)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        _, defs = models_json_schema([(m, "validation") for m in (JobSubmission, BatchSubmission, PauseRequest,
                                                                  TenantUpdate)],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                answer = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in json.dumps(answer):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
