"""Messages name the cause: the field of a validation failure, the exact reason a retry or cancel
was refused (the same from the CLI as from the HTTP API), what a Celery message should have sent,
and a deadline already past. Pure functions are tested as such; the CLI runs as a real process and
the worker behaviour against a real Celery worker."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from inline import Harness, harness_factory, sample_request
from kie_extend.jobs.actions import not_found
from kie_extend.config import Settings
from kie_extend.errors import ValidationError, describe_error, describe_problems
from kie_extend.http.app import create_app
from kie_extend.http.auth import Auth, parse_tokens
from kie_extend.jobs.intake import EXTEND_KWARGS, kwargs_hint, past_deadline, unknown_kwarg_message
from kie_extend.simulator import SimConfig, SimServer, serve
from test_http_api import Served

BIN = Path(sys.executable).parent
WRITE = "w-" + uuid.uuid4().hex
READ = "r-" + uuid.uuid4().hex
CALLBACK_REASON = ("callBackUrl: the provider requires a callBackUrl: set KIE_CALLBACK_BASE_URL or put "
                   "callBackUrl in the request")


# -- pure ----------------------------------------------------------------------------------------

def test_describe_error_names_every_field_and_the_code_or_reason() -> None:
    invalid = {"kind": "invalid_request", "message": "request failed validation",
               "errors": [{"field": "continueAt", "message": "must be > 0"}, {"field": "title", "message": "required"}]}
    assert describe_error(invalid) == "invalid_request: continueAt: must be > 0; title: required"
    assert describe_error({"kind": "rejected", "message": "KIE said no", "code": 451}) == \
        "rejected (code 451): KIE said no"
    assert describe_error({"kind": "rejected", "message": "KIE code 404: gone", "code": 404}) == \
        "rejected: KIE code 404: gone"
    assert describe_error({"kind": "cancelled", "reason": "deadline", "message": "not_after passed"}) == \
        "cancelled (deadline): not_after passed"
    assert describe_error({"kind": "invalid_request", "message": "x",
                           "errors": [{"field": "message", "message": "unknown task name 'a'"}]}) == \
        "invalid_request: unknown task name 'a'"
    assert describe_error(None) == ""
    long = describe_problems([{"field": f"f{i}", "message": "m" * 50} for i in range(100)], limit=200)
    assert len(long) == 200 and long.endswith("…")
    assert "continueAt: must be > 0" in str(ValidationError(invalid["errors"]))


def test_unknown_kwargs_name_a_near_miss_and_every_accepted_kwarg() -> None:
    assert EXTEND_KWARGS == ("request", "idempotency_key", "metadata", "tenant", "priority", "batch_id",
                             "not_after", "steps", "takes")
    everything = "accepted: request, idempotency_key, metadata, tenant, priority, batch_id, not_after, steps, takes"
    for given, meant in (("idempotencyKey", "idempotency_key"), ("batchId", "batch_id"), ("Tenant", "tenant"),
                         ("notafter", "not_after"), ("meta_data", "metadata"), ("requests", "request")):
        assert unknown_kwarg_message(given) == f"unknown keyword argument; did you mean {meant}? {everything}"
    assert unknown_kwarg_message("colour") == f"unknown keyword argument; {everything}"
    assert kwargs_hint() == ("request=…, idempotency_key=…, metadata=…, tenant=…, priority=…, batch_id=…, "
                             "not_after=…, steps=…, takes=…")


def test_the_extend_task_takes_exactly_the_documented_kwargs(make_settings: Callable[..., Settings]) -> None:
    from kie_extend.worker import create_app as create_worker

    task = create_worker(make_settings()).tasks["kie_extend.extend"]
    params = inspect.signature(task.run).parameters
    named = tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    assert named == EXTEND_KWARGS


def test_a_past_deadline_says_when_and_why() -> None:
    now = 1_800_000_000.0
    assert past_deadline(now + 1, now) is None
    text = past_deadline(now - 300, now)
    assert text is not None and text.startswith("is already past (2027-01-15T07:55:00Z, 5 min ago)") and "5 min ago" in text
    assert "could never run" in text
    assert "3 days ago" in (past_deadline(now - 3 * 86400, now) or "")


def test_read_tokens_are_accepted_with_or_without_their_prefix_and_stay_read_only() -> None:
    auth = Auth(parse_tokens(f"{WRITE},read:{READ}"))
    for presented in (READ, f"read:{READ}"):
        p = auth.check(presented)
        assert p is not None and p.read_only, presented
    writer = auth.check(WRITE)
    assert writer is not None and not writer.read_only
    assert auth.check(f"read:{WRITE}") is None  # the prefix never names a token it was not set on
    assert auth.check(f"read:read:{READ}") is None and auth.check("read:") is None


# -- against a job store: the CLI and the HTTP API -------------------------------------------------

@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=5, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def harness(make_settings: Callable[..., Settings], sim: SimServer) -> Callable[..., Harness]:
    return harness_factory(make_settings, sim, api_tokens=f"{WRITE},read:{READ}")


def cli(settings: Settings, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "KIE_REDIS_URL": settings.redis_url, "KIE_KEY_PREFIX": settings.key_prefix,
           "KIE_QUEUE": settings.queue, "KIE_ALLOW_PRIVATE_URLS": "true"}
    return subprocess.run([str(BIN / "kie-extend"), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_one_line_status_and_jobs_show_the_failing_fields(harness: Callable[..., Harness]) -> None:
    h = harness(callback_base_url=None)
    no_callback = h.accept(sample_request(h.sim))
    bad = h.accept(sample_request(h.sim, continueAt=-4, title="x" * 120))
    assert h.state(no_callback)["state"] == h.state(bad)["state"] == "failed"
    status = cli(h.rt.settings, "status", no_callback)
    assert status.returncode == 0, status.stderr
    # The README's line for a missing KIE_CALLBACK_BASE_URL, as printed.
    assert status.stdout.strip() == f"{no_callback}  failed      error=invalid_request: {CALLBACK_REASON}"
    listing = cli(h.rt.settings, "jobs", "--state", "failed")
    line = next(x for x in listing.stdout.splitlines() if x.startswith(bad))
    assert "error=invalid_request: title: is 120 characters long" in line, line
    assert "; continueAt: must be greater than 0 seconds, got -4" in line, line
    # The record's own message names them too (dashboards, webhooks and batch results show it).
    record = json.loads(cli(h.rt.settings, "status", bad, "--json").stdout)
    assert record["error"]["message"].startswith("request failed validation: title: is 120 characters")


def test_retry_and_cancel_give_the_http_apis_exact_reason_and_exit_3_for_an_unknown_job(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    done = h.accept(sample_request(h.sim))
    h.run_until(h.finished(done))
    assert h.state(done)["state"] == "succeeded"
    invalid = h.accept(sample_request(h.sim, continueAt=-4))
    unknown = f"nope-{uuid.uuid4().hex[:8]}"
    served = Served(create_app(h.rt.settings, runtime=h.rt, dispatcher=h.dispatch))
    try:
        def api(action: str, job_id: str) -> tuple[int, dict[str, Any]]:
            r = requests.post(f"{served.url}/v1/jobs/{job_id}/{action}", headers={"Authorization": f"Bearer {WRITE}"},
                              timeout=10)
            return r.status_code, r.json()["error"]

        cases = [("retry", unknown, 404, 3, "not_found"), ("retry", done, 409, 1, "not_retryable"),
                 ("retry", invalid, 409, 1, "not_retryable"), ("cancel", unknown, 404, 3, "not_found"),
                 ("cancel", done, 409, 1, "finished")]
        for action, job_id, http_status, exit_code, kind in cases:
            status, error = api(action, job_id)
            assert (status, error["kind"]) == (http_status, kind), (action, job_id, error)
            run = cli(h.rt.settings, action, job_id)
            assert run.returncode == exit_code, (action, job_id, run.stdout, run.stderr)
            assert error["message"] in run.stdout + run.stderr, (error["message"], run.stdout, run.stderr)
            assert "Traceback" not in run.stderr
        assert api("retry", unknown)[1]["message"] == not_found(unknown)
        assert "is succeeded; only a failed job can be retried" in api("retry", done)[1]["message"]
        assert "failed on invalid fields (continueAt)" in api("retry", invalid)[1]["message"]
        status = cli(h.rt.settings, "status", unknown)
        assert status.returncode == 3 and "or a message no worker on queue" in status.stderr, status.stderr
        gone = cli(h.rt.settings, "cancel", "--batch", f"no-batch-{unknown}")
        assert gone.returncode == 3 and f"no batch no-batch-{unknown}" in gone.stderr
    finally:
        served.stop()


def test_a_not_after_already_past_is_refused_by_every_producer(harness: Callable[..., Harness],
                                                              tmp_path: Path) -> None:
    from kie_extend.api import enqueue_extend, enqueue_many

    h = harness()
    settings = h.rt.settings
    past = "2020-01-01T00:00:00Z"
    with pytest.raises(ValidationError) as exc:
        enqueue_extend(sample_request(h.sim), not_after=time.time() - 30, settings=settings)
    assert [e["field"] for e in exc.value.errors] == ["not_after"]
    assert exc.value.errors[0]["message"].startswith("is already past (")
    with pytest.raises(ValidationError) as exc:
        enqueue_many([{"request": sample_request(h.sim)}], not_after=past, settings=settings)
    assert exc.value.errors[0]["field"] == "[0].not_after"
    assert h.rt.redis.llen(settings.queue) == 0, "nothing was enqueued"

    served = Served(create_app(settings, runtime=h.rt, dispatcher=h.dispatch))
    try:
        r = requests.post(f"{served.url}/v1/jobs", headers={"Authorization": f"Bearer {WRITE}"}, timeout=10,
                          json={"request": sample_request(h.sim), "not_after": past})
        assert r.status_code == 422
        assert r.json()["error"]["errors"][0]["field"] == "not_after"
        assert "is already past (2020-01-01T00:00:00Z" in r.json()["error"]["errors"][0]["message"]
        ok = requests.post(f"{served.url}/v1/jobs", headers={"Authorization": f"Bearer {WRITE}"}, timeout=10,
                           json={"request": sample_request(h.sim), "not_after": "2099-01-01T00:00:00Z"})
        assert ok.status_code == 202, ok.text
    finally:
        served.stop()

    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({**sample_request(h.sim), "not_after": past}) + "\n")
    run = cli(settings, "batch", "submit", str(lines), "--dry-run")
    assert run.returncode == 2 and "line 1: not_after: is already past (2020-01-01T00:00:00Z" in run.stderr, run.stderr
    lines.write_text(json.dumps(sample_request(h.sim)) + "\n")
    run = cli(settings, "batch", "submit", str(lines), "--not-after", past, "--dry-run")
    assert run.returncode == 2 and "--not-after: is already past (2020-01-01T00:00:00Z" in run.stderr, run.stderr
    # The worker still takes such a message from any Celery producer: cancelled, reason deadline.
    late = h.accept(sample_request(h.sim), not_after=time.time() - 1)
    assert json.loads(h.state(late)["error"])["reason"] == "deadline"


def test_a_read_token_with_its_prefix_reads_and_cannot_write(harness: Callable[..., Harness]) -> None:
    h = harness()
    served = Served(create_app(h.rt.settings, runtime=h.rt, dispatcher=h.dispatch))
    try:
        for token in (READ, f"read:{READ}"):
            auth = {"Authorization": f"Bearer {token}"}
            assert requests.get(f"{served.url}/v1/system", headers=auth, timeout=10).status_code == 200
            assert requests.post(f"{served.url}/v1/pause", headers=auth, timeout=10).status_code == 403
        bad = requests.get(f"{served.url}/v1/system", headers={"Authorization": f"Bearer read:{WRITE}"}, timeout=10)
        assert bad.status_code == 401
        # The dashboard's login takes the same forms.
        for token, status in ((f"read:{READ}", 303), (READ, 303), (f"read:{WRITE}", 401)):
            r = requests.post(f"{served.url}/login", data={"token": token, "next": "/"},
                              headers={"Origin": served.url}, allow_redirects=False, timeout=10)
            assert r.status_code == status, (token[:5], r.status_code)
    finally:
        served.stop()


# -- a real worker: what a Celery message should have sent -----------------------------------------

def test_a_real_worker_names_every_kwarg_for_positional_args_unknown_kwargs_and_misnamed_tasks(
        valkey: Any, prefix: str, tmp_path: Path) -> None:
    from kie_extend.api import get_job, producer_app
    from kie_extend.cli.devstack import DevStack

    with DevStack(tmp_path, redis_url=valkey.url, key_prefix=prefix,
                  env={"KIE_QUEUE": prefix, "KIE_CALLBACK_BASE_URL": "http://127.0.0.1:9/unused",
                       "KIE_ALLOW_PRIVATE_URLS": "true"}) as stack:
        stack.start_worker(concurrency=1)
        settings = stack.settings()
        app = producer_app(settings)
        request = {"uploadUrl": "http://127.0.0.1:9/a.mp3", "defaultParamFlag": False, "model": "V5",
                   "prompt": "calm", "continueAt": 5}
        ids = {kind: f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("positional", "camel", "misnamed")}
        app.send_task("kie_extend.extend", task_id=ids["positional"], queue=settings.queue, args=[request])
        app.send_task("kie_extend.extend", task_id=ids["camel"], queue=settings.queue,
                      kwargs={"request": request, "idempotencyKey": "order-1"})
        app.send_task("kie_extend.Extend", task_id=ids["misnamed"], queue=settings.queue, kwargs={"request": request})
        deadline = time.monotonic() + 60
        recs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            recs = {k: get_job(j, settings=settings) for k, j in ids.items()}
            if all(r["state"] == "failed" for r in recs.values()):
                break
            time.sleep(0.3)
        log = (tmp_path / "worker1.log").read_text()
        assert all(r["state"] == "failed" for r in recs.values()), (recs, log[-3000:])

    everything = ", ".join(EXTEND_KWARGS)
    positional = recs["positional"]["error"]
    assert positional["errors"] == [{"field": "positional arguments", "message":
                                     f"positional arguments are not accepted; send keyword arguments: {kwargs_hint()}"}]
    assert "send keyword arguments: request=…, idempotency_key=…" in positional["message"]
    camel = recs["camel"]["error"]
    assert camel["errors"] == [{"field": "idempotencyKey", "message":
                                f"unknown keyword argument; did you mean idempotency_key? accepted: {everything}"}]
    misnamed = recs["misnamed"]["error"]["message"]
    assert "did you mean `kie_extend.extend`?" in misnamed and f"keyword arguments {everything}" in misnamed


def test_a_refused_bearer_token_is_told_why_without_echoing_it(harness: Callable[..., Harness]) -> None:
    h = harness()
    served = Served(create_app(h.rt.settings, runtime=h.rt, dispatcher=h.dispatch))
    try:
        def reason(headers: dict[str, str]) -> str:
            r = requests.get(f"{served.url}/v1/system", headers=headers, timeout=10)
            assert r.status_code == 401
            return str(r.json()["error"]["message"])

        assert "header is required" in reason({}) and "or the tenants file" in reason({})
        assert "must be 'Bearer <token>'" in reason({"Authorization": f"Token {WRITE}x"})
        assert "or the tenants file" in reason({"Authorization": f"Token {WRITE}x"})
        wrong = reason({"Authorization": f"Bearer {WRITE}x"})
        assert "not one of KIE_API_TOKENS" in wrong and WRITE not in wrong
        r = requests.post(f"{served.url}/v1/jobs", headers={"Authorization": f"Bearer {WRITE}"}, timeout=10,
                          json={"request": sample_request(h.sim, continueAt=-1)})
        assert r.status_code == 422
        assert r.json()["error"]["message"] == ("the request failed validation (1 problem(s)): continueAt: "
                                                "must be greater than 0 seconds, got -1")
        r = requests.post(f"{served.url}/v1/jobs", headers={"Authorization": f"Bearer {WRITE}"}, timeout=10,
                          json={"request": sample_request(h.sim), "idempotencyKey": "k"})
        assert r.status_code == 422 and r.json()["error"]["errors"] == [{"field": "idempotencyKey", "message": (
            "unknown field; did you mean idempotency_key? accepted: request, idempotency_key, metadata, tenant, "
            "priority, batch_id, not_after, steps, takes, job_id")}]
    finally:
        served.stop()
