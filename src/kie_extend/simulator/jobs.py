"""The createTask route (`POST /api/v1/jobs/createTask`, `GET /api/v1/jobs/recordInfo`): its own
validation and answer shapes on top of the same task engine as the legacy route."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.rules import (LEGACY_MODELS, LENGTH_LIMITS, PERSONA_MODELS, V6_MODELS, DurationLookup, Rejection,
                    check_source, weight_problem)
from kie_extend.simulator.tasks import FIRST_SUCCESS, GENERATE_AUDIO_FAILED, PENDING, TEXT_SUCCESS, Task, _snake

JOB_MODEL = "ai-music-api/upload-and-extend-audio"
DEFAULT_MODEL = "V6"
WEIGHT_KEYS = ("style_weight", "weirdness_constraint", "audio_weight")
TEXT_KEYS = ("upload_url", "model", "prompt", "lyrics", "style", "title", "negative_tags", "vocal_gender",
             "persona_id", "persona_model")
#: Task failure codes of this route and their messages; 400 + "try again later" is a refunded
#: upstream failure (a quirk of KIE's), not a bad request.
FAIL_CODES = (400, 500, 501)
FAIL_MESSAGES = {
    400: "Upstream generation failed, credits refunded. Please try again later.",
    500: "Internal Error, Please try again later.",
    501: "Audio generation failed.",
}
#: Inner shapes of `resultJson`, alternated task by task.
RESULT_SHAPES = ("data", "sunoData")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _check(body: Any, config: SimConfig) -> str | None:
    """The first problem of a createTask body (422 text), or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    model = body.get("model")
    if _blank(model):
        return f"model is required (the job type {JOB_MODEL})"
    if model != JOB_MODEL:
        hint = "; the Suno version goes in input.model" if model in V6_MODELS + LEGACY_MODELS else ""
        return f"model must be {JOB_MODEL}, got {model!r}{hint}"
    if body.get("callBackUrl") is not None and not isinstance(body["callBackUrl"], str):
        return "callBackUrl must be a string"
    inp = body.get("input")
    if inp is None:
        return "input is required"
    if not isinstance(inp, dict):
        return "input must be a JSON object"
    for key in TEXT_KEYS:
        if inp.get(key) is not None and not isinstance(inp[key], str):
            return f"input.{key} must be a string"
    if inp.get("instrumental") is not None and not isinstance(inp["instrumental"], bool):
        return "input.instrumental must be a boolean"
    for key in ("continue_at", *WEIGHT_KEYS):
        if inp.get(key) is not None and not _is_number(inp[key]):
            return f"input.{key} must be a number"
    if _blank(inp.get("upload_url")):
        return "input.upload_url is required"
    if urlsplit(inp["upload_url"].strip()).scheme.lower() not in ("http", "https"):
        return "input.upload_url must be an http(s) URL"
    suno = inp.get("model") or DEFAULT_MODEL
    if suno in LEGACY_MODELS and not config.jobs_accept_legacy_models:
        return f"input.model {suno} is discontinued on this route; use one of {', '.join(V6_MODELS)}"
    if suno not in V6_MODELS + LEGACY_MODELS:
        return f"input.model must be one of {', '.join(V6_MODELS)}"
    prompt_max, style_max, title_max = LENGTH_LIMITS[suno]
    for key, limit in (("prompt", prompt_max), ("lyrics", prompt_max), ("style", style_max), ("title", title_max)):
        value = inp.get(key)
        if isinstance(value, str) and len(value) > limit:
            return f"input.{key} is too long for model {suno}: {len(value)} characters (max {limit})"
    for key in WEIGHT_KEYS:
        problem = weight_problem(f"input.{key}", inp.get(key))
        if problem:
            return problem
    if inp.get("continue_at") is not None and not inp["continue_at"] > 0:
        return "input.continue_at must be greater than 0"
    variety = inp.get("variety")
    if variety is not None and (not _is_number(variety) or variety != int(variety) or not 0 <= variety <= 4):
        return "input.variety must be an integer from 0 to 4"
    if inp.get("vocal_gender") not in (None, "", "m", "f"):
        return "input.vocal_gender must be 'm' or 'f'"
    if inp.get("persona_model") not in (None, "", *PERSONA_MODELS):
        return f"input.persona_model must be one of {', '.join(PERSONA_MODELS)}"
    return None


def validate_create_task(body: Any, config: SimConfig, lookup: DurationLookup) -> Rejection | None:
    """Check a createTask body; return the rejection (422, or 451 for a missing own file) or None."""
    msg = _check(body, config)
    if msg:
        return Rejection(422, msg)
    inp = body["input"]
    return check_source(inp["upload_url"], inp.get("model"), inp.get("continue_at"), config, lookup,
                        continue_field="input.continue_at")


def legacy_view(body: dict[str, Any]) -> dict[str, Any]:
    """The fields the task engine reads (legacy spelling) from a valid createTask body."""
    inp = body.get("input") or {}
    return {
        "model": inp.get("model") or DEFAULT_MODEL,
        "instrumental": bool(inp.get("instrumental") or False),
        "title": inp.get("title"),
        "style": inp.get("style"),
        "prompt": inp.get("lyrics") or inp.get("prompt"),
        "callBackUrl": body.get("callBackUrl"),
    }


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass
class JobsTask(Task):
    """A task created through createTask: same timeline and takes, the createTask answer shapes."""

    result_shape: str = "data"  # inner shape of resultJson: "data" (snake_case) or "sunoData" (camelCase)
    cost: float = 0.0
    created_wall: float = 0.0  # epoch seconds of creation

    @property
    def model(self) -> str:
        """The requested Suno model (input.model, V6 by default)."""
        return str((self.body.get("input") or {}).get("model") or DEFAULT_MODEL)

    def state(self, now: float) -> str:
        """The createTask state at monotonic time `now`."""
        status = self.status(now)
        if status == PENDING:
            return "waiting" if now - self.created < 0.2 * self.t_first else "queuing"
        if status in (TEXT_SUCCESS, FIRST_SUCCESS):
            return "generating"
        if status == GENERATE_AUDIO_FAILED:
            return "fail"
        return "success"  # SUCCESS, and CALLBACK_EXCEPTION: the route has no such state; the takes exist

    def result_json(self) -> str:
        """`resultJson` of a finished task, in this task's inner shape."""
        if self.result_shape == "sunoData":
            inner: dict[str, Any] = {"taskId": self.task_id, "sunoData": self.take_items(True)}
        else:
            inner = {"data": [_snake(i) for i in self.take_items(True)]}
        return json.dumps(inner, ensure_ascii=False, separators=(",", ":"))

    def record_info(self, now: float) -> dict[str, Any]:  # type: ignore[override]
        """The recordInfo `data` object at monotonic time `now`."""
        state = self.state(now)
        elapsed = now - self.created
        wall = self.created_wall or time.time() - elapsed
        finished = state in ("success", "fail")
        ended_after = self.t_first if state == "fail" else self.t_done
        return {
            "taskId": self.task_id,
            "model": JOB_MODEL,
            "state": state,
            "param": json.dumps(self.body, ensure_ascii=False, separators=(",", ":")),
            "resultJson": self.result_json() if state == "success" else "",
            "failCode": str(self.fail_code) if state == "fail" else "",
            "failMsg": FAIL_MESSAGES.get(self.fail_code or 0, "Audio generation failed.") if state == "fail" else "",
            "costTime": _ms(ended_after) if finished else _ms(elapsed),
            "completeTime": _ms(wall + ended_after) if finished else None,
            "createTime": _ms(wall),
            "updateTime": _ms(wall + (ended_after if finished else elapsed)),
            # What the task cost: nothing until it ends, and nothing for a refunded failure.
            "creditsConsumed": self.cost if finished and not self.refund else 0,
        }

    def callback_body(self, stage: str) -> dict[str, Any]:
        """The legacy callback payload plus this route's top-level `taskId`."""
        body = super().callback_body(stage)
        if stage == "error":
            code = self.fail_code or 501
            body["msg"] = FAIL_MESSAGES.get(code, body["msg"])
        return {**body, "taskId": self.task_id}


__all__ = ["JOB_MODEL", "JobsTask", "legacy_view", "validate_create_task"]
