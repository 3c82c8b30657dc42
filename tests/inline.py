"""The domain code run in the test process: an inline dispatcher and a small driver.

The Celery dispatcher is exercised by the end-to-end tests; this one runs follow-up work here,
honouring countdowns as Celery would, so domain behaviour can be tested quickly and exactly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from kie_extend.handlers.delivery import Delivery
from kie_extend.jobs.pipeline import Pipeline
from kie_extend.infra.runtime import Runtime
from kie_extend.admission.tick import Scheduler
from kie_extend.simulator import SimServer


class InlineDispatcher:
    """Collects follow-up work; ``drain`` runs it here."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, tuple[str, ...], float]] = []

    def poll(self, job_id: str, at: float | None = None) -> None:
        self.pending.append(("poll", (job_id,), at or 0.0))

    def poll_many(self, job_ids: list[str], at: float | None = None) -> None:
        for job_id in job_ids:
            self.poll(job_id, at)

    def deliver(self, job_id: str, handler: str) -> None:
        self.pending.append(("deliver", (job_id, handler), 0.0))


class Harness:
    def __init__(self, rt: Runtime, sim: SimServer) -> None:
        self.rt, self.sim = rt, sim
        self.dispatch = InlineDispatcher()
        self.pipeline = Pipeline(rt, self.dispatch)
        self.scheduler = Scheduler(rt, self.dispatch)
        self.delivery = Delivery(rt)

    def drain(self) -> None:
        """Run the follow-up work that is due (a countdown is honoured, as Celery would)."""
        while True:
            due = [item for item in self.dispatch.pending if item[2] <= time.time()]
            if not due:
                return
            item = due[0]
            self.dispatch.pending.remove(item)
            kind, args, _ = item
            if kind == "poll":
                self.pipeline.advance(*args)
            else:
                self.delivery.deliver(*args)

    def run_until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        """Tick and drain until ``done()`` (bounded in time)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            self.scheduler.tick()
            self.drain()
            time.sleep(0.05)

    def accept(self, request: dict[str, Any], **kw: Any) -> str:
        job_id = str(uuid.uuid4())
        self.pipeline.accept(job_id, request, **kw)
        self.drain()
        return job_id

    def state(self, job_id: str) -> dict[str, str]:
        return self.rt.store.get(job_id) or {}

    def finished(self, job_id: str) -> Callable[[], bool]:
        return lambda: self.state(job_id).get("state") in ("succeeded", "failed")


#: Settings for in-process runs against a fast simulator: short polls, leases and timeouts.
FAST_SETTINGS: dict[str, Any] = {
    "poll_first": 0.2, "poll_interval": 0.2, "poll_max_interval": 0.3, "poll_min_gap": 0.0,
    "handler_retry_base": 0.05, "lease": 5, "connect_timeout": 1, "read_timeout": 3, "poll_callback_interval": 0.4,
}


def harness_factory(make_settings: Callable[..., Any], sim: SimServer,
                    **defaults: Any) -> Callable[..., Harness]:
    """A builder of Harnesses on ``sim`` with FAST_SETTINGS, then ``defaults``, then its own overrides."""
    def build(**overrides: Any) -> Harness:
        settings = make_settings(**{"base_url": sim.url, **FAST_SETTINGS, **defaults, **overrides})
        return Harness(Runtime(settings), sim)

    return build


def sample_request(sim: SimServer, **extra: Any) -> dict[str, Any]:
    """A valid instrumental V5 request on the simulator's 30 s source file, with ``extra`` fields."""
    return {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 3, "model": "V5", "style": "jazz", "title": "T", **extra}
