"""File routes: generated tracks, source files, cover images, and the file-upload API."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import requests

from kie_extend.infra.endpoints import is_loopback_host
from kie_extend.simulator.audio import audio_duration, mp3_bytes, png_bytes
from kie_extend.simulator.protocol import SimReply, SimRequest, envelope, json_reply, raw_reply, upload_error
from kie_extend.simulator.rules import SourceFetchError
from kie_extend.simulator.tasks import CALLBACK_EXCEPTION, FIRST_SUCCESS, SUCCESS
from kie_extend.simulator.uploads import FormPart, decode_base64, guess_mime, parse_multipart, storage_path

if TYPE_CHECKING:
    from kie_extend.simulator.host import SimHost

SOURCE_RE = re.compile(r"^/files/source/(\d+(?:\.\d+)?)s\.mp3$")
_TAKE = re.compile(r"^/files/(audio|source-audio|stream|source-stream|image|source-image)/([0-9a-f]{32})(?:\.\w+)?$")
_READY = {
    "audio": (SUCCESS, CALLBACK_EXCEPTION),
    "source-audio": (SUCCESS, CALLBACK_EXCEPTION),
}
_EARLY = (FIRST_SUCCESS, SUCCESS, CALLBACK_EXCEPTION)


def _not_found() -> SimReply:
    return envelope(404, "Not Found", status=404)


def serve_file(sim: SimHost, req: SimRequest) -> SimReply:
    """`GET /files/...`: source files of any nominal length, and the takes' audio and images."""
    served = sim.config.served_seconds
    match = SOURCE_RE.match(req.path)
    if match:
        return raw_reply(mp3_bytes(min(float(match.group(1)), served)), "audio/mpeg")
    match = _TAKE.match(req.path)
    found = sim.takes.get(match.group(2)) if match else None
    if not match or not found:
        return _not_found()
    kind, (task, take) = match.group(1), found
    if task.status(time.monotonic()) not in _READY.get(kind, _EARLY):
        return _not_found()
    if kind.endswith("image"):
        return raw_reply(png_bytes(), "image/png")
    if kind.endswith("stream") and task.empty_stream:
        sim.stats.tally("faults", "fault_empty_stream")
        return raw_reply(b"", "audio/mpeg")
    return raw_reply(mp3_bytes(min(take.duration, served), take.id.encode()), "audio/mpeg")


def serve_upload(sim: SimHost, req: SimRequest) -> SimReply:
    """`GET /uploads/<filePath>`: an uploaded file until it expires."""
    upload = sim.uploads.get(unquote(req.path[len("/uploads/"):]), sim.upload_ttl())
    return raw_reply(upload.data, upload.mime) if upload else _not_found()


def _store(sim: SimHost, req: SimRequest, data: bytes, mime: str | None, original: str | None,
           upload_path: str | None, file_name: str | None, duration: float | None = None) -> SimReply:
    if not data:
        return upload_error(400, "file is empty")
    path = storage_path(upload_path, file_name, original, mime)
    mime = guess_mime(file_name or original or path, mime)
    if duration is None:
        duration = audio_duration(data)
    upload = sim.uploads.put(path, data, mime, duration, sim.upload_ttl())
    sim.stats.add("uploads")
    sim.uploaded(upload)
    return json_reply(upload.response(sim.public_base(req)))


def _text(part: FormPart | None) -> str | None:
    return (part.data.decode("utf-8", "replace").strip() or None) if part else None


def _opt(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def upload_stream(sim: SimHost, req: SimRequest) -> SimReply:
    """`POST /api/file-stream-upload` (multipart/form-data: file, uploadPath, fileName)."""
    _, denied = sim.authenticate(req)
    if denied:
        return upload_error(401, "Unauthorized: missing or invalid API key")
    try:
        fields = parse_multipart(req.header("content-type"), req.body)
    except ValueError as exc:
        return upload_error(400, str(exc))
    part = fields.get("file")
    if part is None or part.filename is None and not part.data:
        return upload_error(400, "file is required")
    return _store(sim, req, part.data, part.content_type, part.filename,
                  _text(fields.get("uploadPath")), _text(fields.get("fileName")))


def _json_body(req: SimRequest) -> dict[str, Any] | None:
    try:
        body = req.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def upload_base64(sim: SimHost, req: SimRequest) -> SimReply:
    """`POST /api/file-base64-upload` (JSON: base64Data, uploadPath, fileName)."""
    _, denied = sim.authenticate(req)
    if denied:
        return upload_error(401, "Unauthorized: missing or invalid API key")
    body = _json_body(req)
    if body is None or not isinstance(body.get("base64Data"), str) or not body["base64Data"]:
        return upload_error(400, "base64Data is required")
    try:
        data, mime = decode_base64(body["base64Data"])
    except ValueError as exc:
        return upload_error(400, str(exc))
    return _store(sim, req, data, mime, None, _opt(body.get("uploadPath")), _opt(body.get("fileName")))


def upload_url(sim: SimHost, req: SimRequest) -> SimReply:
    """`POST /api/file-url-upload` (JSON: fileUrl, uploadPath, fileName); fetches loopback URLs only."""
    _, denied = sim.authenticate(req)
    if denied:
        return upload_error(401, "Unauthorized: missing or invalid API key")
    body = _json_body(req) or {}
    url = body.get("fileUrl")
    if not isinstance(url, str) or not url:
        return upload_error(400, "fileUrl is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not is_loopback_host(parts.hostname or ""):
        return upload_error(400, "the simulator only fetches http(s) URLs on loopback hosts")
    try:
        resp = requests.get(url, timeout=30)
    except requests.RequestException as exc:
        return upload_error(400, f"could not download fileUrl: {exc.__class__.__name__}")
    if resp.status_code != 200:
        return upload_error(400, f"could not download fileUrl: HTTP {resp.status_code}")
    try:
        duration = sim.source_duration(url, req)
    except SourceFetchError:
        duration = None
    original = parts.path.rsplit("/", 1)[-1]
    mime = resp.headers.get("content-type", "").split(";")[0] or None
    return _store(sim, req, resp.content, mime, original, _opt(body.get("uploadPath")),
                  _opt(body.get("fileName")), duration)
