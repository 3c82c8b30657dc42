"""``kie-extend demo``: the whole system on embedded defaults, a handful of jobs, a result table.

It runs ``kie-extend serve`` (callbacks, the /v1 API and the dashboard) with a fresh random token,
printed once, so a person can watch the jobs in the dashboard while the demo runs."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from kie_extend.cli.devstack import DevStack
from kie_extend.store.keys import Keys
from kie_extend.jobs.states import TERMINAL

_TERMINAL = {s.value for s in TERMINAL}


def sample_requests(source: str) -> list[tuple[str, dict[str, Any]]]:
    """Example extend requests across models and modes, pointing at the simulator's source files."""
    return [
        ("custom, vocals, V5", {"uploadUrl": source, "defaultParamFlag": True, "instrumental": False,
                                "continueAt": 12.5, "model": "V5", "prompt": "[Verse]\nThe road runs on",
                                "style": "indie folk", "title": "Road (Extended)", "styleWeight": 0.65}),
        ("custom, instrumental, V4_5", {"uploadUrl": source, "defaultParamFlag": True, "instrumental": True,
                                        "continueAt": 20, "model": "V4_5", "style": "ambient piano",
                                        "title": "Drift"}),
        ("default mode, V4", {"uploadUrl": source, "defaultParamFlag": False, "model": "V4",
                              "prompt": "Keep the groove, add a bridge", "continueAt": 8}),
        ("custom, vocals, V5_5", {"uploadUrl": source, "defaultParamFlag": True, "instrumental": False,
                                  "continueAt": 25, "model": "V5_5", "prompt": "[Chorus]\nStill going",
                                  "style": "synth pop", "title": "Still Going", "vocalGender": "f"}),
        ("custom, vocals, V4_5PLUS", {"uploadUrl": source, "defaultParamFlag": True, "instrumental": False,
                                      "continueAt": 5, "model": "V4_5PLUS", "prompt": "[Bridge]\nla la",
                                      "style": "funk", "title": "Bridge"}),
    ]


#: Sent by name like any other producer would; the worker turns it into a failed job with the reasons.
INVALID_REQUEST = {"uploadUrl": "ftp://example.org/a.mp3", "defaultParamFlag": True, "instrumental": False,
                   "model": "V3", "continueAt": -4, "styleWeight": 1.5}


def run_demo(jobs: int = 6, time_factor: float = 0.08, hold: bool | None = None) -> int:
    """Start everything, run the sample jobs, print the table, stop everything. Returns 0 when
    every job reached its expected state, 1 otherwise, 130 when interrupted.

    ``hold``: keep the system (and its dashboard) up after the table until Enter or Ctrl-C;
    None holds only when stdin is a terminal."""
    from kie_extend.api import enqueue_extend, get_job, producer_app
    from kie_extend.errors import ValidationError

    workdir = tempfile.mkdtemp(prefix="kie-extend-demo-")
    external = os.environ.get("KIE_REDIS_URL")
    stack: DevStack | None = None
    ok = False

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        print("kie-extend demo: starting " + ("(job store: " + external + ")" if external else "an embedded Valkey"),
              flush=True)
        demo_ns = f"kie_extend_demo_{os.getpid()}"
        stack = DevStack(workdir, redis_url=external, key_prefix=demo_ns if external else None,
                         env={**({"KIE_QUEUE": demo_ns} if external else {}),
                              # A ~5 s generation: poll often, so the progress shows every stage.
                              "KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "1s",
                              "KIE_POLL_CALLBACK_INTERVAL": "1s", "KIE_TICK_INTERVAL": "0.5s"})
        sim = stack.start_simulator("--time-factor", str(time_factor))
        print(f"  simulator        {sim}  (time factor {time_factor}: a ~65 s generation takes "
              f"~{65 * time_factor:.0f} s)")
        # A token for this run only: set for the serve child alone, never stored or logged.
        token = secrets.token_urlsafe(18)
        serve = stack.start_serve(tokens=[token])
        print(f"  serve            {serve}  (callbacks, /v1 API, dashboard)")
        print(f"dashboard: {serve}/  token: {token}")
        stack.start_worker(concurrency=2)
        stack.start_beat()
        print(f"  worker + beat    logs in {workdir}", flush=True)
        settings = stack.settings()
        source = f"{sim}/files/source/30s.mp3"

        print("\nThe Python API validates before enqueueing; an invalid request raises at once:")
        try:
            enqueue_extend({"uploadUrl": source, "defaultParamFlag": True, "model": "V5", "title": "x" * 120},
                           settings=settings)
        except ValidationError as exc:
            for e in exc.errors:
                print(f"  {e['field']}: {e['message']}")

        samples = sample_requests(source)
        labels: dict[str, str] = {}
        batch = f"demo-{os.getpid()}"
        for i in range(jobs - 1):
            label, request = samples[i % len(samples)]
            # Two tenants share the account; the last job is urgent (priority 9).
            tenant, priority = ("studio-a" if i % 2 == 0 else "studio-b"), (9 if i == jobs - 2 else 5)
            job_id = enqueue_extend(request, metadata={"demo": label}, settings=settings, tenant=tenant,
                                    priority=priority, batch_id=batch)
            labels[job_id] = f"{label} [{tenant}{', p9' if priority == 9 else ''}]"
        bad_id = f"demo-invalid-{os.getpid()}"
        producer_app(settings).send_task("kie_extend.extend", kwargs={"request": INVALID_REQUEST},
                                         task_id=bad_id, queue=settings.queue)
        labels[bad_id] = "invalid, sent by name"
        print(f"\nEnqueued {len(labels)} jobs ({len(labels) - 1} valid in batch {batch!r} from two tenants, "
              "1 invalid sent by name). Progress:")

        started = time.monotonic()
        finished: dict[str, float] = {}
        last_line = ""
        while len(finished) < len(labels) and time.monotonic() - started < 300:
            counts: dict[str, int] = {}
            for job_id in labels:
                rec = get_job(job_id, settings=settings)
                state = "in_broker" if rec["state"] == "not_found" else rec["state"]
                if state == "submitted" and rec.get("kie_status"):
                    state = f"submitted/{rec['kie_status']}"
                counts[state] = counts.get(state, 0) + 1
                if rec["state"] in _TERMINAL and job_id not in finished:
                    finished[job_id] = time.monotonic() - started
            line = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            if line != last_line:
                print(f"  [{time.monotonic() - started:5.1f}s] {line}", flush=True)
                last_line = line
            time.sleep(0.3)

        print(f"\n{'job':<38} {'request':<44} {'state':<10} {'tracks':>6} {'secs':>6}  detail")
        ok = True
        for job_id, label in labels.items():
            rec = get_job(job_id, settings=settings)
            detail = ""
            if rec.get("error"):
                err = rec["error"]
                fields = ", ".join(e["field"] for e in err.get("errors", []))
                detail = f"{err['kind']}: {fields or err.get('message')}"
            elif rec.get("tracks"):
                detail = ", ".join(f"{t['title']} ({t['duration']:.0f}s)" for t in rec["tracks"] if t.get("duration"))
            secs = finished.get(job_id)
            print(f"{job_id:<38} {label:<44} {rec['state']:<10} {len(rec.get('tracks') or []):>6} "
                  f"{secs if secs is not None else float('nan'):>6.1f}  {detail}")
            expected = "failed" if job_id == bad_id else "succeeded"
            ok = ok and rec["state"] == expected
        from kie_extend.api import get_batch

        b = get_batch(batch, settings=settings)
        print(f"\nBatch {batch}: total {b.get('total')}, counts {b.get('counts')}, finished {b.get('finished')} "
              "(its batch.finished event is on the stream too)")
        rt_stream = Keys(stack.settings().key_prefix).results
        print(f"\nResult events are on the Redis stream {rt_stream!r} (XREAD from any language).")
        print("demo finished: " + ("every job reached the expected state" if ok else "SOME JOBS DID NOT FINISH AS EXPECTED"))
        if hold if hold is not None else sys.stdin.isatty():
            print(f"\nThe system stays up for the dashboard ({serve}/, token above). "
                  "Press Enter (or Ctrl-C) to stop everything.", flush=True)
            try:
                sys.stdin.readline()
            except (KeyboardInterrupt, EOFError):
                pass
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stack is not None:
            stack.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
