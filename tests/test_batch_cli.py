"""`kie-extend batch`: file parsing and typing, bad-line reporting, resuming, progress, results;
and one end-to-end run of the real command on a CSV against a whole local system."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kie_extend.cli import batch as bc
from kie_extend.api import get_job
from kie_extend.cli.main import main
from kie_extend.config import Settings
from kie_extend.cli.devstack import DevStack
from kie_extend.store.keys import Keys


def settings_offline(**over: Any) -> Settings:
    """Settings for checks that never touch Redis."""
    base: dict[str, Any] = {"redis_url": "redis://127.0.0.1:1/0", "api_key": "test-key-0123456789",
                            "allow_private_urls": True}
    return Settings(_env_file=None, **{**base, **over})


def write_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """Silence as 8-bit mono PCM."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate))
    return path


HEADER = "uploadUrl,defaultParamFlag,instrumental,continueAt,model,prompt,style,title,tenant,priority,metadata,audio_file"


# -- parsing and typing -------------------------------------------------------------------------

def test_csv_typing_and_line_numbers() -> None:
    text = (HEADER + "\n"
            'https://e.org/a.mp3,TRUE,no,12,V5,"[Verse]\nla la",folk,A,shop,7,"{""n"": 1}",\n'
            "\n"
            "https://e.org/b.mp3,0,Yes,12.5,V4,,piano,B,,,,\n"
            ",false,,,V5,a calm song,,,,,,song.wav\n")
    lines, warnings = bc.parse_csv(text)
    assert warnings == []
    assert [ln.line for ln in lines] == [2, 5, 6]  # the quoted prompt spans lines 2-3; line 4 is blank
    a, b, c = lines
    assert a.request == {"uploadUrl": "https://e.org/a.mp3", "defaultParamFlag": True, "instrumental": False,
                         "continueAt": 12, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "A"}
    assert a.options == {"tenant": "shop", "priority": 7, "metadata": {"n": 1}}
    assert b.request["defaultParamFlag"] is False and b.request["instrumental"] is True
    assert b.request["continueAt"] == 12.5 and "prompt" not in b.request and b.options == {}
    assert c.request == {"defaultParamFlag": False, "model": "V5", "prompt": "a calm song"}  # empty cells absent
    assert c.options == {"audio_file": "song.wav"}
    assert not any(ln.problems for ln in lines)


@pytest.mark.parametrize(("name", "text", "value"), [
    ("instrumental", "yes", True), ("instrumental", "No", False), ("defaultParamFlag", "1", True),
    ("defaultParamFlag", "false", False), ("continueAt", "30", 30), ("styleWeight", "0.65", 0.65),
    ("weirdnessConstraint", "-0", 0), ("priority", "9", 9), ("metadata", '{"a": [1]}', {"a": [1]}),
    ("prompt", "007", "007"), ("not_after", "2030-01-01T00:00:00Z", "2030-01-01T00:00:00Z"),
])
def test_typed_cell(name: str, text: str, value: Any) -> None:
    got = bc.typed_cell(name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("name", "text", "words"), [
    ("instrumental", "maybe", "true/false/1/0/yes/no"), ("continueAt", "ten", "must be a number"),
    ("audioWeight", "nan", "finite"), ("priority", "high", "integer from 0 to 9"),
    ("metadata", "{bad", "JSON object"),
])
def test_typed_cell_errors(name: str, text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        bc.typed_cell(name, text)


def test_csv_header_problems_and_warnings() -> None:
    lines, warnings = bc.parse_csv("\ufeffuploadUrl,model,job_id,model,contineAt\nhttps://e.org/a.mp3,V5,x,V5,3,extra\n")
    head, row = lines
    assert head.header and head.line == 1
    assert {p["field"] for p in head.problems} == {"job_id", "model"}
    assert warnings == ["column 'contineAt' is not a field of the KIE request (did you mean continueAt?); it is sent as text"]
    assert row.line == 2 and row.problems[0]["field"] == "row" and "6 cells" in row.problems[0]["message"]
    with pytest.raises(bc.BatchFileError, match="no header"):
        bc.parse_csv("\n  \n")


def test_jsonl_flat_and_envelope_lines() -> None:
    text = ('{"uploadUrl": "https://e.org/a.mp3", "model": "V5", "tenant": "shop", "priority": 2, "audio_file": null}\n'
            "\n"
            '{"request": {"uploadUrl": "https://e.org/b.mp3"}, "metadata": {"k": 1}, "idempotency_key": "mine"}\n'
            "[1, 2]\n"
            '{"uploadUrl": "x", \n'
            '{"request": "nope", "job_id": "j", "colour": "red"}\n'
            '{"audio_file": 3, "batch_id": "b"}\n')
    lines = bc.parse_jsonl(text)
    assert [ln.line for ln in lines] == [1, 3, 4, 5, 6, 7]
    flat, env, arr, broken, bad_env, bad_flat = lines
    assert flat.request == {"uploadUrl": "https://e.org/a.mp3", "model": "V5"}
    assert flat.options == {"tenant": "shop", "priority": 2} and not flat.problems
    assert env.request == {"uploadUrl": "https://e.org/b.mp3"}
    assert env.options == {"metadata": {"k": 1}, "idempotency_key": "mine"} and not env.problems
    assert arr.problems == [{"field": "line", "message": "must be a JSON object (a request), got list"}]
    assert broken.problems[0]["field"] == "line" and "not valid JSON" in broken.problems[0]["message"]
    assert {p["field"] for p in bad_env.problems} == {"request", "colour", "job_id"}
    assert {p["field"] for p in bad_flat.problems} == {"audio_file", "batch_id"}
    assert "batch_id" not in bad_flat.request


def test_detect_format() -> None:
    assert bc.detect_format("x.jsonl", "") == "jsonl"
    assert bc.detect_format("x.CSV", "{") == "csv"
    assert bc.detect_format("x.txt", '  {"a": 1}') == "jsonl"
    assert bc.detect_format("x.txt", "uploadUrl,model") == "csv"


# -- naming -------------------------------------------------------------------------------------

def test_batch_and_job_ids_are_deterministic(tmp_path: Path) -> None:
    assert bc.default_batch_id(tmp_path / "My Jobs!.csv", b"a") == bc.default_batch_id("My Jobs!.csv", b"a")
    assert bc.default_batch_id("My Jobs!.csv", b"a") != bc.default_batch_id("My Jobs!.csv", b"b")
    assert re.fullmatch(r"My-Jobs-[0-9a-f]{8}", bc.default_batch_id("My Jobs!.csv", b"a"))
    assert bc.job_id_for("spring", 12) == "spring-12" and bc.line_of("spring", "spring-12") == 12
    odd = "spring launch / EU"  # not a valid job id: a hash stands in for the batch id
    jid = bc.job_id_for(odd, 7)
    assert re.fullmatch(r"b[0-9a-f]{20}-7", jid) and bc.line_of(odd, jid) == 7
    long = "x" * 126
    assert bc.job_id_for(long, 9) == long + "-9" and bc.job_id_for(long, 10).startswith("b")
    assert bc.line_of(long, bc.job_id_for(long, 10)) == 10
    assert bc.line_of("spring", "spring-012") is None and bc.line_of("spring", "other-3") is None
    assert bc.line_of("spring", "spring-x") is None
    assert bc.idempotency_key_for("spring", 3) == "spring:3"


def test_build_items(tmp_path: Path) -> None:
    lines = bc.parse_jsonl('{"model": "V5"}\n{"model": "V5", "idempotency_key": "own", "audio_file": "a/b.wav"}\n')
    first, second = bc.build_items(lines, "B", tmp_path)
    assert first == {"request": {"model": "V5"}, "job_id": "B-1", "line": 1, "idempotency_key": "B:1"}
    assert second["idempotency_key"] == "own" and second["audio_file"] == str(tmp_path / "a" / "b.wav")


# -- checking: every problem, with its line, before anything is enqueued -------------------------

def test_check_lines_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    write_wav(tmp_path / "ok.wav", 20)
    text = (HEADER + "\n"
            "https://e.org/a.mp3,true,false,10,V5,la,folk,A,,,,\n"        # 2: fine
            "https://e.org/b.mp3,maybe,false,ten,V9,la,folk,B,,12,,\n"    # 3: four problems
            ",true,true,30,V5,,piano,C,,,,ok.wav\n"                       # 4: continueAt beyond the file
            ",true,true,5,V5,,piano,D,,,,missing.wav\n"                   # 5: no such file
            "ftp://e.org/e.mp3,true,true,5,V5,,piano,E,bad tenant,,,\n")  # 6: two problems
    lines, _ = bc.parse_csv(text)
    items = bc.build_items(lines, "B", tmp_path)
    problems = bc.check_lines(lines, items, settings_offline())
    found = [(p.line, p.field) for p in problems]
    assert (3, "defaultParamFlag") in found and (3, "continueAt") in found
    assert (3, "model") in found and (3, "priority") in found
    assert (4, "continueAt") in found or (4, "audio_file") in found
    assert (5, "audio_file") in found and (6, "uploadUrl") in found and (6, "tenant") in found
    assert not any(line == 2 for line, _ in found)
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    # a field reported while reading is not reported again by the request checks
    assert sum(1 for p in problems if (p.line, p.field) == (3, "defaultParamFlag")) == 1
    assert str(problems[0]).startswith("line 3: ")


def test_check_lines_needs_an_api_key_for_local_files(tmp_path: Path) -> None:
    write_wav(tmp_path / "ok.wav", 20)
    lines = bc.parse_jsonl('{"defaultParamFlag": false, "model": "V5", "prompt": "p", "audio_file": "ok.wav"}\n')
    problems = bc.check_lines(lines, bc.build_items(lines, "B", tmp_path), settings_offline(api_key=None))
    assert [str(p) for p in problems] == ["file: audio_file: KIE_API_KEY is not set; uploading a local audio "
                                          "file needs it"]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings]) -> Settings:
    """The environment `kie-extend` reads, on our Valkey and this test's prefix and queue."""
    settings = make_settings()
    for name in [k for k in os.environ if k.startswith("KIE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KIE_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("KIE_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("KIE_QUEUE", settings.queue)
    monkeypatch.setenv("KIE_API_KEY", "test-key-0123456789")
    monkeypatch.setenv("KIE_ALLOW_PRIVATE_URLS", "true")
    return settings


def queued_ids(rclient: redis.Redis, queue: str) -> list[str]:
    """Task ids of the messages waiting in the broker's queue."""
    return [json.loads(raw)["headers"]["id"] for raw in rclient.lrange(queue, 0, -1)]


def test_bad_file_enqueues_nothing(tmp_path: Path, cli_env: Settings, rclient: redis.Redis,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jobs.csv"
    path.write_text(HEADER + "\n"
                    "https://e.org/a.mp3,true,false,10,V5,la,folk,A,,,,\n"
                    "https://e.org/b.mp3,true,false,10,V5,la,folk,B,,,{oops,\n"
                    "https://e.org/c.mp3,true,false,10,V5,la,folk,C,,,,\n")
    assert main(["batch", "submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing was enqueued" in err and "line 3: metadata: must be a JSON object" in err
    assert rclient.keys(f"{cli_env.key_prefix}*") == [] and rclient.llen(cli_env.queue) == 0


def test_dry_run_checks_and_enqueues_nothing(tmp_path: Path, cli_env: Settings, rclient: redis.Redis,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"uploadUrl": "https://e.org/a.mp3", "defaultParamFlag": false, "model": "V5", "prompt": "p"}\n')
    assert main(["batch", "submit", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"batch jobs-[0-9a-f]{8}: 1 job\(s\)", out) and "dry run" in out
    assert rclient.keys(f"{cli_env.key_prefix}*") == [] and rclient.llen(cli_env.queue) == 0


def test_interrupted_submit_resumes_without_sending_twice(tmp_path: Path, cli_env: Settings,
                                                          rclient: redis.Redis) -> None:
    """Ctrl-C after the first chunk; the jobs a worker recorded are skipped on the re-run."""
    from kie_extend.jobs.batches import get_batch
    from kie_extend.infra.runtime import Runtime

    req = '{"uploadUrl": "https://e.org/a.mp3", "defaultParamFlag": false, "model": "V5", "prompt": "p"}\n'
    lines = bc.parse_jsonl(req * 5)
    items = bc.build_items(lines, "resume", tmp_path)
    rt = Runtime(cli_env)

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bc.submit(items, settings=cli_env, rt=rt, batch_id="resume", chunk=2, progress=stop)
    assert sorted(queued_ids(rclient, cli_env.queue)) == ["resume-1", "resume-2"]
    for job_id in ("resume-1", "resume-2"):  # what a worker accepting them would leave
        rclient.hset(Keys(cli_env.key_prefix).job(job_id), mapping={"job_id": job_id, "state": "queued"})
    assert bc.submit(items, settings=cli_env, rt=rt, batch_id="resume", chunk=2) == (3, 2)
    assert sorted(queued_ids(rclient, cli_env.queue)) == [f"resume-{n}" for n in range(1, 6)]
    assert get_batch(rt, "resume")["total"] == 5
    message = next(m for m in map(json.loads, rclient.lrange(cli_env.queue, 0, -1)) if m["headers"]["id"] == "resume-1")
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert kwargs["idempotency_key"] == "resume:1" and kwargs["batch_id"] == "resume"


# -- progress -----------------------------------------------------------------------------------

def batch(total: int, finished: bool = False, **counts: int) -> dict[str, Any]:
    return {"batch_id": "B", "total": total, "counts": counts, "finished": finished, "cancelled": False}


def sequence(*states: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    it = iter(states)
    last: list[dict[str, Any]] = []

    def get(batch_id: str) -> dict[str, Any]:
        last[:] = [next(it, last[0] if last else states[-1])]
        return last[0]
    return get


def test_wait_plain_lines_without_a_terminal() -> None:
    out = io.StringIO()
    get = sequence(batch(3, pending=3), batch(3, queued=1, submitted=2), batch(3, succeeded=1, submitted=2),
                   batch(3, True, succeeded=3))
    assert bc.wait_batch(get, "B", stream=out, tty=False, interval=0, poll=0) == 0
    text = out.getvalue().splitlines()
    assert len(text) == 4 and "0/3 done (running)  pending=3" in text[0]
    assert "3/3 done (finished)  succeeded=3" in text[-1]


def test_wait_plain_lines_are_rate_limited_but_the_last_is_always_printed() -> None:
    out = io.StringIO()
    get = sequence(batch(2, pending=2), batch(2, queued=2), batch(2, succeeded=1, queued=1),
                   batch(2, True, succeeded=1, failed=1))
    assert bc.wait_batch(get, "B", stream=out, tty=False, interval=60, poll=0) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "failed=1" in lines[-1]


def test_wait_bar_on_a_terminal() -> None:
    out = io.StringIO()
    get = sequence(batch(4, queued=4), batch(4, True, succeeded=3, cancelled=1))
    assert bc.wait_batch(get, "B", stream=out, tty=True, poll=0) == 1
    assert "4/4" in out.getvalue() and "succeeded=3  cancelled=1" in out.getvalue()


def test_wait_not_found_and_timeout() -> None:
    out = io.StringIO()
    assert bc.wait_batch(lambda b: {"batch_id": b, "state": "not_found"}, "B", stream=out, tty=False) == 3
    assert "B  not found" in out.getvalue()
    assert bc.wait_batch(lambda b: batch(2, queued=2), "B", stream=out, tty=False, timeout=0.05, poll=0.01) == 4


# -- results ------------------------------------------------------------------------------------

def record(job_id: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "state": state, "kie_task_id": None, "error": None, "tracks": [], "handlers": {},
            **extra}


def test_result_rows_and_formats(tmp_path: Path) -> None:
    ok = record("B-10", "succeeded", kie_task_id="t1",
                tracks=[{"audio_url": "https://cdn/1.mp3"}, {"audio_url": "https://cdn/2.mp3"}])
    bad = record("B-2", "failed", error={"kind": "invalid_request", "message": "continueAt, too far"})
    rows = bc.sort_rows([bc.result_row(ok, 10, ["/d/B-10/a.mp3"]), bc.result_row(record("x", "queued"), None, []),
                         bc.result_row(bad, 2, [])])
    assert [r["job_id"] for r in rows] == ["B-2", "B-10", "x"]
    path = tmp_path / "out.csv"
    bc.write_atomic(path, rows, "csv")
    parsed = list(csv.DictReader(path.open(newline="")))
    assert list(parsed[0]) == list(bc.RESULT_COLUMNS)
    assert parsed[0]["error_kind"] == "invalid_request" and parsed[0]["error_message"] == "continueAt, too far"
    assert parsed[1]["tracks"] == "2" and parsed[1]["audio_urls"] == "https://cdn/1.mp3 https://cdn/2.mp3"
    assert parsed[1]["files"] == "/d/B-10/a.mp3" and parsed[2]["line"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left
    buf = io.StringIO()
    bc.write_rows(rows, "jsonl", buf)
    first = json.loads(buf.getvalue().splitlines()[1])
    assert first["audio_urls"] == ["https://cdn/1.mp3", "https://cdn/2.mp3"] and first["line"] == 10


def test_downloaded_files_from_the_manifest(tmp_path: Path) -> None:
    job_dir = tmp_path / "B-3"
    job_dir.mkdir()
    (job_dir / "manifest.json").write_text(json.dumps({"tracks": [{"file": "t1.mp3"}, {"file": "t2.mp3"}]}))
    rec = record("B-3", "succeeded", handlers={"download": {"state": "delivered"}})
    assert bc.downloaded_files(str(tmp_path), rec) == [str(job_dir / "t1.mp3"), str(job_dir / "t2.mp3")]
    assert bc.downloaded_files(str(tmp_path), record("B-3", "succeeded")) == []
    assert bc.downloaded_files(str(tmp_path / "elsewhere"), rec) == []


# -- end to end: the real command on a CSV against a whole local system ---------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("batchcli")
    with DevStack(workdir, key_prefix=f"bat{uuid.uuid4().hex[:6]}",
                  env={"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
                       "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s",
                       "KIE_HANDLERS": "redis_stream,download",
                       "KIE_DOWNLOAD_DIR": str(workdir / "downloads")}) as st:
        st.start_simulator("--time-factor", "0.04", "--seed", "5")
        st.start_serve(callbacks_only=True)
        st.start_worker(concurrency=4)
        st.start_beat()
        yield st


def kie_extend(stack: DevStack, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed `kie-extend` command the way a user would (no terminal, no stdin)."""
    exe = Path(sys.executable).with_name("kie-extend")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kie_extend.cli.main"]
    return subprocess.run([*cmd, *args], env=stack.env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(120)
def test_batch_file_end_to_end(stack: DevStack, tmp_path: Path) -> None:
    src = f"{stack.sim_url}/files/source"
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "mine.wav", 20)
    rows = [HEADER]
    for n in range(6):
        custom = n % 2 == 0
        rows.append(f"{src}/30s.mp3,{'yes' if custom else 'no'},{'true' if n == 2 else 'false'},"
                    f"{10 + n},V5,{'[Verse] la' if custom else 'a calm song ' + str(n)},"
                    f"{'folk' if custom else ''},{'Song ' + str(n) if custom else ''},team-{n % 2},{n % 3 + 4},"
                    f"\"{{\"\"n\"\": {n}}}\",")
    rows.append(",true,true,5,V5,,piano,Mine,,,,audio/mine.wav")            # line 8: a local file, uploaded
    rows.append(f"{src}/10s.mp3,true,true,20,V5,,piano,Too far,,,,")         # line 9: the provider refuses it
    path = tmp_path / "jobs.csv"
    path.write_text("\n".join(rows) + "\n")
    before = stack.sim_stats()

    first = kie_extend(stack, "batch", "submit", "jobs.csv", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    batch_id = re.search(r"^batch (\S+): 8 job\(s\) from jobs\.csv \(csv\)$", first.stdout, re.M).group(1)
    assert f"batch {batch_id}: sent 8, already there 0, batch total 8" in first.stdout

    status = kie_extend(stack, "batch", "status", batch_id, "--wait", "--interval", "1", cwd=tmp_path, timeout=90)
    assert status.returncode == 1, status.stdout + status.stderr  # one job failed
    progress = status.stdout.strip().splitlines()
    assert progress[-1].endswith("8/8 done (finished)  succeeded=7  failed=1"), status.stdout
    assert "\r" not in status.stdout  # no bar without a terminal: plain lines

    settings = stack.settings()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the download handler runs after a job has finished
        recs = [get_job(f"{batch_id}-{n}", settings=settings) for n in range(2, 10)]
        if all(h.get("state") == "delivered" for r in recs for h in r["handlers"].values()):
            break
        time.sleep(0.25)
    out = kie_extend(stack, "batch", "results", batch_id, "--format", "csv", "--output", "results.csv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    results = list(csv.DictReader((tmp_path / "results.csv").open(newline="")))
    assert [r["line"] for r in results] == [str(n) for n in range(2, 10)]
    assert [r["job_id"] for r in results] == [f"{batch_id}-{n}" for n in range(2, 10)]
    for r in results[:-1]:
        assert r["state"] == "succeeded" and r["tracks"] == "2" and r["kie_task_id"], r
        assert len(r["audio_urls"].split(" ")) == 2 and not r["error_kind"]
        files = r["files"].split(" ")
        assert len(files) == 2 and all(Path(f).is_file() and Path(f).stat().st_size > 0 for f in files), r
    assert results[-1]["state"] == "failed" and results[-1]["error_kind"] == "invalid_request"
    assert "duration" in results[-1]["error_message"] and results[-1]["tracks"] == "0"
    assert results[-1]["files"] == "" and results[-1]["audio_urls"] == ""

    after_first = stack.sim_stats()
    assert after_first["submissions_accepted"] - before["submissions_accepted"] == 7
    assert after_first["uploads"] - before["uploads"] == 1

    again = kie_extend(stack, "batch", "submit", "jobs.csv", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"batch {batch_id}: sent 0, already there 8, batch total 8" in again.stdout
    time.sleep(1.5)  # give a wrongly re-sent job time to reach the simulator
    after_again = stack.sim_stats()
    assert after_again["submissions_accepted"] == after_first["submissions_accepted"]
    assert after_again["uploads"] == after_first["uploads"]

    listed = kie_extend(stack, "batch", "list", "--json", cwd=tmp_path)
    mine = [b for b in json.loads(listed.stdout)["batches"] if b["batch_id"] == batch_id]
    assert mine and mine[0]["total"] == 8 and mine[0]["finished"] and mine[0]["done"] == 8
    jsonl = kie_extend(stack, "batch", "results", batch_id, cwd=tmp_path)
    assert [json.loads(line)["line"] for line in jsonl.stdout.splitlines()] == list(range(2, 10))
    final = kie_extend(stack, "batch", "status", batch_id, "--wait", "--json", cwd=tmp_path)
    assert final.returncode == 1 and json.loads(final.stdout)["counts"] == {"succeeded": 7, "failed": 1}
    missing = kie_extend(stack, "batch", "status", "no-such-batch", cwd=tmp_path)
    assert missing.returncode == 3 and missing.stderr == "error: no batch no-such-batch\n"
