"""``download``: fetch every take of a succeeded job into ``KIE_DOWNLOAD_DIR/{job_id}/``.

For each track the URLs are tried in the order KIE recommends:
``audio_url`` → ``source_audio_url`` → ``stream_audio_url`` → ``source_stream_audio_url``, empty
ones skipped. Every URL, and every redirect it leads to, passes the SSRF guard
(:func:`kie_extend.provider.urlguard.check_public_url`) first. A body is streamed into a temp file in the
job's directory and accepted only when it is non-empty, under :data:`MAX_AUDIO_BYTES`, served with
an audio (or generic binary) content type and starts with the magic bytes of MP3, WAV, OGG, FLAC
or M4A; otherwise the next URL is tried (stream URLs have answered 200 with empty bodies). An
accepted file is renamed into place as ``{track_id}.{ext}``.

When two takes come out byte-identical (a known CDN collision), the later one is fetched once
more from its next candidate URL; if it stays identical the manifest says
``"identical_takes": true``. ``manifest.json`` is written atomically and lists, per track, the
file, the URL used, size, sha256 and content type. A repeated delivery re-uses every file whose
size and sha256 on disk match the manifest and downloads nothing else. A track whose URLs all
fail makes the delivery raise :class:`DownloadError`, so it is retried later; the tracks already
fetched are kept in the manifest (``"complete": false``) and are not fetched again.

Layout::

    {download_dir}/{job_id}/{track_id}.mp3
    {download_dir}/{job_id}/manifest.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from kie_extend.provider.client import USER_AGENT
from kie_extend.config import Settings
from kie_extend.errors import KieExtendError
from kie_extend.store.record import iso_ms
from kie_extend.infra.fileio import write_atomic
from kie_extend.provider.urlguard import check_public_url
from kie_extend.handlers.base import HandlerContext

log = logging.getLogger("kie_extend.handlers.download")

#: Largest audio file accepted, in bytes.
MAX_AUDIO_BYTES = 200 * 1024 * 1024
#: Longest time one file may take to download, in seconds (a slow drip cannot hold a worker).
DOWNLOAD_DEADLINE = 300.0
#: Most redirects followed for one URL; each target is checked like the URL itself.
MAX_REDIRECTS = 5
#: Track fields holding audio URLs, most preferred first (snake_case, then camelCase drift).
URL_FIELDS: tuple[tuple[str, str], ...] = (
    ("audio_url", "audioUrl"),
    ("source_audio_url", "sourceAudioUrl"),
    ("stream_audio_url", "streamAudioUrl"),
    ("source_stream_audio_url", "sourceStreamAudioUrl"),
)
#: Content types accepted besides ``audio/*``; a missing header is left to the magic-byte check.
BINARY_CONTENT_TYPES: frozenset[str] = frozenset({"application/octet-stream", "binary/octet-stream"})
MANIFEST = "manifest.json"

_CHUNK = 64 * 1024
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_MIME = {"mp3": "audio/mpeg", "wav": "audio/wav", "ogg": "audio/ogg", "flac": "audio/flac", "m4a": "audio/mp4"}


class DownloadError(KieExtendError):
    """A take could not be fetched from any of its URLs; the delivery will be retried."""


class _Rejected(Exception):
    """One candidate URL gave nothing usable; the reason is safe to log."""


@dataclass
class _Fetched:
    """One take on disk, as recorded in the manifest."""

    id: str
    title: str | None
    file: str
    url: str
    size: int
    sha256: str
    content_type: str


def sniff_audio(head: bytes) -> str | None:
    """The file extension the first bytes of an audio file imply (mp3, wav, ogg, flac, m4a), or None."""
    if head.startswith(b"ID3"):
        return "mp3"
    # MPEG audio frame sync: 11 set bits, a real layer (not 00) and a bitrate index other than 1111.
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 and head[2] & 0xF0 != 0xF0:
        return "mp3"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head[4:8] == b"ftyp":
        return "m4a"
    return None


def _media_type(response: requests.Response) -> str:
    return (response.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()


def _safe_name(value: str) -> str:
    """``value`` as one path component: itself when harmless, else a cleaned form plus a hash."""
    if _SAFE_NAME.fullmatch(value) and ".." not in value:
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", value)[:64].strip("_") or "x"
    return f"{cleaned}-{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def candidate_urls(track: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, url)`` for the track's audio URLs in preference order, empty values and repeats left out."""
    found: list[tuple[str, str]] = []
    for names in URL_FIELDS:
        for name in names:
            value = track.get(name)
            if isinstance(value, str) and value.strip():
                if all(value.strip() != url for _, url in found):
                    found.append((names[0], value.strip()))
                break
    return found


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class DownloadHandler:
    """Downloads every take of a succeeded job, once, with a manifest."""

    #: No ``job.progress`` events (jobs/progress.py): there is nothing final to fetch before the result.
    progress = False

    name = "download"

    def __init__(self, settings: Settings) -> None:
        self._root = Path(settings.download_dir)
        self._allow_private = settings.allow_private_urls
        self._timeout = (settings.connect_timeout, settings.read_timeout)

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """Download the event's takes (``job.succeeded`` only); raise DownloadError if one fails."""
        if event.get("event") != "job.succeeded":
            return
        job_id = str(event.get("job_id") or "")
        if not job_id:
            raise DownloadError("event has no job_id")
        job_dir = self._root / _safe_name(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        previous = self._read_manifest(job_dir)
        known = {str(t.get("id")): t for t in previous.get("tracks", []) if isinstance(t, dict)}

        tracks = [t for t in event.get("tracks") or [] if isinstance(t, dict)]
        done: list[_Fetched] = []
        fresh: set[str] = set()
        failures: list[str] = []
        used_names: set[str] = set()
        with requests.Session() as session:
            session.headers.update({"User-Agent": USER_AGENT, "Accept": "audio/*, */*;q=0.5"})
            for index, track in enumerate(tracks):
                track_id = str(track.get("id") or f"take{index + 1}")
                stem = _safe_name(track_id)
                if stem in used_names:  # two ids that clean to the same name must not share a file
                    stem = f"{stem}-{index + 1}"
                used_names.add(stem)
                entry = known.get(track_id)
                reused = self._verified(job_dir, entry)
                if reused is not None:
                    done.append(reused)
                    continue
                try:
                    fetched = self._fetch_track(session, job_dir, stem, track, candidate_urls(track))
                except DownloadError as exc:
                    failures.append(str(exc))
                    continue
                done.append(fetched)
                fresh.add(track_id)
                stale = str((entry or {}).get("file") or "")
                if stale and stale != fetched.file and Path(stale).name == stale:
                    (job_dir / stale).unlink(missing_ok=True)
            identical = self._recheck_identical(session, job_dir, tracks, done, fresh, previous)

        if fresh or failures or not previous.get("complete") or len(done) != len(known):
            self._write_manifest(job_dir, event, done, identical=identical, complete=not failures)
        if failures:
            raise DownloadError("; ".join(failures))

    # -- one track ---------------------------------------------------------------------------

    def _fetch_track(self, session: requests.Session, job_dir: Path, stem: str,
                     track: dict[str, Any], urls: list[tuple[str, str]],
                     accept: tuple[str, ...] = ("audio/",)) -> _Fetched:
        """The first candidate URL that yields audio, renamed into place; DownloadError if none does.
        ``accept``: the content-type prefixes taken besides generic binary (the store handler adds
        ``video/`` for a music video, an MP4 the magic-byte check knows)."""
        track_id = str(track.get("id") or stem)
        if not urls:
            raise DownloadError(f"track {track_id}: no audio URL")
        reasons: list[str] = []
        for field, url in urls:
            try:
                tmp, size, sha, content_type, ext = self._fetch_url(session, job_dir, stem, url, accept)
            except _Rejected as exc:
                reasons.append(f"{field}: {exc}")
                log.info("download of track %s from %s rejected: %s", track_id, field, exc)
                continue
            name = f"{stem}.{ext}"
            os.replace(tmp, job_dir / name)
            title = track.get("title")
            return _Fetched(track_id, title if isinstance(title, str) else None, name, url, size, sha, content_type)
        raise DownloadError(f"track {track_id}: no usable audio ({'; '.join(reasons)})")

    def _fetch_url(self, session: requests.Session, job_dir: Path, stem: str,
                   url: str, accept: tuple[str, ...] = ("audio/",)) -> tuple[Path, int, str, str, str]:
        """Stream one URL into a temp file: ``(temp path, size, sha256, content type, ext)``; raises _Rejected."""
        response = self._get(session, url)
        fd, tmp_name = tempfile.mkstemp(dir=job_dir, prefix=f".{stem}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with response, os.fdopen(fd, "wb") as fh:
                if response.status_code != 200:
                    raise _Rejected(f"HTTP {response.status_code}")
                media_type = _media_type(response)
                if media_type and not (media_type.startswith(accept) or media_type in BINARY_CONTENT_TYPES):
                    raise _Rejected(f"content type {media_type!r} is not audio")
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > MAX_AUDIO_BYTES:
                    raise _Rejected(f"{declared} bytes is over the {MAX_AUDIO_BYTES}-byte cap")
                size, sha, head = self._stream(response, fh)
            if size == 0:
                raise _Rejected("empty body")
            ext = sniff_audio(head)
            if ext is None:
                raise _Rejected(f"body is not MP3, WAV, OGG, FLAC or M4A audio (starts {head[:8]!r})")
            return tmp, size, sha, media_type or _MIME[ext], ext
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _get(self, session: requests.Session, url: str) -> requests.Response:
        """GET ``url`` as a stream, following redirects only to URLs that pass the SSRF guard."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_public_url(url, allow_private=self._allow_private)
            except ValueError as exc:
                raise _Rejected(str(exc)) from None
            try:
                response = session.get(url, stream=True, timeout=self._timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise _Rejected(f"request failed ({type(exc).__name__})") from None
            if not response.is_redirect:
                return response
            url = urljoin(url, response.headers["Location"])
            response.close()
        raise _Rejected(f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _stream(response: requests.Response, fh: Any) -> tuple[int, str, bytes]:
        """Copy the body into ``fh`` under the size cap and deadline: ``(size, sha256, first bytes)``."""
        digest = hashlib.sha256()
        size = 0
        head = b""
        deadline = time.monotonic() + DOWNLOAD_DEADLINE
        try:
            for chunk in response.iter_content(_CHUNK):
                if not chunk:
                    continue
                size += len(chunk)
                if size > MAX_AUDIO_BYTES:
                    raise _Rejected(f"body is over the {MAX_AUDIO_BYTES}-byte cap")
                if time.monotonic() > deadline:
                    raise _Rejected(f"download took longer than {DOWNLOAD_DEADLINE:g}s")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                digest.update(chunk)
                fh.write(chunk)
        except requests.RequestException as exc:
            raise _Rejected(f"body read failed ({type(exc).__name__})") from None
        fh.flush()
        os.fsync(fh.fileno())
        return size, digest.hexdigest(), head

    # -- identical takes ---------------------------------------------------------------------

    def _recheck_identical(self, session: requests.Session, job_dir: Path, tracks: list[dict[str, Any]],
                           done: list[_Fetched], fresh: set[str], previous: dict[str, Any]) -> bool:
        """Re-fetch a freshly downloaded take identical to an earlier one once; True if it stays identical."""
        identical = False
        by_id = {str(t.get("id")): t for t in tracks}
        for later in range(1, len(done)):
            earlier = next((f for f in done[:later] if f.sha256 == done[later].sha256), None)
            if earlier is None:
                continue
            current = done[later]
            if current.id not in fresh and earlier.id not in fresh:
                identical = identical or bool(previous.get("identical_takes"))
                continue
            urls = candidate_urls(by_id.get(current.id, {}))
            position = next((i for i, (_, url) in enumerate(urls) if url == current.url), -1)
            # The next candidate first; with none left, the same URL once more.
            retry_urls = urls[position + 1:] or [("same URL again", current.url)]
            stem = Path(current.file).stem
            try:
                again = self._fetch_track(session, job_dir, stem, by_id.get(current.id, {"id": current.id}), retry_urls)
            except DownloadError as exc:
                log.warning("re-download of identical take %s failed: %s", current.id, exc)
                identical = True
                continue
            if again.file != current.file:
                (job_dir / current.file).unlink(missing_ok=True)
            done[later] = again
            if again.sha256 == earlier.sha256:
                log.warning("takes %s and %s are byte-identical after a re-download", earlier.id, current.id)
                identical = True
        return identical

    # -- manifest ----------------------------------------------------------------------------

    @staticmethod
    def _read_manifest(job_dir: Path) -> dict[str, Any]:
        try:
            data = json.loads((job_dir / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _verified(job_dir: Path, entry: dict[str, Any] | None) -> _Fetched | None:
        """The manifest entry when its file is on disk with the recorded size and sha256."""
        if not entry:
            return None
        try:
            fetched = _Fetched(**{k: entry[k] for k in _Fetched.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        path = job_dir / str(fetched.file)
        if Path(str(fetched.file)).name != fetched.file or not path.is_file():
            return None
        if path.stat().st_size != fetched.size or _file_digest(path) != (fetched.size, fetched.sha256):
            return None
        return fetched

    @staticmethod
    def _write_manifest(job_dir: Path, event: dict[str, Any], done: list[_Fetched], *,
                        identical: bool, complete: bool) -> None:
        manifest = {
            "job_id": event.get("job_id"),
            "kie_task_id": event.get("kie_task_id"),
            "complete": complete,
            "identical_takes": identical,
            "tracks": [asdict(f) for f in done],
            "written_at": iso_ms(),
        }
        write_atomic(job_dir / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))


def factory(ctx: HandlerContext) -> DownloadHandler:
    """Build the handler from the settings."""
    return DownloadHandler(ctx.settings)
