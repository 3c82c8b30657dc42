"""The one id grammar (jobs/ids.py) at every entrance, on real processes: the Python API, the CLI, ``/v1``
on a real ``serve``, Celery messages through a real worker; key names that cannot collide;
listings that survive a bad record; text fields that refuse what KIE could not take."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from kie_extend.jobs import ids
from kie_extend.api import cancel, cancel_batch, enqueue_extend, enqueue_many, get_batch, get_job
from kie_extend.cli.batch import default_batch_id, job_id_for
from kie_extend.cli.devstack import DevStack
from kie_extend.errors import ValidationError
from kie_extend.store.keys import Keys

WRITE = "w-" + uuid.uuid4().hex

#: Ids users send today: they must all stay valid.
TODAY = [str(uuid.uuid4()), "songs-198d2040", "songs-198d2040-7", "demo-1", "job_1.v2", "A" * 128, "x"]
#: The reported breakages and their siblings: all refused.
BAD = ["x:jobs", ".", "..", "a/b", "bätch", "批次", "-flag", "_x", ".hidden", "a b", "a|b", "", "A" * 129,
       "a\ud800", "a\x00", "a\n", "%2e%2e", "a:b"]

# -- the grammar itself (no process) ---------------------------------------------------------------

ids_text = st.one_of(st.text(max_size=140), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,130}\Z"),
                     st.sampled_from(TODAY + BAD))


@pytest.mark.parametrize("value", TODAY)
def test_ids_users_send_today_stay_valid(value: str) -> None:
    assert ids.is_valid("job_id", value) and ids.is_valid("batch_id", value)


@pytest.mark.parametrize("value", BAD)
def test_reported_breakages_are_refused(value: str) -> None:
    for kind in ("job_id", "batch_id", "tenant"):
        assert not ids.is_valid(kind, value)
        assert ids.id_problem(kind, value) == {"field": kind, "message": ids.rule(kind)}


@hsettings(max_examples=300, deadline=None)
@given(ids_text)
def test_a_valid_id_round_trips_through_urls_headers_and_file_names(value: str) -> None:
    if not ids.is_valid("batch_id", value):
        return
    assert value not in (".", "..") and ":" not in value and "/" not in value and "|" not in value
    assert quote(value, safe="") == value  # a URL path segment as it is
    assert value.encode("ascii").decode("latin-1") == value  # an HTTP header value as it is
    assert not value.startswith("-")  # never read as a CLI flag
    assert Path(value).name == value  # a file name as it is


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_key_families_cannot_collide_whatever_the_ids(a: str, b: str) -> None:
    """Even for ids that slipped past the grammar: a batch's record and any batch's job list,
    and the batch index, are never the same key."""
    k = Keys("p")
    assert k.batch(a) != k.batch_jobs(b)
    assert k.batches not in (k.batch(a), k.batch_jobs(b))
    assert k.job(a) not in (k.batch(b), k.batch_jobs(b), k.idempotency(b, "default"), k.job_claim(b))
    if a != b:
        assert k.batch(a) != k.batch(b) and k.batch_jobs(a) != k.batch_jobs(b)


def test_file_derived_batch_ids_fit_the_grammar() -> None:
    for name in ("songs.jsonl", "_private.csv", "Sönγs 1.csv", "....csv", "-x-.jsonl", "a" * 300 + ".csv",
                 "x:jobs.jsonl", "a/b/c.csv"):
        b = default_batch_id(name, b"data")
        assert ids.is_valid("batch_id", b), (name, b)
        assert ids.is_valid("job_id", job_id_for(b, 100000))
    assert default_batch_id("songs.jsonl", b"x").startswith("songs-")


def test_text_problems_name_the_field() -> None:
    assert ids.text_problem("line\nbreak\ttab") is None
    assert ids.text_problem("a\ud800") and ids.text_problem("a\x00") and ids.text_problem("\x1b[31m")
    got = ids.text_problems({"a": ["ok", "\udc80"], "b": {"c": "\x07"}}, "metadata", controls=True)
    assert [p["field"] for p in got] == ["metadata.a[1]", "metadata.b.c"]
    # Metadata never goes to KIE: only what cannot be stored as text is refused there.
    got = ids.text_problems({"a": ["ok", "\udc80"], "b": {"c": "\x07"}}, "metadata")
    assert [p["field"] for p in got] == ["metadata.a[1]"]


def test_header_values_are_ascii() -> None:
    for raw in ("bätch:batch.finished", "批次:batch.finished", "a\ud800:job.failed", "plain-1:job.succeeded"):
        out = ids.header_value(raw)
        assert out.isascii() and out.isprintable()
    assert ids.header_value("plain-1:job.succeeded") == "plain-1:job.succeeded"


def test_webhook_idempotency_header_of_a_legacy_non_latin1_id_is_delivered(make_settings: Any) -> None:
    """A batch id an earlier version accepted (outside Latin-1) no longer makes every delivery fail."""
    from kie_extend.handlers.webhook import WebhookHandler

    seen: list[str] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.headers["Idempotency-Key"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        handler = WebhookHandler(make_settings(webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                                               handlers="webhook", webhook_timeout=5))
        handler.deliver({"event": "batch.finished", "batch_id": "批次"}, "批次:batch.finished")
    finally:
        server.shutdown()
    assert seen == [quote("批次".encode()) + ":batch.finished"]


# -- the Python API against a real store ------------------------------------------------------------

def test_python_api_refuses_bad_ids_and_text_and_looks_up_cleanly(make_settings: Any) -> None:
    settings = make_settings()
    req = {"uploadUrl": "https://files.example.org/a.mp3", "defaultParamFlag": True, "instrumental": True,
           "continueAt": 3, "model": "V5", "style": "jazz", "title": "T"}
    for field, value in (("batch_id", "x:jobs"), ("batch_id", "a/b"), ("batch_id", "bätch"), ("tenant", ".."),
                         ("job_id", "."), ("job_id", "..")):
        with pytest.raises(ValidationError) as exc:
            enqueue_extend(req, settings=settings, **{field: value})
        assert [e["field"] for e in exc.value.errors] == [field]
        with pytest.raises(ValidationError) as exc:
            enqueue_many([{"request": req, field: value}], settings=settings)
        assert [e["field"] for e in exc.value.errors] == [f"[0].{field}"]
    for field, bad in (("title", "a\ud800"), ("style", "nul\x00")):
        with pytest.raises(ValidationError) as exc:
            enqueue_extend({**req, field: bad}, settings=settings)
        assert [e["field"] for e in exc.value.errors] == [field]
    with pytest.raises(ValidationError) as exc:
        enqueue_extend(req, metadata={"note": "\udfff"}, settings=settings)
    assert [e["field"] for e in exc.value.errors] == ["metadata.note"]
    with pytest.raises(ValidationError) as exc:
        enqueue_extend(req, idempotency_key="k\x00", settings=settings)
    assert [e["field"] for e in exc.value.errors] == ["idempotency_key"]
    for bad in BAD:
        assert get_job(bad, settings=settings)["state"] == "not_found"
        assert get_batch(bad, settings=settings)["state"] == "not_found"
        assert cancel(bad, settings=settings) is False
        assert cancel_batch(bad, settings=settings) == 0


# -- real processes ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("ids")
    with DevStack(workdir, key_prefix=f"ids{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
                       "KIE_TICK_INTERVAL": "0.5s", "KIE_HANDLERS": "redis_stream"}) as st_:
        st_.start_simulator("--time-factor", "0.02", "--seed", "3")
        st_.api_url = st_.start_serve(tokens=WRITE)  # type: ignore[attr-defined]
        st_.start_worker(concurrency=2)
        st_.start_beat()
        yield st_


def _req(stack: DevStack, **extra: Any) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": True,
            "continueAt": 3, "model": "V5", "style": "jazz", "title": "T", **extra}


def _v1(stack: DevStack, method: str, path: str, **kw: Any) -> requests.Response:
    return requests.request(method, stack.api_url + path, headers={"Authorization": f"Bearer {WRITE}"},  # type: ignore[attr-defined]
                            timeout=20, **kw)


def _cli(stack: DevStack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", *args], env=stack.env, capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def _submissions(stack: DevStack) -> int:
    """Every submission the simulator received (accepted or not)."""
    return sum(stack.sim_stats()["submissions_by_callback_url"].values())  # type: ignore[union-attr]


def _wait(fn: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


def _send_foreign(stack: DevStack, task_id: str, request: dict[str, Any], **kwargs: Any) -> None:
    """A producer that never imports kie_extend: plain Celery, by name, JSON."""
    script = textwrap.dedent(f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={stack.redis_url!r})
        app.conf.task_serializer = "json"
        kw = json.loads(sys.argv[2])
        app.send_task("kie_extend.extend", kwargs={{"request": json.loads(sys.argv[1]), **kw}},
                      task_id=json.loads(sys.argv[3]), queue={stack.settings().queue!r})
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(request), json.dumps(kwargs),
                          json.dumps(task_id)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _listings_work(stack: DevStack, tmp_path: Path) -> None:
    r = _v1(stack, "GET", "/v1/batches")
    assert r.status_code == 200, r.text
    out = _cli(stack, "batch", "list", "--json", cwd=tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    s = requests.Session()
    origin = {"Origin": stack.api_url}  # type: ignore[attr-defined]
    s.post(stack.api_url + "/login", data={"token": WRITE, "next": "/batches"}, headers=origin, timeout=20)  # type: ignore[attr-defined]
    page = s.get(stack.api_url + "/batches", timeout=20)  # type: ignore[attr-defined]
    assert page.status_code == 200 and "/login" not in page.url, page.text[:500]


def test_batch_id_ending_in_jobs_is_refused_everywhere_and_listings_keep_working(stack: DevStack,
                                                                                tmp_path: Path) -> None:
    settings = stack.settings()
    before = _submissions(stack)
    base = f"b{uuid.uuid4().hex[:8]}"
    assert enqueue_extend(_req(stack), batch_id=base, settings=settings)
    r = _v1(stack, "POST", "/v1/jobs", json={"request": _req(stack), "batch_id": f"{base}:jobs"})
    assert r.status_code == 422 and "batch_id" in r.text, r.text
    with pytest.raises(ValidationError):
        enqueue_extend(_req(stack), batch_id=f"{base}:jobs", settings=settings)
    f = tmp_path / "songs.jsonl"
    f.write_text(json.dumps(_req(stack)) + "\n")
    out = _cli(stack, "batch", "submit", str(f), "--batch-id", f"{base}:jobs", cwd=tmp_path)
    assert out.returncode != 0 and "--batch-id" in out.stdout + out.stderr and "Traceback" not in out.stderr
    # Records an earlier version could have written: an id outside the grammar, and a batch name
    # holding a key of another type. Listings skip them.
    rc = redis.Redis.from_url(stack.redis_url)
    k = Keys(settings.key_prefix)
    rc.zadd(k.batches, {f"{base}:jobs": time.time() + 5, "legacy-wrongtype": time.time() + 5})
    rc.set(k.batch("legacy-wrongtype"), "not a hash")
    rc.zadd(k.batch_jobs("legacy-wrongtype"), {"j": 1})
    _listings_work(stack, tmp_path)
    listed = [b["batch_id"] for b in _v1(stack, "GET", "/v1/batches").json()["batches"]]
    assert base in listed and f"{base}:jobs" not in listed
    # The valid batch still finishes; only its own job was ever sent.
    _wait(lambda: get_batch(base, settings=settings).get("finished"), 60)
    assert _submissions(stack) == before + 1


def test_dot_slash_and_non_latin1_ids_are_refused_with_422(stack: DevStack) -> None:
    for body in ({"job_id": "."}, {"job_id": ".."}, {"batch_id": "a/b"}, {"batch_id": "bätch"},
                 {"batch_id": "批次"}, {"tenant": ".."}):
        r = _v1(stack, "POST", "/v1/jobs", json={"request": _req(stack), **body})
        assert r.status_code == 422, (body, r.text)
        assert [e["field"] for e in r.json()["error"]["errors"]] == list(body), r.text
    # Lookups of ids outside the grammar are clean 404s.
    for path in ("/v1/jobs/a:b", "/v1/batches/x:jobs", "/v1/batches/b%C3%A4tch", "/v1/jobs/%2E%2E%2E"):
        r = _v1(stack, "GET", path)
        assert r.status_code == 404, (path, r.status_code, r.text)
    r = _v1(stack, "POST", "/v1/batches/x:jobs/cancel")
    assert r.status_code == 404, r.text


def test_a_dotted_job_id_gets_its_callback_and_finishes(stack: DevStack) -> None:
    job_id = f"a.{uuid.uuid4().hex[:6]}.b"
    r = _v1(stack, "POST", "/v1/jobs", json={"request": _req(stack), "job_id": job_id})
    assert r.status_code == 202, r.text
    rec = _wait(lambda: (lambda x: x if x["state"] in ("succeeded", "failed") else None)(
        _v1(stack, "GET", f"/v1/jobs/{job_id}").json()), 60)
    assert rec["state"] == "succeeded", rec
    by_url = stack.sim_stats()["submissions_by_callback_url"]
    assert any(u.endswith(f"/kie/callback/{job_id}") for u in by_url)  # type: ignore[union-attr]


def test_unpaired_surrogate_in_title_is_refused_and_nothing_is_sent(stack: DevStack) -> None:
    before = _submissions(stack)
    raw = json.dumps({"request": _req(stack, title="x")}).replace('"title": "x"', '"title": "x\\ud800"')
    r = requests.post(stack.api_url + "/v1/jobs", data=raw.encode(), timeout=20,  # type: ignore[attr-defined]
                      headers={"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"})
    assert r.status_code == 422 and [e["field"] for e in r.json()["error"]["errors"]] == ["title"], r.text
    with pytest.raises(ValidationError):
        enqueue_extend(_req(stack, title="x\ud800"), settings=stack.settings())
    # A foreign producer's message: the worker fails it as invalid_request.
    job_id = f"sur-{uuid.uuid4().hex[:8]}"
    _send_foreign(stack, job_id, _req(stack, title="x\ud800", prompt="nul\x00"))
    rec = _wait(lambda: (lambda x: x if x["state"] != "not_found" else None)(get_job(job_id, settings=stack.settings())))
    assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
    assert {e["field"] for e in rec["error"]["errors"]} >= {"title"}
    time.sleep(1)
    assert _submissions(stack) == before


def test_a_foreign_message_with_a_bad_task_id_is_recorded_under_a_derived_id(stack: DevStack) -> None:
    settings = stack.settings()
    for raw in (f"x{uuid.uuid4().hex[:6]}:jobs", "..", f"ü-{uuid.uuid4().hex[:6]}"):
        _send_foreign(stack, raw, _req(stack))
        derived = ids.derived_job_id(raw)
        rec = _wait(lambda: (lambda x: x if x["state"] != "not_found" else None)(get_job(derived, settings=settings)))
        assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
        assert derived in rec["error"]["message"]
    rc = redis.Redis.from_url(stack.redis_url)
    assert int(rc.hget(Keys(settings.key_prefix).stats, "bad_job_ids") or 0) == 3


def test_an_unreadable_message_with_a_bad_task_id_is_recorded_under_a_derived_id(stack: DevStack) -> None:
    """The consumer's path (a body that is not JSON): never recorded under the bad id either."""
    from kombu import Connection, Queue

    raw = f"m{uuid.uuid4().hex[:6]}:jobs"
    queue = stack.settings().queue
    headers = {"lang": "py", "task": "kie_extend.extend", "argsrepr": "", "kwargsrepr": "", "origin": "test",
               "id": raw, "root_id": raw}
    with Connection(stack.redis_url) as conn:
        conn.Producer().publish(b"{not json", routing_key=queue, content_type="application/json",
                                content_encoding="utf-8", headers=headers, declare=[Queue(queue)], serializer=None)
    derived = ids.derived_job_id(raw)
    rec = _wait(lambda: (lambda x: x if x["state"] != "not_found" else None)(get_job(derived, settings=stack.settings())))
    assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
    assert raw in rec["error"]["message"] and "decoded" in rec["error"]["message"]
    rc = redis.Redis.from_url(stack.redis_url)
    assert not rc.exists(Keys(stack.settings().key_prefix).job(raw))
    assert int(rc.hget(Keys(stack.settings().key_prefix).stats, "bad_job_ids") or 0) == 4


def test_job_lists_of_an_earlier_version_move_at_start_up(stack: DevStack) -> None:
    from kie_extend.jobs.batches import migrate_legacy_job_lists
    from kie_extend.infra.runtime import Runtime

    settings = stack.settings()
    rt = Runtime(settings)
    b = f"old{uuid.uuid4().hex[:6]}"
    rt.redis.zadd(rt.keys.batches, {b: time.time()})
    rt.redis.hset(rt.keys.batch(b), "created_ts", repr(time.time()))
    rt.redis.zadd(rt.keys.legacy_batch_jobs(b), {"j1": 1, "j2": 2})
    assert migrate_legacy_job_lists(rt) >= 1
    assert not rt.redis.exists(rt.keys.legacy_batch_jobs(b))
    assert get_batch(b, settings=settings)["total"] == 2
    assert migrate_legacy_job_lists(rt) == 0


# -- the fuzz test: every entrance agrees with the grammar ---------------------------------------------

fuzz_ids = st.one_of(st.sampled_from(BAD + ["ok-1", "Z.z_9"]), st.text(min_size=1, max_size=12),
                     st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:/-]{0,10}\Z"))


@hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(value=fuzz_ids)
def test_fuzz_python_api_and_v1_agree_with_the_grammar(stack: DevStack, value: str) -> None:
    settings = stack.settings()
    valid = ids.is_valid("batch_id", value)
    try:
        enqueue_extend(_req(stack), batch_id=value, tenant=value, settings=settings)
        accepted = True
    except ValidationError as exc:
        accepted = False
        assert {e["field"] for e in exc.errors} == {"batch_id", "tenant"}
    assert accepted == valid, value
    try:
        body = json.dumps({"request": _req(stack), "job_id": f"{value}-{uuid.uuid4().hex[:6]}" if valid else value})
    except UnicodeEncodeError:
        return
    r = requests.post(stack.api_url + "/v1/jobs", data=body.encode(), timeout=20,  # type: ignore[attr-defined]
                      headers={"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"})
    assert r.status_code == (202 if valid else 422), (value, r.status_code, r.text)
    seg = quote(value.encode("utf-8", "surrogatepass"), safe="")
    for path in (f"/v1/jobs/{seg}", f"/v1/batches/{seg}"):
        got = _v1(stack, "GET", path)
        assert got.status_code in ((200, 404) if valid else (404,)), (path, got.status_code, got.text)


@hsettings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(value=st.one_of(st.sampled_from(["x:jobs", "..", "bätch", "ok-2"]), fuzz_ids))
def test_fuzz_cli_agrees_with_the_grammar(stack: DevStack, tmp_path_factory: Any, value: str) -> None:
    if "\x00" in value or not value.isprintable() or not value.strip() or any(0xD800 <= ord(c) < 0xE000 for c in value):
        return  # not passable as a command-line argument at all
    tmp = tmp_path_factory.mktemp("cli")
    f = tmp / "songs.jsonl"
    f.write_text(json.dumps(_req(stack)) + "\n")
    out = _cli(stack, "batch", "submit", str(f), f"--batch-id={value}", "--dry-run", cwd=tmp)
    assert "Traceback" not in out.stderr, out.stderr
    assert (out.returncode == 0) == ids.is_valid("batch_id", value), (value, out.stdout, out.stderr)
    out = _cli(stack, "status", "--json", "--", value, cwd=tmp)
    assert "Traceback" not in out.stderr and json.loads(out.stdout)["state"] == "not_found", out.stdout + out.stderr


@hsettings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(value=st.one_of(st.sampled_from(["x:jobs", "ok-3"]), fuzz_ids))
def test_fuzz_celery_message_task_ids(stack: DevStack, value: str) -> None:
    settings = stack.settings()
    raw = f"{value}{uuid.uuid4().hex[:4]}"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return  # a JSON message cannot carry it from a foreign producer's command line either
    _send_foreign(stack, raw, _req(stack))
    where = raw if ids.is_valid("job_id", raw) else ids.derived_job_id(raw)
    rec = _wait(lambda: (lambda x: x if x["state"] != "not_found" else None)(get_job(where, settings=settings)), 40)
    if where == raw:
        assert rec["error"] is None or rec["error"].get("kind") != "invalid_request", rec
    else:
        assert rec["state"] == "failed" and rec["error"]["kind"] == "invalid_request", rec
