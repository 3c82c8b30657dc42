"""The Python producer API: validate first, then enqueue ``kie_extend.extend`` by name."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable

from celery import Celery

from .config import Settings, load_settings
from .errors import ValidationError
from .events import status_record
from .models import parse_request
from .pipeline import MAX_REQUEST_BYTES
from .runtime import Runtime
from .states import JobState

_apps: dict[str, Celery] = {}
_runtimes: dict[str, Runtime] = {}


def _settings(settings: Settings | None) -> Settings:
    return settings or load_settings()


def producer_app(settings: Settings) -> Celery:
    """A light Celery app for sending (no tasks imported), one per broker URL and queue."""
    key = f"{settings.effective_broker_url}|{settings.queue}"
    if key not in _apps:
        app = Celery("kie_extend_producer", broker=settings.effective_broker_url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"], task_protocol=2,
                        task_default_queue=settings.queue, broker_connection_retry_on_startup=True)
        _apps[key] = app
    return _apps[key]


def _runtime(settings: Settings) -> Runtime:
    key = f"{settings.redis_url}|{settings.key_prefix}"
    if key not in _runtimes:
        _runtimes[key] = Runtime(settings)
    return _runtimes[key]


def check_extend(request: Any, *, idempotency_key: str | None = None, metadata: dict[str, Any] | None = None,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Validate one extend request and its options; raise ValidationError listing every problem."""
    settings = _settings(settings)
    problems: list[dict[str, str]] = []
    body: dict[str, Any] = {}
    try:
        size = len(json.dumps(request))
    except (TypeError, ValueError):
        raise ValidationError([{"field": "request", "message": "must be JSON-serialisable"}]) from None
    if size > MAX_REQUEST_BYTES:
        problems.append({"field": "request", "message": f"is {size} bytes of JSON; at most {MAX_REQUEST_BYTES}"})
    else:
        try:
            body = parse_request(request, allow_private_urls=settings.allow_private_urls).body
        except ValidationError as exc:
            problems += exc.errors
    if metadata is not None:
        if not isinstance(metadata, dict):
            problems.append({"field": "metadata", "message": "must be a JSON object"})
        else:
            try:
                size = len(json.dumps(metadata))
            except (TypeError, ValueError):
                problems.append({"field": "metadata", "message": "must be JSON-serialisable"})
            else:
                if size > settings.metadata_max_bytes:
                    problems.append({"field": "metadata", "message": f"larger than {settings.metadata_max_bytes} bytes"})
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 256):
        problems.append({"field": "idempotency_key", "message": "must be a string of 1-256 characters"})
    if problems:
        raise ValidationError(problems)
    return body


def enqueue_extend(request: dict[str, Any], *, idempotency_key: str | None = None,
                   metadata: dict[str, Any] | None = None, settings: Settings | None = None,
                   job_id: str | None = None) -> str:
    """Validate and enqueue one extend request; returns the job id. Nothing is sent when invalid."""
    settings = _settings(settings)
    check_extend(request, idempotency_key=idempotency_key, metadata=metadata, settings=settings)
    job_id = job_id or str(uuid.uuid4())
    kwargs: dict[str, Any] = {"request": request}
    if idempotency_key is not None:
        kwargs["idempotency_key"] = idempotency_key
    if metadata is not None:
        kwargs["metadata"] = metadata
    producer_app(settings).send_task("kie_extend.extend", kwargs=kwargs, task_id=job_id, queue=settings.queue)
    return job_id


def enqueue_many(items: Iterable[dict[str, Any]], *, settings: Settings | None = None) -> list[str]:
    """Validate every item first, then enqueue them all on one connection; returns job ids in order.

    Each item is ``{"request": {...}, "idempotency_key": ..., "metadata": ...}``. If any item is
    invalid, nothing is enqueued and the ValidationError names each bad field as ``[i].field``.
    """
    settings = _settings(settings)
    items = list(items)
    problems: list[dict[str, str]] = []
    for i, item in enumerate(items):
        try:
            check_extend(item.get("request"), idempotency_key=item.get("idempotency_key"),
                         metadata=item.get("metadata"), settings=settings)
        except ValidationError as exc:
            problems += [{"field": f"[{i}].{e['field']}", "message": e["message"]} for e in exc.errors]
    if problems:
        raise ValidationError(problems)
    app = producer_app(settings)
    ids: list[str] = []
    with app.producer_or_acquire() as producer:
        for item in items:
            job_id = str(uuid.uuid4())
            kwargs = {k: item[k] for k in ("request", "idempotency_key", "metadata") if item.get(k) is not None}
            app.send_task("kie_extend.extend", kwargs=kwargs, task_id=job_id, queue=settings.queue,
                          producer=producer)
            ids.append(job_id)
    return ids


def get_job(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """The job's status record; ``{"job_id": id, "state": "not_found"}`` for an unknown id."""
    settings = _settings(settings)
    store = _runtime(settings).store
    raw = store.get(job_id)
    if raw is None:
        return {"job_id": job_id, "state": JobState.NOT_FOUND.value}
    first = raw.get("duplicate_of")
    if first and "state" not in raw:
        original = store.get(first)
        record = status_record(original or {}, job_id)
        if original is None:
            record["state"] = JobState.NOT_FOUND.value
        record["duplicate_of"] = first
        record["metadata"] = status_record(raw, job_id)["metadata"]
        record["created_at"] = raw.get("created_at")
        record["handlers"] = {}
        return record
    return status_record(raw, job_id)
