"""Inputs nobody planned for, on a real ``serve`` app over loopback: NaN and Infinity inside
``metadata`` (JSON has neither: one such record used to make ``GET /v1/jobs`` answer 500 for
everyone), and a web page driving a token-less loopback API through the visitor's browser."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
from test_http_api import Served

from kie_extend.api import enqueue_extend
from kie_extend.config import Settings
from kie_extend.errors import ValidationError
from kie_extend.http.app import create_app

REQUEST = {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
           "prompt": "a calm song", "continueAt": 5}
RAW = ('{"request": {"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": false, "model": "V5", '
       '"prompt": "a calm song", "continueAt": 5}, "metadata": {"order": %s}}')


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_metadata_are_refused(literal: str, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    served = Served(create_app(settings, parts=("api",)))
    try:
        r = requests.post(served.url + "/v1/jobs", data=RAW % literal, timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["errors"] == [{"field": "metadata",
                                                "message": "must be JSON-serialisable (no NaN or Infinity)"}]
        listing = requests.get(served.url + "/v1/jobs", timeout=10)
        assert listing.status_code == 200 and listing.json()["jobs"] == [], listing.text
    finally:
        served.stop()
    with pytest.raises(ValidationError) as caught:  # the Python API, the CLI and batch files share the check
        enqueue_extend(REQUEST, metadata={"order": float(literal.replace("1e400", "inf"))}, settings=settings)
    assert caught.value.errors[0]["field"] == "metadata"


def test_a_tokenless_api_refuses_other_sites_browsers(make_settings: Callable[..., Settings]) -> None:
    """Without KIE_API_TOKENS (loopback only), a page elsewhere could POST a text/plain form to
    http://127.0.0.1:8080/v1/pause through its visitor's browser (no preflight): refused (403).
    Programs (no Origin), the same origin, and reads are unaffected."""
    served = Served(create_app(make_settings(), parts=("api",)))
    try:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            r = requests.post(served.url + "/v1/pause", data='{"reason": "x"}', timeout=10,
                              headers={"Content-Type": "text/plain", **headers})
            assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden", (headers, r.text)
        assert requests.get(served.url + "/v1/system", timeout=10).json()["operator_paused"] is None
        assert requests.get(served.url + "/v1/system", headers={"Origin": "https://evil.example"},
                            timeout=10).status_code == 200
        for headers in ({}, {"Origin": served.url}, {"Sec-Fetch-Site": "same-origin", "Origin": served.url}):
            r = requests.post(served.url + "/v1/pause", json={"reason": "maintenance"}, headers=headers, timeout=10)
            assert r.status_code == 200, (headers, r.text)
            assert requests.post(served.url + "/v1/resume", headers=headers, timeout=10).json()["resumed"] is True
    finally:
        served.stop()
