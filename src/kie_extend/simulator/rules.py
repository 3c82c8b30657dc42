"""The provider's submit validation for the legacy upload-extend route, as the simulator applies it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kie_extend.simulator.config import SimConfig

LEGACY_MODELS = ("V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5")
V6_MODELS = ("V6", "V6_WILD", "V6_MINI")

# model -> (prompt, style, title) maximum lengths in custom mode
LENGTH_LIMITS: dict[str, tuple[int, int, int]] = {
    "V4": (3000, 200, 80),
    "V4_5": (5000, 1000, 100),
    "V4_5PLUS": (5000, 1000, 100),
    "V4_5ALL": (5000, 1000, 80),
    "V5": (5000, 1000, 100),
    "V5_5": (5000, 1000, 100),
    "V6": (5000, 1000, 100),
    "V6_WILD": (5000, 1000, 100),
    "V6_MINI": (5000, 1000, 100),
}

MODEL_NAMES = {
    "V4": "chirp-v4",
    "V4_5": "chirp-auk",
    "V4_5ALL": "chirp-auk-turbo",
    "V4_5PLUS": "chirp-bluejay",
    "V5": "chirp-crow",
    "V5_5": "chirp-fenix",
    "V6": "chirp-v6",
    "V6_WILD": "chirp-v6-wild",
    "V6_MINI": "chirp-v6-mini",
}

WEIGHT_FIELDS = ("styleWeight", "weirdnessConstraint", "audioWeight")
PERSONA_MODELS = ("style_persona", "voice_persona")


class SourceFetchError(Exception):
    """The uploadUrl points at a simulator file that does not exist (any more)."""


@dataclass(frozen=True)
class Rejection:
    """A refused submission: provider code and message."""

    code: int
    msg: str


DurationLookup = Callable[[str], "float | None"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _missing(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    return value is None or (isinstance(value, str) and value.strip() == "")


def _check_types(body: dict[str, Any], config: SimConfig) -> str | None:
    for name in ("defaultParamFlag", "instrumental"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            return f"{name} must be a boolean"
    for name in ("uploadUrl", "callBackUrl", "model", "prompt", "style", "title", "negativeTags",
                 "vocalGender", "personaId", "personaModel"):
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"{name} must be a string"
    if body.get("continueAt") is not None and not _is_number(body["continueAt"]):
        return "continueAt must be a number"
    for name in WEIGHT_FIELDS:
        if body.get(name) is not None and not _is_number(body[name]):
            return f"{name} must be a number"
    return None


def _required(body: dict[str, Any], config: SimConfig) -> str | None:
    for name in ("uploadUrl", "defaultParamFlag", "model", "callBackUrl"):
        if _missing(body, name):
            return f"{name} is required"
    custom = body["defaultParamFlag"]
    instrumental = bool(body.get("instrumental") or False)
    if custom:
        needed = ["style", "title"] + ([] if instrumental else ["prompt"]) + ["continueAt"]
    else:
        needed = ["prompt"] if config.require_prompt_in_default_mode else []
    for name in needed:
        if _missing(body, name):
            mode = "custom mode" if custom else "default mode"
            return f"{name} is required in {mode} (defaultParamFlag={str(custom).lower()})"
    return None


def _values(body: dict[str, Any], config: SimConfig) -> str | None:
    parts = urlsplit(body["uploadUrl"].strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "uploadUrl must be an http(s) URL with a host"
    model = body["model"]
    allowed = LEGACY_MODELS + (V6_MODELS if config.accept_v6 else ())
    if model not in allowed:
        return f"model must be one of {', '.join(allowed)}"
    if body["defaultParamFlag"]:
        limits = dict(zip(("prompt", "style", "title"), LENGTH_LIMITS[model], strict=True))
        for name, limit in limits.items():
            value = body.get(name)
            if isinstance(value, str) and len(value) > limit:
                return f"{name} is too long for model {model}: {len(value)} characters (max {limit})"
    elif not _missing(body, "personaId"):
        return "personaId is only allowed in custom mode (defaultParamFlag=true)"
    for name in WEIGHT_FIELDS:
        problem = weight_problem(name, body.get(name))
        if problem:
            return problem
    if body.get("continueAt") is not None and not body["continueAt"] > 0:
        return "continueAt must be greater than 0"
    if body.get("vocalGender") not in (None, "", "m", "f"):
        return "vocalGender must be 'm' or 'f'"
    if body.get("personaModel") not in (None, "", *PERSONA_MODELS):
        return f"personaModel must be one of {', '.join(PERSONA_MODELS)}"
    return None


def weight_problem(name: str, value: Any) -> str | None:
    """The rule every weight follows on both routes: 0 to 1, at most two decimals (None: absent)."""
    if value is None:
        return None
    if not 0 <= value <= 1:
        return f"{name} must be between 0 and 1"
    if abs(value * 100 - round(value * 100)) >= 1e-9:
        return f"{name} must have at most two decimal places"
    return None


def check_source(url: str, model: Any, continue_at: Any, config: SimConfig, lookup: DurationLookup,
                 continue_field: str = "continueAt") -> Rejection | None:
    """The source-audio rules both routes share: fetchable, at most 8 minutes (1 for V4_5ALL),
    and the continuation point inside it."""
    try:
        duration = lookup(url.strip())
    except SourceFetchError as exc:
        return Rejection(451, f"File fetch failed: {exc}")
    if duration is None:
        return None
    if duration > config.max_audio_seconds:
        return Rejection(422, f"uploaded audio is {duration:g} s long; the limit is "
                              f"{config.max_audio_seconds:g} s (8 minutes)")
    if model == "V4_5ALL" and config.v45all_limit_60s and duration > 60:
        return Rejection(422, f"uploaded audio is {duration:g} s long; V4_5ALL accepts at most 60 s")
    if continue_at is not None and continue_at >= duration:
        return Rejection(422, f"{continue_field} ({continue_at:g}) must be less than the audio duration "
                              f"({duration:g} s)")
    return None


def validate_submit(body: Any, config: SimConfig, lookup: DurationLookup) -> Rejection | None:
    """Check a legacy submit body; return the rejection (422, or 451 for a missing own file) or None."""
    if not isinstance(body, dict):
        return Rejection(422, "request body must be a JSON object")
    for step in (_check_types, _required, _values):
        msg = step(body, config)
        if msg:
            return Rejection(422, msg)
    return check_source(body["uploadUrl"], body["model"], body.get("continueAt"), config, lookup)
