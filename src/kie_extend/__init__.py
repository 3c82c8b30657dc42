"""kie-extend: a distributed Celery worker for KIE.AI's Suno "Upload And Extend Audio" API."""

from __future__ import annotations

from .api import cancel, cancel_batch, enqueue_extend, enqueue_many, get_batch, get_job, pause, resume, upload_audio
from .config import Settings, load_settings
from .errors import KieExtendError, ValidationError
from .states import TERMINAL, JobState

__version__ = "0.1.0"

__all__ = [
    "JobState",
    "KieExtendError",
    "Settings",
    "TERMINAL",
    "ValidationError",
    "cancel",
    "cancel_batch",
    "enqueue_extend",
    "enqueue_many",
    "get_batch",
    "get_job",
    "pause",
    "resume",
    "upload_audio",
    "load_settings",
    "__version__",
]
