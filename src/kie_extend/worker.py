"""The Celery app: ``celery -A kie_extend.worker worker`` and ``celery -A kie_extend.worker beat``.

The app is built on first access of ``kie_extend.worker.app`` (PEP 562), from Settings read at
that moment: importing this module reads no environment.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, NoReturn

from celery import Celery, signals

from kie_extend.config import Settings, load_settings
from kie_extend.errors import ConfigError, config_error_line
from kie_extend.infra.transport import configure_broker
from kie_extend.infra.transport import broker_conf

#: Seconds a cold shutdown waits for running tasks before requeueing their messages.
SOFT_SHUTDOWN_TIMEOUT = 10.0


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app wired to ``settings`` (JSON only, acks late, prefetch 1, the beat tick)."""
    settings = settings or load_settings()
    app = Celery("kie_extend", broker=settings.effective_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_protocol=2,
        task_default_queue=settings.queue,
        task_routes={"kie_extend.*": {"queue": settings.queue}},
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # A broker that is down or refuses our credentials is retried until it answers (Celery's
        # default gives up after 100 attempts); each attempt logs why (infra.check.BrokerRetryNote).
        broker_connection_max_retries=None,
        worker_consumer="kie_extend.infra.consumer:KieConsumer",
        # Cold shutdown (SIGQUIT, or SIGTERM remapped by REMAP_SIGTERM=SIGQUIT) first waits this
        # long for running tasks, then hands every unacknowledged message, countdown retries
        # included, straight back to the broker instead of leaving it to the visibility timeout;
        # "on idle" does the same for a worker that only holds countdown messages.
        worker_soft_shutdown_timeout=SOFT_SHUTDOWN_TIMEOUT,
        worker_enable_soft_shutdown_on_idle=True,
        timezone="UTC",
        beat_scheduler="kie_extend.admission.beat:TickScheduler",
        beat_schedule={
            "kie-extend-tick": {
                "task": "kie_extend.tick",
                "schedule": settings.tick_interval,
                "options": {"queue": settings.queue, "expires": max(1.0, settings.tick_interval * 2)},
            }
        },
    )
    app.conf.update(broker_conf(settings.effective_broker_url, settings.visibility_timeout))
    configure_broker(app, settings)
    app.kie_settings = settings  # type: ignore[attr-defined]
    _check_handlers(settings)
    from kie_extend import tasks

    tasks.register(app)
    return app


def _check_handlers(settings: Settings) -> None:
    """Build every configured handler once, so a bad KIE_HANDLERS stops start-up with its reason."""
    from kie_extend.handlers import HandlerContext, build_handlers
    from kie_extend.store.keys import Keys
    from kie_extend.infra.clients import settings_redis

    build_handlers(settings.handlers, HandlerContext(settings, settings_redis(settings),
                                                     Keys(settings.key_prefix)))


_app: Celery | None = None


def get_app() -> Celery:
    """The process-wide app, built once from the environment."""
    global _app
    if _app is None:
        _app = create_app()
    return _app


def __getattr__(name: str) -> Any:
    if name == "app":
        # ``celery -A kie_extend.worker worker|beat`` lands here. Celery prints its own traceback
        # for an ordinary exception while it loads the app; a bad setting is one line and exit 5.
        try:
            return get_app()
        except ConfigError as exc:
            _refuse(config_error_line(exc))
    raise AttributeError(name)


def _refuse(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (a traceback too under KIE_LOG_LEVEL=DEBUG) and exit 5.

    SystemExit, because Celery prints a traceback for, or logs and swallows, anything else."""
    from kie_extend.cli.errors import EXIT_CONFIG, debug_requested
    from kie_extend.infra.endpoints import mask_text

    if debug_requested():
        traceback.print_exc()
    print(f"error: {mask_text(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


@signals.worker_init.connect
def _worker_preflight(sender: Any = None, **_: Any) -> None:
    _preflight(getattr(sender, "app", None), "worker")


@signals.beat_init.connect
def _beat_preflight(sender: Any = None, **_: Any) -> None:
    _preflight(getattr(sender, "app", None), "beat")


def _preflight(app: Any, process: str) -> None:
    """Log the endpoints and run the start-up checks; a refusal ends the process with its reason.

    SystemExit, because Celery logs and swallows ordinary exceptions raised by signal handlers.
    """
    settings = getattr(app, "kie_settings", None)
    if settings is None:  # an app not built by create_app
        return
    from kie_extend.cli.errors import EXIT_CONFIG
    from kie_extend.infra.logs import setup_logging
    from kie_extend.infra.preflight import run

    # The worker sends worker_init before it configures logging: configure it now (idempotent).
    setup_logging(settings.log_level, settings.log_format, _log_secrets(settings))
    from kie_extend.infra.check import BrokerRetryNote

    BrokerRetryNote.install(settings)  # "cannot connect to the broker" lines name the setting and why
    try:
        run(settings, process)
        from kie_extend.infra import tracing

        tracing.setup(process, celery=True)  # off (nothing imported) unless OTEL_TRACES_EXPORTER is set
    except ConfigError as exc:
        logging.getLogger("kie_extend.infra.preflight").critical("%s refuses to start: %s", process, exc)
        raise SystemExit(EXIT_CONFIG) from None
    _migrate(settings)


def _migrate(settings: Settings) -> None:
    """Move data an earlier version wrote under old key names (README "Identifiers"); a failure is
    logged, never fatal (the next process to start tries again)."""
    from kie_extend.jobs.batches import migrate_legacy_job_lists
    from kie_extend.infra.runtime import Runtime

    try:
        migrate_legacy_job_lists(Runtime(settings))
    except Exception as exc:
        logging.getLogger("kie_extend.jobs.batches").warning("could not move old batch job lists: %s", exc)


def _log_secrets(settings: Settings) -> list[str]:
    """What a worker's or beat's log lines must never show: the API key and the webhook secrets
    (KIE_WEBHOOK_SECRET and every tenant's own)."""
    found = [settings.api_key_value()]
    if settings.webhook_secret:
        found.append(settings.webhook_secret.get_secret_value())
    if settings.tenants is not None:
        found += [t.webhook_secret for t in settings.tenants.tenants.values() if t.webhook_secret]
    return found


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _flush_spans(**_: Any) -> None:
    """Export the spans a worker (or its pool process) still buffers before it exits."""
    from kie_extend.infra import tracing

    tracing.flush()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    from kie_extend.infra.logs import setup_logging

    settings = _app.kie_settings if _app is not None else load_settings()  # type: ignore[attr-defined]
    setup_logging(settings.log_level, settings.log_format, _log_secrets(settings))
