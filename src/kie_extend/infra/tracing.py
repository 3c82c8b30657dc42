"""OpenTelemetry tracing: set-up from the standard ``OTEL_*`` variables, and the spans of a job's life.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``: OTLP over HTTP/protobuf, or
``console``) and ``OTEL_SDK_DISABLED`` is not ``true``. Off, nothing of OpenTelemetry is imported
and every helper here is a no-op (``job_span`` yields None). On (the ``kie-extend[otel]`` extra),
:func:`setup` installs the SDK's tracer provider with a batch exporter and the instrumentations of
Celery (``traceparent`` in each message's headers), requests and urllib3 (KIE calls) and FastAPI (serve).

A job's life spans many Celery messages scheduled by the tick, not one parent→child chain, so the
trace context of its ``kie.accept`` span is stored on the job's record (field ``traceparent``, W3C
text) and every later span of the job (``kie.admit``, ``kie.submit``, ``kie.poll``,
``kie.callback``, ``kie.deliver``) is started as a *child* of that stored context, with a *link* to
whatever span was current (a Celery message or an HTTP request of another trace). See README
"Tracing".
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from kie_extend.errors import ConfigError

log = logging.getLogger("kie_extend.infra.tracing")

#: The exporters ``OTEL_TRACES_EXPORTER`` may name (a comma list).
EXPORTERS = ("otlp", "console")
#: The record field (and message header) holding a job's W3C trace context.
FIELD = "traceparent"
#: The instrumentation scope of kie-extend's own spans.
TRACER = "kie_extend"

_lock = threading.Lock()
_on = False
_provider: Any = None
_instrumented: set[str] = set()


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment turns tracing on: ``OTEL_TRACES_EXPORTER`` set and not ``none``,
    ``OTEL_SDK_DISABLED`` not ``true``. Reads nothing else and imports nothing."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    return bool(names) and names != ["none"]


def enabled() -> bool:
    """Whether :func:`setup` turned tracing on in this process."""
    return _on


def setup(role: str, *, celery: bool = False, app: Any = None) -> bool:
    """Turn tracing on in this process when :func:`wanted` (idempotent; returns whether it is on).

    ``role`` (``producer``, ``worker``, ``beat``, ``serve``) names the service
    (``kie-extend-<role>``) unless ``OTEL_SERVICE_NAME`` does. ``celery``: instrument Celery
    (producers, workers, beat); ``app``: a FastAPI app to instrument. requests and urllib3 (KIE
    calls) are always instrumented. Raises ConfigError for an exporter other than ``otlp`` / ``console`` or when the
    ``kie-extend[otel]`` extra is not installed."""
    global _on, _provider
    if not wanted():
        return False
    with _lock:
        try:
            if _provider is None:
                _provider = _build_provider(role)
            if "requests" not in _instrumented:
                from opentelemetry.instrumentation.requests import RequestsInstrumentor

                from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

                RequestsInstrumentor().instrument()
                # The provider client's submit and poll go straight to urllib3's pool (provider/client.py).
                URLLib3Instrumentor().instrument()
                _instrumented.add("requests")
            if celery and "celery" not in _instrumented:
                from opentelemetry.instrumentation.celery import CeleryInstrumentor

                CeleryInstrumentor().instrument()
                _instrumented.add("celery")
            if app is not None and not getattr(app, "_kie_traced", False):
                from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

                FastAPIInstrumentor.instrument_app(app)
                app._kie_traced = True
        except ImportError as exc:
            raise ConfigError(f"OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed ({exc.name}): "
                              "pip install 'kie-extend[otel]', or unset OTEL_TRACES_EXPORTER") from None
        _on = True
    return True


def _build_provider(role: str) -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS and n != "none"]
    if unknown:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not supported: use "
                          f"{' or '.join(EXPORTERS)} (otlp is OTLP over HTTP/protobuf)")
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"kie-extend-{role}"}
    provider = TracerProvider(resource=Resource.create(attrs))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing on: exporter %s, service %s", ",".join(names), provider.resource.attributes.get(SERVICE_NAME))
    return provider


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered (a process about to exit). No-op when off."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and stop the exporter (process exit). No-op when off."""
    if _provider is not None:
        _provider.shutdown()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (``00-<trace>-<span>-<flags>``), or None when off
    or no span is current."""
    if not _on:
        return None
    carrier: dict[str, str] = {}
    from opentelemetry.propagate import inject

    inject(carrier)
    return carrier.get(FIELD)


def inject_headers(headers: dict[str, Any]) -> None:
    """Add the current trace context (``traceparent``, ``tracestate``) to Celery message
    ``headers`` in place. No-op when off."""
    if _on:
        from opentelemetry.propagate import inject

        inject(headers)


def job_traceparent(redis: Any, record_key: str) -> str | None:
    """The stored ``traceparent`` of the job whose record hash is ``record_key`` (one HGET), or
    None when off or the job has none."""
    if not _on:
        return None
    value = redis.hget(record_key, FIELD)
    return value.decode() if isinstance(value, bytes) else value


def attached(traceparent: str | None) -> Any:
    """A context manager making ``traceparent`` the current context (so what is published inside
    carries it); a no-op when off or ``traceparent`` is empty."""
    if not _on or not traceparent:
        return nullcontext()
    return _attached(traceparent)


@contextmanager
def _attached(traceparent: str) -> Iterator[None]:
    from opentelemetry import context
    from opentelemetry.propagate import extract

    token = context.attach(extract({FIELD: traceparent}))
    try:
        yield
    finally:
        context.detach(token)


def job_span(name: str, job_id: str, traceparent: str | None = None, *, kind: str = "internal",
             **attributes: Any) -> Any:
    """A context manager for one span of a job's life, yielding the span (None when off).

    Parent: the current span when it belongs to the job's trace (``traceparent``'s trace id), else
    the stored ``traceparent`` (with a link to the current span), else the current span. Attributes:
    ``kie.job_id`` and each ``attributes`` item whose value is not None (``kie_task_id`` becomes
    ``kie.task_id``: underscores after the first become dots only in that prefix, see :func:`attr_name`).
    ``kind``: ``internal``, ``producer``, ``consumer``, ``client`` or ``server``."""
    if not _on:
        return nullcontext(None)
    return _job_span(name, job_id, traceparent, kind, attributes)


def attr_name(key: str) -> str:
    """``kie_task_id`` → ``kie.task_id``; ``kie_callback__type`` → ``kie.callback.type``."""
    head, _, rest = key.partition("_")
    return f"{head}.{rest.replace('__', '.')}" if rest else head


@contextmanager
def _job_span(name: str, job_id: str, traceparent: str | None, kind: str,
              attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    tracer = trace.get_tracer(TRACER)
    current = trace.get_current_span().get_span_context()
    context, links = None, []
    if traceparent:
        stored_ctx = extract({FIELD: traceparent})
        stored = trace.get_current_span(stored_ctx).get_span_context()
        if stored.is_valid and not (current.is_valid and current.trace_id == stored.trace_id):
            context = stored_ctx
            if current.is_valid:
                links.append(trace.Link(current))
    attrs = {"kie.job_id": job_id, **{attr_name(k): v for k, v in attributes.items() if v is not None}}
    with tracer.start_as_current_span(name, context=context, links=links, attributes=attrs,
                                      kind=getattr(trace.SpanKind, kind.upper())) as span:
        yield span


def annotate(span: Any, **attributes: Any) -> None:
    """Set attributes (named as in :func:`job_span`) on ``span``; no-op for None (tracing off)."""
    if span is not None:
        for k, v in attributes.items():
            if v is not None:
                span.set_attribute(attr_name(k), v)


def annotate_current(**attributes: Any) -> None:
    """Set attributes (named as in :func:`job_span`) on the current span; no-op when off."""
    if _on:
        from opentelemetry import trace

        annotate(trace.get_current_span(), **attributes)
