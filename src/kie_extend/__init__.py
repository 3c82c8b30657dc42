"""kie-extend: a distributed Celery worker for KIE.AI's Suno "Upload And Extend Audio" API.

The public names below are imported on first use (PEP 562), so a process that needs only a part of
the package (the simulator, the provider client) does not load Celery, Redis and the producer API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kie_extend import _moved

if TYPE_CHECKING:
    from kie_extend.api import (cancel, cancel_batch, enqueue_extend, enqueue_many, get_batch, get_job, pause,
                                resume, upload_audio)
    from kie_extend.config import Settings, load_settings
    from kie_extend.errors import KieExtendError, ValidationError
    from kie_extend.infra.check import InfraUnavailable
    from kie_extend.jobs.states import TERMINAL, JobState

__version__ = "0.1.0"

_moved.install()

#: Each public name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("cancel", "cancel_batch", "enqueue_extend", "enqueue_many", "get_batch", "get_job", "pause",
                     "resume", "upload_audio"), "kie_extend.api"),
    **dict.fromkeys(("Settings", "load_settings"), "kie_extend.config"),
    **dict.fromkeys(("KieExtendError", "ValidationError"), "kie_extend.errors"),
    "InfraUnavailable": "kie_extend.infra.check",
    **dict.fromkeys(("TERMINAL", "JobState"), "kie_extend.jobs.states"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kie_extend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
