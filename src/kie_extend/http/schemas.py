"""Request and response models of the JSON API (``/v1``), for its OpenAPI document.

Request bodies are validated by the same code path as the Python API (``api.enqueue_extend`` /
``enqueue_many`` → ``intake.check_message``), so every field error has the same field name and
message in every language. These models describe the wire shapes; the routes parse bodies
themselves and answer 422 with DESIGN §12's error shape listing every bad field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..listing import MAX_LIMIT

#: Most jobs one ``POST /v1/jobs`` may carry (larger sets: several requests with the same batch_id).
MAX_JOBS_PER_REQUEST = 1000

_REQUEST_DOC = (
    "The KIE request body in KIE's own camelCase field names: uploadUrl, defaultParamFlag, "
    "instrumental, continueAt, model, prompt, style, title, negativeTags, vocalGender, styleWeight, "
    "weirdnessConstraint, audioWeight, personaId, callBackUrl (optional: filled from "
    "KIE_CALLBACK_BASE_URL). Validated by kie-extend's own rules (the Python API's), not by this schema.")


class JobSubmission(BaseModel):
    """One extend job: the KIE request and DESIGN §4/§11's optional kwargs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "request": {"uploadUrl": "https://files.example.org/song.mp3", "defaultParamFlag": True,
                    "instrumental": False, "continueAt": 42.5, "model": "V4_5", "prompt": "[Verse] ...",
                    "style": "indie folk", "title": "Song (Extended)"},
        "idempotency_key": "order-1234", "metadata": {"order": 1234}, "tenant": "shop", "priority": 7}]})

    request: dict[str, Any] = Field(description=_REQUEST_DOC)
    idempotency_key: str | None = Field(None, max_length=256, description=(
        "A second job with a key already used (24 h window) is not submitted again; its status names the first job."))
    metadata: dict[str, Any] | None = Field(None, description="Opaque, at most 16 KB of JSON, handed to every result "
                                                              "handler unchanged.")
    tenant: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="Fairness key; default KIE_DEFAULT_TENANT.")
    priority: int | None = Field(None, ge=0, le=9, description="0-9, default 5; higher is admitted first.")
    batch_id: str | None = Field(None, max_length=128, description="Groups jobs (GET /v1/batches/{id}).")
    not_after: str | float | None = Field(None, description=(
        "ISO-8601 UTC time or epoch seconds: a job not yet sent to KIE by then ends cancelled (reason deadline)."))
    job_id: str | None = Field(None, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$", description=(
        "Names the job (default: a new UUID4). An id already used answers 409."))


class BatchSubmission(BaseModel):
    """Several jobs validated together: all are enqueued or, on any bad field, none. ``tenant``,
    ``priority``, ``batch_id`` and ``not_after`` here apply to every job that lacks its own."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobSubmission] = Field(min_length=1, max_length=MAX_JOBS_PER_REQUEST)
    tenant: str | None = None
    priority: int | None = Field(None, ge=0, le=9)
    batch_id: str | None = Field(None, max_length=128)
    not_after: str | float | None = None


class JobAccepted(BaseModel):
    """202 for one job."""

    job_id: str


class JobsAccepted(BaseModel):
    """202 for ``{"jobs": [...]}``: the ids in the order given."""

    job_ids: list[str]


class FieldError(BaseModel):
    """One bad field: ``field`` is the Python API's name (``request.continueAt``, ``[2].priority``)."""

    field: str
    message: str


class ErrorDetail(BaseModel):
    """What went wrong; ``kind`` is a stable machine-readable word."""

    kind: str = Field(description="invalid_request, unauthorized, forbidden, not_found, conflict, ...")
    message: str
    errors: list[FieldError] | None = None


class ErrorBody(BaseModel):
    """DESIGN §12's error shape."""

    error: ErrorDetail


class Track(BaseModel):
    """One generated track (DESIGN §7)."""

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


class JobRecord(BaseModel):
    """A job's status record (DESIGN §5); times are ISO-8601 UTC."""

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
    error: dict[str, Any] | None = Field(None, description='{"kind", "message", ...}; kind as in DESIGN §5')
    tracks: list[Track] = []
    handlers: dict[str, dict[str, Any]] = {}
    duplicate_of: str | None = None
    metadata: dict[str, Any] = {}
    tenant: str | None = None
    priority: int | None = None
    batch_id: str | None = None
    not_after: str | None = None


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
    """A batch's progress (DESIGN §11)."""

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


class PauseRequest(BaseModel):
    """An operator's pause."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


class PauseState(BaseModel):
    """The operator's pause after the call (None = not paused)."""

    operator_paused: dict[str, Any] | None


class ResumeOutcome(BaseModel):
    """``resumed`` is False when there was no operator pause (the provider's pause lifts by itself)."""

    resumed: bool
    operator_paused: dict[str, Any] | None


class SystemOverview(BaseModel):
    """Gates, pauses, breaker, in-flight, rate use, waiting work and the job store's memory."""

    model_config = ConfigDict(extra="allow")

    jobs: dict[str, int] = Field(description="state -> jobs")
    in_flight: int
    max_in_flight: int
    rate_window_use: int = Field(description="submissions in the current rate window")
    rate_limit: str = Field(description='e.g. "20/10s"')
    paused: dict[str, Any] | None = Field(description="the provider's pause (401/402 or breaker): code, reason, since")
    operator_paused: dict[str, Any] | None = Field(description="an operator's pause: reason, since")
    due: int
    waiting: int
    waiting_by_priority: dict[str, dict[str, int]] = Field(description="priority -> tenant -> jobs waiting")
    waiting_by_tenant: dict[str, int] = Field(description="tenant -> jobs waiting, all priorities")
    dead_letters: int
    breaker: dict[str, Any]
    provider: dict[str, Any] = Field(description="whether KIE can be reached: reachable (bool), state, since, "
                                     "last_error, next_probe, next_probe_in (seconds), streak, threshold, outages")
    redis_memory: dict[str, Any] = Field(description="used and max bytes, policy, evicted_keys")


__all__ = ["JobSubmission", "BatchSubmission", "JobAccepted", "JobsAccepted", "ErrorBody", "JobRecord",
           "JobPage", "CancelOutcome", "RetryOutcome", "Batch", "BatchList", "BatchCancelled", "PauseRequest",
           "PauseState", "ResumeOutcome", "SystemOverview", "MAX_JOBS_PER_REQUEST", "MAX_LIMIT"]
