"""Result events (README "Result events and handlers") and the public status record, built from a job record."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from kie_extend.jobs.states import EVENT_FOR, JobState

#: The keys of a track in events and status records.
TRACK_KEYS = ("id", "audio_url", "stream_audio_url", "image_url", "title", "tags", "duration", "model_name", "prompt")


def now_iso() -> str:
    """The current time, ISO-8601 UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(raw: dict[str, str], field: str, default: Any) -> Any:
    value = raw.get(field)
    if value in (None, ""):
        return default
    try:
        return json.loads(value)
    except ValueError:
        return default


def public_tracks(tracks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tracks trimmed to the contract's keys."""
    return [{k: t.get(k) for k in TRACK_KEYS} for t in tracks]


def build_event(raw: dict[str, str], state: JobState, fields: dict[str, Any]) -> dict[str, Any]:
    """The one result event of a job reaching ``state``; ``fields`` are the values being written."""
    merged = dict(raw)
    for key, value in fields.items():
        merged[key] = value if isinstance(value, str) else json.dumps(value) if value is not None else ""
    return {
        "event": EVENT_FOR[state],
        "job_id": merged.get("job_id", ""),
        "kie_task_id": merged.get("kie_task_id") or None,
        "kie_status": merged.get("kie_status") or None,
        "tracks": public_tracks(_json(merged, "tracks", [])),
        "error": _json(merged, "error", None),
        "request": _json(merged, "request", {}),
        "metadata": _json(merged, "metadata", {}),
        "created_at": merged.get("created_at") or None,
        "submitted_at": merged.get("submitted_at") or None,
        "finished_at": merged.get("finished_at") or None,
        **_sharing(merged),
    }


def _sharing(raw: dict[str, str]) -> dict[str, Any]:
    """The sharing options (README "Sharing one account") as stored on a record: tenant, priority, batch_id, not_after (ISO)."""
    not_after = raw.get("not_after")
    when = None
    if not_after:
        try:
            when = datetime.fromtimestamp(float(not_after), timezone.utc).isoformat(
                timespec="seconds").replace("+00:00", "Z")
        except ValueError:
            when = None
    try:
        priority = int(raw.get("priority") or 5)
    except ValueError:
        priority = 5
    return {"tenant": raw.get("tenant") or None, "priority": priority, "batch_id": raw.get("batch_id") or None,
            "not_after": when}


def status_record(raw: dict[str, str], job_id: str) -> dict[str, Any]:
    """The public status record (``kie-extend status --json``) from a raw job record."""
    handlers = {
        key.split(":", 1)[1]: _json(raw, key, {})
        for key in sorted(raw)
        if key.startswith("handler:")
    }
    def _int(name: str) -> int:
        try:
            return int(raw.get(name) or 0)
        except ValueError:
            return 0
    return {
        "job_id": job_id,
        "state": raw.get("state", JobState.QUEUED.value),
        "kie_task_id": raw.get("kie_task_id") or None,
        "kie_status": raw.get("kie_status") or None,
        "attempts": _int("attempts"),
        "polls": _int("polls"),
        "created_at": raw.get("created_at") or None,
        "submitted_at": raw.get("submitted_at") or None,
        "finished_at": raw.get("finished_at") or None,
        "error": _json(raw, "error", None),
        "tracks": public_tracks(_json(raw, "tracks", [])),
        "handlers": handlers,
        "duplicate_of": raw.get("duplicate_of") or None,
        "metadata": _json(raw, "metadata", {}),
        **_sharing(raw),
    }
