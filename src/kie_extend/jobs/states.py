"""Job states and the moves allowed between them."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """Where a job is: ``queued → submitting → submitted → succeeded | failed``; a queued job can
    also end ``cancelled`` (by an operator, or its ``not_after`` deadline)."""

    QUEUED = "queued"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"

    def __str__(self) -> str:
        return self.value


#: States a job never leaves.
TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: States that hold an in-flight slot.
IN_FLIGHT: frozenset[JobState] = frozenset({JobState.SUBMITTING, JobState.SUBMITTED})

#: Every legal move; ``None`` is "no record yet". The store refuses anything else.
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    # no record -> cancelled: a message that arrives after its deadline or its batch's cancellation.
    None: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    # queued -> cancelled: only a job not yet sent; cancel and submit race in one atomic step.
    JobState.QUEUED: frozenset({JobState.SUBMITTING, JobState.FAILED, JobState.CANCELLED}),
    # submitting -> queued: the request never left (connect error, retryable code).
    JobState.SUBMITTING: frozenset({JobState.QUEUED, JobState.SUBMITTED, JobState.FAILED}),
    # submitted -> queued: opt-in regeneration after a failed generation (KIE_REGENERATE).
    JobState.SUBMITTED: frozenset({JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED}),
    # failed -> queued: an operator's `kie-extend retry`; failed -> submitted: the retry of a job whose
    # follow-up steps failed runs only those steps (jobs/steps.py).
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SUBMITTED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: Result event name per terminal state.
EVENT_FOR: dict[JobState, str] = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}
