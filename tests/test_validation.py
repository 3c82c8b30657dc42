"""Unit tests for client-side request validation (kie_extend.jobs.request)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kie_extend.errors import ValidationError
from kie_extend.jobs.request import (
    LEGACY_MODELS,
    LENGTH_LIMITS,
    MAX_AUDIO_SECONDS,
    V6_MODELS,
    ExtendRequest,
    ParsedRequest,
    parse_request,
)

MODELS = ["V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5", "V6", "V6_WILD", "V6_MINI"]
TEXT_FIELDS = ["prompt", "style", "title"]
WEIGHTS = ["styleWeight", "weirdnessConstraint", "audioWeight"]
UPLOAD = "https://tempfile.redpandaai.co/kieai/123/uploads/1788331086662-demo.mp3"
CALLBACK = "https://worker.example.org/kie/callback/8d0c2f6e"


def custom(model: str = "V5", /, **over: Any) -> dict[str, Any]:
    """A valid custom-mode request with vocals; keyword arguments override (None value = remove)."""
    data: dict[str, Any] = {
        "uploadUrl": UPLOAD,
        "defaultParamFlag": True,
        "instrumental": False,
        "continueAt": 42.5,
        "model": model,
        "callBackUrl": CALLBACK,
        "prompt": "[Verse]\nThe road runs on",
        "style": "indie folk",
        "title": "Demo (Extended)",
    }
    return _apply(data, over)


def default(model: str = "V5", /, **over: Any) -> dict[str, Any]:
    """A valid default-mode request; keyword arguments override (None value = remove)."""
    data: dict[str, Any] = {
        "uploadUrl": UPLOAD,
        "defaultParamFlag": False,
        "instrumental": False,
        "continueAt": 42.5,
        "model": model,
        "callBackUrl": CALLBACK,
        "prompt": "Keep the groove",
    }
    return _apply(data, over)


def _apply(data: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def errors_of(data: Any, **kwargs: Any) -> list[dict[str, str]]:
    """The errors parse_request raises for ``data`` (fails the test if it passes)."""
    with pytest.raises(ValidationError) as info:
        parse_request(data, **kwargs)
    return info.value.errors


def fields_of(data: Any, **kwargs: Any) -> set[str]:
    """The set of fields named by the errors for ``data``."""
    return {e["field"] for e in errors_of(data, **kwargs)}


def legacy_no_warning(model: str, warnings: list[str]) -> list[str]:
    """Warnings other than the V6-on-legacy one."""
    return [w for w in warnings if not (model in V6_MODELS and "createTask" in w)]


# --- constants -------------------------------------------------------------------------------


def test_constants() -> None:
    assert LEGACY_MODELS == frozenset({"V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5"})
    assert V6_MODELS == frozenset({"V6", "V6_WILD", "V6_MINI"})
    assert set(LENGTH_LIMITS) == set(MODELS)
    assert LENGTH_LIMITS["V4"] == (3000, 200, 80)
    assert LENGTH_LIMITS["V4_5ALL"] == (5000, 1000, 80)
    for model in ("V4_5", "V4_5PLUS", "V5", "V5_5", "V6", "V6_WILD", "V6_MINI"):
        assert LENGTH_LIMITS[model] == (5000, 1000, 100)
    assert MAX_AUDIO_SECONDS == 480.0


# --- valid requests and the model enum -------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_valid_custom_and_default_pass(model: str) -> None:
    for data in (custom(model), custom(model, instrumental=True, prompt=None), default(model)):
        parsed = parse_request(data)
        assert isinstance(parsed, ParsedRequest)
        assert parsed.body == data
        assert legacy_no_warning(model, parsed.warnings) == []


@pytest.mark.parametrize("model", MODELS)
def test_v6_models_warn_and_legacy_do_not(model: str) -> None:
    warnings = parse_request(custom(model)).warnings
    v6_warnings = [w for w in warnings if "createTask" in w]
    if model in V6_MODELS:
        assert len(v6_warnings) == 1 and model in v6_warnings[0]
    else:
        assert v6_warnings == []


@pytest.mark.parametrize("bad", ["V3_5", "v5", "V5.5", "V4.5", "", "V7", 5, True, ["V5"]])
def test_unknown_model_rejected(bad: Any) -> None:
    for data in (custom(model=bad), default(model=bad)):
        errs = errors_of(data)
        assert [e["field"] for e in errs] == ["model"]
        assert "V4_5ALL" in errs[0]["message"]


def test_reference_examples_pass_without_warnings() -> None:
    example = custom("V5", negativeTags="heavy metal", vocalGender="f", styleWeight=0.65,
                     weirdnessConstraint=0.3, audioWeight=0.7)
    assert parse_request(example).warnings == []
    assert parse_request(default("V4_5")).warnings == []


# --- per-model length limits -----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("index,field", list(enumerate(TEXT_FIELDS)))
def test_custom_mode_length_limit(model: str, index: int, field: str) -> None:
    limit = LENGTH_LIMITS[model][index]
    assert parse_request(custom(model, **{field: "a" * limit})).body[field] == "a" * limit
    errs = errors_of(custom(model, **{field: "a" * (limit + 1)}))
    assert [e["field"] for e in errs] == [field]
    assert str(limit) in errs[0]["message"] and model in errs[0]["message"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("index,field", list(enumerate(TEXT_FIELDS)))
def test_length_counts_code_points(model: str, index: int, field: str) -> None:
    limit = LENGTH_LIMITS[model][index]
    clef = "\U0001d11e"  # two UTF-16 units, one code point
    parse_request(custom(model, **{field: clef * limit}))
    assert fields_of(custom(model, **{field: clef * (limit + 1)})) == {field}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("index,field", list(enumerate(TEXT_FIELDS)))
def test_default_mode_lengths_unchecked(model: str, index: int, field: str) -> None:
    text = "a" * (LENGTH_LIMITS[model][index] + 1)
    assert parse_request(default(model, **{field: text})).body[field] == text


@pytest.mark.parametrize("model", MODELS)
def test_all_three_over_limit_reported_together(model: str) -> None:
    over = {f: "a" * (LENGTH_LIMITS[model][i] + 1) for i, f in enumerate(TEXT_FIELDS)}
    assert fields_of(custom(model, **over)) == set(TEXT_FIELDS)


@pytest.mark.parametrize("model", MODELS)
def test_long_prompt_with_instrumental_true_warns(model: str) -> None:
    text = "a" * (LENGTH_LIMITS[model][0] + 1)
    parsed = parse_request(custom(model, instrumental=True, prompt=text))
    assert any("prompt" in w and "instrumental" in w for w in parsed.warnings)


# --- required-field matrix -------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", ["uploadUrl", "defaultParamFlag", "model"])
@pytest.mark.parametrize("make", [custom, default], ids=["custom", "default"])
def test_always_required(model: str, field: str, make: Any) -> None:
    data = make(model, **{field: None})
    errs = errors_of(data)
    assert {e["field"] for e in errs} == {field}
    assert "required" in errs[0]["message"]
    data[field] = None  # explicit null counts as missing
    assert fields_of(data) == {field}


@pytest.mark.parametrize("model", MODELS)
def test_callback_url_not_required(model: str) -> None:
    for data in (custom(model, callBackUrl=None), default(model, callBackUrl=None)):
        assert "callBackUrl" not in parse_request(data).body


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", ["style", "title", "continueAt"])
def test_custom_instrumental_true_requires(model: str, field: str) -> None:
    errs = errors_of(custom(model, instrumental=True, prompt=None, **{field: None}))
    assert [e["field"] for e in errs] == [field]
    assert "custom mode" in errs[0]["message"]


@pytest.mark.parametrize("model", MODELS)
def test_custom_instrumental_true_prompt_optional(model: str) -> None:
    body = parse_request(custom(model, instrumental=True, prompt=None)).body
    assert "prompt" not in body and body["instrumental"] is True


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", ["style", "title", "prompt", "continueAt"])
def test_custom_instrumental_false_requires(model: str, field: str) -> None:
    assert fields_of(custom(model, **{field: None})) == {field}


@pytest.mark.parametrize("model", MODELS)
def test_custom_mode_missing_all_reported_at_once(model: str) -> None:
    data = custom(model, style=None, title=None, prompt=None, continueAt=None)
    assert fields_of(data) == {"style", "title", "prompt", "continueAt"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("instrumental", [True, False])
def test_default_mode_requires_only_the_basics(model: str, instrumental: bool) -> None:
    data = {"uploadUrl": UPLOAD, "defaultParamFlag": False, "model": model, "instrumental": instrumental}
    parsed = parse_request(data)
    assert any("prompt" in w and "default mode" in w for w in parsed.warnings)
    assert parsed.body == data


@pytest.mark.parametrize("model", MODELS)
def test_custom_mode_instrumental_missing(model: str) -> None:
    # prompt is left to the provider: no error, a warning, instrumental sent as false
    parsed = parse_request(custom(model, instrumental=None, prompt=None))
    assert parsed.body["instrumental"] is False
    assert any("instrumental" in w and "prompt" in w for w in parsed.warnings)
    # with a prompt present there is nothing to warn about
    parsed = parse_request(custom(model, instrumental=None))
    assert legacy_no_warning(model, parsed.warnings) == []
    # the fields common to both branches are still required
    data = custom(model, instrumental=None, prompt=None, style=None, title=None, continueAt=None)
    assert fields_of(data) == {"style", "title", "continueAt"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_required_text_warns(model: str, field: str, empty: str) -> None:
    parsed = parse_request(custom(model, **{field: empty}))
    assert parsed.body[field] == empty
    assert any(w.startswith(f"{field} is empty") for w in parsed.warnings)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", ["instrumental", "defaultParamFlag"])
@pytest.mark.parametrize("bad", ["true", "false", 1, 0, "", [True]])
def test_booleans_must_be_json_booleans(model: str, field: str, bad: Any) -> None:
    errs = errors_of(custom(model, **{field: bad}))
    assert [e["field"] for e in errs] == [field]
    assert "boolean" in errs[0]["message"]


@pytest.mark.parametrize("field", ["prompt", "style", "title", "uploadUrl", "callBackUrl",
                                   "negativeTags", "personaId", "personaModel"])
@pytest.mark.parametrize("bad", [5, 1.5, True, ["x"], {"a": 1}])
def test_strings_must_be_strings(field: str, bad: Any) -> None:
    errs = errors_of(custom(**{field: bad}))
    assert [e["field"] for e in errs] == [field]
    assert "string" in errs[0]["message"]


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", WEIGHTS)
@pytest.mark.parametrize("good", [0, 1, 0.0, 1.0, 0.29, 0.57, 0.5, 0.01, 0.99])
def test_weights_accept(model: str, field: str, good: float) -> None:
    for make in (custom, default):
        assert parse_request(make(model, **{field: good})).body[field] == good


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field", WEIGHTS)
@pytest.mark.parametrize("bad", [-0.01, 1.01, 0.333, 0.005, 0.2900001, 2, -1, True, False, "0.5",
                                 math.nan, math.inf, [0.5]])
def test_weights_reject(model: str, field: str, bad: Any) -> None:
    for make in (custom, default):
        assert fields_of(make(model, **{field: bad})) == {field}


@pytest.mark.parametrize("field", WEIGHTS)
def test_weight_messages(field: str) -> None:
    assert "between 0 and 1" in errors_of(custom(**{field: 1.01}))[0]["message"]
    assert "two decimal" in errors_of(custom(**{field: 0.333}))[0]["message"]
    assert "number" in errors_of(custom(**{field: "0.5"}))[0]["message"]


@given(st.integers(min_value=0, max_value=100))
def test_every_hundredth_is_a_valid_weight(k: int) -> None:
    parse_request(custom(styleWeight=k / 100, weirdnessConstraint=k * 0.01, audioWeight=round(k * 0.01, 2)))


@given(st.floats(min_value=0, max_value=1, allow_nan=False))
def test_weights_with_more_decimals_rejected(x: float) -> None:
    if abs(x * 100 - round(x * 100)) < 1e-9:
        parse_request(custom(audioWeight=x))
    else:
        assert fields_of(custom(audioWeight=x)) == {"audioWeight"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("make", [custom, default], ids=["custom", "default"])
@pytest.mark.parametrize("bad", [0, 0.0, -0.01, -5, True, False, "10", math.nan, math.inf, [1]])
def test_continue_at_rejects(model: str, make: Any, bad: Any) -> None:
    assert fields_of(make(model, continueAt=bad)) == {"continueAt"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("make", [custom, default], ids=["custom", "default"])
@pytest.mark.parametrize("good", [0.01, 1, 42.5, 479.99])
def test_continue_at_accepts(model: str, make: Any, good: float) -> None:
    assert parse_request(make(model, continueAt=good)).body["continueAt"] == good


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("make", [custom, default], ids=["custom", "default"])
def test_continue_at_below_audio_duration(model: str, make: Any) -> None:
    parse_request(make(model, continueAt=29.99), audio_duration=30.0)
    for at in (30, 30.0, 30.5, 400):
        errs = errors_of(make(model, continueAt=at), audio_duration=30.0)
        assert [e["field"] for e in errs] == ["continueAt"]
        assert "duration" in errs[0]["message"]


def test_continue_at_without_duration_is_not_bounded() -> None:
    parse_request(custom(continueAt=10_000))


def test_continue_at_kept_as_given() -> None:
    body = parse_request(custom(continueAt=42)).body
    assert body["continueAt"] == 42 and type(body["continueAt"]) is int


def test_default_mode_continue_at_optional() -> None:
    assert "continueAt" not in parse_request(default(continueAt=None)).body


# --- source audio length ---------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_audio_too_long(model: str) -> None:
    parse_request(custom(model, continueAt=10), audio_duration=480.0)
    for make in (custom, default):
        errs = errors_of(make(model, continueAt=10), audio_duration=481.0)
        assert [e["field"] for e in errs] == ["uploadUrl"]
        assert "480" in errs[0]["message"]


@pytest.mark.parametrize("model", MODELS)
def test_v4_5all_long_source_warns_only(model: str) -> None:
    warnings = parse_request(custom(model, continueAt=10), audio_duration=61.0).warnings
    hits = [w for w in warnings if "V4_5ALL" in w]
    assert len(hits) == (1 if model == "V4_5ALL" else 0)
    at_limit = parse_request(custom(model, continueAt=10), audio_duration=60.0).warnings
    assert [w for w in at_limit if "V4_5ALL" in w] == []


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "30"])
def test_bad_audio_duration_argument(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_request(custom(), audio_duration=bad)


# --- persona, vocal gender, negative tags ----------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_persona_id_only_in_custom_mode(model: str) -> None:
    body = parse_request(custom(model, personaId="p-123", personaModel="voice_persona")).body
    assert body["personaId"] == "p-123" and body["personaModel"] == "voice_persona"
    errs = errors_of(default(model, personaId="p-123"))
    assert [e["field"] for e in errs] == ["personaId"]
    assert "custom mode" in errs[0]["message"]
    assert "personaId" not in parse_request(default(model, personaId=None)).body


@pytest.mark.parametrize("value", ["style_persona", "voice_persona", "something_new", ""])
def test_persona_model_any_string(value: str) -> None:
    assert parse_request(custom(personaModel=value)).body["personaModel"] == value


@pytest.mark.parametrize("model", MODELS)
def test_vocal_gender(model: str) -> None:
    for good in ("m", "f"):
        assert parse_request(custom(model, vocalGender=good)).body["vocalGender"] == good
    for bad in ("M", "F", "male", "x", 1, True):
        errs = errors_of(custom(model, vocalGender=bad))
        assert [e["field"] for e in errs] == ["vocalGender"]
    empty = parse_request(custom(model, vocalGender=""))  # unsettled: let the provider decide
    assert any("vocalGender" in w for w in empty.warnings)


def test_vocal_gender_message() -> None:
    assert "'m' or 'f'" in errors_of(custom(vocalGender="male"))[0]["message"]


@pytest.mark.parametrize("model", MODELS)
def test_negative_tags_unlimited(model: str) -> None:
    tags = "x" * 10_000
    assert parse_request(custom(model, negativeTags=tags)).body["negativeTags"] == tags


# --- URLs ------------------------------------------------------------------------------------

ALWAYS_BAD_URLS = [
    "", "   ", "ftp://files.example.org/a.mp3", "file:///etc/passwd", "example.org/a.mp3",
    "http://", "https:///a.mp3", "http:a.mp3", "https://example.org:99999/a.mp3", "http://[::1/a",
    "javascript:alert(1)",
]
PRIVATE_URLS = [
    "http://127.0.0.1/a.mp3", "http://127.1.2.3:8080/a.mp3", "http://10.0.0.1/a.mp3",
    "http://172.16.5.4/a.mp3", "http://192.168.1.20/a.mp3", "http://169.254.1.1/a.mp3",
    "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/a.mp3", "http://[::1]/a.mp3",
    "http://[::]/a.mp3", "http://[fe80::1]/a.mp3", "http://[fc00::1]/a.mp3",
    "http://[::ffff:127.0.0.1]/a.mp3", "http://localhost/a.mp3", "http://LOCALHOST:8000/a.mp3",
    "http://localhost./a.mp3", "http://files.localhost/a.mp3", "http://240.0.0.1/a.mp3",
    "http://2130706433/a.mp3", "http://0x7f.0.0.1/a.mp3", "http://127.1/a.mp3",
    "http://100.64.0.1/a.mp3", "http://224.0.0.1/a.mp3",
]
PUBLIC_URLS = [
    UPLOAD, "http://example.org/a.mp3", "HTTPS://Example.ORG/a.mp3", "https://8.8.8.8/a.mp3",
    "https://[2606:4700::1111]/a.mp3", "https://user:pw@example.org:8443/a.mp3?x=1#f",
    "https://localhost.example.org/a.mp3", "https://10.example.org/a.mp3",
]


@pytest.mark.parametrize("url", ALWAYS_BAD_URLS)
def test_upload_url_invalid(url: str) -> None:
    for allow in (False, True):
        assert fields_of(custom(uploadUrl=url), allow_private_urls=allow) == {"uploadUrl"}


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_upload_url_private_rejected_unless_allowed(url: str) -> None:
    errs = errors_of(custom(uploadUrl=url))
    assert [e["field"] for e in errs] == ["uploadUrl"]
    assert "private" in errs[0]["message"]
    assert parse_request(custom(uploadUrl=url), allow_private_urls=True).body["uploadUrl"] == url


@pytest.mark.parametrize("url", PUBLIC_URLS)
def test_upload_url_public_accepted(url: str) -> None:
    assert parse_request(custom(uploadUrl=url)).body["uploadUrl"] == url


def test_upload_url_messages() -> None:
    assert "empty" in errors_of(custom(uploadUrl=""))[0]["message"]
    assert "http" in errors_of(custom(uploadUrl="ftp://example.org/a"))[0]["message"]
    assert "host" in errors_of(custom(uploadUrl="https:///a.mp3"))[0]["message"]


@pytest.mark.parametrize("url", PRIVATE_URLS[:6] + ["http://localhost:8000/kie/callback"])
def test_callback_url_may_be_private(url: str) -> None:
    assert parse_request(custom(callBackUrl=url)).body["callBackUrl"] == url


@pytest.mark.parametrize("url", ALWAYS_BAD_URLS)
def test_callback_url_must_be_http(url: str) -> None:
    assert fields_of(custom(callBackUrl=url)) == {"callBackUrl"}


# --- several problems at once ----------------------------------------------------------------


def test_every_problem_reported_in_one_pass() -> None:
    data = default(
        uploadUrl="http://127.0.0.1/a.mp3",
        model="V3_5",
        continueAt=0,
        styleWeight=1.5,
        weirdnessConstraint=True,
        audioWeight="0.5",
        vocalGender="x",
        personaId="p-1",
        callBackUrl="ftp://x.example.org",
        negativeTags=7,
    )
    assert fields_of(data) == {
        "uploadUrl", "model", "continueAt", "styleWeight", "weirdnessConstraint", "audioWeight",
        "vocalGender", "personaId", "callBackUrl", "negativeTags",
    }


def test_custom_mode_problems_reported_together() -> None:
    data = custom("V4", title="t" * 81, style=None, prompt=None, continueAt=-1,
                  instrumental=False, uploadUrl="", audioWeight=0.333)
    errs = errors_of(data, audio_duration=500)
    assert {e["field"] for e in errs} == {"title", "style", "prompt", "continueAt", "uploadUrl",
                                          "audioWeight"}
    assert len([e for e in errs if e["field"] == "uploadUrl"]) == 2  # empty URL and too-long audio
    assert len(errs) == len({(e["field"], e["message"]) for e in errs})  # no duplicates


def test_wrong_types_do_not_crash_cross_field_rules() -> None:
    data = {"uploadUrl": 1, "defaultParamFlag": "yes", "model": None, "instrumental": "no",
            "continueAt": "5", "prompt": 1, "style": [], "title": {}, "personaId": 3}
    assert fields_of(data, audio_duration=100) == {
        "uploadUrl", "defaultParamFlag", "model", "instrumental", "continueAt", "prompt",
        "style", "title", "personaId",
    }


@pytest.mark.parametrize("data", [None, [], ["uploadUrl"], "uploadUrl", 5, True, b"{}"])
def test_request_must_be_an_object(data: Any) -> None:
    errs = errors_of(data)
    assert len(errs) == 1 and errs[0]["field"] == "request"


def test_non_string_field_names_rejected() -> None:
    data: dict[Any, Any] = custom()
    data[1] = "x"
    errs = errors_of(data)
    assert [e["field"] for e in errs] == ["request"]


def test_empty_object_lists_every_required_field() -> None:
    assert fields_of({}) == {"uploadUrl", "defaultParamFlag", "model"}


@given(st.dictionaries(
    st.sampled_from(["uploadUrl", "defaultParamFlag", "model", "instrumental", "continueAt",
                     "prompt", "style", "title", "styleWeight", "vocalGender", "personaId",
                     "callBackUrl", "extra"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=5),
              st.sampled_from(MODELS + [UPLOAD, "m"]), st.lists(st.integers(), max_size=2)),
))
@settings(max_examples=300, deadline=None)
def test_arbitrary_input_only_raises_validation_error(data: dict[str, Any]) -> None:
    try:
        parsed = parse_request(data, audio_duration=100.0)
    except ValidationError as exc:
        assert exc.errors
        for err in exc.errors:
            assert set(err) == {"field", "message"} and err["message"]
            assert err["field"] == "request" or err["field"][:1].islower()
    else:
        assert parsed.body["instrumental"] in (True, False)


# --- body shape and warnings -----------------------------------------------------------------


def test_unknown_fields_pass_through_unchanged() -> None:
    extra = {"variety": 2, "duration": 30, "futureField": {"nested": [1, None, "x"]}, "nothing": None}
    parsed = parse_request(custom(**extra) | {"nothing": None})
    for key, value in extra.items():
        assert parsed.body[key] == value
    assert parsed.body["nothing"] is None


def test_custom_mode_field_warns_and_passes_through() -> None:
    parsed = parse_request(custom(customMode=True))
    assert parsed.body["customMode"] is True
    assert any("customMode" in w and "defaultParamFlag" in w for w in parsed.warnings)


def test_snake_case_spelling_warns() -> None:
    parsed = parse_request(custom(style_weight=0.5, callbackUrl="https://x.example.org"))
    assert parsed.body["style_weight"] == 0.5
    assert any("style_weight" in w and "styleWeight" in w for w in parsed.warnings)
    assert any("callBackUrl" in w for w in parsed.warnings)


@pytest.mark.parametrize("make", [custom, default], ids=["custom", "default"])
def test_instrumental_defaults_to_false(make: Any) -> None:
    data = make(instrumental=None, prompt="la la")
    assert parse_request(data).body["instrumental"] is False
    data["instrumental"] = None
    assert parse_request(data).body["instrumental"] is False
    assert parse_request(make(instrumental=True)).body["instrumental"] is True


def test_null_optional_fields_dropped() -> None:
    data = custom()
    data.update({f: None for f in ("negativeTags", "vocalGender", "styleWeight", "weirdnessConstraint",
                                   "audioWeight", "personaId", "personaModel", "callBackUrl")})
    body = parse_request(data).body
    assert body == custom(callBackUrl=None)


def test_input_not_mutated() -> None:
    data = custom(instrumental=None, negativeTags=None) | {"negativeTags": None}
    snapshot = json.dumps(data, sort_keys=True)
    parse_request(data)
    assert json.dumps(data, sort_keys=True) == snapshot


def test_body_is_json_serialisable() -> None:
    body = parse_request(custom(personaId="p", vocalGender="m", audioWeight=0.57)).body
    assert json.loads(json.dumps(body)) == body


# --- the pydantic model and the error object ----------------------------------------------------


def test_extend_request_model() -> None:
    req = ExtendRequest.model_validate(custom(personaModel="voice_persona", variety=1))
    assert req.uploadUrl == UPLOAD and req.defaultParamFlag is True and req.model == "V5"
    assert req.personaModel == "voice_persona"
    assert req.model_extra == {"variety": 1}
    for bad in ({"defaultParamFlag": "true"}, {"continueAt": "3"}, {"styleWeight": True}, {"prompt": 5}):
        with pytest.raises(Exception):
            ExtendRequest.model_validate(custom() | bad)


def test_validation_error_json_round_trip() -> None:
    with pytest.raises(ValidationError) as info:
        parse_request(default(model="V3", personaId="p", styleWeight=2))
    exc = info.value
    assert isinstance(exc, ValueError)
    wire = json.dumps(exc.errors)
    rebuilt = ValidationError(json.loads(wire))
    assert rebuilt.errors == exc.errors
    assert str(rebuilt) == str(exc)
    assert {e["field"] for e in rebuilt.errors} == {"model", "personaId", "styleWeight"}
    for err in exc.errors:
        assert set(err) == {"field", "message"}
        assert isinstance(err["message"], str) and err["message"]
        assert "pydantic" not in err["message"] and "Input should" not in err["message"]
