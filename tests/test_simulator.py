"""The provider simulator over real loopback HTTP: routes, validation, progression, callbacks, faults."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from kie_extend.simulator import (
    SimConfig,
    SimRequest,
    SimServer,
    Simulator,
    main,
    mp3_bytes,
    mp3_duration,
    serve,
    wav_bytes,
)
from kie_extend.simulator.cli import build_parser

pytestmark = pytest.mark.timeout(30)

KEY = "test-key"
SUBMIT = "/api/v1/generate/upload-extend"
POLL = "/api/v1/generate/record-info"


# ----- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    """Start simulators with fast, deterministic test defaults; stop them afterwards."""
    servers: list[SimServer] = []

    def make(**knobs: Any) -> SimServer:
        values: dict[str, Any] = {"seed": 7, "time_factor": 0.02, "poll_limit": 1000, "callbacks": False}
        values.update(knobs)
        server = serve(SimConfig(**values))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimServer]) -> SimServer:
    return make_sim()


class Receiver:
    """A tiny callback receiver recording (headers, body) of every POST."""

    def __init__(self) -> None:
        self.events: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.cond:
                    receiver.events.append(({k: v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cb"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 4.0) -> list[dict[str, Any]]:
        """Wait until `n` callbacks arrived; return the bodies."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.events) >= n, timeout)
            return [body for _, body in self.events]

    def types(self) -> list[str]:
        with self.cond:
            return [body["data"]["callbackType"] for _, body in self.events]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.httpd.shutdown()
    rec.httpd.server_close()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def valid_body(sim: SimServer, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "uploadUrl": f"{sim.url}/files/source/30s.mp3",
        "defaultParamFlag": True,
        "instrumental": False,
        "continueAt": 12.5,
        "model": "V5",
        "callBackUrl": "http://127.0.0.1:9/placeholder",
        "prompt": "[Verse]\nla la la",
        "style": "indie folk",
        "title": "Demo (Extended)",
    }
    for name, value in overrides.items():
        if value is ...:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def submit(sim: SimServer, body: Any = None, key: str | None = KEY, **overrides: Any) -> dict[str, Any]:
    payload = valid_body(sim, **overrides) if body is None else body
    headers = auth(key) if key is not None else {}
    resp = requests.post(sim.url + SUBMIT, json=payload, headers=headers, timeout=10)
    assert resp.status_code == 200
    return resp.json()


def poll(sim: SimServer, task_id: str, key: str = KEY) -> dict[str, Any]:
    resp = requests.get(sim.url + POLL, params={"taskId": task_id}, headers=auth(key), timeout=10)
    return resp.json()


def stats(sim: SimServer) -> dict[str, Any]:
    return requests.get(sim.url + "/_sim/stats", timeout=10).json()


def set_config(sim: SimServer, **knobs: Any) -> dict[str, Any]:
    return requests.post(sim.url + "/_sim/config", json=knobs, timeout=10).json()


def wait_status(sim: SimServer, task_id: str, wanted: set[str], timeout: float = 4.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = poll(sim, task_id)["data"]
        if data["status"] in wanted or time.monotonic() > deadline:
            return data
        time.sleep(0.03)


def kie_signature_ok(body: dict, headers: Any, secret: str, max_skew: int = 300) -> bool:
    """The reference's verification function (§5.3), verbatim."""
    ts = headers.get("X-Webhook-Timestamp", "")
    sig = headers.get("X-Webhook-Signature", "")
    task_id = (body.get("data") or {}).get("task_id") or body.get("taskId") or ""
    if not (ts.isdigit() and sig and task_id) or abs(time.time() - int(ts)) > max_skew:
        return False
    mac = hmac.new(secret.encode(), f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(mac).decode(), sig)


def is_frame_sync(data: bytes) -> bool:
    return len(data) >= 4 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0


# ----- auth, credits, submit ----------------------------------------------------------------------


def test_auth_missing_or_empty_key_is_401(sim: SimServer) -> None:
    assert submit(sim, key=None)["code"] == 401
    resp = requests.post(sim.url + SUBMIT, json=valid_body(sim), headers={"Authorization": "Bearer "}, timeout=5)
    assert resp.status_code == 200 and resp.json()["code"] == 401
    assert requests.get(sim.url + "/api/v1/chat/credit", timeout=5).json()["code"] == 401
    assert requests.get(sim.url + POLL, params={"taskId": "x"}, timeout=5).json()["code"] == 401
    assert stats(sim)["submissions_accepted"] == 0


def test_auth_wrong_key_when_api_key_set(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(api_key="right")
    assert submit(sim, key="wrong")["code"] == 401
    assert submit(sim, key="right")["code"] == 200
    credit = requests.get(sim.url + "/api/v1/chat/credit", headers=auth("wrong"), timeout=5).json()
    assert credit["code"] == 401


def test_zero_credits_is_402_and_cost_is_deducted(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(credits=30, task_cost=12)
    credit = lambda: requests.get(sim.url + "/api/v1/chat/credit", headers=auth(), timeout=5).json()  # noqa: E731
    assert credit() == {"code": 200, "msg": "success", "data": 30}
    assert submit(sim)["code"] == 200
    assert credit()["data"] == 18
    set_config(sim, credits=0)
    answer = submit(sim)
    assert answer["code"] == 402 and answer["data"] is None
    assert stats(sim)["submissions_accepted"] == 1


def test_valid_submit_returns_task_id(sim: SimServer) -> None:
    answer = submit(sim)
    assert answer["code"] == 200 and answer["msg"] == "success"
    assert re.fullmatch(r"[0-9a-f]{32}", answer["data"]["taskId"])
    st = stats(sim)
    assert st["submissions_accepted"] == 1 and st["tasks"] == 1
    assert st["submissions_by_callback_url"] == {"http://127.0.0.1:9/placeholder": 1}


# ----- polling and progression --------------------------------------------------------------------


def test_status_progression_to_success(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(time_factor=0.04)  # TEXT_SUCCESS at 0.4 s, FIRST_SUCCESS at 1.0 s, SUCCESS at 2.6 s
    body = valid_body(sim)
    task_id = submit(sim, body)["data"]["taskId"]
    seen: list[str] = []
    first_data = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        answer = poll(sim, task_id)
        assert answer["code"] == 200
        data = answer["data"]
        if not seen or seen[-1] != data["status"]:
            seen.append(data["status"])
        if data["status"] == "FIRST_SUCCESS" and first_data is None:
            first_data = data
        if data["status"] == "SUCCESS":
            break
        time.sleep(0.02)
    assert seen == ["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"]
    assert first_data is not None
    takes = first_data["response"]["sunoData"]
    assert len(takes) == 2 and all(t["streamAudioUrl"] for t in takes) and takes[1]["audioUrl"] == ""
    assert json.loads(data["param"]) == body
    assert data["operationType"] == "upload_extend" and data["type"] == "chirp-crow"
    assert data["errorCode"] is None and data["errorMessage"] is None and data["parentMusicId"] == ""
    takes = data["response"]["sunoData"]
    assert data["response"]["taskId"] == task_id and len(takes) == 2
    for take in takes:
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", take["id"])
        for field in ("audioUrl", "sourceAudioUrl", "streamAudioUrl", "sourceStreamAudioUrl", "imageUrl",
                      "sourceImageUrl"):
            assert take[field].startswith(sim.url + "/files/")
        assert take["modelName"] == "chirp-crow" and take["title"] == body["title"]
        assert take["tags"] == body["style"] and take["prompt"] == body["prompt"]
        assert isinstance(take["duration"], float)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", take["createTime"])
    assert takes[0]["id"] != takes[1]["id"]


def test_pending_task_has_null_response(sim: SimServer) -> None:
    data = poll(sim, submit(sim)["data"]["taskId"])["data"]
    assert data["status"] == "PENDING" and data["response"] is None


def test_instrumental_skips_text_stage(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(time_factor=0.02)
    task_id = submit(sim, instrumental=True, prompt=...)["data"]["taskId"]
    seen: list[str] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and (not seen or seen[-1] != "SUCCESS"):
        status = poll(sim, task_id)["data"]["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    assert seen == ["PENDING", "FIRST_SUCCESS", "SUCCESS"]


def test_random_spread_is_deterministic_with_seed(make_sim: Callable[..., SimServer]) -> None:
    durations = []
    for _ in range(2):
        sim = make_sim(seed=42, duration_min=30, duration_max=120)
        submit(sim)
        task = next(iter(sim.simulator.tasks.values()))
        durations.append((task.task_id, task.t_done, [t.duration for t in task.takes]))
    assert durations[0] == durations[1]
    assert 30 * 0.02 <= durations[0][1] <= 120 * 0.02


def test_unknown_task_is_422_record_info_null(sim: SimServer) -> None:
    assert poll(sim, "0" * 32) == {"code": 422, "msg": "recordInfo is null", "data": None}


def test_per_task_poll_limit_is_429(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(poll_limit=3)
    task_id = submit(sim)["data"]["taskId"]
    codes = [poll(sim, task_id)["code"] for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    other = submit(sim)["data"]["taskId"]
    assert poll(sim, other)["code"] == 200  # the limit is per task
    time.sleep(1.05)
    assert poll(sim, task_id)["code"] == 200


def test_submission_rate_limit_is_429_and_not_accepted(sim: SimServer) -> None:
    codes = [submit(sim)["code"] for _ in range(21)]
    assert codes == [200] * 20 + [429]
    st = stats(sim)
    assert st["submissions_accepted"] == 20 and st["rate_limited"] == 1 and st["tasks"] == 20
    assert st["submissions_by_callback_url"]["http://127.0.0.1:9/placeholder"] == 20


def test_submission_rate_window_rolls(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(rate_limit=2, rate_window=1.0)
    assert [submit(sim)["code"] for _ in range(3)] == [200, 200, 429]
    assert submit(sim, key="another-key")["code"] == 200  # per key
    time.sleep(1.05)
    assert submit(sim)["code"] == 200


# ----- validation ---------------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], dict[str, Any], int, str]] = [
    ("missing uploadUrl", {"uploadUrl": ...}, {}, 422, "uploadUrl"),
    ("empty uploadUrl", {"uploadUrl": ""}, {}, 422, "uploadUrl"),
    ("uploadUrl not http", {"uploadUrl": "ftp://x/a.mp3"}, {}, 422, "uploadUrl"),
    ("missing defaultParamFlag", {"defaultParamFlag": ...}, {}, 422, "defaultParamFlag"),
    ("defaultParamFlag not bool", {"defaultParamFlag": "true"}, {}, 422, "defaultParamFlag"),
    ("missing model", {"model": ...}, {}, 422, "model"),
    ("missing callBackUrl", {"callBackUrl": ...}, {}, 422, "callBackUrl"),
    ("empty callBackUrl", {"callBackUrl": ""}, {}, 422, "callBackUrl"),
    ("custom missing style", {"style": ...}, {}, 422, "style"),
    ("custom missing title", {"title": ...}, {}, 422, "title"),
    ("custom empty title", {"title": ""}, {}, 422, "title"),
    ("custom missing continueAt", {"continueAt": ...}, {}, 422, "continueAt"),
    ("custom vocals missing prompt", {"prompt": ...}, {}, 422, "prompt"),
    ("custom vocals blank prompt", {"prompt": "  "}, {}, 422, "prompt"),
    ("missing instrumental = false", {"instrumental": ..., "prompt": ...}, {}, 422, "prompt"),
    ("custom instrumental no prompt", {"instrumental": True, "prompt": ...}, {}, 200, ""),
    ("default mode missing prompt", {"defaultParamFlag": False, "prompt": ...}, {}, 422, "prompt"),
    ("default mode prompt switch off", {"defaultParamFlag": False, "prompt": ...},
     {"require_prompt_in_default_mode": False}, 200, ""),
    ("default mode without style/title/continueAt",
     {"defaultParamFlag": False, "style": ..., "title": ..., "continueAt": ...}, {}, 200, ""),
    ("default mode lengths unchecked", {"defaultParamFlag": False, "title": "t" * 500}, {}, 200, ""),
    ("unknown model", {"model": "V3_5"}, {}, 422, "model"),
    ("V6 refused by default", {"model": "V6"}, {}, 422, "model"),
    ("V6 accepted with switch", {"model": "V6_MINI"}, {"accept_v6": True}, 200, ""),
    ("V4 title 80 ok", {"model": "V4", "title": "t" * 80}, {}, 200, ""),
    ("V4 title 81", {"model": "V4", "title": "t" * 81}, {}, 422, "title"),
    ("V4 style 201", {"model": "V4", "style": "s" * 201}, {}, 422, "style"),
    ("V4 prompt 3001", {"model": "V4", "prompt": "p" * 3001}, {}, 422, "prompt"),
    ("V4_5ALL title 81", {"model": "V4_5ALL", "title": "t" * 81}, {}, 422, "title"),
    ("V5 title 100 ok", {"title": "t" * 100}, {}, 200, ""),
    ("V5 title 101", {"title": "t" * 101}, {}, 422, "title"),
    ("V5_5 style 1001", {"model": "V5_5", "style": "s" * 1001}, {}, 422, "style"),
    ("V4_5PLUS prompt 5001", {"model": "V4_5PLUS", "prompt": "p" * 5001}, {}, 422, "prompt"),
    ("code points counted", {"model": "V4", "title": "é" * 80}, {}, 200, ""),
    ("styleWeight above 1", {"styleWeight": 1.5}, {}, 422, "styleWeight"),
    ("audioWeight negative", {"audioWeight": -0.1}, {}, 422, "audioWeight"),
    ("weirdness three decimals", {"weirdnessConstraint": 0.555}, {}, 422, "weirdnessConstraint"),
    ("weight as string", {"styleWeight": "0.5"}, {}, 422, "styleWeight"),
    ("weight as bool", {"styleWeight": True}, {}, 422, "styleWeight"),
    ("weights ok", {"styleWeight": 0.29, "weirdnessConstraint": 0, "audioWeight": 1}, {}, 200, ""),
    ("continueAt zero", {"continueAt": 0}, {}, 422, "continueAt"),
    ("continueAt negative in default mode", {"defaultParamFlag": False, "continueAt": -1}, {}, 422, "continueAt"),
    ("continueAt equals duration", {"continueAt": 30}, {}, 422, "continueAt"),
    ("continueAt just below duration", {"continueAt": 29.9}, {}, 200, ""),
    ("audio over 8 minutes", {"uploadUrl": "{url}/files/source/600s.mp3", "continueAt": 100}, {}, 422, "8 minutes"),
    ("audio of 8 minutes ok", {"uploadUrl": "{url}/files/source/480s.mp3", "continueAt": 100}, {}, 200, ""),
    ("V4_5ALL over 60 s", {"model": "V4_5ALL", "uploadUrl": "{url}/files/source/61s.mp3"}, {}, 422, "V4_5ALL"),
    ("V4_5ALL 60 s ok", {"model": "V4_5ALL", "uploadUrl": "{url}/files/source/60s.mp3"}, {}, 200, ""),
    ("V4_5ALL rule off", {"model": "V4_5ALL", "uploadUrl": "{url}/files/source/61s.mp3"},
     {"v45all_limit_60s": False}, 200, ""),
    ("personaId in default mode", {"defaultParamFlag": False, "personaId": "p1"}, {}, 422, "personaId"),
    ("personaId in custom mode", {"personaId": "p1", "personaModel": "voice_persona"}, {}, 200, ""),
    ("vocalGender invalid", {"vocalGender": "x"}, {}, 422, "vocalGender"),
    ("unknown fields ignored", {"customMode": True, "variety": 2, "whatever": {"a": 1}}, {}, 200, ""),
    ("foreign uploadUrl not checked", {"uploadUrl": "https://example.org/a.mp3", "continueAt": 9999}, {}, 200, ""),
]


@pytest.mark.parametrize("overrides,knobs,code,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation(make_sim: Callable[..., SimServer], overrides: dict[str, Any], knobs: dict[str, Any],
                    code: int, needle: str) -> None:
    sim = make_sim(**knobs)
    fixed = {k: (v.format(url=sim.url) if isinstance(v, str) and "{url}" in v else v) for k, v in overrides.items()}
    answer = submit(sim, **fixed)
    assert answer["code"] == code, answer
    if code != 200:
        assert needle in answer["msg"] and answer["data"] is None
        assert stats(sim)["submissions_accepted"] == 0


def test_invalid_json_body_is_422(sim: SimServer) -> None:
    resp = requests.post(sim.url + SUBMIT, data=b"{not json", headers=auth(), timeout=5)
    assert resp.json()["code"] == 422
    assert submit(sim, body=[1, 2])["code"] == 422


# ----- callbacks ----------------------------------------------------------------------------------


def test_callbacks_in_order(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True)
    task_id = submit(sim, callBackUrl=receiver.url)["data"]["taskId"]
    bodies = receiver.wait(3)
    assert receiver.types() == ["text", "first", "complete"]
    for body in bodies:
        assert body["code"] == 200 and body["data"]["task_id"] == task_id
    assert bodies[0]["data"]["data"] == []
    first, complete = bodies[1]["data"]["data"], bodies[2]["data"]["data"]
    assert len(first) == 2 and first[1]["audio_url"] == "" and first[1]["stream_audio_url"]
    assert len(complete) == 2 and all(item["audio_url"] for item in complete)
    assert set(complete[0]) >= {"id", "audio_url", "source_audio_url", "stream_audio_url", "source_stream_audio_url",
                                "image_url", "source_image_url", "prompt", "model_name", "title", "tags",
                                "createTime", "duration"}
    assert bodies[2]["msg"] == "All generated successfully."
    time.sleep(0.1)
    st = stats(sim)
    assert st["callbacks_sent"] == 3 and st["callbacks_by_type"] == {"text": 1, "first": 1, "complete": 1}


def test_instrumental_callbacks_skip_text(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True)
    submit(sim, callBackUrl=receiver.url, instrumental=True)
    receiver.wait(2)
    time.sleep(0.2)
    assert receiver.types() == ["first", "complete"]


def test_signed_callbacks_verify(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True, callback_secret="hmac-key-1")
    submit(sim, callBackUrl=receiver.url)
    receiver.wait(3)
    assert len(receiver.events) == 3
    for headers, body in receiver.events:
        assert kie_signature_ok(body, headers, "hmac-key-1")
        assert not kie_signature_ok(body, headers, "another-key")


def test_unsigned_without_secret(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True)
    submit(sim, callBackUrl=receiver.url, instrumental=True)
    receiver.wait(1)
    assert "X-Webhook-Signature" not in receiver.events[0][0]


def test_failed_callback_is_retried(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True, callback_retry_delays=(5, 10, 20))  # 0.1 s, 0.2 s, 0.4 s at factor 0.02
    receiver.statuses = [500]
    submit(sim, callBackUrl=receiver.url, instrumental=True)
    receiver.wait(3)
    time.sleep(0.2)
    assert receiver.types() == ["first", "first", "complete"]
    st = stats(sim)
    assert st["callbacks_failed"] == 1 and st["callbacks_sent"] == 2


def test_callbacks_stop_after_three_consecutive_failures(make_sim: Callable[..., SimServer],
                                                         receiver: Receiver) -> None:
    sim = make_sim(callbacks=True, callback_retry_delays=(5, 5, 5))
    receiver.statuses = [500] * 10
    submit(sim, callBackUrl=receiver.url)
    time.sleep(2.0)
    assert len(receiver.events) == 3
    assert stats(sim)["callbacks_failed"] == 3


def test_callbacks_switch_off(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=False)
    task_id = submit(sim, callBackUrl=receiver.url, instrumental=True)["data"]["taskId"]
    assert wait_status(sim, task_id, {"SUCCESS"})["status"] == "SUCCESS"
    time.sleep(0.1)
    assert receiver.events == []


# ----- file upload --------------------------------------------------------------------------------


def test_stream_upload_then_continue_at_beyond_duration(sim: SimServer) -> None:
    audio = mp3_bytes(10.0)
    resp = requests.post(sim.url + "/api/file-stream-upload", headers=auth(), timeout=5,
                         files={"file": ("song.mp3", audio, "audio/mpeg")}, data={"uploadPath": "demo"})
    answer = resp.json()
    assert answer["success"] is True and answer["code"] == 200 and answer["msg"] == "File uploaded successfully"
    data = answer["data"]
    assert set(data) == {"success", "fileName", "filePath", "downloadUrl", "fileSize", "mimeType", "uploadedAt"}
    assert data["fileSize"] == len(audio) and data["mimeType"] == "audio/mpeg"
    assert data["downloadUrl"] == f"{sim.url}/uploads/{data['filePath']}" and data["filePath"].endswith(".mp3")
    download = requests.get(data["downloadUrl"], timeout=5)
    assert download.status_code == 200 and download.content == audio
    assert submit(sim, uploadUrl=data["downloadUrl"], continueAt=10.5)["code"] == 422
    assert submit(sim, uploadUrl=data["downloadUrl"], continueAt=9.5)["code"] == 200


def test_stream_upload_keeps_file_name_and_binary_bytes(sim: SimServer) -> None:
    blob = os.urandom(4096) + b"\r\n--boundary\r\n" + bytes(range(256))
    answer = requests.post(sim.url + "/api/file-stream-upload", headers=auth(), timeout=5,
                           files={"file": ("x.bin", blob)}, data={"fileName": "fixed-name.bin"}).json()
    assert answer["data"]["fileName"] == "fixed-name.bin"
    assert requests.get(answer["data"]["downloadUrl"], timeout=5).content == blob


def test_base64_upload_wav_duration(sim: SimServer) -> None:
    wav = wav_bytes(4.0)
    encoded = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    answer = requests.post(sim.url + "/api/file-base64-upload", headers=auth(), timeout=5,
                           json={"base64Data": encoded, "fileName": "clip.wav"}).json()
    assert answer["code"] == 200 and answer["data"]["mimeType"] == "audio/wav"
    url = answer["data"]["downloadUrl"]
    assert submit(sim, uploadUrl=url, continueAt=4.0)["code"] == 422
    assert submit(sim, uploadUrl=url, continueAt=3.0)["code"] == 200
    plain = requests.post(sim.url + "/api/file-base64-upload", headers=auth(), timeout=5,
                          json={"base64Data": base64.b64encode(mp3_bytes(2.0)).decode()}).json()
    assert plain["code"] == 200 and plain["data"]["fileSize"] == len(mp3_bytes(2.0))
    bad = requests.post(sim.url + "/api/file-base64-upload", headers=auth(), timeout=5,
                        json={"base64Data": "!!!"}).json()
    assert bad["code"] == 400 and bad["success"] is False


def test_url_upload_loopback_only(sim: SimServer) -> None:
    answer = requests.post(sim.url + "/api/file-url-upload", headers=auth(), timeout=5,
                           json={"fileUrl": f"{sim.url}/files/source/30s.mp3"}).json()
    assert answer["code"] == 200
    url = answer["data"]["downloadUrl"]
    assert submit(sim, uploadUrl=url, continueAt=31)["code"] == 422  # nominal 30 s remembered
    assert submit(sim, uploadUrl=url, continueAt=29)["code"] == 200
    far = requests.post(sim.url + "/api/file-url-upload", headers=auth(), timeout=5,
                        json={"fileUrl": "https://example.org/a.mp3"}).json()
    assert far["code"] == 400


def test_upload_requires_auth(sim: SimServer) -> None:
    answer = requests.post(sim.url + "/api/file-stream-upload", timeout=5,
                           files={"file": ("a.mp3", mp3_bytes(1.0))}).json()
    assert answer["code"] == 401 and answer["success"] is False
    missing = requests.post(sim.url + "/api/file-stream-upload", headers=auth(), timeout=5,
                            files={"other": ("a.mp3", b"x")}).json()
    assert missing["code"] == 400


def test_uploads_expire(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(upload_ttl_seconds=5)  # 0.1 s at factor 0.02
    answer = requests.post(sim.url + "/api/file-stream-upload", headers=auth(), timeout=5,
                           files={"file": ("a.mp3", mp3_bytes(5.0))}).json()
    time.sleep(0.15)
    assert requests.get(answer["data"]["downloadUrl"], timeout=5).status_code == 404
    gone = submit(sim, uploadUrl=answer["data"]["downloadUrl"], continueAt=1)
    assert gone["code"] == 451


# ----- served files -------------------------------------------------------------------------------


def test_served_mp3_is_small_valid_audio(sim: SimServer) -> None:
    task_id = submit(sim)["data"]["taskId"]
    data = wait_status(sim, task_id, {"SUCCESS"})
    takes = data["response"]["sunoData"]
    bodies = []
    for take in takes:
        resp = requests.get(take["audioUrl"], timeout=5)
        assert resp.status_code == 200 and resp.headers["Content-Type"] == "audio/mpeg"
        assert is_frame_sync(resp.content) and 1000 < len(resp.content) < 100_000
        assert mp3_duration(resp.content) == pytest.approx(3.0, abs=0.05)
        bodies.append(resp.content)
        stream = requests.get(take["streamAudioUrl"], timeout=5)
        assert stream.status_code == 200 and is_frame_sync(stream.content)
        image = requests.get(take["imageUrl"], timeout=5)
        assert image.content.startswith(b"\x89PNG") and image.headers["Content-Type"] == "image/png"
    assert hashlib.sha256(bodies[0]).digest() != hashlib.sha256(bodies[1]).digest()


def test_audio_url_not_served_before_success(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(time_factor=1.0)
    submit(sim)
    take = next(iter(sim.simulator.takes))
    assert requests.get(f"{sim.url}/files/audio/{take}.mp3", timeout=5).status_code == 404


def test_source_files(sim: SimServer) -> None:
    resp = requests.get(f"{sim.url}/files/source/30s.mp3", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "audio/mpeg"
    assert is_frame_sync(resp.content) and len(resp.content) < 100_000
    assert mp3_duration(resp.content) is not None
    assert requests.get(f"{sim.url}/files/source/600s.mp3", timeout=5).status_code == 200
    assert requests.get(f"{sim.url}/files/nothing/here", timeout=5).status_code == 404


def test_mp3_bytes_is_pure_and_exact() -> None:
    data = mp3_bytes(30.0)
    assert data == mp3_bytes(30.0) and is_frame_sync(data)
    assert mp3_duration(data) == pytest.approx(30.0, abs=0.03)
    assert mp3_duration(b"not audio at all") is None
    assert mp3_bytes(3.0, b"a") != mp3_bytes(3.0, b"b")


# ----- fault injection ----------------------------------------------------------------------------


@pytest.mark.parametrize("knob,code", [("fault_429", 429), ("fault_500", 500), ("fault_455", 455)])
def test_submit_faults_are_not_queued(make_sim: Callable[..., SimServer], knob: str, code: int) -> None:
    sim = make_sim(**{knob: 1.0})
    answer = submit(sim)
    assert answer["code"] == code and answer["data"] is None
    st = stats(sim)
    assert st["submissions_accepted"] == 0 and st["tasks"] == 0 and st["faults"] == {knob: 1}
    assert st["codes"]["POST /api/v1/generate/upload-extend"] == {str(code): 1}


def test_fault_slow(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_slow=1.0, slow_seconds=0.4)
    started = time.monotonic()
    assert submit(sim)["code"] == 200
    assert time.monotonic() - started >= 0.4
    with pytest.raises(requests.Timeout):
        requests.post(sim.url + SUBMIT, json=valid_body(sim), headers=auth(), timeout=0.1)
    time.sleep(0.4)
    assert stats(sim)["submissions_accepted"] == 2  # the timed-out request still created a task


def test_fault_drop_after_accept(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_drop_after_accept=1.0)
    with pytest.raises(requests.ConnectionError):
        requests.post(sim.url + SUBMIT, json=valid_body(sim), headers=auth(), timeout=5)
    st = stats(sim)
    assert st["submissions_accepted"] == 1 and st["tasks"] == 1 and st["faults"] == {"fault_drop_after_accept": 1}
    task_id = next(iter(sim.simulator.tasks))
    assert poll(sim, task_id)["code"] == 200


def test_fault_generation_fail(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(fault_generation_fail=1.0, callbacks=True)
    task_id = submit(sim, callBackUrl=receiver.url)["data"]["taskId"]
    data = wait_status(sim, task_id, {"GENERATE_AUDIO_FAILED"})
    assert data["status"] == "GENERATE_AUDIO_FAILED" and data["errorCode"] in (500, 501)
    assert data["errorMessage"] and data["response"] is None
    receiver.wait(2)
    assert receiver.types() == ["text", "error"]
    error = receiver.events[1][1]
    assert error["code"] == data["errorCode"] and error["data"]["data"] == []
    assert stats(sim)["faults"] == {"fault_generation_fail": 1}


def test_fault_duplicate_callback(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(fault_duplicate_callback=1.0, callbacks=True)
    submit(sim, callBackUrl=receiver.url, instrumental=True)
    receiver.wait(4)
    time.sleep(0.1)
    assert receiver.types() == ["first", "first", "complete", "complete"]
    assert stats(sim)["faults"] == {"fault_duplicate_callback": 2}


def test_fault_missing_callback(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(fault_missing_callback=1.0, callbacks=True)
    task_id = submit(sim, callBackUrl=receiver.url)["data"]["taskId"]
    wait_status(sim, task_id, {"SUCCESS"})
    time.sleep(0.2)
    assert receiver.events == []
    assert stats(sim)["faults"] == {"fault_missing_callback": 3}


def test_fault_empty_stream(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_empty_stream=1.0)
    task_id = submit(sim)["data"]["taskId"]
    take = wait_status(sim, task_id, {"SUCCESS"})["response"]["sunoData"][0]
    stream = requests.get(take["streamAudioUrl"], timeout=5)
    assert stream.status_code == 200 and stream.content == b""
    assert is_frame_sync(requests.get(take["audioUrl"], timeout=5).content)
    assert stats(sim)["faults"]["fault_empty_stream"] >= 1


def test_fault_callback_exception(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_callback_exception=1.0)
    task_id = submit(sim)["data"]["taskId"]
    data = wait_status(sim, task_id, {"CALLBACK_EXCEPTION"})
    assert data["status"] == "CALLBACK_EXCEPTION"
    takes = data["response"]["sunoData"]
    assert len(takes) == 2 and all(t["audioUrl"] for t in takes)
    assert stats(sim)["faults"] == {"fault_callback_exception": 1}


def test_fault_poll_500(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim()
    task_id = submit(sim)["data"]["taskId"]
    set_config(sim, fault_poll_500=1.0)
    assert poll(sim, task_id)["code"] == 500
    set_config(sim, fault_poll_500=0.0)
    assert poll(sim, task_id)["code"] == 200
    assert stats(sim)["faults"] == {"fault_poll_500": 1}


def test_faults_are_deterministic_with_seed(make_sim: Callable[..., SimServer]) -> None:
    runs = []
    for _ in range(2):
        sim = make_sim(seed=123, fault_500=0.5, rate_limit=100)
        runs.append([submit(sim)["code"] for _ in range(16)])
    assert runs[0] == runs[1] and set(runs[0]) == {200, 500}


# ----- statistics, reset, runtime config ----------------------------------------------------------


def test_stats_and_reset(sim: SimServer) -> None:
    task_id = submit(sim)["data"]["taskId"]
    poll(sim, task_id)
    poll(sim, task_id)
    poll(sim, "unknown")
    st = stats(sim)
    for key in ("requests", "codes", "submissions_accepted", "submissions_by_callback_url", "rate_limited", "polls",
                "polls_by_task", "callbacks_sent", "callbacks_failed", "tasks", "credits", "faults"):
        assert key in st
    assert st["requests"]["GET /api/v1/generate/record-info"] == 3
    assert st["codes"]["GET /api/v1/generate/record-info"] == {"200": 2, "422": 1}
    assert st["polls"] == 3 and st["polls_by_task"] == {task_id: 2, "unknown": 1}
    assert st["credits"] == 10000 - 12
    assert requests.post(sim.url + "/_sim/reset", timeout=5).json()["code"] == 200
    st = stats(sim)
    assert st["tasks"] == 0 and st["submissions_accepted"] == 0 and st["polls"] == 0 and st["credits"] == 10000
    assert st["requests"] == {} and st["codes"] == {}
    assert poll(sim, task_id)["code"] == 422


def test_runtime_config_masks_secrets(sim: SimServer) -> None:
    answer = set_config(sim, api_key="other", callback_secret="s", fault_429=0.25)
    assert answer["code"] == 200
    assert answer["data"]["api_key"] == "***" and answer["data"]["callback_secret"] == "***"
    assert answer["data"]["fault_429"] == 0.25
    assert "other" not in json.dumps(requests.get(sim.url + "/_sim/config", timeout=5).json())
    assert submit(sim)["code"] == 401
    assert set_config(sim, no_such_knob=1)["code"] == 400
    assert set_config(sim, fault_500=2)["code"] == 400


# ----- configuration, CLI, transport-free use -----------------------------------------------------


def test_config_from_env_and_args() -> None:
    cfg = SimConfig.from_env({"KIE_SIM_TIME_FACTOR": "0.05", "KIE_SIM_RATE_LIMIT": "5", "KIE_SIM_FAULT_429": "0.1",
                              "KIE_SIM_CALLBACKS": "false", "KIE_SIM_API_KEY": "k",
                              "KIE_SIM_CALLBACK_RETRY_DELAYS": "1,2,3", "KIE_SIM_SEED": "9"})
    assert (cfg.time_factor, cfg.rate_limit, cfg.fault_429, cfg.callbacks) == (0.05, 5, 0.1, False)
    assert cfg.api_key == "k" and cfg.callback_retry_delays == (1.0, 2.0, 3.0) and cfg.seed == 9
    args = build_parser().parse_args(["--time-factor", "0.5", "--no-accept-v6", "--fault-500", "0.2"])
    cfg = SimConfig.from_args(args, {"KIE_SIM_TIME_FACTOR": "0.05", "KIE_SIM_ACCEPT_V6": "1"})
    assert cfg.time_factor == 0.5 and cfg.accept_v6 is False and cfg.fault_500 == 0.2
    with pytest.raises(ValueError):
        SimConfig.from_env({"KIE_SIM_FAULT_429": "1.5"})


def test_simulator_without_http() -> None:
    simulator = Simulator(SimConfig(seed=1, callbacks=False))
    try:
        body = json.dumps({"uploadUrl": "http://127.0.0.1:8787/files/source/20s.mp3", "defaultParamFlag": True,
                           "instrumental": True, "continueAt": 25, "model": "V4", "callBackUrl": "http://x/cb",
                           "style": "s", "title": "t"}).encode()
        reply = simulator.handle(SimRequest("POST", SUBMIT, headers={"authorization": "Bearer k"}, body=body))
        assert json.loads(reply.body)["code"] == 422 and "continueAt" in json.loads(reply.body)["msg"]
    finally:
        simulator.close()


def test_cli_serves_until_sigterm() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kie_extend.simulator", "--port", "0", "--time-factor", "0.05"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"KIE simulator listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        config = requests.get(match.group(1) + "/_sim/config", timeout=5).json()["data"]
        assert config["time_factor"] == 0.05
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_rejects_bad_knob(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--fault-429", "3"])
    assert exc.value.code == 2
