"""The JSON API under /v1 against a real uvicorn server, our own Valkey and the simulator.

Jobs sent through ``POST /v1/jobs`` land in the broker (a Redis list named after the queue); the
tests read those messages back and hand them to the pipeline in this process (tests/inline.py),
so a job's whole life runs without a Celery worker.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from inline import Harness
from kie_extend import api
from kie_extend.config import Settings
from kie_extend.infra.embedded import EmbeddedValkey, free_port
from kie_extend.errors import ValidationError
from kie_extend.http.app import create_app, openapi_text
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve

ROOT = Path(__file__).resolve().parent.parent
WRITE = "w-" + uuid.uuid4().hex
READ = "r-" + uuid.uuid4().hex


class Served:
    """An ASGI app on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Stack:
    url: str
    settings: Settings
    rt: Runtime
    h: Harness
    sim: SimServer

    def call(self, method: str, path: str, token: str | None = WRITE, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        return requests.request(method, self.url + path, headers=headers, timeout=10, **kw)

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        """``(job_id, kwargs)`` of every message waiting in the broker."""
        out = []
        for raw in self.rt.redis.lrange(self.settings.queue, 0, -1):
            message = json.loads(raw)
            _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            out.append((message["headers"]["id"], kwargs))
        return out[::-1]  # LPUSH: oldest last

    def consume(self) -> list[str]:
        """Take every waiting message and accept it in this process, as a worker would."""
        taken = self.messages()
        self.rt.redis.delete(self.settings.queue)
        for job_id, kw in taken:
            self.h.pipeline.accept(job_id, kw.pop("request"), kw.pop("idempotency_key", None),
                                   kw.pop("metadata", None), **kw)
        self.h.drain()
        return [j for j, _ in taken]

    def state(self, job_id: str) -> str:
        return (self.rt.store.get(job_id) or {}).get("state", "not_found")


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=11, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def stack(make_settings: Callable[..., Settings], sim: SimServer) -> Iterator[Stack]:
    settings = make_settings(api_tokens=f"{WRITE},read:{READ}", base_url=sim.url, poll_first=0.2,
                             poll_interval=0.2, poll_max_interval=0.3, poll_min_gap=0.0, handler_retry_base=0.05,
                             lease=5, connect_timeout=1, read_timeout=3, poll_callback_interval=0.4,
                             http_auth_failures=(10_000, 60.0))  # these tests present many wrong tokens on purpose
    rt = Runtime(settings)
    h = Harness(rt, sim)
    served = Served(create_app(settings, runtime=rt, dispatcher=h.dispatch))
    try:
        yield Stack(served.url, settings, rt, h, sim)
    finally:
        served.stop()


def req(sim: SimServer, **extra: Any) -> dict[str, Any]:
    body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Song"}
    body.update(extra)
    return body


# ----- auth -------------------------------------------------------------------------------------

READS = [("GET", "/v1/jobs/x"), ("GET", "/v1/jobs"), ("GET", "/v1/batches"), ("GET", "/v1/batches/b"),
         ("GET", "/v1/system")]
WRITES = [("POST", "/v1/jobs"), ("POST", "/v1/jobs/x/cancel"), ("POST", "/v1/jobs/x/retry"),
          ("POST", "/v1/batches/b/cancel"), ("POST", "/v1/pause"), ("POST", "/v1/resume")]


def test_every_route_needs_a_token_and_writes_need_a_write_token(stack: Stack) -> None:
    for method, path in READS + WRITES:
        for token in (None, "nope", WRITE + "x", READ[:-1]):
            r = stack.call(method, path, token=token, json={"request": req(stack.sim)})
            assert r.status_code == 401, (method, path, token, r.text)
            assert r.json()["error"]["kind"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        r = requests.request(method, stack.url + path, headers={"Authorization": f"Basic {WRITE}"}, timeout=10)
        assert r.status_code == 401
    for method, path in WRITES:
        r = stack.call(method, path, token=READ, json={"request": req(stack.sim)})
        assert r.status_code == 403, (path, r.text)
        assert r.json() == {"error": {"kind": "forbidden", "message": "this token is read-only"}}
    for method, path in READS:
        assert stack.call(method, path, token=READ).status_code in (200, 404), path
    assert stack.call("GET", "/v1/system", token=READ).status_code == 200
    assert stack.messages() == []  # neither the 401s nor the 403s enqueued anything
    assert stack.rt.gates.operator_paused() is None
    # The callback path stays open, and health and the OpenAPI document need no token.
    assert requests.post(stack.url + "/kie/callback/x", json={}, timeout=5).status_code == 200
    assert requests.get(stack.url + "/openapi.json", timeout=5).status_code == 200


def test_tokens_never_reach_logs(stack: Stack, capfd: pytest.CaptureFixture[str]) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not record.name.startswith("urllib3"):  # this test's own client logs its URLs
                records.append(record)

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        stack.call("GET", "/v1/system")
        stack.call("GET", "/v1/system", token=READ)
        stack.call("POST", "/v1/jobs", token=READ, json={})
        stack.call("GET", "/v1/system", token=WRITE + "-wrong")
        stack.call("POST", "/v1/jobs", json={"request": {"model": "nope"}, "metadata": WRITE})
        stack.call("POST", "/v1/jobs", data=b"{not json " + WRITE.encode())
        stack.call("GET", f"/v1/jobs?cursor={WRITE}")
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    out, err = capfd.readouterr()
    text = out + err + "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for token in (WRITE, READ):
        assert token not in text
        assert token[2:14] not in text


# ----- submit -------------------------------------------------------------------------------------

def test_submit_one_job_and_follow_it_to_success(stack: Stack) -> None:
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "idempotency_key": "k-1",
                                             "metadata": {"order": 7}, "tenant": "shop", "priority": 7})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert list(r.json()) == ["job_id"]
    [(sent_id, kwargs)] = stack.messages()
    assert sent_id == job_id and kwargs["tenant"] == "shop" and kwargs["priority"] == 7
    assert kwargs["metadata"] == {"order": 7} and kwargs["idempotency_key"] == "k-1"
    assert stack.call("GET", f"/v1/jobs/{job_id}", token=READ).json()["state"] == "not_found"  # still in the broker
    stack.consume()
    stack.h.run_until(stack.h.finished(job_id))
    rec = stack.call("GET", f"/v1/jobs/{job_id}", token=READ).json()
    assert rec["state"] == "succeeded" and rec["tenant"] == "shop" and rec["priority"] == 7
    assert rec["metadata"] == {"order": 7} and len(rec["tracks"]) == 2 and rec["tracks"][0]["audio_url"]
    assert rec == api.get_job(job_id, settings=stack.settings)
    assert stack.sim.simulator.stats_snapshot()["submissions_accepted"] == 1

    r = stack.call("GET", "/v1/jobs/no-such-job")
    assert r.status_code == 404 and r.json()["state"] == "not_found" and r.json()["job_id"] == "no-such-job"


def test_explicit_job_id_and_409_when_taken(stack: Stack) -> None:
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "job_id": "order-42"})
    assert r.status_code == 202 and r.json() == {"job_id": "order-42"}
    stack.consume()
    # The same submission again (a retry whose answer was lost): the same id, nothing sent twice.
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "job_id": "order-42"})
    assert r.status_code == 202 and r.json() == {"job_id": "order-42"} and stack.messages() == []
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, title="Other"), "job_id": "order-42"})
    assert r.status_code == 409 and r.json()["error"]["kind"] == "job_exists"
    assert r.json()["error"]["errors"][0]["field"] == "job_id" and "already exists" in r.json()["error"]["message"]
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim), "job_id": "fresh-1"},
                                                      {"request": req(stack.sim, title="Other"), "job_id": "order-42"}]})
    assert r.status_code == 409
    assert stack.messages() == []
    # fresh-1's claim was given back with the refusal: another request may take the id.
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, title="Third"), "job_id": "fresh-1"})
    assert r.status_code == 202


BAD = {"model": "V9", "continueAt": -3, "uploadUrl": "ftp://example.org/a.mp3", "title": "x" * 300}


def test_422_lists_every_field_error_exactly_as_the_python_api_and_enqueues_nothing(stack: Stack) -> None:
    opts = {"tenant": "not a tenant!", "priority": 12, "metadata": "nope", "not_after": "tomorrow"}
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, **BAD), **opts})
    assert r.status_code == 422
    err = r.json()["error"]
    with pytest.raises(ValidationError) as info:
        api.enqueue_extend(req(stack.sim, **BAD), settings=stack.settings, **opts)  # type: ignore[arg-type]
    assert err["kind"] == "invalid_request" and err["errors"] == info.value.errors
    fields = {e["field"] for e in err["errors"]}
    assert {"tenant", "priority", "metadata", "not_after"} <= fields and len(fields) >= 7
    assert any(f.endswith("model") for f in fields) and any(f.endswith("continueAt") for f in fields)

    # A list: one bad item spoils all; the errors are enqueue_many's, item by item.
    items = [{"request": req(stack.sim)}, {"request": req(stack.sim, model="V9")},
             {"request": req(stack.sim), "priority": -1}]
    r = stack.call("POST", "/v1/jobs", json={"jobs": items, "batch_id": "spoilt"})
    assert r.status_code == 422
    with pytest.raises(ValidationError) as info:
        api.enqueue_many(items, settings=stack.settings, batch_id="spoilt")
    assert r.json()["error"]["errors"] == info.value.errors
    assert {e["field"].split(".")[0] for e in info.value.errors} == {"[1]", "[2]"}

    # Fields the Python API has no keyword for are named too, beside the rest; a server-side
    # path (audio_file) is no input over HTTP.
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, model="V9"), "colour": "red",
                                             "audio_file": "/etc/passwd", "job_id": "bad id!"})
    errs = r.json()["error"]["errors"]
    assert r.status_code == 422 and {"colour", "audio_file", "job_id"} <= {e["field"] for e in errs}
    assert any(e["field"].endswith("model") for e in errs)
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim), "audio_file": "/etc/passwd"}]})
    assert r.status_code == 422 and r.json()["error"]["errors"] == [{"field": "[0].audio_file", "message":
        "unknown field; accepted: request, idempotency_key, metadata, tenant, priority, batch_id, not_after, steps, takes, job_id"}]
    for body, field in ((b"[1, 2]", "body"), (b"{oops", "body"), (json.dumps({"jobs": []}).encode(), "jobs"),
                        (json.dumps({"jobs": "x"}).encode(), "jobs")):
        r = stack.call("POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == field, body
    r = stack.call("POST", "/v1/jobs", json={"idempotency_key": "k"})  # no request at all
    assert r.status_code == 422 and any(e["field"].startswith("request") or e["field"] == "uploadUrl"
                                        for e in r.json()["error"]["errors"])

    assert stack.messages() == []  # nothing reached the broker
    assert stack.call("GET", "/v1/batches/spoilt").status_code == 404  # no batch was declared
    assert stack.call("GET", "/v1/jobs").json() == {"jobs": [], "next_cursor": None}


def test_submit_many_in_one_request(stack: Stack) -> None:
    items = [{"request": req(stack.sim), "tenant": "a"}, {"request": req(stack.sim), "job_id": "many-2"},
             {"request": req(stack.sim), "priority": 9}]
    r = stack.call("POST", "/v1/jobs", json={"jobs": items, "batch_id": "album", "tenant": "b", "priority": 3})
    assert r.status_code == 202, r.text
    ids = r.json()["job_ids"]
    assert len(ids) == 3 and ids[1] == "many-2"
    sent = dict(stack.messages())
    assert [sent[i]["tenant"] for i in ids] == ["a", "b", "b"] and [sent[i]["priority"] for i in ids] == [3, 3, 9]
    assert all(sent[i]["batch_id"] == "album" for i in ids)
    batch = stack.call("GET", "/v1/batches/album", token=READ).json()
    assert batch["total"] == 3 and batch["counts"] == {"pending": 3} and not batch["finished"]
    listed = stack.call("GET", "/v1/jobs?batch_id=album&state=pending", token=READ).json()
    assert sorted(j["job_id"] for j in listed["jobs"]) == sorted(ids) and listed["next_cursor"] is None
    assert {j["state"] for j in listed["jobs"]} == {"pending"}
    stack.consume()
    assert stack.call("GET", "/v1/jobs?batch_id=album&state=pending", token=READ).json()["jobs"] == []
    assert len(stack.call("GET", "/v1/jobs?batch_id=album&tenant=b", token=READ).json()["jobs"]) == 2


# ----- listing ------------------------------------------------------------------------------------

def pages(stack: Stack, query: str, limit: int) -> list[list[dict[str, Any]]]:
    out, cursor = [], None
    while True:
        q = f"{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        r = stack.call("GET", f"/v1/jobs?{q}", token=READ)
        assert r.status_code == 200, r.text
        out.append(r.json()["jobs"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out
        assert len(out) < 100


def test_pagination_newest_first_across_pages_with_filters(stack: Stack) -> None:
    stack.rt.gates.pause_operator("hold")  # every job stays queued until cancelled
    ids = {}
    for i in range(23):
        tenant = "a" if i % 3 else "b"
        r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "tenant": tenant,
                                                 "job_id": f"job-{i:02d}"})
        ids[f"job-{i:02d}"] = tenant
        stack.consume()
        time.sleep(0.002)  # distinct creation times
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim)} for _ in range(12)],
                                             "batch_id": "b-12", "tenant": "c"})
    batch_ids = r.json()["job_ids"]
    stack.consume()
    for job_id in ("job-03", "job-04", "job-05"):
        assert stack.call("POST", f"/v1/jobs/{job_id}/cancel").status_code == 200

    newest_first = sorted(ids, reverse=True)  # ids ascend with creation time
    # All jobs, every state: the batch's 12 are newest.
    got = pages(stack, "x=1", 5)
    flat = [j["job_id"] for p in got for j in p]
    assert flat[12:] == newest_first and set(flat[:12]) == set(batch_ids) and len(got) == 7
    assert all(len(p) == 5 for p in got[:-1]) and len(got[-1]) == 35 - 30
    # One state and one tenant.
    got = pages(stack, "state=queued&tenant=a", 4)
    want = [j for j in newest_first if ids[j] == "a" and j not in ("job-04", "job-05")]
    assert [j["job_id"] for p in got for j in p] == want and len(want) == 13
    assert all(j["state"] == "queued" and j["tenant"] == "a" for p in got for j in p)
    got = pages(stack, "state=cancelled", 2)
    assert [j["job_id"] for p in got for j in p] == ["job-05", "job-04", "job-03"]
    assert got[-1] and len(got) == 2  # a full last page carries no cursor
    # A batch whose jobs share one creation time: every one exactly once.
    got = pages(stack, "batch_id=b-12", 5)
    flat = [j["job_id"] for p in got for j in p]
    assert sorted(flat) == sorted(batch_ids) and len(flat) == 12 and [len(p) for p in got] == [5, 5, 2]
    assert pages(stack, "batch_id=b-12&tenant=a", 5) == [[]]

    # A job leaving its state between pages neither repeats nor shifts the rest.
    first = stack.call("GET", "/v1/jobs?state=queued&limit=6", token=READ).json()
    stack.call("POST", f"/v1/jobs/{first['jobs'][-1]['job_id']}/cancel")
    rest = pages(stack, f"state=queued&cursor={first['next_cursor']}", 50)
    seen = [j["job_id"] for j in first["jobs"]] + [j["job_id"] for p in rest for j in p]
    assert len(seen) == len(set(seen)) == 12 + 23 - 3

    for q, field in (("limit=0", "limit"), ("limit=501", "limit"), ("cursor=%21%21", "cursor"),
                     ("state=done", "state"), ("state=pending", "state")):
        r = stack.call("GET", f"/v1/jobs?{q}", token=READ)
        assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == field, q


# ----- cancel, retry, batches ---------------------------------------------------------------------

def test_cancel_flow(stack: Stack) -> None:
    stack.rt.gates.pause_operator()
    job = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim)}).json()["job_id"]
    stack.consume()
    assert stack.state(job) == "queued"
    r = stack.call("POST", f"/v1/jobs/{job}/cancel")
    assert r.status_code == 200 and r.json() == {"job_id": job, "outcome": "cancelled"}
    assert stack.state(job) == "cancelled"
    r = stack.call("POST", f"/v1/jobs/{job}/cancel")
    assert r.status_code == 409 and r.json()["error"]["kind"] == "finished" and "cancelled" in r.text
    r = stack.call("POST", "/v1/jobs/nobody/cancel")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"

    stack.rt.gates.resume_operator()
    sent = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim)}).json()["job_id"]
    stack.consume()
    stack.h.run_until(lambda: stack.state(sent) in ("submitted", "succeeded"))
    r = stack.call("POST", f"/v1/jobs/{sent}/cancel")
    assert r.status_code == 409 and r.json()["error"]["kind"] in ("too_late", "finished")
    if r.json()["error"]["kind"] == "too_late":
        assert "no cancel call" in r.json()["error"]["message"]
    stack.h.run_until(stack.h.finished(sent))
    assert stack.state(sent) == "succeeded"


def test_retry_flow(stack: Stack) -> None:
    stack.sim.simulator.update_config({"fault_generation_fail": 1.0})
    job = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim)}).json()["job_id"]
    stack.consume()
    stack.h.run_until(stack.h.finished(job))
    assert stack.call("GET", f"/v1/jobs/{job}").json()["error"]["kind"] == "generation_failed"
    stack.sim.simulator.update_config({"fault_generation_fail": 0.0})
    r = stack.call("POST", f"/v1/jobs/{job}/retry")
    assert r.status_code == 200 and r.json() == {"job_id": job, "outcome": "queued"}
    assert stack.state(job) == "queued"
    stack.h.run_until(lambda: stack.state(job) == "succeeded")
    r = stack.call("POST", f"/v1/jobs/{job}/retry")
    assert r.status_code == 409 and r.json()["error"]["kind"] == "not_retryable" and "succeeded" in r.text
    assert stack.call("POST", "/v1/jobs/nobody/retry").status_code == 404
    assert stack.sim.simulator.stats_snapshot()["submissions_accepted"] == 2


def test_batch_routes(stack: Stack) -> None:
    stack.rt.gates.pause_operator()
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim)} for _ in range(4)],
                                             "batch_id": "bb"})
    ids = r.json()["job_ids"]
    stack.consume()
    got = stack.call("GET", "/v1/batches/bb", token=READ).json()
    assert got["batch_id"] == "bb" and got["total"] == 4 and got["counts"] == {"queued": 4}
    listed = stack.call("GET", "/v1/batches", token=READ).json()["batches"]
    assert [b["batch_id"] for b in listed] == ["bb"]
    r = stack.call("POST", "/v1/batches/bb/cancel")
    assert r.status_code == 200 and r.json() == {"batch_id": "bb", "cancelled": 4}
    got = stack.call("GET", "/v1/batches/bb", token=READ).json()
    assert got["counts"] == {"cancelled": 4} and got["finished"] and got["cancelled"]
    assert all(stack.state(j) == "cancelled" for j in ids)
    assert stack.call("POST", "/v1/batches/bb/cancel").json()["cancelled"] == 0
    for method, path in (("GET", "/v1/batches/none"), ("POST", "/v1/batches/none/cancel")):
        r = stack.call(method, path)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    assert [b["batch_id"] for b in stack.call("GET", "/v1/batches").json()["batches"]] == ["bb"]  # none made


def test_pause_resume_and_system(stack: Stack) -> None:
    view = stack.call("GET", "/v1/system", token=READ).json()
    assert view["operator_paused"] is None and view["paused"] is None and view["rate_limit"] == "20/10s"
    assert {"in_flight", "max_in_flight", "rate_window_use", "breaker", "redis_memory", "waiting_by_priority",
            "waiting_by_tenant", "jobs"} <= set(view)
    r = stack.call("POST", "/v1/pause", json={"reason": "maintenance"})
    assert r.status_code == 200 and r.json()["operator_paused"]["reason"] == "maintenance"
    view = stack.call("GET", "/v1/system", token=READ).json()
    assert view["operator_paused"]["reason"] == "maintenance" and view["paused"] is None
    for tenant in ("x", "x", "y"):
        stack.call("POST", "/v1/jobs", json={"request": req(stack.sim), "tenant": tenant, "priority": 8})
    stack.consume()
    view = stack.call("GET", "/v1/system", token=READ).json()
    assert view["waiting_by_priority"] == {"8": {"x": 2, "y": 1}} and view["waiting_by_tenant"] == {"x": 2, "y": 1}
    assert view["jobs"]["queued"] == 3 and view["in_flight"] == 0
    stack.rt.gates.pause(402, "credits exhausted")  # the provider's pause shows apart
    view = stack.call("GET", "/v1/system", token=READ).json()
    assert view["paused"]["code"] in (402, "402") and view["operator_paused"]["reason"] == "maintenance"
    stack.rt.gates.resume()
    r = stack.call("POST", "/v1/resume")
    assert r.status_code == 200 and r.json() == {"resumed": True, "operator_paused": None}
    assert stack.call("POST", "/v1/resume").json()["resumed"] is False
    assert stack.call("GET", "/v1/system").json()["operator_paused"] is None
    assert stack.call("POST", "/v1/pause").status_code == 200  # no body: no reason
    r = stack.call("POST", "/v1/pause", json={"reason": 5, "why": "x"})
    assert r.status_code == 422 and {e["field"] for e in r.json()["error"]["errors"]} == {"reason", "why"}


def test_an_unavailable_job_store_is_a_json_503(make_settings: Callable[..., Settings],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Every route of the app while Redis is down: 503 (JSON for the API, HTML for the dashboard),
    one throttled WARNING line, never "Exception in ASGI application" or a traceback."""
    settings = make_settings(redis_url=f"redis://:s3cret@127.0.0.1:{free_port()}/0", api_tokens=WRITE,
                             redis_socket_timeout=1)
    app = create_app(settings)
    served = Served(app)
    caplog.set_level(logging.INFO)
    auth = {"Authorization": f"Bearer {WRITE}"}
    try:
        for method, path in (("GET", "/v1/system"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                             ("POST", "/v1/jobs/x/cancel")):
            r = requests.request(method, served.url + path, headers=auth, timeout=20)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["kind"] == "unavailable" and WRITE not in r.text
            assert r.headers["retry-after"] == "5"
        # Every other route too, found from the app itself (path parameters filled in); dashboard
        # routes in a logged-in session whose CSRF token comes from the 503 page's logout form.
        browser = requests.Session()
        r = browser.post(served.url + "/login", data={"token": WRITE, "next": "/"}, headers={"Origin": served.url})
        assert r.status_code == 503 and "Job store unreachable" in r.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]
        sample = {"job_id": "j-1", "batch_id": "b-1", "n": "0"}
        seen = 0
        for path, methods in _routes(app):
            # /v1/tenants reads the settings alone (the tenants file, read at start), never the store.
            if path in ("/healthz", "/livez", "/readyz", "/docs", "/openapi.json", "/login", "/logout",
                        "/v1/tenants") or \
                    path.startswith(("/static", "/docs")):
                continue
            url = served.url + re.sub(r"\{(\w+)\}", lambda m: sample.get(m.group(1), "x"), path)
            for method in (m for m in methods if m in ("GET", "POST")):
                body: Any = None
                if path == "/v1/jobs" and method == "POST":
                    body = {"request": {"uploadUrl": "https://example.com/a.mp3", "defaultParamFlag": False,
                                        "model": "V5"}}
                elif path == "/v1/batches" and method == "POST":
                    body = {"jobs": [{"request": {"uploadUrl": "https://example.com/a.mp3",
                                                  "defaultParamFlag": False, "model": "V5"}}]}
                if path.startswith(("/v1", "/kie", "/metrics")):
                    r = requests.request(method, url, headers=auth, json=body, timeout=20, allow_redirects=False)
                else:
                    r = browser.request(method, url, data={"csrf": csrf} if method == "POST" else None,
                                        headers={"Origin": served.url}, timeout=20, allow_redirects=False)
                    assert r.status_code == 503 and "Job store unreachable" in r.text, (method, path, r.status_code)
                seen += 1
                if path.startswith("/kie/callback/"):  # KIE gets its 200 anyway; polling finds the result
                    assert r.status_code == 200, r.text
                    continue
                assert r.status_code in (503, 403, 422), (method, path, r.status_code, r.text[:300])
                if path.startswith(("/v1", "/kie", "/metrics")):
                    assert r.status_code != 503 or r.json()["error"]["kind"] == "unavailable"
                assert "s3cret" not in r.text
        assert seen >= 20, seen
        messages = [rec.getMessage() for rec in caplog.records]
        assert not any("Exception in ASGI application" in m or "unexpected error" in m for m in messages), messages
        assert not any(rec.exc_info for rec in caplog.records if rec.levelno >= logging.WARNING)
        warned = [m for m in messages if m.startswith("job store unavailable")]
        assert len(warned) == 1, warned  # throttled: one line per 10 s, not one per request
    finally:
        served.stop()


def _routes(app: Any) -> list[tuple[str, list[str]]]:
    """``(path, methods)`` of every route: the API's from the OpenAPI document (its routers are
    included lazily), the others (dashboard, callbacks, probes) from the app's own list."""
    found = {p: [m.upper() for m in ops] for p, ops in app.openapi()["paths"].items()}
    for route in app.routes:
        if getattr(route, "path", None) and getattr(route, "methods", None):
            found.setdefault(route.path, []).extend(m for m in route.methods if m not in found.get(route.path, []))
    return sorted(found.items())


def test_readiness_checks_the_job_store_and_the_broker_liveness_stays_cheap(
        make_settings: Callable[..., Settings], valkey: EmbeddedValkey) -> None:
    closed = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    cases = [("up", make_settings(), 200, {"job_store": True, "broker": True}),
             ("store down", make_settings(redis_url=closed), 503, {"job_store": False, "broker": False}),
             ("broker down", make_settings(broker_url=closed), 503, {"job_store": True, "broker": False}),
             ("own broker up", make_settings(broker_url=valkey.url.rsplit("/", 1)[0] + "/3"), 200,
              {"job_store": True, "broker": True})]
    for name, settings, status, oks in cases:
        served = Served(create_app(settings, parts=("callbacks",)))
        try:
            started = time.monotonic()
            r = requests.get(served.url + "/readyz", timeout=10)
            assert time.monotonic() - started < 8, name  # bounded, not redis-py's 15 s timeout
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert {k: v["ok"] for k, v in body["checks"].items()} == oks, (name, body)
            assert body["status"] == ("ready" if status == 200 else "not_ready")
            if status == 503:
                assert "unreachable" in body["reason"] and r.headers["retry-after"] == "5"
            assert "s3cret" not in r.text and "127.0.0.1" not in r.text  # no URL on the wire
            for live in ("/healthz", "/livez"):  # liveness answers whatever Redis does
                assert requests.get(served.url + live, timeout=5).json() == {"status": "ok"}
        finally:
            served.stop()


def test_serve_with_callbacks_only_has_the_same_probes(make_settings: Callable[..., Settings]) -> None:
    """``kie-extend serve --callbacks-only`` (and its older name ``callback-server``): liveness,
    readiness, and /metrics answering 503 rather than a traceback while the job store is down."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    for settings, ready in ((make_settings(), True), (make_settings(redis_url=closed, redis_socket_timeout=1), False)):
        served = Served(create_app(settings, parts=("callbacks",)))
        try:
            r = requests.get(served.url + "/livez", timeout=5)
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            r = requests.get(served.url + "/readyz", timeout=10)
            assert r.status_code == (200 if ready else 503)
            assert r.json()["status"] == ("ready" if ready else "not_ready")
            r = requests.get(served.url + "/metrics", timeout=10)
            if ready:
                assert r.status_code == 200 and "kie_extend_jobs" in r.text
            else:
                assert r.status_code == 503 and r.json()["error"]["kind"] == "unavailable"
        finally:
            served.stop()


# ----- the OpenAPI document ---------------------------------------------------------------------------

def test_openapi_document_is_current(stack: Stack) -> None:
    """Fails when the routes or models change without ``kie-extend openapi --out docs/openapi.json``."""
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert openapi_text() == committed, "docs/openapi.json is stale: run kie-extend openapi --out docs/openapi.json"
    served = requests.get(stack.url + "/openapi.json", timeout=5).json()
    assert served == json.loads(committed)
    paths = served["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry", "/v1/batches",
            "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel", "/v1/pause", "/v1/resume",
            "/v1/system"} <= set(paths)
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/JobSubmission"} in body
    assert "request" in served["components"]["schemas"]["JobSubmission"]["properties"]
    assert served["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_openapi_command_writes_the_same(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    subprocess.run([sys.executable, "-m", "kie_extend.cli", "openapi", "--out", str(out)], check=True,
                   env={**os.environ, "KIE_API_TOKENS": ""}, capture_output=True, timeout=60)
    assert out.read_text() == (ROOT / "docs" / "openapi.json").read_text()


# ----- the callback path keeps its speed ----------------------------------------------------------------

def test_callbacks_at_200_per_second(stack: Stack) -> None:
    stack.rt.gates.pause_operator()
    stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim)} for _ in range(10)]})
    jobs = stack.consume()
    rate, seconds, threads = 200, 4, 8
    total = rate * seconds
    latencies: list[float] = []
    codes: list[int] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def worker(n: int) -> None:
        session = requests.Session()
        mine_lat, mine_codes = [], []
        for k in range(n, total, threads):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            job_id = jobs[k % len(jobs)] if k % 2 else f"unknown-{k}"
            body = {"code": 200, "msg": "ok", "data": {"callbackType": "first", "task_id": f"t{k}", "data": []}}
            t0 = time.perf_counter()
            r = session.post(f"{stack.url}/kie/callback/{job_id}", json=body, timeout=5)
            mine_lat.append(time.perf_counter() - t0)
            mine_codes.append(r.status_code)
        with lock:
            latencies.extend(mine_lat)
            codes.extend(mine_codes)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    elapsed = time.monotonic() - start
    assert len(codes) == total and set(codes) == {200}
    q = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), q[98]
    print(f"\ncallbacks: {total} in {elapsed:.2f}s, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert elapsed < seconds + 2
    assert p99 < 0.3, f"p99 {p99:.3f}s"


# ----- kie-extend serve ------------------------------------------------------------------------------

def serve_env(valkey: EmbeddedValkey, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": valkey.url, "KIE_KEY_PREFIX": prefix, "KIE_QUEUE": prefix,
                "KIE_API_KEY": "test-key-0123456789", "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb",
                "KIE_ALLOW_PRIVATE_URLS": "true", **extra})
    return env


def test_serve_refuses_a_public_host_without_tokens(valkey: EmbeddedValkey, prefix: str) -> None:
    for host in ("0.0.0.0", "192.0.2.10"):
        p = subprocess.run([sys.executable, "-m", "kie_extend.cli", "serve", "--host", host, "--port",
                            str(free_port())], env=serve_env(valkey, prefix), capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        assert "KIE_API_TOKENS" in p.stderr


def wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "serve exited early"
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


def test_serve_with_its_own_callback_port(valkey: EmbeddedValkey, prefix: str, tmp_path: Path) -> None:
    api_port, cb_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kie_extend.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(api_port), "--callback-host", "127.0.0.1", "--callback-port",
                                 str(cb_port)],
                                env=serve_env(valkey, prefix, KIE_API_TOKENS=f"{WRITE},read:{READ}",
                                              KIE_LOG_LEVEL="DEBUG"),
                                stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            api_url, cb_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{cb_port}"
            wait_http(api_url + "/healthz", proc)
            wait_http(cb_url + "/healthz", proc)
            auth = {"Authorization": f"Bearer {WRITE}"}
            assert requests.post(cb_url + "/kie/callback/abc", json={"data": {"callbackType": "complete"}},
                                 timeout=5).status_code == 200
            assert requests.get(cb_url + "/v1/system", headers=auth, timeout=5).status_code == 404
            assert requests.get(cb_url + "/openapi.json", timeout=5).status_code == 404
            assert requests.get(api_url + "/v1/system", headers=auth, timeout=5).status_code == 200
            assert requests.get(api_url + "/v1/system", headers={"Authorization": f"Bearer {READ}x"},
                                timeout=5).status_code == 401
            assert requests.post(api_url + "/kie/callback/abc", json={}, timeout=5).status_code == 404
            r = requests.post(api_url + "/v1/jobs", headers=auth, json={"request": {"model": "V9"}}, timeout=10)
            assert r.status_code == 422
        finally:
            proc.terminate()
            proc.wait(20)
    logged = log_path.read_text()
    assert "kie-extend serve on" in logged
    assert WRITE not in logged and READ not in logged and WRITE[2:14] not in logged


# ----- the examples in docs/producers.md ----------------------------------------------------------------

def example(lang: str) -> str:
    text = (ROOT / "docs" / "producers.md").read_text()
    m = re.search(rf"<!-- http-example:{lang} -->\s*```\w+\n(.*?)```", text, re.S)
    assert m, f"no {lang} example in docs/producers.md"
    return m.group(1)


def test_curl_example_runs(stack: Stack, tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is needed for this test"
    script = tmp_path / "example.sh"
    script.write_text("set -euo pipefail\n" + example("curl"))
    env = {**os.environ, "KIE_EXTEND_URL": stack.url, "KIE_EXTEND_TOKEN": WRITE,
           "AUDIO_URL": f"{stack.sim.url}/files/source/30s.mp3"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    [(job_id, kwargs)] = stack.messages()
    assert job_id in p.stdout and kwargs["request"]["uploadUrl"] == env["AUDIO_URL"]
    assert '"state"' in p.stdout  # the GET answered (404 not_found until a worker records it)


def test_go_example_runs(stack: Stack, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain on this machine (go not on PATH); the curl example covers the same calls")
    (tmp_path / "main.go").write_text(example("go"))
    env = {**os.environ, "KIE_EXTEND_URL": stack.url, "KIE_EXTEND_TOKEN": WRITE,
           "AUDIO_URL": f"{stack.sim.url}/files/source/30s.mp3", "GOFLAGS": "-mod=mod"}
    p = subprocess.run(["go", "run", "main.go"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    [(job_id, _)] = stack.messages()
    assert job_id in p.stdout


# ----- end to end: kie-extend serve, a real Celery worker and beat --------------------------------------

def test_end_to_end_with_serve_and_a_real_worker(valkey: EmbeddedValkey, prefix: str, tmp_path: Path) -> None:
    """Jobs sent over HTTP reach a real worker, KIE's callbacks come back to serve's callback route,
    and the API shows them succeed."""
    from kie_extend.cli.devstack import DevStack, _wait_http

    env = {"KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "0.5s", "KIE_POLL_MAX_INTERVAL": "1s",
           "KIE_POLL_CALLBACK_INTERVAL": "1s", "KIE_TICK_INTERVAL": "0.2s", "KIE_QUEUE": prefix}
    with DevStack(tmp_path, redis_url=valkey.url, key_prefix=prefix, env=env) as st:
        st.start_simulator("--time-factor", "0.03", "--seed", "5")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve_child = st._spawn("serve", [sys.executable, "-m", "kie_extend.cli", "serve", "--port", str(port)],
                                env={"KIE_API_TOKENS": f"{WRITE},read:{READ}"})
        _wait_http(url + "/healthz", 30, serve_child)
        st.env["KIE_CALLBACK_BASE_URL"] = url  # the worker names serve's callback route to KIE
        st.start_worker(concurrency=2)
        st.start_beat()
        auth = {"Authorization": f"Bearer {WRITE}"}
        body = {"uploadUrl": f"{st.sim_url}/files/source/30s.mp3", "defaultParamFlag": True,
                "instrumental": True, "continueAt": 5, "model": "V5", "style": "rock", "title": "E2E"}
        r = requests.post(url + "/v1/jobs", headers=auth, timeout=10,
                          json={"jobs": [{"request": body, "metadata": {"n": i}} for i in range(3)],
                                "batch_id": "e2e"})
        assert r.status_code == 202, r.text
        ids = r.json()["job_ids"]
        deadline = time.monotonic() + 90
        while True:
            recs = [requests.get(f"{url}/v1/jobs/{j}", headers={"Authorization": f"Bearer {READ}"},
                                 timeout=10).json() for j in ids]
            if all(rec.get("state") in ("succeeded", "failed") for rec in recs):
                break
            assert time.monotonic() < deadline, [rec.get("state") for rec in recs]
            time.sleep(0.3)
        assert [rec["state"] for rec in recs] == ["succeeded"] * 3
        assert [rec["metadata"] for rec in recs] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert all(rec["tracks"] and rec["batch_id"] == "e2e" for rec in recs)
        batch = requests.get(f"{url}/v1/batches/e2e", headers=auth, timeout=10).json()
        assert batch["finished"] and batch["counts"] == {"succeeded": 3}
        stats = st.sim_stats()
        assert stats["submissions_accepted"] == 3
        by_url = stats["submissions_by_callback_url"]
        assert sorted(by_url) == sorted(f"{url}/kie/callback/{j}" for j in ids)  # callbacks go to serve
        assert set(by_url.values()) == {1}  # each sent once
        assert stats.get("callbacks_sent", 0) >= 3 and not stats.get("callbacks_failed")  # serve answered 200
        listed = requests.get(f"{url}/v1/jobs?state=succeeded&batch_id=e2e&limit=2", headers=auth, timeout=10).json()
        assert len(listed["jobs"]) == 2 and listed["next_cursor"]
        logged = (tmp_path / "serve.log").read_text()
        assert WRITE not in logged and READ not in logged
