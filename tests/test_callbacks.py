"""KIE's callbacks through ``kie-extend serve``'s app (the ``callbacks`` part, as ``serve
--callbacks-only`` runs it) served for real by uvicorn on a real Runtime and Valkey.

Reference §5.1 (answer 200 fast, callbacks are hints, repeats happen), §5.3 (HMAC headers) and
§8 point 7 (verify, deduplicate, trigger a poll).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import uvicorn

from kie_extend.config import Settings
from kie_extend.http.app import create_app
from kie_extend.http.callbacks import MAX_SKEW, signature_ok
from kie_extend.infra.embedded import free_port
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, serve, sign
from kie_extend.jobs.states import JobState

SECRET = "whk-0123456789abcdef"
TASK = "3f1c9a0b7d2e4c55a8e1b0f6d9c2e711"
FUTURE = 600.0  # seconds ahead: where a job's next step sits before a callback arrives
#: The default cap on a callback body (KIE_HTTP_CALLBACK_MAX_BODY), bytes.
MAX_BODY = Settings.model_fields["http_callback_max_body"].default


def reference_signature(task_id: str, ts: int | str, secret: str = SECRET) -> str:
    """§5.3: base64(HMAC-SHA256(key=webhookHmacKey, message=task_id + "." + timestamp))."""
    mac = hmac.new(secret.encode(), f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def callback_body(task_id: str = TASK, kind: str = "complete", code: int = 200) -> dict[str, Any]:
    """A §5.2 callback: snake_case items under data.data, task_id under data."""
    items = [] if kind in ("text", "error") else [
        {"id": "0b6e5a4c-1f2d-4e3b-9a8c-7d6e5f4a3b21", "audio_url": "https://tempfile.aiquickdraw.com/r/x.mp3",
         "stream_audio_url": "https://musicfile.kie.ai/MGI2", "title": "Demo", "createTime": "2026-10-06 12:01:10",
         "duration": 187.4}]
    return {"code": code, "msg": "All generated successfully.",
            "data": {"callbackType": kind, "task_id": task_id, "data": items}}


def signed_headers(task_id: str = TASK, ts: int | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"X-Webhook-Timestamp": str(ts), "X-Webhook-Signature": reference_signature(task_id, ts, secret)}


@dataclass
class RecordingDispatcher:
    polls: list[str] = field(default_factory=list)
    deliveries: list[tuple[str, str]] = field(default_factory=list)

    def poll(self, job_id: str) -> None:
        self.polls.append(job_id)

    def deliver(self, job_id: str, handler: str) -> None:
        self.deliveries.append((job_id, handler))


@dataclass
class Receiver:
    """``serve``'s callbacks part on a loopback port, with the Runtime it writes through."""

    url: str
    rt: Runtime
    app: Any

    def post(self, job_id: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> requests.Response:
        data = raw if raw is not None else json.dumps(callback_body() if body is None else body).encode()
        return requests.post(f"{self.url}/kie/callback/{job_id}", data=data,
                             headers={"Content-Type": "application/json", **(headers or {})}, timeout=10)

    def due(self, job_id: str) -> float | None:
        return self.rt.redis.zscore(self.rt.keys.due, job_id)

    def stat(self, name: str) -> int:
        return int(self.rt.redis.hget(self.rt.keys.stats, name) or 0)


def _serve(app: Any) -> tuple[str, Callable[[], None]]:
    """Serve the ASGI ``app`` with uvicorn (as ``kie-extend serve`` does) on a free loopback port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="test-callbacks", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def make_receiver(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Receiver]]:
    stops: list[Callable[[], None]] = []

    def build(secret: str | None = None, dispatcher: Any = None, **overrides: Any) -> Receiver:
        settings = make_settings(**({"callback_secret": secret} if secret else {}), **overrides)
        rt = Runtime(settings)
        app = create_app(settings, parts=("callbacks",), runtime=rt, dispatcher=dispatcher)
        url, stop = _serve(app)
        stops.append(stop)
        return Receiver(url, rt, app)

    yield build
    for stop in stops:
        stop()


@pytest.fixture
def receiver(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver()


# ----- job records in each state -----------------------------------------------------------------

def make_queued(rt: Runtime, job_id: str) -> None:
    assert rt.store.transition(job_id, JobState.QUEUED, expect=[None], fields={"created_ts": time.time()},
                               due=time.time() + FUTURE)


def make_submitting(rt: Runtime, job_id: str) -> None:
    make_queued(rt, job_id)
    assert rt.store.transition(job_id, JobState.SUBMITTING, expect=[JobState.QUEUED],
                               fields={"attempts": 1}, due=time.time() + FUTURE)


def make_submitted(rt: Runtime, job_id: str, task_id: str = TASK) -> None:
    make_submitting(rt, job_id)
    assert rt.store.transition(job_id, JobState.SUBMITTED, expect=[JobState.SUBMITTING],
                               fields={"kie_task_id": task_id, "submitted_ts": time.time()},
                               due=time.time() + FUTURE)


def make_failed(rt: Runtime, job_id: str) -> None:
    assert rt.store.transition(job_id, JobState.FAILED, expect=[None],
                               event={"event": "job.failed", "job_id": job_id}, handlers=["redis_stream"])


def make_succeeded(rt: Runtime, job_id: str) -> None:
    make_submitted(rt, job_id)
    assert rt.store.transition(job_id, JobState.SUCCEEDED, expect=[JobState.SUBMITTED],
                               event={"event": "job.succeeded", "job_id": job_id}, handlers=["redis_stream"])


def _received(resp: requests.Response) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {"status": "received"}


# ----- the happy path ------------------------------------------------------------------------------

def test_submitted_job_is_scheduled_now_and_answered_fast(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-a")
    before = receiver.rt.store.get("job-a")
    assert receiver.due("job-a") > time.time() + FUTURE / 2
    started = time.monotonic()
    resp = receiver.post("job-a", callback_body(kind="complete"))
    elapsed = time.monotonic() - started
    _received(resp)
    assert elapsed < 1.0
    assert receiver.due("job-a") <= time.time()
    after = receiver.rt.store.get("job-a")
    # A hint, never trusted: nothing about the outcome changes; only the bookkeeping mark that
    # callbacks reach this job is added.
    assert {k: v for k, v in after.items() if k != "callbacks_seen"} == before
    assert after["callbacks_seen"] == "1"
    assert after["state"] == "submitted"
    assert receiver.stat("callbacks") == 1


@pytest.mark.parametrize("kind", ["complete", "error", "", "someFutureType"])
def test_final_or_unknown_callback_makes_the_poll_due_now(receiver: Receiver, kind: str) -> None:
    make_submitted(receiver.rt, "job-k")
    code = 501 if kind == "error" else 200
    _received(receiver.post("job-k", callback_body(kind=kind, code=code)))
    assert receiver.due("job-k") <= time.time()
    assert receiver.rt.store.get("job-k")["state"] == "submitted"


@pytest.mark.parametrize("kind", ["text", "first"])
def test_progress_callback_is_only_a_hint(receiver: Receiver, kind: str) -> None:
    """text/first: nothing finishes, the job stays on the due schedule; the final callback wakes it."""
    rt = receiver.rt
    make_submitted(rt, "job-p")
    _received(receiver.post("job-p", callback_body(kind=kind)))
    raw = rt.store.get("job-p")
    assert raw["state"] == "submitted" and "tracks" not in raw
    assert receiver.due("job-p") is not None
    assert rt.redis.zcard(rt.keys.deliveries) == 0
    _received(receiver.post("job-p", callback_body(kind="complete")))
    assert receiver.due("job-p") <= time.time()


def test_submitting_job_gets_the_hinted_task_id(receiver: Receiver) -> None:
    make_submitting(receiver.rt, "job-b")
    _received(receiver.post("job-b", callback_body(task_id="hinted-task-1", kind="text")))
    raw = receiver.rt.store.get("job-b")
    assert raw["hint_task_id"] == "hinted-task-1"
    assert raw["state"] == "submitting" and "kie_task_id" not in raw
    assert receiver.due("job-b") <= time.time()


def test_top_level_task_id_is_accepted_as_hint(receiver: Receiver) -> None:
    """§5.2: createTask-route callbacks may carry a top-level taskId instead of data.task_id."""
    make_submitting(receiver.rt, "job-tl")
    _received(receiver.post("job-tl", {"code": 200, "msg": "ok", "taskId": "top-level-7",
                                       "data": {"callbackType": "complete"}}))
    assert receiver.rt.store.get("job-tl")["hint_task_id"] == "top-level-7"


def test_callback_without_task_id_still_triggers_a_poll(receiver: Receiver) -> None:
    make_submitting(receiver.rt, "job-nt")
    _received(receiver.post("job-nt", {"code": 200, "data": {"callbackType": "text"}}))
    assert "hint_task_id" not in receiver.rt.store.get("job-nt")
    assert receiver.due("job-nt") <= time.time()


def test_with_a_dispatcher_the_poll_is_claimed_and_dispatched(make_receiver: Callable[..., Receiver]) -> None:
    dispatcher = RecordingDispatcher()
    rec = make_receiver(dispatcher=dispatcher)
    make_submitted(rec.rt, "job-d")
    now = time.time()
    _received(rec.post("job-d"))
    assert dispatcher.polls == ["job-d"]
    lease = rec.rt.settings.lease
    assert now + lease - 5 <= rec.due("job-d") <= time.time() + lease + 1  # claimed under a lease


# ----- ignored but acknowledged --------------------------------------------------------------------

@pytest.mark.parametrize("make", [make_failed, make_succeeded], ids=["failed", "succeeded"])
def test_terminal_job_is_ignored_but_answered(receiver: Receiver, make: Callable[[Runtime, str], None]) -> None:
    make(receiver.rt, "job-t")
    before = receiver.rt.store.get("job-t")
    _received(receiver.post("job-t"))
    assert receiver.rt.store.get("job-t") == before
    assert receiver.due("job-t") is None
    assert receiver.stat("callbacks") == 0


def test_unknown_job_is_ignored_but_answered(receiver: Receiver) -> None:
    _received(receiver.post("no-such-job"))
    assert receiver.rt.store.get("no-such-job") is None
    assert receiver.due("no-such-job") is None
    assert receiver.rt.redis.zcard(receiver.rt.keys.due) == 0


def test_queued_job_is_not_rescheduled(receiver: Receiver) -> None:
    make_queued(receiver.rt, "job-q")
    due = receiver.due("job-q")
    _received(receiver.post("job-q"))
    assert receiver.due("job-q") == due
    assert receiver.rt.store.get("job-q")["state"] == "queued"


def test_duplicate_pointer_record_is_ignored(receiver: Receiver) -> None:
    assert receiver.rt.store.create_pointer("job-dup", {"duplicate_of": "job-orig"}, ttl=60)
    _received(receiver.post("job-dup"))
    assert receiver.due("job-dup") is None


def test_pipeline_failure_still_answers_200(make_settings: Callable[..., Settings]) -> None:
    class Broken:
        def hint(self, *args: Any) -> bool:
            raise RuntimeError("valkey went away")

    app = create_app(make_settings(), parts=("callbacks",))
    app.state.pipeline = Broken()
    url, stop = _serve(app)
    try:
        _received(requests.post(f"{url}/kie/callback/job-x", json=callback_body(), timeout=10))
    finally:
        stop()


def test_an_unreachable_job_store_still_answers_200(make_settings: Callable[..., Settings]) -> None:
    """Polling stays the source of truth: KIE gets its 200 while the job store is down."""
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=1)
    url, stop = _serve(create_app(settings, parts=("callbacks",)))
    try:
        _received(requests.post(f"{url}/kie/callback/job-x", json=callback_body(), timeout=20))
    finally:
        stop()


# ----- repeats ---------------------------------------------------------------------------------------

def test_repeated_callbacks_are_harmless(receiver: Receiver) -> None:
    rt = receiver.rt
    make_submitted(rt, "job-r")
    make_submitting(rt, "job-s")
    for kind in ("text", "text", "first", "first", "complete", "complete", "complete"):
        _received(receiver.post("job-r", callback_body(kind=kind)))
        _received(receiver.post("job-s", callback_body(kind=kind)))
    raw_r = rt.store.get("job-r")
    assert raw_r["state"] == "submitted" and raw_r["kie_task_id"] == TASK
    raw_s = rt.store.get("job-s")
    assert raw_s["state"] == "submitting" and raw_s["hint_task_id"] == TASK and "kie_task_id" not in raw_s
    assert rt.store.list_ids(JobState.SUBMITTED) == ["job-r"]
    assert rt.store.list_ids(JobState.SUBMITTING) == ["job-s"]
    assert rt.redis.smembers(rt.keys.inflight) == {b"job-r", b"job-s"}
    assert rt.redis.zcard(rt.keys.due) == 2
    assert receiver.due("job-r") <= time.time() and receiver.due("job-s") <= time.time()
    assert rt.redis.zcard(rt.keys.deliveries) == 0  # nothing finished on a callback's word
    assert receiver.stat("callbacks") == 14


def test_duplicate_progress_callback_after_the_final_one_keeps_the_poll_due(receiver: Receiver) -> None:
    """§5.1: repeats happen and order is not guaranteed (a retried 'first' can trail 'complete')."""
    make_submitted(receiver.rt, "job-o")
    _received(receiver.post("job-o", callback_body(kind="complete")))
    assert receiver.due("job-o") <= time.time()
    _received(receiver.post("job-o", callback_body(kind="first")))
    assert receiver.due("job-o") <= time.time()


def test_callback_never_pushes_an_earlier_due_time_later(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-e")
    receiver.rt.store.schedule("job-e", 1000.0)  # long overdue
    _received(receiver.post("job-e"))
    assert receiver.due("job-e") == 1000.0


# ----- signatures (§5.3) ---------------------------------------------------------------------------

@pytest.fixture
def signed(make_receiver: Callable[..., Receiver]) -> Receiver:
    rec = make_receiver(secret=SECRET)
    make_submitted(rec.rt, "job-h")
    return rec


def test_valid_signature_is_accepted(signed: Receiver) -> None:
    _received(signed.post("job-h", headers=signed_headers()))
    assert signed.due("job-h") <= time.time()


def test_signature_headers_are_case_insensitive(signed: Receiver) -> None:
    headers = {k.lower(): v for k, v in signed_headers().items()}
    _received(signed.post("job-h", headers=headers))


def test_reference_construction_matches_the_simulator_and_serve() -> None:
    ts = int(time.time())
    body = callback_body()
    assert sign(TASK, ts, SECRET) == reference_signature(TASK, ts)
    headers = {k.lower(): v for k, v in signed_headers(ts=ts).items()}
    assert signature_ok(body, headers, SECRET)
    top = {"taskId": TASK, "data": {"callbackType": "complete"}}
    assert signature_ok(top, headers, SECRET)
    assert not signature_ok(body, headers, SECRET + "x")
    assert signature_ok(body, headers, SECRET, now=ts + MAX_SKEW)
    assert not signature_ok(body, headers, SECRET, now=ts + MAX_SKEW + 1)


BAD_SIGNATURES: dict[str, Callable[[], dict[str, str]]] = {
    "missing": lambda: {},
    "only timestamp": lambda: {"X-Webhook-Timestamp": str(int(time.time()))},
    "only signature": lambda: {"X-Webhook-Signature": reference_signature(TASK, int(time.time()))},
    "wrong secret": lambda: signed_headers(secret="other-secret"),
    "other task": lambda: signed_headers(task_id="another-task"),
    "tampered": lambda: {**signed_headers(), "X-Webhook-Signature": "AAAA" + signed_headers()["X-Webhook-Signature"][4:]},
    "stale": lambda: signed_headers(ts=int(time.time()) - MAX_SKEW - 30),
    "from the future": lambda: signed_headers(ts=int(time.time()) + MAX_SKEW + 30),
    "non-numeric timestamp": lambda: {**signed_headers(), "X-Webhook-Timestamp": "yesterday"},
    "hex signature": lambda: {**signed_headers(), "X-Webhook-Signature": hmac.new(
        SECRET.encode(), f"{TASK}.{int(time.time())}".encode(), hashlib.sha256).hexdigest()},
}


@pytest.mark.parametrize("make_headers", list(BAD_SIGNATURES.values()), ids=list(BAD_SIGNATURES))
def test_bad_signature_is_refused_and_nothing_scheduled(signed: Receiver,
                                                        make_headers: Callable[[], dict[str, str]]) -> None:
    before = signed.rt.store.get("job-h")
    due = signed.due("job-h")
    resp = signed.post("job-h", headers=make_headers())
    assert resp.status_code == 401
    assert signed.due("job-h") == due
    assert signed.rt.store.get("job-h") == before
    assert signed.stat("callbacks") == 0


def test_signature_without_task_id_in_body_is_refused(make_receiver: Callable[..., Receiver]) -> None:
    rec = make_receiver(secret=SECRET)
    make_submitting(rec.rt, "job-n")
    resp = rec.post("job-n", {"code": 200, "data": {"callbackType": "text"}}, headers=signed_headers())
    assert resp.status_code == 401
    assert "hint_task_id" not in rec.rt.store.get("job-n")


def test_without_a_secret_signature_headers_are_not_required(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-u")
    _received(receiver.post("job-u", headers={"X-Webhook-Signature": "garbage"}))
    assert receiver.due("job-u") <= time.time()


# ----- malformed requests --------------------------------------------------------------------------

def test_body_over_the_cap_is_413(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-big")
    due = receiver.due("job-big")
    resp = receiver.post("job-big", raw=b" " * (MAX_BODY + 1))
    assert resp.status_code == 413
    assert receiver.due("job-big") == due


def test_body_at_the_cap_is_accepted(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-cap")
    body = callback_body()
    body["padding"] = ""
    size = len(json.dumps(body).encode())
    body["padding"] = "x" * (MAX_BODY - size)
    raw = json.dumps(body).encode()
    assert len(raw) == MAX_BODY
    _received(receiver.post("job-cap", raw=raw))
    assert receiver.due("job-cap") <= time.time()


def test_chunked_body_is_read(receiver: Receiver) -> None:
    """A chunked body is read whole; the cap still applies while it is read (http/limits.py)."""
    make_submitting(receiver.rt, "job-ch")
    payload = json.dumps(callback_body(task_id="chunked-task")).encode()
    resp = requests.post(f"{receiver.url}/kie/callback/job-ch", data=iter([payload[:10], payload[10:]]),
                         headers={"Content-Type": "application/json"}, timeout=10)
    _received(resp)
    assert receiver.rt.store.get("job-ch")["hint_task_id"] == "chunked-task"
    big = requests.post(f"{receiver.url}/kie/callback/job-ch", data=iter([b" " * MAX_BODY, b" "]), timeout=10)
    assert big.status_code == 413


@pytest.mark.parametrize("raw", [b"not json", b"{\"code\": 200", b"[1, 2]", b"\"text\"", b"\xff\xfe{}", b"null"],
                         ids=["text", "truncated", "array", "string", "bad-utf8", "null"])
def test_non_json_object_is_400(receiver: Receiver, raw: bytes) -> None:
    make_submitted(receiver.rt, "job-j")
    due = receiver.due("job-j")
    resp = receiver.post("job-j", raw=raw)
    assert resp.status_code == 400
    assert receiver.due("job-j") == due


def test_empty_body_is_an_empty_hint(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-0")
    _received(receiver.post("job-0", raw=b""))
    assert receiver.due("job-0") <= time.time()


def test_healthz_and_routing(receiver: Receiver) -> None:
    for live in ("/healthz", "/livez"):
        health = requests.get(f"{receiver.url}{live}", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert requests.get(f"{receiver.url}/kie/callback/job-1", timeout=5).status_code == 405
    assert requests.post(f"{receiver.url}/kie/callback/", json={}, timeout=5).status_code == 404
    assert requests.post(f"{receiver.url}/kie/callback/a%20b", json={}, timeout=5).status_code == 404
    assert requests.post(f"{receiver.url}/kie/callback/{'x' * 129}", json={}, timeout=5).status_code == 404
    assert requests.post(f"{receiver.url}/elsewhere", json={}, timeout=5).status_code == 404
    for elsewhere in ("/v1/system", "/openapi.json", "/docs", "/"):  # callbacks only: no API, no dashboard
        assert requests.get(f"{receiver.url}{elsewhere}", timeout=5).status_code == 404, elsewhere
    _received(requests.post(f"{receiver.url}/kie/callback/job-1/", json={}, timeout=5, allow_redirects=False))


def test_metrics_route(receiver: Receiver) -> None:
    make_submitted(receiver.rt, "job-m")
    _received(receiver.post("job-m"))
    resp = requests.get(f"{receiver.url}/metrics", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    lines = resp.text.splitlines()
    assert "kie_extend_callbacks_total 1" in lines and 'kie_extend_jobs{state="submitted"} 1' in lines


# ----- the simulator's real callbacks ----------------------------------------------------------------

def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("sim_secret", [SECRET, "not-the-receivers-secret"], ids=["same-key", "other-key"])
def test_simulator_callbacks_reach_serve(make_receiver: Callable[..., Receiver], sim_secret: str) -> None:
    rec = make_receiver(secret=SECRET)
    knobs = {"time_factor": 0.005, "callback_secret": sim_secret, "callback_retry_delays": (), "seed": 3}
    with serve(SimConfig(**knobs)) as sim:
        body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
                "continueAt": 10, "model": "V5", "prompt": "la", "style": "folk", "title": "t",
                "callBackUrl": f"{rec.url}/kie/callback/job-sim"}
        make_submitted(rec.rt, "job-sim", task_id="not-known-yet")  # before the first callback can arrive
        answer = requests.post(f"{sim.url}/api/v1/generate/upload-extend", json=body,
                               headers={"Authorization": "Bearer k"}, timeout=10).json()
        assert answer["code"] == 200
        done = lambda: sum(sim.simulator.stats_snapshot().get(k, 0) for k in ("callbacks_sent", "callbacks_failed")) >= 3  # noqa: E731
        assert _wait(done)
        stats = sim.simulator.stats_snapshot()
    if sim_secret == SECRET:
        assert stats.get("callbacks_sent") == 3 and not stats.get("callbacks_failed")
        assert rec.stat("callbacks") == 3
        assert rec.due("job-sim") <= time.time()
    else:
        assert stats.get("callbacks_failed") == 3 and not stats.get("callbacks_sent")
        assert rec.stat("callbacks") == 0
        assert rec.due("job-sim") > time.time()
    assert rec.rt.store.get("job-sim")["state"] == "submitted"
