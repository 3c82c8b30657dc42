"""One simulated task: its timeline, its two takes, and how polls and callbacks render it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kie_extend.simulator.rules import MODEL_NAMES

PENDING = "PENDING"
TEXT_SUCCESS = "TEXT_SUCCESS"
FIRST_SUCCESS = "FIRST_SUCCESS"
SUCCESS = "SUCCESS"
GENERATE_AUDIO_FAILED = "GENERATE_AUDIO_FAILED"
CALLBACK_EXCEPTION = "CALLBACK_EXCEPTION"

ERROR_MESSAGES = {500: "Internal Error, Please try again later.", 501: "Audio generation failed.",
                  531: "Generation failed, credits refunded. Please try again."}
CALLBACK_MESSAGES = {
    "text": "Text generation completed successfully.",
    "first": "First track generated successfully.",
    "complete": "All generated successfully.",
}


@dataclass
class Take:
    """One of the two generated tracks of a task."""

    id: str
    title: str
    tags: str
    prompt: str
    duration: float
    create_time: str

    @property
    def key(self) -> str:
        """The take ID without dashes, used in file URLs."""
        return self.id.replace("-", "")


@dataclass
class Task:
    """A submitted task; its status is derived lazily from the time elapsed since creation."""

    task_id: str
    body: dict[str, Any]
    api_key: str
    base_url: str
    created: float  # monotonic seconds
    t_text: float | None  # elapsed seconds of each stage (already scaled); None = skipped
    t_first: float
    t_done: float
    takes: list[Take]
    fail_code: int | None = None  # GENERATE_AUDIO_FAILED at t_first with this errorCode
    callback_exception: bool = False  # ends CALLBACK_EXCEPTION at t_done, takes present
    empty_stream: bool = False
    empty_success: str | None = None  # SUCCESS without audio: "list" (sunoData []) or "null" (response null)
    cb_task_key: str = "task_id"  # callback spelling: task_id / taskId in data, or "top" (taskId at top level)
    cb_failures: int = 0
    cb_stopped: bool = False
    callback_plan: dict[str, str] = field(default_factory=dict)  # stage -> "send"/"missing"/"duplicate"
    done_stages: list[str] = field(default_factory=list)  # callback stages already gone out (or dropped)
    refund: float = 0.0  # credits given back when the failure shows (a refunded failure: 531, createTask 400)
    refunded: bool = False  # the refund went back to the balance

    @property
    def model(self) -> str:
        """The requested Suno model (KIE spelling)."""
        return str(self.body.get("model"))

    @property
    def model_name(self) -> str:
        """Suno's internal model name for the requested model."""
        return MODEL_NAMES.get(self.model, "chirp-v4")

    @property
    def callback_url(self) -> str:
        """Where callbacks for this task go."""
        return str(self.body.get("callBackUrl") or "")

    def status(self, now: float) -> str:
        """The task status at monotonic time `now`."""
        elapsed = now - self.created
        if self.fail_code is not None and elapsed >= self.t_first:
            return GENERATE_AUDIO_FAILED
        if elapsed >= self.t_done:
            return CALLBACK_EXCEPTION if self.callback_exception else SUCCESS
        if elapsed >= self.t_first:
            return FIRST_SUCCESS
        if self.t_text is not None and elapsed >= self.t_text:
            return TEXT_SUCCESS
        return PENDING

    def stages(self) -> list[tuple[float, str]]:
        """Callback stages with their elapsed times: text/first/complete, or error on failure."""
        out: list[tuple[float, str]] = []
        if self.t_text is not None:
            out.append((self.t_text, "text"))
        if self.fail_code is not None:
            return out + [(self.t_first, "error")]
        out.append((self.t_first, "first"))
        if not self.callback_exception:
            out.append((self.t_done, "complete"))
        return out

    def urls(self, take: Take, final: bool) -> dict[str, str]:
        """The take's URLs (camelCase keys); audio URLs stay empty until `final`."""
        base, key = self.base_url, take.key
        return {
            "audioUrl": f"{base}/files/audio/{key}.mp3" if final else "",
            "sourceAudioUrl": f"{base}/files/source-audio/{key}.mp3" if final else "",
            "streamAudioUrl": f"{base}/files/stream/{key}",
            "sourceStreamAudioUrl": f"{base}/files/source-stream/{key}.mp3",
            "imageUrl": f"{base}/files/image/{key}.png",
            "sourceImageUrl": f"{base}/files/source-image/{key}.png",
        }

    def take_items(self, final: bool) -> list[dict[str, Any]]:
        """Both takes as record-info `sunoData` items."""
        items = []
        for take in self.takes:
            item: dict[str, Any] = {"id": take.id}
            item.update(self.urls(take, final))
            item.update({"prompt": take.prompt, "modelName": self.model_name, "title": take.title,
                         "tags": take.tags, "createTime": take.create_time, "duration": take.duration})
            items.append(item)
        return items

    def record_info(self, now: float) -> dict[str, Any]:
        """The record-info `data` object at monotonic time `now`."""
        status = self.status(now)
        response = None
        if status in (FIRST_SUCCESS, SUCCESS, CALLBACK_EXCEPTION):
            final = status != FIRST_SUCCESS
            response = {"taskId": self.task_id, "sunoData": self.take_items(final)}
            if final and self.empty_success:
                response = None if self.empty_success == "null" else {"taskId": self.task_id, "sunoData": []}
        failed = status == GENERATE_AUDIO_FAILED
        return {
            "taskId": self.task_id,
            "parentMusicId": "",
            "param": json.dumps(self.body, ensure_ascii=False, separators=(",", ":")),
            "response": response,
            "status": status,
            "type": self.model_name,
            "operationType": "upload_extend",
            "errorCode": self.fail_code if failed else None,
            "errorMessage": ERROR_MESSAGES.get(self.fail_code or 0) if failed else None,
        }

    def callback_body(self, stage: str) -> dict[str, Any]:
        """The callback payload (snake_case items) for `stage`: text, first, complete or error."""
        if stage == "error":
            code = self.fail_code or 501
            return self._named({"code": code, "msg": ERROR_MESSAGES.get(code, "Audio generation failed."),
                                "data": {"callbackType": "error", "data": []}})
        items = [] if stage == "text" else [_snake(i) for i in self.take_items(stage == "complete")]
        if stage == "complete" and self.empty_success:
            items = []
        return self._named({"code": 200, "msg": CALLBACK_MESSAGES[stage],
                            "data": {"callbackType": stage, "data": items}})

    def _named(self, body: dict[str, Any]) -> dict[str, Any]:
        """Put the task id where this task's callbacks carry it (the provider uses several spellings)."""
        if self.cb_task_key == "top":
            body["taskId"] = self.task_id
        else:
            body["data"][self.cb_task_key] = self.task_id
        return body


_SNAKE = {
    "audioUrl": "audio_url", "sourceAudioUrl": "source_audio_url", "streamAudioUrl": "stream_audio_url",
    "sourceStreamAudioUrl": "source_stream_audio_url", "imageUrl": "image_url",
    "sourceImageUrl": "source_image_url", "modelName": "model_name",
}


def _snake(item: dict[str, Any]) -> dict[str, Any]:
    """Callback spelling of a take: snake_case except `createTime`."""
    return {_SNAKE.get(k, k): v for k, v in item.items()}
