"""Inputs nobody planned for, on a real ``serve`` app over loopback: NaN and Infinity inside
``metadata`` (JSON has neither: one such record used to make ``GET /v1/jobs`` answer 500 for
everyone), and a web page driving a token-less loopback API through the visitor's browser."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
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


def test_task_messages_with_odd_headers_do_not_stop_the_worker(valkey: Any, prefix: str, tmp_path: Path) -> None:
    """A message without an ``id`` header used to read as a lost connection and come back forever
    (no worker consumed anything again); a ``timelimit`` of strings ended the worker process, and the
    next worker's too. Each is now failed (when it has an id) and acknowledged; the worker lives on
    and runs the job sent after them."""
    from kombu import Connection, Producer, Queue

    from kie_extend.api import get_job
    from kie_extend.cli.devstack import DevStack
    from kie_extend.jobs.ids import derived_job_id

    request = {"uploadUrl": "http://127.0.0.1:9/a.mp3", "defaultParamFlag": False, "model": "V5",
               "prompt": "calm", "continueAt": 5}
    with DevStack(tmp_path, redis_url=valkey.url, key_prefix=prefix,
                  env={"KIE_QUEUE": prefix, "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/unused",
                       "KIE_ALLOW_PRIVATE_URLS": "true"}) as stack:
        stack.start_worker(concurrency=1)
        settings = stack.settings()
        odd = {"no-id": {"id": None}, "int-id": {"id": 4711}, "timelimit": {"timelimit": ["a", "b"]},
               "retries": {"retries": "many"}, "last": {}}
        ids = {}
        with Connection(settings.redis_url) as conn:
            producer = Producer(conn)
            for name, extra in odd.items():
                job_id = f"{name}-{uuid.uuid4().hex[:8]}"
                ids[name] = job_id
                headers = {"lang": "py", "task": "kie_extend.extend", "id": job_id, "root_id": job_id,
                           "parent_id": None, "group": None, "retries": 0, "timelimit": [None, None], **extra}
                headers = {k: v for k, v in headers.items() if not (k == "id" and v is None)}
                producer.publish(json.dumps([[], {"request": request}, {}]), routing_key=settings.queue, exchange="",
                                 headers=headers, content_type="application/json", content_encoding="utf-8",
                                 declare=[Queue(settings.queue)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and get_job(ids["last"], settings=settings)["state"] == "not_found":
            time.sleep(0.3)
        log = (tmp_path / "worker1.log").read_text()
        assert get_job(ids["last"], settings=settings)["state"] != "not_found", log[-3000:]
        assert "Unrecoverable error" not in log and "Connection to broker lost" not in log, log[-3000:]
        assert "task message without an id (task 'kie_extend.extend') acknowledged and discarded" in log
        for name, why in (("int-id", "the 'id' header must be a non-empty string"),
                          ("timelimit", "the 'timelimit' header must be [soft, hard] seconds"),
                          ("retries", "the 'retries' header must be a non-negative integer")):
            # An id that is not a string is outside the id grammar: recorded under its derived id.
            job_id = derived_job_id(4711) if name == "int-id" else ids[name]
            rec = get_job(job_id, settings=settings)
            assert rec["state"] == "failed" and why in rec["error"]["message"], (name, rec)
        assert redis.Redis.from_url(settings.redis_url).llen(settings.queue) == 0


@pytest.mark.parametrize("argv", [["doctor", "--grace", "nan"], ["doctor", "--grace", "-5"],
                                  ["batch", "status", "b", "--timeout", "nan"], ["batch", "status", "b", "--interval", "-1"],
                                  ["demo", "--time-factor", "nan"], ["dev", "--sim-time-factor", "0"]])
def test_duration_flags_refuse_nan_infinity_and_negatives(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``doctor --repair --grace -5`` would have repaired jobs in the middle of a transition."""
    from kie_extend.cli.commands import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"argument {argv[-2]}: must be a finite number" in capsys.readouterr().err
