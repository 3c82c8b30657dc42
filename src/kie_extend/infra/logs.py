"""Logging: plain text or one JSON object per line (``KIE_LOG_FORMAT=json``), secrets redacted, repeated warnings throttled."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

_FIELDS = ("job_id", "kie_task_id", "audit")  # audit: an admin action (tenants/audit.py)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``job_id`` and ``kie_task_id`` when the line is about a job."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human lines; job ids in brackets when present."""

    def format(self, record: logging.LogRecord) -> str:
        tags = " ".join(f"{n}={getattr(record, n)}" for n in _FIELDS if n != "audit" and getattr(record, n, None))
        base = super().format(record)
        return f"{base} [{tags}]" if tags else base


class RedactFilter(logging.Filter):
    """Replaces any secret that slipped into a log line; the secrets never reach a handler."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in self.secrets:
                    msg = msg.replace(s, "***")
                record.msg, record.args = msg, None
        return True


def setup_logging(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter(secrets or []))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Celery's line per finished task ("Task … succeeded in 0.004s: None", two per job) says nothing
    # our own job lines do not; below DEBUG it is off (Celery checks once per process, so it costs
    # nothing). Its warnings and errors stay; a retry is logged by tasks.retry_later.
    logging.getLogger("celery.app.trace").setLevel(
        logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)


class Throttled:
    """One warning per ``every`` seconds for a repeated condition, counting the ones left out."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, logger: logging.Logger, message: str, *args: Any) -> bool:
        """Log ``message % args`` at WARNING unless one was logged less than ``every`` s ago; returns
        whether it was logged. A logged line says how many were left out since the previous one."""
        with self._lock:
            now = time.monotonic()
            if self._last and now - self._last < self.every:
                self._skipped += 1
                return False
            skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} more like it in the last {self.every:g} s not logged)" if skipped else ""
        logger.warning(message + suffix, *args)
        return True
