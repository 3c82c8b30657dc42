"""Transport-neutral request and reply objects exchanged between the HTTP layer and the simulator."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimRequest:
    """One HTTP request as the simulator sees it."""

    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def header(self, name: str) -> str:
        """Header value by case-insensitive name, or ''."""
        return str(self.headers.get(name.lower(), ""))

    @property
    def base_url(self) -> str:
        """`http://<Host header>`, or '' if the request carried none."""
        host = self.header("host")
        return f"http://{host}" if host else ""

    def json(self) -> Any:
        """The body parsed as JSON; ValueError if it is not."""
        return json.loads(self.body.decode("utf-8") or "null")


@dataclass
class SimReply:
    """What to answer: status, body, content type; `code` is what the stats record."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    code: int = 200
    delay: float = 0.0  # seconds to sleep before answering (slow fault)
    drop: bool = False  # close the connection without answering
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(payload: Any, code: int = 200, status: int = 200) -> SimReply:
    """A JSON reply whose stats code is `code`."""
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return SimReply(status=status, body=body, code=code)


def envelope(code: int, msg: str, data: Any = None, status: int = 200) -> SimReply:
    """The provider's `{"code", "msg", "data"}` envelope (HTTP 200 unless told)."""
    return json_reply({"code": code, "msg": msg, "data": data}, code=code, status=status)


def upload_error(code: int, msg: str) -> SimReply:
    """The file-upload API's error envelope."""
    return json_reply({"success": False, "code": code, "msg": msg, "data": None}, code=code)


def raw_reply(data: bytes, content_type: str, status: int = 200) -> SimReply:
    """A non-JSON reply (files)."""
    return SimReply(status=status, body=data, content_type=content_type, code=status)
