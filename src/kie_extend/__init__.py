"""kie-extend: a distributed Celery worker for KIE.AI's Suno "Upload And Extend Audio" API."""

from __future__ import annotations

from kie_extend.api import cancel, cancel_batch, enqueue_extend, enqueue_many, get_batch, get_job, pause, resume, upload_audio
from kie_extend.config import Settings, load_settings
from kie_extend import _moved
from kie_extend.errors import KieExtendError, ValidationError
from kie_extend.infra.check import InfraUnavailable
from kie_extend.jobs.states import TERMINAL, JobState

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "InfraUnavailable",
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
