"""Local audio files: probe (mutagen), upload to the simulator's file host, enqueue with the returned URL.

Real files in tmp_path, the real simulator in a thread, our own Valkey as the broker. No worker:
an enqueued job is checked as the message in the broker's queue list.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from kie_extend.api import enqueue_extend, enqueue_many
from kie_extend.config import Settings
from kie_extend.errors import AccountError, ConfigError, ConnectError, InvalidRequestError, ValidationError
from kie_extend.provider.audio_probe import probe_audio
from kie_extend.simulator import SimConfig, SimServer, mp3_bytes, mp3_duration, serve
from kie_extend.provider.uploads import upload_file

KEY = "test-key-0123456789"  # the key make_settings configures; the simulator accepts only it
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with serve(SimConfig(time_factor=0.02, api_key=KEY)) as server:
        yield server


def uploads(sim: SimServer) -> int:
    return sim.simulator.stats.get("uploads")


def write_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """Silence as 8-bit mono PCM (8 kB per second at 8 kHz)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate))
    return path


def custom(**over: Any) -> dict[str, Any]:
    """A valid custom-mode request without uploadUrl (the file provides it)."""
    body: dict[str, Any] = {"defaultParamFlag": True, "model": "V5", "instrumental": False, "continueAt": 6,
                            "prompt": "[Verse] on and on", "style": "indie folk", "title": "Demo (Extended)"}
    body.update(over)
    return body


@pytest.fixture
def file_settings(make_settings: Callable[..., Settings], sim: SimServer) -> Settings:
    return make_settings(upload_base_url=sim.url)


def queued(rclient: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """The kwargs of every message waiting in the broker's queue (a Redis list named after the queue)."""
    out = []
    for raw in rclient.lrange(settings.queue, 0, -1):
        message = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append(kwargs)
    return out


# --- probe -------------------------------------------------------------------------------------


def test_probe_wav(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "clip.wav", 12)
    info = probe_audio(path)
    assert info.duration == pytest.approx(12.0)
    assert info.mime in ("audio/wav", "audio/x-wav")
    assert info.size == path.stat().st_size == 44 + 12 * 8000


def test_probe_mp3_reads_simulator_frames(tmp_path: Path) -> None:
    data = mp3_bytes(7.5)
    (tmp_path / "clip.mp3").write_bytes(data)
    info = probe_audio(str(tmp_path / "clip.mp3"))
    assert info.duration == pytest.approx(mp3_duration(data), abs=1e-6)  # 312 frames of 24 ms = 7.488 s
    assert info.duration == pytest.approx(7.5, abs=0.03)
    assert (info.mime, info.size) == ("audio/mpeg", len(data))


def test_probe_trusts_content_over_extension(tmp_path: Path) -> None:
    path = tmp_path / "really-a-wav.mp3"
    path.write_bytes(write_wav(tmp_path / "x.wav", 3).read_bytes())
    info = probe_audio(path)
    assert info.duration == pytest.approx(3.0)
    assert info.mime in ("audio/wav", "audio/x-wav")


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("missing.mp3", None, "no such file"),
        ("notes.mp3", b"just some text, renamed\n" * 20, "not an audio file"),
        ("notes.txt", b"just some text\n" * 20, "not a recognised audio file"),
        ("empty.mp3", b"", "empty"),
        ("dir.wav", "dir", "not a regular file"),
        ("silent.wav", "zero-wav", "has no audio"),
    ],
)
def test_probe_errors(tmp_path: Path, name: str, content: Any, words: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "zero-wav":
        write_wav(path, 0)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValidationError) as info:
        probe_audio(path)
    [error] = info.value.errors
    assert error["field"] == "audio_file"
    assert words in error["message"] and str(path) in error["message"]


# --- upload_file -------------------------------------------------------------------------------


def test_upload_round_trip(tmp_path: Path, sim: SimServer) -> None:
    data = mp3_bytes(4.0)
    path = tmp_path / "my song.mp3"
    path.write_bytes(data)
    before = uploads(sim)
    first = upload_file(path, base_url=sim.url, api_key=KEY)
    second = upload_file(path, base_url=sim.url, api_key=KEY)
    assert uploads(sim) == before + 2
    assert first != second  # unique names: the host overwrites same-named uploads
    assert re.fullmatch(re.escape(sim.url) + r"/uploads/kieai/sim/kie-extend/[0-9a-f]{32}-my_song\.mp3", first)
    for url in (first, second):
        got = requests.get(url, timeout=5)
        assert (got.status_code, got.headers["content-type"], got.content) == (200, "audio/mpeg", data)


def test_upload_errors_never_carry_the_key(tmp_path: Path, sim: SimServer) -> None:
    path = write_wav(tmp_path / "a.wav", 1)
    wrong = "wrong-key-5f3a9c1e77"
    with pytest.raises(AccountError) as refused:
        upload_file(path, base_url=sim.url, api_key=wrong)
    assert refused.value.code == 401
    with pytest.raises(ConnectError) as unreachable:
        upload_file(path, base_url="http://127.0.0.1:9", api_key=KEY, timeout=(1, 1))
    with pytest.raises(ValidationError) as missing:
        upload_file(tmp_path / "gone.wav", base_url=sim.url, api_key=KEY)
    assert missing.value.errors[0]["field"] == "audio_file"
    for exc, key in ((refused.value, wrong), (unreachable.value, KEY), (missing.value, KEY)):
        assert key not in str(exc) and key not in repr(exc) and key not in repr(exc.__reduce__())


def test_upload_masks_a_key_the_host_echoes(tmp_path: Path) -> None:
    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"code": 400, "msg": f"bad request from {self.headers['Authorization']}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InvalidRequestError) as info:
            upload_file(write_wav(tmp_path / "a.wav", 1), base_url=f"http://127.0.0.1:{server.server_port}",
                        api_key=KEY)
    finally:
        server.shutdown()
        server.server_close()
    assert "Bearer ***" in str(info.value) and KEY not in str(info.value) and KEY not in repr(info.value)


# --- enqueue_extend / enqueue_many with audio_file -----------------------------------------------


def test_continue_at_beyond_duration_fails_before_upload(tmp_path: Path, sim: SimServer, file_settings: Settings,
                                                          rclient: redis.Redis) -> None:
    path = write_wav(tmp_path / "clip.wav", 12)
    before = uploads(sim)
    with pytest.raises(ValidationError) as info:
        enqueue_extend(custom(continueAt=30, styleWeight=1.5, title=None), audio_file=path, settings=file_settings)
    fields = {e["field"]: e["message"] for e in info.value.errors}
    assert set(fields) == {"continueAt", "styleWeight", "title"}
    assert "less than the source audio's duration (12 s)" in fields["continueAt"]
    assert uploads(sim) == before
    assert rclient.llen(file_settings.queue) == 0


def test_longer_than_eight_minutes_fails_before_upload(tmp_path: Path, sim: SimServer, file_settings: Settings,
                                                       rclient: redis.Redis) -> None:
    path = write_wav(tmp_path / "long.wav", 9 * 60)  # 4.3 MB of 8 kHz 8-bit silence
    before = uploads(sim)
    with pytest.raises(ValidationError) as info:
        enqueue_extend(custom(continueAt=500), audio_file=path, settings=file_settings)
    assert info.value.errors == [{"field": "audio_file", "message": "source audio is 540 s long; KIE accepts at "
                                  "most 480 s (8 minutes)"}]
    assert uploads(sim) == before
    assert rclient.llen(file_settings.queue) == 0


def test_file_and_upload_url_together_refused(tmp_path: Path, sim: SimServer, file_settings: Settings,
                                              rclient: redis.Redis) -> None:
    before = uploads(sim)
    with pytest.raises(ValidationError) as info:
        enqueue_extend(custom(uploadUrl="https://example.org/a.mp3"), audio_file=tmp_path / "missing.wav",
                       settings=file_settings)
    messages = [e["message"] for e in info.value.errors]
    assert any("uploadUrl" in m and "not both" in m for m in messages)
    assert any("no such file" in m for m in messages)  # the file's own problem is listed too
    assert uploads(sim) == before and rclient.llen(file_settings.queue) == 0


def test_valid_file_uploaded_then_enqueued(tmp_path: Path, sim: SimServer, file_settings: Settings,
                                           rclient: redis.Redis) -> None:
    path = write_wav(tmp_path / "clip.wav", 12)
    request = custom()
    before = uploads(sim)
    job_id = enqueue_extend(request, audio_file=os.fspath(path), metadata={"n": 1}, settings=file_settings)
    assert UUID.match(job_id)
    assert uploads(sim) == before + 1
    assert "uploadUrl" not in request  # the caller's dict is left alone
    [kwargs] = queued(rclient, file_settings)
    url = kwargs["request"]["uploadUrl"]
    assert url.startswith(sim.url + "/uploads/kieai/sim/kie-extend/") and url.endswith("-clip.wav")
    assert kwargs["request"] == {**request, "uploadUrl": url} and kwargs["metadata"] == {"n": 1}
    assert requests.get(url, timeout=5).content == path.read_bytes()


def test_upload_needs_an_api_key(tmp_path: Path, sim: SimServer, make_settings: Callable[..., Settings],
                                 rclient: redis.Redis) -> None:
    settings = make_settings(upload_base_url=sim.url, api_key=None)
    before = uploads(sim)
    with pytest.raises(ConfigError, match="KIE_API_KEY"):
        enqueue_extend(custom(), audio_file=write_wav(tmp_path / "a.wav", 12), settings=settings)
    assert uploads(sim) == before and rclient.llen(settings.queue) == 0


def test_v4_5all_over_a_minute_warns_and_sends(tmp_path: Path, sim: SimServer, file_settings: Settings,
                                               rclient: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    path = write_wav(tmp_path / "minute.wav", 75)
    with caplog.at_level(logging.WARNING, logger="kie_extend.api"):
        enqueue_extend(custom(model="V4_5ALL", continueAt=70), audio_file=path, settings=file_settings)
    assert "V4_5ALL may be limited to 60 s" in caplog.text
    assert rclient.llen(file_settings.queue) == 1


def test_enqueue_many_checks_every_file_before_uploading_any(tmp_path: Path, sim: SimServer,
                                                             file_settings: Settings, rclient: redis.Redis) -> None:
    short, mp3 = write_wav(tmp_path / "short.wav", 5), tmp_path / "b.mp3"
    mp3.write_bytes(mp3_bytes(10))
    items: list[dict[str, Any]] = [
        {"request": custom(continueAt=4), "audio_file": short},
        {"request": custom(continueAt=8), "audio_file": mp3, "metadata": {"i": 1}},
        {"request": custom(uploadUrl="https://example.org/c.mp3")},
    ]
    before = uploads(sim)
    bad = [dict(items[0], request=custom(continueAt=5)), *items[1:]]
    with pytest.raises(ValidationError) as info:
        enqueue_many(bad, settings=file_settings)
    assert [e["field"] for e in info.value.errors] == ["[0].continueAt"]
    assert uploads(sim) == before and rclient.llen(file_settings.queue) == 0

    ids = enqueue_many(items, settings=file_settings)
    assert len(ids) == 3 and uploads(sim) == before + 2
    # Celery's Redis transport LPUSHes and workers pop from the other end: the list is newest first.
    sent = list(reversed(queued(rclient, file_settings)))
    urls = [k["request"]["uploadUrl"] for k in sent]
    assert urls[0].endswith("-short.wav") and urls[1].endswith("-b.mp3") and urls[2] == "https://example.org/c.mp3"
    assert sent[1]["metadata"] == {"i": 1}


# --- CLI -----------------------------------------------------------------------------------------


def _cli(args: list[str], settings: Settings, sim: SimServer, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update({"KIE_REDIS_URL": settings.redis_url, "KIE_UPLOAD_BASE_URL": sim.url, "KIE_API_KEY": KEY,
                "KIE_QUEUE": settings.queue, "KIE_KEY_PREFIX": settings.key_prefix,
                "KIE_ALLOW_PRIVATE_URLS": "true"})
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", "enqueue", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_enqueue_file(tmp_path: Path, sim: SimServer, file_settings: Settings, rclient: redis.Redis) -> None:
    path = write_wav(tmp_path / "clip.wav", 12)
    flags = ["--model", "V5", "--custom", "--instrumental", "--style", "lofi", "--title", "T"]
    before = uploads(sim)

    late = _cli([*flags, "--file", str(path), "--continue-at", "12"], file_settings, sim, tmp_path)
    assert late.returncode == 2, late.stderr
    assert "continueAt: must be less than the source audio's duration (12 s)" in late.stderr
    both = _cli([*flags, "--file", str(path), "--upload-url", "https://example.org/a.mp3"], file_settings, sim,
                tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert uploads(sim) == before and rclient.llen(file_settings.queue) == 0

    done = _cli([*flags, "--file", str(path), "--continue-at", "6.5"], file_settings, sim, tmp_path)
    assert done.returncode == 0, done.stderr
    assert UUID.match(done.stdout.strip())
    match = re.search(rf"uploaded {re.escape(str(path))} \(12\.0 s\) → (\S+)", done.stderr)
    assert match, done.stderr
    [kwargs] = queued(rclient, file_settings)
    assert kwargs["request"]["uploadUrl"] == match.group(1) and kwargs["request"]["continueAt"] == 6.5
    assert uploads(sim) == before + 1
    assert KEY not in done.stdout + done.stderr + late.stderr
