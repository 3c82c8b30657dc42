"""The typed job record (store/record.py): every field, missing ones, garbled ones, legacy records,
and the store's get_record against a real Valkey."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from kie_extend.infra.runtime import Runtime
from kie_extend.jobs.events import build_event, status_record
from kie_extend.jobs.states import JobState
from kie_extend.store.record import DEFAULT_PRIORITY, EMPTY, JobRecord, as_record, encode_overlay

#: A succeeded job's hash with every field the pipeline and the store's scripts write.
FULL = {
    "job_id": "job-1",
    "state": "succeeded",
    "state_ts": "1700000100.5",
    "op": "abc123",
    "request": '{"uploadUrl":"https://x/a.mp3","prompt":"p","callBackUrl":"https://cb/kie/callback/job-1"}',
    "metadata": '{"order":7}',
    "idempotency_key": "key-1",
    "msg_sha": "d1g3st",
    "tenant": "acme",
    "priority": "2",
    "batch_id": "b-1",
    "not_after": "1700003600",
    "rq": "2|acme",
    "created_at": "2023-11-14T22:13:20.000Z",
    "created_ts": "1700000000.25",
    "submitted_at": "2023-11-14T22:13:30.000Z",
    "submitted_ts": "1700000010",
    "finished_at": "2023-11-14T22:15:00.000Z",
    "submit_started_ts": "1700000009.5",
    "last_poll_ts": "1700000090",
    "poll_lease": "1700000120",
    "poll_interval": "22.5",
    "attempts": "1",
    "sends": "2",
    "polls": "4",
    "retried": "1",
    "regenerations": "1",
    "unreached": "3",
    "empty_success": "2",
    "kie_task_id": "task-9",
    "kie_status": "SUCCESS",
    "hint_task_id": "task-9",
    "tracks": '[{"id":"t1","audio_url":"https://cdn/t1.mp3","duration":61.2}]',
    "admitted": "17",
    "outcome_unknown": "1",
    "callbacks_seen": "1",
    "submit_error": "connect timeout",
    "error": '{"kind":"generation_failed","message":"m","code":501}',
    "event": '{"event":"job.succeeded","job_id":"job-1"}',
    "handler:log": '{"state":"delivered","attempts":1}',
    "handler:webhook": '{"state":"pending","attempts":0}',
    "history": '[[1700000000.25,"","queued"],[1700000009.5,"queued","submitting"]]',
    "duplicate_of": "job-0",
    "some_future_field": "kept",
}


def test_every_field_is_parsed_to_its_type() -> None:
    rec = JobRecord.from_hash(FULL)
    assert rec.job_id == "job-1"
    assert rec.state is JobState.SUCCEEDED and rec.state_text == "succeeded"
    assert rec.state_ts == 1700000100.5 and rec.op == "abc123"
    assert rec.request == {"uploadUrl": "https://x/a.mp3", "prompt": "p",
                           "callBackUrl": "https://cb/kie/callback/job-1"}
    assert rec.request_text == FULL["request"] and rec.request_value == rec.request
    assert rec.metadata == {"order": 7}
    assert (rec.idempotency_key, rec.msg_sha, rec.duplicate_of) == ("key-1", "d1g3st", "job-0")
    assert (rec.tenant, rec.priority, rec.batch_id, rec.rq) == ("acme", 2, "b-1", "2|acme")
    assert rec.not_after == 1700003600.0
    assert (rec.created_at, rec.submitted_at, rec.finished_at) == (
        "2023-11-14T22:13:20.000Z", "2023-11-14T22:13:30.000Z", "2023-11-14T22:15:00.000Z")
    assert (rec.created_ts, rec.submitted_ts, rec.submit_started_ts) == (1700000000.25, 1700000010.0, 1700000009.5)
    assert (rec.last_poll_ts, rec.poll_lease, rec.poll_interval) == (1700000090.0, 1700000120.0, 22.5)
    assert (rec.attempts, rec.sends, rec.polls, rec.retried, rec.regenerations, rec.unreached,
            rec.empty_success) == (1, 2, 4, 1, 1, 3, 2)
    assert all(isinstance(n, int) for n in (rec.attempts, rec.sends, rec.polls))
    assert (rec.kie_task_id, rec.kie_status, rec.hint_task_id) == ("task-9", "SUCCESS", "task-9")
    assert rec.tracks == ({"id": "t1", "audio_url": "https://cdn/t1.mp3", "duration": 61.2},)
    assert rec.admitted == "17" and rec.outcome_unknown is True and rec.callbacks_seen is True
    assert rec.submit_error == "connect timeout"
    assert rec.error == {"kind": "generation_failed", "message": "m", "code": 501}
    assert rec.error_kind == "generation_failed" and rec.invalid_fields == []
    assert rec.event == {"event": "job.succeeded", "job_id": "job-1"}
    assert rec.handlers == {"log": {"state": "delivered", "attempts": 1}, "webhook": {"state": "pending", "attempts": 0}}
    assert list(rec.handlers) == ["log", "webhook"]
    assert rec.history == ((1700000000.25, "", "queued"), (1700000009.5, "queued", "submitting"))
    assert rec.raw == FULL and rec.raw["some_future_field"] == "kept"  # unknown fields stay readable
    assert rec.exists and not rec.is_pointer


def test_every_field_of_the_record_is_covered_by_the_full_hash() -> None:
    """A field added to JobRecord must be written in FULL above (and so tested)."""
    rec = JobRecord.from_hash(FULL)
    for f in dataclasses.fields(JobRecord):
        if f.name != "raw":
            assert getattr(rec, f.name) != getattr(EMPTY, f.name), f"{f.name} is not exercised by FULL"


def test_missing_fields_take_their_defaults() -> None:
    rec = JobRecord.from_hash({})
    assert rec == EMPTY and not rec.exists
    assert rec.state is None and rec.state_text is None and rec.job_id is None
    assert rec.request is None and rec.request_value == {} and rec.request_text is None
    assert rec.metadata == {} and rec.error is None and rec.event is None and rec.error_kind is None
    assert rec.tracks == () and rec.handlers == {} and rec.history == ()
    assert (rec.attempts, rec.sends, rec.polls, rec.retried) == (0, 0, 0, 0)
    assert rec.priority == DEFAULT_PRIORITY and rec.tenant is None and rec.batch_id is None
    assert rec.created_ts is None and rec.not_after is None and rec.poll_interval is None
    assert rec.outcome_unknown is False and rec.callbacks_seen is False and rec.admitted is None


def test_each_parser_of_an_absent_field_gives_the_attribute_default() -> None:
    """from_hash parses only the fields a hash holds: that is the same record only while every
    parser, given a hash without its field, returns the attribute's own default."""
    from kie_extend.store.record import _PARSERS

    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(JobRecord)}
    for key, entries in _PARSERS.items():
        for attr, parse in entries:
            assert parse({}) == defaults[attr], f"{key} -> {attr}"
            assert parse({"other": "1"}) == defaults[attr], f"{key} -> {attr}"


def test_unknown_fields_are_kept_raw_only() -> None:
    rec = JobRecord.from_hash({"state": "queued", "someday": "x", "handler:b": '{"state":"delivered"}',
                               "handler:a": "{}"})
    assert rec.state is JobState.QUEUED and rec.raw["someday"] == "x"
    assert list(rec.handlers) == ["a", "b"] and rec.handlers["b"] == {"state": "delivered"}


def test_empty_text_reads_as_absent() -> None:
    rec = JobRecord.from_hash({k: "" for k in FULL})
    for f in dataclasses.fields(JobRecord):
        if f.name not in ("raw", "state_text", "request_text", "handlers"):
            assert getattr(rec, f.name) == getattr(EMPTY, f.name), f.name
    assert rec.state_text == "" and rec.state is None  # stored empty, not absent
    assert rec.handlers == {"log": {}, "webhook": {}}  # a handler named on the record is listed, as before
    assert rec.request is None and rec.request_value == {}


@pytest.mark.parametrize("text", ["x", "1.5", "nan", "1e3", " ", "--1", "0x10"])
def test_garbled_counters_read_as_zero(text: str) -> None:
    rec = JobRecord.from_hash({"attempts": text, "polls": text, "sends": text, "retried": text})
    assert (rec.attempts, rec.polls, rec.sends, rec.retried) == (0, 0, 0, 0)


def test_counters_accept_what_int_accepts() -> None:
    rec = JobRecord.from_hash({"attempts": " 3 ", "polls": "-1", "priority": "0"})
    assert (rec.attempts, rec.polls, rec.priority) == (3, -1, 0)


@pytest.mark.parametrize("text", ["x", "nan", "inf", "-inf", "1e400", "1,5"])
def test_garbled_or_infinite_times_read_as_absent(text: str) -> None:
    rec = JobRecord.from_hash({name: text for name in ("created_ts", "submitted_ts", "not_after", "last_poll_ts",
                                                       "poll_lease", "poll_interval", "state_ts")})
    assert (rec.created_ts, rec.submitted_ts, rec.not_after, rec.last_poll_ts, rec.poll_lease, rec.poll_interval,
            rec.state_ts) == (None,) * 7


def test_garbled_priority_reads_as_the_default() -> None:
    assert JobRecord.from_hash({"priority": "high"}).priority == DEFAULT_PRIORITY


def test_garbled_json_reads_as_its_default() -> None:
    rec = JobRecord.from_hash({"request": "{not json", "metadata": "{", "error": "oops", "tracks": "[1,",
                               "event": "{", "handler:log": "nope", "history": "[[1"})
    assert rec.request is None and rec.request_value == {}
    assert rec.metadata == {} and rec.error is None and rec.tracks == () and rec.event is None
    assert rec.handlers == {"log": {}} and rec.history == ()
    assert rec.raw["request"] == "{not json"  # still there for doctor and the invariants


def test_json_of_the_wrong_shape() -> None:
    rec = JobRecord.from_hash({"request": "[1,2]", "tracks": '{"id":"t"}', "event": "[1]", "error": '"text"',
                               "metadata": "[1]",
                               "history": '[[1,"","queued"],"x",[2],["y","queued","failed"],[3,null,"failed"]]'})
    assert rec.request is None and rec.request_value == [1, 2]  # events carry the stored value as is
    assert rec.tracks == () and rec.event is None
    assert rec.error == "text" and rec.error_kind is None and rec.invalid_fields == []
    assert rec.metadata == [1]
    assert rec.history == ((1.0, "", "queued"), (3.0, "", "failed"))
    assert JobRecord.from_hash({"tracks": '[{"id":"a"},1,"b",null]'}).tracks == ({"id": "a"},)


def test_invalid_fields_of_an_invalid_request() -> None:
    err = {"kind": "invalid_request", "message": "m", "errors": [{"field": "prompt", "message": "x"}]}
    rec = JobRecord.from_hash({"state": "failed", "error": json.dumps(err)})
    assert rec.error_kind == "invalid_request" and rec.invalid_fields == err["errors"]
    bare = JobRecord.from_hash({"error": json.dumps({"kind": "invalid_request", "message": "m"})})
    assert bare.invalid_fields == []


def test_legacy_and_unknown_states() -> None:
    pointer = JobRecord.from_hash({"job_id": "j2", "duplicate_of": "j1", "metadata": '{"a":1}',
                                   "created_at": "2024-01-01T00:00:00.000Z"})
    assert pointer.is_pointer and pointer.state is None and pointer.state_text is None
    assert not JobRecord.from_hash({"duplicate_of": "j1", "state": "queued"}).is_pointer
    odd = JobRecord.from_hash({"state": "paused-by-v0", "attempts": "2"})
    assert odd.state is None and odd.state_text == "paused-by-v0" and odd.attempts == 2
    # A record from before tenants, priorities and batches.
    old = JobRecord.from_hash({"job_id": "j3", "state": "queued", "request": "{}", "created_ts": "1"})
    assert (old.tenant, old.priority, old.batch_id, old.rq) == (None, DEFAULT_PRIORITY, None, None)


def test_flags_are_set_by_any_text() -> None:
    assert JobRecord.from_hash({"outcome_unknown": "1", "callbacks_seen": "true"}).callbacks_seen
    assert JobRecord.from_hash({"outcome_unknown": "0"}).outcome_unknown  # as stored text, any value sets it


def test_the_record_is_frozen_and_slotted() -> None:
    rec = JobRecord.from_hash(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.attempts = 3  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")
    rec.raw["x"] = "y"  # type: ignore[index]
    assert "x" not in FULL  # the record holds its own copy of the hash


def test_with_fields_reads_as_after_the_write() -> None:
    rec = JobRecord.from_hash({"state": "queued", "attempts": "1", "kie_status": "PENDING"})
    after = rec.with_fields({"attempts": 2, "error": {"kind": "x", "message": "m"}, "kie_status": None,
                             "tracks": [{"id": "t"}], "finished_at": "F"})
    assert after.attempts == 2 and after.error_kind == "x" and after.kie_status is None
    assert after.tracks == ({"id": "t"},) and after.finished_at == "F" and after.state is JobState.QUEUED
    assert rec.attempts == 1 and rec.kie_status == "PENDING"  # the original is unchanged
    assert encode_overlay({"a": "t", "b": None, "c": {"k": 1}, "d": 5}) == {"a": "t", "b": "", "c": '{"k": 1}', "d": "5"}


def test_as_record() -> None:
    rec = JobRecord.from_hash(FULL)
    assert as_record(rec) is rec and as_record(None) is None
    assert as_record(FULL) == rec


def test_public_shapes_are_the_same_from_a_hash_or_a_record() -> None:
    for raw in (FULL, {}, {"state": "failed", "error": "bad", "tracks": "x", "priority": "q", "not_after": "inf"}):
        rec = JobRecord.from_hash(raw)
        assert status_record(rec, "j") == status_record(raw, "j")
        fields = {"error": {"kind": "cancelled", "message": "m"}, "finished_at": "F"}
        assert build_event(rec, JobState.CANCELLED, fields) == build_event(raw, JobState.CANCELLED, fields)
    shown = status_record(JobRecord.from_hash(FULL), "job-1")
    assert shown["state"] == "succeeded" and shown["attempts"] == 1 and shown["priority"] == 2
    assert shown["not_after"] == "2023-11-14T23:13:20Z" and shown["tracks"][0]["duration"] == 61.2
    assert status_record({}, "j")["state"] == "queued"  # no state stored: shown as queued, as before


def test_get_record_reads_what_the_store_wrote(make_settings) -> None:
    rt = Runtime(make_settings())
    store = rt.store
    assert store.get_record("nope") is None
    now = time.time()
    assert store.transition("r1", JobState.QUEUED, expect=[None], fields={
        "job_id": "r1", "request": {"prompt": "p"}, "metadata": {"m": 1}, "created_ts": now, "attempts": 0,
        "tenant": "acme", "priority": 3, "not_after": now + 60})
    store.update("r1", callbacks_seen=1, poll_interval=12.5)
    rec = store.get_record("r1")
    assert rec is not None and rec.state is JobState.QUEUED
    assert rec.request == {"prompt": "p"} and rec.metadata == {"m": 1}
    assert rec.created_ts == pytest.approx(now) and rec.not_after == pytest.approx(now + 60)
    assert rec.tenant == "acme" and rec.priority == 3 and rec.callbacks_seen and rec.poll_interval == 12.5
    assert rec.history and rec.history[-1][1:] == ("", "queued") and rec.state_ts is not None
    assert rec.raw == store.get("r1")
    # A broken record is still readable: doctor and the invariants look at the raw hash.
    rt.redis.hset(rt.keys.job("r1"), mapping={"attempts": "many", "request": "{"})
    broken = store.get_record("r1")
    assert broken is not None and broken.attempts == 0 and broken.request is None
    assert broken.raw["attempts"] == "many"


@pytest.mark.parametrize("fields", [
    {},
    {"state": "failed", "error": {"kind": "timed_out", "message": "m"}, "finished_at": "F"},
    {"attempts": 0, "kie_task_id": None, "tracks": None, "last_poll_ts": None, "retried": 2, "event": None},
    {"handler:log": {"state": "dead", "attempts": 5}, "handler:new": {"state": "pending", "attempts": 0}},
    {"request": {"prompt": "q"}, "metadata": [1], "priority": "x", "not_after": float("inf"), "callbacks_seen": 1},
    {"job_id": "other", "history": [[1, "", "queued"]], "unknown_field": {"a": 1}},
])
def test_with_fields_is_from_hash_of_the_merged_hash(fields) -> None:
    for base in (FULL, {}, {"state": "queued", "tracks": "bad"}):
        rec = JobRecord.from_hash(base)
        merged = JobRecord.from_hash({**base, **encode_overlay(fields)})
        after = rec.with_fields(fields)
        assert after == merged and after.raw == merged.raw
        assert (after.event, after.history, after.request) == (merged.event, merged.history, merged.request)


def test_a_garbled_record_is_still_shown(make_settings) -> None:
    """get_job and the listing show a record with garbled fields instead of failing on it."""
    from kie_extend.api import get_job
    from kie_extend.jobs.listing import list_jobs

    settings = make_settings()
    rt = Runtime(settings)
    assert rt.store.transition("g1", JobState.QUEUED, expect=[None], fields={"job_id": "g1", "created_ts": time.time()})
    rt.redis.hset(rt.keys.job("g1"), mapping={"tracks": '{"not":"a list"}', "not_after": "inf", "attempts": "two",
                                              "priority": "high", "error": "{"})
    shown = get_job("g1", settings=settings)
    assert shown["state"] == "queued" and shown["tracks"] == [] and shown["not_after"] is None
    assert shown["attempts"] == 0 and shown["priority"] == DEFAULT_PRIORITY and shown["error"] is None
    page, _ = list_jobs(rt, state="queued")
    assert [r["job_id"] for r in page] == ["g1"] and page[0] == shown


def test_created_at_is_derived_from_created_ts_when_not_stored() -> None:
    assert JobRecord.from_hash({"created_ts": "1700000000.25"}).created_at == "2023-11-14T22:13:20.250Z"
    stored = JobRecord.from_hash({"created_ts": "1700000000.25", "created_at": "2023-11-14T22:13:20.000Z"})
    assert stored.created_at == "2023-11-14T22:13:20.000Z"  # records that kept it read it as stored
    assert JobRecord.from_hash({"created_ts": "nan"}).created_at is None
    assert JobRecord.from_hash({}).with_fields({"created_ts": 1700000000.25}).created_at == "2023-11-14T22:13:20.250Z"
