"""The file-upload API's storage and request parsing (multipart via the stdlib `email` package)."""

from __future__ import annotations

import base64
import binascii
import email.policy
import mimetypes
import posixpath
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesParser
from typing import Any


@dataclass
class Upload:
    """A stored uploaded file."""

    path: str
    data: bytes
    mime: str
    duration: float | None
    created: float  # monotonic
    uploaded_at: str

    def response(self, base_url: str) -> dict[str, Any]:
        """The file-upload API's success envelope for this file."""
        return {
            "success": True,
            "code": 200,
            "msg": "File uploaded successfully",
            "data": {
                "success": True,
                "fileName": posixpath.basename(self.path),
                "filePath": self.path,
                "downloadUrl": f"{base_url}/uploads/{self.path}",
                "fileSize": len(self.data),
                "mimeType": self.mime,
                "uploadedAt": self.uploaded_at,
            },
        }


class UploadStore:
    """Uploaded files by path, expiring after a TTL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._files: dict[str, Upload] = {}
        self._lock = threading.Lock()

    def put(self, path: str, data: bytes, mime: str, duration: float | None, ttl: float) -> Upload:
        """Store (or overwrite) a file and drop expired ones."""
        now = self._clock()
        wall = datetime.now(UTC)
        stamp = wall.strftime("%Y-%m-%dT%H:%M:%S.") + f"{wall.microsecond // 1000:03d}Z"
        upload = Upload(path, data, mime, duration, now, stamp)
        with self._lock:
            for key in [k for k, u in self._files.items() if now - u.created >= ttl]:
                del self._files[key]
            self._files[path] = upload
        return upload

    def get(self, path: str, ttl: float) -> Upload | None:
        """The live file at `path`, or None if unknown or expired."""
        with self._lock:
            upload = self._files.get(path)
            if upload is not None and self._clock() - upload.created >= ttl:
                del self._files[path]
                return None
            return upload

    def all(self) -> list[Upload]:
        """Every stored file (expired ones included until the next put or get drops them)."""
        with self._lock:
            return list(self._files.values())

    def restore(self, upload: Upload) -> None:
        """Put back a file read from saved state, as it was."""
        with self._lock:
            self._files[upload.path] = upload

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def clear(self) -> None:
        """Forget every upload."""
        with self._lock:
            self._files.clear()


_SAFE = re.compile(r"[^A-Za-z0-9._\-]+")


def storage_path(upload_path: str | None, file_name: str | None, original: str | None, mime: str | None) -> str:
    """Where a file is stored: `kieai/sim/<uploadPath or uploads>/<fileName or generated name>`."""
    folder = "/".join(_SAFE.sub("_", p) for p in (upload_path or "uploads").split("/") if p not in ("", ".", ".."))
    name = _SAFE.sub("_", posixpath.basename((file_name or "").replace("\\", "/"))).strip("._")
    if not name:
        ext = posixpath.splitext(original or "")[1] or (mimetypes.guess_extension(mime or "") or "")
        ext = _SAFE.sub("", ext)[:10]
        name = f"{int(time.time() * 1000)}-{secrets.token_hex(5)}{ext}"
    return f"kieai/sim/{folder or 'uploads'}/{name}"


def guess_mime(name: str | None, declared: str | None) -> str:
    """The declared content type unless generic, else a guess from the name."""
    if declared and declared not in ("application/octet-stream", "text/plain"):
        return declared
    guessed = mimetypes.guess_type(name or "")[0]
    return guessed or declared or "application/octet-stream"


@dataclass
class FormPart:
    """One multipart/form-data field."""

    data: bytes
    filename: str | None
    content_type: str | None


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """Parse a multipart/form-data body into fields by name; ValueError if it is not one."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValueError("Content-Type must be multipart/form-data")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    msg = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("malformed multipart body")
    fields: dict[str, FormPart] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        declared = part.get_content_type() if part.get("content-type") else None
        fields[str(name)] = FormPart(payload, part.get_filename(), declared)
    return fields


def decode_base64(text: str) -> tuple[bytes, str | None]:
    """Decode plain base64 or a `data:<mime>;base64,<data>` URL; returns (bytes, mime or None)."""
    mime = None
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        mime = header[5:].split(";")[0] or None
    try:
        return base64.b64decode("".join(text.split()), validate=True), mime
    except (binascii.Error, ValueError):
        raise ValueError("base64Data is not valid base64") from None
