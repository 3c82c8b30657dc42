"""OpenTelemetry traces: a real OTLP/HTTP receiver on loopback, real worker, beat, serve and the
simulator with ``OTEL_*`` set; one trace per job from the producer to each delivery."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)

from kie_extend.api import get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.infra import tracing
from kie_extend.store.keys import Keys

TOKEN = "trace-test-token"


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest into plain span dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, req: ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None, "service": service,
                                "scope": ss.scope.name, "start": s.start_time_unix_nano,
                                "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                                "attrs": {a.key: _value(a.value) for a in s.attributes}})
        with self.lock:
            self.spans.extend(got)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("trace")
    env = {"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
           "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s", "KIE_HANDLERS": "redis_stream",
           "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with DevStack(workdir, key_prefix=f"tr{uuid.uuid4().hex[:6]}", env=env) as st:
        st.start_simulator("--time-factor", "0.04", "--seed", "7")
        st.start_serve(tokens=TOKEN)
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def valid_request(stack: DevStack) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Song"}


def wait_done(stack: DevStack, job_id: str, timeout: float = 60) -> dict[str, Any]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rec = get_job(job_id, settings=settings)
        if rec["state"] in ("succeeded", "failed") and all(
                h.get("state") == "delivered" for h in rec["handlers"].values()):
            return rec
        time.sleep(0.25)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-3000:] for c in stack.children)
    raise AssertionError(f"job {job_id} did not finish: {rec.get('state')}\n{logs}")


def job_trace(receiver: Receiver, job_id: str, external: tuple[str, ...] = (),
              timeout: float = 20) -> tuple[str, list[dict[str, Any]]]:
    """The trace holding ``job_id``'s spans, once it has its delivery span and every parent it names
    has arrived (each process exports on its own schedule), but ``external`` ones: (trace id, its spans)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.snapshot()
        mine = [s for s in spans if s["attrs"].get("kie.job_id") == job_id]
        ids = {s["span_id"] for s in spans}
        traces = {s["trace_id"] for s in mine}
        missing = {s["parent"] for s in spans if s["trace_id"] in traces and s["parent"]} - ids - set(external)
        if (any(s["name"] == "kie.deliver" for s in mine) and not missing) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    traces = {s["trace_id"] for s in mine}
    assert len(traces) == 1, (f"job {job_id}'s spans are in {len(traces)} traces: "
                              f"{sorted((s['name'], s['trace_id']) for s in mine)}")
    trace_id = traces.pop()
    return trace_id, [s for s in spans if s["trace_id"] == trace_id]


def tree(spans: list[dict[str, Any]]) -> str:
    """The span tree as indented lines: name [service] key attributes."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in sorted(spans, key=lambda s: s["start"]):
        by_parent.setdefault(s["parent"] if s["parent"] in ids else None, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in by_parent.get(parent, []):
            shown = {k: v for k, v in s["attrs"].items() if k.startswith("kie.") and k != "kie.job_id"}
            lines.append(f"{'  ' * depth}{s['name']} [{s['service']}] {json.dumps(shown) if shown else ''}".rstrip())
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def ancestors(span: dict[str, Any], spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_id = {s["span_id"]: s for s in spans}
    out, cur = [], span
    while cur["parent"] and cur["parent"] in by_id:
        cur = by_id[cur["parent"]]
        out.append(cur)
    return out


def check_job_trace(stack: DevStack, receiver: Receiver, job_id: str,
                    external: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rec = wait_done(stack, job_id)
    assert rec["state"] == "succeeded", rec
    trace_id, spans = job_trace(receiver, job_id, external)
    print(f"\ntrace {trace_id} of job {job_id}:\n{tree(spans)}")
    mine = [s for s in spans if s["attrs"].get("kie.job_id") == job_id]
    names = [s["name"] for s in mine]
    for name in ("kie.enqueue", "kie.accept", "kie.admit", "kie.submit", "kie.poll", "kie.callback", "kie.deliver"):
        assert name in names, (name, names)
    assert names.count("kie.enqueue") == 1 and names.count("kie.accept") == 1
    # The record keeps the trace context of its accept, in this trace.
    raw = redis.Redis.from_url(stack.redis_url, decode_responses=True).hget(
        Keys(stack.settings().key_prefix).job(job_id), "traceparent")
    assert raw and raw.split("-")[1] == trace_id
    enqueue = next(s for s in mine if s["name"] == "kie.enqueue")
    accept = next(s for s in mine if s["name"] == "kie.accept")
    assert raw.split("-")[2] == accept["span_id"]
    # The message carried traceparent: the worker's Celery span is a child of the producer's.
    run = [a for a in ancestors(accept, spans) if a["name"] == "run/kie_extend.extend"]
    assert run and enqueue in ancestors(run[0], spans)
    # enqueue → accept → submit → polls → deliver, across processes, by parent links.
    for s in mine:
        if s is not enqueue:
            chain = ancestors(s, spans)
            assert enqueue in chain, (s["name"], [a["name"] for a in chain])
    for s in mine:
        if s["name"] in ("kie.submit", "kie.poll", "kie.deliver", "kie.admit"):
            assert accept in ancestors(s, spans), s["name"]
    task_id = rec["kie_task_id"]
    submit = next(s for s in mine if s["name"] == "kie.submit")
    assert submit["attrs"]["kie.task_id"] == task_id and submit["attrs"]["kie.attempt"] == 1
    polls = [s for s in mine if s["name"] == "kie.poll"]
    assert all(p["attrs"]["kie.task_id"] == task_id for p in polls)
    assert polls[-1]["attrs"]["kie.status"] == "SUCCESS"
    delivered = [s for s in mine if s["name"] == "kie.deliver"]
    assert delivered[0]["attrs"]["kie.handler"] == "redis_stream"
    assert delivered[0]["attrs"]["kie.delivery.state"] == "delivered"
    assert delivered[0]["attrs"]["kie.task_id"] == task_id
    callbacks = [s for s in mine if s["name"] == "kie.callback"]
    assert all(c["service"] == "kie-extend-serve" and c["attrs"]["kie.task_id"] == task_id for c in callbacks)
    assert {c["attrs"]["kie.callback.type"] for c in callbacks} >= {"complete"}
    # A callback's own HTTP request is another trace: its job span links to it.
    assert all(c["links"] for c in callbacks)
    # The KIE calls are requests' client spans, under submit and poll.
    clients = [s for s in spans if s["scope"].endswith(("requests", "urllib3")) and accept in ancestors(s, spans)]
    assert any(submit in ancestors(c, spans) for c in clients)
    assert all(any(p in ancestors(c, spans) for c in clients) for p in polls)
    # The API key is in no span (it travels in a header, which is not recorded).
    key = stack.env["KIE_API_KEY"]
    assert not [s for s in spans if key in json.dumps(s["attrs"])]
    services = {s["service"] for s in spans}
    assert {"kie-extend-worker", "kie-extend-serve"} <= services
    return spans


def test_python_api_job_is_one_trace(stack: DevStack, receiver: Receiver) -> None:
    """A producer process of its own (the Python API), with OTEL_* set like the others."""
    script = textwrap.dedent("""
        import json, sys
        from kie_extend.api import enqueue_extend
        print(enqueue_extend(json.loads(sys.argv[1]), tenant=None, metadata={"via": "api"}))
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(valid_request(stack))], env=stack.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    spans = check_job_trace(stack, receiver, job_id)
    enqueue = next(s for s in spans if s["name"] == "kie.enqueue")
    assert enqueue["service"] == "kie-extend-producer" and enqueue["parent"] is None
    assert enqueue["attrs"]["messaging.destination.name"] == stack.settings().queue


@pytest.mark.parametrize("caller", [False, True], ids=["new-trace", "caller-traceparent"])
def test_http_job_is_one_trace(stack: DevStack, receiver: Receiver, caller: bool) -> None:
    """POST /v1/jobs: FastAPI's server span holds kie.enqueue in serve; it is the root, or the
    child of the caller's span when the request carries a traceparent header."""
    url = stack.env["KIE_CALLBACK_BASE_URL"]
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if caller:
        headers["traceparent"] = f"00-{trace_id}-{parent}-01"
    r = requests.post(f"{url}/v1/jobs", json={"request": valid_request(stack)}, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    spans = check_job_trace(stack, receiver, job_id, external=(parent,) if caller else ())
    enqueue = next(s for s in spans if s["name"] == "kie.enqueue")
    assert enqueue["service"] == "kie-extend-serve"
    server = ancestors(enqueue, spans)[-1]
    assert server["name"] == "POST /v1/jobs" and server["attrs"]["http.route"] == "/v1/jobs"
    assert server["parent"] == (parent if caller else None)
    assert (enqueue["trace_id"] == trace_id) is caller


def test_foreign_traceparent_joins(stack: DevStack, receiver: Receiver) -> None:
    """Any producer joins by setting the traceparent header: plain Celery, no OpenTelemetry."""
    job_id = f"foreign-{uuid.uuid4()}"
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    script = textwrap.dedent(f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={stack.redis_url!r})
        app.conf.task_serializer = "json"
        app.send_task("kie_extend.extend", kwargs={{"request": json.loads(sys.argv[1])}}, task_id={job_id!r},
                      queue={stack.settings().queue!r}, headers={{"traceparent": "00-{trace_id}-{parent}-01"}})
    """)
    env = {k: v for k, v in stack.env.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(valid_request(stack))], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert wait_done(stack, job_id)["state"] == "succeeded"
    got, spans = job_trace(receiver, job_id, external=(parent,))
    assert got == trace_id
    run = next(s for s in spans if s["name"] == "run/kie_extend.extend")
    assert run["parent"] == parent
    assert {"kie.accept", "kie.submit", "kie.poll", "kie.deliver"} <= {s["name"] for s in spans}


def test_paused_jobs_cancel_and_tick_admission(stack: DevStack, receiver: Receiver) -> None:
    """Two jobs wait while submission is paused. One is cancelled over HTTP: its delivery, run
    under the cancel request's span (another trace), is a child of the job's stored context, linked
    to that request. The other is admitted by beat's tick after the resume: a kie.admit span of
    beat in the job's trace, then submit, polls and delivery as usual."""
    url = stack.env["KIE_CALLBACK_BASE_URL"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(f"{url}/v1/pause", json={"reason": "trace test"}, headers=auth, timeout=30).ok
    try:
        job_id, waiting = (requests.post(f"{url}/v1/jobs", json={"request": valid_request(stack)}, headers=auth,
                                         timeout=30).json()["job_id"] for _ in range(2))
        settings = stack.settings()
        deadline = time.monotonic() + 30
        while {get_job(j, settings=settings)["state"] for j in (job_id, waiting)} != {"queued"}:
            assert time.monotonic() < deadline, "the jobs were never accepted"
            time.sleep(0.2)
        cancel = requests.post(f"{url}/v1/jobs/{job_id}/cancel", headers=auth, timeout=30)
        assert cancel.status_code == 200, cancel.text
        deadline = time.monotonic() + 30
        while True:
            rec = get_job(job_id, settings=settings)
            if rec["state"] == "cancelled" and all(h.get("state") == "delivered" for h in rec["handlers"].values()):
                break
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
    finally:
        requests.post(f"{url}/v1/resume", headers=auth, timeout=30)
    trace_id, spans = job_trace(receiver, job_id)
    print(f"\ntrace {trace_id} of cancelled job {job_id}:\n{tree(spans)}")
    deliver = next(s for s in spans if s["name"] == "kie.deliver")
    accept = next(s for s in spans if s["name"] == "kie.accept")
    assert accept in ancestors(deliver, spans) and deliver["attrs"]["kie.delivery.state"] == "delivered"
    everything = receiver.snapshot()
    request_span = next(s for s in everything if s["name"] == "POST /v1/jobs/{job_id}/cancel"
                        and s["parent"] is None and s["start"] > accept["start"])
    assert request_span["trace_id"] != trace_id
    linked = [s for s in spans if any(lk[0] == request_span["trace_id"] for lk in s["links"])]
    assert linked, "no span of the job links to the cancel request"
    spans = check_job_trace(stack, receiver, waiting)
    ticked = [s for s in spans if s["name"] == "kie.admit" and s["service"] == "kie-extend-beat"]
    assert ticked and ticked[0]["attrs"]["kie.admission.granted"] is True


OFF_SCRIPT = textwrap.dedent("""
    import os, sys
    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[k]
    EXTRA = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation")
    if sys.argv[1] == "absent":  # as without the kie-extend[otel] extra (FastAPI brings only the API)
        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(EXTRA):
                    raise ImportError(name)
        sys.meta_path.insert(0, Absent())
    import kie_extend.api, kie_extend.worker, kie_extend.tasks, kie_extend.http.app, kie_extend.jobs.pipeline
    from kie_extend.infra import tracing
    assert tracing.setup("worker", celery=True) is False and not tracing.enabled()
    with tracing.job_span("kie.poll", "j1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01") as span:
        assert span is None
    tracing.annotate(span, kie_task_id="t")
    tracing.annotate_current(kie_task_id="t")
    with tracing.attached("00-" + "1" * 32 + "-" + "2" * 16 + "-01"):
        pass
    tracing.inject_headers(headers := {})
    assert headers == {} and tracing.current_traceparent() is None
    # redis-py imports the SDK's metrics when it can (its own observability): never its tracing.
    print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", *EXTRA[1:]))))
""")


@pytest.mark.parametrize("otel", ["absent", "installed"])
def test_off_by_default_costs_nothing(otel: str) -> None:
    """Without OTEL_TRACES_EXPORTER every helper is a no-op and we import no tracing SDK,
    exporter or instrumentation; without the extra at all, everything works the same."""
    out = subprocess.run([sys.executable, "-c", OFF_SCRIPT, otel], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_exporter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter we do not wire (e.g. zipkin) stops start-up with a reason, not silence."""
    script = textwrap.dedent("""
        from kie_extend.errors import ConfigError
        from kie_extend.infra import tracing
        try:
            tracing.setup("worker")
        except ConfigError as exc:
            print(exc)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**env, "OTEL_TRACES_EXPORTER": "zipkin"})
    assert out.returncode == 0, out.stderr
    assert "OTEL_TRACES_EXPORTER=zipkin is not supported" in out.stdout


def test_wanted_and_attribute_names() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})
    assert tracing.attr_name("kie_task_id") == "kie.task_id"
    assert tracing.attr_name("kie_callback__type") == "kie.callback.type"
    assert tracing.attr_name("messaging_destination__name") == "messaging.destination.name"
