"""An operator's retry or cancel of one job, and the one sentence that says what happened.

The HTTP API, the CLI and the dashboard call these, so each gives the same exact reason for a
refusal: an unknown job, a job in the wrong state, a failed job whose request is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kie_extend.jobs.pipeline import Pipeline
from kie_extend.jobs.states import JobState

Outcome = Literal["queued", "cancelled", "not_found", "not_retryable", "too_late", "finished"]


@dataclass(frozen=True)
class ActionResult:
    """What a retry or cancel did: ``outcome`` (a short code, the HTTP API's ``kind`` or
    ``outcome``) and ``message`` (one sentence naming the job and the reason)."""

    job_id: str
    outcome: Outcome
    message: str

    @property
    def ok(self) -> bool:
        """Whether the job was requeued or cancelled."""
        return self.outcome in ("queued", "cancelled")


def not_found(job_id: str) -> str:
    """The sentence for an unknown job id."""
    return f"no job {job_id} (unknown id, or its record expired after KIE_RETENTION)"


def retry_job(pipeline: Pipeline, job_id: str) -> ActionResult:
    """Send a failed job to KIE again (it may cost credits again), or say exactly why not. A job
    whose follow-up steps failed (``step_failed``) runs only those steps again."""
    before = pipeline.store.get_record(job_id)
    if pipeline.retry(job_id):
        if before is not None and before.error_kind == "step_failed":
            return ActionResult(job_id, "queued", f"job {job_id}: its failed follow-up steps run again; the "
                                                  "extension and the finished steps are kept (each step run again "
                                                  "may cost credits)")
        return ActionResult(job_id, "queued", f"job {job_id} requeued; it will be submitted again "
                                              "(this may cost credits again)")
    rec = pipeline.store.get_record(job_id)
    state = rec.state_text if rec is not None else None
    if rec is None or not state:
        return ActionResult(job_id, "not_found", not_found(job_id))
    if rec.state is JobState.FAILED:
        if rec.invalid_fields:
            fields = ", ".join(str(e.get("field") if isinstance(e, dict) else e) for e in rec.invalid_fields)
            return ActionResult(job_id, "not_retryable",
                                f"job {job_id} failed on invalid fields ({fields}); sending it again would fail "
                                "the same way: fix the request and enqueue a new job")
        return ActionResult(job_id, "not_retryable", f"job {job_id} changed state while it was being requeued; "
                                                     "look at it again and retry")
    return ActionResult(job_id, "not_retryable", f"job {job_id} is {state}; only a failed job can be retried")


def cancel_job(pipeline: Pipeline, job_id: str) -> ActionResult:
    """Cancel a job not yet sent to KIE, or say exactly why not (sent, finished, unknown)."""
    outcome = pipeline.cancel(job_id)
    if outcome == "cancelled":
        return ActionResult(job_id, "cancelled", f"job {job_id} cancelled")
    if outcome == "not_found":
        return ActionResult(job_id, "not_found", not_found(job_id))
    rec = pipeline.store.get_record(job_id)
    state = rec.state_text if rec is not None and rec.state_text is not None else "unknown"
    if outcome == "too_late":
        return ActionResult(job_id, "too_late", f"job {job_id} was already sent to KIE (state {state}); KIE has "
                                                "no cancel call, so it keeps going")
    return ActionResult(job_id, "finished", f"job {job_id} already ended ({state}); nothing to cancel")
