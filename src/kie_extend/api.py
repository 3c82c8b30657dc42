"""The Python producer API: validate first, then enqueue ``kie_extend.extend`` by name."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Iterable, TypeVar

from celery import Celery
from redis.exceptions import RedisError

from kie_extend.config import Settings, load_settings
from kie_extend.infra.transport import configure_broker
from kie_extend.errors import ConfigError, IdempotencyConflictError, JobExistsError, KieExtendError, ValidationError
from kie_extend.jobs.idempotency import Idempotency, kwargs_digest, request_fingerprint
from kie_extend.jobs.ids import id_problem, is_valid
from kie_extend.jobs.intake import DEFAULT_PRIORITY, EXTEND_OPTIONS, check_message, require
from kie_extend.jobs.listing import job_status
from kie_extend.provider.audio_probe import AUDIO_FILE_FIELD, AudioInfo, probe_audio
from kie_extend.infra import tracing
from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.states import JobState
from kie_extend.infra.transport import broker_conf
from kie_extend.provider.uploads import UPLOAD_TIMEOUT, UploadedAudio, upload_file

log = logging.getLogger("kie_extend.api")

#: Stands in for the URL an upload will return while the request is checked before uploading.
PENDING_UPLOAD_URL = "https://upload.pending.invalid/audio"

AudioPath = str | os.PathLike[str]

#: The optional extend kwargs (README "Sharing one account"), passed through as given.
OPTIONS = EXTEND_OPTIONS

_apps: dict[str, Celery] = {}
_runtimes: dict[str, Runtime] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def _credentials_named(func: _F) -> _F:
    """Let ``func`` raise ``infra.check.InfraUnavailable`` (a KieExtendError and ConnectionError;
    ``part``, ``state`` with ``setting`` and the masked ``url``) instead of the Redis client's or
    kombu's own error when the job store or broker refuses our credentials: retrying cannot help,
    and the message says which setting to fix. Other errors pass through unchanged."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KieExtendError:
            raise
        except Exception as exc:
            from kie_extend.infra.check import InfraUnavailable, classify, endpoint_of

            from kie_extend.infra.errors import is_infra_error

            if not (is_infra_error(exc) or isinstance(exc, RedisError)) or classify(exc)[0] != "refused_credentials":
                raise
            try:
                settings = _settings(kwargs.get("settings"))
            except Exception:  # noqa: BLE001 - only to name the server; the error below says what failed
                settings = None
            what, var, url = endpoint_of(exc, settings)
            state = {"up": False, "reason": "refused_credentials", "setting": var, "url": url,
                     "detail": f"{what} ({var}={url}) refused the credentials (wrong user or password); "
                               f"check the user and password in {var}"}
            raise InfraUnavailable("broker" if var == "KIE_BROKER_URL" else "job_store", state) from exc

    return wrapper  # type: ignore[return-value]


def _settings(settings: Settings | None) -> Settings:
    return settings or load_settings()


def producer_app(settings: Settings) -> Celery:
    """A light Celery app for sending (no tasks imported), one per broker URL and queue."""
    key = f"{settings.effective_broker_url}|{settings.queue}|{settings.sentinel_master}"
    if key not in _apps:
        app = Celery("kie_extend_producer", broker=settings.effective_broker_url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"], task_protocol=2,
                        task_default_queue=settings.queue)
        app.conf.update(broker_conf(settings.effective_broker_url))
        configure_broker(app, settings)
        _apps[key] = app
    return _apps[key]


def _runtime(settings: Settings) -> Runtime:
    key = f"{settings.redis_url}|{settings.key_prefix}"
    if key not in _runtimes:
        _runtimes[key] = Runtime(settings)
    return _runtimes[key]


def check_extend(request: Any, *, idempotency_key: str | None = None, metadata: dict[str, Any] | None = None,
                 settings: Settings | None = None, audio_duration: float | None = None,
                 **options: Any) -> dict[str, Any]:
    """Validate one extend request and its options; raise ValidationError listing every problem.

    With ``audio_duration`` (seconds of the source audio, when known) ``continueAt`` must be below it
    and the source at most 8 minutes long. ``options``: ``tenant``, ``priority``, ``batch_id``,
    ``not_after`` (README "Sharing one account"; a time already past is refused: such a job could never run).
    """
    settings = _settings(settings)
    intake = require(check_message(request, settings=settings, idempotency_key=idempotency_key,
                                   metadata=metadata, audio_duration=audio_duration, refuse_past=True,
                                   **{k: options.get(k) for k in OPTIONS}))
    if audio_duration is not None:
        # The worker re-checks without the duration, so warnings about it (V4_5ALL above 60 s)
        # can only be given here.
        for warning in intake.warnings:
            log.warning("request warning: %s", warning)
    return intake.body


def check_audio_file(request: Any, audio_file: AudioPath, *, idempotency_key: str | None = None,
                     metadata: dict[str, Any] | None = None, settings: Settings | None = None) -> AudioInfo:
    """Probe a local source file and validate the request against its duration, before any upload.

    Raises one ValidationError listing every problem: the file (``audio_file``), a request that
    also carries ``uploadUrl``, ``continueAt`` at or beyond the duration, a source over 8 minutes,
    and every other bad field.
    """
    settings = _settings(settings)
    problems: list[dict[str, str]] = []
    if isinstance(request, Mapping) and request.get("uploadUrl") is not None:
        problems.append({"field": AUDIO_FILE_FIELD,
                         "message": "cannot be combined with uploadUrl; give a local file or a URL, not both"})
    info: AudioInfo | None = None
    try:
        info = probe_audio(audio_file)
    except ValidationError as exc:
        problems += exc.errors
    candidate = {**request, "uploadUrl": PENDING_UPLOAD_URL} if isinstance(request, Mapping) else request
    try:
        check_extend(candidate, idempotency_key=idempotency_key, metadata=metadata, settings=settings,
                     audio_duration=info.duration if info else None)
    except ValidationError as exc:
        # The source's length is reported against uploadUrl; here the source is the local file.
        problems += [{**e, "field": AUDIO_FILE_FIELD} if e["field"] == "uploadUrl" else e for e in exc.errors]
    if problems or info is None:
        raise ValidationError(problems)
    return info


@_credentials_named
def upload_audio(request: Any, audio_file: AudioPath, *, idempotency_key: str | None = None,
                 metadata: dict[str, Any] | None = None, settings: Settings | None = None) -> UploadedAudio:
    """Check the request against the local file (see ``check_audio_file``), then upload the file.

    Nothing is uploaded when the check fails. Use the returned ``url`` as the request's ``uploadUrl``.
    """
    settings = _settings(settings)
    info = check_audio_file(request, audio_file, idempotency_key=idempotency_key, metadata=metadata,
                            settings=settings)
    return _upload(audio_file, info, settings)


def _upload(audio_file: AudioPath, info: AudioInfo, settings: Settings) -> UploadedAudio:
    """Upload a checked file to ``KIE_UPLOAD_BASE_URL``."""
    if not settings.api_key_value():
        raise ConfigError("KIE_API_KEY is not set; uploading a local audio file needs it")
    url = upload_file(audio_file, base_url=settings.upload_base_url, api_key=settings.api_key_value(),
                      timeout=(settings.connect_timeout, UPLOAD_TIMEOUT[1]), mime=info.mime)
    log.info("uploaded %s (%.1f s, %d bytes) to %s", os.fspath(audio_file), info.duration, info.size, url)
    return UploadedAudio(path=os.fspath(audio_file), url=url, info=info)


@_credentials_named
def enqueue_extend(request: dict[str, Any], *, audio_file: AudioPath | None = None,
                   idempotency_key: str | None = None, metadata: dict[str, Any] | None = None,
                   settings: Settings | None = None, job_id: str | None = None, tenant: str | None = None,
                   priority: int | None = None, batch_id: str | None = None,
                   not_after: str | float | None = None, steps: list[dict[str, Any]] | None = None,
                   takes: str | None = None) -> str:
    """Validate and enqueue one extend request; returns the job id. Nothing is sent when invalid.

    With ``audio_file`` (a local path; the request then has no ``uploadUrl``) the file is probed
    and the request checked against its duration first, then the file is uploaded and its URL
    becomes ``uploadUrl``. Nothing is uploaded or enqueued when the check fails.

    ``job_id`` (optional) names the job and is claimed before the message is published: an id that
    another request holds (a job, or another producer's claim) raises ``JobExistsError`` (a
    ``ValidationError`` on the field ``job_id``) and nothing is sent; the same message again
    returns the id without publishing it twice. Without one a UUID4 is used. An
    ``idempotency_key`` that a different request holds in the tenant raises
    ``IdempotencyConflictError`` (nothing sent; the refusal is recorded as a failed job with its own
    event, named by ``job_ids``); for the same request the job becomes a duplicate of the first
    (README "Idempotency keys and explicit job ids").
    ``tenant``, ``priority`` (0-9), ``batch_id`` and ``not_after`` (ISO-8601 UTC or epoch seconds)
    share the account fairly (README "Sharing one account"). ``steps`` (a list such as ``[{"op": "wav"},
    {"op": "stems", "type": "separate_vocal"}]``) and ``takes`` (``"all"``, the default, or ``"first"``)
    ask for follow-up steps on the finished extension (README "Follow-up steps").
    """
    options = {"tenant": tenant, "priority": priority, "batch_id": batch_id, "not_after": not_after,
               "steps": steps, "takes": takes}
    settings = _settings(settings)
    if audio_file is not None:
        uploaded = upload_audio(request, audio_file, idempotency_key=idempotency_key, metadata=metadata,
                                settings=settings)
        request = {**request, "uploadUrl": uploaded.url}
    check_extend(request, idempotency_key=idempotency_key, metadata=metadata, settings=settings, **options)
    if job_id is not None and id_problem("job_id", job_id):
        raise ValidationError([id_problem("job_id", job_id)])  # type: ignore[list-item]
    explicit = job_id is not None
    job_id = job_id or str(uuid.uuid4())
    kwargs: dict[str, Any] = {"request": request}
    if idempotency_key is not None:
        kwargs["idempotency_key"] = idempotency_key
    if metadata is not None:
        kwargs["metadata"] = metadata
    kwargs.update({k: v for k, v in options.items() if v is not None})
    return _send(settings, [job_id], [kwargs], explicit=[explicit], skip_existing=False,
                 fields=["idempotency_key"])[0][0]


def _send(settings: Settings, ids: list[str], messages: list[dict[str, Any]], *, explicit: list[bool],
          skip_existing: bool, fields: list[str], uploads: dict[int, Any] | None = None) -> tuple[list[str], set[int]]:
    """Publish checked extend messages (kwargs) under their job ids; returns the ids and the indexes
    actually published. In order: explicit ids are claimed (:mod:`kie_extend.jobs.idempotency`: one of two
    simultaneous producers wins; the same message again is not published twice once sent; another
    request under a taken id raises JobExistsError, or is skipped with ``skip_existing``),
    idempotency keys are looked at (a key another request holds in the tenant refuses the call: the
    refusal is recorded as a failed job with its event, and IdempotencyConflictError raised), files in
    ``uploads`` (index -> callable giving the uploaded URL) are uploaded, batches are declared, the
    messages published and their claims marked sent."""
    tracing.setup("producer", celery=True)
    rt = _runtime(settings)
    idem = Idempotency(rt.redis, rt.keys, settings.idempotency_window)
    uploads = uploads or {}
    digests = {i: kwargs_digest(m) for i, m in enumerate(messages) if explicit[i] and i not in uploads}
    wanted = [i for i in range(len(ids)) if explicit[i]]
    outcomes = dict(zip(wanted, idem.claim([(ids[i], digests.get(i, "")) for i in wanted])))
    # Claims this call holds and has not published yet: given back if it stops before publishing.
    claimed = [i for i, o in outcomes.items() if o in ("won", "unsent") and i in digests]
    sent: set[int] = set()
    try:
        taken = [i for i, o in outcomes.items() if o == "taken"]
        if taken and not skip_existing:
            raise JobExistsError(ids[min(taken)])
        skip = {i for i, o in outcomes.items() if o in ("taken", "sent", "recorded")}
        _refuse_reused_keys(settings, rt, idem, ids, messages, skip | set(uploads), fields)
        for i, upload in uploads.items():
            if i in skip:
                continue
            messages[i] = {**messages[i], "request": {**messages[i]["request"], "uploadUrl": upload()}}
            if explicit[i]:
                digests[i] = kwargs_digest(messages[i])
                late = idem.claim([(ids[i], digests[i])])[0]
                if late in ("won", "unsent"):
                    claimed.append(i)
                elif late == "taken" and not skip_existing:
                    raise JobExistsError(ids[i])
                else:
                    skip.add(i)
        batches: dict[str, list[str]] = {}
        for i, m in enumerate(messages):
            if m.get("batch_id") is not None and i not in skip:
                batches.setdefault(m["batch_id"], []).append(ids[i])
        for b, members in batches.items():
            rt.store.declare_batch(b, members)
        app = producer_app(settings)
        # Celery's message builder and kombu's publisher directly: the same message send_task makes,
        # without its per-call routing, sent through the default exchange (no binding look-up per
        # message) in kombu's transport batches (one pipelined round trip per 500 on Redis).
        queue = app.amqp.queues[settings.queue]
        with app.producer_or_acquire() as producer:
            producer.maybe_declare(queue)
            with producer.batch(500):
                for i, m in enumerate(messages):
                    if i in skip:
                        continue
                    headers, properties, body, _ = app.amqp.create_task_message(ids[i], "kie_extend.extend", (), m)
                    # One producer span per message; its context rides in the headers (traceparent).
                    with tracing.job_span("kie.enqueue", ids[i], kind="producer", kie_tenant=m.get("tenant"),
                                          kie_batch_id=m.get("batch_id"), messaging_system=_messaging_system(settings),
                                          messaging_destination__name=settings.queue,
                                          messaging_operation__type="send"):
                        tracing.inject_headers(headers)
                        producer.publish(body, exchange="", routing_key=settings.queue, serializer="json",
                                         headers=headers, **properties)
                    sent.add(i)
    except BaseException:
        idem.release([(ids[i], digests[i]) for i in claimed if i not in sent])
        raise
    idem.mark_sent([(ids[i], digests[i]) for i in claimed if i in sent])
    return ids, sent


def _messaging_system(settings: Settings) -> str:
    """OpenTelemetry's ``messaging.system`` for the broker: ``rabbitmq`` for amqp URLs, else ``redis``."""
    return "rabbitmq" if settings.effective_broker_url.split(":", 1)[0].startswith(("amqp", "pyamqp")) else "redis"


def _refuse_reused_keys(settings: Settings, rt: Runtime, idem: Idempotency, ids: list[str],
                        messages: list[dict[str, Any]], skip: set[int], fields: list[str]) -> None:
    """Raise IdempotencyConflictError when a message's idempotency key is held, in its tenant, by
    another request (stored, or an earlier message of this call); each refused message is recorded first as a failed job with its own event
    (unless its id already has a record). A message whose request is not final yet (a file to
    upload) is left to the worker, which decides the same way."""
    from kie_extend.jobs.pipeline import Pipeline

    tenant_of = {i: m.get("tenant") or settings.default_tenant for i, m in enumerate(messages)}
    keyed = [i for i, m in enumerate(messages) if m.get("idempotency_key") and i not in skip]
    prints = {i: request_fingerprint(_json(messages[i]["request"]), tenant_of[i]) for i in keyed}
    # Within this call: a key's first message holds it, a later one with another request conflicts.
    holder: dict[tuple[str, str], str] = {}
    inner = {i for i in keyed
             if holder.setdefault((tenant_of[i], messages[i]["idempotency_key"]), prints[i]) != prints[i]}
    looks = idem.look_keys([(messages[i]["idempotency_key"], tenant_of[i], ids[i], prints[i]) for i in keyed])
    conflicts = [i for i, (outcome, _) in zip(keyed, looks) if outcome == "conflict" or i in inner]
    if conflicts:
        pipeline = Pipeline(rt)
        for i in conflicts:
            pipeline.refuse_conflict(ids[i], _refusal_fields(settings, ids[i], messages[i]))
        raise IdempotencyConflictError([ids[i] for i in conflicts], [fields[i] for i in conflicts])


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _refusal_fields(settings: Settings, job_id: str, message: dict[str, Any]) -> dict[str, Any]:
    """The record of a message refused at the producer (its idempotency key is held by another request)."""
    now = time.time()
    intake = check_message(message.get("request"), settings=settings, idempotency_key=message.get("idempotency_key"),
                           metadata=message.get("metadata"), **{k: message.get(k) for k in OPTIONS})
    return {"request": _json(message.get("request")), "metadata": intake.metadata or None, "created_ts": now,
            "idempotency_key": intake.idempotency_key, "tenant": intake.tenant, "priority": intake.priority,
            "batch_id": intake.batch_id, "not_after": intake.not_after}


@_credentials_named
def enqueue_many(items: Iterable[dict[str, Any]], *, settings: Settings | None = None,
                 batch_id: str | None = None, tenant: str | None = None, priority: int | None = None,
                 not_after: str | float | None = None, skip_existing: bool = False,
                 steps: list[dict[str, Any]] | None = None, takes: str | None = None) -> list[str]:
    """Validate every item first, then enqueue them all; returns job ids in order (see
    :func:`enqueue_many_sent`, which also says which items this call published)."""
    return enqueue_many_sent(items, settings=settings, batch_id=batch_id, tenant=tenant, priority=priority,
                             not_after=not_after, skip_existing=skip_existing, steps=steps, takes=takes)[0]


@_credentials_named
def enqueue_many_sent(items: Iterable[dict[str, Any]], *, settings: Settings | None = None,
                      batch_id: str | None = None, tenant: str | None = None, priority: int | None = None,
                      not_after: str | float | None = None,
                      skip_existing: bool = False, steps: list[dict[str, Any]] | None = None,
                      takes: str | None = None) -> tuple[list[str], set[int]]:
    """Validate every item first, then enqueue them all on one connection; returns job ids in order.

    Each item is ``{"request": {...}, "idempotency_key": ..., "metadata": ..., "audio_file": ...,
    "job_id": ..., "tenant": ..., "priority": ..., "batch_id": ..., "not_after": ..., "steps": ...,
    "takes": ...}`` (all but ``request`` optional; an item's own ``tenant`` … ``takes`` win over the
    keyword arguments).
    If any item is invalid, nothing is uploaded or enqueued and the ValidationError names each bad
    field as ``[i].field``. Files are uploaded only once every item has passed. A batch's jobs are
    declared to it before any is sent, so it cannot finish early. An explicit ``job_id`` is claimed
    before its message is published (README "Idempotency keys and explicit job ids"): the same item again is not published
    twice, whether or not a worker recorded it yet; an id that another request holds raises
    JobExistsError, or with ``skip_existing`` is returned without being sent. An idempotency key
    another request holds in the tenant raises IdempotencyConflictError. Returns the ids in order
    and the indexes of the items this call published.
    """
    settings = _settings(settings)
    items = list(items)
    options, infos = _check_many(items, settings, {"tenant": tenant, "priority": priority, "batch_id": batch_id,
                                                   "not_after": not_after, "steps": steps, "takes": takes})
    return _enqueue_checked(items, options, infos, settings, skip_existing)


def check_many(items: Iterable[dict[str, Any]], *, settings: Settings | None = None, batch_id: str | None = None,
               tenant: str | None = None, priority: int | None = None,
               not_after: str | float | None = None, steps: list[dict[str, Any]] | None = None,
               takes: str | None = None) -> list[dict[str, Any]]:
    """Validate items as :func:`enqueue_many_sent` does, and send nothing (local files are probed,
    not uploaded). Returns each item's options in order: ``{"tenant", "priority", "batch_id",
    "not_after"}`` with tenant and priority resolved (KIE_DEFAULT_TENANT, the default priority).
    Raises ValidationError naming each bad field as ``[i].field``."""
    settings = _settings(settings)
    options, _ = _check_many(list(items), settings, {"tenant": tenant, "priority": priority,
                                                     "batch_id": batch_id, "not_after": not_after,
                                                     "steps": steps, "takes": takes})
    return [{**o, "tenant": o["tenant"] if o["tenant"] is not None else settings.default_tenant,
             "priority": int(o["priority"]) if o["priority"] is not None else DEFAULT_PRIORITY} for o in options]


def _check_many(items: list[dict[str, Any]], settings: Settings,
                defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, AudioInfo]]:
    """enqueue_many's checks: each item's options, and the probed local files by index."""
    # An item's option given as null is absent: the call's default applies.
    options = [{k: item[k] if item.get(k) is not None else defaults.get(k) for k in OPTIONS} for item in items]
    problems: list[dict[str, str]] = []
    infos: dict[int, AudioInfo] = {}
    for i, item in enumerate(items):
        request, key, metadata = item.get("request"), item.get("idempotency_key"), item.get("metadata")
        try:
            if item.get("job_id") is not None and id_problem("job_id", item["job_id"]):
                raise ValidationError([id_problem("job_id", item["job_id"])])  # type: ignore[list-item]
            if item.get("audio_file") is not None:
                infos[i] = check_audio_file(request, item["audio_file"], idempotency_key=key, metadata=metadata,
                                            settings=settings)
            check_extend(request if i not in infos else {**request, "uploadUrl": PENDING_UPLOAD_URL},
                         idempotency_key=key, metadata=metadata, settings=settings, **options[i])
        except ValidationError as exc:
            problems += _indexed(i, exc)
    if problems:
        raise ValidationError(problems)
    return options, infos


def _enqueue_checked(items: list[dict[str, Any]], options: list[dict[str, Any]], infos: dict[int, AudioInfo],
                     settings: Settings, skip_existing: bool) -> tuple[list[str], set[int]]:
    """enqueue_many after its checks: the ids in order, and the indexes published by this call."""
    ids = [str(item.get("job_id") or uuid.uuid4()) for item in items]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kwargs = {k: item[k] for k in ("idempotency_key", "metadata") if item.get(k) is not None}
        kwargs.update({k: v for k, v in options[i].items() if v is not None})
        messages.append({"request": item["request"], **kwargs})

    def uploader(i: int) -> Any:
        def upload() -> str:
            url = _upload(items[i]["audio_file"], infos[i], settings).url
            try:
                check_extend({**items[i]["request"], "uploadUrl": url}, settings=settings)
            except ValidationError as exc:
                raise ValidationError(_indexed(i, exc)) from None
            return url
        return upload

    return _send(settings, ids, messages, explicit=[bool(item.get("job_id")) for item in items],
                 skip_existing=skip_existing, fields=[f"[{i}].idempotency_key" for i in range(len(items))],
                 uploads={i: uploader(i) for i in infos})


def _indexed(i: int, exc: ValidationError) -> list[dict[str, str]]:
    """An item's problems with their fields named ``[i].field``."""
    return [{"field": f"[{i}].{e['field']}", "message": e["message"]} for e in exc.errors]


@_credentials_named
def get_job(job_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """The job's status record; ``{"job_id": id, "state": "not_found"}`` for an unknown id (or one
    outside the id grammar, never looked up)."""
    settings = _settings(settings)
    if not is_valid("job_id", job_id):
        return {"job_id": job_id, "state": JobState.NOT_FOUND.value}
    return job_status(_runtime(settings), job_id)


# -- cancellation, batches, operator pause --------------------------------------------------------

@_credentials_named
def cancel(job_id: str, *, settings: Settings | None = None) -> bool:
    """Cancel a job not yet sent to KIE; False when it is unknown, finished, or already sent (KIE
    has no cancel call: a sent job keeps going). Cancel and submit never both happen."""
    from kie_extend.jobs.pipeline import Pipeline

    if not is_valid("job_id", job_id):
        return False

    return Pipeline(_runtime(_settings(settings))).cancel(job_id) == "cancelled"


@_credentials_named
def cancel_batch(batch_id: str, *, settings: Settings | None = None) -> int:
    """Cancel every job of a batch not yet sent (and any that arrives later); returns how many."""
    from kie_extend.jobs.batches import cancel_batch as _cancel_batch
    from kie_extend.jobs.pipeline import Pipeline

    rt = _runtime(_settings(settings))
    return _cancel_batch(rt, batch_id, Pipeline(rt).cancel_many)


@_credentials_named
def get_batch(batch_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """``{"batch_id", "total", "counts": {state: n}, "finished", "cancelled", "created_at",
    "finished_at"}``, or ``{"batch_id", "state": "not_found"}``."""
    from kie_extend.jobs.batches import get_batch as _get_batch

    return _get_batch(_runtime(_settings(settings)), batch_id)


@_credentials_named
def pause(reason: str = "", *, settings: Settings | None = None) -> None:
    """An operator's pause: no job is sent until :func:`resume` (jobs already sent keep going).
    Audited (tenants/audit.py) as ``python:<os user>``."""
    from kie_extend.tenants import audit

    audit.pause(_runtime(_settings(settings)), who=audit.cli_identity().replace("cli:", "python:", 1), via="python",
                reason=reason)


@_credentials_named
def resume(*, settings: Settings | None = None) -> bool:
    """Lift an operator's pause; False when there was none (the provider's pause lifts by itself).
    Audited (tenants/audit.py) as ``python:<os user>``."""
    from kie_extend.tenants import audit

    return audit.resume(_runtime(_settings(settings)), who=audit.cli_identity().replace("cli:", "python:", 1),
                        via="python")
