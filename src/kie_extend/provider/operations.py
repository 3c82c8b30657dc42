"""KIE's follow-up operations (WAV, stems, MIDI, video, lyrics) as one table: routes, fields, statuses, results.

Adding the next KIE operation is one ``Operation`` entry in ``OPERATIONS``, not a new code path: the
client submits with ``submit_path`` and polls ``record_path``; ``parse_step_record`` and
``parse_step_callback`` read any of them. Parsing is permissive on purpose, because the provider's
pages disagree with each other:

- the status field ``successFlag`` (``success_flag`` in a snake_case answer) is a string (``PENDING``, ``SUCCESS``, ``*FAILED*``,
  ``CALLBACK_EXCEPTION``) for WAV, stems and video, and an integer 0–3 for MIDI; either type is
  accepted for every operation;
- ``CALLBACK_EXCEPTION`` counts as success when the result is there, else as failure;
- result fields come camelCase (record-info) or snake_case (callbacks), at ``data.x``,
  ``data.response.x`` or under ``vocal_separation_info`` / ``vocal_removal_info``;
- lyrics' word timings come as ``startS``/``endS``/``palign`` or ``start_s``/``end_s``/``p_align``.

Results take the shapes of the job record's ``steps[].result``: wav ``{"wav_url"}``, stems
``{"vocal_url", "instrumental_url", …every other "<stem>_url"}``, midi ``{"notes": [instrument…]}``,
video ``{"video_url"}``, lyrics ``{"aligned_words": [word…]}``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

StepState = Literal["pending", "succeeded", "failed"]

#: Integer success flags (MIDI's documented type): 0 pending, 1 success, 2 task creation failed,
#: 3 generation failed.
INT_FLAGS: dict[int, StepState] = {0: "pending", 1: "succeeded", 2: "failed", 3: "failed"}

#: Stem names the separation record may carry, camelCase as record-info spells them.
STEM_FIELDS = ("vocalUrl", "instrumentalUrl", "backingVocalsUrl", "drumsUrl", "bassUrl", "guitarUrl",
               "pianoUrl", "keyboardUrl", "percussionUrl", "stringsUrl", "synthUrl", "fxUrl", "brassUrl",
               "woodwindsUrl", "originUrl")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _first(*values: Any) -> Any:
    for value in values:
        if value not in (None, "", [], {}):
            return value
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _wav_result(data: dict[str, Any]) -> dict[str, Any]:
    resp = _dict(data.get("response"))
    url = _first(resp.get("audioWavUrl"), resp.get("audio_wav_url"), data.get("audioWavUrl"),
                 data.get("audio_wav_url"))
    return {"wav_url": url} if url else {}


def _stems_result(data: dict[str, Any]) -> dict[str, Any]:
    places = [_dict(data.get("response")), _dict(data.get("vocal_separation_info")),
              _dict(data.get("vocal_removal_info")), data]
    out: dict[str, Any] = {}
    for name in STEM_FIELDS:
        snake = _snake(name)
        url = _first(*(p.get(name) for p in places), *(p.get(snake) for p in places))
        if url:
            out[snake] = url
    origin = _first(*(p.get("originData") for p in places), *(p.get("origin_data") for p in places))
    if isinstance(origin, list):
        out["stems"] = [{"id": _dict(o).get("id"), "name": _dict(o).get("stem_type_group_name"),
                         "audio_url": _dict(o).get("audio_url"), "duration": _number(_dict(o).get("duration"))}
                        for o in origin if isinstance(o, dict)]
    return out if any(k.endswith("_url") for k in out) else {}


def _midi_result(data: dict[str, Any]) -> dict[str, Any]:
    midi = _dict(_first(data.get("midiData"), data.get("midi_data"))) or data
    instruments = midi.get("instruments")
    if not isinstance(instruments, list):
        return {}
    notes = []
    for inst in instruments:
        if not isinstance(inst, dict):
            continue
        notes.append({"name": inst.get("name") or "",
                      "notes": [{"pitch": _number(n.get("pitch")), "start": _number(n.get("start")),
                                 "end": _number(n.get("end")), "velocity": _number(n.get("velocity"))}
                                for n in inst.get("notes") or [] if isinstance(n, dict)]})
    return {"notes": notes}


def _video_result(data: dict[str, Any]) -> dict[str, Any]:
    resp = _dict(data.get("response"))
    url = _first(resp.get("videoUrl"), resp.get("video_url"), data.get("videoUrl"), data.get("video_url"))
    return {"video_url": url} if url else {}


def _lyrics_result(data: dict[str, Any]) -> dict[str, Any]:
    words = _first(data.get("alignedWords"), data.get("aligned_words"))
    if not isinstance(words, list):
        return {}
    return {"aligned_words": [
        {"word": w.get("word") or "", "success": bool(w.get("success", True)),
         "start_s": _number(_first(w.get("startS"), w.get("start_s"))),
         "end_s": _number(_first(w.get("endS"), w.get("end_s"))),
         "palign": _number(_first(w.get("palign"), w.get("p_align")))}
        for w in words if isinstance(w, dict)]}


@dataclass(frozen=True)
class Operation:
    """One KIE follow-up operation: where it is sent and polled, and how its answer is read."""

    name: str
    #: POST path that starts it (or, for a synchronous one, answers it).
    submit_path: str
    #: GET path of its record (``?taskId=``); None for a synchronous operation.
    record_path: str | None
    #: Reads the result out of a record's or callback's ``data``: {} while none is there.
    result: Callable[[dict[str, Any]], dict[str, Any]]
    #: Which task the submit names: the music task (``taskId`` + ``audioId``), or the stems task (MIDI).
    source: Literal["music", "stems"] = "music"
    #: Whether a duplicate submit answers 409 "record already exists" (the first one's task stands).
    conflict_means_exists: bool = False
    #: Step fields copied into the submit body, ours → the provider's.
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def synchronous(self) -> bool:
        """Whether the answer carries the result (no task, no polling, no callback)."""
        return self.record_path is None


#: Every follow-up operation, by the step's ``op``.
OPERATIONS: dict[str, Operation] = {
    "wav": Operation("wav", "/api/v1/wav/generate", "/api/v1/wav/record-info", _wav_result,
                     conflict_means_exists=True),
    "stems": Operation("stems", "/api/v1/vocal-removal/generate", "/api/v1/vocal-removal/record-info",
                       _stems_result, fields={"type": "type"}),
    "midi": Operation("midi", "/api/v1/midi/generate", "/api/v1/midi/record-info", _midi_result,
                      source="stems"),
    "video": Operation("video", "/api/v1/mp4/generate", "/api/v1/mp4/record-info", _video_result,
                       conflict_means_exists=True, fields={"author": "author", "domainName": "domainName"}),
    "lyrics": Operation("lyrics", "/api/v1/generate/get-timestamped-lyrics", None, _lyrics_result),
}


@dataclass
class StepRecord:
    """What a follow-up's record (or callback) says: ``state``, the ``result`` in our shape, the error."""

    task_id: str
    state: StepState
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def operation(name: str) -> Operation:
    """The table entry for ``name``; KeyError names the known ones."""
    try:
        return OPERATIONS[name]
    except KeyError:
        raise KeyError(f"unknown follow-up operation {name!r} (known: {', '.join(OPERATIONS)})") from None


def submit_body(op: Operation, step: dict[str, Any], task_id: str, audio_id: str | None,
                callback_url: str) -> dict[str, Any]:
    """The submit body: the source task (music task + take, or for MIDI the stems task), the step's own
    fields, and ``callBackUrl`` (the legacy routes answer 422 without one, even when only polled)."""
    body: dict[str, Any] = {"taskId": task_id}
    if audio_id:
        body["audioId"] = audio_id
    for ours, theirs in op.fields.items():
        if step.get(ours) not in (None, ""):
            body[theirs] = step[ours]
    if not op.synchronous:
        body["callBackUrl"] = callback_url
    return body


def _state_of(flag: Any, result: dict[str, Any], op: str, task_id: str) -> StepState:
    if isinstance(flag, bool):
        flag = int(flag)
    if isinstance(flag, str) and flag.strip().isdigit():
        flag = int(flag.strip())
    if isinstance(flag, int):
        return INT_FLAGS.get(flag, "failed")
    text = str(flag or "").upper()
    if text in ("", "PENDING", "GENERATING", "RUNNING", "WAITING", "QUEUING"):
        return "pending"
    if text == "SUCCESS":
        return "succeeded"
    if text == "CALLBACK_EXCEPTION":
        # Terminal per the provider's pages, yet the file may exist: the result decides.
        log.info("follow-up %s task %s: CALLBACK_EXCEPTION %s a result", op, task_id,
                 "with" if result else "without")
        return "succeeded" if result else "failed"
    if "FAIL" in text or "ERROR" in text:
        return "failed"
    return "pending"


def parse_step_record(op: Operation, data: dict[str, Any]) -> StepRecord:
    """A StepRecord from the ``data`` of a follow-up's record-info answer.

    A ``SUCCESS`` without a result stays ``pending`` (the provider sets the URL only with success, and a
    later poll tells); MIDI's success may carry no instruments (a valid, empty result)."""
    task_id = str(_first(data.get("taskId"), data.get("task_id")) or "")
    result = op.result(data)
    flag = data.get("successFlag") if data.get("successFlag") is not None else data.get("success_flag")
    state = _state_of(flag, result, op.name, task_id)
    if state == "succeeded" and not result:
        if op.name == "midi":
            result = {"notes": []}
        else:
            state = "pending"
    error = None
    if state == "failed":
        error = str(_first(data.get("errorMessage"), data.get("error_message"), data.get("errorCode"),
                           data.get("error_code"), flag) or "failed")
    return StepRecord(task_id, state, result if state == "succeeded" else {}, error)


def parse_step_callback(op: Operation, body: dict[str, Any]) -> StepRecord:
    """A StepRecord from a follow-up callback body (a hint: record-info confirms it).

    The task id is taken from wherever the body carries it (``data.task_id``, ``data.taskId`` or, for
    MIDI, the top level); a body ``code`` other than 200 means the step failed."""
    data = _dict(body.get("data"))
    task_id = str(_first(data.get("task_id"), data.get("taskId"), body.get("task_id"), body.get("taskId"))
                  or "")
    result = op.result(data)
    code = body.get("code")
    if code not in (None, 200, "200"):
        return StepRecord(task_id, "failed", {}, str(body.get("msg") or f"code {code}"))
    return StepRecord(task_id, "succeeded" if result else "pending", result)


def parse_lyrics(data: Any) -> dict[str, Any]:
    """The lyrics result from the synchronous answer's ``data``; an instrumental track gives no words."""
    return _lyrics_result(_dict(data)) or {"aligned_words": []}
