"""The webhook and download handlers against real local HTTP servers, and the SSRF guard."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kie_extend.provider.client import USER_AGENT
from kie_extend.config import Settings
from kie_extend.errors import ConfigError
from kie_extend.handlers import HandlerContext, build_handler
from kie_extend.handlers import download as download_mod
from kie_extend.handlers.download import DownloadError, DownloadHandler, sniff_audio
from kie_extend.handlers.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookError,
    WebhookHandler,
    verify_signature,
)
from kie_extend.store.keys import Keys
from kie_extend.provider.urlguard import check_public_url

pytestmark = pytest.mark.timeout(10)

SECRET = "whsec-test-0123456789"
MP3_A = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(range(256)) * 2
MP3_B = b"\xff\xfb\x90\x64" + b"B" * 700
MP3_C = b"\xff\xfb\x90\x64" + b"C" * 900
HTML = b"<!doctype html><html><body>Attention Required! | Cloudflare</body></html>"

Reply = tuple[int, dict[str, str], bytes]


# -- a real local HTTP server ------------------------------------------------------------------


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 whose answers are set per path; it records every request."""

    routes: dict[str, Reply | list[Reply] | Callable[[Seen], Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str | None = None) -> int:
        return sum(1 for s in self.seen if path is None or s.path == path)

    def answer(self, seen: Seen) -> Reply:
        self.seen.append(seen)
        route = self.routes.get(seen.path.split("?", 1)[0])
        if route is None:
            return 404, {"Content-Type": "text/plain"}, b"not found"
        if callable(route):
            return route(seen)
        if isinstance(route, list):  # successive answers; the last one repeats
            return route.pop(0) if len(route) > 1 else route[0]
        return route


def audio(body: bytes, content_type: str = "audio/mpeg") -> Reply:
    return 200, {"Content-Type": content_type}, body


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """A fresh local HTTP server for one test."""
    state = LocalServer()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            status, headers, payload = state.answer(seen)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"redis_url": "redis://127.0.0.1:1/0", "connect_timeout": 2, "read_timeout": 2}
    base.update(overrides)
    return Settings(_env_file=None, **base)


def context(settings: Settings) -> HandlerContext:
    return HandlerContext(settings=settings, redis=None, keys=Keys("t"))  # type: ignore[arg-type]


def succeeded(*tracks: dict[str, Any], job_id: str = "job-1") -> dict[str, Any]:
    return {
        "event": "job.succeeded", "job_id": job_id, "kie_task_id": "task-77", "kie_status": "SUCCESS",
        "tracks": list(tracks), "error": None, "request": {}, "metadata": {"k": "v"},
        "created_at": "2026-01-01T00:00:00.000Z", "submitted_at": "2026-01-01T00:00:01.000Z",
        "finished_at": "2026-01-01T00:01:00.000Z",
    }


def track(track_id: str, **urls: str) -> dict[str, Any]:
    base = {"id": track_id, "audio_url": "", "stream_audio_url": "", "image_url": "", "title": f"Song {track_id}",
            "tags": "rock", "duration": 12.5, "model_name": "chirp-crow", "prompt": "p"}
    base.update(urls)
    return base


# -- webhook -----------------------------------------------------------------------------------


def webhook(server: LocalServer, path: str = "/hook", **overrides: Any) -> WebhookHandler:
    settings = make_settings(handlers=["webhook"], webhook_url=server.url(path), webhook_timeout=2, **overrides)
    handler = build_handler("webhook", context(settings))
    assert isinstance(handler, WebhookHandler)
    return handler


def test_webhook_posts_compact_signed_event(server: LocalServer) -> None:
    server.routes["/hook"] = (200, {}, b"ok")
    event = succeeded(track("a", audio_url="https://cdn.example/a.mp3"))
    before = int(time.time())
    webhook(server, webhook_secret=SECRET).deliver(event, "job-1:job.succeeded")

    [seen] = server.seen
    assert (seen.method, seen.path) == ("POST", "/hook")
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["idempotency-key"] == "job-1:job.succeeded"
    assert seen.headers["user-agent"] == USER_AGENT
    assert seen.body == json.dumps(event, separators=(",", ":")).encode()
    assert json.loads(seen.body) == event
    timestamp = seen.headers[TIMESTAMP_HEADER.lower()]
    assert before - 1 <= int(timestamp) <= time.time() + 1
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + seen.body, hashlib.sha256).hexdigest()
    assert seen.headers[SIGNATURE_HEADER.lower()] == f"sha256={expected}"
    assert verify_signature(SECRET, timestamp, seen.body, seen.headers[SIGNATURE_HEADER.lower()])


def test_verify_signature_refuses_bad_input() -> None:
    body = b'{"event":"job.succeeded"}'
    now = 1_800_000_000
    good = "sha256=" + hmac.new(SECRET.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify_signature(SECRET, str(now), body, good, now=now + 10)
    assert verify_signature(SECRET.encode(), now, body, good, now=now - 299)
    assert not verify_signature("other-secret", str(now), body, good, now=now)
    assert not verify_signature(SECRET, str(now), body + b" ", good, now=now)
    assert not verify_signature(SECRET, str(now + 1), body, good, now=now)
    assert not verify_signature(SECRET, str(now), body, good, now=now + 301)
    assert not verify_signature(SECRET, str(now), body, good, max_skew=5, now=now + 6)
    assert not verify_signature(SECRET, str(now), body, good.removeprefix("sha256="), now=now)
    assert not verify_signature(SECRET, str(now), body, None, now=now)
    assert not verify_signature(SECRET, None, body, good, now=now)
    assert not verify_signature(SECRET, "12ab", body, good, now=now)
    assert not verify_signature(SECRET, "-5", body, good, now=now)
    assert not verify_signature("", str(now), body, good, now=now)
    assert not verify_signature(SECRET, str(now), body, "sha256=\udcff", now=now)


def test_webhook_without_secret_sends_no_signature(server: LocalServer) -> None:
    server.routes["/hook"] = (204, {}, b"")
    webhook(server).deliver(succeeded(), "job-1:job.succeeded")
    [seen] = server.seen
    assert SIGNATURE_HEADER.lower() not in seen.headers
    assert seen.headers[TIMESTAMP_HEADER.lower()].isdigit()


@pytest.mark.parametrize("status", [500, 404, 429, 302])
def test_webhook_non_2xx_raises_without_the_secret(server: LocalServer, status: int) -> None:
    server.routes["/hook"] = (status, {"Location": server.url("/elsewhere")}, b"nope")
    with pytest.raises(WebhookError, match=f"HTTP {status}") as info:
        webhook(server, webhook_secret=SECRET).deliver(succeeded(), "job-1:job.succeeded")
    assert SECRET not in str(info.value)
    assert server.hits("/elsewhere") == 0  # a redirect is not followed (it would turn into a GET)


def test_webhook_connection_refused_raises() -> None:
    settings = make_settings(handlers=["webhook"], webhook_url=f"http://127.0.0.1:{free_port()}/hook?token=abc",
                             webhook_secret=SECRET, webhook_timeout=2)
    started = time.monotonic()
    with pytest.raises(WebhookError, match="request failed") as info:
        WebhookHandler(settings).deliver(succeeded(), "job-1:job.succeeded")
    assert time.monotonic() - started < 2
    assert SECRET not in str(info.value) and "token=abc" not in str(info.value)


def test_webhook_factory_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="KIE_WEBHOOK_URL"):
        build_handler("webhook", context(make_settings()))


# -- download ----------------------------------------------------------------------------------


def downloader(tmp_path: Path, *, allow_private: bool = True) -> DownloadHandler:
    settings = make_settings(handlers=["download"], download_dir=str(tmp_path / "dl"), allow_private_urls=allow_private)
    handler = build_handler("download", context(settings))
    assert isinstance(handler, DownloadHandler)
    return handler


def manifest(tmp_path: Path, job_id: str = "job-1") -> dict[str, Any]:
    return json.loads((tmp_path / "dl" / job_id / "manifest.json").read_text())


def leftovers(tmp_path: Path, job_id: str = "job-1") -> list[str]:
    return sorted(p.name for p in (tmp_path / "dl" / job_id).iterdir() if p.name.startswith("."))


def test_download_two_takes_with_manifest(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    server.routes["/b.mp3"] = audio(MP3_B, "audio/mpeg; charset=binary")
    event = succeeded(track("take-a", audio_url=server.url("/a.mp3"), stream_audio_url=server.url("/sa")),
                      track("take-b", audio_url=server.url("/b.mp3")))
    downloader(tmp_path).deliver(event, "job-1:job.succeeded")

    job_dir = tmp_path / "dl" / "job-1"
    assert (job_dir / "take-a.mp3").read_bytes() == MP3_A
    assert (job_dir / "take-b.mp3").read_bytes() == MP3_B
    data = manifest(tmp_path)
    assert data["job_id"] == "job-1" and data["kie_task_id"] == "task-77"
    assert data["complete"] is True and data["identical_takes"] is False
    assert data["tracks"] == [
        {"id": "take-a", "title": "Song take-a", "file": "take-a.mp3", "url": server.url("/a.mp3"),
         "size": len(MP3_A), "sha256": hashlib.sha256(MP3_A).hexdigest(), "content_type": "audio/mpeg"},
        {"id": "take-b", "title": "Song take-b", "file": "take-b.mp3", "url": server.url("/b.mp3"),
         "size": len(MP3_B), "sha256": hashlib.sha256(MP3_B).hexdigest(), "content_type": "audio/mpeg"},
    ]
    assert leftovers(tmp_path) == []
    assert server.hits("/sa") == 0
    assert {s.headers["user-agent"] for s in server.seen} == {USER_AGENT}


def test_empty_body_falls_back_to_the_next_url(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(b"")
    server.routes["/stream"] = audio(MP3_A, "application/octet-stream")
    event = succeeded(track("t1", audio_url=server.url("/a.mp3"), stream_audio_url=server.url("/stream")))
    downloader(tmp_path).deliver(event, "k")
    [entry] = manifest(tmp_path)["tracks"]
    assert entry["url"] == server.url("/stream") and entry["content_type"] == "application/octet-stream"
    assert (tmp_path / "dl" / "job-1" / "t1.mp3").read_bytes() == MP3_A
    assert leftovers(tmp_path) == []


def test_url_preference_order_includes_source_urls(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/src"] = audio(MP3_A)
    server.routes["/stream"] = audio(MP3_B)
    event = succeeded(track("t1", audio_url="", source_audio_url=server.url("/src"),
                            stream_audio_url=server.url("/stream")))
    downloader(tmp_path).deliver(event, "k")
    assert manifest(tmp_path)["tracks"][0]["url"] == server.url("/src")
    assert server.hits("/stream") == 0


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream", "audio/mpeg"])
def test_html_body_is_rejected(server: LocalServer, tmp_path: Path, content_type: str) -> None:
    server.routes["/a.mp3"] = (200, {"Content-Type": content_type}, HTML)
    server.routes["/stream"] = audio(MP3_B)
    event = succeeded(track("t1", audio_url=server.url("/a.mp3"), stream_audio_url=server.url("/stream")))
    downloader(tmp_path).deliver(event, "k")
    assert manifest(tmp_path)["tracks"][0]["url"] == server.url("/stream")
    assert (tmp_path / "dl" / "job-1" / "t1.mp3").read_bytes() == MP3_B


def test_audio_bytes_with_a_non_audio_content_type_are_rejected(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A, "text/html")
    event = succeeded(track("t1", audio_url=server.url("/a.mp3")))
    with pytest.raises(DownloadError, match="not audio"):
        downloader(tmp_path).deliver(event, "k")


def test_all_urls_failing_raises_and_a_retry_succeeds(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = (500, {}, b"oops")
    server.routes["/stream"] = audio(b"")
    server.routes["/ok.mp3"] = audio(MP3_C)
    event = succeeded(track("good", audio_url=server.url("/ok.mp3")),
                      track("bad", audio_url=server.url("/a.mp3"), stream_audio_url=server.url("/stream")))
    handler = downloader(tmp_path)
    with pytest.raises(DownloadError) as info:
        handler.deliver(event, "k")
    assert "bad" in str(info.value) and "HTTP 500" in str(info.value) and "empty body" in str(info.value)
    data = manifest(tmp_path)
    assert data["complete"] is False and [t["id"] for t in data["tracks"]] == ["good"]
    assert sorted(p.name for p in (tmp_path / "dl" / "job-1").iterdir()) == ["good.mp3", "manifest.json"]

    server.routes["/a.mp3"] = audio(MP3_A)  # the provider's file shows up; the delivery is retried
    handler.deliver(event, "k")
    assert server.hits("/ok.mp3") == 1  # the take already on disk is not fetched again
    data = manifest(tmp_path)
    assert data["complete"] is True and [t["id"] for t in data["tracks"]] == ["good", "bad"]


def test_track_without_urls_raises(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="no audio URL"):
        downloader(tmp_path).deliver(succeeded(track("t1")), "k")


def test_repeated_delivery_downloads_nothing(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    server.routes["/b.mp3"] = audio(MP3_B)
    event = succeeded(track("a", audio_url=server.url("/a.mp3")), track("b", audio_url=server.url("/b.mp3")))
    handler = downloader(tmp_path)
    handler.deliver(event, "job-1:job.succeeded")
    first = manifest(tmp_path)
    assert server.hits() == 2

    downloader(tmp_path).deliver(event, "job-1:job.succeeded")
    assert server.hits() == 2
    assert manifest(tmp_path) == first

    (tmp_path / "dl" / "job-1" / "b.mp3").write_bytes(MP3_B[:-1] + b"X")  # damaged on disk
    handler.deliver(event, "job-1:job.succeeded")
    assert server.hits("/a.mp3") == 1 and server.hits("/b.mp3") == 2
    assert (tmp_path / "dl" / "job-1" / "b.mp3").read_bytes() == MP3_B


def test_private_url_refused_without_the_opt_in(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    event = succeeded(track("t1", audio_url=server.url("/a.mp3"), stream_audio_url="http://169.254.169.254/latest"))
    with pytest.raises(DownloadError, match="not a public address"):
        downloader(tmp_path, allow_private=False).deliver(event, "k")
    assert server.hits() == 0


def test_non_http_scheme_refused(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.mp3"
    secret_file.write_bytes(MP3_A)
    event = succeeded(track("t1", audio_url=secret_file.as_uri(), stream_audio_url="ftp://example.com/a.mp3"))
    with pytest.raises(DownloadError, match="http or https"):
        downloader(tmp_path).deliver(event, "k")
    assert not (tmp_path / "dl" / "job-1" / "t1.mp3").exists()


def test_redirect_targets_pass_the_guard(server: LocalServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Treat the first hop as public; its redirect target gets the real, strict check.
    def guard(url: str, *, allow_private: bool) -> None:
        if not url.endswith("/public"):
            check_public_url(url, allow_private=False)

    monkeypatch.setattr(download_mod, "check_public_url", guard)
    server.routes["/public"] = (302, {"Location": "/internal"}, b"")
    server.routes["/internal"] = audio(MP3_A)
    with pytest.raises(DownloadError, match="not a public address"):
        downloader(tmp_path).deliver(succeeded(track("t1", audio_url=server.url("/public"))), "k")
    assert server.hits("/public") == 1 and server.hits("/internal") == 0


def test_redirects_are_followed(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = (307, {"Location": "/real.mp3"}, b"")
    server.routes["/real.mp3"] = audio(MP3_A)
    downloader(tmp_path).deliver(succeeded(track("t1", audio_url=server.url("/a.mp3"))), "k")
    assert manifest(tmp_path)["tracks"][0]["size"] == len(MP3_A)


def test_oversized_body_is_rejected(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_mod, "MAX_AUDIO_BYTES", 100)
    server.routes["/big.mp3"] = audio(MP3_A)
    with pytest.raises(DownloadError, match="cap"):
        downloader(tmp_path).deliver(succeeded(track("t1", audio_url=server.url("/big.mp3"))), "k")
    assert leftovers(tmp_path) == []


def test_identical_takes_fixed_by_the_next_url(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    server.routes["/b.mp3"] = audio(MP3_A)  # the CDN collision: take b served take a's bytes
    server.routes["/b-stream"] = audio(MP3_B)
    event = succeeded(track("a", audio_url=server.url("/a.mp3")),
                      track("b", audio_url=server.url("/b.mp3"), stream_audio_url=server.url("/b-stream")))
    downloader(tmp_path).deliver(event, "k")
    data = manifest(tmp_path)
    assert data["identical_takes"] is False
    assert data["tracks"][1]["url"] == server.url("/b-stream")
    assert data["tracks"][1]["sha256"] == hashlib.sha256(MP3_B).hexdigest()
    assert (tmp_path / "dl" / "job-1" / "b.mp3").read_bytes() == MP3_B


def test_identical_takes_that_stay_identical_are_flagged(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    server.routes["/b.mp3"] = audio(MP3_A)
    event = succeeded(track("a", audio_url=server.url("/a.mp3")), track("b", audio_url=server.url("/b.mp3")))
    handler = downloader(tmp_path)
    handler.deliver(event, "k")
    data = manifest(tmp_path)
    assert data["identical_takes"] is True and data["complete"] is True
    assert server.hits("/b.mp3") == 2  # one re-download, from the same URL as there is no other
    handler.deliver(event, "k")
    assert server.hits() == 3 and manifest(tmp_path)["identical_takes"] is True


def test_identical_takes_recovered_by_refetching_the_same_url(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    server.routes["/b.mp3"] = [audio(MP3_A), audio(MP3_B)]
    event = succeeded(track("a", audio_url=server.url("/a.mp3")), track("b", audio_url=server.url("/b.mp3")))
    downloader(tmp_path).deliver(event, "k")
    data = manifest(tmp_path)
    assert data["identical_takes"] is False
    assert data["tracks"][1]["sha256"] == hashlib.sha256(MP3_B).hexdigest()


def test_failed_job_is_a_no_op(server: LocalServer, tmp_path: Path) -> None:
    event = succeeded(track("t1", audio_url=server.url("/a.mp3")))
    event.update(event="job.failed", tracks=[], error={"kind": "generation_failed", "message": "x"})
    downloader(tmp_path).deliver(event, "job-1:job.failed")
    assert server.hits() == 0
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_unsafe_ids_stay_inside_the_download_dir(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/a.mp3"] = audio(MP3_A)
    event = succeeded(track("../../escape", audio_url=server.url("/a.mp3")), job_id="../outside")
    downloader(tmp_path).deliver(event, "k")
    files = [p for p in (tmp_path / "dl").rglob("*") if p.is_file()]
    assert len(files) == 2 and all(p.resolve().is_relative_to((tmp_path / "dl").resolve()) for p in files)
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(("head", "ext"), [
    (b"ID3\x04", "mp3"), (b"\xff\xfb\x90\x64", "mp3"), (b"\xff\xf3\x44\xc4", "mp3"),
    (b"RIFF\x24\x08\x00\x00WAVEfmt ", "wav"), (b"OggS\x00\x02", "ogg"), (b"fLaC\x00\x00", "flac"),
    (b"\x00\x00\x00\x20ftypM4A ", "m4a"),
    (b"<html>", None), (b"{\"code\":403}", None), (b"error code: 1010", None), (b"\xff\xff\xff\xff", None),
    (b"", None),
])
def test_sniff_audio(head: bytes, ext: str | None) -> None:
    assert sniff_audio(head) == ext


# -- URL guard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/a.mp3", "http://127.0.0.1:8080/", "http://[::1]/", "http://169.254.169.254/latest/meta-data",
    "http://169.254.1.2/", "http://localhost/", "http://a.localhost/", "http://0.0.0.0/", "http://192.168.1.1/",
    "http://172.16.5.4/", "http://100.64.0.1/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://[fc00::1]/", "http://[64:ff9b::a00:1]/",
    "http://2130706433/", "http://0x7f.1/", "http://127.1/",
])
def test_check_public_url_refuses_private_addresses(url: str) -> None:
    with pytest.raises(ValueError, match="not a public address|loopback name"):
        check_public_url(url, allow_private=False)
    check_public_url(url, allow_private=True)


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.com/a.mp3", "http or https"), ("file:///etc/passwd", "http or https"),
    ("javascript:alert(1)", "http or https"), ("example.com/a.mp3", "http or https"),
    ("http:///a.mp3", "no host"), ("", "empty"), ("http://example.com:99999/", "malformed"),
])
def test_check_public_url_refuses_bad_urls(url: str, message: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(ValueError, match=message):
            check_public_url(url, allow_private=allow_private)


def test_check_public_url_accepts_public_literals_without_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no DNS lookup expected for an IP literal")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    check_public_url("http://93.184.216.34/a.mp3", allow_private=False)
    check_public_url("https://[2606:2800:220:1:248:1893:25c8:1946]:8443/x", allow_private=False)


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_check_public_url_judges_every_resolved_address(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {
        "cdn.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "rebind.example": ["93.184.216.34", "10.1.2.3"],
        "inside.example": ["127.0.0.1"],
    })
    check_public_url("https://cdn.example/a.mp3", allow_private=False)
    with pytest.raises(ValueError, match=r"rebind\.example \(10\.1\.2\.3\) is not a public address"):
        check_public_url("https://rebind.example/a.mp3", allow_private=False)
    with pytest.raises(ValueError, match="not a public address"):
        check_public_url("http://inside.example/", allow_private=False)
    with pytest.raises(ValueError, match="does not resolve"):
        check_public_url("http://nowhere.example/", allow_private=False)
    check_public_url("http://nowhere.example/", allow_private=True)  # no lookup when private is allowed
