"""What one HTTP request may cost ``serve``: body size, body time, header time, JSON depth.

* :class:`BodyLimit` is a pure ASGI middleware around the whole app. It counts the bytes of the
  ``http.request`` messages as they arrive (chunked or not, whatever ``Content-Length`` claims) and
  answers ``413`` in the API's error shape as soon as a route's limit is passed: a declared
  ``Content-Length`` over the limit is refused before the app runs, a body that grows past it is cut
  off at the first chunk over it. The app never holds more than the limit. A chunked body is read
  to its end (within the limit and the deadline) before the app runs, so a route that never reads a
  body cannot act on an over-limit one. A request with both
  ``Content-Length`` and ``Transfer-Encoding`` is refused (400), as a proxy in front could frame it
  differently. The whole body must also
  arrive within ``KIE_HTTP_BODY_TIMEOUT`` seconds of the request's start, else ``408``. After either
  answer the connection is closed (``Connection: close``) and the app sees a client disconnect.
* :func:`guarded_protocol` is uvicorn's h11 protocol with a header deadline: a connection whose
  request line and headers are not complete within ``KIE_HTTP_HEADER_TIMEOUT`` seconds (after it
  opened, or after the previous response) is closed. uvicorn has no such timeout of its own, so a
  client trickling header bytes (slowloris) would otherwise hold a connection for ever.
* :func:`loads` parses JSON after a bracket-depth pre-scan, so a body nested deeper than
  ``KIE_HTTP_JSON_MAX_DEPTH`` is a :class:`TooDeep` (answered ``422``) rather than a recursion error.

Limits per route (:meth:`Limits.for_path`): ``/kie/callback/...`` ``KIE_HTTP_CALLBACK_MAX_BODY``,
``/v1`` ``KIE_HTTP_API_MAX_BODY``, everything else (dashboard forms, login)
``KIE_HTTP_FORM_MAX_BODY``.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from kie_extend.infra.jsontext import loads_unique

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """Body limits (bytes), the body deadline (seconds) and the JSON depth of one server."""

    callback_max_body: int = 256 * 1024
    api_max_body: int = 16 * 1024 * 1024
    form_max_body: int = 64 * 1024
    body_timeout: float = 30.0
    json_max_depth: int = 64

    @classmethod
    def from_settings(cls, settings: Any) -> "Limits":
        """The limits named by ``settings`` (``KIE_HTTP_*``)."""
        return cls(settings.http_callback_max_body, settings.http_api_max_body, settings.http_form_max_body,
                   settings.http_body_timeout, settings.http_json_max_depth)

    def for_path(self, path: str) -> int:
        """The largest body (bytes) a request to ``path`` may carry."""
        if path.startswith("/kie/"):
            return self.callback_max_body
        if path == "/v1" or path.startswith("/v1/"):
            return self.api_max_body
        return self.form_max_body


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"kind": kind, "message": message}}).encode()


class BodyLimit:
    """ASGI middleware: bounds every HTTP request body in size and time (see the module doc)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope.get("path", ""))
        headers = scope.get("headers", ())
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and any(k == b"transfer-encoding" for k, _ in headers):
            # Two framings at once (RFC 9112 6.3): the classic request-smuggling shape; refused.
            await _answer(send, 400, "bad_request", "Content-Length and Transfer-Encoding together")
            return
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _answer(send, 413, "too_large", f"the body is larger than {limit} bytes")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        received = 0
        complete = False
        started = False
        answered = False

        async def answer(status: int, kind: str, message: str) -> Message:
            nonlocal answered
            if not started:
                await _answer(send, status, kind, message)
            answered = True
            return {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if answered:
                return {"type": "http.disconnect"}
            if complete:  # only a disconnect can follow; no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await answer(408, "timeout", f"the body did not arrive within {self.limits.body_timeout:g} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    return await answer(413, "too_large", f"the body is larger than {limit} bytes")
                complete = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # we answered for the app; what it says after that goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        app_receive = guarded_receive
        if declared is None and any(k == b"transfer-encoding" for k, _ in headers):
            # A chunked body (no length to check up front) is read to its end before the app runs,
            # so a route that never reads a body (POST /v1/resume, GET /healthz) cannot act on a
            # request whose body is over its limit, and leaves no unread bytes behind. It is held
            # as the chunks that arrived (at most the limit) and handed on one by one.
            chunks: list[Message] = []
            while not complete:
                message = await guarded_receive()
                if answered:
                    return
                if message["type"] != "http.request":
                    chunks.append(message)  # the client left: the app sees that
                    break
                chunks.append(message)
            chunks.reverse()

            async def replay() -> Message:
                return chunks.pop() if chunks else await guarded_receive()

            app_receive = replay
        try:
            await self.app(scope, app_receive, guarded_send)
        except Exception:
            if not answered:
                raise


async def _answer(send: Send, status: int, kind: str, message: str) -> None:
    body = _error(kind, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class that closes a connection whose request headers are not
    complete within ``header_timeout`` seconds of it opening or of the previous response
    (for ``uvicorn.Config(http=...)``)."""

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _seen: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._check()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()
            self._check()

        def _check(self) -> None:
            # A new request cycle means its headers are complete: its body has BodyLimit's deadline.
            if self.cycle is not None and self.cycle is not self._seen:
                self._seen = self.cycle
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class TooDeep(ValueError):
    """A JSON text nested deeper than allowed."""


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (0 for a scalar), by a
    scan that skips string contents; never recurses. Malformed text gives some number and is left
    to the parser to refuse."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(raw: bytes | str, max_depth: int, *, unique: bool = False) -> Any:
    """``json.loads(raw)`` for a text nested at most ``max_depth`` deep. Raises :class:`TooDeep`
    (a ValueError) for a deeper one and ValueError for text that is not JSON; with ``unique``,
    ``jsontext.DuplicateKeyError`` (a ValueError) for an object that repeats a key."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_depth(data) > max_depth:
        raise TooDeep(f"nested more than {max_depth} deep")
    return loads_unique(raw) if unique else json.loads(raw)
