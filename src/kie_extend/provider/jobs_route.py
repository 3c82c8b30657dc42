"""Adapter for the provider's createTask route (``KIE_ROUTE=jobs``), behind the KieClient interface.

The rest of kie-extend keeps speaking the legacy route's language: a camelCase extend body in,
a :class:`TaskRecord` with legacy statuses out. This adapter translates both ways:

- submit: ``POST /api/v1/jobs/createTask`` with ``{"model": JOB_MODEL, "callBackUrl": …,
  "input": {snake_case…}}`` built by :func:`to_create_task`;
- poll: ``GET /api/v1/jobs/recordInfo`` whose ``data.state`` (waiting, queuing, generating,
  success, fail) becomes a legacy status, whose ``resultJson`` (a JSON string whose inner shape
  varies: ``{"data": [snake_case takes]}`` or a camelCase ``sunoData`` list) becomes the tracks,
  and whose ``failCode``/``failMsg`` become the error code and message.

HTTP, the envelope and error classification are KieClient's own; there is no second HTTP layer.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from kie_extend.provider.client import SUCCESS_STATUS, KieClient, TaskRecord, parse_record, parse_track
from kie_extend.errors import GenerationFailedError, UnavailableError, error_for_code

log = logging.getLogger(__name__)

#: The createTask route's fixed job type (the Suno version goes in ``input.model``).
JOB_MODEL = "ai-music-api/upload-and-extend-audio"
CREATE_TASK_PATH = "/api/v1/jobs/createTask"
JOB_RECORD_PATH = "/api/v1/jobs/recordInfo"

#: Suno versions the createTask route lists as discontinued (sent anyway; the provider decides).
DISCONTINUED_MODELS = frozenset({"V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5"})

#: Legacy field -> ``input`` key. ``prompt`` and ``defaultParamFlag`` are handled apart, and
#: ``callBackUrl`` stays at the top level.
INPUT_KEYS: dict[str, str] = {
    "uploadUrl": "upload_url",
    "instrumental": "instrumental",
    "continueAt": "continue_at",
    "model": "model",
    "title": "title",
    "style": "style",
    "negativeTags": "negative_tags",
    "vocalGender": "vocal_gender",
    "styleWeight": "style_weight",
    "weirdnessConstraint": "weirdness_constraint",
    "audioWeight": "audio_weight",
    "personaId": "persona_id",
    "personaModel": "persona_model",
}
_SPECIAL = frozenset({"prompt", "defaultParamFlag", "callBackUrl"})

#: Still-running createTask states and the legacy status each one is reported as.
RUNNING_STATES: dict[str, str] = {"waiting": "PENDING", "queuing": "PENDING", "generating": "GENERATING"}
#: The legacy status a failed createTask task is reported as.
FAILED_STATUS = "GENERATE_AUDIO_FAILED"
#: Code reported for failCode 400 + "try again later": a refunded upstream failure, not a bad request.
REFUNDED_FAILURE_CODE = 531


def _snake(name: str) -> str:
    """``negativeTags`` -> ``negative_tags``; already snake_case names are unchanged."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def to_create_task(body: dict[str, Any]) -> dict[str, Any]:
    """The createTask body for one of our legacy camelCase extend bodies (pure; nothing is checked).

    - ``defaultParamFlag`` has no counterpart and is dropped. In custom mode with vocals
      (``defaultParamFlag`` true, ``instrumental`` not true) ``prompt`` is sent as ``input.lyrics``;
      otherwise (instrumental, or default mode) as ``input.prompt``.
    - Known fields go to their snake_case ``input`` keys; unknown fields are passed through under
      their snake_case spelling (the provider adds fields over time, e.g. ``variety``).
    - ``callBackUrl`` stays at the top level; ``None`` values are never sent.
    """
    custom = body.get("defaultParamFlag") is True
    vocals = body.get("instrumental") is not True
    inp: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or name in _SPECIAL or name in INPUT_KEYS:
            continue
        inp[_snake(name)] = value
    for name, key in INPUT_KEYS.items():
        if body.get(name) is not None:
            inp[key] = body[name]
    if body.get("prompt") is not None:
        inp["lyrics" if custom and vocals else "prompt"] = body["prompt"]
    out: dict[str, Any] = {"model": JOB_MODEL}
    if body.get("callBackUrl") is not None:
        out["callBackUrl"] = body["callBackUrl"]
    out["input"] = inp
    return out


def _loads(value: Any) -> Any:
    """A JSON string parsed (None when it is empty or not JSON); anything else unchanged."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _result_items(value: Any, depth: int = 0) -> list[Any]:
    """The list of takes inside a (parsed) resultJson, whichever wrapper it came in."""
    value = _loads(value)
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or depth > 3:
        return []
    for key in ("sunoData", "suno_data", "data", "response", "result"):
        if key in value:
            items = _result_items(value[key], depth + 1)
            if items:
                return items
    return []


def result_tracks(result_json: Any) -> list[dict[str, Any]]:
    """Tracks (our shape) from ``resultJson``: ``{"data": [snake takes]}``, ``{"sunoData": [camel takes]}``…"""
    return [parse_track(item) for item in _result_items(result_json) if isinstance(item, dict)]


def _int_or_none(value: Any) -> int | None:
    if value in (None, "") or isinstance(value, bool):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _param(value: Any) -> dict[str, Any] | None:
    """The task's request (``param``, a JSON string) with ``callBackUrl`` at the top level."""
    param = _loads(value)
    if not isinstance(param, dict):
        return None
    param = dict(param)
    if not param.get("callBackUrl"):
        inp = _loads(param.get("input"))
        if isinstance(inp, dict):
            nested = inp.get("callBackUrl") or inp.get("call_back_url") or inp.get("callback_url")
            if nested:
                param["callBackUrl"] = nested
    return param


def parse_job_record(data: dict[str, Any], task_id: str = "") -> TaskRecord:
    """A TaskRecord with legacy statuses from recordInfo's ``data`` object (tolerant of drift).

    ``waiting``/``queuing`` -> PENDING, ``generating`` -> GENERATING (not terminal), ``success`` ->
    SUCCESS, ``fail`` (or any state naming a failure) -> GENERATE_AUDIO_FAILED with ``failCode`` as
    the error code; failCode 400 with "try again later" (a refunded upstream failure) is reported as
    531 so it is classified as generation failed, not as an invalid request. Other states are
    passed on upper-cased (still running, unless they name a failure). ``creditsConsumed`` of a
    finished task becomes ``credits_consumed`` (the charge the ledger settles at).
    """
    if "state" not in data and "status" in data:
        return parse_record(data)  # a legacy-shaped answer: take it as such
    state = str(data.get("state") or "").strip().lower()
    code = _int_or_none(data.get("failCode", data.get("errorCode")))
    message = data.get("failMsg", data.get("errorMessage")) or None
    message = str(message) if message is not None else None
    if state == "success":
        status = SUCCESS_STATUS
    elif state in RUNNING_STATES:
        status = RUNNING_STATES[state]
    elif state == "fail" or "fail" in state or "error" in state:
        status = FAILED_STATUS
        if code == 400 and isinstance(error_for_code(code, message or ""), GenerationFailedError):
            message = f"{message} (failCode 400: upstream failure, credits refunded)"
            code = REFUNDED_FAILURE_CODE
    else:
        status = state.upper() or "PENDING"
    tracks = result_tracks(data.get("resultJson"))
    if status == SUCCESS_STATUS and not tracks:
        log.warning("createTask task %s succeeded but resultJson held no takes", data.get("taskId") or task_id)
    failed = status == FAILED_STATUS
    return TaskRecord(
        task_id=str(data.get("taskId") or task_id),
        status=status,
        tracks=tracks,
        error_code=code if failed else None,
        error_message=message if failed else None,
        param=_param(data.get("param")),
        credits_consumed=_credits(data.get("creditsConsumed")) if failed or status == SUCCESS_STATUS else None,
    )


def _credits(value: Any) -> float | None:
    """``creditsConsumed`` as a number of credits (at least 0), or None when absent or not a number."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        credits = float(value)
    except (TypeError, ValueError):
        return None
    return credits if credits >= 0 and credits == credits and credits != float("inf") else None


class JobsClient(KieClient):
    """KieClient's interface over the createTask route: same constructor, same answers."""

    def __repr__(self) -> str:
        return f"JobsClient({self.base_url!r})"

    def submit_extend(self, body: dict[str, Any]) -> str:
        """POST createTask with our legacy body translated; the provider's ``taskId`` on success."""
        payload = to_create_task(body)
        model = payload["input"].get("model")
        if model in DISCONTINUED_MODELS:
            log.warning("model %s is listed as discontinued on the createTask route; sent anyway", model)
        data = self._call("POST", CREATE_TASK_PATH, data=json.dumps(payload))
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise UnavailableError(500, "success answer without taskId")
        return str(task_id)

    def record_info(self, task_id: str) -> TaskRecord:
        """GET recordInfo for one task, mapped to legacy statuses."""
        data = self._call("GET", JOB_RECORD_PATH, params={"taskId": task_id})
        if not isinstance(data, dict):
            raise error_for_code(422, "recordInfo is null")
        return parse_job_record(data, task_id)


__all__ = ["JOB_MODEL", "JobsClient", "parse_job_record", "result_tracks", "to_create_task"]
