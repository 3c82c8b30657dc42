"""Follow-up steps (WAV, stems, MIDI, video, lyrics): the plan's rules, and whole jobs run by real
Celery workers, beat and serve against the simulator's follow-up routes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from kie_extend.api import enqueue_extend, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.errors import ValidationError
from kie_extend.jobs.plan import check_plan, expand
from kie_extend.store.keys import Keys

ALL = [{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}, {"op": "midi"},
       {"op": "video", "author": "Ann", "domainName": "example.com"}, {"op": "lyrics"}]


# ----- the plan's rules ------------------------------------------------------------------------------

def test_a_good_plan_is_normalised() -> None:
    steps, takes, problems = check_plan(ALL, "first")
    assert problems == [] and takes == "first"
    assert steps == ALL
    assert check_plan([{"op": "wav"}], None) == ([{"op": "wav"}], "all", [])
    assert check_plan([{"op": "wav", "type": None, "author": None}], None) == ([{"op": "wav"}], "all", [])
    assert check_plan(None, "first") == (None, "first", [])


@pytest.mark.parametrize("steps,takes,field,text", [
    ([{"op": "karaoke"}], None, "steps[0].op", "must be one of wav, stems, midi, video, lyrics"),
    ([{"op": {}}], None, "steps[0].op", "must be one of"),
    ([{"op": "wav", "type": "split_stem"}], None, "steps[0].type", "is not a field of the wav step"),
    ([{"op": "stems"}], None, "steps[0].type", "is required"),
    ([{"op": "stems", "type": "split_stem_advanced"}], None, "steps[0].type", "must be one of"),
    ([{"op": "midi"}], None, "steps[0].op", "put a stems step before it"),
    ([{"op": "midi"}, {"op": "stems", "type": "split_stem"}], None, "steps[0].op", "before it"),
    ([{"op": "video", "author": "a" * 51}], None, "steps[0].author", "at most 50"),
    ([{"op": "wav", "format": "flac"}], None, "steps[0].format", "is not a field of the wav step"),
    ([{"op": "wav"}, {"op": "wav"}], None, "steps[1].op", "asked for twice"),
    ([], None, "steps", "non-empty array"),
    ({"op": "wav"}, None, "steps", "non-empty array"),
    (["wav"], None, "steps[0]", "must be an object"),
    ([{"op": "wav"}], "both", "takes", "'all' or 'first'"),
])
def test_a_bad_plan_names_the_field(steps: Any, takes: Any, field: str, text: str) -> None:
    _, _, problems = check_plan(steps, takes)
    assert any(p["field"] == field and text in p["message"] for p in problems), problems


def test_expand_makes_one_entry_per_step_and_take_with_midi_after_its_stems() -> None:
    entries = expand(ALL, "all", ["a1", "a2"])
    assert [(e["op"], e["take"], e["audio_id"]) for e in entries] == [
        (op, t, a) for t, a in enumerate(["a1", "a2"]) for op in ("wav", "stems", "midi", "video", "lyrics")]
    assert entries[2]["after"] == 1 and entries[7]["after"] == 6
    assert [e["take"] for e in expand(ALL, "first", ["a1", "a2"])] == [0] * 5


# ----- whole jobs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("steps")
    with DevStack(workdir, key_prefix=f"steps{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "0.5s", "KIE_POLL_INTERVAL": "0.5s", "KIE_POLL_MAX_INTERVAL": "1s",
                       "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.25s",
                       "KIE_HANDLERS": "redis_stream"}) as st:
        st.start_simulator("--time-factor", "0.02", "--seed", "5")
        st.start_serve()  # callbacks, /v1 and the dashboard (no tokens: open on loopback)
        st.start_worker(concurrency=2)
        st.start_beat()
        yield st


def request_for(stack: DevStack) -> dict[str, Any]:
    return {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la sing", "style": "folk", "title": "Song"}


def wait_done(stack: DevStack, job_ids: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    recs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in job_ids}
        if all(r["state"] in ("succeeded", "failed") and all(h.get("state") == "delivered"
                                                             for h in r["handlers"].values()) for r in recs.values()):
            return recs
        time.sleep(0.25)
    logs = "\n".join(f"--- {c.name}\n" + Path(c.log_path).read_text()[-4000:] for c in stack.children)
    raise AssertionError(f"jobs did not finish: {json.dumps(recs, indent=1)[:3000]}\n{logs}")


def sim(stack: DevStack, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    if body is None:
        return requests.get(stack.sim_url + path, timeout=5).json()
    return requests.post(stack.sim_url + path, json=body, timeout=5).json()


def events_of(stack: DevStack, job_id: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(stack.redis_url)
    out = []
    for _, fields in r.xrange(Keys(stack.settings().key_prefix).results):
        event = {k.decode(): v.decode() for k, v in fields.items()}
        if event.get("job_id") == job_id:
            out.append(event)
    return out


def test_every_step_on_both_takes_succeeds_and_each_call_is_paid_once(stack: DevStack) -> None:
    settings = stack.settings()
    job_id = enqueue_extend(request_for(stack), steps=ALL, settings=settings)
    rec = wait_done(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded", rec
    steps = rec["steps"]
    assert len(steps) == 10 and all(s["state"] == "succeeded" for s in steps), steps
    by = {(s["op"], s["take"]): s for s in steps}
    for take in (0, 1):
        assert by[("wav", take)]["result"]["wav_url"].endswith(".wav")
        assert {"vocal_url", "instrumental_url"} <= set(by[("stems", take)]["result"])
        assert by[("midi", take)]["result"]["notes"]
        assert by[("video", take)]["result"]["video_url"]
        assert [w["word"] for w in by[("lyrics", take)]["result"]["aligned_words"]] == ["[Verse]", "la", "la", "sing"]
        assert all(by[(op, take)]["kie_task_id"] for op in ("wav", "stems", "midi", "video"))
    assert len(rec["tracks"]) == 2
    stats = sim(stack, "/_sim/stats")
    assert stats["followups_paid_twice"] == 0
    paid = {k: v for k, v in stats["followup_paid"].items() if rec["kie_task_id"] in k
            or any(s["kie_task_id"] and s["kie_task_id"] in k for s in steps)}
    assert sorted(k.split(":")[0] for k in paid) == sorted(["wav", "stems", "midi", "video", "lyrics"] * 2)
    assert all(v == 1 for v in paid.values())
    events = events_of(stack, job_id)
    assert [e["event"] for e in events] == ["job.succeeded"]
    event = json.loads(events[0]["payload"])
    assert [(s["op"], s["take"], s["state"]) for s in event["steps"]] == [
        (s["op"], s["take"], "succeeded") for s in steps]
    assert rec["credits"]["charged"] >= 12 + 2 * (0.4 + 10 + 2)
    # The job's page: a step list with players for the WAV and the stems, a link to the video.
    page = requests.get(f"{stack.env['KIE_CALLBACK_BASE_URL']}/jobs/{job_id}", timeout=10)
    assert page.status_code == 200, page.text[:500]
    html = page.text
    assert html.count('class="step"') == 10 and 'id="steps"' in html
    for take in (0, 1):
        for key in ("wav_url", "vocal_url", "instrumental_url"):
            assert f'<audio controls preload="none" src="{by[("wav" if key == "wav_url" else "stems", take)]["result"][key]}"' in html
        assert f'href="{by[("video", take)]["result"]["video_url"]}"' in html
    assert "timed words" in html and "MIDI notes" in html


def test_first_take_only(stack: DevStack) -> None:
    job_id = enqueue_extend(request_for(stack), steps=[{"op": "wav"}], takes="first", settings=stack.settings())
    rec = wait_done(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded" and [(s["op"], s["take"]) for s in rec["steps"]] == [("wav", 0)]


def test_a_failed_step_fails_the_job_and_keeps_the_rest(stack: DevStack) -> None:
    sim(stack, "/_sim/config", {"fault_video_fail": 1.0})
    try:
        job_id = enqueue_extend(request_for(stack), steps=[{"op": "wav"}, {"op": "video"}], takes="first",
                                settings=stack.settings())
        rec = wait_done(stack, [job_id])[job_id]
    finally:
        sim(stack, "/_sim/config", {"fault_video_fail": 0.0})
    assert rec["state"] == "failed" and rec["error"]["kind"] == "step_failed", rec
    states = {s["op"]: s["state"] for s in rec["steps"]}
    assert states == {"wav": "succeeded", "video": "failed"}
    assert len(rec["tracks"]) == 2 and rec["steps"][0]["result"]["wav_url"]


def test_retry_runs_only_the_failed_steps(stack: DevStack) -> None:
    settings = stack.settings()
    sim(stack, "/_sim/config", {"fault_video_fail": 1.0})
    try:
        job_id = enqueue_extend(request_for(stack), steps=[{"op": "wav"}, {"op": "video"}], takes="first",
                                settings=settings)
        first = wait_done(stack, [job_id])[job_id]
    finally:
        sim(stack, "/_sim/config", {"fault_video_fail": 0.0})
    assert first["error"]["kind"] == "step_failed"
    wav_task = first["steps"][0]["kie_task_id"]
    extensions = sim(stack, "/_sim/stats")["submissions_accepted"]
    from kie_extend.infra.runtime import Runtime
    from kie_extend.jobs.actions import retry_job
    from kie_extend.jobs.pipeline import Pipeline

    assert retry_job(Pipeline(Runtime(settings)), job_id).outcome == "queued"
    rec = wait_done(stack, [job_id])[job_id]
    assert rec["state"] == "succeeded", rec
    assert [s["state"] for s in rec["steps"]] == ["succeeded", "succeeded"]
    assert rec["steps"][0]["kie_task_id"] == wav_task  # the finished step was not run again
    stats = sim(stack, "/_sim/stats")
    assert stats["submissions_accepted"] == extensions  # nor the extension
    take = rec["tracks"][0]["id"]
    assert stats["followup_paid"][f"wav:{rec['kie_task_id']}:{take}"] == 1
    assert stats["followup_paid"][f"video:{rec['kie_task_id']}:{take}"] == 2  # failed once, run again once
    assert [e["event"] for e in events_of(stack, job_id)] == ["job.failed", "job.succeeded"]


def test_invalid_steps_are_refused_at_enqueue(stack: DevStack) -> None:
    before = sim(stack, "/_sim/stats")["submissions_accepted"]
    with pytest.raises(ValidationError) as exc:
        enqueue_extend(request_for(stack), steps=[{"op": "midi"}], settings=stack.settings())
    assert exc.value.errors[0]["field"] == "steps[0].op"
    assert sim(stack, "/_sim/stats")["submissions_accepted"] == before


def kie_extend(stack: DevStack, *args: str, cwd: Path, timeout: float = 90) -> Any:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("kie-extend")
    return subprocess.run([str(exe), *args], env=stack.env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_one_csv_line_asks_for_wav_and_stems_and_batch_results_show_them(stack: DevStack, tmp_path: Path) -> None:
    src = f"{stack.sim_url}/files/source/30s.mp3"
    (tmp_path / "jobs.csv").write_text(
        "uploadUrl,defaultParamFlag,instrumental,continueAt,model,prompt,style,title,steps\n"
        f"{src},true,false,10,V5,[Verse] la,folk,One,\"wav,stems=separate_vocal\"\n"
        f"{src},true,false,10,V5,[Verse] la,folk,Two,\n")
    sub = kie_extend(stack, "batch", "submit", "jobs.csv", "--batch-id", "stepsb", "--takes", "first",
                     "--steps", "lyrics", "--wait", cwd=tmp_path)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    res = kie_extend(stack, "batch", "results", "stepsb", "--format", "jsonl", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = sorted((json.loads(line) for line in res.stdout.splitlines() if line.strip()), key=lambda r: r["line"])
    assert [r["state"] for r in rows] == ["succeeded", "succeeded"]
    one, two = rows[0]["steps"], rows[1]["steps"]
    assert [(s["op"], s["take"], s["state"]) for s in one] == [("wav", 0, "succeeded"), ("stems", 0, "succeeded")]
    assert one[0]["wav_url"] and one[1]["vocal_url"] and one[1]["instrumental_url"]
    assert [(s["op"], s["take"]) for s in two] == [("lyrics", 0)]  # the batch's default steps
    bad = kie_extend(stack, "enqueue", "--upload-url", src, "--model", "V5", "--default-mode", "--prompt", "x",
                     "--steps", "wav,midi", cwd=tmp_path)
    assert bad.returncode == 2 and "steps[1].op" in bad.stderr and "stems step before it" in bad.stderr, bad.stderr


def test_the_step_callback_route_answers_like_the_job_route(stack: DevStack) -> None:
    base = stack.env["KIE_CALLBACK_BASE_URL"]
    assert requests.post(f"{base}/kie/callback/step/some-job/x", json={}, timeout=5).status_code == 404
    assert requests.post(f"{base}/kie/callback/step/bad%20id/0", json={}, timeout=5).status_code == 404
    assert requests.post(f"{base}/kie/callback/step/some-job/0", data=b"[1]", timeout=5).status_code == 400
    ok = requests.post(f"{base}/kie/callback/step/some-job/0", json={"code": 200, "data": {"task_id": "t"}}, timeout=5)
    assert ok.status_code == 200 and ok.json() == {"status": "received"}  # an unknown job: nothing to wake


def test_the_account_rate_holds_across_extensions_and_follow_ups(tmp_path: Path) -> None:
    """6 jobs x (1 extension + WAV and stems on both takes) = 30 calls through a 4 per 1 s limit that
    the simulator enforces on extensions and follow-ups together: no 429, every call paid once."""
    with DevStack(tmp_path, key_prefix=f"rate{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "0.3s", "KIE_POLL_INTERVAL": "0.3s", "KIE_POLL_MAX_INTERVAL": "0.6s",
                       "KIE_TICK_INTERVAL": "0.1s", "KIE_SUBMIT_RATE": "4/1s", "KIE_SUBMIT_RATE_MARGIN": "0.05s",
                       "KIE_HANDLERS": "redis_stream"}) as st:
        st.start_simulator("--time-factor", "0.01", "--seed", "6", "--rate-limit", "4", "--rate-window", "1")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=2)
        st.start_worker(concurrency=2)
        st.start_beat()
        steps = [{"op": "wav"}, {"op": "stems", "type": "separate_vocal"}]
        ids = [enqueue_extend(request_for(st), steps=steps, settings=st.settings()) for _ in range(6)]
        recs = wait_done(st, ids, timeout=120)
        assert all(r["state"] == "succeeded" for r in recs.values()), recs
        stats = st.sim_stats()
        assert stats["rate_limited"] == 0
        assert stats["submissions_accepted"] == 6 and sum(stats["followups_accepted"].values()) == 24
        assert stats["followups_paid_twice"] == 0
