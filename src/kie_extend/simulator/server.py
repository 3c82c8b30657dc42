"""HTTP transport: a stdlib ThreadingHTTPServer in a background thread in front of a Simulator."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.core import Simulator
from kie_extend.simulator.protocol import SimReply, SimRequest, envelope

MAX_BODY = 200 * 1024 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    simulator: Simulator
    verbose: bool = False


class _Server6(_Server):
    address_family = socket.AF_INET6


class SimHandler(BaseHTTPRequestHandler):
    """Turns HTTP requests into SimRequests and SimReplies back into HTTP answers."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "KieSimulator/1.0"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 120

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def do_PUT(self) -> None:  # noqa: N802
        self._serve()

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self, head: bool = False) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self._write(envelope(400, "Bad Request", status=400), head)
            self.close_connection = True
            return
        parts = urlsplit(self.path)
        req = SimRequest(method=self.command, path=parts.path,
                         query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                         headers={k.lower(): v for k, v in self.headers.items()}, body=body)
        reply = self.server.simulator.handle(req)
        if reply.delay > 0:
            time.sleep(reply.delay)
        if reply.drop:
            self._drop()
            return
        self._write(reply, head)

    def _write(self, reply: SimReply, head: bool) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        # Head and body in one write (one segment, one wakeup of the client), as end_headers would
        # send the head alone first.
        self._headers_buffer.append(b"\r\n")
        if not head:
            self._headers_buffer.append(reply.body)
        self.flush_headers()

    def _drop(self) -> None:
        """Close the connection abruptly (RST) without sending a byte."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


class SimServer:
    """A running simulator: `.url`, `.port`, `.simulator`, `.stop()`; also a context manager."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.port}"
        self.simulator = httpd.simulator
        self._stopped = False

    def stop(self) -> None:
        """Stop serving and the simulator's background threads (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self.simulator.close()

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0,
          verbose: bool = False, state_file: str | os.PathLike[str] | None = None) -> SimServer:
    """Start a simulator on `host:port` (0 = any free port) in a background thread.

    `state_file`: keep the simulator's tasks in this JSON file and start from it (see `state`);
    raises `StateError` (a ValueError) when it exists but is not simulator state, OSError when
    the address is taken."""
    config = config or SimConfig()
    simulator = Simulator(config, state_file=state_file)
    try:
        httpd = (_Server6 if ":" in host else _Server)((host, port), SimHandler)
    except OSError:
        simulator.scheduler.close()
        raise
    httpd.verbose = verbose
    httpd.simulator = simulator
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="kie-simulator-http", daemon=True)
    thread.start()
    server = SimServer(httpd, thread)
    simulator.base_url = server.url
    return server
