"""``store``: custody of outputs — every take and every follow-up step's file copied to object storage.

KIE deletes generated files after 14 days (stream links sooner). For every ``job.succeeded`` event
this handler copies each take's audio and each succeeded step's file (WAV, vocals, instrumental and
every other stem, the music video) to ``KIE_STORE_URL``:

- ``s3://bucket/prefix`` — any S3 API (AWS, R2, MinIO, …): ``KIE_STORE_ENDPOINT_URL`` for a
  non-AWS endpoint, ``KIE_STORE_REGION``, credentials the standard AWS way (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), through boto3;
- ``file:///path`` — a local or mounted directory (files written to a temporary name, then renamed).

Layout, under the URL's prefix::

    {tenant}/{job_id}/take0-{track_id}.mp3
    {tenant}/{job_id}/take0-wav.wav, take0-vocal.mp3, take0-instrumental.mp3, take0-video.mp4, …
    {tenant}/{job_id}/manifest.json

Each object is fetched the way the ``download`` handler fetches (handlers/download.py: the SSRF
guard on every URL and redirect, a size cap and a deadline, streamed to a temporary file): a take
from its candidate URLs in KIE's order (``audio_url`` first), a step's file from its one URL. A body
that is empty or is not audio (MP3, WAV, OGG, FLAC, M4A; MP4 for the video) — a known KIE failure —
is rejected and the next candidate is tried. The manifest (``{"job_id", "tenant", "stored_at",
"complete", "objects": [{"name", "kind", "take", "op", "key", "uri", "source_url", "size", "sha256",
"content_type"}]}``) is written last, so a manifest means a complete set; a repeated delivery finds
it and copies nothing. A job that failed only in its follow-up steps (``step_failed``) keeps its
takes and finished steps the same way; a retry that succeeds adds the rest to the same manifest. When an object cannot be fetched from any URL the delivery raises
:class:`StoreError` and is retried (then dead-lettered) like any handler. The stored URIs go into the
job's record (``stored``: ``{"manifest", "objects"}``), shown by the status record and ``/v1``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import requests

from kie_extend.config import Settings
from kie_extend.errors import ConfigError, KieExtendError
from kie_extend.handlers.base import HandlerContext
from kie_extend.handlers.download import DownloadError, DownloadHandler, _safe_name, candidate_urls
from kie_extend.infra.fileio import write_atomic
from kie_extend.store.record import iso_ms
from kie_extend.provider.client import USER_AGENT

log = logging.getLogger("kie_extend.handlers.store")

MANIFEST = "manifest.json"
#: Step result fields holding a file to keep, with the name it is stored under.
STEP_FILES = ("wav_url", "vocal_url", "instrumental_url", "video_url")
#: Extensions by sniffed type; an MP4 video sniffs as "m4a" (the same container).
_VIDEO_EXT = "mp4"


class StoreError(KieExtendError):
    """An output could not be copied from any of its URLs; the delivery will be retried."""


class Backend(Protocol):
    """Where objects go: ``put`` a local file, ``put_bytes``, read ``get_bytes`` (None when absent)."""

    def put(self, key: str, path: Path, content_type: str) -> str: ...

    def put_bytes(self, key: str, data: bytes, content_type: str) -> str: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def uri(self, key: str) -> str: ...


class FileBackend:
    """``file:///root``: objects as files under ``root``, each written to a temporary name, then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"object key {key!r} leaves the store's directory")
        return path

    def put(self, key: str, path: Path, content_type: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        return target.as_uri()

    def put_bytes(self, key: str, data: bytes, content_type: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data, sync_dir=True)
        target.chmod(0o644)  # like the copied files (a temporary file is created 0600)
        return target.as_uri()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None


class S3Backend:
    """``s3://bucket/prefix`` through boto3 (any S3 API with ``endpoint_url``)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - the extra is installed with the tests
            raise ConfigError("KIE_STORE_URL=s3://… needs boto3: pip install 'kie-extend[s3]'") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        try:
            self.client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                                       config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                     connect_timeout=10, read_timeout=60))
        except ValueError as exc:  # botocore: "Invalid endpoint: …"
            raise ConfigError(f"KIE_STORE_ENDPOINT_URL: {exc}; give the S3 API's URL, such as "
                              "http://127.0.0.1:9000") from None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, path: Path, content_type: str) -> str:
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes, content_type: str) -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        return f"s3://{self.bucket}/{self._key(key)}"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()  # type: ignore[no-any-return]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise


def backend_for(settings: Settings) -> Backend:
    """The backend ``KIE_STORE_URL`` names; ConfigError when it is unset or not s3:// or file://."""
    url = settings.store_url
    if not url:
        raise ConfigError("the store handler needs KIE_STORE_URL (s3://bucket/prefix or file:///path)")
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc:
        return S3Backend(parts.netloc, parts.path, settings.store_endpoint_url, settings.store_region)
    if parts.scheme == "file" and parts.path:
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"KIE_STORE_URL {url[:100]!r} names the host {parts.netloc!r}: a file URL is "
                              "file:///absolute/path (three slashes)")
        return FileBackend(Path(unquote(parts.path)))
    raise ConfigError(f"KIE_STORE_URL must be s3://bucket/prefix or file:///path, got {url[:100]!r}")


def outputs(event: dict[str, Any]) -> list[dict[str, Any]]:
    """What to keep of a succeeded job: ``[{"kind", "take", "op", "name", "urls"}]``, the takes first,
    then each succeeded step's files (``name`` is the object's name without extension)."""
    out: list[dict[str, Any]] = []
    for i, track in enumerate(t for t in event.get("tracks") or [] if isinstance(t, dict)):
        urls = [url for _, url in candidate_urls(track)]
        out.append({"kind": "take", "take": i, "op": None, "name": f"take{i}-{_safe_name(str(track.get('id') or i))}",
                    "urls": urls})
    for step in event.get("steps") or []:
        if not isinstance(step, dict) or step.get("state") != "succeeded":
            continue
        result = step.get("result") or {}
        names = [k for k in STEP_FILES if result.get(k)] + sorted(
            k for k in result if k.endswith("_url") and k not in STEP_FILES and result.get(k))
        for field in names:
            label = field.removesuffix("_url")
            out.append({"kind": "step", "take": step.get("take"), "op": step.get("op"),
                        "name": f"take{step.get('take')}-{_safe_name(label)}", "urls": [str(result[field])]})
    return out


class StoreHandler:
    """Copies a succeeded job's takes and step files to object storage, with a manifest."""

    name = "store"
    #: No ``job.progress`` events: nothing is final before the result.
    progress = False

    def __init__(self, settings: Settings, ctx: HandlerContext | None = None) -> None:
        self.backend = backend_for(settings)
        self._fetcher = DownloadHandler(settings)
        self._ctx = ctx

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """Copy the event's outputs: a ``job.succeeded``, or a ``job.failed`` whose follow-up steps
        failed (``step_failed``: its takes and finished steps are kept too; a retry that succeeds adds
        the rest). Objects a manifest already lists are not copied again. Raises StoreError when one
        cannot be fetched."""
        failed_steps = event.get("event") == "job.failed" and (event.get("error") or {}).get("kind") == "step_failed"
        if event.get("event") != "job.succeeded" and not failed_steps:
            return
        job_id = str(event.get("job_id") or "")
        if not job_id:
            raise StoreError("event has no job_id")
        base = f"{_safe_name(str(event.get('tenant') or 'default'))}/{_safe_name(job_id)}"
        existing = self.backend.get_bytes(f"{base}/{MANIFEST}")
        previous = json.loads(existing) if existing else {}
        have = [o for o in previous.get("objects") or [] if isinstance(o, dict)]
        names = {o.get("name") for o in have}
        todo = [item for item in outputs(event) if item["name"] not in names]
        if existing and not todo:
            self._record(job_id, {**previous, "uri": self.backend.uri(f"{base}/{MANIFEST}")})  # stored before
            return
        objects: list[dict[str, Any]] = list(have)
        failures: list[str] = []
        with tempfile.TemporaryDirectory(prefix="kie-store-") as tmp, requests.Session() as session:
            session.headers.update({"User-Agent": USER_AGENT, "Accept": "audio/*, video/mp4, */*;q=0.5"})
            for item in todo:
                try:
                    objects.append(self._copy(session, Path(tmp), base, item))
                except (DownloadError, StoreError) as exc:
                    failures.append(str(exc))
        if failures:
            raise StoreError("; ".join(failures))
        manifest = {"job_id": job_id, "tenant": event.get("tenant"), "stored_at": iso_ms(), "complete": True,
                    "objects": objects}
        uri = self.backend.put_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode(),
                                     "application/json")
        manifest["uri"] = uri
        self._record(job_id, manifest)
        log.info("stored %d objects under %s [job_id=%s]", len(objects), uri.rsplit("/", 1)[0], job_id)

    def _copy(self, session: requests.Session, tmp: Path, base: str, item: dict[str, Any]) -> dict[str, Any]:
        video = item["op"] == "video"
        fetched = self._fetcher._fetch_track(session, tmp, item["name"], {"id": item["name"]},
                                             [("url", u) for u in item["urls"]],
                                             accept=("audio/", "video/") if video else ("audio/",))
        ext = _VIDEO_EXT if video else Path(fetched.file).suffix.lstrip(".")
        key = f"{base}/{item['name']}.{ext}"
        content_type = "video/mp4" if video else fetched.content_type
        uri = self.backend.put(key, tmp / fetched.file, content_type)
        return {"name": item["name"], "kind": item["kind"], "take": item["take"], "op": item["op"], "key": key, "uri": uri,
                "source_url": fetched.url, "size": fetched.size, "sha256": fetched.sha256,
                "content_type": content_type}

    def _record(self, job_id: str, manifest: dict[str, Any]) -> None:
        """Write the stored URIs into the job's record (when the job still has one)."""
        if self._ctx is None:
            return
        uri = manifest.get("uri") or ""
        stored = {"manifest": uri, "objects": [o.get("uri") for o in manifest.get("objects") or []]}
        key = self._ctx.keys.job(job_id)
        if self._ctx.redis.exists(key):
            self._ctx.redis.hset(key, "stored", json.dumps(stored))


def factory(ctx: HandlerContext) -> StoreHandler:
    """Build the handler from the context (KIE_STORE_URL, KIE_STORE_ENDPOINT_URL, KIE_STORE_REGION)."""
    return StoreHandler(ctx.settings, ctx)


__all__ = ["FileBackend", "S3Backend", "StoreError", "StoreHandler", "backend_for", "factory", "outputs"]
