"""Simulator knobs: one dataclass, readable from `KIE_SIM_*` variables, CLI flags and JSON."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "KIE_SIM_"
SECRET_FIELDS = ("api_key", "callback_secret")
MASK = "***"

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SimConfig:
    """Every simulator knob with its default; durations are provider seconds unless noted."""

    time_factor: float = _knob(1.0, "multiplier applied to provider timings (0.05 = 20x faster)")
    seed: int | None = _knob(None, "random seed for task data and fault injection (deterministic)")
    api_key: str | None = _knob(None, "if set, only this Bearer key is accepted (others get 401)")
    public_url: str | None = _knob(None, "base URL put into returned file URLs (default: the request's Host)")
    credits: float = _knob(10000.0, "starting credit balance (402 when exhausted)")
    task_cost: float = _knob(12.0, "credits deducted per accepted submission")
    rate_limit: int = _knob(20, "accepted submissions per key per rolling window (429 beyond)")
    rate_window: float = _knob(10.0, "rolling submission window in wall-clock seconds (not scaled)")
    poll_limit: int = _knob(3, "record-info requests per task per poll window (429 beyond)")
    poll_window: float = _knob(1.0, "per-task poll window in wall-clock seconds (not scaled)")
    require_prompt_in_default_mode: bool = _knob(True, "answer 422 when prompt is missing with defaultParamFlag=false")
    accept_v6: bool = _knob(False, "also accept V6, V6_WILD and V6_MINI on the legacy route")
    jobs_accept_legacy_models: bool = _knob(False, "accept the discontinued V4..V5_5 models on the createTask route "
                                                   "(default: 422)")
    v45all_limit_60s: bool = _knob(True, "reject V4_5ALL source audio longer than 60 s")
    max_audio_seconds: float = _knob(480.0, "longest accepted source audio (8 minutes)")
    text_seconds: float = _knob(10.0, "time of TEXT_SUCCESS (scaled by time factor)")
    first_seconds: float = _knob(25.0, "time of FIRST_SUCCESS (scaled by time factor)")
    complete_seconds: float = _knob(65.0, "time of SUCCESS (scaled by time factor)")
    duration_min: float | None = _knob(None, "if set, lower bound of a task's random total time (stages proportional)")
    duration_max: float | None = _knob(None, "if set, upper bound of a task's random total time (stages proportional)")
    track_min_seconds: float = _knob(120.0, "shortest nominal duration of a generated take")
    track_max_seconds: float = _knob(240.0, "longest nominal duration of a generated take")
    served_seconds: float = _knob(3.0, "real length of the MP3 files served (nominal duration is reported in JSON)")
    callbacks: bool = _knob(True, "send callbacks to callBackUrl")
    callback_secret: str | None = _knob(None, "if set, sign callbacks with X-Webhook-Timestamp/X-Webhook-Signature")
    callback_timeout: float = _knob(15.0, "seconds to wait for the callback receiver (not scaled)")
    callback_retry_delays: tuple[float, ...] = _knob((60.0, 300.0, 900.0),
                                                     "retry delays after failed callbacks (scaled)")
    callback_max_failures: int = _knob(3, "stop a task's callbacks after this many consecutive failures")
    callback_workers: int = _knob(4, "threads sending callbacks (fixed at start)")
    upload_ttl_seconds: float = _knob(86400.0, "lifetime of uploaded files (scaled by time factor)")
    fault_429: float = _knob(0.0, "fraction of submissions answered 429 (not queued)")
    fault_500: float = _knob(0.0, "fraction of submissions answered 500 (not queued)")
    fault_455: float = _knob(0.0, "fraction of submissions answered 455 (not queued)")
    fault_slow: float = _knob(0.0, "fraction of API requests delayed by slow_seconds before answering")
    slow_seconds: float = _knob(5.0, "delay of a slow answer in wall-clock seconds")
    fault_drop_after_accept: float = _knob(0.0, "fraction of submissions accepted then dropped without an answer")
    fault_generation_fail: float = _knob(0.0, "fraction of tasks ending GENERATE_AUDIO_FAILED")
    fail_codes: str = _knob("", "errorCodes a failed generation picks from, comma-separated (empty: the route's "
                                "own, legacy 500,501 and createTask 400,500,501); 531 and createTask 400 are "
                                "refunded: the task's cost goes back to the balance when the failure shows")
    fault_duplicate_callback: float = _knob(0.0, "fraction of callbacks sent twice")
    fault_missing_callback: float = _knob(0.0, "fraction of callbacks never sent")
    fault_empty_stream: float = _knob(0.0, "fraction of tasks whose stream URLs answer 200 with an empty body")
    fault_callback_exception: float = _knob(0.0, "fraction of tasks ending CALLBACK_EXCEPTION with tracks present")
    fault_poll_500: float = _knob(0.0, "fraction of record-info requests answered 500")
    fault_edge: float = _knob(0.0, "fraction of API requests answered by an edge in front of KIE: HTTP "
                                   "edge_status with an HTML body, no envelope (the request goes no further)")
    edge_status: int = _knob(503, "HTTP status of an edge answer (fault_edge): 502, 503, 504, 52x")
    fault_empty_success: float = _knob(0.0, "fraction of tasks ending SUCCESS without any audio (sunoData [] or "
                                            "response null, alternately)")
    callback_task_id_key: str = _knob("task_id", "how callbacks name the task: task_id or taskId inside data, "
                                                 "top (taskId at the top level), or mixed (each task picks one)")

    wav_seconds: float = _knob(20.0, "time a WAV conversion takes (scaled by time factor)")
    stems_seconds: float = _knob(60.0, "time a vocal/stem separation takes (scaled by time factor)")
    midi_seconds: float = _knob(30.0, "time a MIDI generation takes (scaled by time factor)")
    video_seconds: float = _knob(60.0, "time a music video (MP4) takes (scaled by time factor)")
    wav_cost: float = _knob(0.4, "credits per accepted WAV conversion (a 409 duplicate is free)")
    stems_cost: float = _knob(10.0, "credits per separate_vocal separation (charged on every call)")
    split_stem_cost: float = _knob(50.0, "credits per split_stem separation (charged on every call)")
    midi_cost: float = _knob(0.0, "credits per MIDI generation")
    video_cost: float = _knob(2.0, "credits per accepted music video (a 409 duplicate is free)")
    lyrics_cost: float = _knob(0.0, "credits per timestamped-lyrics call")
    fault_wav_fail: float = _knob(0.0, "fraction of WAV conversions ending GENERATE_WAV_FAILED")
    fault_stems_fail: float = _knob(0.0, "fraction of separations ending GENERATE_AUDIO_FAILED")
    fault_midi_fail: float = _knob(0.0, "fraction of MIDI generations ending failed (flag 3)")
    fault_video_fail: float = _knob(0.0, "fraction of music videos ending GENERATE_MP4_FAILED")
    fault_followup_429: float = _knob(0.0, "fraction of follow-up submits answered 429 (not queued)")
    fault_followup_callback_exception: float = _knob(0.0, "fraction of follow-ups ending CALLBACK_EXCEPTION with "
                                                          "the result present")
    followup_flag_style: str = _knob("documented", "follow-up successFlag type: documented (strings, MIDI "
                                                   "integers), string, int, or mixed (task by task)")
    followup_field_style: str = _knob("documented", "follow-up record field names: documented (camelCase; "
                                                    "callbacks snake_case), camel, snake, or mixed")
    followup_poll_limit: int = _knob(0, "record-info requests per follow-up task per poll window (0: no limit)")

    @classmethod
    def knob_types(cls) -> dict[str, Any]:
        """Resolved type hints of every knob."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: SimConfig | None = None) -> SimConfig:
        """Build a config from `KIE_SIM_<KNOB>` variables on top of `base` (or the defaults)."""
        import os

        env = os.environ if environ is None else environ
        values = {}
        for name in cls.knob_types():
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        return (base or cls()).updated(values)

    def updated(self, values: Mapping[str, Any]) -> SimConfig:
        """Return a copy with `values` (strings or JSON values) coerced and applied; unknown names raise."""
        types = self.knob_types()
        changes = {}
        for name, raw in values.items():
            if name not in types:
                raise ValueError(f"unknown simulator knob: {name}")
            changes[name] = coerce(types[name], raw, name)
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        """Raise ValueError on out-of-range knobs."""
        for f in dataclasses.fields(self):
            if f.name.startswith("fault_"):
                value = getattr(self, f.name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must be between 0 and 1")
        if self.time_factor <= 0:
            raise ValueError("time_factor must be positive")
        if not 0 < self.text_seconds <= self.first_seconds <= self.complete_seconds:
            raise ValueError("stage times must satisfy 0 < text_seconds <= first_seconds <= complete_seconds")
        if self.rate_limit < 0 or self.poll_limit < 0:
            raise ValueError("limits must not be negative")
        for code in filter(None, (c.strip() for c in str(self.fail_codes or "").split(","))):
            if not code.isdigit():
                raise ValueError("fail_codes must be comma-separated error codes such as 501,531")
        if self.followup_flag_style not in ("documented", "string", "int", "mixed"):
            raise ValueError("followup_flag_style must be documented, string, int or mixed")
        if self.followup_field_style not in ("documented", "camel", "snake", "mixed"):
            raise ValueError("followup_field_style must be documented, camel, snake or mixed")
        if not 500 <= self.edge_status <= 599:
            raise ValueError("edge_status must be a 5xx status")

    def public_dict(self) -> dict[str, Any]:
        """All knobs as JSON-ready values, secret fields masked."""
        out = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            out[name] = MASK if out[name] else None
        out["callback_retry_delays"] = list(self.callback_retry_delays)
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--knob-name` flag per knob (default None = keep the environment's value)."""
        group = parser.add_argument_group("simulator knobs (env KIE_SIM_<NAME>)")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            hint = cls.knob_types()[f.name]
            help_text = f"{f.metadata.get('help', '')} [default: {_show(f.default)}]"
            if hint is bool:
                group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                   help=help_text)
            else:
                group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SimConfig:
        """Defaults, then `KIE_SIM_*` variables, then the flags given on the command line."""
        base = cls.from_env(environ)
        given = {name: getattr(args, name) for name in cls.knob_types() if getattr(args, name, None) is not None}
        return base.updated(given)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def _parse_bool(raw: Any, name: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: not a boolean: {raw!r}")


def coerce(hint: Any, raw: Any, name: str = "value") -> Any:
    """Convert `raw` (a string from env/CLI or a JSON value) to the knob type `hint`."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[...]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return coerce(inner, raw, name)
    if hint is bool:
        return _parse_bool(raw, name)
    if typing.get_origin(hint) is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(float(x) for x in items if str(x).strip() != "")
    if raw is None or isinstance(raw, bool):
        raise ValueError(f"{name}: invalid value {raw!r}")
    try:
        if hint is int:
            as_float = float(raw)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if hint is float:
            return float(raw)
        if hint is str:
            return str(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: invalid value {raw!r}") from None
    raise ValueError(f"{name}: unsupported knob type {hint!r}")
