"""The simulator's state and provider logic, independent of HTTP: submit, poll, credits, callbacks."""

from __future__ import annotations

import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from kie_extend.simulator import files, followups
from kie_extend.simulator.callbacks import Scheduler, post_callback
from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.jobs import FAIL_CODES, RESULT_SHAPES, JobsTask, legacy_view, validate_create_task
from kie_extend.simulator.limits import RollingLimiter
from kie_extend.simulator.protocol import SimReply, SimRequest, envelope, json_reply
from kie_extend.simulator.rules import SourceFetchError, validate_submit
from kie_extend.simulator.state import StateFile
from kie_extend.simulator.stats import Stats
from kie_extend.simulator.tasks import Take, Task
from kie_extend.simulator.uploads import UploadStore

SUBMIT = "POST /api/v1/generate/upload-extend"
POLL = "GET /api/v1/generate/record-info"
CREDIT = "GET /api/v1/chat/credit"
#: Task errorCodes whose credits the provider gives back (reference kie-api.md: 531 "failed, credits
#: refunded"; on createTask, failCode 400 "try again later" is a refunded upstream failure), by route.
REFUNDED_CODES = {"legacy": frozenset({531}), "jobs": frozenset({400})}
#: errorCodes a failed generation picks from when the fail_codes knob is empty, by route.
DEFAULT_FAIL_CODES = {"legacy": (500, 501), "jobs": FAIL_CODES}
CREATE_TASK = "POST /api/v1/jobs/createTask"
JOB_POLL = "GET /api/v1/jobs/recordInfo"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")

Handler = Callable[[SimRequest], SimReply]


def number(value: float) -> float | int:
    """A float as an int when it is integral (credit balances)."""
    return int(value) if float(value).is_integer() else value


class Simulator:
    """All simulator state (tasks, counters, limits, uploads) and the logic behind every route."""

    def __init__(self, config: SimConfig | None = None, base_url: str = "http://127.0.0.1:8787",
                 state_file: str | os.PathLike[str] | None = None) -> None:
        """``state_file``: keep tasks, credits and counters in this JSON file and start from it when
        it exists (module ``state``); raises ``StateError`` when it exists but is not simulator state."""
        self.config = config or SimConfig()
        self.config.check()
        self.base_url = base_url
        self.lock = threading.RLock()
        self.stats = Stats()
        self.uploads = UploadStore()
        self.scheduler = Scheduler(self.config.callback_workers)
        self._submit_limiter = RollingLimiter()
        self._poll_limiter = RollingLimiter()
        self.tasks: dict[str, Task] = {}
        self.followups: dict[str, followups.FollowUp] = {}
        self.followup_index: dict[str, str] = {}  # followups.paid_key -> task id (a second WAV/MP4: 409)
        self.takes: dict[str, tuple[Task, Take]] = {}
        self.credits = self.config.credits
        self.rng = random.Random(self.config.seed)
        self._jobs_created = 0
        self._refunds: list[Task] = []  # refunded failures whose refund has not gone back yet
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/api/v1/generate/upload-extend"): self.submit,
            ("GET", "/api/v1/generate/record-info"): self.record_info,
            ("GET", "/api/v1/chat/credit"): self.credit,
            ("POST", "/api/v1/jobs/createTask"): self.create_task,
            ("GET", "/api/v1/jobs/recordInfo"): self.job_record_info,
            ("POST", "/api/file-stream-upload"): lambda r: files.upload_stream(self, r),
            ("POST", "/api/file-base64-upload"): lambda r: files.upload_base64(self, r),
            ("POST", "/api/file-url-upload"): lambda r: files.upload_url(self, r),
            **self._followup_routes(),
            ("GET", "/_sim/stats"): lambda r: json_reply(self.stats_snapshot()),
            ("POST", "/_sim/reset"): self._reset_route,
            ("GET", "/_sim/config"): self._config_route,
            ("POST", "/_sim/config"): self._config_route,
            ("GET", "/_sim/health"): lambda r: envelope(200, "ok", {"tasks": len(self.tasks)}),
        }
        self.state = StateFile(state_file) if state_file else None
        if self.state is not None and self.state.load(self):
            self._refunds = [t for t in self.tasks.values() if t.refund and not t.refunded]
            for task in [*self.tasks.values(), *self.followups.values()]:  # callbacks not gone out yet
                self._schedule_callbacks(task)

    def _followup_routes(self) -> dict[tuple[str, str], Handler]:
        routes: dict[tuple[str, str], Handler] = {}
        for op, (submit_path, record_path) in followups.ROUTES.items():
            if record_path is None:
                routes[("POST", submit_path)] = lambda r: followups.lyrics(self, r)
                continue
            routes[("POST", submit_path)] = functools.partial(followups.submit, self, op)
            routes[("GET", record_path)] = functools.partial(followups.record, self, op)
        return routes

    # ----- dispatch -------------------------------------------------------------------------------

    def route_of(self, req: SimRequest) -> tuple[str, Handler | None]:
        """The stats label of a request and the handler that answers it (None: unknown route)."""
        method = "GET" if req.method == "HEAD" else req.method
        handler = self._routes.get((method, req.path))
        if handler is not None:
            return f"{method} {req.path}", handler
        if method == "GET" and req.path.startswith("/files/followup/"):
            return "GET /files/followup", lambda r: followups.serve_file(self, r)
        if method == "GET" and req.path.startswith("/files/"):
            kind = req.path.split("/")[2]
            return f"GET /files/{kind}", lambda r: files.serve_file(self, r)
        if method == "GET" and req.path.startswith("/uploads/"):
            return "GET /uploads", lambda r: files.serve_upload(self, r)
        if any(path == req.path for _, path in self._routes):
            return f"{method} {req.path}", lambda r: envelope(405, "Method Not Allowed", status=405)
        return f"{method} (unknown)", None

    def handle(self, req: SimRequest) -> SimReply:
        """Answer one request and count it (the `/_sim/` control routes are not counted)."""
        label, handler = self.route_of(req)
        if req.path.startswith("/api/") and self.roll("fault_edge"):
            # A proxy or CDN answering for KIE: no envelope, and KIE never sees the request.
            status = int(self.config.edge_status)
            reply = SimReply(status=status, body=f"<html><body><h1>{status} edge error</h1></body></html>".encode(),
                             content_type="text/html", code=status)
            self.stats.answered(label, reply.code)
            return reply
        reply = handler(req) if handler else envelope(404, "Not Found", status=404)
        if not req.path.startswith("/_sim/"):
            self.stats.answered(label, reply.code)
        return reply

    # ----- helpers --------------------------------------------------------------------------------

    def public_base(self, req: SimRequest) -> str:
        """Base URL for URLs handed out in answers to `req`."""
        return (self.config.public_url or req.base_url or self.base_url).rstrip("/")

    def authenticate(self, req: SimRequest) -> tuple[str, SimReply | None]:
        """The caller's API key, or a 401 reply."""
        auth = req.header("authorization").strip()
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return "", envelope(401, "Unauthorized: missing API key (Authorization: Bearer <key>)")
        if self.config.api_key and key != self.config.api_key:
            return "", envelope(401, "Unauthorized: invalid API key")
        return key, None

    def rate_refusal(self, key: str) -> SimReply | None:
        """The 429 for a new request of ``key`` past the account's rate (one bucket for submissions
        and follow-ups, counted as ``rate_limited``), or None when it fits (it is then counted)."""
        cfg = self.config
        if self._submit_limiter.allow(key, cfg.rate_limit, cfg.rate_window):
            return None
        self.stats.add("rate_limited")
        return envelope(429, f"Rate limit exceeded: at most {cfg.rate_limit} new requests "
                             f"per {cfg.rate_window:g} seconds; this request was not queued")

    def roll(self, knob: str, rng: random.Random | None = None, count: bool = True) -> bool:
        """Draw the fault `knob` (a fraction); count it under `faults` when it fires and `count`."""
        fraction = getattr(self.config, knob)
        if fraction <= 0:
            return False
        with self.lock:
            hit = bool((rng or self.rng).random() < fraction)
        if hit and count:
            self.stats.tally("faults", knob)
        return hit

    def is_own_url(self, url: str, req: SimRequest | None = None) -> bool:
        """Whether `url` points at this simulator."""
        parts = urlsplit(url)
        netloc = parts.netloc.lower()
        own = {urlsplit(self.base_url).netloc.lower()}
        if self.config.public_url:
            own.add(urlsplit(self.config.public_url).netloc.lower())
        if req is not None and req.header("host"):
            own.add(req.header("host").lower())
        if netloc in own:
            return True
        try:
            port = parts.port
        except ValueError:
            return False
        return (parts.hostname or "") in LOOPBACK and port == urlsplit(self.base_url).port

    def source_duration(self, url: str, req: SimRequest | None = None) -> float | None:
        """Nominal duration of a file this simulator serves, None if unknown; SourceFetchError if gone."""
        if not self.is_own_url(url, req):
            return None
        path = urlsplit(url).path
        match = files.SOURCE_RE.match(path)
        if match:
            return float(match.group(1))
        if path.startswith("/uploads/"):
            upload = self.uploads.get(path[len("/uploads/"):], self.upload_ttl())
            if upload is None:
                raise SourceFetchError("uploaded file not found or expired")
            return upload.duration
        key = path.rsplit("/", 1)[-1].split(".")[0]
        found = self.takes.get(key)
        return found[1].duration if found else None

    def upload_ttl(self) -> float:
        """Lifetime of uploads in wall-clock seconds."""
        return self.config.upload_ttl_seconds * self.config.time_factor

    # ----- provider routes ------------------------------------------------------------------------

    def submit(self, req: SimRequest) -> SimReply:
        """`POST /api/v1/generate/upload-extend`."""
        return self._submit(req, "legacy")

    def create_task(self, req: SimRequest) -> SimReply:
        """`POST /api/v1/jobs/createTask`: the same engine, limits and faults; its own validation."""
        return self._submit(req, "jobs")

    def _submit(self, req: SimRequest, route: str) -> SimReply:
        key, denied = self.authenticate(req)
        if denied:
            return denied
        cfg = self.config
        refused = self.rate_refusal(key)
        if refused is not None:
            return refused
        delay = cfg.slow_seconds if self.roll("fault_slow") else 0.0
        reply = self._submit_checked(req, key, route)
        reply.delay = delay
        return reply

    def _submit_checked(self, req: SimRequest, key: str, route: str = "legacy") -> SimReply:
        if self.roll("fault_429"):
            self.stats.add("rate_limited")
            return envelope(429, "Rate limit exceeded; this request was not queued")
        if self.roll("fault_455"):
            return envelope(455, "Service unavailable: system maintenance")
        if self.roll("fault_500"):
            return envelope(500, "Server error, please try again later")
        try:
            body = req.json()
        except ValueError:
            return envelope(422, "request body must be valid JSON")
        validate = validate_create_task if route == "jobs" else validate_submit
        rejection = validate(body, self.config, lambda url: self.source_duration(url, req))
        if rejection:
            return envelope(rejection.code, rejection.msg)
        with self.lock:
            cost = self.config.task_cost
            if self.credits <= 0 or self.credits < cost:
                return envelope(402, "Insufficient credits")
            self.credits -= cost
            task = self._create_task(body, key, self.public_base(req), route)
        self.stats.add("submissions_accepted")
        self.stats.tally("submissions_by_callback_url", task.callback_url)
        self.persist()  # before the answer: an accepted task survives a restart
        self._schedule_callbacks(task)
        reply = envelope(200, "success", {"taskId": task.task_id})
        reply.drop = self.roll("fault_drop_after_accept")
        return reply

    def record_info(self, req: SimRequest) -> SimReply:
        """`GET /api/v1/generate/record-info?taskId=…` (tasks created on this route only)."""
        return self._poll(req, jobs=False)

    def job_record_info(self, req: SimRequest) -> SimReply:
        """`GET /api/v1/jobs/recordInfo?taskId=…` (tasks created through createTask only)."""
        return self._poll(req, jobs=True)

    def _poll(self, req: SimRequest, jobs: bool) -> SimReply:
        _, denied = self.authenticate(req)
        if denied:
            return denied
        task_id = str(req.query.get("taskId", "")).strip()
        if not task_id:
            return envelope(422, "taskId is required")
        self.apply_refunds()
        self.stats.add("polls")
        self.stats.tally("polls_by_task", task_id)
        cfg = self.config
        delay = cfg.slow_seconds if self.roll("fault_slow") else 0.0
        if not self._poll_limiter.allow(task_id, cfg.poll_limit, cfg.poll_window):
            reply = envelope(429, f"Too many requests: at most {cfg.poll_limit} record-info requests "
                                  f"per {cfg.poll_window:g} s per task")
        elif self.roll("fault_poll_500"):
            reply = envelope(500, "Server error, please try again later")
        else:
            task = self.tasks.get(task_id)
            if task is not None and isinstance(task, JobsTask) != jobs:
                task = None  # each route sees only its own tasks
            reply = envelope(200, "success", task.record_info(time.monotonic())) if task else \
                envelope(422, "recordInfo is null")
        reply.delay = delay
        return reply

    def credit(self, req: SimRequest) -> SimReply:
        """`GET /api/v1/chat/credit`: the balance, after the refunds of failures that have shown."""
        _, denied = self.authenticate(req)
        if denied:
            return denied
        self.apply_refunds()
        with self.lock:
            return envelope(200, "success", number(self.credits))

    def apply_refunds(self, now: float | None = None) -> float:
        """Give back the cost of every refunded failure (531, createTask 400) that has shown by
        monotonic time ``now`` (default: now): the balance rises by it once. Returns the credits
        given back by this call."""
        now = time.monotonic() if now is None else now
        back = 0.0
        with self.lock:
            due = [t for t in self._refunds if now - t.created >= t.t_first]
            if not due:
                return 0.0
            for task in due:
                task.refunded = True
                self.credits += task.refund
                back += task.refund
            self._refunds = [t for t in self._refunds if not t.refunded]
        self.stats.add("refunds", len(due))
        self.persist()
        return back

    # ----- tasks and callbacks --------------------------------------------------------------------

    def _create_task(self, body: dict[str, Any], key: str, base: str, route: str = "legacy") -> Task:
        """Create and register a task (caller holds the lock); `route` "jobs" makes a JobsTask."""
        view = legacy_view(body) if route == "jobs" else body
        cfg, rng = self.config, self.rng
        task_rng = random.Random(rng.getrandbits(64))
        task_id = f"{rng.getrandbits(128):032x}"
        total = cfg.complete_seconds
        bounds = [b for b in (cfg.duration_min, cfg.duration_max) if b is not None]
        if bounds:
            total = max(task_rng.uniform(min(bounds), max(bounds)), 0.001)
        scale, tf = total / cfg.complete_seconds, cfg.time_factor
        instrumental = bool(view.get("instrumental") or False)
        now = time.monotonic()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        takes = [Take(id=str(uuid.UUID(int=task_rng.getrandbits(128), version=4)),
                      title=str(view.get("title") or "Extended Audio"), tags=str(view.get("style") or ""),
                      prompt="" if instrumental else str(view.get("prompt") or ""),
                      duration=round(task_rng.uniform(cfg.track_min_seconds, cfg.track_max_seconds), 2),
                      create_time=stamp) for _ in range(2)]
        timeline: dict[str, Any] = dict(task_id=task_id, body=body, api_key=key, base_url=base, created=now,
                                        t_text=None if instrumental else cfg.text_seconds * scale * tf,
                                        t_first=cfg.first_seconds * scale * tf, t_done=total * tf, takes=takes)
        if route == "jobs":
            shape = RESULT_SHAPES[self._jobs_created % len(RESULT_SHAPES)]
            self._jobs_created += 1
            task: Task = JobsTask(**timeline, result_shape=shape, cost=cfg.task_cost, created_wall=time.time())
        else:
            task = Task(**timeline)
        if self.roll("fault_generation_fail", task_rng):
            kind = "jobs" if route == "jobs" else "legacy"
            codes = tuple(int(c) for c in str(cfg.fail_codes or "").split(",") if c.strip()) or DEFAULT_FAIL_CODES[kind]
            task.fail_code = task_rng.choice(codes)
            if task.fail_code in REFUNDED_CODES[kind]:
                task.refund = cfg.task_cost
                self._refunds.append(task)
        elif self.roll("fault_callback_exception", task_rng):
            task.callback_exception = True
        task.empty_stream = self.roll("fault_empty_stream", task_rng, count=False)
        if task.fail_code is None and not task.callback_exception and self.roll("fault_empty_success", task_rng):
            task.empty_success = task_rng.choice(("list", "null"))
        key = cfg.callback_task_id_key
        task.cb_task_key = task_rng.choice(("task_id", "taskId", "top")) if key == "mixed" else key
        for _, stage in task.stages():
            plan = "missing" if self.roll("fault_missing_callback", task_rng, count=False) else \
                "duplicate" if self.roll("fault_duplicate_callback", task_rng, count=False) else "send"
            task.callback_plan[stage] = plan
        self.tasks[task_id] = task
        for take in takes:
            self.takes[take.key] = (task, take)
        return task

    def schedule_callbacks(self, task: Task | followups.FollowUp) -> None:
        """Schedule a task's (or follow-up's) callback stages that have not gone out yet."""
        self._schedule_callbacks(task)

    def _schedule_callbacks(self, task: Task | followups.FollowUp) -> None:
        if not self.config.callbacks or not task.callback_url:  # callBackUrl is optional on createTask
            return
        for elapsed, stage in task.stages():
            if stage not in task.done_stages:
                self.scheduler.call_at(task.created + elapsed, task.task_id,
                                       functools.partial(self._fire, task, stage))

    def _current(self, task: Task | followups.FollowUp) -> bool:
        return self.tasks.get(task.task_id) is task or self.followups.get(task.task_id) is task

    def _fire(self, task: Task | followups.FollowUp, stage: str) -> None:
        """A callback stage is due: send it (or inject the missing/duplicate fault)."""
        if not self._current(task) or not self.config.callbacks:
            return
        plan = task.callback_plan.get(stage, "send")
        if plan == "missing":
            self.stats.tally("faults", "fault_missing_callback")
        else:
            self._attempt(task, stage, 0)
            if plan == "duplicate":
                self.stats.tally("faults", "fault_duplicate_callback")
                self._attempt(task, stage, 0)
        with self.lock:
            task.done_stages.append(stage)
            self.persist()

    def _attempt(self, task: Task | followups.FollowUp, stage: str, retry: int) -> None:
        """One delivery attempt; on failure schedule the next retry or stop the task's callbacks."""
        cfg = self.config
        if task.cb_stopped or not self._current(task):
            return
        ok = post_callback(task.callback_url, task.callback_body(stage), cfg.callback_secret, cfg.callback_timeout)
        if not self._current(task):
            return
        if ok:
            task.cb_failures = 0
            self.stats.add("callbacks_sent")
            self.stats.tally("callbacks_by_type", stage)
            return
        self.stats.add("callbacks_failed")
        task.cb_failures += 1
        if task.cb_failures >= cfg.callback_max_failures:
            task.cb_stopped = True
        elif retry < len(cfg.callback_retry_delays):
            due = time.monotonic() + cfg.callback_retry_delays[retry] * cfg.time_factor
            self.scheduler.call_at(due, task.task_id, functools.partial(self._attempt, task, stage, retry + 1))

    # ----- control --------------------------------------------------------------------------------

    def persist(self) -> None:
        """Write the state file now (no-op without one); module ``state`` says what it holds."""
        if self.state is not None:
            with self.lock:
                self.state.save(self)

    def uploaded(self, upload: Any) -> None:
        """A file was uploaded: its bytes and the state go to disk (with a state file)."""
        if self.state is not None:
            self.state.save_upload(upload)
            self.persist()

    def stats_snapshot(self) -> dict[str, Any]:
        """The `/_sim/stats` document."""
        self.apply_refunds()
        out = self.stats.snapshot()
        with self.lock:
            out["tasks"] = len(self.tasks)
            out["credits"] = number(self.credits)
            out["followups"] = len(self.followups)
        out["followups_paid_twice"] = followups.paid_twice(out.get("followup_paid") or {})
        out["uploads_stored"] = len(self.uploads)
        out["callbacks_pending"] = self.scheduler.pending()
        return out

    def reset(self) -> None:
        """Forget tasks, uploads, counters and limits; restore credits and the random seed."""
        with self.lock:
            self.scheduler.clear()
            self.tasks.clear()
            self.takes.clear()
            self.followups.clear()
            self.followup_index.clear()
            self.uploads.clear()
            self._submit_limiter.clear()
            self._poll_limiter.clear()
            self._jobs_created = 0
            self._refunds = []
            self.stats.reset()
            self.credits = self.config.credits
            self.rng = random.Random(self.config.seed)
            self.persist()

    def update_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """Apply knob changes at run time; returns the masked config. ValueError on bad knobs."""
        with self.lock:
            self.config = self.config.updated(values)
            if "credits" in values:
                self.credits = self.config.credits
                self.persist()
            if "seed" in values:
                self.rng = random.Random(self.config.seed)
            return self.config.public_dict()

    def _reset_route(self, req: SimRequest) -> SimReply:
        self.reset()
        return envelope(200, "reset", None)

    def _config_route(self, req: SimRequest) -> SimReply:
        if req.method == "GET":
            return envelope(200, "success", self.config.public_dict())
        try:
            values = req.json()
            if not isinstance(values, dict):
                raise ValueError("body must be a JSON object of knobs")
            return envelope(200, "success", self.update_config(values))
        except ValueError as exc:
            return envelope(400, str(exc))

    def close(self) -> None:
        """Stop background threads; with a state file, write it a last time (the counters too)."""
        self.scheduler.close()
        self.persist()
