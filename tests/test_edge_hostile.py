"""A hostile client against ``kie-extend serve`` and the producers, on real processes.

Forwarded-address headers are believed only from named proxies (so the failed-authentication limit
cannot be rotated around), forged callbacks never make us poll a task faster than the provider
allows, text rules apply to the pause reason, idempotency keys are checked inside one request and
compare numbers by value, duplicate JSON keys are refused, and a body is bounded on routes that
never read one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from inline import InlineDispatcher
from test_http_api import Stack, req, sim, stack  # noqa: F401  (fixtures)
from test_http_edge import READ, WRITE, Browser, Server, read_response, start, upload  # noqa: F401  (fixture)

from kie_extend import api
from kie_extend.errors import IdempotencyConflictError, ValidationError
from kie_extend.jobs.pipeline import Pipeline
from kie_extend.infra.runtime import Runtime


def test_forwarded_for_is_ignored_unless_the_proxy_is_named(start: Callable[..., Server]) -> None:
    """A client rotating X-Forwarded-For is still one address: 20 wrong tokens, then 429. Behind a
    named proxy the forwarded address is the client's, so another forwarded client is unaffected."""
    server = start(KIE_API_TOKENS=f"{WRITE},read:{READ}")
    statuses = [server.request("GET", "/v1/system", headers={"Authorization": f"Bearer wrong-{i}",
                                                           "X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"})[0]
                for i in range(25)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    # Nor can a forged header lock another address out: 127.0.0.2 still gets in.
    assert server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}"},
                          source="127.0.0.2")[0] == 200

    proxied = start(KIE_API_TOKENS=f"{WRITE},read:{READ}", KIE_HTTP_TRUSTED_PROXIES="127.0.0.1")
    for i in range(25):
        status = proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer wrong-{i}",
                                                              "X-Forwarded-For": "10.9.9.9"})[0]
        assert status == (401 if i < 20 else 429)
    assert proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}",
                                                         "X-Forwarded-For": "10.8.8.8"})[0] == 200
    # A peer that is not the named proxy is itself the client, whatever it forwards.
    for i in range(21):
        status = proxied.request("GET", "/v1/system", source="127.0.0.3",
                                 headers={"Authorization": f"Bearer w-{i}", "X-Forwarded-For": f"10.1.1.{i}"})[0]
    assert status == 429
    assert json.loads(proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}"})[2])


def test_forged_callbacks_never_poll_faster_than_the_gap(stack: Stack) -> None:  # noqa: F811
    """50 forged callbacks in 2 s while four workers' pipelines are asked to advance the job as
    fast as they can: one poll in flight at a time, KIE_POLL_MIN_GAP apart, so the simulator's
    per-task limit (3 record-info requests a second) never answers 429; the job still finishes."""
    stack.sim.simulator.update_config({"time_factor": 0.1})
    settings = stack.settings.model_copy(update={"poll_min_gap": 0.4})
    job_id = api.enqueue_extend(req(stack.sim), settings=stack.settings)
    stack.consume()
    stack.h.run_until(lambda: stack.state(job_id) == "submitted")
    assert stack.state(job_id) == "submitted"
    pipelines = [Pipeline(Runtime(settings), InlineDispatcher()) for _ in range(4)]
    stack.h.pipeline = Pipeline(Runtime(settings), stack.h.dispatch)
    stop = time.monotonic() + 2.0

    def worker(p: Pipeline) -> None:
        while time.monotonic() < stop and stack.state(job_id) == "submitted":
            p.advance(job_id)
            time.sleep(0.005)

    threads = [threading.Thread(target=worker, args=(p,)) for p in pipelines]
    for t in threads:
        t.start()
    began = time.monotonic()
    for forged in range(1, 51):  # 50 in 2 s
        time.sleep(max(0.0, began + forged * 0.038 - time.monotonic()))
        r = requests.post(f"{stack.url}/kie/callback/{job_id}", timeout=5,
                          json={"code": 200, "data": {"callbackType": "complete", "task_id": "forged", "data": []}})
        assert r.status_code == 200
    for t in threads:
        t.join(10)
    assert forged == 50
    stack.h.run_until(stack.h.finished(job_id))
    assert stack.state(job_id) == "succeeded"
    codes = stack.sim.simulator.stats_snapshot()["codes"]
    polls = {route: c for route, c in codes.items() if "record-info" in route}
    assert polls and all("429" not in c and 429 not in c for c in polls.values()), polls


BAD_REASONS = ["\ud800", "a\u0000\u001b[31mRED", "\u001b]0;title\u0007"]


def test_a_pause_reason_must_be_plain_text_at_every_entrance(start: Callable[..., Server]) -> None:
    """/v1, the dashboard's form, the CLI and the Python API refuse a lone surrogate and control
    characters (terminal escapes) in the pause reason: 422 / one line, nothing paused; a reason with
    tabs and line breaks is fine."""
    server = start(KIE_API_TOKENS=f"{WRITE},read:{READ}")
    auth = {"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"}
    for reason in BAD_REASONS:
        status, _, body = server.request("POST", "/v1/pause", json.dumps({"reason": reason}).encode(), auth)
        assert status == 422, body
        error = json.loads(body)["error"]
        assert error["kind"] == "invalid_request" and error["errors"][0]["field"] == "reason", error
    system = json.loads(server.request("GET", "/v1/system", headers=auth)[2])
    assert system["operator_paused"] is None
    browser = Browser(server)
    browser.login(WRITE)
    csrf = browser.csrf()
    status, _, page = browser.post("/pause", f"csrf={csrf}&reason=a%00%1B%5B31mRED")
    assert status == 422 and "control character" in page and "\x1b" not in page
    assert json.loads(server.request("GET", "/v1/system", headers=auth)[2])["operator_paused"] is None
    raw = open(f"/proc/{server.proc.pid}/environ", "rb").read()  # the server's own settings
    env = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    cli = subprocess.run([sys.executable, "-m", "kie_extend.cli", "pause", "--reason", "a\u001b[31mRED"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.count("\n") == 1 and "reason" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert json.loads(server.request("GET", "/v1/system", headers=auth)[2])["operator_paused"] is None
    status, _, body = server.request("POST", "/v1/pause", json.dumps({"reason": "line one\n\tline two"}).encode(),
                                     auth)
    assert status == 200 and json.loads(body)["operator_paused"]["reason"] == "line one\n\tline two"


def test_a_pause_reason_python_api(stack: Stack) -> None:  # noqa: F811
    for reason in BAD_REASONS:
        with pytest.raises(ValidationError) as exc:
            api.pause(reason, settings=stack.settings)
        assert exc.value.errors[0]["field"] == "reason"
    assert stack.rt.gates.operator_paused() is None


def test_one_key_two_requests_in_one_call_is_a_conflict(stack: Stack) -> None:  # noqa: F811
    """Two items of one /v1 list (or one enqueue_many) sharing an idempotency key with different
    requests: 409 conflict / IdempotencyConflictError naming the later item, nothing sent. The same
    request twice under one key is fine (the second is a duplicate)."""
    key = f"k-{uuid.uuid4().hex}"
    r = stack.call("POST", "/v1/jobs", json={"jobs": [{"request": req(stack.sim), "idempotency_key": key},
                                                      {"request": req(stack.sim, title="B"), "idempotency_key": key}]})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["kind"] == "conflict" and error["errors"][0]["field"] == "[1].idempotency_key"
    assert len(error["job_ids"]) == 1 and stack.messages() == []
    with pytest.raises(IdempotencyConflictError) as exc:
        api.enqueue_many([{"request": req(stack.sim), "idempotency_key": key + "x"},
                          {"request": req(stack.sim), "idempotency_key": "other"},
                          {"request": req(stack.sim, style="B"), "idempotency_key": key + "x"}],
                         settings=stack.settings)
    assert exc.value.errors[0]["field"] == "[2].idempotency_key" and stack.messages() == []
    # Another tenant's use of the same key is its own.
    ids = api.enqueue_many([{"request": req(stack.sim), "idempotency_key": key},
                            {"request": req(stack.sim, title="B"), "idempotency_key": key, "tenant": "shop"},
                            {"request": req(stack.sim), "idempotency_key": key}], settings=stack.settings)
    assert len(ids) == 3 and len(stack.messages()) == 3


def test_numbers_compare_by_value_under_one_key(stack: Stack) -> None:  # noqa: F811
    """``"continueAt": 12`` then ``12.0`` under one idempotency key (or one explicit job id) is the same
    request: a duplicate over /v1, the same claim through the Python API; 12.5 is another request."""
    key = f"k-{uuid.uuid4().hex}"
    body = json.dumps({"request": req(stack.sim, continueAt=12), "idempotency_key": key})
    assert stack.call("POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"}).status_code == 202
    first = stack.consume()[0]
    again = body.replace('"continueAt": 12', '"continueAt": 12.0')
    assert '"continueAt": 12.0' in again
    r = stack.call("POST", "/v1/jobs", data=again, headers={"Content-Type": "application/json"})
    assert r.status_code == 202, r.text
    (second,) = stack.consume()
    assert stack.rt.store.get(second)["duplicate_of"] == first
    r = stack.call("POST", "/v1/jobs", json={"request": req(stack.sim, continueAt=12.5), "idempotency_key": key})
    assert r.status_code == 409
    job_id = f"j-{uuid.uuid4().hex}"
    assert api.enqueue_extend(req(stack.sim, continueAt=7), job_id=job_id, settings=stack.settings) == job_id
    assert api.enqueue_extend(req(stack.sim, continueAt=7.0), job_id=job_id, settings=stack.settings) == job_id
    assert len(stack.messages()) == 1


def test_duplicate_json_keys_are_refused(stack: Stack, tmp_path: Path) -> None:  # noqa: F811
    """A /v1 body or a JSONL batch line that names one key twice (at any depth) is refused, naming
    the key, instead of silently keeping the last; nothing is sent."""
    text = json.dumps({"request": req(stack.sim), "idempotency_key": "k1"})
    for body in (text.replace('"title": "Song"', '"title": "Song", "title": "Other"'),
                 text[:-1] + ', "idempotency_key": "k2"}',
                 text[:-1] + ', "metadata": {"a": 1, "a": 2}}'):
        r = stack.call("POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        message = r.json()["error"]["errors"][0]["message"]
        assert "appears twice" in message and any(f'"{k}"' in message for k in ("title", "idempotency_key", "a"))
    r = stack.call("POST", "/v1/pause", data='{"reason": "a", "reason": "b"}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and stack.rt.gates.operator_paused() is None
    assert stack.messages() == []
    # A batch file's JSONL line, through the real command.
    line = json.dumps(req(stack.sim))
    path = tmp_path / "b.jsonl"
    path.write_text(line + "\n" + line.replace('"style": "folk"', '"style": "folk", "style": "rock"') + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": stack.settings.redis_url, "KIE_KEY_PREFIX": stack.settings.key_prefix,
                "KIE_QUEUE": stack.settings.queue, "KIE_API_KEY": "test-key-0123456789",
                "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb", "KIE_ALLOW_PRIVATE_URLS": "true"})
    out = subprocess.run([sys.executable, "-m", "kie_extend.cli", "batch", "submit", str(path), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and '"style" appears twice' in out.stdout + out.stderr, out
    assert "line 2" in out.stdout + out.stderr or ":2" in out.stdout + out.stderr, out
    # A CSV file's metadata cell is JSON too.
    csv_path = tmp_path / "b.csv"
    csv_path.write_text("uploadUrl,defaultParamFlag,continueAt,model,prompt,style,title,metadata\n"
                        f"{stack.sim.url}/files/source/30s.mp3,true,10,V5,la,folk,Song,\"{{\"\"a\"\": 1, \"\"a\"\": 2}}\"\n")
    out = subprocess.run([sys.executable, "-m", "kie_extend.cli", "batch", "submit", str(csv_path), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and '"a" appears twice' in out.stdout + out.stderr, out
    assert stack.messages() == []


def _chunked_get(sock: socket.socket, path: str, size: int) -> bytes:
    """A GET carrying a ``size``-byte chunked body (in 16 KB chunks) on ``sock``; the response."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    left = size
    try:
        while left > 0:
            piece = b"x" * min(16384, left)
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            left -= len(piece)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_response(sock)


def test_a_chunked_body_is_bounded_on_routes_that_never_read_one(start: Callable[..., Server]) -> None:
    """POST /v1/resume with a chunked body over the /v1 limit is 413 and does not resume; GET /healthz
    with an over-limit chunked body is 413; a small body on GET is read, answered, and the connection
    stays usable for the next request."""
    server = start(KIE_API_TOKENS=f"{WRITE},read:{READ}", KIE_HTTP_API_MAX_BODY="1048576")
    auth = {"Authorization": f"Bearer {WRITE}"}
    assert server.request("POST", "/v1/pause", b'{"reason": "hold"}', auth)[0] == 200
    status, sent, data = upload(server.port, "/v1/resume", 3 * 1024 * 1024, auth)
    assert status == 413 and b"too_large" in data, data[:300]
    system = json.loads(server.request("GET", "/v1/system", headers=auth)[2])
    assert system["operator_paused"]["reason"] == "hold"
    status, _, body = server.request("POST", "/v1/resume", b"{}", auth)  # a bounded body is fine
    assert status == 200 and json.loads(server.request("GET", "/v1/system", headers=auth)[2])["operator_paused"] is None
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        data = _chunked_get(sock, "/healthz", 128 * 1024)
    assert data.startswith(b"HTTP/1.1 413"), data[:300]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert _chunked_get(sock, "/healthz", 1024).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_a_token_is_named_in_logs_by_a_keyed_fingerprint(start: Callable[..., Server]) -> None:
    """The login's log line names the token by 8 hex that are not a plain hash of it (which a weak
    token could be guessed back from offline)."""
    server = start(KIE_API_TOKENS=WRITE, KIE_LOG_LEVEL="INFO")
    Browser(server).login(WRITE)
    time.sleep(0.3)
    text = server.log.read_text()
    (name,) = re.findall(r"dashboard login by token ([0-9a-f]{8})", text)
    assert name != hashlib.sha256(WRITE.encode()).hexdigest()[:8] and WRITE not in text


def test_an_empty_login_is_not_a_failed_authentication(start: Callable[..., Server]) -> None:
    """An empty token at the login guesses nothing, as a /v1 request without credentials: not counted."""
    server = start(KIE_API_TOKENS=WRITE)
    form = {"Origin": server.url, "Content-Type": "application/x-www-form-urlencoded"}
    for body in [b"token=&next=/", b"token=%20%20&next=/", b"next=/"] * 10:
        assert server.request("POST", "/login", body, form)[0] in (401, 422)
    assert server.request("POST", "/login", f"token={WRITE}&next=/".encode(), form)[0] == 303
