"""The client's request validation and the simulator's agree (reference §2, §1.1, §2.5).

The property: for any request,

(a) whenever the client (``parse_request``) accepts it, the simulator accepts it too, except for the
    rules the reference marks *unsettled* where the client is deliberately permissive (listed, with
    their sections, in :func:`disagreement_reasons`); for those the simulator must refuse it with 422;
(b) whenever the simulator accepts it, the client accepts it: the client is never stricter than the
    provider (reference, "Conventions": "never rejects a request the provider might accept").

The simulator runs in-thread with ``accept_v6`` on, a rate limit nobody reaches, and no callbacks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kie_extend.errors import ValidationError
from kie_extend.jobs.request import parse_request
from kie_extend.simulator import SimConfig, SimServer, serve

SUBMIT = "/api/v1/generate/upload-extend"
CALLBACK = "http://127.0.0.1:9/kie/callback/agreement"
SIM = "@SIM@"  # replaced with the running simulator's base URL inside the tests
SOURCE = re.compile(r"^/files/source/(\d+(?:\.\d+)?)s\.mp3$")

LEGACY = ("V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5")
V6 = ("V6", "V6_WILD", "V6_MINI")
LIMITS = {  # reference §2.3: model -> (prompt, style, title)
    "V4": (3000, 200, 80), "V4_5": (5000, 1000, 100), "V4_5PLUS": (5000, 1000, 100),
    "V4_5ALL": (5000, 1000, 80), "V5": (5000, 1000, 100), "V5_5": (5000, 1000, 100),
    "V6": (5000, 1000, 100), "V6_WILD": (5000, 1000, 100), "V6_MINI": (5000, 1000, 100),
}
TEXT = ("prompt", "style", "title")
PERSONA_MODELS = ("style_persona", "voice_persona")

# The simulator configuration the property runs against (the switches the exceptions depend on).
SIM_KNOBS: dict[str, Any] = {
    "rate_limit": 10**9, "credits": 1e15, "callbacks": False, "seed": 7, "accept_v6": True,
    "require_prompt_in_default_mode": True, "v45all_limit_60s": True,
}


# ----- the documented relationship ---------------------------------------------------------------

def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def source_duration(req: dict[str, Any]) -> float | None:
    """Nominal duration of the source file when ``uploadUrl`` is the simulator's /files/source/<N>s.mp3."""
    url = req.get("uploadUrl")
    if not isinstance(url, str):
        return None
    match = SOURCE.match(urlsplit(url.strip()).path)
    return float(match.group(1)) if match else None


def disagreement_reasons(req: dict[str, Any]) -> list[str]:
    """Why a request the client accepts is refused by the simulator, by design (empty: no reason).

    Only meaningful for requests the client accepts. Each entry is an *unsettled* rule of the
    reference where the client reads it permissively (warns, sends anyway) and the simulator takes
    the strict reading (answers 422):
    """
    reasons: list[str] = []
    custom = req.get("defaultParamFlag") is True
    instrumental = req.get("instrumental")
    prompt = req.get("prompt")
    if custom:
        # §2.2 "Unsettled: are empty strings 'missing'?": client warns on an empty required text
        # field and sends it; the simulator treats it as missing (422).
        for name in ("style", "title"):
            if _blank(req.get(name)):
                reasons.append(f"§2.2 empty {name} in custom mode")
        if instrumental is not True and _blank(prompt):
            reasons.append("§2.2 empty prompt in custom mode with vocals")
        # §2.2 point 3: instrumental absent in custom mode -> the client checks only style, title and
        # continueAt and leaves prompt to the provider; the simulator treats a missing instrumental
        # as false and so requires prompt.
        if instrumental is None and prompt is None:
            reasons.append("§2.2(3) prompt missing with instrumental absent in custom mode")
        # §2.3 (limits enforced where the fields are used; permissive reading): with
        # instrumental=true the prompt is unused, so the client only warns about its length; the
        # simulator applies the custom-mode limit to every text field.
        model = req.get("model")
        if instrumental is True and isinstance(prompt, str) and model in LIMITS and len(prompt) > LIMITS[model][0]:
            reasons.append("§2.3 over-long prompt with instrumental=true")
    elif req.get("defaultParamFlag") is False:
        # §2.2 point 1 (+ the empty-string rule): prompt in default mode is not required by the
        # client (warning); the simulator follows the original page and answers 422.
        if prompt is None:
            reasons.append("§2.2(1) prompt missing in default mode")
        elif _blank(prompt):
            reasons.append("§2.2(1) empty prompt in default mode")
    # §2.5 "Unsettled: V4_5ALL at most 1 minute": client warns above 60 s, simulator refuses.
    duration = source_duration(req)
    if req.get("model") == "V4_5ALL" and duration is not None and duration > 60:
        reasons.append("§2.5 V4_5ALL source longer than 60 s")
    # §2.1 personaModel: client accepts any string and passes it through; the simulator accepts
    # only the two documented values (and an empty string as 'absent').
    persona_model = req.get("personaModel")
    if isinstance(persona_model, str) and persona_model not in ("", *PERSONA_MODELS):
        reasons.append("§2.1 personaModel outside style_persona/voice_persona")
    return reasons


#: Exceptions the client lets through without a warning: personaModel is passed through by design (§2.1).
SILENT = frozenset({"§2.1 personaModel outside style_persona/voice_persona"})


def expected_disagreement(req: dict[str, Any]) -> bool:
    """True when the client accepting and the simulator refusing ``req`` is the documented outcome.

    Assumes the simulator runs with the switches in ``SIM_KNOBS`` (accept_v6 on, prompt required in
    default mode, the V4_5ALL 60 s limit on). See :func:`disagreement_reasons` for the list, each
    with its section of /work/shared/reference/kie-api.md.
    """
    return bool(disagreement_reasons(req))


# ----- running both sides ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(**SIM_KNOBS))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http() -> Any:
    """A fresh connection per request: on a kept-alive connection to the stdlib simulator server every
    answer stalls ~40 ms (headers and body go out in separate small writes: Nagle + delayed ACK)."""
    return requests


def _materialise(req: dict[str, Any], sim: SimServer) -> dict[str, Any]:
    out = {k: (v.replace(SIM, sim.url) if isinstance(v, str) else v) for k, v in req.items()}
    out["callBackUrl"] = CALLBACK
    return out


def client_verdict(req: dict[str, Any]) -> tuple[bool, Any]:
    """(accepted, ParsedRequest or ValidationError) from the client's validation."""
    try:
        parsed = parse_request(req, allow_private_urls=True, audio_duration=source_duration(req))
    except ValidationError as exc:
        assert exc.errors, "a ValidationError must list its problems"
        return False, exc
    return True, parsed


def sim_verdict(sim: SimServer, http: Any, body: dict[str, Any]) -> tuple[int, str]:
    resp = http.post(sim.url + SUBMIT, json=body, headers={"Authorization": "Bearer agreement-key"}, timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    if answer["code"] == 200:
        assert answer["data"]["taskId"]
    return int(answer["code"]), str(answer["msg"])


def check_agreement(sim: SimServer, http: Any, raw: dict[str, Any]) -> None:
    req = _materialise(raw, sim)
    client_ok, outcome = client_verdict(req)
    code, msg = sim_verdict(sim, http, req)
    assert code in (200, 422), f"simulator answered {code} {msg!r}; only validation outcomes expected"
    sim_ok = code == 200
    # (b) the client is never stricter than the provider.
    if sim_ok and not client_ok:
        pytest.fail(f"client rejects what the simulator accepts: {outcome}\nrequest: {req!r}")
    if not client_ok:
        return
    reasons = disagreement_reasons(req)
    # (a) the client accepts -> the simulator accepts, unless an unsettled rule says otherwise; and
    # every listed exception really is one (the simulator refuses it).
    if reasons:
        assert not sim_ok, f"listed as an expected disagreement {reasons} but the simulator accepted: {req!r}"
        if any(r not in SILENT for r in reasons):
            assert outcome.warnings, f"client accepted {reasons} without a warning: {req!r}"
    else:
        assert sim_ok, f"client accepts, simulator refuses ({msg}): {req!r}"
    # The body the client would really send gets the same verdict as the raw request.
    body_code, body_msg = sim_verdict(sim, http, outcome.body)
    assert (body_code == 200) == sim_ok, f"client body {outcome.body!r} got {body_code} {body_msg}"


# ----- request generator ----------------------------------------------------------------------------

ABSENT = object()
DURATIONS = (0.5, 1, 10, 30, 59, 59.99, 60, 60.01, 61, 120, 479, 479.99, 480, 480.01, 481, 600)
ALL_LIMITS = sorted({n for limits in LIMITS.values() for n in limits})


def _source(duration: float) -> str:
    return f"{SIM}/files/source/{duration:g}s.mp3"


upload_urls = st.one_of(
    st.sampled_from(DURATIONS).map(_source),
    st.sampled_from(DURATIONS).map(lambda d: f"  {_source(d)}\t"),
    st.sampled_from([
        "https://tempfile.redpandaai.co/kieai/123/uploads/1788331086662-demo.mp3",
        f"{SIM}/files/not-a-source.mp3",
        "http://localhost:1/a.mp3",
    ]),
    st.sampled_from([ABSENT, None, "", "   ", "ftp://example.org/a.mp3", "example.org/a.mp3", "not a url",
                     42, ["https://example.org/a.mp3"], "http://", "https:///a.mp3"]),
)
models = st.sampled_from([*LEGACY, *LEGACY, *V6, "V3_5", "v5", "", " V5", "V6_PRO", 5, None, ABSENT])
flags = st.sampled_from([True, True, True, False, False, False, ABSENT, None, "true", 1])
instrumentals = st.sampled_from([True, True, False, False, ABSENT, ABSENT, None, "false", 0])
weights = st.one_of(
    st.sampled_from([ABSENT, ABSENT, ABSENT, None]),
    st.integers(-5, 105).map(lambda n: n / 100),  # two decimals around 0 and 1
    st.integers(-20, 1020).map(lambda n: n / 1000),  # three decimals
    st.sampled_from([0, 1, 0.0, 1.0, -0.0, 0.29, 0.57, 0.01, 0.99, 1.01, -0.01, 1e-9, 2, "0.5", True, False]),
)
chars = st.sampled_from(["a", "é", "語", "😀"])  # code points, incl. outside the BMP


@st.composite
def text_values(draw: st.DrawFn, model: Any, index: int) -> Any:
    kind = draw(st.sampled_from(["absent", "absent", "none", "empty", "blank", "short", "short", "limit",
                                 "limit", "limit", "wrong"]))
    if kind == "absent":
        return ABSENT
    if kind == "none":
        return None
    if kind == "empty":
        return ""
    if kind == "blank":
        return draw(st.sampled_from([" ", "\t\n", "\u3000"]))
    if kind == "short":
        return draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
    if kind == "wrong":
        return draw(st.sampled_from([123, 1.5, True, ["x"], {"x": 1}]))
    own = LIMITS[model][index] if model in LIMITS else draw(st.sampled_from(ALL_LIMITS))
    base = draw(st.sampled_from([own, own, own, *ALL_LIMITS]))
    return draw(chars) * max(1, base + draw(st.integers(-1, 1)))


@st.composite
def continue_ats(draw: st.DrawFn, duration: float | None) -> Any:
    d = duration if duration is not None else 30.0
    return draw(st.one_of(
        st.sampled_from([ABSENT, None]),
        st.sampled_from([0, 0.0, -0.0, -1, 1e-9, 0.01, 1, d - 0.01, d, d + 0.01, d * 2, int(d), math.floor(d) + 1]),
        st.floats(-5, 700, allow_nan=False, allow_infinity=False),
        st.integers(-5, 700),
        st.sampled_from(["10", True, [1]]),
    ))


VALID_DURATIONS = (1, 10, 30, 59, 60, 120, 479, 480)
EXTERNAL = "https://tempfile.redpandaai.co/kieai/123/uploads/1788331086662-demo.mp3"


@st.composite
def valid_text(draw: st.DrawFn, limit: int) -> str:
    """A text field within ``limit`` code points: short, or right at/below the limit."""
    if draw(st.booleans()):
        return draw(st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=20))
    return draw(chars) * (limit - draw(st.integers(0, 1)))


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request both sides accept (modulo the documented exceptions), as the base for mutations."""
    model = draw(st.sampled_from([*LEGACY, *V6]))
    custom = draw(st.booleans())
    instrumental = draw(st.sampled_from([True, False, False, ABSENT]))
    duration = draw(st.sampled_from([*VALID_DURATIONS, None]))
    d = duration or 30.0
    req: dict[str, Any] = {"uploadUrl": _source(duration) if duration else EXTERNAL,
                           "defaultParamFlag": custom, "model": model, "instrumental": instrumental}
    if custom or draw(st.booleans()):
        req["continueAt"] = draw(st.one_of(st.sampled_from([0.01, 1, d - 0.01, max(1, int(d) - 1)]),
                                           st.floats(0.001, d - 0.001)))
    prompt_max, style_max, title_max = LIMITS[model]
    if custom:
        req["style"] = draw(valid_text(style_max))
        req["title"] = draw(valid_text(title_max))
        if instrumental is not True or draw(st.booleans()):
            req["prompt"] = draw(valid_text(prompt_max))
        if draw(st.booleans()):
            req["personaId"] = "persona-123"
        if draw(st.integers(0, 3)) == 0:  # one text field just over this model's limit
            name = draw(st.sampled_from(TEXT))
            req[name] = draw(chars) * (LIMITS[model][TEXT.index(name)] + 1)
    else:
        req["prompt"] = draw(st.one_of(valid_text(prompt_max), st.just("p" * 6000)))
    for name in ("styleWeight", "weirdnessConstraint", "audioWeight"):
        if draw(st.booleans()):
            req[name] = draw(st.integers(0, 100)) / 100
    if draw(st.booleans()):
        req["vocalGender"] = draw(st.sampled_from(["m", "f"]))
    if draw(st.booleans()):
        req["negativeTags"] = draw(st.sampled_from(["heavy metal", "", "x" * 300]))
    if draw(st.booleans()):
        req["personaModel"] = draw(st.sampled_from(PERSONA_MODELS))
    return req


#: Every field and the whole space of values a mutation may give it (ABSENT removes the field).
def _mutation(draw: st.DrawFn, req: dict[str, Any], name: str) -> Any:
    if name == "continueAt":
        return draw(continue_ats(source_duration(req)))
    if name in TEXT:
        return draw(text_values(req.get("model"), TEXT.index(name)))
    return draw({
        "uploadUrl": upload_urls,
        "defaultParamFlag": flags,
        "model": models,
        "instrumental": instrumentals,
        "styleWeight": weights,
        "weirdnessConstraint": weights,
        "audioWeight": weights,
        "negativeTags": st.sampled_from([ABSENT, None, "", "heavy metal", "x" * 300, 5]),
        "vocalGender": st.sampled_from([ABSENT, None, "m", "f", "", "M", "x", 1]),
        "personaId": st.sampled_from([ABSENT, None, "", "  ", "persona-123", 7]),
        "personaModel": st.sampled_from([ABSENT, None, "", *PERSONA_MODELS, "other", "Style_Persona", 3]),
        "customMode": st.sampled_from([ABSENT, True]),
        "duration": st.sampled_from([ABSENT, 30]),
        "continue_at": st.sampled_from([ABSENT, 5]),
        "futureField": st.sampled_from([ABSENT, {"a": 1}]),
    }[name])


MUTABLE = ("uploadUrl", "defaultParamFlag", "model", "instrumental", "continueAt", *TEXT, "styleWeight",
           "weirdnessConstraint", "audioWeight", "negativeTags", "vocalGender", "personaId", "personaModel",
           "customMode", "duration", "continue_at", "futureField")


@st.composite
def requests_(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with 0-3 fields replaced by anything from the field's whole space."""
    req = draw(valid_request())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))):
        name = draw(st.sampled_from(MUTABLE))
        req[name] = _mutation(draw, req, name)
    return {k: v for k, v in req.items() if v is not ABSENT}


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests_())
def test_client_and_simulator_agree(sim: SimServer, http: Any, req: dict[str, Any]) -> None:
    check_agreement(sim, http, req)


# ----- explicit examples ----------------------------------------------------------------------------

def _custom(**overrides: Any) -> dict[str, Any]:
    req = {"uploadUrl": _source(30), "defaultParamFlag": True, "instrumental": False, "continueAt": 12.5,
           "model": "V5", "prompt": "[Verse] la la", "style": "indie folk", "title": "Demo"}
    req.update(overrides)
    return {k: v for k, v in req.items() if v is not ABSENT}


def _default(**overrides: Any) -> dict[str, Any]:
    req = {"uploadUrl": _source(30), "defaultParamFlag": False, "instrumental": False, "continueAt": 12.5,
           "model": "V4_5", "prompt": "keep the groove"}
    req.update(overrides)
    return {k: v for k, v in req.items() if v is not ABSENT}


EXCEPTIONS = {
    "empty style (custom)": _custom(style=""),
    "blank title (custom)": _custom(title="  "),
    "empty prompt (custom, vocals)": _custom(prompt=""),
    "empty prompt (custom, instrumental absent)": _custom(instrumental=ABSENT, prompt=""),
    "prompt missing (default)": _default(prompt=ABSENT),
    "prompt empty (default)": _default(prompt=""),
    "prompt missing, instrumental absent (custom)": _custom(instrumental=ABSENT, prompt=ABSENT),
    "prompt missing, instrumental null (custom)": _custom(instrumental=None, prompt=ABSENT),
    "V4_5ALL source 61 s": _custom(model="V4_5ALL", uploadUrl=_source(61), continueAt=30),
    "V4_5ALL source 480 s (default mode)": _default(model="V4_5ALL", uploadUrl=_source(480), continueAt=30),
    "personaModel unknown": _custom(personaId="p-1", personaModel="ghost_persona"),
    "personaModel blank": _custom(personaModel=" "),
    "over-long prompt, instrumental": _custom(instrumental=True, model="V4", prompt="x" * 3001),
}


@pytest.mark.parametrize("req", list(EXCEPTIONS.values()), ids=list(EXCEPTIONS))
def test_each_documented_exception(sim: SimServer, http: Any, req: dict[str, Any]) -> None:
    full = _materialise(req, sim)
    client_ok, parsed = client_verdict(full)
    assert client_ok, parsed
    assert expected_disagreement(full)
    code, _ = sim_verdict(sim, http, full)
    assert code == 422
    check_agreement(sim, http, req)


AGREED = {
    "custom with vocals": (_custom(), True),
    "custom instrumental without prompt": (_custom(instrumental=True, prompt=ABSENT), True),
    "custom instrumental, prompt at V4 limit": (_custom(instrumental=True, model="V4", prompt="x" * 3000), True),
    "V6 on the legacy route (accept_v6 on)": (_custom(model="V6_MINI", title="語" * 100), True),
    "V4_5ALL source exactly 60 s": (_custom(model="V4_5ALL", uploadUrl=_source(60), continueAt=59.99), True),
    "V4_5ALL title 81": (_custom(model="V4_5ALL", title="t" * 81), False),
    "V4 style 201 emoji": (_custom(model="V4", style="😀" * 201), False),
    "V5 prompt 5000": (_custom(prompt="p" * 5000), True),
    "V5 prompt 5001": (_custom(prompt="p" * 5001), False),
    "default mode ignores limits": (_default(model="V4", prompt="p" * 9000, title="t" * 500), True),
    "continueAt == duration": (_custom(continueAt=30), False),
    "continueAt just below duration": (_custom(continueAt=29.99), True),
    "continueAt 0": (_custom(continueAt=0), False),
    "continueAt int": (_custom(continueAt=3), True),
    "continueAt missing in custom": (_custom(continueAt=ABSENT), False),
    "continueAt missing in default": (_default(continueAt=ABSENT), True),
    "continueAt bool": (_custom(continueAt=True), False),
    "source 8 min": (_custom(uploadUrl=_source(480), continueAt=100), True),
    "source over 8 min": (_custom(uploadUrl=_source(480.01), continueAt=100), False),
    "weight 0.29": (_custom(styleWeight=0.29, audioWeight=0, weirdnessConstraint=1), True),
    "weight three decimals": (_custom(styleWeight=0.295), False),
    "weight above 1": (_custom(audioWeight=1.01), False),
    "weight as string": (_custom(weirdnessConstraint="0.5"), False),
    "weight as bool": (_custom(styleWeight=True), False),
    "personaId in custom": (_custom(personaId="p-1", personaModel="voice_persona"), True),
    "personaId in default": (_default(personaId="p-1"), False),
    "invalid model": (_custom(model="V3_5"), False),
    "lower-case model": (_custom(model="v5"), False),
    "model missing": (_custom(model=ABSENT), False),
    "defaultParamFlag as string": (_custom(defaultParamFlag="true"), False),
    "instrumental as int": (_custom(instrumental=0), False),
    "prompt as number": (_custom(prompt=5), False),
    "empty uploadUrl": (_custom(uploadUrl=""), False),
    "ftp uploadUrl": (_custom(uploadUrl="ftp://example.org/a.mp3"), False),
    "unknown fields pass": (_custom(customMode=True, variety=2, continue_at=3), True),
    "vocalGender M": (_custom(vocalGender="M"), False),
}


@pytest.mark.parametrize(("req", "accepted"), list(AGREED.values()), ids=list(AGREED))
def test_agreed_examples(sim: SimServer, http: Any, req: dict[str, Any], accepted: bool) -> None:
    full = _materialise(req, sim)
    client_ok, outcome = client_verdict(full)
    code, msg = sim_verdict(sim, http, full)
    assert client_ok is accepted, outcome
    assert (code == 200) is accepted, msg
    assert not expected_disagreement(full)


@pytest.mark.parametrize("model", [*LEGACY, *V6])
def test_length_limits_agree_at_every_boundary(sim: SimServer, http: Any, model: str) -> None:
    """Exhaustive §2.3 boundaries: every field at limit and limit + 1, both modes, with and without vocals."""
    for index, name in enumerate(TEXT):
        limit = LIMITS[model][index]
        for length in (limit, limit + 1):
            for instrumental in (True, False, ABSENT):
                check_agreement(sim, http, _custom(model=model, instrumental=instrumental, **{name: "😀" * length}))
            check_agreement(sim, http, _default(model=model, **{name: "語" * length}))
    assert client_verdict(_materialise(_custom(model=model, title="t" * (LIMITS[model][2] + 1)), sim))[0] is False


def test_v6_refused_by_default_simulator_is_the_documented_disagreement(http: Any) -> None:
    """§1.1: the client accepts V6 on the legacy route with a warning; the simulator only with accept_v6."""
    with serve(SimConfig(callbacks=False)) as strict:
        req = _materialise(_custom(model="V6"), strict)
        ok, parsed = client_verdict(req)
        assert ok and any("V6" in w for w in parsed.warnings)
        code, msg = sim_verdict(strict, http, req)
        assert code == 422 and "model" in msg


def test_switches_off_remove_the_disagreements(http: Any) -> None:
    """With the simulator's unsettled switches off, those requests are accepted by both sides."""
    knobs = {"callbacks": False, "require_prompt_in_default_mode": False, "v45all_limit_60s": False}
    with serve(SimConfig(**knobs)) as lenient:
        for raw in (_default(prompt=ABSENT), _custom(model="V4_5ALL", uploadUrl=_source(120), continueAt=30)):
            req = _materialise(raw, lenient)
            assert client_verdict(req)[0]
            assert sim_verdict(lenient, http, req)[0] == 200


def test_client_reports_every_problem_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        parse_request({"uploadUrl": "", "defaultParamFlag": True, "model": "V9", "styleWeight": 2,
                       "continueAt": -1, "style": "s" * 2000, "title": "t"}, allow_private_urls=True)
    fields = {e["field"] for e in info.value.errors}
    assert {"uploadUrl", "model", "styleWeight", "continueAt"} <= fields


# ----- edge cases once found to break part (b), kept as regressions ------------------------------

EDGE_CASES = {
    "vocalGender empty": _custom(vocalGender=""),
    "personaId empty in default mode": _default(personaId=""),
    "personaId blank in default mode": _default(personaId="   "),
    "hostless uploadUrl": _custom(uploadUrl="http://"),
    "hostless uploadUrl with path": _custom(uploadUrl="https:///a.mp3"),
}


@pytest.mark.parametrize("req", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_cases_client_never_stricter(sim: SimServer, http: Any, req: dict[str, Any]) -> None:
    full = _materialise(req, sim)
    client_ok, outcome = client_verdict(full)
    code, msg = sim_verdict(sim, http, full)
    assert client_ok == (code == 200), f"client: {outcome}; simulator: {code} {msg}"


@pytest.mark.parametrize("prompt", ["", "  "])
def test_empty_default_mode_prompt_warns(prompt: str) -> None:
    parsed = parse_request(_default(prompt=prompt, uploadUrl="https://example.org/a.mp3"))
    assert any("prompt" in w for w in parsed.warnings), parsed.warnings
