"""KIE's follow-up routes (WAV, stems, MIDI, music video, timestamped lyrics) as the simulator serves them.

Each asynchronous follow-up is a :class:`FollowUp` task with its own id, record route and callback, on
the same clock, credits, account rate bucket and callback machinery as the music tasks:

==========  ===========================================  ==========================================
op          submit                                       record
==========  ===========================================  ==========================================
wav         ``POST /api/v1/wav/generate``                ``GET /api/v1/wav/record-info``
stems       ``POST /api/v1/vocal-removal/generate``      ``GET /api/v1/vocal-removal/record-info``
midi        ``POST /api/v1/midi/generate``               ``GET /api/v1/midi/record-info``
video       ``POST /api/v1/mp4/generate``                ``GET /api/v1/mp4/record-info``
lyrics      ``POST /api/v1/generate/get-timestamped-lyrics`` (synchronous: the answer holds the words)
==========  ===========================================  ==========================================

Where the provider's pages disagree, knobs choose: ``followup_flag_style`` (the ``successFlag`` as
documented — strings, MIDI integers — or all strings, all integers, or mixed task by task),
``followup_field_style`` (record fields camelCase as documented, snake_case, or mixed; callbacks are
snake_case unless the style is camel), and the stems callback nests its URLs under
``vocal_separation_info`` or ``vocal_removal_info``, task by task. A second WAV or MP4 of the same
(taskId, audioId) answers 409 "record already exists" and is not charged (unless the first one failed);
stems are charged on every
call. Every paid call is tallied per (op, taskId, audioId[, type]) in ``/_sim/stats``
(``followup_paid``), and ``followups_paid_twice`` counts the keys paid more than once.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kie_extend.simulator.audio import mp3_bytes, wav_bytes
from kie_extend.simulator.protocol import SimReply, SimRequest, envelope, raw_reply
from kie_extend.simulator.tasks import CALLBACK_EXCEPTION, SUCCESS

if TYPE_CHECKING:
    from kie_extend.simulator.host import SimHost as Simulator

#: op -> (submit path, record path); lyrics has no record.
ROUTES: dict[str, tuple[str, str | None]] = {
    "wav": ("/api/v1/wav/generate", "/api/v1/wav/record-info"),
    "stems": ("/api/v1/vocal-removal/generate", "/api/v1/vocal-removal/record-info"),
    "midi": ("/api/v1/midi/generate", "/api/v1/midi/record-info"),
    "video": ("/api/v1/mp4/generate", "/api/v1/mp4/record-info"),
    "lyrics": ("/api/v1/generate/get-timestamped-lyrics", None),
}
#: Failure flags of each operation's record (string style).
FAILED_FLAGS = {"wav": "GENERATE_WAV_FAILED", "stems": "GENERATE_AUDIO_FAILED", "midi": "GENERATE_MIDI_FAILED",
                "video": "GENERATE_MP4_FAILED"}
INT_FLAGS = {"PENDING": 0, "SUCCESS": 1, "CREATE_TASK_FAILED": 2, "CALLBACK_EXCEPTION": 1}
STEM_TYPES = ("separate_vocal", "split_stem")
#: Stems each separation type returns (record-info camelCase names, without "Url").
STEMS = {
    "separate_vocal": ("vocal", "instrumental"),
    "split_stem": ("vocal", "backingVocals", "drums", "bass", "guitar", "keyboard", "percussion", "strings",
                   "synth", "fx", "brass", "woodwinds"),
}
MAX_VIDEO_TEXT = 50
#: A tiny but well-formed MP4 header (an ``ftyp`` box and an empty ``mdat``): enough for a sniffer.
MP4_BYTES = (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x08mdat")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


@dataclass
class FollowUp:
    """One asynchronous follow-up task; its state is derived from the time since creation.

    It has the attributes and methods the simulator's callback machinery uses of a music task
    (``stages``, ``callback_body``, ``callback_plan``, ``done_stages``, ...)."""

    op: str
    task_id: str
    source_task: str  # the music task (the stems task for midi)
    audio_id: str
    body: dict[str, Any]
    base_url: str
    created: float  # monotonic seconds
    t_done: float  # elapsed seconds until it ends (already scaled)
    api_key: str = ""
    fail: bool = False
    callback_exception: bool = False
    flag_style: str = "string"  # "string" or "int"
    field_style: str = "documented"  # "documented" (records camelCase, callbacks snake_case), "camel" or "snake"
    nest: str = "vocal_separation_info"  # the stems callback's nesting key
    cb_task_key: str = "data"  # where the callback carries task_id: "data" or "top" (MIDI's pages)
    cb_failures: int = 0
    cb_stopped: bool = False
    callback_plan: dict[str, str] = field(default_factory=dict)
    done_stages: list[str] = field(default_factory=list)
    cost: float = 0.0

    @property
    def callback_url(self) -> str:
        """Where this task's callback goes."""
        return str(self.body.get("callBackUrl") or "")

    @property
    def stem_type(self) -> str:
        """The separation type (stems only)."""
        return str(self.body.get("type") or "separate_vocal")

    def status(self, now: float) -> str:
        """``PENDING``, ``SUCCESS``, ``CALLBACK_EXCEPTION`` or this operation's failure flag."""
        if now - self.created < self.t_done:
            return "PENDING"
        if self.fail:
            return FAILED_FLAGS[self.op]
        return CALLBACK_EXCEPTION if self.callback_exception else SUCCESS

    def finished(self, now: float) -> bool:
        """Whether it has ended and succeeded (its files exist)."""
        return self.status(now) in (SUCCESS, CALLBACK_EXCEPTION)

    def stages(self) -> list[tuple[float, str]]:
        """The one callback stage: ``complete`` or ``error``, at ``t_done``."""
        return [(self.t_done, "error" if self.fail else "complete")]

    def _flag(self, status: str) -> Any:
        if self.flag_style != "int":
            return status
        return INT_FLAGS.get(status, 3)

    def _key(self, camel: str, snake_callback: bool = False) -> str:
        snake = self.field_style == "snake" or (snake_callback and self.field_style != "camel")
        return _snake(camel) if snake else camel

    def urls(self) -> dict[str, str]:
        """The result's URLs, camelCase keys (empty until it succeeded)."""
        base = f"{self.base_url}/files/followup/{self.task_id}"
        if self.op == "wav":
            return {"audioWavUrl": f"{base}/audio.wav"}
        if self.op == "video":
            return {"videoUrl": f"{base}/video.mp4"}
        if self.op == "stems":
            out = {f"{name}Url": f"{base}/{_snake(name)}.mp3" for name in STEMS[self.stem_type]}
            out["originUrl"] = f"{base}/origin.mp3"
            return out
        return {}

    def instruments(self) -> list[dict[str, Any]]:
        """A few deterministic instruments with notes (MIDI)."""
        rng = random.Random(self.task_id)
        out = []
        for name in ("Drums", "Electric Bass (finger)", "Acoustic Grand Piano"):
            notes, t = [], 0.0
            for _ in range(rng.randint(3, 8)):
                length = round(rng.uniform(0.1, 0.8), 3)
                notes.append({"pitch": rng.randint(36, 84), "start": round(t, 3), "end": round(t + length, 3),
                              "velocity": round(rng.uniform(0.3, 1.0), 3)})
                t += length + round(rng.uniform(0.0, 0.3), 3)
            out.append({"name": name, "notes": notes})
        return out

    def record_info(self, now: float) -> dict[str, Any]:
        """The record-info ``data`` object at monotonic time ``now``."""
        status = self.status(now)
        ok = status in (SUCCESS, CALLBACK_EXCEPTION)
        wall = time.time() - (now - self.created)
        data: dict[str, Any] = {
            "taskId": self.task_id,
            self._key("callbackUrl"): self.callback_url,
            self._key("completeTime"): int((wall + self.t_done) * 1000) if status != "PENDING" else None,
            self._key("createTime"): int(wall * 1000),
            self._key("successFlag"): self._flag(status),
            self._key("errorCode"): 501 if self.fail and status != "PENDING" else None,
            self._key("errorMessage"): f"{self.op} generation failed" if self.fail and status != "PENDING" else None,
        }
        if self.op == "midi":
            data[self._key("recordTaskId")] = self.source_task
            data[self._key("audioId")] = self.audio_id
            data[self._key("midiData")] = {"state": "complete", "instruments": self.instruments()} if ok else None
        else:
            data[self._key("musicId")] = self.audio_id
            data["response"] = {self._key(k): v for k, v in self.urls().items()} if ok else None
        return data

    def callback_body(self, stage: str) -> dict[str, Any]:
        """The completion (or failure) callback payload."""
        if stage == "error":
            body: dict[str, Any] = {"code": 501, "msg": f"{self.op} generation failed", "data": {}}
        elif self.op == "midi":
            body = {"code": 200, "msg": "success", "data": {"state": "complete", "instruments": self.instruments()}}
        else:
            urls = {self._key(k, snake_callback=True): v for k, v in self.urls().items()}
            body = {"code": 200, "msg": "success", "data": {self.nest: urls} if self.op == "stems" else urls}
        if self.cb_task_key == "top":
            body["task_id"] = self.task_id
        else:
            body["data"]["task_id"] = self.task_id
        return body


def _problem(sim: Simulator, op: str, body: Any, key: str, now: float) -> tuple[int, str] | None:
    """The first problem of a follow-up submit body: ``(code, message)``, or None."""
    if not isinstance(body, dict):
        return 422, "request body must be a JSON object"
    for name in ("taskId", "audioId", "callBackUrl", "type", "author", "domainName"):
        if body.get(name) is not None and not isinstance(body[name], str):
            return 422, f"{name} must be a string"
    task_id = str(body.get("taskId") or "").strip()
    if not task_id:
        return 422, "taskId is required"
    if op != "lyrics" and not str(body.get("callBackUrl") or "").strip():
        return 422, "callBackUrl is required"
    audio_id = str(body.get("audioId") or "").strip()
    if op == "midi":
        stems = sim.followups.get(task_id)
        if stems is None or stems.op != "stems" or (stems.api_key and stems.api_key != key):
            return 422, "taskId must be a vocal separation task of this account"
        if not stems.finished(now):
            return 422, "the vocal separation task has not succeeded"
        return None
    if not audio_id:
        return 422, "audioId is required"
    music = sim.tasks.get(task_id)
    if music is None or (music.api_key and music.api_key != key):
        return 422, "taskId not found"
    if music.status(now) not in (SUCCESS, CALLBACK_EXCEPTION):
        return 422, "the music task has not finished generating"
    if audio_id not in {t.id for t in music.takes}:
        return 422, "audioId is not a track of taskId"
    if op == "stems" and body.get("type") not in STEM_TYPES:
        return 422, f"type must be one of {', '.join(STEM_TYPES)}"
    if op == "video":
        for name in ("author", "domainName"):
            if len(str(body.get(name) or "")) > MAX_VIDEO_TEXT:
                return 422, f"{name} must be at most {MAX_VIDEO_TEXT} characters"
    return None


def paid_key(op: str, body: dict[str, Any]) -> str:
    """The tally key of one paid call: ``op:taskId:audioId[:type]``."""
    parts = [op, str(body.get("taskId") or ""), str(body.get("audioId") or "")]
    if op == "stems":
        parts.append(str(body.get("type") or ""))
    return ":".join(parts)


def cost_of(sim: Simulator, op: str, body: dict[str, Any]) -> float:
    """Credits one call of ``op`` costs."""
    cfg = sim.config
    if op == "stems":
        return cfg.split_stem_cost if body.get("type") == "split_stem" else cfg.stems_cost
    return float(getattr(cfg, f"{op}_cost"))


def _style(rng: random.Random, knob: str, documented: str, choices: tuple[str, str]) -> str:
    if knob == "documented":
        return documented
    if knob == "mixed":
        return rng.choice(choices)
    return knob


def submit(sim: Simulator, op: str, req: SimRequest) -> SimReply:
    """A follow-up submit (every op but lyrics): auth, the shared rate bucket, faults, checks, 409, credits."""
    key, denied = sim.authenticate(req)
    if denied:
        return denied
    cfg = sim.config
    refused = sim.rate_refusal(key)
    if refused is not None:
        sim.stats.tally("followup_rate_limited", op)
        return refused
    if sim.roll("fault_followup_429"):
        sim.stats.add("rate_limited")
        sim.stats.tally("followup_rate_limited", op)
        return envelope(429, "Rate limit exceeded; this request was not queued")
    try:
        body = req.json()
    except ValueError:
        return envelope(422, "request body must be valid JSON")
    now = time.monotonic()
    problem = _problem(sim, op, body, key, now)
    if problem:
        return envelope(*problem)
    with sim.lock:
        pk = paid_key(op, body)
        earlier = sim.followups.get(sim.followup_index.get(pk, ""))
        if op in ("wav", "video") and earlier is not None and not earlier.fail:  # a failed record may be redone
            sim.stats.tally("followup_conflicts", op)
            return envelope(409, f"Conflict: a {'WAV' if op == 'wav' else 'MP4'} record already exists "
                                 "for this audio")
        cost = cost_of(sim, op, body)
        if cost > 0 and sim.credits < cost:
            return envelope(402, "Insufficient credits")
        sim.credits -= cost
        task = _create(sim, op, body, key, sim.public_base(req), now, cost)
        sim.followup_index[pk] = task.task_id
    sim.stats.tally("followups_accepted", op)
    sim.stats.tally("followup_paid", pk)
    sim.persist()
    sim.schedule_callbacks(task)
    reply = envelope(200, "success", {"taskId": task.task_id})
    reply.delay = cfg.slow_seconds if sim.roll("fault_slow") else 0.0  # accepted, then answered late
    return reply


def _create(sim: Simulator, op: str, body: dict[str, Any], key: str, base: str, now: float,
            cost: float) -> FollowUp:
    """Create and register a follow-up task (the caller holds the lock)."""
    cfg = sim.config
    rng = random.Random(sim.rng.getrandbits(64))
    task_id = f"{sim.rng.getrandbits(128):032x}"
    audio_id = str(body.get("audioId") or "")
    task = FollowUp(op=op, task_id=task_id, source_task=str(body.get("taskId")), audio_id=audio_id, body=body,
                    base_url=base, created=now, t_done=float(getattr(cfg, f"{op}_seconds")) * cfg.time_factor,
                    api_key=key, cost=cost)
    task.fail = sim.roll(f"fault_{op}_fail", rng)
    if not task.fail:
        task.callback_exception = sim.roll("fault_followup_callback_exception", rng)
    task.flag_style = _style(rng, cfg.followup_flag_style, "int" if op == "midi" else "string", ("string", "int"))
    style = cfg.followup_field_style
    task.field_style = rng.choice(("camel", "snake", "documented")) if style == "mixed" else style
    task.nest = rng.choice(("vocal_separation_info", "vocal_removal_info"))
    task.cb_task_key = "top" if op == "midi" else "data"
    plan = "missing" if sim.roll("fault_missing_callback", rng, count=False) else \
        "duplicate" if sim.roll("fault_duplicate_callback", rng, count=False) else "send"
    task.callback_plan = {stage: plan for _, stage in task.stages()}
    sim.followups[task_id] = task
    return task


def record(sim: Simulator, op: str, req: SimRequest) -> SimReply:
    """``GET /api/v1/<op>/record-info?taskId=``: this operation's tasks only."""
    key, denied = sim.authenticate(req)
    if denied:
        return denied
    task_id = str(req.query.get("taskId", "")).strip()
    if not task_id:
        return envelope(422, "taskId is required")
    sim.stats.tally("followup_polls", op)
    cfg = sim.config
    if cfg.followup_poll_limit > 0 and not sim._poll_limiter.allow(
            f"followup:{task_id}", cfg.followup_poll_limit, cfg.poll_window):
        return envelope(429, f"Too many requests: at most {cfg.followup_poll_limit} record-info requests "
                             f"per {cfg.poll_window:g} s per task")
    task = sim.followups.get(task_id)
    if task is None or task.op != op or (task.api_key and key and task.api_key != key):
        return envelope(422, "recordInfo is null")
    return envelope(200, "success", task.record_info(time.monotonic()))


def lyrics(sim: Simulator, req: SimRequest) -> SimReply:
    """``POST /api/v1/generate/get-timestamped-lyrics``: the take's words with times, at once."""
    key, denied = sim.authenticate(req)
    if denied:
        return denied
    cfg = sim.config
    refused = sim.rate_refusal(key)
    if refused is not None:
        sim.stats.tally("followup_rate_limited", "lyrics")
        return refused
    try:
        body = req.json()
    except ValueError:
        return envelope(422, "request body must be valid JSON")
    problem = _problem(sim, "lyrics", body, key, time.monotonic())
    if problem:
        return envelope(*problem)
    music = sim.tasks[body["taskId"]]
    take = next(t for t in music.takes if t.id == body["audioId"])
    snake = cfg.followup_field_style == "snake" or (
        cfg.followup_field_style == "mixed" and int(hashlib.sha256(take.id.encode()).hexdigest(), 16) % 2)
    words, t = [], 1.0
    for word in take.prompt.split():
        start, end = round(t, 2), round(t + 0.1 * len(word) + 0.2, 2)
        words.append({"word": word, "success": True, ("start_s" if snake else "startS"): start,
                      ("end_s" if snake else "endS"): end, ("p_align" if snake else "palign"): 0})
        t = end + 0.15
    with sim.lock:
        cost = cost_of(sim, "lyrics", body)
        if cost > 0 and sim.credits < cost:
            return envelope(402, "Insufficient credits")
        sim.credits -= cost
    sim.stats.tally("followups_accepted", "lyrics")
    sim.stats.tally("followup_paid", paid_key("lyrics", body))
    data = {("aligned_words" if snake else "alignedWords"): words,
            ("waveform_data" if snake else "waveformData"): [round(0.5 + 0.4 * ((i * 7) % 10) / 10, 2)
                                                              for i in range(32)],
            ("hoot_cer" if snake else "hootCer"): 0.12, ("is_streamed" if snake else "isStreamed"): False}
    return envelope(200, "success", data)


def serve_file(sim: Simulator, req: SimRequest) -> SimReply:
    """``GET /files/followup/<taskId>/<name>``: a succeeded follow-up's files (404 before)."""
    parts = req.path.split("/")
    task = sim.followups.get(parts[3]) if len(parts) == 5 else None
    if task is None or not task.finished(time.monotonic()):
        return envelope(404, "Not Found", status=404)
    name = parts[4]
    served = sim.config.served_seconds
    if task.op == "wav" and name == "audio.wav":
        return raw_reply(wav_bytes(served), "audio/wav")
    if task.op == "video" and name == "video.mp4":
        return raw_reply(MP4_BYTES, "video/mp4")
    if task.op == "stems" and name.endswith(".mp3") and f"{task.base_url}/files/followup/{task.task_id}/{name}" \
            in task.urls().values():
        return raw_reply(mp3_bytes(served, f"{task.task_id}/{name}".encode()), "audio/mpeg")
    return envelope(404, "Not Found", status=404)


def paid_twice(tally: dict[str, int]) -> int:
    """How many paid-call keys were paid more than once."""
    return sum(1 for n in tally.values() if n > 1)


__all__ = ["FollowUp", "ROUTES", "lyrics", "paid_key", "paid_twice", "record", "serve_file", "submit"]

