"""The dashboard's guards and pages over HTTP, without a browser (the browser run is
test_dashboard_browser.py): login, sessions, CSRF and Origin checks, read-only refusals, the open
loopback mode, and every page rendering from a private Valkey."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from dash_server import ServedApp
from kie_extend.config import Settings
from kie_extend.http.app import create_app
from kie_extend.http.dashboard import _local, same_origin
from kie_extend.infra.runtime import Runtime

PAGES = ["/", "/jobs", "/jobs?state=failed&tenant=x&q=y&page=3", "/batches", "/dead-letters"]


@pytest.fixture
def served(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., ServedApp]]:
    started: list[ServedApp] = []

    def start(**overrides: Any) -> ServedApp:
        settings = make_settings(base_url="http://127.0.0.1:9", **overrides)
        app = ServedApp(create_app(settings, parts=("dashboard",)))
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m
    return m.group(1)


def _login(app: ServedApp, token: str) -> tuple[requests.Session, requests.Response]:
    s = requests.Session()
    r = s.post(app.url + "/login", data={"token": token, "next": "/"}, headers={"Origin": app.url})
    return s, r


def test_every_page_needs_a_session_and_login_sets_a_strict_cookie(served: Callable[..., ServedApp]) -> None:
    app = served(api_tokens="admin-token,read:viewer-token")
    for page in PAGES:
        r = requests.get(app.url + page, allow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    s, r = _login(app, "wrong")
    assert r.status_code == 401 and "wrong" not in r.text
    s, r = _login(app, "admin-token")
    assert r.status_code == 200 and r.url == app.url + "/"
    cookie = r.history[0].headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "admin-token" not in cookie
    for page in PAGES:
        r = s.get(app.url + page)
        assert r.status_code == 200, page
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
    assert 'action="/pause"' in s.get(app.url + "/").text
    assert s.get(app.url + "/jobs/nope").status_code == 404
    assert s.get(app.url + "/batches/nope").status_code == 404


def test_posts_need_csrf_same_origin_and_write_rights(served: Callable[..., ServedApp],
                                                      make_settings: Callable[..., Settings]) -> None:
    app = served(api_tokens="admin-token,read:viewer-token")
    rt = Runtime(make_settings())
    admin, r = _login(app, "admin-token")
    csrf = _csrf(r.text)
    origin = {"Origin": app.url}
    assert admin.post(app.url + "/pause", data={"csrf": csrf}, allow_redirects=False).status_code == 403
    assert admin.post(app.url + "/pause", data={"csrf": csrf}, headers={"Origin": "http://evil.example"},
                      allow_redirects=False).status_code == 403
    assert admin.post(app.url + "/pause", data={"csrf": "x" + csrf}, headers=origin,
                      allow_redirects=False).status_code == 403
    assert rt.gates.operator_paused() is None
    r = admin.post(app.url + "/pause", data={"csrf": csrf, "reason": "deploy"}, headers={"Referer": app.url + "/"})
    assert r.status_code == 200 and "deploy" in r.text and rt.gates.operator_paused()["reason"] == "deploy"
    viewer, r = _login(app, "viewer-token")
    assert 'action="/resume"' not in r.text and "read-only" in r.text
    r = viewer.post(app.url + "/resume", data={"csrf": _csrf(r.text)}, headers=origin, allow_redirects=False)
    assert r.status_code == 403 and rt.gates.operator_paused() is not None
    r = admin.post(app.url + "/resume", data={"csrf": csrf}, headers=origin)
    assert r.status_code == 200 and rt.gates.operator_paused() is None
    r = admin.post(app.url + "/logout", data={"csrf": csrf}, headers=origin, allow_redirects=False)
    assert r.status_code == 303 and 'kie_session=""' in r.headers["set-cookie"]


def test_without_tokens_the_dashboard_is_open_but_forms_still_need_csrf(served: Callable[..., ServedApp],
                                                                        make_settings: Callable[..., Settings]) -> None:
    app = served()
    rt = Runtime(make_settings())
    s = requests.Session()
    r = s.get(app.url + "/")
    assert r.status_code == 200 and "kie_session" in s.cookies
    assert s.post(app.url + "/pause", data={"csrf": "nope"}, headers={"Origin": app.url},
                  allow_redirects=False).status_code == 403
    r = s.post(app.url + "/pause", data={"csrf": _csrf(r.text)}, headers={"Origin": app.url})
    assert r.status_code == 200 and rt.gates.operator_paused() is not None


def test_login_redirects_stay_on_this_site() -> None:
    assert _local("/jobs?state=failed") == "/jobs?state=failed"
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "jobs"):
        assert _local(bad) == "/"


class _Req:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def test_same_origin_compares_origin_then_referer_with_the_host() -> None:
    host = {"host": "dash.example:8080"}
    assert same_origin(_Req({**host, "origin": "https://dash.example:8080"}))  # type: ignore[arg-type]
    assert same_origin(_Req({**host, "referer": "http://dash.example:8080/jobs"}))  # type: ignore[arg-type]
    assert not same_origin(_Req({**host, "origin": "https://evil.example"}))  # type: ignore[arg-type]
    assert not same_origin(_Req({**host, "origin": "null"}))  # type: ignore[arg-type]
    assert not same_origin(_Req(host))  # type: ignore[arg-type]


def test_a_dashboard_session_does_not_open_the_json_api(make_settings: Callable[..., Settings]) -> None:
    """/v1 takes bearer tokens only: its POSTs carry no CSRF token, so a logged-in browser's cookie
    must not be enough (a cross-site form would otherwise pause submission)."""
    settings = make_settings(base_url="http://127.0.0.1:9", api_tokens="admin-token,read:viewer-token")
    app = ServedApp(create_app(settings, parts=("api", "dashboard")))
    try:
        _check_cookie_is_not_a_bearer(app)
    finally:
        app.stop()


def _check_cookie_is_not_a_bearer(app: ServedApp) -> None:
    s, r = _login(app, "admin-token")
    assert r.status_code in (200, 303) and s.cookies
    assert s.get(app.url + "/v1/system").status_code == 401
    assert s.post(app.url + "/v1/pause", json={"reason": "x"}).status_code == 401
    ok = requests.get(app.url + "/v1/system", headers={"Authorization": "Bearer admin-token"})
    assert ok.status_code == 200 and ok.json()["operator_paused"] is None


def test_links_and_assets_are_root_relative_behind_a_proxy(served: Callable[..., ServedApp]) -> None:
    """Behind an HTTPS proxy not in KIE_HTTP_TRUSTED_PROXIES the app sees http and the proxy's Host:
    no link or asset of ours may name that scheme and host (an https page would load http assets)."""
    app = served(api_tokens="admin-token")
    proxied = {"Host": "kie.example.org", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    own = re.compile(r'(?:href|src|action)="(?:https?:)?//')
    r = requests.get(app.url + "/login", headers=proxied)
    assert r.status_code == 200 and 'rel="stylesheet" href="/static/dashboard.css"' in r.text
    assert not own.findall(r.text) and "kie.example.org" not in r.text
    r = requests.get(app.url + "/jobs", headers=proxied, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    s, r = _login(app, "admin-token")
    assert r.status_code == 200
    for page in ["/", "/jobs"]:
        r = s.get(app.url + page, headers=proxied)
        assert r.status_code == 200, page
        assert 'href="/static/dashboard.css"' in r.text and not own.findall(r.text), page
        assert "http://kie.example.org" not in r.text and "http://127.0.0.1" not in r.text, page
    assert requests.get(app.url + "/static/dashboard.css", headers=proxied).status_code == 200
