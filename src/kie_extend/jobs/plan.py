"""Follow-up step plans: the ``steps`` and ``takes`` kwargs checked, and expanded into one entry per step and take.

A plan is what a producer asks for after the extension (README "Follow-up steps")::

    steps=[{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}, {"op": "midi"},
           {"op": "video", "author": "Ann", "domainName": "example.com"}, {"op": "lyrics"}]
    takes="all"            # or "first"

Rules, checked at enqueue with the request (a broken plan is ``invalid_request``, nothing enqueued):
``op`` is one of wav, stems, midi, video, lyrics; stems needs ``type`` (``separate_vocal`` or
``split_stem``); midi needs a stems step before it (it runs on that separation); video's ``author``
and ``domainName`` are strings of at most 50 characters; no other field (a field given as null is
absent); each op at most once; at most ``MAX_STEPS`` steps. ``takes`` without steps asks for nothing.
"""

from __future__ import annotations

from typing import Any

from kie_extend.provider.operations import OPERATIONS

#: Most steps one job may ask for (one of each operation).
MAX_STEPS = len(OPERATIONS)
TAKES = ("all", "first")
STEM_TYPES = ("separate_vocal", "split_stem")
#: The fields each op allows besides ``op``.
FIELDS: dict[str, tuple[str, ...]] = {"wav": (), "stems": ("type",), "midi": (), "video": ("author", "domainName"),
                                      "lyrics": ()}
MAX_VIDEO_TEXT = 50


def check_plan(steps: Any, takes: Any) -> tuple[list[dict[str, Any]] | None, str, list[dict[str, str]]]:
    """Check ``steps`` and ``takes``; returns ``(steps normalised or None, takes, problems)``.

    Problems name the field as ``steps[i].name`` (or ``steps``, ``takes``) with a message."""
    problems: list[dict[str, str]] = []
    take_mode = "all"
    if takes is not None:
        if takes in TAKES:
            take_mode = str(takes)
        else:
            problems.append({"field": "takes", "message": f"must be 'all' or 'first', got {takes!r}"[:200]})
    if steps is None:
        return None, take_mode, problems  # takes alone asks for nothing
    if not isinstance(steps, list) or not steps:
        problems.append({"field": "steps", "message": "must be a non-empty array of steps such as "
                         '[{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}]'})
        return None, take_mode, problems
    if len(steps) > MAX_STEPS:
        problems.append({"field": "steps", "message": f"at most {MAX_STEPS} steps (one of each op)"})
        return None, take_mode, problems
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            problems.append({"field": where, "message": 'must be an object such as {"op": "wav"}'})
            continue
        step = {k: v for k, v in step.items() if v is not None}  # a null field is an absent one
        op = step.get("op")
        if not isinstance(op, str) or op not in FIELDS:
            problems.append({"field": f"{where}.op", "message": f"must be one of {', '.join(FIELDS)}, "
                             f"got {op!r}"[:200]})
            continue
        if op in seen:
            problems.append({"field": f"{where}.op", "message": f"{op} is asked for twice; each op runs once per take"})
            continue
        for name in step:
            if name != "op" and name not in FIELDS[op]:
                allowed = ", ".join(FIELDS[op]) or "none"
                shown = str(name) if len(str(name)) <= 40 else f"{str(name)[:40]}…"
                problems.append({"field": f"{where}.{shown}", "message": f"is not a field of the {op} step "
                                 f"(its fields: {allowed})"[:200]})
        clean: dict[str, Any] = {"op": op}
        if op == "stems":
            kind = step.get("type")
            if kind is None:
                problems.append({"field": f"{where}.type", "message": f"is required: one of {', '.join(STEM_TYPES)}"})
            elif kind not in STEM_TYPES:
                problems.append({"field": f"{where}.type", "message": f"must be one of {', '.join(STEM_TYPES)}, "
                                 f"got {kind!r}"[:200]})
            clean["type"] = kind
        if op == "midi" and "stems" not in seen:
            problems.append({"field": f"{where}.op", "message": "midi runs on a vocal separation: put a stems "
                             "step before it"})
        if op == "video":
            for name in ("author", "domainName"):
                value = step.get(name)
                if value is None:
                    continue
                if not isinstance(value, str) or len(value) > MAX_VIDEO_TEXT:
                    problems.append({"field": f"{where}.{name}", "message": f"must be a string of at most "
                                     f"{MAX_VIDEO_TEXT} characters"})
                else:
                    clean[name] = value
        seen.add(op)
        out.append(clean)
    return (out if not problems else None), take_mode, problems


def parse_steps_text(text: str) -> Any:
    """Steps as a command line or a CSV cell gives them: a JSON array, or the short form
    ``wav,stems=separate_vocal,midi,video,lyrics`` (``op`` or ``op=type``; video's author and
    domainName need the JSON form). Returns the list to check with :func:`check_plan`; ValueError
    for JSON that does not parse."""
    import json

    text = text.strip()
    if text.startswith(("[", "{", '"')):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"is not a JSON array of steps ({exc})") from None
    out: list[dict[str, Any]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, kind = part.partition("=")
        out.append({"op": op.strip(), **({"type": kind.strip()} if kind else {})})
    return out


def expand(steps: list[dict[str, Any]], takes: str, audio_ids: list[str]) -> list[dict[str, Any]]:
    """One entry per (step, take), in order: ``{"op", "take", "audio_id", "spec", "after"}``.

    ``take`` is the take's index; ``after`` is the index of the entry it waits for (midi: the stems
    entry of the same take) or None."""
    chosen = audio_ids[:1] if takes == "first" else list(audio_ids)
    entries: list[dict[str, Any]] = []
    for take, audio_id in enumerate(chosen):
        stems_at: int | None = None
        for step in steps:
            entry = {"op": step["op"], "take": take, "audio_id": audio_id, "spec": step, "after": None}
            if step["op"] == "stems":
                stems_at = len(entries)
            if step["op"] == "midi":
                entry["after"] = stems_at
            entries.append(entry)
    return entries


__all__ = ["MAX_STEPS", "TAKES", "check_plan", "expand", "parse_steps_text"]
