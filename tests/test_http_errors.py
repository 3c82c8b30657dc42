"""Every JSON error of ``kie-extend serve`` has one shape, ``{"error": {"kind", "message"}}``: the
callback route, ``/v1``, the probes, unknown paths and wrong methods, on a real uvicorn server over
loopback. The dashboard's own pages keep their HTML error pages."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from dash_server import ServedApp
from kie_extend.config import Settings
from kie_extend.http.app import create_app
from kie_extend.infra.embedded import free_port

WRITE, READ = "errors-writer-token", "errors-reader-token"


@pytest.fixture
def served(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., ServedApp]]:
    started: list[ServedApp] = []

    def start(parts: tuple[str, ...] = ("callbacks", "api", "dashboard"), **overrides: Any) -> ServedApp:
        app = ServedApp(create_app(make_settings(base_url="http://127.0.0.1:9", **overrides), parts=parts))
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def error_of(r: requests.Response | tuple[int, bytes], status: int, kind: str) -> str:
    """Check the error shape and kind; return the message."""
    code, raw = (r.status_code, r.content) if isinstance(r, requests.Response) else r
    assert code == status, (code, raw)
    body = json.loads(raw)
    assert set(body) == {"error"} and isinstance(body["error"], dict), body
    assert body["error"]["kind"] == kind and isinstance(body["error"]["message"], str), body
    assert body["error"]["message"], body
    return body["error"]["message"]


def raw_request(app: ServedApp, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_the_callback_route_answers_every_error_in_the_api_shape(served: Callable[..., ServedApp]) -> None:
    app = served(parts=("callbacks",), http_callback_max_body=1024, http_json_max_depth=8)
    cb = app.url + "/kie/callback/"
    error_of(requests.post(cb + "job-1", data=b"not json"), 400, "invalid_json")
    error_of(requests.post(cb + "job-1", data=b"[1, 2]"), 400, "invalid_json")
    error_of(requests.post(cb + "job-1", data=b"[" * 20 + b"]" * 20), 422, "invalid_json")
    error_of(requests.post(cb + "a%20b", json={}), 404, "not_found")
    error_of(requests.post(cb + "x" * 129, json={}), 404, "not_found")
    assert "GET" in error_of(requests.get(cb + "job-1"), 405, "method_not_allowed")
    error_of(requests.post(cb + "job-1", data=b" " * 2048), 413, "too_large")
    assert "/elsewhere" in error_of(requests.post(app.url + "/elsewhere", json={}), 404, "not_found")
    for gone in ("/v1/system", "/openapi.json", "/"):  # callbacks only: no API, no dashboard
        error_of(requests.get(app.url + gone), 404, "not_found")
    error_of(requests.post(app.url + "/healthz"), 405, "method_not_allowed")
    error_of(requests.post(app.url + "/metrics"), 405, "method_not_allowed")
    assert requests.post(cb + "job-1", json={}).json() == {"status": "received"}


def test_a_bad_callback_signature_is_unauthorized(served: Callable[..., ServedApp]) -> None:
    app = served(parts=("callbacks",), callback_secret="s3cret-for-hmac")
    error_of(requests.post(app.url + "/kie/callback/job-1", json={"data": {"task_id": "t"}}), 401, "unauthorized")


def test_api_unknown_paths_methods_and_auth_errors_have_the_shape(served: Callable[..., ServedApp]) -> None:
    app = served(api_tokens=f"{WRITE},read:{READ}")
    auth = {"Authorization": f"Bearer {WRITE}"}
    for path in ("/v1/nope", "/v1/jobs/a/b/c", "/nope.json"):
        assert path in error_of(requests.get(app.url + path, headers=auth), 404, "not_found")
    error_of(requests.put(app.url + "/v1/jobs", headers=auth, json={}), 405, "method_not_allowed")
    error_of(requests.delete(app.url + "/v1/jobs/x", headers=auth), 405, "method_not_allowed")
    for probe in ("/healthz", "/livez", "/readyz", "/metrics"):
        error_of(requests.post(app.url + probe), 405, "method_not_allowed")
    error_of(requests.get(app.url + "/v1/jobs"), 401, "unauthorized")
    error_of(requests.post(app.url + "/v1/jobs", headers={"Authorization": f"Bearer {READ}"}, json={}),
             403, "forbidden")
    error_of(requests.get(app.url + "/v1/jobs/no-such-job/nothing", headers=auth), 404, "not_found")
    error_of(requests.post(app.url + "/v1/jobs", headers=auth, data=b"{not json"), 422, "invalid_request")
    error_of(raw_request(app, "POST", "/v1/jobs", b"{}", {**auth, "Content-Length": "2",
                                                          "Transfer-Encoding": "chunked"}), 400, "bad_request")
    error_of(raw_request(app, "POST", "/v1/jobs", b"{}", {**auth, "Content-Length": str(10**9)}), 413, "too_large")


def test_dashboard_pages_keep_html_errors(served: Callable[..., ServedApp]) -> None:
    app = served(parts=("dashboard",))
    s = requests.Session()
    r = s.get(app.url + "/jobs/no-such-job")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html") and "No job" in r.text


def test_a_readyz_that_is_not_ready_carries_the_error_shape(served: Callable[..., ServedApp]) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    app = served(parts=("callbacks",), redis_url=closed, broker_url=closed)
    r = requests.get(app.url + "/readyz", timeout=30)
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready" and body["error"]["kind"] == "unavailable"
    assert body["error"]["message"] == body["reason"]
