"""Plumbing: Redis and broker endpoints, the broker transport and message consumer, transient
infrastructure errors, start-up checks, the embedded Valkey, the per-process runtime, logging and
metrics.

- ``endpoints.py``: Redis and broker URLs (checked, masked); ``clients.py``: Redis clients (timeouts,
  retries, Sentinel); ``transport.py``/``consumer.py``: the broker side of Celery.
- ``errors.py``: which errors are transient infrastructure errors, and their retry delay.
- ``check.py``: whether the job store and broker answer, and why not (``status``, ``/readyz``, the CLI's
  one line); ``preflight.py``: the checks a worker, beat or ``serve`` runs before it starts.
- ``embedded.py``: the embedded Valkey of the demo; ``runtime.py``: one process's wired objects.
- ``logs.py``: log formats, redaction, throttled warnings; ``metrics.py``: metrics kept in Redis, the
  Prometheus text and the system overview; ``tracing.py``: OpenTelemetry spans.
- ``fileio.py``: atomic file writes; ``jsontext.py``: JSON text with unique keys.
"""
