"""The edge of ``kie-extend serve`` under careless and hostile clients, on real processes.

Each test starts ``kie-extend serve`` (or ``serve --callbacks-only`` and its older name
``kie-extend callback-server``) as a child process on our own Valkey and talks to it over loopback with raw sockets or
``http.client``: bodies bounded while they are read (413, chunked or not, whatever
``Content-Length`` says) with the server's memory measured, JSON depth (422), slow headers and
bodies cut off (connection closed, 408), failed authentications limited per client address (429),
and dashboard sessions bound to their token and revoked at logout.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kie_extend.infra.embedded import EmbeddedValkey, free_port

WRITE = "w-" + uuid.uuid4().hex
READ = "r-" + uuid.uuid4().hex
MB = 1024 * 1024


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """The server's resident memory in bytes (``VmRSS``)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


@pytest.fixture
def start(valkey: EmbeddedValkey, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``kie-extend <command> <flags>`` with ``env`` on a free loopback port; all stopped at the end."""
    started: list[Server] = []

    def run(command: str = "serve", *flags: str, **env: str) -> Server:
        port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
        full.update({"KIE_REDIS_URL": valkey.url, "KIE_KEY_PREFIX": prefix, "KIE_QUEUE": prefix,
                     "KIE_API_KEY": "test-key-0123456789", "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/cb",
                     "KIE_ALLOW_PRIVATE_URLS": "true", **env})
        log = tmp_path / f"{command}-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kie_extend.cli", command, *flags, "--host",
                                     "127.0.0.1", "--port", str(port)], env=full, stdout=out, stderr=subprocess.STDOUT)
        server = Server(proc, port, log)
        started.append(server)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        return server
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    yield run
    for server in started:
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def upload(port: int, path: str, total: int, headers: dict[str, str], chunk: int = 64 * 1024,
           chunked: bool = True, content_type: str = "application/json") -> tuple[int, int, bytes]:
    """Send a ``total``-byte body (chunked, or with an honest Content-Length) to ``path``, stopping
    as soon as the server answers. ``(status, bytes sent, response)``; status 0: no answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    sent = 0
    piece = b"[" + b"1," * (chunk // 2 - 1) + b"1"  # valid JSON so far: the size, not the syntax, must stop it
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    try:
        sock.sendall(head.encode())
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(frame)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        data = read_response(sock)
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, sent, data


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), or what came before the connection ended."""
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _length(data: bytes) -> int:
    m = re.search(rb"(?i)content-length: (\d+)", data)
    return int(m.group(1)) if m else 0


def test_parallel_chunked_uploads_are_cut_off_early_and_memory_stays_bounded(
        start: Callable[..., Server]) -> None:
    """Three 200 MB chunked uploads to the open callback route and three to /v1/jobs at once: each
    gets 413 in the error shape long before its end, and serve's RSS grows by less than 100 MB."""
    server = start(KIE_API_TOKENS=WRITE)
    assert server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {WRITE}"})[0] == 200
    base = server.rss()
    peak = base
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss())
            time.sleep(0.02)

    results: list[tuple[str, int, int, bytes]] = []
    lock = threading.Lock()

    def one(path: str, headers: dict[str, str]) -> None:
        status, sent, data = upload(server.port, path, 200 * MB, headers)
        with lock:
            results.append((path, status, sent, data))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(p, h)) for p, h in
               [("/kie/callback/abc", {})] * 3 + [("/v1/jobs", {"Authorization": f"Bearer {WRITE}"})] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    assert len(results) == 6
    for path, status, sent, data in results:
        assert status == 413, (path, sent, data[:300])
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["kind"] == "too_large"
        limit = 256 * 1024 if path.startswith("/kie/") else 16 * MB
        assert sent < limit + 32 * MB, (path, sent)  # cut off early (plus what socket buffers held)
    assert peak - base < 100 * MB, (base, peak)
    # The server is still fine afterwards.
    assert server.request("POST", "/kie/callback/abc", b"{}")[0] == 200


def test_content_length_lies_and_every_route_is_bounded(start: Callable[..., Server]) -> None:
    server = start(KIE_API_TOKENS=WRITE)
    auth = {"Authorization": f"Bearer {WRITE}"}
    # A declared length over the limit: 413 before a byte of the body is sent, on every kind of route.
    for path, limit, headers in (("/kie/callback/abc", 256 * 1024, {}), ("/v1/jobs", 16 * MB, auth),
                                 ("/v1/pause", 16 * MB, auth), ("/login", 64 * 1024, {}),
                                 ("/pause", 64 * 1024, {}), ("/v1/jobs/x/cancel", 16 * MB, auth)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n"
                         + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
            data = read_response(sock)
        assert data.startswith(b"HTTP/1.1 413"), (path, data)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["kind"] == "too_large"
    # An honest length just over the limit, sent in full, and a chunked body: 413 too, also on the
    # dashboard's forms and on routes that never read a body.
    form = "application/x-www-form-urlencoded"
    for path, kind in (("/kie/callback/abc", "application/json"), ("/login", form), ("/logout", form),
                       ("/pause", form), ("/healthz", form), ("/login", "application/json")):
        for chunked in (False, True):
            status, sent, data = upload(server.port, path, 20 * MB, {"Origin": server.url}, chunked=chunked,
                                        content_type=kind)
            # 413 when declared or as soon as read; a chunked body is read before any route runs,
            # so a route that reads no body (or refuses a JSON one) cannot answer first.
            assert status == 413, (path, chunked, data[:300])
            assert sent < 8 * MB, (path, chunked, sent)
    # A declared length smaller than what follows: only the declared bytes are the body (here a
    # truncated JSON text, 400); the rest is no second request the server would act on.
    # The tail is small enough to sit in the socket buffers whole: the server answers after the five
    # declared bytes and may close before reading more, and a tail it never read would turn its close
    # into a reset that can discard the answer before this side reads it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(b"POST /kie/callback/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
                         + b'{"a": ' + b"1" * 16_384 + b"}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while more := sock.recv(65536):
                data += more
        except (ConnectionResetError, socket.timeout):
            pass
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert data.count(b"HTTP/1.1 200") == 0
    # Transfer-Encoding and Content-Length together is refused outright.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /kie/callback/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def test_deep_json_is_a_422_on_every_json_route(start: Callable[..., Server]) -> None:
    server = start(KIE_API_TOKENS=WRITE)
    auth = {"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"}
    for depth in (65, 1000, 30_000):
        for path in ("/v1/jobs", "/v1/pause"):
            status, _, body = server.request("POST", path, nested(depth), auth)
            assert status == 422, (path, depth, body[:300])
            err = json.loads(body)["error"]
            assert err["kind"] == "invalid_request" and "deep" in err["message"], err
        arrays = b"[" * depth + b"]" * depth
        status, _, body = server.request("POST", "/v1/jobs", arrays, auth)
        assert status == 422 and b"deep" in body
        status, _, body = server.request("POST", "/kie/callback/abc", nested(depth), {})
        assert status == 422, (depth, body)
    # Brackets inside strings are not nesting; 64 deep is allowed.
    text = json.dumps({"data": {"callbackType": "complete", "x": "[" * 5000 + "\\\"{" * 100}}).encode()
    assert server.request("POST", "/kie/callback/abc", text)[0] == 200
    assert server.request("POST", "/kie/callback/abc", nested(64))[0] == 200
    status, _, body = server.request("POST", "/v1/pause", json.dumps({"reason": "[" * 500}).encode(), auth)
    assert status == 200, body
    status, _, body = server.request("POST", "/v1/jobs", nested(64), auth)
    assert status == 422 and b"deep" not in body  # refused for its fields, parsed fine


def test_slow_clients_are_cut_off(start: Callable[..., Server]) -> None:
    """Headers trickled a byte at a time, a silent connection and a slow body: the first two are
    closed after KIE_HTTP_HEADER_TIMEOUT, the last gets 408 after KIE_HTTP_BODY_TIMEOUT."""
    server = start(KIE_API_TOKENS=WRITE, KIE_HTTP_HEADER_TIMEOUT="1s", KIE_HTTP_BODY_TIMEOUT="2s")

    def held(sock: socket.socket, feed: bytes, every: float, limit: float) -> tuple[float, bytes]:
        """Feed one byte every ``every`` s until the server closes; (seconds held, bytes read)."""
        began = time.monotonic()
        data = b""
        i = 0
        while time.monotonic() - began < limit:
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                try:
                    more = sock.recv(4096)
                except ConnectionResetError:
                    more = b""
                if not more:
                    return time.monotonic() - began, data
                data += more
                continue
            try:
                sock.send(feed[i % len(feed):i % len(feed) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - began, data
            i += 1
        return time.monotonic() - began, data

    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # slowloris headers
        took, _ = held(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: " + b"b" * 10_000, 0.2, 20)
    assert took < 10
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # silent
        took, _ = held(sock, b"", 60, 20)
    assert took < 10
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # a second request, slow headers
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        took, data = held(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: " + b"b" * 10_000, 0.2, 20)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1 and took < 10
    for path, headers in (("/kie/callback/abc", ""), ("/v1/jobs", f"Authorization: Bearer {WRITE}\r\n")):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # slow body
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 1000\r\n\r\n".encode())
            took, data = held(sock, b"[1,", 0.2, 20)
        assert data.startswith(b"HTTP/1.1 408"), (path, data)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["kind"] == "timeout"
        assert took < 10


def test_failed_authentications_are_limited_per_address(start: Callable[..., Server]) -> None:
    """200 wrong tokens from one address: 20 answered 401, the rest 429 with Retry-After, then even
    the right token from that address; another address is unaffected. The dashboard's login counts
    the same way."""
    server = start(KIE_API_TOKENS=f"{WRITE},read:{READ}")
    statuses = []
    for i in range(200):
        status, headers, _ = server.request("GET", "/v1/system", headers={"Authorization": f"Bearer wrong-{i}"})
        statuses.append(status)
        if status == 429:
            assert 1 <= int(headers["retry-after"]) <= 61
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    status, _, body = server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {WRITE}"})
    assert status == 429 and json.loads(body)["error"]["kind"] == "too_many_failures"
    assert WRITE not in body.decode()
    for token in (WRITE, READ):
        assert server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {token}"},
                              source="127.0.0.2")[0] == 200
    # A request with no credentials at all guesses nothing and is not counted.
    for _ in range(30):
        assert server.request("GET", "/v1/system", source="127.0.0.5")[0] == 401
    assert server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}"},
                          source="127.0.0.5")[0] == 200
    # The dashboard's login.
    form = {"Origin": server.url, "Content-Type": "application/x-www-form-urlencoded"}
    logins = [server.request("POST", "/login", b"token=nope&next=/", form, source="127.0.0.3")[0] for _ in range(25)]
    assert logins[:20] == [401] * 20 and set(logins[20:]) == {429}
    assert server.request("POST", "/login", f"token={WRITE}&next=/".encode(), form, source="127.0.0.3")[0] == 429
    assert server.request("POST", "/login", f"token={WRITE}&next=/".encode(), form, source="127.0.0.4")[0] == 303


class Browser:
    """Plain HTTP with one session cookie, as a browser would keep it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cookie = ""

    def login(self, token: str) -> None:
        status, headers, _ = self.server.request(
            "POST", "/login", f"token={token}&next=/".encode(),
            {"Origin": self.server.url, "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 303
        self.cookie = re.search(r"kie_session=([^;]+)", headers["set-cookie"]).group(1)  # type: ignore[union-attr]

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        status, headers, body = self.server.request("GET", path, headers={"Cookie": f"kie_session={self.cookie}"})
        return status, headers, body.decode()

    def post(self, path: str, form: str) -> tuple[int, dict[str, str], str]:
        status, headers, body = self.server.request(
            "POST", path, form.encode(), {"Cookie": f"kie_session={self.cookie}", "Origin": self.server.url,
                                          "Content-Type": "application/x-www-form-urlencoded"})
        return status, headers, body.decode()

    def csrf(self) -> str:
        status, _, page = self.get("/dead-letters")
        assert status == 200, page[:300]
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def _payload(cookie: str) -> str:
    """The session cookie's signed payload, decoded (itsdangerous: base64 JSON, maybe zlib'd)."""
    compressed = cookie.startswith(".")
    raw = cookie.lstrip(".").split(".")[0]
    data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    return (zlib.decompress(data) if compressed else data).decode()


def test_a_session_follows_its_token_and_ends_at_logout(start: Callable[..., Server]) -> None:
    """Restarts of serve with the same KIE_SESSION_SECRET and changed tokens: a session made with a
    write token turns read-only when the token becomes ``read:``, and ends when it is removed. The
    cookie holds a digest, never the token. Logging out makes the old cookie worthless."""
    secret = "s-" + uuid.uuid4().hex
    other = "o-" + uuid.uuid4().hex
    server = start(KIE_API_TOKENS=f"{WRITE},{other}", KIE_SESSION_SECRET=secret)
    browser = Browser(server)
    browser.login(WRITE)
    payload = json.loads(_payload(browser.cookie))
    assert set(payload) == {"sid", "d", "csrf"} and WRITE[2:] not in json.dumps(payload)
    csrf = browser.csrf()
    assert browser.post("/pause", f"csrf={csrf}&reason=test")[0] == 303
    assert browser.post("/resume", f"csrf={csrf}")[0] == 303
    server.proc.terminate()
    server.proc.wait(20)

    server = start(KIE_API_TOKENS=f"read:{WRITE},{other}", KIE_SESSION_SECRET=secret)
    browser.server = server
    status, _, page = browser.get("/")
    assert status == 200 and 'action="/pause"' not in page
    status, _, page = browser.post("/pause", f"csrf={csrf}&reason=test")
    assert status == 403 and "read-only" in page
    server.proc.terminate()
    server.proc.wait(20)

    server = start(KIE_API_TOKENS=other, KIE_SESSION_SECRET=secret)
    browser.server = server
    status, headers, _ = browser.get("/")
    assert status == 303 and headers["location"].startswith("/login")
    assert browser.post("/pause", f"csrf={csrf}&reason=test")[0] in (303, 403)
    status, headers, _ = browser.get("/")
    assert status == 303 and headers["location"].startswith("/login")

    # Logout, on the same server: the old cookie opens nothing afterwards, a new login works.
    browser.login(other)
    kept = browser.cookie
    csrf = browser.csrf()
    status, headers, _ = browser.post("/logout", f"csrf={csrf}")
    assert status == 303 and "kie_session=" in headers.get("set-cookie", "")
    browser.cookie = kept
    status, headers, _ = browser.get("/")
    assert status == 303 and headers["location"].startswith("/login")
    status, _, _ = browser.post("/pause", f"csrf={csrf}&reason=after-logout")
    assert status in (303, 403)
    status, headers, _ = browser.get("/")
    assert headers.get("location", "").startswith("/login")
    browser.login(other)
    assert browser.get("/")[0] == 200


@pytest.mark.parametrize("command", [["serve", "--callbacks-only"], ["callback-server"]], ids=" ".join)
def test_callbacks_only_bounds_bodies_too(start: Callable[..., Server], command: list[str]) -> None:
    server = start(*command, KIE_HTTP_CALLBACK_MAX_BODY="65536")
    status, _, _ = upload(server.port, "/kie/callback/abc", 50 * MB, {})
    assert status == 413
    status, _, _ = upload(server.port, "/kie/callback/abc", 50 * MB, {}, chunked=False)
    assert status == 413
    assert server.request("POST", "/kie/callback/abc", nested(1000))[0] == 422
    assert server.request("POST", "/kie/callback/abc", b"{}")[0] == 200
    assert server.request("GET", "/v1/system")[0] == 404 and server.request("GET", "/openapi.json")[0] == 404
    logged = server.log.read_text()
    assert "(callbacks only: /kie/callback/, probes, /metrics)" in logged
    noted = "note: callback-server is `kie-extend serve --callbacks-only`" in logged
    assert noted == (command[0] == "callback-server")


def test_the_failure_limit_forgets_an_address_after_its_window() -> None:
    """The counting itself, on a clock the test moves: the block lasts until the oldest failure is a
    window old, addresses are counted apart, and only ``max_addresses`` are remembered."""
    from kie_extend.http.auth import FailureLimit

    now = [1000.0]
    limit = FailureLimit(3, 60.0, max_addresses=2, clock=lambda: now[0])
    for _ in range(3):
        assert limit.retry_after("a") == 0.0
        limit.failed("a")
        now[0] += 10
    assert limit.retry_after("a") == pytest.approx(30.0)  # first failure at 1000, now 1030
    assert limit.retry_after("b") == 0.0
    now[0] += 30
    assert limit.retry_after("a") == 0.0  # the first failure left the window
    limit.failed("a")
    assert limit.retry_after("a") == pytest.approx(10.0)
    limit.failed("b")
    limit.failed("c")  # a third address: the least recently failing one ("a") is forgotten
    assert limit.retry_after("a") == 0.0
