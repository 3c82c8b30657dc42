"""The follow-up operation table (provider/operations.py): every documented spelling of every answer.

Pure parsing is tested directly; the client's ``submit_step``/``step_record``/``timestamped_lyrics`` go
over loopback HTTP to a scripted server answering the provider's documented bodies.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_client import Reply, Scripted, scripted  # noqa: F401  (fixture)

from kie_extend.errors import RejectedError, UnavailableError
from kie_extend.provider.operations import (
    OPERATIONS,
    operation,
    parse_lyrics,
    parse_step_callback,
    parse_step_record,
    submit_body,
)

WAV = OPERATIONS["wav"]
STEMS = OPERATIONS["stems"]
MIDI = OPERATIONS["midi"]
VIDEO = OPERATIONS["video"]


def ok(data: Any) -> dict[str, Any]:
    return {"code": 200, "msg": "success", "data": data}


# ----- the table ------------------------------------------------------------------------------------

def test_every_operation_has_routes_and_a_reader() -> None:
    assert set(OPERATIONS) == {"wav", "stems", "midi", "video", "lyrics"}
    for name, op in OPERATIONS.items():
        assert op.name == name
        assert op.submit_path.startswith("/api/v1/")
        assert op.synchronous == (name == "lyrics")
        assert op.result({}) == {} or name == "midi" and op.result({}) == {}
    assert MIDI.source == "stems" and WAV.source == "music"
    assert WAV.conflict_means_exists and VIDEO.conflict_means_exists and not STEMS.conflict_means_exists


def test_unknown_operation_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="wav, stems, midi, video, lyrics"):
        operation("karaoke")


def test_submit_body_carries_source_fields_and_callback() -> None:
    assert submit_body(WAV, {"op": "wav"}, "t1", "a1", "http://cb") == {
        "taskId": "t1", "audioId": "a1", "callBackUrl": "http://cb"}
    assert submit_body(STEMS, {"op": "stems", "type": "split_stem"}, "t1", "a1", "http://cb")["type"] == "split_stem"
    body = submit_body(VIDEO, {"op": "video", "author": "Ann", "domainName": "x.example"}, "t1", "a1", "http://cb")
    assert body["author"] == "Ann" and body["domainName"] == "x.example"
    assert "author" not in submit_body(VIDEO, {"op": "video"}, "t1", "a1", "http://cb")
    assert submit_body(MIDI, {"op": "midi"}, "sep1", None, "http://cb") == {"taskId": "sep1", "callBackUrl": "http://cb"}
    assert "callBackUrl" not in submit_body(OPERATIONS["lyrics"], {"op": "lyrics"}, "t1", "a1", "http://cb")


# ----- records: string and integer flags, result places --------------------------------------------

@pytest.mark.parametrize("flag,state", [
    ("PENDING", "pending"), ("SUCCESS", "succeeded"), ("CREATE_TASK_FAILED", "failed"),
    ("GENERATE_WAV_FAILED", "failed"), ("GENERATE_AUDIO_FAILED", "failed"), (0, "pending"), (1, "succeeded"),
    (2, "failed"), (3, "failed"), ("1", "succeeded"), ("0", "pending"), (None, "pending")])
def test_wav_record_flag_in_either_type(flag: Any, state: str) -> None:
    rec = parse_step_record(WAV, {"taskId": "w1", "successFlag": flag, "errorMessage": "boom" if state == "failed" else None,
                                  "response": {"audioWavUrl": "https://f/x.wav"}})
    assert rec.task_id == "w1" and rec.state == state
    assert rec.result == ({"wav_url": "https://f/x.wav"} if state == "succeeded" else {})
    assert (rec.error == "boom") == (state == "failed")


def test_success_without_url_waits_for_the_next_poll() -> None:
    assert parse_step_record(WAV, {"taskId": "w1", "successFlag": "SUCCESS", "response": None}).state == "pending"


def test_callback_exception_is_decided_by_the_result() -> None:
    with_file = parse_step_record(VIDEO, {"taskId": "v", "successFlag": "CALLBACK_EXCEPTION",
                                          "response": {"videoUrl": "https://f/v.mp4"}})
    assert with_file.state == "succeeded" and with_file.result == {"video_url": "https://f/v.mp4"}
    assert parse_step_record(VIDEO, {"taskId": "v", "successFlag": "CALLBACK_EXCEPTION"}).state == "failed"


def test_stems_separate_vocal_and_split_stem() -> None:
    two = parse_step_record(STEMS, {"taskId": "s", "successFlag": "SUCCESS", "response": {
        "vocalUrl": "https://f/v.mp3", "instrumentalUrl": "https://f/i.mp3", "drumsUrl": None}})
    assert two.result == {"vocal_url": "https://f/v.mp3", "instrumental_url": "https://f/i.mp3"}
    many = parse_step_record(STEMS, {"taskId": "s", "successFlag": "SUCCESS", "response": {
        "instrumentalUrl": None, "vocalUrl": "https://f/v.mp3", "drumsUrl": "https://f/d.mp3",
        "backingVocalsUrl": "https://f/b.mp3",
        "originData": [{"id": "st1", "stem_type_group_name": "Drums", "audio_url": "https://f/d.mp3", "duration": "12.5"}]}})
    assert many.result["drums_url"] == "https://f/d.mp3" and many.result["backing_vocals_url"] == "https://f/b.mp3"
    assert "instrumental_url" not in many.result
    assert many.result["stems"] == [{"id": "st1", "name": "Drums", "audio_url": "https://f/d.mp3", "duration": 12.5}]


def test_midi_integer_flags_and_string_note_times() -> None:
    rec = parse_step_record(MIDI, {"taskId": "m", "successFlag": 1, "midiData": {"state": "complete", "instruments": [
        {"name": "Drums", "notes": [{"pitch": 73, "start": "0.0364", "end": "0.1822", "velocity": 1}]}]}})
    assert rec.state == "succeeded"
    assert rec.result == {"notes": [{"name": "Drums", "notes": [
        {"pitch": 73.0, "start": 0.0364, "end": 0.1822, "velocity": 1.0}]}]}
    empty = parse_step_record(MIDI, {"taskId": "m", "successFlag": 1, "midiData": {"state": "complete"}})
    assert empty.state == "succeeded" and empty.result == {"notes": []}
    assert parse_step_record(MIDI, {"taskId": "m", "successFlag": 3, "errorMessage": "x"}).state == "failed"


# ----- callbacks: the field-name variants -------------------------------------------------------------

@pytest.mark.parametrize("data", [
    {"task_id": "w1", "audioWavUrl": "https://f/x.wav"},
    {"task_id": "w1", "audio_wav_url": "https://f/x.wav"},
    {"taskId": "w1", "response": {"audioWavUrl": "https://f/x.wav"}},
])
def test_wav_callback_every_spelling(data: dict[str, Any]) -> None:
    rec = parse_step_callback(WAV, {"code": 200, "msg": "success", "data": data})
    assert (rec.task_id, rec.state, rec.result) == ("w1", "succeeded", {"wav_url": "https://f/x.wav"})


@pytest.mark.parametrize("place", ["vocal_separation_info", "vocal_removal_info"])
def test_stems_callback_either_info_name(place: str) -> None:
    rec = parse_step_callback(STEMS, {"code": 200, "data": {"task_id": "s1", place: {
        "vocal_url": "https://f/v.mp3", "instrumental_url": "https://f/i.mp3"}}})
    assert rec.task_id == "s1" and rec.result == {"vocal_url": "https://f/v.mp3", "instrumental_url": "https://f/i.mp3"}


def test_midi_callback_task_id_at_top_level_or_in_data() -> None:
    top = parse_step_callback(MIDI, {"task_id": "m1", "code": 200, "msg": "success",
                                     "data": {"state": "complete", "instruments": []}})
    assert top.task_id == "m1" and top.state == "succeeded"
    inner = parse_step_callback(MIDI, {"code": 200, "data": {"taskId": "m2", "state": "complete", "instruments": []}})
    assert inner.task_id == "m2"


def test_failure_callback_and_video_null_url() -> None:
    rec = parse_step_callback(VIDEO, {"code": 500, "msg": "Internal Error", "data": {"task_id": "v1", "video_url": None}})
    assert (rec.task_id, rec.state, rec.error) == ("v1", "failed", "Internal Error")


def test_lyrics_both_spellings_and_instrumental() -> None:
    camel = parse_lyrics({"alignedWords": [{"word": "[Verse]\nHi", "success": True, "startS": 1.2, "endS": "1.5", "palign": 0}]})
    snake = parse_lyrics({"aligned_words": [{"word": "[Verse]\nHi", "success": True, "start_s": 1.2, "end_s": 1.5, "p_align": 0}]})
    assert camel == snake == {"aligned_words": [{"word": "[Verse]\nHi", "success": True, "start_s": 1.2, "end_s": 1.5, "palign": 0.0}]}
    assert parse_lyrics(None) == {"aligned_words": []}


# ----- the client over loopback HTTP ------------------------------------------------------------------

def test_client_submits_each_operation_on_its_route(scripted: Scripted) -> None:
    client = scripted.client()
    for name in ("wav", "stems", "midi", "video"):
        scripted.reply = Reply(body=ok({"taskId": f"{name}-task"}))
        body = submit_body(OPERATIONS[name], {"op": name, "type": "separate_vocal"}, "t1", "a1", "http://cb")
        assert client.submit_step(name, body) == f"{name}-task"
        seen = scripted.seen[-1]
        assert (seen.method, seen.path) == ("POST", OPERATIONS[name].submit_path)
        assert json.loads(seen.body)["callBackUrl"] == "http://cb"


def test_client_409_is_a_typed_refusal_and_missing_task_id_retryable(scripted: Scripted) -> None:
    scripted.reply = Reply(body={"code": 409, "msg": "WAV record already exists", "data": None})
    with pytest.raises(RejectedError) as info:
        scripted.client().submit_step("wav", {"taskId": "t", "audioId": "a", "callBackUrl": "http://cb"})
    assert info.value.code == 409
    scripted.reply = Reply(body=ok(None))
    with pytest.raises(UnavailableError):
        scripted.client().submit_step("video", {"taskId": "t", "audioId": "a", "callBackUrl": "http://cb"})


def test_client_polls_each_record_route(scripted: Scripted) -> None:
    scripted.reply = Reply(body=ok({"taskId": "m1", "successFlag": 0, "midiData": None}))
    assert scripted.client().step_record("midi", "m1").state == "pending"
    assert scripted.seen[-1].path == "/api/v1/midi/record-info?taskId=m1"
    scripted.reply = Reply(body=ok({"taskId": "w1", "successFlag": "SUCCESS", "response": {"audioWavUrl": "https://f/x.wav"}}))
    rec = scripted.client().step_record("wav", "w1")
    assert rec.result == {"wav_url": "https://f/x.wav"}
    with pytest.raises(ValueError, match="synchronous"):
        scripted.client().step_record("lyrics", "x")


def test_client_timestamped_lyrics(scripted: Scripted) -> None:
    scripted.reply = Reply(body=ok({"alignedWords": [{"word": "la", "success": True, "startS": 0.5, "endS": 0.9, "palign": 0}],
                                    "waveformData": [0.1], "hootCer": 0.3, "isStreamed": False}))
    assert scripted.client().timestamped_lyrics("t1", "a1")["aligned_words"][0]["start_s"] == 0.5
    seen = scripted.seen[-1]
    assert seen.path == "/api/v1/generate/get-timestamped-lyrics"
    assert json.loads(seen.body) == {"taskId": "t1", "audioId": "a1"}
