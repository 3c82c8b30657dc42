"""What the simulator's file routes (files.py), follow-up routes (followups.py) and state file (state.py) use of it.

:class:`~kie_extend.simulator.core.Simulator` has all of it; these modules name this protocol
instead, so they need not import the core that imports them.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Protocol

from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.protocol import SimReply, SimRequest
from kie_extend.simulator.stats import Stats
from kie_extend.simulator.tasks import Take, Task
from kie_extend.simulator.uploads import UploadStore


class SimHost(Protocol):
    """The simulator's shared state and the few services its routes call back into."""

    config: SimConfig
    lock: threading.RLock
    stats: Stats
    uploads: UploadStore
    tasks: dict[str, Task]
    takes: dict[str, tuple[Task, Take]]
    credits: float
    rng: random.Random
    _jobs_created: int
    followups: dict[str, Any]  # follow-up task id -> followups.FollowUp
    followup_index: dict[str, str]  # followups.paid_key -> follow-up task id (409s)
    _poll_limiter: Any

    def public_base(self, req: SimRequest) -> str:
        """The base URL clients reached the simulator at (for file URLs)."""

    def authenticate(self, req: SimRequest) -> tuple[str, SimReply | None]:
        """``(api key, None)`` or ``("", the 401 reply)``."""

    def source_duration(self, url: str, req: SimRequest | None = None) -> float | None:
        """The duration (s) of the audio at ``url``, or None when it cannot be read."""

    def upload_ttl(self) -> float:
        """Seconds an uploaded file stays downloadable."""

    def uploaded(self, upload: Any) -> None:
        """Note a finished upload (stats, state file)."""

    def rate_refusal(self, key: str) -> SimReply | None:
        """The account rate's 429 for ``key``, or None when the request fits (and is counted)."""

    def roll(self, knob: str, rng: random.Random | None = None, count: bool = True) -> bool:
        """Draw the fault ``knob`` (a fraction of 0..1)."""

    def persist(self) -> None:
        """Write the state file now (no-op without one)."""

    def schedule_callbacks(self, task: Any) -> None:
        """Schedule a task's callback stages that have not gone out yet."""
