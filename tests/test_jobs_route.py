"""The createTask route: the pure translation, JobsClient against the simulator, and a pipeline run
with ``route="jobs"`` (in process, inline dispatcher, private Valkey)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from inline import Harness
from kie_extend.provider.client import KieClient, TaskRecord
from kie_extend.provider.jobs_route import CREATE_TASK_PATH, JOB_MODEL, JobsClient, parse_job_record, to_create_task
from kie_extend.errors import InvalidRequestError
from kie_extend.infra.runtime import Runtime
from kie_extend.simulator import SimConfig, SimServer, serve

CB = "http://127.0.0.1:9/kie/callback/jobs-test"


def legacy_body(sim: SimServer, **extra: Any) -> dict[str, Any]:
    body = {"uploadUrl": f"{sim.url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 3, "model": "V6", "style": "indie folk", "title": "Demo", "prompt": "[Verse]\nla la",
            "callBackUrl": CB}
    body.update(extra)
    return body


# ----- to_create_task --------------------------------------------------------------------------------

FULL = {
    "uploadUrl": "https://files.example.org/a.mp3", "defaultParamFlag": True, "instrumental": False,
    "continueAt": 42.5, "model": "V6", "callBackUrl": "https://worker.example.org/kie/callback/1",
    "prompt": "[Verse]\nThe road", "style": "indie folk", "title": "Demo (Extended)", "negativeTags": "metal",
    "vocalGender": "f", "styleWeight": 0.65, "weirdnessConstraint": 0.3, "audioWeight": 0.7,
    "personaId": "p-1", "personaModel": "style_persona",
}


def test_custom_mode_with_vocals_sends_lyrics_with_snake_case_keys() -> None:
    before = copy.deepcopy(FULL)
    out = to_create_task(FULL)
    assert FULL == before  # pure
    assert out == {
        "model": JOB_MODEL,
        "callBackUrl": "https://worker.example.org/kie/callback/1",
        "input": {
            "upload_url": "https://files.example.org/a.mp3", "instrumental": False, "continue_at": 42.5,
            "model": "V6", "title": "Demo (Extended)", "style": "indie folk", "lyrics": "[Verse]\nThe road",
            "negative_tags": "metal", "vocal_gender": "f", "style_weight": 0.65, "weirdness_constraint": 0.3,
            "audio_weight": 0.7, "persona_id": "p-1", "persona_model": "style_persona",
        },
    }


def test_instrumental_custom_mode_sends_prompt() -> None:
    inp = to_create_task({**FULL, "instrumental": True})["input"]
    assert inp["prompt"] == "[Verse]\nThe road" and "lyrics" not in inp and inp["instrumental"] is True


def test_default_mode_sends_prompt_and_drops_the_flag() -> None:
    body = {"uploadUrl": "https://f.example.org/a.mp3", "defaultParamFlag": False, "instrumental": False,
            "model": "V6_MINI", "callBackUrl": "https://w.example.org/cb", "prompt": "keep the groove",
            "continueAt": 10}
    out = to_create_task(body)
    assert out["input"] == {"upload_url": "https://f.example.org/a.mp3", "instrumental": False,
                            "model": "V6_MINI", "prompt": "keep the groove", "continue_at": 10}
    assert "defaultParamFlag" not in json.dumps(out) and "default_param_flag" not in json.dumps(out)


def test_custom_mode_without_instrumental_counts_as_vocals() -> None:
    inp = to_create_task({"uploadUrl": "https://f.example.org/a.mp3", "defaultParamFlag": True, "model": "V6",
                          "prompt": "words"})["input"]
    assert inp == {"upload_url": "https://f.example.org/a.mp3", "model": "V6", "lyrics": "words"}


def test_none_values_are_never_sent_and_unknown_fields_pass_through_snake_cased() -> None:
    out = to_create_task({"uploadUrl": "https://f.example.org/a.mp3", "defaultParamFlag": False, "model": "V6",
                          "instrumental": None, "prompt": None, "title": None, "callBackUrl": None,
                          "styleWeight": None, "variety": 2, "someNewField": "x"})
    assert out == {"model": JOB_MODEL, "input": {"upload_url": "https://f.example.org/a.mp3", "model": "V6",
                                                 "variety": 2, "some_new_field": "x"}}


# ----- parse_job_record (pure) -------------------------------------------------------------------------

def test_parse_job_record_states_and_fail_codes() -> None:
    assert parse_job_record({"state": "waiting"}).status == "PENDING"
    assert parse_job_record({"state": "queuing"}).status == "PENDING"
    running = parse_job_record({"state": "generating"})
    assert running.status == "GENERATING" and not running.finished
    assert not parse_job_record({"state": "somethingNew"}).finished
    refunded = parse_job_record({"state": "fail", "failCode": "400", "failMsg": "Failed, please try again later."})
    assert refunded.failed and refunded.error_code == 531 and "try again later" in (refunded.error_message or "")
    copyrighted = parse_job_record({"state": "fail", "failCode": 400,
                                    "failMsg": "lyrics contained copyrighted material"})
    assert copyrighted.failed and copyrighted.error_code == 400
    assert parse_job_record({"state": "fail", "failCode": ""}).error_code is None
    ok = parse_job_record({"state": "success", "resultJson": json.dumps({"data": [{"id": "a", "audio_url": "u"}]}),
                           "param": json.dumps({"model": JOB_MODEL, "callBackUrl": "cb", "input": {}})})
    assert ok.status == "SUCCESS" and ok.tracks[0]["audio_url"] == "u" and ok.param and ok.param["callBackUrl"] == "cb"
    nested = parse_job_record({"state": "success", "param": json.dumps({"input": {"callBackUrl": "cb2"}}),
                               "resultJson": json.dumps({"response": {"sunoData": [{"id": "b", "audioUrl": "v"}]}})})
    assert nested.tracks[0]["audio_url"] == "v" and nested.param and nested.param["callBackUrl"] == "cb2"


# ----- JobsClient against the simulator ----------------------------------------------------------------

@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = serve(SimConfig(time_factor=0.02, seed=7, callbacks=False))
    yield server
    server.stop()


@pytest.fixture
def client(sim: SimServer) -> JobsClient:
    return JobsClient(sim.url, "test-key")


def poll_until_finished(client: KieClient, task_id: str, timeout: float = 10) -> tuple[TaskRecord, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        record = client.record_info(task_id)
        if not seen or seen[-1] != record.status:
            seen.append(record.status)
        if record.finished:
            return record, seen
        assert time.monotonic() < deadline, f"task {task_id} not finished: {seen}"
        time.sleep(0.35)  # under the simulator's 3 polls/s per task


def test_submit_and_poll_through_to_success(sim: SimServer, client: JobsClient) -> None:
    task_id = client.submit_extend(legacy_body(sim))
    record, seen = poll_until_finished(client, task_id)
    assert seen[0] == "PENDING" and "GENERATING" in seen and seen[-1] == "SUCCESS"
    assert record.task_id == task_id and len(record.tracks) == 2
    assert all(t["audio_url"] and t["id"] and t["title"] == "Demo" for t in record.tracks)
    assert all(t["prompt"] == "[Verse]\nla la" for t in record.tracks)  # sent as input.lyrics
    assert record.param and record.param["callBackUrl"] == CB and record.param["input"]["lyrics"] == "[Verse]\nla la"
    stats = sim.simulator.stats_snapshot()
    assert stats["submissions_accepted"] == 1 and stats["submissions_by_callback_url"] == {CB: 1}
    assert stats["requests"]["POST /api/v1/jobs/createTask"] == 1
    assert "POST /api/v1/generate/upload-extend" not in stats["requests"]


def test_both_result_json_shapes_are_parsed(sim: SimServer, client: JobsClient) -> None:
    ids = [client.submit_extend(legacy_body(sim, instrumental=True)) for _ in range(2)]
    shapes = set()
    for task_id in ids:
        record, _ = poll_until_finished(client, task_id)
        time.sleep(1.05)  # a fresh per-task poll window for the raw look
        raw = requests.get(f"{sim.url}/api/v1/jobs/recordInfo", params={"taskId": task_id},
                           headers={"Authorization": "Bearer k"}, timeout=10).json()["data"]
        assert raw["state"] == "success" and isinstance(raw["resultJson"], str) and isinstance(raw["param"], str)
        assert {"costTime", "createTime", "completeTime", "failCode", "failMsg"} <= set(raw)
        inner = json.loads(raw["resultJson"])
        shapes.add("sunoData" if "sunoData" in inner else "data")
        expected = [take.id for take in sim.simulator.tasks[task_id].takes]
        assert [t["id"] for t in record.tracks] == expected
        assert all(t["audio_url"] and t["stream_audio_url"] and t["duration"] for t in record.tracks)
    assert shapes == {"data", "sunoData"}


def test_fail_state_maps_fail_codes(sim: SimServer, client: JobsClient) -> None:
    sim.simulator.update_config({"fault_generation_fail": 1.0})
    refunded = client.submit_extend(legacy_body(sim))
    plain = client.submit_extend(legacy_body(sim))
    sim.simulator.tasks[refunded].fail_code = 400  # "… please try again later": refunded upstream failure
    sim.simulator.tasks[plain].fail_code = 501
    r1, _ = poll_until_finished(client, refunded)
    r2, _ = poll_until_finished(client, plain)
    assert r1.failed and r1.status == "GENERATE_AUDIO_FAILED" and r1.error_code == 531 and r1.tracks == []
    assert r2.failed and r2.error_code == 501 and r2.error_message == "Audio generation failed."


def test_unknown_task_is_a_422(sim: SimServer, client: JobsClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.record_info("0" * 32)
    assert info.value.code == 422 and "recordInfo is null" in info.value.msg


def test_each_route_sees_only_its_own_tasks(sim: SimServer, client: JobsClient) -> None:
    task_id = client.submit_extend(legacy_body(sim))
    with pytest.raises(InvalidRequestError):
        KieClient(sim.url, "k").record_info(task_id)


def test_top_level_model_mistake_is_refused(sim: SimServer, client: JobsClient) -> None:
    wrong = {"model": "V6", "callBackUrl": CB, "input": {"upload_url": f"{sim.url}/files/source/30s.mp3"}}
    with pytest.raises(InvalidRequestError) as info:
        client._call("POST", CREATE_TASK_PATH, data=json.dumps(wrong))
    assert info.value.code == 422 and JOB_MODEL in info.value.msg
    assert sim.simulator.stats_snapshot()["submissions_accepted"] == 0


def test_create_task_validation(sim: SimServer, client: JobsClient) -> None:
    with pytest.raises(InvalidRequestError, match="discontinued"):
        client.submit_extend(legacy_body(sim, model="V5"))
    with pytest.raises(InvalidRequestError, match="variety"):
        client.submit_extend(legacy_body(sim, variety=5))
    with pytest.raises(InvalidRequestError, match="continue_at"):
        client.submit_extend(legacy_body(sim, continueAt=30))  # the source is 30 s long
    with pytest.raises(InvalidRequestError, match="title is too long"):
        client.submit_extend(legacy_body(sim, title="x" * 101))
    sim.simulator.update_config({"jobs_accept_legacy_models": True})
    assert client.submit_extend(legacy_body(sim, model="V5", variety=4))
    no_callback = {k: v for k, v in legacy_body(sim).items() if k != "callBackUrl"}
    task_id = client.submit_extend(no_callback)  # callBackUrl is optional on this route
    assert sim.simulator.tasks[task_id].callback_url == ""


def test_callbacks_carry_task_id_at_both_places(sim: SimServer, client: JobsClient) -> None:
    task_id = client.submit_extend(legacy_body(sim))
    body = sim.simulator.tasks[task_id].callback_body("complete")
    assert body["taskId"] == task_id and body["data"]["task_id"] == task_id and len(body["data"]["data"]) == 2
    assert "audio_url" in body["data"]["data"][0]


def test_runtime_picks_the_adapter(make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(Runtime(make_settings()).client) is KieClient
    assert type(Runtime(make_settings(route="jobs")).client) is JobsClient
    monkeypatch.setenv("KIE_ROUTE", "jobs")
    assert make_settings().route == "jobs"


# ----- the pipeline on the jobs route (tests/inline.py drives it in this process) ------------------------

@pytest.fixture
def harness(make_settings: Callable[..., Any], sim: SimServer) -> Harness:
    settings = make_settings(base_url=sim.url, route="jobs", poll_first=0.2, poll_interval=0.4,
                             poll_max_interval=0.4, poll_min_gap=0.0, handler_retry_base=0.05, lease=5,
                             connect_timeout=1, read_timeout=3, poll_callback_interval=0.4)
    return Harness(Runtime(settings), sim)


def test_pipeline_on_the_jobs_route(harness: Harness) -> None:
    h = harness
    body = legacy_body(h.sim)
    del body["callBackUrl"]  # the pipeline fills in the job's own callback URL
    job = h.accept(body)
    h.run_until(h.finished(job))
    raw = h.state(job)
    assert raw["state"] == "succeeded", raw.get("error")
    assert raw["kie_status"] == "SUCCESS" and len(json.loads(raw["tracks"])) == 2
    stats = h.sim.simulator.stats_snapshot()
    assert stats["submissions_accepted"] == 1
    assert stats["requests"]["POST /api/v1/jobs/createTask"] == 1
    assert stats["submissions_by_callback_url"] == {json.loads(raw["request"])["callBackUrl"]: 1}
    task = h.sim.simulator.tasks[raw["kie_task_id"]]
    assert task.body["input"]["model"] == "V6" and "defaultParamFlag" not in task.body["input"]


def test_pipeline_on_the_jobs_route_classifies_a_failed_task(harness: Harness) -> None:
    h = harness
    h.sim.simulator.update_config({"fault_generation_fail": 1.0})
    job = h.accept(legacy_body(h.sim))
    h.run_until(h.finished(job))
    raw = h.state(job)
    err = json.loads(raw["error"])
    assert raw["state"] == "failed" and err["kind"] == "generation_failed"
    assert err["code"] in (531, 500, 501) and raw["kie_status"] == "GENERATE_AUDIO_FAILED"
