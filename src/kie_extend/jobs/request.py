"""Client-side validation of "Upload And Extend Audio" requests (legacy route, camelCase body).

The rules follow KIE's API documentation: strict where the
provider's rule is clear, never stricter than the provider, and a warning (not an error) where the
rule is unsettled. Pydantic checks the field types; plain functions then check the rules that span
fields and tolerate wrongly typed values, so one pass reports every problem at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeGuard
from urllib.parse import urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from kie_extend.errors import ValidationError
from kie_extend.provider.urlguard import ip_literal, is_public_address

#: Suno models documented on the legacy route.
LEGACY_MODELS: frozenset[str] = frozenset({"V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5"})
#: Suno models documented only on the createTask route; accepted on the legacy route with a warning.
V6_MODELS: frozenset[str] = frozenset({"V6", "V6_WILD", "V6_MINI"})
#: Model -> (prompt, style, title) maximum length in code points, enforced in custom mode only.
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
#: Longest source audio the provider accepts (8 minutes).
MAX_AUDIO_SECONDS = 480.0
#: Source length above which V4_5ALL may be refused (unsettled: warning only).
V4_5ALL_SOFT_MAX_SECONDS = 60.0

_MODEL_ORDER = ("V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5", "V6", "V6_WILD", "V6_MINI")
_WEIGHTS = ("styleWeight", "weirdnessConstraint", "audioWeight")
_TEXT_FIELDS = ("prompt", "style", "title")
_CUSTOM = "in custom mode (defaultParamFlag=true)"
_MIXUPS = {
    "customMode": "customMode belongs to the Generate Music endpoint; this endpoint's switch is "
    "defaultParamFlag (customMode is passed through unchanged)",
    "callbackUrl": "callbackUrl is not a field of this endpoint; the provider spells it callBackUrl",
}

ModelName = Literal["V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5", "V6", "V6_WILD", "V6_MINI"]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ExtendRequest(BaseModel):
    """Field types of an extend request; unknown fields pass through, cross-field rules live in parse_request."""

    model_config = ConfigDict(extra="allow", strict=True)

    uploadUrl: str
    defaultParamFlag: bool
    model: ModelName
    instrumental: bool | None = None
    continueAt: Number | None = None
    callBackUrl: str | None = None
    prompt: str | None = None
    style: str | None = None
    title: str | None = None
    negativeTags: str | None = None
    vocalGender: Literal["m", "f", ""] | None = None
    styleWeight: Number | None = None
    weirdnessConstraint: Number | None = None
    audioWeight: Number | None = None
    personaId: str | None = None
    personaModel: str | None = None


_REQUIRED = tuple(n for n, f in ExtendRequest.model_fields.items() if f.is_required())
_OPTIONAL = frozenset(ExtendRequest.model_fields) - frozenset(_REQUIRED)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: the JSON body to send to KIE and the warnings about unsettled rules."""

    body: dict[str, Any]
    warnings: list[str]


class _Report:
    """Collects errors and warnings during one validation pass."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.warnings: list[str] = []

    def error(self, field: str, message: str) -> None:
        entry = {"field": field, "message": message}
        if entry not in self.errors:
            self.errors.append(entry)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _json_kind(value: Any) -> str:
    """Name a Python value by its JSON type, for messages."""
    if value is None:
        return "null"
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (Mapping, "object"),
             ((list, tuple), "array"))
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _is_number(value: Any) -> TypeGuard[float]:
    """True for a finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_message(err: Any, field: str) -> str:
    """Turn one pydantic error into a readable message."""
    kind, got = err["type"], err.get("input")
    if kind == "missing" or (got is None and field in _REQUIRED):
        return "is required"
    if kind == "bool_type":
        return f"must be a JSON boolean (true or false), got {_json_kind(got)} {got!r}"
    if kind == "string_type":
        return f"must be a string, got {_json_kind(got)}"
    if kind in ("float_type", "int_type"):
        return f"must be a number, got {_json_kind(got)} {got!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    if kind == "literal_error" and field == "model":
        return f"must be one of {', '.join(_MODEL_ORDER)}, got {got!r}"
    if kind == "literal_error" and field == "vocalGender":
        return f"must be 'm' or 'f', got {got!r}"
    return str(err.get("msg", "is invalid"))


def _check_types(data: dict[str, Any], report: _Report) -> set[str]:
    """Run the pydantic model for field types; return the names of wrongly typed fields."""
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        report.error("request", f"field names must be strings, got {odd[0]!r}")
    try:
        ExtendRequest.model_validate({k: v for k, v in data.items() if isinstance(k, str)})
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            loc = err.get("loc") or ()
            field = str(loc[0]) if loc else "request"
            report.error(field, _type_message(err, field))
    return {e["field"] for e in report.errors}


def _is_private_host(host: str) -> bool:
    """True for localhost names and non-public IP literals (any IPv4 spelling, IPv4 inside IPv6),
    judged as the download guard judges them (provider/urlguard.py); no DNS lookup."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    addr = ip_literal(host)
    return addr is not None and not is_public_address(addr)


def _url_problem(url: str, *, allow_private: bool) -> str | None:
    """Describe what is wrong with an http(s) URL, or return None when it is acceptable."""
    if not url.strip():
        return "must not be empty"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"must be an http or https URL, got scheme {parts.scheme or '(none)'!r}"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "must include a host name"
    if any(c.isspace() or not c.isprintable() for c in host):
        return f"has an invalid host name {host!r}"
    if not allow_private and _is_private_host(host):
        return f"points to a local or private address ({host}); KIE must be able to fetch it"
    return None


def _check_urls(data: dict[str, Any], bad: set[str], report: _Report, allow_private: bool) -> None:
    """Check uploadUrl (public unless allowed) and callBackUrl (any http(s) host)."""
    for field, private_ok in (("uploadUrl", allow_private), ("callBackUrl", True)):
        value = data.get(field)
        if field not in bad and isinstance(value, str):
            problem = _url_problem(value, allow_private=private_ok)
            if problem:
                report.error(field, problem)


def _check_text(data: dict[str, Any], field: str, required: bool, report: _Report) -> None:
    """Report a missing required text field; warn when it is present but empty."""
    value = data.get(field)
    if value is None and required:
        report.error(field, f"is required {_CUSTOM}")
    elif isinstance(value, str) and not value.strip():
        report.warn(f"{field} is empty; it is required {_CUSTOM} and KIE may treat it as missing")


def _check_mode(data: dict[str, Any], bad: set[str], report: _Report) -> None:
    """Apply the required-field matrix, the custom-mode length limits and the personaId rule."""
    mode, instrumental = data.get("defaultParamFlag"), data.get("instrumental")
    if data.get("vocalGender") == "":
        report.warn("vocalGender is empty; it is sent as is and KIE may treat it as absent")
    if not isinstance(mode, bool) or "defaultParamFlag" in bad:
        return
    if not mode:
        persona = data.get("personaId")
        if persona is not None and not (isinstance(persona, str) and not persona.strip()):
            report.error("personaId", "is only allowed in custom mode (defaultParamFlag=true)")
        prompt = data.get("prompt")
        if prompt is None:
            report.warn("prompt is absent in default mode; some KIE documentation lists it as required")
        elif isinstance(prompt, str) and not prompt.strip():
            report.warn("prompt is empty in default mode; some KIE documentation lists it as required")
        return
    for field in ("style", "title"):
        _check_text(data, field, True, report)
    if data.get("continueAt") is None:
        report.error("continueAt", f"is required {_CUSTOM}")
    if instrumental is False:
        _check_text(data, "prompt", True, report)
    elif instrumental is None:
        _check_text(data, "prompt", False, report)
        if data.get("prompt") is None:
            report.warn("instrumental is absent and will be sent as false, so KIE will likely "
                        "require prompt (the lyrics); prompt was not checked")
    model = data.get("model")
    if not isinstance(model, str) or model not in LENGTH_LIMITS:
        return
    for field, limit in zip(_TEXT_FIELDS, LENGTH_LIMITS[model]):
        value = data.get(field)
        if field in bad or not isinstance(value, str) or len(value) <= limit:
            continue
        message = f"is {len(value)} characters long; model {model} allows at most {limit} {_CUSTOM}"
        if field == "prompt" and instrumental is True:
            report.warn(f"prompt {message}; it is unused when instrumental=true, so it is sent anyway")
        else:
            report.error(field, message)


def _check_numbers(data: dict[str, Any], bad: set[str], report: _Report, duration: float | None) -> None:
    """Check continueAt against 0 and the audio duration, and the three weights."""
    at = data.get("continueAt")
    if "continueAt" not in bad and _is_number(at):
        if at <= 0:
            report.error("continueAt", f"must be greater than 0 seconds, got {at!r}")
        elif at < 1:
            report.warn(f"continueAt is {at!r} s; the provider is reported to refuse values below 1 s")
        elif duration is not None and at >= duration:
            report.error("continueAt", f"must be less than the source audio's duration ({duration:g} s), got {at!r}")
    for field in _WEIGHTS:
        value = data.get(field)
        if field in bad or not _is_number(value):
            continue
        if not 0 <= value <= 1:
            report.error(field, f"must be between 0 and 1 inclusive, got {value!r}")
        elif abs(value * 100 - round(value * 100)) >= 1e-9:
            report.error(field, f"must have at most two decimal places (a multiple of 0.01), got {value!r}")


def _check_context(data: dict[str, Any], report: _Report, duration: float | None) -> None:
    """Check the source audio length and warn about V6 models and field-name mix-ups."""
    model = data.get("model")
    if isinstance(model, str) and model in V6_MODELS:
        report.warn(f"model {model} is documented only on KIE's createTask route; the legacy "
                    "route may refuse it (checked against the V6 length limits)")
    if duration is not None:
        if duration > MAX_AUDIO_SECONDS:
            report.error("uploadUrl", f"source audio is {duration:g} s long; KIE accepts at most "
                         f"{MAX_AUDIO_SECONDS:g} s (8 minutes)")
        elif model == "V4_5ALL" and duration > V4_5ALL_SOFT_MAX_SECONDS:
            report.warn(f"source audio is {duration:g} s long; V4_5ALL may be limited to "
                        f"{V4_5ALL_SOFT_MAX_SECONDS:g} s (sent anyway)")
    for name, hint in _MIXUPS.items():
        if name in data:
            report.warn(hint)
    for name in ExtendRequest.model_fields:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        if snake != name and snake in data and name not in data:
            report.warn(f"{snake} is not a field of this endpoint; did you mean {name}? (passed through unchanged)")


def _body(data: dict[str, Any]) -> dict[str, Any]:
    """Build the JSON body: unknown fields kept, null optional fields dropped, instrumental filled."""
    body = {k: v for k, v in data.items() if not (k in _OPTIONAL and v is None)}
    body.setdefault("instrumental", False)
    return body


def parse_request(data: Any, *, allow_private_urls: bool = False, audio_duration: float | None = None) -> ParsedRequest:
    """Validate an extend request in KIE's camelCase; raise ValidationError listing every problem."""
    if audio_duration is not None and not (_is_number(audio_duration) and audio_duration > 0):
        raise ValueError(f"audio_duration must be a positive finite number of seconds, got {audio_duration!r}")
    if not isinstance(data, Mapping):
        raise ValidationError([{"field": "request", "message": f"must be a JSON object, got {_json_kind(data)}"}])
    data = dict(data)
    report = _Report()
    bad = _check_types(data, report)
    _check_urls(data, bad, report, allow_private_urls)
    _check_mode(data, bad, report)
    _check_numbers(data, bad, report, audio_duration)
    _check_context(data, report, audio_duration)
    if report.errors:
        raise ValidationError(report.errors)
    return ParsedRequest(body=_body(data), warnings=report.warnings)
