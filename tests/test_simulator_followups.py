"""The simulator's follow-up routes (WAV, stems, MIDI, video, lyrics), driven over loopback through the
project's own provider client and operation table, in every spelling the provider's pages allow."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from kie_extend.errors import InvalidRequestError, ProviderCodeError, RateLimitedError, RejectedError
from kie_extend.provider.client import KieClient
from kie_extend.provider.operations import OPERATIONS, StepRecord, parse_step_callback, submit_body
from kie_extend.simulator import SimConfig, SimServer, serve

pytestmark = pytest.mark.timeout(60)

KEY = "test-key"
FAST = {"seed": 11, "time_factor": 0.01, "poll_limit": 1000, "callbacks": False}


class Receiver:
    """A loopback callback receiver keeping every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.cond:
                    receiver.bodies.append(body)
                    receiver.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/steps"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: pred(self.bodies), timeout)
            return list(self.bodies)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.httpd.shutdown()
    rec.httpd.server_close()


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    servers: list[SimServer] = []

    def make(state_file: Path | None = None, **knobs: Any) -> SimServer:
        server = serve(SimConfig(**{**FAST, **knobs}), state_file=state_file)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def client_of(sim: SimServer) -> KieClient:
    return KieClient(sim.url, KEY, connect_timeout=2, read_timeout=10)


def finished_music(sim: SimServer, client: KieClient, prompt: str = "[Verse]\nla la la sing along") -> tuple[str, list[str]]:
    """A music task that has finished, and its two takes' audio ids."""
    body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "callBackUrl": "http://127.0.0.1:9/cb", "prompt": prompt,
            "style": "folk", "title": "T"}
    task_id = client.submit_extend(body)
    deadline = time.monotonic() + 10
    while True:
        rec = client.record_info(task_id)
        if rec.status == "SUCCESS":
            return task_id, [t["id"] for t in rec.tracks]
        assert time.monotonic() < deadline, rec.status
        time.sleep(0.05)


def until_done(client: KieClient, op: str, task_id: str, timeout: float = 10.0) -> StepRecord:
    deadline = time.monotonic() + timeout
    while True:
        rec = client.step_record(op, task_id)
        if rec.state != "pending":
            return rec
        assert time.monotonic() < deadline, f"{op} {task_id} still pending"
        time.sleep(0.03)


def stats(sim: SimServer) -> dict[str, Any]:
    return requests.get(sim.url + "/_sim/stats", timeout=5).json()


def step(client: KieClient, op: str, spec: dict[str, Any], task_id: str, audio_id: str | None,
         cb: str = "http://127.0.0.1:9/steps") -> str:
    return client.submit_step(op, submit_body(OPERATIONS[op], {"op": op, **spec}, task_id, audio_id, cb))


# ----- every operation, every spelling --------------------------------------------------------------

@pytest.mark.parametrize("flags,fields", [("documented", "documented"), ("string", "camel"), ("int", "snake"),
                                          ("mixed", "mixed")])
def test_every_operation_end_to_end_through_the_client(make_sim: Callable[..., SimServer], flags: str,
                                                       fields: str) -> None:
    sim = make_sim(followup_flag_style=flags, followup_field_style=fields)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    wav = until_done(client, "wav", step(client, "wav", {}, music, takes[0]))
    assert wav.state == "succeeded", wav
    got = requests.get(wav.result["wav_url"], timeout=5)
    assert got.status_code == 200 and got.content[:4] == b"RIFF" and got.content[8:12] == b"WAVE"

    sep = until_done(client, "stems", step(client, "stems", {"type": "separate_vocal"}, music, takes[1]))
    assert sep.state == "succeeded" and {"vocal_url", "instrumental_url"} <= set(sep.result), sep
    for name in ("vocal_url", "instrumental_url"):
        audio = requests.get(sep.result[name], timeout=5)
        assert audio.status_code == 200 and audio.headers["Content-Type"] == "audio/mpeg" and len(audio.content) > 100

    split = until_done(client, "stems", step(client, "stems", {"type": "split_stem"}, music, takes[0]))
    assert {"vocal_url", "drums_url", "bass_url", "backing_vocals_url"} <= set(split.result)

    midi = until_done(client, "midi", step(client, "midi", {}, sep.task_id, None))
    assert midi.state == "succeeded" and midi.result["notes"] and midi.result["notes"][0]["notes"]

    video = until_done(client, "video", step(client, "video", {"author": "Ann", "domainName": "x.example"},
                                             music, takes[0]))
    clip = requests.get(video.result["video_url"], timeout=5)
    assert clip.headers["Content-Type"] == "video/mp4" and clip.content[4:8] == b"ftyp"

    words = client.timestamped_lyrics(music, takes[0])["aligned_words"]
    assert [w["word"] for w in words] == ["[Verse]", "la", "la", "la", "sing", "along"]
    assert all(w["start_s"] is not None and w["end_s"] > w["start_s"] for w in words)

    s = stats(sim)
    assert s["followups_accepted"] == {"wav": 1, "stems": 2, "midi": 1, "video": 1, "lyrics": 1}
    assert s["followups_paid_twice"] == 0


def test_the_documented_spelling_is_a_string_flag_and_midi_an_integer(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim()
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    wav = step(client, "wav", {}, music, takes[0])
    sep = step(client, "stems", {"type": "separate_vocal"}, music, takes[0])
    until_done(client, "stems", sep)
    until_done(client, "wav", wav)
    midi = step(client, "midi", {}, sep, None)
    until_done(client, "midi", midi)
    raw = lambda path, tid: requests.get(sim.url + path, params={"taskId": tid},  # noqa: E731
                                         headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["data"]
    assert raw("/api/v1/wav/record-info", wav)["successFlag"] == "SUCCESS"
    assert raw("/api/v1/wav/record-info", wav)["response"]["audioWavUrl"]
    assert raw("/api/v1/midi/record-info", midi)["successFlag"] == 1
    assert raw("/api/v1/vocal-removal/record-info", sep)["response"]["vocalUrl"]


# ----- duplicates, payment, refusals ----------------------------------------------------------------

def test_a_second_wav_or_video_of_the_same_take_is_409_and_not_paid(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(credits=100)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    first = step(client, "wav", {}, music, takes[0])
    with pytest.raises(RejectedError) as exc:
        step(client, "wav", {}, music, takes[0])
    assert exc.value.code == 409 and "already exists" in str(exc.value)
    step(client, "wav", {}, music, takes[1])  # the other take is its own record
    step(client, "video", {}, music, takes[0])
    with pytest.raises(RejectedError):
        step(client, "video", {}, music, takes[0])
    assert until_done(client, "wav", first).state == "succeeded"
    s = stats(sim)
    assert s["followup_conflicts"] == {"wav": 1, "video": 1}
    assert s["followups_paid_twice"] == 0
    assert s["credits"] == pytest.approx(100 - 12 - 0.4 * 2 - 2)


def test_stems_are_charged_on_every_call_and_show_as_paid_twice(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(credits=1000)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    step(client, "stems", {"type": "separate_vocal"}, music, takes[0])
    step(client, "stems", {"type": "separate_vocal"}, music, takes[0])
    step(client, "stems", {"type": "split_stem"}, music, takes[0])
    s = stats(sim)
    assert s["followup_paid"][f"stems:{music}:{takes[0]}:separate_vocal"] == 2
    assert s["followups_paid_twice"] == 1
    assert s["credits"] == pytest.approx(1000 - 12 - 10 - 10 - 50)


def test_bad_follow_up_submits_are_refused(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(time_factor=0.05)
    client = client_of(sim)
    body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": False, "continueAt": 10,
            "model": "V5", "callBackUrl": "http://127.0.0.1:9/cb", "prompt": "x", "style": "s", "title": "t"}
    running = client.submit_extend(body)
    cb = "http://127.0.0.1:9/steps"
    with pytest.raises(InvalidRequestError, match="has not finished"):
        client.submit_step("wav", {"taskId": running, "audioId": "x", "callBackUrl": cb})
    music, takes = finished_music(sim, client)
    cases = [
        ("wav", {"taskId": music, "audioId": takes[0]}, "callBackUrl is required"),
        ("wav", {"taskId": music, "callBackUrl": cb}, "audioId is required"),
        ("wav", {"taskId": music, "audioId": "not-a-take", "callBackUrl": cb}, "not a track"),
        ("wav", {"taskId": "nope", "audioId": takes[0], "callBackUrl": cb}, "taskId not found"),
        ("stems", {"taskId": music, "audioId": takes[0], "callBackUrl": cb, "type": "karaoke"}, "type must be"),
        ("stems", {"taskId": music, "audioId": takes[0], "callBackUrl": cb}, "type must be"),
        ("video", {"taskId": music, "audioId": takes[0], "callBackUrl": cb, "author": "a" * 51}, "at most 50"),
        ("midi", {"taskId": music, "callBackUrl": cb}, "vocal separation task"),
    ]
    for op, body, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            client.submit_step(op, body)
    with pytest.raises(ProviderCodeError, match="null"):
        client.step_record("wav", "0" * 32)
    assert stats(sim).get("followups_accepted", {}) == {}


def test_extension_and_follow_up_submits_share_one_rate_bucket(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(rate_limit=3, rate_window=3.0)
    client = client_of(sim)
    music, takes = finished_music(sim, client)  # 1 of 3
    step(client, "wav", {}, music, takes[0])  # 2 of 3
    client.timestamped_lyrics(music, takes[0])  # 3 of 3
    with pytest.raises(RateLimitedError):
        step(client, "video", {}, music, takes[0])
    with pytest.raises(RateLimitedError):
        finished_music(sim, client)
    s = stats(sim)
    assert s["followup_rate_limited"] == {"video": 1} and s["rate_limited"] == 2


# ----- failures and callbacks -----------------------------------------------------------------------

@pytest.mark.parametrize("flags", ["documented", "int"])
def test_a_failed_follow_up_reads_as_failed(make_sim: Callable[..., SimServer], flags: str) -> None:
    sim = make_sim(fault_wav_fail=1.0, fault_midi_fail=1.0, followup_flag_style=flags)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    rec = until_done(client, "wav", step(client, "wav", {}, music, takes[0]))
    assert rec.state == "failed" and rec.error and rec.result == {}
    sep = until_done(client, "stems", step(client, "stems", {"type": "separate_vocal"}, music, takes[0]))
    assert sep.state == "succeeded"
    midi = until_done(client, "midi", step(client, "midi", {}, sep.task_id, None))
    assert midi.state == "failed"


def test_callback_exception_with_the_file_present_is_a_success(make_sim: Callable[..., SimServer]) -> None:
    sim = make_sim(fault_followup_callback_exception=1.0)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    rec = until_done(client, "video", step(client, "video", {}, music, takes[0]))
    assert rec.state == "succeeded" and rec.result["video_url"]


def test_callbacks_carry_every_documented_shape(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True, fault_stems_fail=0.0)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    ids = {"wav": step(client, "wav", {}, music, takes[0], receiver.url)}
    for n in range(4):  # both nestings of the stems callback show up among a few tasks
        ids[f"stems{n}"] = step(client, "stems", {"type": "separate_vocal"}, music, takes[n % 2], receiver.url)
    ids["video"] = step(client, "video", {}, music, takes[0], receiver.url)
    until_done(client, "stems", ids["stems0"])
    ids["midi"] = step(client, "midi", {}, ids["stems0"], None, receiver.url)
    bodies = receiver.wait(lambda b: len(b) >= len(ids))
    by_id: dict[str, dict[str, Any]] = {}
    for body in bodies:
        tid = body.get("task_id") or body["data"].get("task_id")
        by_id[tid] = body
    assert set(by_id) == set(ids.values())
    for name, tid in ids.items():
        op = name.rstrip("0123456789")
        parsed = parse_step_callback(OPERATIONS[op], by_id[tid])
        assert parsed.task_id == tid and parsed.state == "succeeded", (name, by_id[tid])
    assert "task_id" in by_id[ids["midi"]]  # MIDI names its task at the top level
    assert "audio_wav_url" in by_id[ids["wav"]]["data"]  # callbacks are snake_case
    nests = {next(k for k in by_id[ids[f"stems{n}"]]["data"] if k.endswith("_info")) for n in range(4)}
    assert nests <= {"vocal_separation_info", "vocal_removal_info"} and nests
    deadline = time.monotonic() + 5  # the counter moves just after the receiver answered
    while stats(sim)["callbacks_sent"] < len(ids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats(sim)["callbacks_sent"] == len(ids)


def test_a_failure_callback_reads_as_failed(make_sim: Callable[..., SimServer], receiver: Receiver) -> None:
    sim = make_sim(callbacks=True, fault_video_fail=1.0)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    tid = step(client, "video", {}, music, takes[0], receiver.url)
    body = receiver.wait(lambda b: len(b) >= 1)[0]
    parsed = parse_step_callback(OPERATIONS["video"], body)
    assert parsed.task_id == tid and parsed.state == "failed"


# ----- a restarted simulator keeps its follow-ups ---------------------------------------------------

def test_a_restart_keeps_follow_up_records_and_their_409s(make_sim: Callable[..., SimServer], tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    sim = make_sim(state_file=state)
    client = client_of(sim)
    music, takes = finished_music(sim, client)
    wav = step(client, "wav", {}, music, takes[0])
    until_done(client, "wav", wav)
    sim.stop()
    again = make_sim(state_file=state)
    client = client_of(again)
    assert client.step_record("wav", wav).state == "succeeded"
    with pytest.raises(RejectedError):
        step(client, "wav", {}, music, takes[0])
    assert stats(again)["followup_paid"] == {f"wav:{music}:{takes[0]}": 1}
