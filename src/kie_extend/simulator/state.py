"""The simulator's state on disk, so a restarted simulator still knows its tasks.

With ``--state-file PATH`` (env ``KIE_SIM_STATE_FILE``) the simulator keeps, in one JSON file:
its tasks and follow-up tasks (timelines, takes, callback plans and which callback stages already went out), its
credit balance, its random generator (a seeded simulator does not hand out a task id twice), its
counters (``/_sim/stats``) and the list of uploaded files, whose bytes go to the directory
``PATH.uploads/``. The file is rewritten atomically (a temporary file in the same directory,
fsync, rename) before a submission is answered, when a callback stage has gone out, when a file is
uploaded, on ``/_sim/reset`` and on a clean stop; so a simulator killed at any moment restarts
with every task it accepted. Polls since the last write are not counted again (the counters may
lag, the tasks do not).

Times are kept as wall-clock epochs, so time passes for a task while its simulator is down, as it
does for a real provider that is only out of reach. The API key is never written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kie_extend.infra.fileio import write_atomic
from kie_extend.simulator.followups import FollowUp, paid_key
from kie_extend.simulator.jobs import JobsTask
from kie_extend.simulator.tasks import Take, Task
from kie_extend.simulator.uploads import Upload

if TYPE_CHECKING:
    from kie_extend.simulator.host import SimHost

VERSION = 1


class StateError(ValueError):
    """The state file exists but cannot be read as simulator state (names the file and why)."""


def _to_epoch(monotonic_at: float) -> float:
    return time.time() - (time.monotonic() - monotonic_at)


def _to_monotonic(epoch: float) -> float:
    return time.monotonic() - (time.time() - epoch)


def _task_dict(task: Task) -> dict[str, Any]:
    out = dataclasses.asdict(task)
    out["api_key"] = ""  # never on disk
    out["created"] = _to_epoch(task.created)
    out["kind"] = "jobs" if isinstance(task, JobsTask) else "legacy"
    return out


def _followup_dict(task: FollowUp) -> dict[str, Any]:
    out = dataclasses.asdict(task)
    out["api_key"] = ""  # never on disk
    out["created"] = _to_epoch(task.created)
    return out


def _followup_from(raw: dict[str, Any]) -> FollowUp:
    raw = dict(raw)
    raw["created"] = _to_monotonic(float(raw["created"]))
    return FollowUp(**raw)


def _task_from(raw: dict[str, Any]) -> Task:
    raw = dict(raw)
    kind = raw.pop("kind", "legacy")
    raw["created"] = _to_monotonic(float(raw["created"]))
    raw["takes"] = [Take(**t) for t in raw["takes"]]
    return JobsTask(**raw) if kind == "jobs" else Task(**raw)


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(raw: list[Any]) -> tuple[Any, ...]:
    return (raw[0], tuple(raw[1]), raw[2])


class StateFile:
    """Reads and writes one simulator's state at ``path`` (uploads' bytes under ``path.uploads/``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.blobs = self.path.with_name(self.path.name + ".uploads")

    def _blob(self, upload_path: str) -> Path:
        return self.blobs / hashlib.sha256(upload_path.encode()).hexdigest()

    def save_upload(self, upload: Upload) -> None:
        """Write an uploaded file's bytes (before the state that lists it)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        write_atomic(self._blob(upload.path), upload.data, sync_dir=True)

    def save(self, sim: SimHost) -> None:
        """Write the whole state atomically; the caller holds ``sim.lock``."""
        uploads = [{"path": u.path, "mime": u.mime, "duration": u.duration, "created": _to_epoch(u.created),
                    "uploaded_at": u.uploaded_at} for u in sim.uploads.all()]
        doc = {
            "version": VERSION,
            "saved_at": time.time(),
            "credits": sim.credits,
            "jobs_created": sim._jobs_created,
            "rng": _rng_to_json(sim.rng.getstate()),
            "tasks": [_task_dict(t) for t in sim.tasks.values()],
            "followups": [_followup_dict(t) for t in sim.followups.values()],
            "uploads": uploads,
            "stats": sim.stats.snapshot(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode(), sync_dir=True)
        if self.blobs.is_dir():  # bytes of uploads no longer listed (expired, reset)
            keep = {self._blob(u["path"]).name for u in uploads}
            for blob in self.blobs.iterdir():
                if blob.name not in keep and not blob.name.startswith("."):
                    blob.unlink(missing_ok=True)

    def load(self, sim: SimHost) -> int:
        """Restore ``sim`` from the file; returns how many tasks it knows (0 when there is no file).
        Raises StateError when the file is not simulator state."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise StateError(f"simulator state file {self.path} cannot be read: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise StateError(f"simulator state file {self.path} is not version {VERSION} simulator state")
        try:
            tasks = [_task_from(raw) for raw in doc["tasks"]]
            follow = [_followup_from(raw) for raw in doc.get("followups", [])]
            uploads = []
            for raw in doc.get("uploads", []):
                blob = self._blob(raw["path"])
                if blob.exists():
                    uploads.append(Upload(raw["path"], blob.read_bytes(), raw["mime"], raw["duration"],
                                          _to_monotonic(float(raw["created"])), raw["uploaded_at"]))
            rng_state = _rng_from_json(doc["rng"])
            credits, jobs_created = float(doc["credits"]), int(doc["jobs_created"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StateError(f"simulator state file {self.path} is damaged: {type(exc).__name__}: {exc}") from None
        with sim.lock:
            sim.tasks = {t.task_id: t for t in tasks}
            sim.takes = {take.key: (t, take) for t in tasks for take in t.takes}
            sim.followups = {t.task_id: t for t in follow}
            sim.followup_index = {paid_key(t.op, t.body): t.task_id for t in follow}
            for upload in uploads:
                sim.uploads.restore(upload)
            sim.rng.setstate(rng_state)
            sim.credits = credits
            sim._jobs_created = jobs_created
            sim.stats.restore(doc.get("stats") or {})
        return len(tasks)


__all__ = ["StateError", "StateFile"]
