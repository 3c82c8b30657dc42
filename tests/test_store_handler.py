"""Custody (the ``store`` handler): takes and step files copied to a real S3-API server the test starts
(moto's standalone server on loopback, spoken to by boto3 over HTTP) and to file://, with manifests."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.config import Settings
from kie_extend.handlers.store import StoreError, StoreHandler
from kie_extend.simulator.audio import mp3_bytes, wav_bytes
from kie_extend.simulator.followups import MP4_BYTES

BUCKET = "kie-outputs"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    """moto's S3 API server, standalone on a loopback port (a real HTTP server, not a patched client)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


class Files:
    """A loopback file server: good audio, an empty 200, an HTML 200, a WAV, an MP4; counts hits."""

    BODIES = {
        "/good-a.mp3": (mp3_bytes(2.0, b"a"), "audio/mpeg"), "/good-b.mp3": (mp3_bytes(2.0, b"b"), "audio/mpeg"),
        "/empty.mp3": (b"", "audio/mpeg"), "/page.mp3": (b"<html><body>busy</body></html>", "text/html"),
        "/master.wav": (wav_bytes(1.0), "audio/wav"), "/vocals.mp3": (mp3_bytes(1.0, b"v"), "audio/mpeg"),
        "/inst.mp3": (mp3_bytes(1.0, b"i"), "audio/mpeg"), "/clip.mp4": (MP4_BYTES, "video/mp4"),
    }

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                files.hits[self.path] += 1
                body, kind = files.BODIES.get(self.path, (None, ""))
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    f = Files()
    yield f
    f.httpd.shutdown()
    f.httpd.server_close()


def event(files: Files, job_id: str, **over: Any) -> dict[str, Any]:
    u = files.url
    ev = {"event": "job.succeeded", "job_id": job_id, "tenant": "shop",
          "tracks": [{"id": "take-a", "audio_url": f"{u}/empty.mp3", "stream_audio_url": f"{u}/good-a.mp3"},
                     {"id": "take-b", "audio_url": f"{u}/page.mp3", "source_audio_url": f"{u}/good-b.mp3"}],
          "steps": [{"op": "wav", "take": 0, "state": "succeeded", "result": {"wav_url": f"{u}/master.wav"}},
                    {"op": "stems", "take": 0, "state": "succeeded",
                     "result": {"vocal_url": f"{u}/vocals.mp3", "instrumental_url": f"{u}/inst.mp3"}},
                    {"op": "video", "take": 1, "state": "succeeded", "result": {"video_url": f"{u}/clip.mp4"}},
                    {"op": "midi", "take": 0, "state": "succeeded", "result": {"notes": []}},
                    {"op": "wav", "take": 1, "state": "failed", "result": None}]}
    ev.update(over)
    return ev


def s3(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def test_takes_and_step_files_go_to_s3_with_a_manifest(s3_url: str, files: Files) -> None:
    settings = Settings(store_url=f"s3://{BUCKET}/kept", store_endpoint_url=s3_url, allow_private_urls=True)
    job = f"j-{uuid.uuid4().hex[:8]}"
    StoreHandler(settings).deliver(event(files, job), f"{job}:job.succeeded")
    client = s3(s3_url)
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"kept/shop/{job}/manifest.json")["Body"].read())
    assert manifest["complete"] and manifest["job_id"] == job
    keys = {o["key"]: o for o in manifest["objects"]}
    assert set(keys) == {f"shop/{job}/take0-take-a.mp3", f"shop/{job}/take1-take-b.mp3", f"shop/{job}/take0-wav.wav",
                         f"shop/{job}/take0-vocal.mp3", f"shop/{job}/take0-instrumental.mp3",
                         f"shop/{job}/take1-video.mp4"}
    for key, entry in keys.items():
        body = client.get_object(Bucket=BUCKET, Key=f"kept/{key}")["Body"].read()
        assert len(body) == entry["size"] > 0 and hashlib.sha256(body).hexdigest() == entry["sha256"]
        assert entry["uri"] == f"s3://{BUCKET}/kept/{key}"
    # The empty and the HTML bodies were refused; the next candidates were used.
    assert keys[f"shop/{job}/take0-take-a.mp3"]["source_url"].endswith("/good-a.mp3")
    assert keys[f"shop/{job}/take1-take-b.mp3"]["source_url"].endswith("/good-b.mp3")
    assert keys[f"shop/{job}/take1-video.mp4"]["content_type"] == "video/mp4"


def test_a_second_delivery_copies_nothing(s3_url: str, files: Files) -> None:
    settings = Settings(store_url=f"s3://{BUCKET}", store_endpoint_url=s3_url, allow_private_urls=True)
    job = f"j-{uuid.uuid4().hex[:8]}"
    handler = StoreHandler(settings)
    handler.deliver(event(files, job), "k")
    before = sum(files.hits.values())
    handler.deliver(event(files, job), "k")
    assert sum(files.hits.values()) == before
    listed = s3(s3_url).list_objects_v2(Bucket=BUCKET, Prefix=f"shop/{job}/")["Contents"]
    assert sum(1 for o in listed if o["Key"].endswith("manifest.json")) == 1


def test_no_usable_body_raises_and_writes_no_manifest(s3_url: str, files: Files) -> None:
    settings = Settings(store_url=f"s3://{BUCKET}", store_endpoint_url=s3_url, allow_private_urls=True)
    job = f"j-{uuid.uuid4().hex[:8]}"
    bad = event(files, job, tracks=[{"id": "x", "audio_url": f"{files.url}/empty.mp3",
                                     "stream_audio_url": f"{files.url}/page.mp3"}], steps=[])
    with pytest.raises(StoreError, match="empty body.*not audio|not audio.*empty body"):
        StoreHandler(settings).deliver(bad, "k")
    assert "Contents" not in s3(s3_url).list_objects_v2(Bucket=BUCKET, Prefix=f"shop/{job}/")


def test_file_urls_keep_the_same_layout(tmp_path: Path, files: Files) -> None:
    settings = Settings(store_url=(tmp_path / "kept").as_uri(), allow_private_urls=True)
    job = f"j-{uuid.uuid4().hex[:8]}"
    StoreHandler(settings).deliver(event(files, job), "k")
    root = tmp_path / "kept" / "shop" / job
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["objects"]) == 6
    for entry in manifest["objects"]:
        data = (tmp_path / "kept" / entry["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["uri"].startswith("file://")
    assert not list(root.glob(".*.part"))


def test_an_unsupported_store_url_is_a_config_error() -> None:
    from kie_extend.errors import ConfigError

    with pytest.raises(ConfigError, match="s3://bucket/prefix or file:///path"):
        StoreHandler(Settings(store_url="ftp://x/y"))
    with pytest.raises(ConfigError, match="needs KIE_STORE_URL"):
        StoreHandler(Settings())


def test_end_to_end_a_job_with_steps_lands_in_the_bucket(s3_url: str, tmp_path: Path) -> None:
    """Real worker, beat, serve and simulator: one job with WAV and stems; every file in the bucket,
    the manifest, the record's stored URIs, and every provider call paid once."""
    with DevStack(tmp_path, key_prefix=f"store{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "0.5s", "KIE_POLL_MAX_INTERVAL": "1s",
                       "KIE_TICK_INTERVAL": "0.25s", "KIE_HANDLERS": "redis_stream,store",
                       "KIE_STORE_URL": f"s3://{BUCKET}/e2e", "KIE_STORE_ENDPOINT_URL": s3_url, **CREDS}) as st:
        st.start_simulator("--time-factor", "0.02", "--seed", "8")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=2)
        st.start_beat()
        request = {"uploadUrl": f"{st.sim_url}/files/source/30s.mp3", "defaultParamFlag": True,
                   "instrumental": False, "continueAt": 10, "model": "V5", "prompt": "[Verse] la",
                   "style": "folk", "title": "Kept"}
        job = enqueue_extend(request, steps=[{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}],
                             settings=st.settings())
        deadline = time.monotonic() + 90
        rec: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rec = get_job(job, settings=st.settings())
            if rec["state"] in ("succeeded", "failed") and rec["handlers"].get("store", {}).get("state") == "delivered":
                break
            time.sleep(0.3)
        assert rec["state"] == "succeeded" and rec["handlers"]["store"]["state"] == "delivered", rec
        manifest = json.loads(s3(s3_url).get_object(Bucket=BUCKET, Key=f"e2e/default/{job}/manifest.json")["Body"].read())
        kinds = Counter((o["kind"], o["op"]) for o in manifest["objects"])
        assert kinds == {("take", None): 2, ("step", "wav"): 2, ("step", "stems"): 6}, kinds  # vocal, instrumental, origin
        assert rec["stored"]["manifest"] == f"s3://{BUCKET}/e2e/default/{job}/manifest.json"
        assert len(rec["stored"]["objects"]) == 10
        stats = st.sim_stats()
        assert stats["followups_paid_twice"] == 0 and sum(stats["followup_paid"].values()) == 4


def test_a_job_whose_steps_failed_keeps_what_it_has_and_a_retry_adds_the_rest(tmp_path: Path, files: Files) -> None:
    settings = Settings(store_url=(tmp_path / "kept").as_uri(), allow_private_urls=True)
    job = f"j-{uuid.uuid4().hex[:8]}"
    handler = StoreHandler(settings)
    first = event(files, job, event="job.failed", error={"kind": "step_failed", "message": "video failed"})
    first["steps"][2]["state"] = "failed"  # the video
    handler.deliver(first, f"{job}:job.failed")
    manifest = json.loads((tmp_path / "kept" / "shop" / job / "manifest.json").read_text())
    assert len(manifest["objects"]) == 5 and not any(o["op"] == "video" for o in manifest["objects"])
    hits = sum(files.hits.values())
    handler.deliver(event(files, job), f"{job}:job.succeeded")  # the retry succeeded
    manifest = json.loads((tmp_path / "kept" / "shop" / job / "manifest.json").read_text())
    assert len(manifest["objects"]) == 6 and sum(files.hits.values()) == hits + 1  # only the video fetched
    assert (tmp_path / "kept" / "shop" / job / "manifest.json").stat().st_mode & 0o777 == 0o644
    other = event(files, job, event="job.failed", error={"kind": "generation_failed", "message": "x"})
    StoreHandler(Settings(store_url=(tmp_path / "other").as_uri(), allow_private_urls=True)).deliver(other, "k")
    assert not (tmp_path / "other").exists()


def test_store_settings_are_checked_with_one_line(tmp_path: Path) -> None:
    from kie_extend.errors import ConfigError

    with pytest.raises(ConfigError, match="three slashes"):
        StoreHandler(Settings(store_url="file://data/kie"))
    with pytest.raises(ConfigError, match="KIE_STORE_ENDPOINT_URL"):
        StoreHandler(Settings(store_url="s3://b/p", store_endpoint_url="notaurl"))
