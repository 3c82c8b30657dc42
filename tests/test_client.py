"""KieClient against the in-thread simulator and small scripted stdlib HTTP servers.

Reference §3 (envelope, code catalogue, HTTP-level errors), §4 (record-info parsing), §1.2/§7.2
(browser-like User-Agent) and §3.2/§8 point 5 (retry classes and waits).
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from requests import exceptions as rexc

import kie_extend.errors as errors_module
from kie_extend.provider.client import KieClient, parse_record, parse_track, track_has_audio
from kie_extend.errors import (
    RETRY_MAX_SECONDS,
    AccountError,
    ConnectError,
    GenerationFailedError,
    InvalidRequestError,
    OutcomeUnknownError,
    ProviderCodeError,
    ProviderError,
    RateLimitedError,
    RejectedError,
    TransportError,
    UnavailableError,
    error_for_code,
    retry_delay,
)
from kie_extend.simulator import SimConfig, SimServer, serve

API_KEY = "sk-live-DO-NOT-LEAK-7f3a9c2e51b04d68"
BODY = {"uploadUrl": "", "defaultParamFlag": True, "instrumental": False, "continueAt": 10.5, "model": "V5",
        "callBackUrl": "http://127.0.0.1:9/kie/callback/j1", "prompt": "[Verse] la", "style": "folk", "title": "T"}

#: Every exception raised in this module, checked for the API key at the end of each test.
RAISED: list[BaseException] = []


def assert_no_secret(exc: BaseException) -> None:
    """The API key (and its Authorization header) appear nowhere in the error, its args or its causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts = [str(current), repr(current), *(str(a) for a in current.args), *(repr(a) for a in current.args)]
        for text in texts:
            assert API_KEY not in text, f"API key leaked in {type(current).__name__}: {text[:200]}"
            assert API_KEY[-16:] not in text, f"part of the API key leaked in {type(current).__name__}"
        current = current.__cause__ or current.__context__
    if isinstance(exc, ProviderError):  # Celery rebuilds errors from their reduce args
        assert API_KEY.encode() not in pickle.dumps(exc)


@pytest.fixture(autouse=True)
def _no_key_in_any_error() -> Iterator[None]:
    RAISED.clear()
    yield
    for exc in RAISED:
        assert_no_secret(exc)


def expect(cls: type[BaseException], call: Callable[[], Any]) -> Any:
    """Run ``call``, require it to raise ``cls`` and record the exception for the secret check."""
    with pytest.raises(cls) as info:
        call()
    RAISED.append(info.value)
    assert_no_secret(info.value)
    return info.value


# ----- servers ----------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] = field(default_factory=lambda: {"code": 200, "msg": "success",
                                                                          "data": {"taskId": "a" * 32}})
    content_type: str = "application/json"
    delay: float = 0.0
    truncate: bool = False  # announce more bytes than are sent, then close


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Scripted:
    """A stdlib HTTP server answering every request with ``reply``; records what it received."""

    def __init__(self) -> None:
        self.reply = Reply()
        self.seen: list[Seen] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
                r = owner.reply
                if r.delay:
                    time.sleep(r.delay)
                data = r.body if isinstance(r.body, bytes) else (
                    r.body.encode() if isinstance(r.body, str) else json.dumps(r.body).encode())
                head = (f"HTTP/1.0 {r.status} X\r\nContent-Type: {r.content_type}\r\n"
                        f"Content-Length: {len(data) + (100 if r.truncate else 0)}\r\n\r\n").encode()
                try:
                    self.wfile.write(head + data)
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def client(self, **kwargs: Any) -> KieClient:
        return KieClient(self.url, API_KEY, **kwargs)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    servers: list[SimServer] = []

    def build(**knobs: Any) -> SimServer:
        server = serve(SimConfig(**{"callbacks": False, "seed": 11, **knobs}))
        servers.append(server)
        return server

    yield build
    for server in servers:
        server.stop()


def body_for(sim: SimServer, **overrides: Any) -> dict[str, Any]:
    return {**BODY, "uploadUrl": f"{sim.url}/files/source/30s.mp3", **overrides}


# ----- success ----------------------------------------------------------------------------------------

def test_submit_success_returns_task_id(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(api_key=API_KEY)
    client = KieClient(sim.url + "/", API_KEY)
    body = body_for(sim)
    task_id = client.submit_extend(body)
    assert isinstance(task_id, str) and len(task_id) == 32 and int(task_id, 16) >= 0
    record = client.record_info(task_id)
    assert record.task_id == task_id and record.status == "PENDING" and not record.finished
    assert record.tracks == [] and record.param == body
    assert client.credits() == pytest.approx(10000 - 12)
    assert API_KEY not in repr(client)


def test_success_answer_without_task_id_is_retryable(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": 200, "msg": "success", "data": None})
    exc = expect(UnavailableError, lambda: scripted.client().submit_extend(BODY))
    assert exc.retryable


# ----- body codes (§3.1: errors normally come back with HTTP 200) -------------------------------------

CODES = [
    (401, "Unauthorized: invalid key", AccountError, False),
    (402, "Insufficient credits", AccountError, False),
    (433, "sub-key usage limit exceeded", AccountError, False),
    (429, "Rate limit exceeded", RateLimitedError, True),
    (422, "model is invalid", InvalidRequestError, False),
    (400, "bad parameter", InvalidRequestError, False),
    (413, "matches an existing work", InvalidRequestError, False),
    (455, "Service unavailable: maintenance", UnavailableError, True),
    (500, "Server error, please try again later", UnavailableError, True),
    (500, "This field is required", InvalidRequestError, False),
    (408, "timeout", UnavailableError, True),
    (501, "Audio generation failed", GenerationFailedError, False),
    (531, "failed, credits refunded", GenerationFailedError, False),
    (404, "Not Found", RejectedError, False),
    (409, "record already exists", RejectedError, False),
    (451, "File fetch failed", RejectedError, False),
    (418, "undocumented 4xx", RejectedError, False),
    (599, "undocumented 5xx", UnavailableError, True),
]


@pytest.mark.parametrize(("code", "msg", "cls", "retryable"), CODES,
                         ids=[f"{c}-{m.split()[0]}" for c, m, _, _ in CODES])
@pytest.mark.parametrize("http_status", ["200", "same"])
def test_body_code_maps_to_exception(scripted: Scripted, code: int, msg: str, cls: type[ProviderCodeError],
                                     retryable: bool, http_status: str) -> None:
    status = 200 if http_status == "200" else code
    scripted.reply = Reply(status=status, body={"code": code, "msg": msg, "data": None})
    exc = expect(cls, lambda: scripted.client().submit_extend(BODY))
    assert type(exc) is cls and exc.code == code and exc.msg == msg and exc.retryable is retryable
    assert type(error_for_code(code, msg)) is cls


def test_505_feature_disabled_is_permanent(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": 505, "msg": "feature disabled", "data": None})
    exc = expect(ProviderCodeError, lambda: scripted.client().submit_extend(BODY))
    assert isinstance(exc, RejectedError) and not exc.retryable


def test_code_as_string_and_bad_code(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": "422", "msg": "bad"})
    assert expect(InvalidRequestError, lambda: scripted.client().submit_extend(BODY)).code == 422
    scripted.reply = Reply(status=503, body={"code": "n/a", "msg": "odd"})
    assert expect(UnavailableError, lambda: scripted.client().submit_extend(BODY)).code == 503


def test_http_error_status_wins_over_body_code_200(scripted: Scripted) -> None:
    scripted.reply = Reply(status=500, body={"code": 200, "msg": "success", "data": {"taskId": "x"}})
    exc = expect(UnavailableError, lambda: scripted.client().submit_extend(BODY))
    assert exc.code == 500


# ----- HTTP-level errors (§3.3) -------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 504, 520])
def test_5xx_with_non_json_body_is_retryable(scripted: Scripted, status: int) -> None:
    scripted.reply = Reply(status=status, body="<html><body>Bad gateway</body></html>", content_type="text/html")
    exc = expect(UnavailableError, lambda: scripted.client().submit_extend(BODY))
    assert exc.retryable and exc.code == status


def test_cloudflare_403_1010_is_not_retryable(scripted: Scripted) -> None:
    scripted.reply = Reply(status=403, body="error code: 1010", content_type="text/plain")
    exc = expect(ProviderCodeError, lambda: scripted.client().submit_extend(BODY))
    assert exc.code == 403 and not exc.retryable and "1010" in exc.msg
    assert isinstance(exc, RejectedError)


def test_edge_429_without_json_is_rate_limited(scripted: Scripted) -> None:
    scripted.reply = Reply(status=429, body="Too Many Requests", content_type="text/plain")
    exc = expect(RateLimitedError, lambda: scripted.client().submit_extend(BODY))
    assert exc.retryable and exc.code == 429


@pytest.mark.parametrize("body", ["<html>maintenance</html>", "", "[1, 2]", '{"msg": "no code"}'],
                         ids=["html", "empty", "array", "no-code"])
def test_http_200_without_envelope_is_retryable(scripted: Scripted, body: str) -> None:
    scripted.reply = Reply(status=200, body=body, content_type="text/html")
    exc = expect(UnavailableError, lambda: scripted.client().submit_extend(BODY))
    assert exc.retryable


def test_long_error_page_is_truncated(scripted: Scripted) -> None:
    scripted.reply = Reply(status=502, body="x" * 50_000, content_type="text/html")
    exc = expect(UnavailableError, lambda: scripted.client().submit_extend(BODY))
    assert len(str(exc)) < 1000


# ----- transport errors ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_is_connect_error() -> None:
    client = KieClient(f"http://127.0.0.1:{_free_port()}", API_KEY, connect_timeout=1)
    exc = expect(ConnectError, lambda: client.submit_extend(BODY))
    assert exc.sent is False and exc.retryable
    assert isinstance(exc, TransportError)
    exc = expect(ConnectError, lambda: client.record_info("t"))
    assert exc.sent is False


class _RaisingSession:
    """A stand-in for requests.Session whose every request fails with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.calls = 0

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.exc


_RD = "RemoteDisconnected('Remote end closed connection without response')"
TRANSPORT_CASES = {
    # never reached the provider: safe to resend
    "connect-timeout": (rexc.ConnectTimeout("timed out connecting"), ConnectError),
    "refused": (rexc.ConnectionError("[Errno 111] Connection refused"), ConnectError),
    "new-connection": (rexc.ConnectionError("NewConnectionError: Failed to establish a new connection"), ConnectError),
    "dns": (rexc.ConnectionError("NameResolutionError: Failed to resolve 'api.kie.ai'"), ConnectError),
    "tls": (rexc.SSLError("certificate verify failed"), ConnectError),
    "proxy": (rexc.ProxyError("Unable to connect to proxy"), ConnectError),
    "invalid-url": (rexc.InvalidURL("bad url"), ConnectError),
    # may have reached it: never resend blindly
    "read-timeout": (rexc.ReadTimeout("read timed out"), OutcomeUnknownError),
    "chunked": (rexc.ChunkedEncodingError("Connection broken: IncompleteRead"), OutcomeUnknownError),
    "dropped": (rexc.ConnectionError(f"('Connection aborted.', {_RD})"), OutcomeUnknownError),
    "reset": (rexc.ConnectionError("ConnectionResetError(104, 'Connection reset by peer')"), OutcomeUnknownError),
}


@pytest.mark.parametrize(("exc", "cls"), list(TRANSPORT_CASES.values()), ids=list(TRANSPORT_CASES))
def test_transport_error_classification(exc: Exception, cls: type[TransportError]) -> None:
    session = _RaisingSession(exc)
    client = KieClient("https://api.kie.ai", API_KEY, session=session)  # type: ignore[arg-type]
    err = expect(cls, lambda: client.submit_extend(BODY))
    assert err.sent is (cls is OutcomeUnknownError) and err.__cause__ is exc and session.calls == 1


def test_read_timeout_is_outcome_unknown(scripted: Scripted) -> None:
    scripted.reply = Reply(delay=1.5)
    client = scripted.client(read_timeout=0.3)
    started = time.monotonic()
    exc = expect(OutcomeUnknownError, lambda: client.submit_extend(BODY))
    assert time.monotonic() - started < 1.4
    assert exc.sent is True and not exc.retryable and exc.kind == "submit_outcome_unknown"
    assert len(scripted.seen) == 1  # the request did reach the server


def test_truncated_answer_is_outcome_unknown(scripted: Scripted) -> None:
    scripted.reply = Reply(truncate=True)
    exc = expect(OutcomeUnknownError, lambda: scripted.client().submit_extend(BODY))
    assert exc.sent is True


def test_keep_alive_connection_closed_while_idle_is_replaced_not_outcome_unknown() -> None:
    """A kept-alive connection the server closed while it sat idle in the pool is replaced before
    the next request goes out: that request is sent once, on a new connection, and succeeds (were it
    written to the dead socket, a submit would end as "outcome unknown")."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests_seen: list[bytes] = []

    def serve_one_request_per_connection() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                requests_seen.append(head.split(b"\r\n")[0])
                body = json.dumps({"code": 200, "msg": "success", "data": {"taskId": f"t{len(requests_seen)}"}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                time.sleep(0.1)  # then close: the client still holds the connection as kept alive

    server = threading.Thread(target=serve_one_request_per_connection, daemon=True)
    server.start()
    try:
        client = KieClient(f"http://127.0.0.1:{listener.getsockname()[1]}", API_KEY)
        assert client.submit_extend(BODY) == "t1"
        time.sleep(0.3)
        assert client.submit_extend(BODY) == "t2"
        server.join(5)
        assert requests_seen == [b"POST /api/v1/generate/upload-extend HTTP/1.1"] * 2
    finally:
        listener.close()


def test_simulator_drop_after_accept_is_outcome_unknown(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_drop_after_accept=1.0)
    client = KieClient(sim.url, API_KEY)
    exc = expect(OutcomeUnknownError, lambda: client.submit_extend(body_for(sim)))
    assert exc.sent is True and not exc.retryable
    stats = sim.simulator.stats_snapshot()
    assert stats["tasks"] == 1  # the provider did create (and bill) a task: never resend blindly


# ----- the simulator's own error answers ---------------------------------------------------------------

def test_simulator_error_answers(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(api_key=API_KEY, rate_limit=4)
    wrong = KieClient(sim.url, "sk-other-key")
    assert expect(AccountError, lambda: wrong.submit_extend(body_for(sim))).code == 401
    client = KieClient(sim.url, API_KEY)
    bad = expect(InvalidRequestError, lambda: client.submit_extend(body_for(sim, model="V9")))
    assert bad.code == 422 and "model" in bad.msg
    assert expect(InvalidRequestError, lambda: client.submit_extend(body_for(sim, continueAt=30))).code == 422
    gone = expect(RejectedError, lambda: client.submit_extend(body_for(sim, uploadUrl=f"{sim.url}/uploads/x.mp3")))
    assert gone.code == 451 and not gone.retryable
    assert client.submit_extend(body_for(sim))
    limited = expect(RateLimitedError, lambda: client.submit_extend(body_for(sim)))
    assert limited.code == 429 and limited.retryable


def test_simulator_account_and_faults(make_sim: Callable[..., SimServer]) -> None:
    broke = make_sim(credits=0)
    assert expect(AccountError, lambda: KieClient(broke.url, API_KEY).submit_extend(body_for(broke))).code == 402
    for knob, code in (("fault_455", 455), ("fault_500", 500), ("fault_429", 429)):
        sim = make_sim(**{knob: 1.0})
        exc = expect(ProviderCodeError, lambda: KieClient(sim.url, API_KEY).submit_extend(body_for(sim)))
        assert exc.code == code and exc.retryable
        assert sim.simulator.stats_snapshot()["tasks"] == 0  # not queued


def test_record_info_on_unknown_task_is_422(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim()
    client = KieClient(sim.url, API_KEY)
    exc = expect(ProviderCodeError, lambda: client.record_info("0" * 32))
    assert exc.code == 422 and "recordInfo is null" in exc.msg
    assert isinstance(exc, InvalidRequestError)


def test_record_info_with_null_data_is_422(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": 200, "msg": "success", "data": None})
    assert expect(ProviderCodeError, lambda: scripted.client().record_info("t")).code == 422


def test_credits_answer_without_number(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": 200, "msg": "success", "data": {"balance": "n/a"}})
    expect(UnavailableError, lambda: scripted.client().credits())
    scripted.reply = Reply(body={"code": 200, "msg": "success", "data": 42.5})
    assert scripted.client().credits() == 42.5


# ----- what the client sends ----------------------------------------------------------------------------

def test_headers_sent(scripted: Scripted) -> None:
    client = scripted.client()
    client.submit_extend(BODY)
    scripted.reply = Reply(body={"code": 200, "msg": "success", "data": {"taskId": "t1", "status": "PENDING"}})
    client.record_info("t1")
    post, get = scripted.seen
    for seen in (post, get):
        ua = seen.headers["User-Agent"]
        assert ua.startswith("Mozilla/5.0 (") and "python-requests" not in ua.lower()
        assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
        assert "json" in seen.headers["Accept"]
    assert post.method == "POST" and post.path == "/api/v1/generate/upload-extend"
    assert post.headers["Content-Type"] == "application/json" and json.loads(post.body) == BODY
    assert get.method == "GET" and get.path == "/api/v1/generate/record-info?taskId=t1"


# ----- parse_record (§4) ---------------------------------------------------------------------------------

CAMEL_TAKE = {
    "id": "0b6e5a4c-1f2d-4e3b-9a8c-7d6e5f4a3b21",
    "audioUrl": "https://tempfile.aiquickdraw.com/r/0b6e.mp3",
    "streamAudioUrl": "https://musicfile.kie.ai/MGI2",
    "imageUrl": "https://musicfile.kie.ai/image_0b6e.jpeg",
    "sourceAudioUrl": "https://tempfile.aiquickdraw.com/r/src.mp3",
    "sourceStreamAudioUrl": "https://cdn1.suno.ai/0b6e.mp3",
    "prompt": "[Verse]", "modelName": "chirp-crow", "title": "Demo (Extended)", "tags": "indie folk",
    "createTime": "2026-10-06 12:01:10", "duration": 187.4,
}
SNAKE_TAKE = {
    "id": "7c21d0e9-3a4b-4c5d-8e6f-9a0b1c2d3e4f",
    "audio_url": "https://tempfile.aiquickdraw.com/r/7c21.mp3",
    "source_audio_url": "https://tempfile.aiquickdraw.com/r/7c21s.mp3",
    "stream_audio_url": "https://musicfile.kie.ai/N2My",
    "source_stream_audio_url": "https://cdn1.suno.ai/7c21.mp3",
    "image_url": "https://musicfile.kie.ai/image_7c21.jpeg",
    "prompt": "", "model_name": "chirp-crow", "title": "Demo", "tags": "folk",
    "createTime": 1788331086662, "duration": "201.9",
}


def test_parse_record_camel_case() -> None:
    param = {"uploadUrl": "https://x/a.mp3", "model": "V5"}
    record = parse_record({"taskId": "t1", "param": json.dumps(param), "status": "SUCCESS",
                           "response": {"taskId": "t1", "sunoData": [CAMEL_TAKE, dict(CAMEL_TAKE, id="b")]},
                           "errorCode": None, "errorMessage": None})
    assert record.task_id == "t1" and record.status == "SUCCESS" and record.finished and not record.failed
    assert record.param == param and record.error_code is None
    take = record.tracks[0]
    assert take["id"] == CAMEL_TAKE["id"] and take["audio_url"] == CAMEL_TAKE["audioUrl"]
    assert take["stream_audio_url"] == CAMEL_TAKE["streamAudioUrl"]
    assert take["source_audio_url"] == CAMEL_TAKE["sourceAudioUrl"]
    assert take["source_stream_audio_url"] == CAMEL_TAKE["sourceStreamAudioUrl"]
    assert take["image_url"] == CAMEL_TAKE["imageUrl"] and take["model_name"] == "chirp-crow"
    assert take["create_time"] == "2026-10-06 12:01:10" and take["duration"] == 187.4
    assert [t["id"] for t in record.tracks] == [CAMEL_TAKE["id"], "b"]


def test_parse_record_snake_case_data_list() -> None:
    record = parse_record({"taskId": "t2", "status": "SUCCESS", "response": {"data": [SNAKE_TAKE]}})
    take = record.tracks[0]
    assert take["audio_url"] == SNAKE_TAKE["audio_url"] and take["stream_audio_url"] == SNAKE_TAKE["stream_audio_url"]
    assert take["source_audio_url"] == SNAKE_TAKE["source_audio_url"]
    assert take["source_stream_audio_url"] == SNAKE_TAKE["source_stream_audio_url"]
    assert take["image_url"] == SNAKE_TAKE["image_url"] and take["model_name"] == "chirp-crow"
    assert take["duration"] == 201.9 and take["create_time"] == 1788331086662 and take["prompt"] == ""


def test_parse_track_mixed_spellings_prefer_non_empty() -> None:
    take = parse_track({"id": "x", "audioUrl": "", "audio_url": "https://a/x.mp3", "duration": "n/a"})
    assert take["audio_url"] == "https://a/x.mp3" and take["duration"] is None
    assert track_has_audio(take)
    empty = parse_track({"id": "y", "audioUrl": "", "streamAudioUrl": ""})
    assert not track_has_audio(empty)
    assert track_has_audio(parse_track({"id": "z", "streamAudioUrl": "https://s/z"}))


@pytest.mark.parametrize("data", [{}, {"response": None}, {"response": {"sunoData": None}},
                                  {"response": {"sunoData": {"not": "a list"}}}, {"response": "text"},
                                  {"response": {"sunoData": ["junk", 3, None]}}],
                         ids=["empty", "null-response", "null-takes", "dict-takes", "string-response", "junk-items"])
def test_parse_record_empty_or_odd_responses(data: dict[str, Any]) -> None:
    record = parse_record(data)
    assert record.status == "PENDING" and record.tracks == [] and not record.finished and not record.failed
    assert record.param is None and record.error_code is None


@pytest.mark.parametrize(("status", "finished", "failed"), [
    ("PENDING", False, False), ("TEXT_SUCCESS", False, False), ("FIRST_SUCCESS", False, False),
    ("SUCCESS", True, False), ("success", True, False),
    ("CREATE_TASK_FAILED", True, True), ("GENERATE_AUDIO_FAILED", True, True),
    ("SENSITIVE_WORD_ERROR", True, True), ("CALLBACK_EXCEPTION", True, True),
    ("SOMETHING_NEW_FAILED", True, True), ("upload_failure", True, True), ("INTERNAL_ERROR", True, True),
    ("PROCESSING", False, False), ("QUEUED_AGAIN", False, False),
])
def test_status_classification(status: str, finished: bool, failed: bool) -> None:
    record = parse_record({"taskId": "t", "status": status})
    assert record.status == status.upper()
    assert record.finished is finished and record.failed is failed


def test_callback_exception_keeps_the_takes() -> None:
    """§4.2: CALLBACK_EXCEPTION may carry usable takes; the parser keeps them for the pipeline to judge."""
    record = parse_record({"taskId": "t", "status": "CALLBACK_EXCEPTION",
                           "response": {"sunoData": [CAMEL_TAKE, CAMEL_TAKE]}})
    assert record.failed and len(record.tracks) == 2 and all(track_has_audio(t) for t in record.tracks)


def test_parse_record_error_fields_and_bad_param() -> None:
    record = parse_record({"taskId": "t", "status": "GENERATE_AUDIO_FAILED", "errorCode": "500",
                           "errorMessage": "Internal Error, Please try again later.", "param": "{not json"})
    assert record.error_code == 500 and record.error_message.startswith("Internal Error") and record.param is None
    assert parse_record({"errorCode": "abc"}).error_code is None
    assert parse_record({"errorCode": ""}).error_code is None
    assert parse_record({"param": {"already": "dict"}}).param == {"already": "dict"}
    assert parse_record({"param": "[1]"}).param is None


# ----- retry_delay bounds (§3.2) -------------------------------------------------------------------------

class _FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


JITTER_EXTREMES = [0.0, 0.5, 0.999999]


def _delays(monkeypatch: pytest.MonkeyPatch, error: ProviderError, **kwargs: Any) -> list[float]:
    out = []
    for value in JITTER_EXTREMES:
        monkeypatch.setattr(errors_module, "random", _FixedRandom(value))
        out += [retry_delay(error, attempt, **kwargs) for attempt in range(1, 16)]
    return out


def test_retry_delay_grows_and_stays_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors_module, "random", _FixedRandom(0.5))
    delays = [retry_delay(UnavailableError(500), attempt) for attempt in range(1, 12)]
    assert delays == sorted(delays) and delays[0] > 0 and delays[1] > delays[0]
    assert delays[-1] == pytest.approx(RETRY_MAX_SECONDS)
    assert retry_delay(RateLimitedError(429), 1, rate_window=10) >= 10  # mid jitter
    assert retry_delay(UnavailableError(455), 1) >= 30


@pytest.mark.parametrize("window", [10.0, 7.0])
def test_retry_delay_429_waits_at_least_one_window(monkeypatch: pytest.MonkeyPatch, window: float) -> None:
    delays = _delays(monkeypatch, RateLimitedError(429, "Rate limit exceeded"), rate_window=window)
    assert min(delays) >= window


def test_retry_delay_455_waits_at_least_30s(monkeypatch: pytest.MonkeyPatch) -> None:
    assert min(_delays(monkeypatch, UnavailableError(455, "maintenance"))) >= 30


@pytest.mark.parametrize("error", [UnavailableError(500), UnavailableError(455), RateLimitedError(429),
                                   ConnectError("refused")], ids=["500", "455", "429", "connect"])
def test_retry_delay_is_capped(monkeypatch: pytest.MonkeyPatch, error: ProviderError) -> None:
    assert max(_delays(monkeypatch, error, rate_window=1000.0)) <= RETRY_MAX_SECONDS


def test_the_secret_check_itself_catches_a_leak() -> None:
    leaky = UnavailableError(500, f"echo: Authorization: Bearer {API_KEY}")
    with pytest.raises(AssertionError):
        assert_no_secret(leaky)
    wrapped = ConnectError("refused")
    wrapped.__cause__ = RuntimeError(f"headers={{'Authorization': 'Bearer {API_KEY}'}}")
    with pytest.raises(AssertionError):
        assert_no_secret(wrapped)
