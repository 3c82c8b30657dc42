"""Make a local audio file reachable as ``uploadUrl`` through KIE's file stream upload API.

The upload host (``KIE_UPLOAD_BASE_URL``, default ``https://kieai.redpandaai.co``) takes the same
Bearer key as the API and answers in the same ``code``/``msg``/``data`` envelope, so the transport
and envelope handling are the provider client's own. Uploads cost no credits; the provider keeps
the file for about 24 hours, so upload just before enqueueing.
"""

from __future__ import annotations

import mimetypes
import os
import re
import uuid
from dataclasses import dataclass

import requests

from kie_extend.provider.client import KieClient
from kie_extend.errors import ProviderError, UnavailableError, ValidationError
from kie_extend.provider.audio_probe import AUDIO_FILE_FIELD, AudioInfo

UPLOAD_PATH = "/api/file-stream-upload"
#: Folder (``uploadPath``) that our uploads go to on the provider's file host.
UPLOAD_FOLDER = "kie-extend"
#: Connect and read timeouts (seconds) of one upload; the read side covers sending tens of MB.
UPLOAD_TIMEOUT = (5.0, 300.0)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class UploadedAudio:
    """A local file that now lives at ``url`` on the provider's file host."""

    path: str
    url: str
    info: AudioInfo


class _UploadClient(KieClient):
    """The provider client's transport and envelope handling, with the multipart Content-Type left to requests."""

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        del headers["Content-Type"]
        return headers


def unique_name(path: str | os.PathLike[str]) -> str:
    """``<uuid>-<base name>``: the provider overwrites an earlier upload of the same name."""
    base = _UNSAFE.sub("_", os.path.basename(os.fspath(path))).strip("._") or "audio"
    return f"{uuid.uuid4().hex}-{base}"


def upload_file(path: str | os.PathLike[str], *, base_url: str, api_key: str,
                session: requests.Session | None = None,
                timeout: tuple[float, float] = UPLOAD_TIMEOUT, mime: str | None = None) -> str:
    """Upload one local file under a unique name; returns its ``downloadUrl`` (to use as ``uploadUrl``).

    ``requests`` builds the multipart body in memory rather than streaming it from disk; source
    audio is at most 8 minutes, i.e. tens of MB, which is acceptable. Raises the provider client's
    typed errors (ProviderCodeError, TransportError) and ValidationError when the file cannot be
    opened; no error text carries the API key.
    """
    name = os.fspath(path)
    remote = unique_name(name)
    content_type = mime or mimetypes.guess_type(name)[0] or "application/octet-stream"
    own = session is None
    client = _UploadClient(base_url, api_key, session=session or requests.Session(),
                           connect_timeout=timeout[0], read_timeout=timeout[1])
    try:
        with open(name, "rb") as fh:
            data = client._call("POST", UPLOAD_PATH, data={"uploadPath": UPLOAD_FOLDER, "fileName": remote},
                                files={"file": (remote, fh, content_type)})
    except OSError as exc:
        message = f"{name}: cannot be read ({exc.strerror or type(exc).__name__})"
        raise ValidationError([{"field": AUDIO_FILE_FIELD, "message": message}]) from None
    except ProviderError as exc:
        clean = _without_key(exc, api_key)
        if clean is exc:
            raise
        raise clean from None
    finally:
        if own:
            client.session.close()
    url = (data.get("downloadUrl") or data.get("fileUrl")) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url:
        raise UnavailableError(500, "upload answer without downloadUrl")
    return url


def _without_key(exc: ProviderError, api_key: str) -> ProviderError:
    """The same error with the API key masked, should the file host ever echo it back."""
    if not api_key or api_key not in str(exc):
        return exc
    cls, args = exc.__reduce__()[:2]
    return cls(*(a.replace(api_key, "***") if isinstance(a, str) else a for a in args))
