"""Result events (README "Result events and handlers") and the public status record, built from a job record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kie_extend.jobs.states import EVENT_FOR, JobState
from kie_extend.credits.ledger import job_credits
from kie_extend.jobs.steps import view as steps_view
from kie_extend.store.record import EMPTY, JobRecord, as_record, iso_s

#: The keys of a track in events and status records.
TRACK_KEYS = ("id", "audio_url", "stream_audio_url", "image_url", "title", "tags", "duration", "model_name", "prompt")


def public_tracks(tracks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tracks trimmed to the contract's keys."""
    return [{k: t.get(k) for k in TRACK_KEYS} for t in tracks]


def build_event(raw: JobRecord | Mapping[str, str], state: JobState, fields: dict[str, Any]) -> dict[str, Any]:
    """The one result event of a job reaching ``state``; ``raw`` is the job's record (a JobRecord,
    or its raw hash) and ``fields`` the values being written with the move."""
    rec = as_record(raw) or EMPTY
    merged = rec.with_fields(fields) if fields else rec
    return {
        "event": EVENT_FOR[state],
        "job_id": merged.raw.get("job_id", ""),
        "kie_task_id": merged.kie_task_id,
        "kie_status": merged.kie_status,
        "tracks": public_tracks(list(merged.tracks)),
        "error": merged.error,
        "request": merged.request_value,
        "metadata": merged.metadata,
        "created_at": merged.created_at,
        "submitted_at": merged.submitted_at,
        "finished_at": merged.finished_at,
        **sharing(merged),
        **_steps(merged),
    }


def _steps(rec: JobRecord) -> dict[str, Any]:
    """``{"steps": [...]}`` for a job with follow-up steps (jobs/steps.py), else nothing."""
    steps = steps_view(rec.raw)
    return {} if steps is None else {"steps": steps}


def sharing(rec: JobRecord) -> dict[str, Any]:
    """The sharing options (README "Sharing one account") as stored on a record: tenant, priority, batch_id, not_after (ISO)."""
    when = None
    if rec.not_after is not None:
        try:
            when = iso_s(rec.not_after)
        except (ValueError, OverflowError, OSError):
            when = None
    return {"tenant": rec.tenant, "priority": rec.priority, "batch_id": rec.batch_id, "not_after": when}


def status_record(raw: JobRecord | Mapping[str, str], job_id: str) -> dict[str, Any]:
    """The public status record (``kie-extend status --json``) from a job's record (a JobRecord,
    or its raw hash)."""
    rec = as_record(raw) or EMPTY
    return {
        "job_id": job_id,
        "state": rec.state_text if rec.state_text is not None else JobState.QUEUED.value,
        "kie_task_id": rec.kie_task_id,
        "kie_status": rec.kie_status,
        "attempts": rec.attempts,
        "polls": rec.polls,
        "created_at": rec.created_at,
        "submitted_at": rec.submitted_at,
        "finished_at": rec.finished_at,
        "error": rec.error,
        "tracks": public_tracks(list(rec.tracks)),
        "handlers": dict(rec.handlers),
        "duplicate_of": rec.duplicate_of,
        "metadata": rec.metadata,
        **sharing(rec),
        "credits": job_credits(rec.raw),
        "waiting_for": None,
        **_steps(rec),
        **({"stored": rec.raw_json("stored")} if rec.raw.get("stored") else {}),
    }
