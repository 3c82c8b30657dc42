"""Request and response models of the JSON API (``/v1``), for its OpenAPI document.

Request bodies are validated by the same code path as the Python API (``api.enqueue_extend`` /
``enqueue_many`` → ``intake.check_message``), so every field error has the same field name and
message in every language. These models describe the wire shapes; the routes parse bodies
themselves and answer 422 with the API's error shape listing every bad field.

The schemas say what that validation enforces, so a request valid against the OpenAPI document is
accepted (202, or 409 for an id already in use). Rules JSON Schema can state are stated: types,
enums, bounds, lengths, patterns, and the custom-mode rules as ``if``/``then``. The patterns of
``uploadUrl``, ``batch_id`` and the not_after time describe a safe subset of what is accepted (a
public DNS name; printable ASCII; RFC 3339); their descriptions give the full rule. Some limits have
no JSON Schema form and are described only: the JSON size of ``request`` (64 KB) and of
``metadata`` (``KIE_METADATA_MAX_BYTES``), and two rules of ``steps`` (each op at most once; midi
after a stems step).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, RootModel, WithJsonSchema

from kie_extend.jobs.ids import TEXT_SCHEMA_PATTERN, rule, schema_pattern
from kie_extend.jobs.intake import MAX_IDEMPOTENCY_KEY, MAX_REQUEST_BYTES
from kie_extend.jobs.listing import MAX_LIMIT
from kie_extend.jobs.request import _MODEL_ORDER, LENGTH_LIMITS, V6_MODELS

#: Most jobs one ``POST /v1/jobs`` may carry (larger sets: several requests with the same batch_id).
MAX_JOBS_PER_REQUEST = 1000

#: Job ids, tenant names and batch ids: the one id grammar (jobs/ids.py) in JSON Schema's spelling.
JOB_ID_SCHEMA_PATTERN = schema_pattern("job_id")
TENANT_SCHEMA_PATTERN = schema_pattern("tenant")
#: Batch ids as documented: printable ASCII without ``|`` (the API also takes other printable characters).
BATCH_ID_SCHEMA_PATTERN = schema_pattern("batch_id")
#: A ``GET /v1/jobs`` cursor: ``<creation time>~<job id>`` (``listing.encode_cursor``).
CURSOR_SCHEMA_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,9})?~[A-Za-z0-9_.:-]{1,128}$"

_TAIL = r"(/[A-Za-z0-9._~!$&'()*+,;=:@/-]*)?(\?[A-Za-z0-9._~!$&'()*+,;=:@/?-]*)?(#[A-Za-z0-9._~!$&'()*+,;=:@/?-]*)?$"
#: An http(s) URL on a DNS name with a letters-only top-level label (no IP literal, no bare localhost),
#: an optional port and a path, query and fragment of URI characters. Kept short on purpose: API
#: testers generate strings from it.
PUBLIC_URL_PATTERN = r"^https?://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}(:[0-9]{1,4})?" + _TAIL
#: An http(s) URL on any host name or IPv4 address.
ANY_URL_PATTERN = r"^https?://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]{1,4})?" + _TAIL
#: An RFC 3339 time from 1970 to 2999 (``2026-12-01T12:00:00Z``), the not_after form every client can produce.
TIME_PATTERN = (r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                r"(\.[0-9]{1,6})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")

_CUSTOM = "defaultParamFlag=true (custom mode)"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _length_rules() -> list[dict[str, Any]]:
    """``if``/``then`` per group of models sharing custom-mode length limits (``models.LENGTH_LIMITS``)."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for model in _MODEL_ORDER:
        groups.setdefault(LENGTH_LIMITS[model], []).append(model)
    rules = []
    for (prompt, style, title), models in groups.items():
        custom = {"defaultParamFlag": {"const": True}, "model": {"enum": models}}
        rules.append({"if": {"properties": custom, "required": ["defaultParamFlag", "model"]},
                      "then": {"properties": {"style": {"maxLength": style}, "title": {"maxLength": title}}}})
        # prompt is checked unless instrumental=true (then it is unused, sent anyway with a warning).
        rules.append({"if": {"properties": {**custom, "instrumental": {"not": {"const": True}}},
                             "required": ["defaultParamFlag", "model"]},
                      "then": {"properties": {"prompt": {"maxLength": prompt}}}})
    return rules


def extend_request_schema() -> dict[str, Any]:
    """The JSON Schema of KIE's extend request body as ``models.parse_request`` checks it (with
    ``KIE_ALLOW_PRIVATE_URLS`` off). Unknown fields are passed through to KIE unchanged."""
    limits = "; ".join(f"{m}: prompt {p}, style {s}, title {t}" for m, (p, s, t) in LENGTH_LIMITS.items())
    weight = {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}
    text = {"type": "string", "pattern": TEXT_SCHEMA_PATTERN}
    return {
        "title": "ExtendRequest",
        "description": (
            "KIE's Upload And Extend Audio request in KIE's own camelCase field names, checked by kie-extend "
            "before anything is sent (the Python API's rules). Custom mode (defaultParamFlag=true) requires "
            "style, title and continueAt, and prompt (the lyrics) when instrumental=false; its maximum lengths "
            f"in characters depend on the model ({limits}); prompt is not limited when instrumental=true. "
            "An empty style, title or prompt passes with a warning (KIE may treat it as missing and refuse the "
            "job). Default mode (defaultParamFlag=false) refuses personaId (a blank one is ignored). Unknown "
            "fields are sent to KIE unchanged (a snake_case spelling of a known field draws a warning). "
            f"The whole request must be at most {MAX_REQUEST_BYTES // 1024} KB of JSON."),
        "type": "object",
        "required": ["uploadUrl", "defaultParamFlag", "model"],
        "properties": {
            "uploadUrl": {"type": "string", "pattern": PUBLIC_URL_PATTERN, "description": (
                "The source audio: an http or https URL KIE can fetch, with a host that is not local or private "
                "(localhost, loopback, private, link-local or reserved IP addresses are refused unless "
                "KIE_ALLOW_PRIVATE_URLS=true). The pattern shows the portable form: a DNS name, a port below 10000.")},
            "defaultParamFlag": {"type": "boolean", "description": "true: custom mode (style, title, continueAt "
                                 "and usually prompt required); false: default mode (KIE picks the parameters)"},
            "model": {"type": "string", "enum": list(_MODEL_ORDER), "description": (
                f"Suno model; {', '.join(sorted(V6_MODELS))} are documented only on KIE's createTask route and "
                "are accepted with a warning")},
            "instrumental": _nullable({"type": "boolean", "description": "absent: sent as false"}),
            "continueAt": _nullable({"type": "number", "exclusiveMinimum": 0, "description": (
                "seconds into the source audio to continue from: above 0 (below 1 s draws a warning) and below "
                "the source's duration when it is known; required in custom mode")}),
            "callBackUrl": _nullable({"type": "string", "pattern": ANY_URL_PATTERN,
                                      "description": "http(s) URL with a host (private hosts allowed); absent: "
                                                     "filled from KIE_CALLBACK_BASE_URL"}),
            "prompt": _nullable({**text, "description": "lyrics (custom mode, instrumental=false) or the idea "
                                                        "(default mode)"}),
            "style": _nullable(text),
            "title": _nullable(text),
            "negativeTags": _nullable(text),
            "vocalGender": _nullable({"type": "string", "enum": ["m", "f", ""]}),
            "styleWeight": _nullable(weight),
            "weirdnessConstraint": _nullable(weight),
            "audioWeight": _nullable(weight),
            "personaId": _nullable({**text, "description": "custom mode only (blank is ignored in default mode)"}),
            "personaModel": _nullable(text),
        },
        "additionalProperties": True,
        "allOf": [
            {"if": {"properties": {"defaultParamFlag": {"const": True}}, "required": ["defaultParamFlag"]},
             "then": {"required": ["style", "title", "continueAt"],
                      "properties": {"style": text, "title": text, "continueAt": {"type": "number"}}},
             "else": {"properties": {"personaId": _nullable({"type": "string", "pattern": r"^\s*$"})}}},
            {"if": {"properties": {"defaultParamFlag": {"const": True}, "instrumental": {"const": False}},
                    "required": ["defaultParamFlag", "instrumental"]},
             "then": {"required": ["prompt"], "properties": {"prompt": text}}},
            *_length_rules(),
        ],
    }


class ExtendRequest(RootModel[dict[str, Any]]):
    """KIE's request body; its JSON Schema is :func:`extend_request_schema` (validation is ``jobs/request.py``'s)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return extend_request_schema()


_NOT_AFTER_DOC = ("A job not yet sent to KIE by then ends cancelled (reason deadline): an ISO-8601 time (UTC when it "
                  "has no offset, e.g. 2026-12-01T12:00:00Z; the pattern shows RFC 3339, other ISO-8601 forms such "
                  "as 2026-12-01 are accepted too), or epoch seconds as a number or a string of digits. A time already "
                  "past is refused (422): such a job could never run.")
NotAfter = Annotated[str | float | None, WithJsonSchema({"anyOf": [
    {"type": "string", "pattern": TIME_PATTERN},
    {"type": "string", "pattern": r"^[0-9]{1,10}(\.[0-9]{1,6})?$"},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e11},
    {"type": "null"}]})]
Tenant = Annotated[str | None, WithJsonSchema(_nullable({"type": "string", "pattern": TENANT_SCHEMA_PATTERN}))]
BatchId = Annotated[str | None, WithJsonSchema(_nullable({"type": "string", "pattern": BATCH_ID_SCHEMA_PATTERN}))]
Priority = Annotated[int | None, WithJsonSchema(_nullable({"type": "integer", "minimum": 0, "maximum": 9}))]

_TENANT_DOC = f"Fairness key (default KIE_DEFAULT_TENANT): {rule('tenant').removeprefix('must be ')}."
_BATCH_DOC = f"Groups jobs (GET /v1/batches/{{id}}): {rule('batch_id').removeprefix('must be ')}."
_PRIORITY_DOC = "0-9, default 5; higher is admitted first."


class Step(BaseModel):
    """One follow-up step run on the finished extension's takes (README "Follow-up steps").

    ``type`` is required for stems and absent (or null) for every other op; ``author`` and
    ``domainName`` are for video only. Two rules span the list and have no JSON Schema form: each op
    at most once, and a midi step needs a stems step before it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"if": {"properties": {"op": {"const": "stems"}}},
         "then": {"required": ["type"], "properties": {"type": {"enum": ["separate_vocal", "split_stem"]}}},
         "else": {"properties": {"type": {"type": "null"}}}},
        {"if": {"properties": {"op": {"const": "video"}}},
         "else": {"properties": {"author": {"type": "null"}, "domainName": {"type": "null"}}}},
    ]})

    op: Literal["wav", "stems", "midi", "video", "lyrics"] = Field(description=(
        "wav: a WAV master; stems: vocals and instrumental apart (separate_vocal) or every stem (split_stem); "
        "midi: MIDI from the separation (needs a stems step before it); video: an MP4 music video; "
        "lyrics: timestamped lyrics"))
    type: Literal["separate_vocal", "split_stem"] | None = Field(None, description="stems only, and required there")
    author: str | None = Field(None, max_length=50, description="video only: shown on the video")
    domainName: str | None = Field(None, max_length=50, description="video only: shown on the video")


_STEPS_DOC = ("Follow-up steps run on the finished extension's takes, each op at most once; the job ends when "
              "every step did (failed with error.kind step_failed when one failed).")
_TAKES_DOC = 'Which takes the steps run on: "all" (default) or "first".'


class JobSubmission(BaseModel):
    """One extend job: the KIE request and the extend task's optional kwargs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "request": {"uploadUrl": "https://files.example.org/song.mp3", "defaultParamFlag": True,
                    "instrumental": False, "continueAt": 42.5, "model": "V4_5", "prompt": "[Verse] ...",
                    "style": "indie folk", "title": "Song (Extended)"},
        "idempotency_key": "order-1234", "metadata": {"order": 1234}, "tenant": "shop", "priority": 7}]})

    request: ExtendRequest
    idempotency_key: str | None = Field(None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY,
                                        pattern=TEXT_SCHEMA_PATTERN, description=(
        "A second job with a key already used (24 h window) is not submitted again; its status names the first job. "
        "Free text (no control characters)."))
    metadata: dict[str, Any] | None = Field(None, description="Opaque, at most KIE_METADATA_MAX_BYTES (16 KB by "
                                                              "default) of JSON, handed to every result handler "
                                                              "unchanged.")
    tenant: Tenant = Field(None, description=_TENANT_DOC)
    priority: Priority = Field(None, description=_PRIORITY_DOC)
    batch_id: BatchId = Field(None, description=_BATCH_DOC)
    not_after: NotAfter = Field(None, description=_NOT_AFTER_DOC)
    steps: list[Step] | None = Field(None, min_length=1, max_length=5, description=_STEPS_DOC)
    takes: Literal["all", "first"] | None = Field(None, description=_TAKES_DOC)
    job_id: str | None = Field(None, max_length=128, pattern=JOB_ID_SCHEMA_PATTERN, description=(
        f"Names the job (default: a new UUID4): {rule('job_id').removeprefix('must be ')}. "
        "An id already used answers 409."))


class BatchSubmission(BaseModel):
    """Several jobs validated together: all are enqueued or, on any bad field, none. ``tenant``,
    ``priority``, ``batch_id``, ``not_after``, ``steps`` and ``takes`` here apply to every job that lacks its own."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobSubmission] = Field(min_length=1, max_length=MAX_JOBS_PER_REQUEST)
    tenant: Tenant = Field(None, description=_TENANT_DOC)
    priority: Priority = Field(None, description=_PRIORITY_DOC)
    batch_id: BatchId = Field(None, description=_BATCH_DOC)
    not_after: NotAfter = Field(None, description=_NOT_AFTER_DOC)
    steps: list[Step] | None = Field(None, min_length=1, max_length=5, description=_STEPS_DOC)
    takes: Literal["all", "first"] | None = Field(None, description=_TAKES_DOC)


class JobAccepted(BaseModel):
    """202 for one job."""

    job_id: str


class JobsAccepted(BaseModel):
    """202 for ``{"jobs": [...]}``: the ids in the order given."""

    job_ids: list[str]


class FieldError(BaseModel):
    """One bad field: ``field`` is the Python API's name: a KIE request field by its own name
    (``continueAt``), an option by its name (``priority``); ``[2].`` prefixed in a ``{"jobs": [...]}`` list."""

    field: str
    message: str


class ErrorDetail(BaseModel):
    """What went wrong; ``kind`` is a stable machine-readable word."""

    kind: str = Field(description="invalid_request, unauthorized, forbidden, not_found, conflict, ...")
    message: str
    errors: list[FieldError] | None = None
    job_ids: list[str] | None = Field(None, description=(
        "kind conflict (an idempotency key reused with a different request): the refused jobs, "
        "recorded as failed with their own events"))


class ErrorBody(BaseModel):
    """The API's error shape."""

    error: ErrorDetail


class Track(BaseModel):
    """One generated track."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    audio_url: str | None = None
    stream_audio_url: str | None = None
    image_url: str | None = None
    title: str | None = None
    tags: str | None = None
    duration: float | None = Field(None, description="seconds")
    model_name: str | None = None
    prompt: str | None = None


class Credits(BaseModel):
    """A job's KIE credits (numbers of credits)."""

    reserved: float = 0
    charged: float = 0
    refunded: float = 0


class JobRecord(BaseModel):
    """A job's status record; times are ISO-8601 UTC."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    state: Literal["queued", "submitting", "submitted", "succeeded", "failed", "cancelled", "not_found",
                   "pending"] = Field(description="pending: declared in a batch, not yet recorded by a worker")
    kie_task_id: str | None = None
    kie_status: str | None = None
    attempts: int = 0
    polls: int = 0
    created_at: str | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    error: dict[str, Any] | None = Field(None, description='{"kind", "message", ...}; kind as listed under Job states in the README')
    tracks: list[Track] = []
    handlers: dict[str, dict[str, Any]] = {}
    duplicate_of: str | None = None
    metadata: dict[str, Any] = {}
    tenant: str | None = None
    priority: int | None = None
    batch_id: str | None = None
    not_after: str | None = None
    credits: Credits = Field(default_factory=lambda: Credits(),
                             description="KIE credits: reserved at admission, charged or refunded when it ended")
    waiting_for: Literal["budget"] | None = Field(
        None, description='a queued job held back: "budget" while its tenant\'s budget is used up')
    stored: dict[str, Any] | None = Field(None, description=(
        'Where the store handler kept its outputs: {"manifest": URI, "objects": [URI, ...]}'))
    steps: list[dict[str, Any]] | None = Field(None, description=(
        'A job with follow-up steps: one {"op", "take", "state", "kie_task_id", "result", "error"} per step and '
        "take; state planned (before the extension finished), waiting, queued, submitting, submitted, "
        "succeeded or failed"))


class JobPage(BaseModel):
    """One page of jobs, newest first; follow ``next_cursor`` (None on the last page). A page may
    hold fewer than ``limit`` jobs while ``next_cursor`` is set when filters skip many."""

    jobs: list[JobRecord]
    next_cursor: str | None


class CancelOutcome(BaseModel):
    """A job cancelled before it was sent to KIE."""

    job_id: str
    outcome: Literal["cancelled"]


class RetryOutcome(BaseModel):
    """A failed job put back in the queue (it will be sent to KIE again and may cost credits)."""

    job_id: str
    outcome: Literal["queued"]


class Batch(BaseModel):
    """A batch's progress."""

    model_config = ConfigDict(extra="allow")

    batch_id: str
    total: int
    counts: dict[str, int] = Field(description="state -> jobs; 'pending' = declared, not yet recorded")
    finished: bool
    cancelled: bool = False
    created_at: str | None = None
    finished_at: str | None = None


class BatchList(BaseModel):
    """The newest batches, newest first."""

    batches: list[Batch]


class BatchCancelled(BaseModel):
    """How many of the batch's jobs not yet sent were cancelled (jobs arriving later are cancelled too)."""

    batch_id: str
    cancelled: int


from kie_extend.admission.gates import MAX_PAUSE_REASON  # noqa: E402 - the domain's limit, stated in the schema


class PauseRequest(BaseModel):
    """An operator's pause."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=MAX_PAUSE_REASON, pattern=TEXT_SCHEMA_PATTERN)


class PauseState(BaseModel):
    """The operator's pause after the call (None = not paused)."""

    operator_paused: dict[str, Any] | None


class ResumeOutcome(BaseModel):
    """``resumed`` is False when there was no operator pause (the provider's pause lifts by itself)."""

    resumed: bool
    operator_paused: dict[str, Any] | None


class InfraPart(BaseModel):
    """Whether one part (the job store, the broker) answers us, and if not, why (no password)."""

    up: bool
    reason: Literal["ok", "refused_credentials", "unreachable", "timeout", "not_ready", "error"] = Field(
        description="ok, or why not: refused_credentials (wrong user or password, NOAUTH, ACCESS_REFUSED), "
                    "unreachable, timeout, not_ready (loading, read-only, no such sentinel master), error")
    detail: str = Field(description="what happened, in words")
    setting: Literal["KIE_REDIS_URL", "KIE_BROKER_URL"] = Field(description="the variable to check")
    url: str = Field(description="the server's URL, password masked")


class Infrastructure(BaseModel):
    """The job store and the broker (the same server when KIE_BROKER_URL is unset)."""

    job_store: InfraPart
    broker: InfraPart


class SystemOverview(BaseModel):
    """Gates, pauses, breaker, in-flight, rate use, waiting work and the job store's memory."""

    model_config = ConfigDict(extra="allow")

    jobs: dict[str, int] | None = Field(None, description="state -> jobs (account-wide: absent for a tenant's token)")
    in_flight: int
    max_in_flight: int
    rate_window_use: int = Field(description="submissions in the current rate window")
    rate_limit: str = Field(description='e.g. "20/10s"')
    paused: dict[str, Any] | None = Field(description="KIE's account pause (401/402/433): code, reason, since; "
                                          "see submission for every reason submission can be paused")
    operator_paused: dict[str, Any] | None = Field(description="an operator's pause: reason, since")
    due: int | None = Field(None, description="jobs due for a step (account-wide: absent for a tenant's token)")
    waiting: int = Field(description="jobs waiting for a submission slot (a tenant's token: its own)")
    waiting_by_priority: dict[str, dict[str, int]] = Field(description="priority -> tenant -> jobs waiting (a "
                                                           "tenant's token: its own tenant only)")
    waiting_by_tenant: dict[str, int] = Field(description="tenant -> jobs waiting, all priorities")
    dead_letters: int | None = Field(None, description="account-wide: absent for a tenant's token")
    breaker: dict[str, Any]
    provider: dict[str, Any] = Field(description="whether KIE can be reached: reachable (bool), state, since, "
                                     "last_error, next_probe, next_probe_in (seconds), streak, threshold, outages")
    infrastructure: Infrastructure = Field(description="whether the job store and the broker answer us, and why not")
    redis_memory: dict[str, Any] | None = Field(None, description="used and max bytes, policy, evicted_keys "
                                                "(absent for a tenant's token)")
    submission: dict[str, Any] = Field(description='whether jobs are sent to KIE now: {"paused": bool, "reasons": '
                                       '[{"reason": "operator"|"account"|"breaker"|"unreachable", "since", '
                                       '"detail"}, ...]}; the same answer as kie-extend status and /metrics')


class TenantInfo(BaseModel):
    """One tenant of KIE_TENANTS_FILE as an admin sees it: its settings, never a token or secret."""

    name: str
    weight: int = Field(description="share of slots among tenants of one priority")
    rate: str | None = Field(description='its cap on top of the account\'s rate, e.g. "5/10s"')
    budget: str | None = Field(description='credits per rolling window, e.g. "2000/1d"')
    webhook_url: str | None
    webhook_secret_set: bool = Field(description="whether a webhook secret is configured (never the secret)")
    stream: bool
    overridden: list[Literal["weight", "rate", "budget"]] = Field(
        description="the settings an admin set at run time (PUT /v1/tenants/{tenant}), in force over the file's")
    usage: TenantWindowUsage | None = Field(
        None, description="its credits over its budget's window (24 h without a budget); GET /v1/tenants only")


class UsageRow(BaseModel):
    """Credits of one tenant (or one of its operations), in KIE credits."""

    reserved: float = Field(description="reserved when its jobs were admitted")
    charged: float = Field(description="charged when they ended (the provider's creditsConsumed where reported)")
    refunded: float = Field(description="reservations given back: refunded failures, jobs never accepted")
    open: float = Field(description="still reserved: jobs admitted, not ended yet")


class TenantWindowUsage(UsageRow):
    """A tenant's credits over one window, in KIE credits: its budget's window, or 24 hours without one."""

    window: float = Field(description="seconds: the budget's window, 86400 without a budget")
    budget_left: float | None = Field(description="the budget minus charged plus still reserved credits in the "
                                                  "window (whole hours, as admission counts); null: no budget")


class BudgetUse(BaseModel):
    """A tenant's budget and how much of it its rolling window holds."""

    credits: float
    window: float = Field(description="seconds")
    used: float = Field(description="charged plus still reserved in the window (whole hours)")
    ratio: float = Field(description="used / credits")


class TenantUsage(UsageRow):
    """One tenant's credits over the window, by operation."""

    operations: dict[str, UsageRow] = Field(description="operation (extend, wav, stems, ...) -> credits")
    budget: BudgetUse | None = None


class Usage(BaseModel):
    """Credits by tenant and operation of the jobs admitted in the window (whole 5-minute buckets)."""

    since: str
    until: str
    seconds: float
    tenants: dict[str, TenantUsage]
    total: UsageRow


class TenantList(BaseModel):
    """The declared tenants with the settings in force now (the file's, KIE_TENANT_LIMITS', an
    admin's run-time changes), empty without KIE_TENANTS_FILE, and whether KIE_TENANTS_STRICT is on."""

    tenants: list[TenantInfo]
    strict: bool


class TenantUpdate(BaseModel):
    """Run-time settings of one tenant; name at least one. ``"default"`` removes the run-time value
    (back to the file's, or KIE_TENANT_LIMITS'); ``"none"`` means no rate cap or no budget."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"weight": 3, "rate": "10/10s"}]})

    weight: int | Literal["default"] | None = Field(None, description="share of slots, 1-1000")
    rate: str | None = Field(None, description='a cap such as "5/10s", "none" or "default"')
    budget: str | None = Field(None, description='credits per rolling window such as "2000/1d", "none" or "default"')


class TenantChange(BaseModel):
    """One setting changed: its value in force before and after."""

    field: Literal["weight", "rate", "budget"]
    old: int | str | None
    new: int | str | None


class TenantUpdated(BaseModel):
    """The tenant's settings in force after the change, and what changed (empty: nothing did)."""

    tenant: TenantInfo
    changes: list[TenantChange]


class AuditEntry(BaseModel):
    """One admin action. ``who`` is "admin" (a token of the API or the dashboard), "cli:<os user>" or
    "python:<os user>" (the Python API), never a token."""

    id: str = Field(description="the entry's id in the audit stream")
    ts: str = Field(description="when, ISO-8601 UTC")
    who: str
    via: Literal["api", "dashboard", "cli", "python"]
    action: Literal["pause", "resume", "tenant.set"]
    target: str | None = Field(description="the tenant, for tenant.set")
    old: Any = Field(description="the state before: the pause, or the changed settings' old values")
    new: Any = Field(description="the state after")


class AuditList(BaseModel):
    """The newest admin actions first."""

    entries: list[AuditEntry]


__all__ = ["Usage", "TenantUsage", "UsageRow", "BudgetUse", "Credits", "TenantInfo", "TenantList", "TenantUpdate", "TenantChange", "TenantUpdated", "AuditEntry", "AuditList",
           "JobSubmission", "BatchSubmission", "JobAccepted", "JobsAccepted", "ErrorBody", "JobRecord",
           "JobPage", "CancelOutcome", "RetryOutcome", "Batch", "BatchList", "BatchCancelled", "PauseRequest",
           "PauseState", "ResumeOutcome", "SystemOverview", "Infrastructure", "InfraPart", "MAX_JOBS_PER_REQUEST", "MAX_LIMIT", "MAX_PAUSE_REASON",
           "extend_request_schema", "JOB_ID_SCHEMA_PATTERN", "BATCH_ID_SCHEMA_PATTERN", "CURSOR_SCHEMA_PATTERN"]


class TenantQuote(BaseModel):
    """One tenant's part of a quote."""

    jobs: int
    credits: float
    eta_seconds: int | None
    budget_left: float | None
    fits: bool


class Quote(BaseModel):
    """What a submission would cost and when it would be done; nothing is enqueued. ``credits``: the
    ``KIE_PRICES`` estimate (``extend`` per job); ``eta_seconds``: when the last job would be submitted
    (from the work waiting ahead, the tenant's weight and rate cap, ``KIE_SUBMIT_RATE``) plus
    ``generation_seconds``, null when a tenant can get no rate; ``balance``: KIE's balance (the latest
    snapshot, else a live call; null with ``balance_reason``); ``budget_left``: the tenant's budget
    minus its charged and reserved credits in the window (null: no budget, or several tenants: see
    ``tenants``); ``fits``: credits ≤ budget_left (with a budget) and ≤ balance (when known)."""

    jobs: int
    credits: float
    eta_seconds: int | None
    balance: float | None
    balance_source: Literal["snapshot", "live"] | None
    balance_reason: str | None
    budget_left: float | None
    fits: bool
    generation_seconds: float
    tenants: dict[str, TenantQuote]
