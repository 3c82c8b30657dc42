"""The life of a job's follow-up steps (WAV, stems, MIDI, video, lyrics), as plain domain code.

When an extension with a ``steps`` plan succeeds, the job stays ``submitted`` and every (step, take)
becomes an entry of its record (store/steps.py) queued for admission. Each entry is admitted like a
job (priority, tenant, account rate, in-flight cap, pauses, breaker), recorded ``submitting`` before
it is sent, sent once, then polled on its own record route until it ends; callbacks only wake it.
MIDI waits for the stems entry of its take and runs on that separation's task. Lyrics is one
synchronous call. A step the provider charges is charged in the ledger when it is accepted.

Never sent twice: a step found ``submitting`` (its worker died, or the answer was lost) is sent
again only for the operations whose duplicate answers 409 "record already exists" (WAV, video):
either the first send never arrived, or the 409 says it did and costs nothing. The others wait for
their callback, which names the entry in its URL, and fail as ``outcome_unknown`` if none comes.
A 409 is recovered the same way: the first task stands and its callback names it.

When every entry has ended the job ends: ``succeeded`` when all succeeded, else ``failed`` with
``error.kind: "step_failed"``; the tracks and every finished step's result stay. ``retry`` runs only
the failed entries again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kie_extend import errors as E
from kie_extend.credits.prices import estimate
from kie_extend.jobs.plan import expand
from kie_extend.jobs.states import JobState
from kie_extend.provider.operations import OPERATIONS, parse_step_callback, submit_body
from kie_extend.store.record import JobRecord, iso_ms
from kie_extend.store.steps import STEP_TERMINAL, Entry, StepStore, entries_of, split_sub_id, sub_id

log = logging.getLogger("kie_extend.jobs.steps")

#: Sends of one step that never reached the provider (429, 5xx, connect errors) before it fails.
MAX_STEP_ATTEMPTS = 8
#: Seconds of lease a step's submit holds beyond the client's timeouts.
SUBMIT_SLACK = 5.0


def view(raw: dict[str, str] | Any) -> list[dict[str, Any]] | None:
    """The public ``steps`` list of a job's record (None when it has no steps):
    ``[{"op", "take", "state", "kie_task_id", "result", "error"}]``; before the extension has
    succeeded, the plan's steps with state ``planned``."""
    raw = dict(getattr(raw, "raw", raw) or {})
    entries = entries_of(raw)
    if entries:
        return [{"op": e.op, "take": e.data.get("take"), "state": e.state, "kie_task_id": e.data.get("kie_task_id"),
                 "result": e.data.get("result"), "error": e.data.get("error")} for e in entries]
    plan = _plan(raw)
    if not plan:
        return None
    return [{"op": s["op"], "take": None, "state": "planned", "kie_task_id": None, "result": None, "error": None}
            for s in plan["steps"]]


def _plan(raw: dict[str, str]) -> dict[str, Any] | None:
    import json

    text = raw.get("steps_plan")
    if not text:
        return None
    try:
        plan = json.loads(text)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) and isinstance(plan.get("steps"), list) and plan["steps"] else None


def has_plan(rec: JobRecord) -> bool:
    """Whether the job asked for follow-up steps."""
    return _plan(dict(rec.raw)) is not None


class Steps:
    """Runs the follow-up steps of jobs (see the module's docstring)."""

    def __init__(self, pipeline: Any) -> None:
        """``pipeline``: the jobs/pipeline.py Pipeline whose jobs these are (its runtime, settings and
        terminal move)."""
        self.p = pipeline
        self.rt = pipeline.rt
        self.s = pipeline.s
        self.store = StepStore(self.rt.redis, self.rt.keys)

    # -- the extension succeeded ---------------------------------------------------------------
    def begin(self, job_id: str, rec: JobRecord, tracks: list[dict[str, Any]], kie_status: str,
              settle: str | float = "auto") -> bool:
        """Turn a succeeded extension's takes into step entries; False when they began already (or
        the job moved on)."""
        plan = _plan(dict(rec.raw))
        if plan is None:
            return False
        audio_ids = [str(t.get("id")) for t in tracks if t.get("id")]
        entries = []
        for entry in expand(plan["steps"], str(plan.get("takes") or "all"), audio_ids):
            entry.update(kie_task_id=None, result=None, error=None, attempts=0)
            entries.append(("waiting" if entry["after"] is not None else "queued", entry))
        now = time.time()
        ok = self.store.begin(job_id, entries, tracks, kie_status, now, now + self.s.lease, settle)
        if ok:
            log.info("extension succeeded; %d follow-up steps queued [job_id=%s]", len(entries), job_id)
        return ok

    # -- one entry's next step -----------------------------------------------------------------
    def advance(self, ref: str) -> None:
        """Do entry ``ref``'s (``<job>~<n>``) next step: submit it when its slot came, resolve an
        unknown submit, or poll it."""
        parts = split_sub_id(ref)
        if parts is None:
            return
        job_id, n = parts
        raw = self.rt.store.get(job_id)
        if raw is None or raw.get("state") != JobState.SUBMITTED.value:
            self.rt.store.unschedule(ref)
            return
        entries = entries_of(raw)
        if n >= len(entries):
            self.rt.store.unschedule(ref)
            return
        entry = entries[n]
        if entry.state == "queued":
            self._submit(job_id, raw, entries, entry)
        elif entry.state == "submitting":
            self._unknown(job_id, raw, entry, "its submit's outcome is unknown (the worker stopped or the answer was lost)")
        elif entry.state == "submitted":
            self._poll(job_id, raw, entry)
        else:
            self.rt.store.unschedule(ref)

    def _source(self, raw: dict[str, str], entries: list[Entry], entry: Entry) -> tuple[str, str | None] | None:
        """The task (and take) a step names: the music task and the take, or for MIDI its stems task."""
        if OPERATIONS[entry.op].source == "stems":
            after = entry.data.get("after")
            stems = entries[int(after)] if isinstance(after, int) and after < len(entries) else None
            task = stems.data.get("kie_task_id") if stems is not None else None
            return (str(task), None) if task else None
        task = raw.get("kie_task_id")
        return (task, str(entry.data.get("audio_id"))) if task else None

    def _callback_url(self, job_id: str, raw: dict[str, str], n: int) -> str:
        if self.s.callback_base_url:
            return f"{self.s.callback_base_url}/kie/callback/step/{job_id}/{n}"
        import json

        try:  # the producer's own callBackUrl: the provider requires one even when we only poll
            return str(json.loads(raw.get("request") or "{}").get("callBackUrl") or "")
        except ValueError:
            return ""

    def _submit(self, job_id: str, raw: dict[str, str], entries: list[Entry], entry: Entry) -> None:
        ref, n = sub_id(job_id, entry.n), entry.n
        decision = self.rt.gates.acquire(ref, f"{ref}:{entry.sends + 1}")
        if decision.verdict == "wait":
            self.store.move(job_id, n, ["queued"], "queued", due=time.time() + decision.wait)
            return
        if decision.verdict != "ok":
            self.store.move(job_id, n, ["queued"], "queued", due=None, ready=True)
            self.rt.breaker.neutral(ref)  # a probe not sent frees its turn
            self.rt.store.stat(f"gate_wait_{decision.verdict}")
            return
        now = time.time()
        lease_end = now + self.s.connect_timeout + self.s.read_timeout + SUBMIT_SLACK
        data = {**entry.data, "attempts": int(entry.data.get("attempts") or 0) + 1, "submit_started_ts": now}
        if self.store.move(job_id, n, ["queued"], "submitting", entry=data, due=lease_end) is None:
            self.rt.gates.release(ref)
            return
        op = OPERATIONS[entry.op]
        source = self._source(raw, entries, entry)
        if source is None:
            self._end(job_id, n, "submitting", data, failed="its source task is unknown")
            return
        try:
            if op.synchronous:
                result = self.rt.client.timestamped_lyrics(source[0], source[1] or "")
                self._end(job_id, n, "submitting", {**data, "result": result, "finished_at": iso_ms()},
                          charge=self._price(entry))
                return
            body = submit_body(op, entry.data.get("spec") or {}, source[0], source[1],
                               self._callback_url(job_id, raw, n))
            task_id = self.rt.client.submit_step(entry.op, body)
        except E.RejectedError as exc:
            if exc.code == 409 and op.conflict_means_exists:
                # The provider holds this take's record from an earlier send of ours: not paid again;
                # its callback (to this entry's own URL) names the task.
                log.warning("step %s (%s, take %s): 409 %s; waiting for the first task's callback [job_id=%s]",
                            n, entry.op, data.get("take"), exc.msg, job_id)
                self.store.move(job_id, n, ["submitting"], "submitted",
                                entry={**data, "conflict": True, "submitted_ts": time.time()},
                                due=time.time() + self.s.poll_interval, release=True)
                return
            self._end(job_id, n, "submitting", data, failed=str(exc))
            return
        except (E.RateLimitedError, E.UnavailableError, E.ConnectError) as exc:
            self._not_sent(job_id, n, data, exc)
            return
        except E.OutcomeUnknownError as exc:
            self._unknown(job_id, raw, Entry(n, "submitting", data, entry.sends), str(exc))
            return
        except E.AccountError as exc:
            self.rt.gates.pause(exc.code, str(exc))
            self._not_sent(job_id, n, data, exc)
            return
        except E.ProviderError as exc:
            self._end(job_id, n, "submitting", data, failed=str(exc))
            return
        log.info("step %s (%s, take %s) submitted as %s [job_id=%s]", n, entry.op, data.get("take"), task_id, job_id)
        self.store.move(job_id, n, ["submitting"], "submitted",
                        entry={**data, "kie_task_id": task_id, "submitted_ts": time.time()},
                        due=time.time() + self.s.poll_first, charge=(self._price_op(entry), self._price(entry)))

    def _price_op(self, entry: Entry) -> str:
        spec = entry.data.get("spec") or {}
        return "split_stem" if entry.op == "stems" and spec.get("type") == "split_stem" else entry.op

    def _price(self, entry: Entry) -> float:
        try:
            return estimate(self.s.prices, self._price_op(entry))
        except KeyError:
            return 0.0

    def _not_sent(self, job_id: str, n: int, data: dict[str, Any], exc: Exception) -> None:
        """The provider never took it (429, 5xx, no connection): back in line, or failed after many tries."""
        ref = sub_id(job_id, n)
        self.rt.gates.release(ref)
        if int(data.get("attempts") or 0) >= MAX_STEP_ATTEMPTS:
            self._end(job_id, n, "submitting", data, failed=f"not accepted after {data['attempts']} tries: {exc}")
            return
        log.warning("step %s not sent (%s); back in line [job_id=%s]", n, exc, job_id)
        self.store.move(job_id, n, ["submitting"], "queued", entry=data, due=None, ready=True)

    def _unknown(self, job_id: str, raw: dict[str, str], entry: Entry, why: str) -> None:
        """A submit whose outcome is unknown: WAV and video are sent again (a duplicate answers 409,
        free); the others wait for the callback of a task that may exist."""
        n, data = entry.n, dict(entry.data)
        if data.get("hint_task_id"):
            # Its callback came while it was still submitting: the provider took it, under this task.
            log.info("step %s (%s): %s, but its callback named task %s [job_id=%s]", n, entry.op, why,
                     data["hint_task_id"], job_id)
            self.store.move(job_id, n, ["submitting"], "submitted",
                            entry={**data, "kie_task_id": data["hint_task_id"], "submitted_ts": time.time()},
                            due=time.time(), charge=(self._price_op(entry), self._price(entry)), now=time.time())
            return
        if OPERATIONS[entry.op].conflict_means_exists or OPERATIONS[entry.op].synchronous:
            log.warning("step %s (%s): %s; sending again (a duplicate is refused with 409) [job_id=%s]",
                        n, entry.op, why, job_id)
            self.rt.gates.release(sub_id(job_id, n))
            self.store.move(job_id, n, ["submitting"], "queued", entry=data, due=None, ready=True)
            return
        log.warning("step %s (%s): %s; not sent again, waiting for its callback [job_id=%s]", n, entry.op, why, job_id)
        self.store.move(job_id, n, ["submitting"], "submitted",
                        entry={**data, "outcome_unknown": True, "submitted_ts": time.time()},
                        due=time.time() + self.s.poll_interval, release=True)

    def _poll(self, job_id: str, raw: dict[str, str], entry: Entry) -> None:
        n, data = entry.n, entry.data
        submitted = float(data.get("submitted_ts") or time.time())
        task_id = data.get("kie_task_id")
        if not task_id:
            window = self.s.submit_unknown_window
            if time.time() - submitted > window:
                self._end(job_id, n, "submitted", data, failed="outcome_unknown: the provider may have taken it, but "
                          f"no callback named its task within {window:.0f}s (KIE_SUBMIT_UNKNOWN_WINDOW)")
            else:
                self.store.move(job_id, n, ["submitted"], "submitted", due=time.time() + self.s.poll_interval)
            return
        try:
            record = self.rt.client.step_record(entry.op, str(task_id))
        except E.ProviderError as exc:
            log.warning("step %s poll failed (%s); polling again later [job_id=%s]", n, exc, job_id)
            record = None
        if record is not None and record.state == "succeeded":
            self._end(job_id, n, "submitted", {**data, "result": record.result, "finished_at": iso_ms()})
            return
        if record is not None and record.state == "failed":
            self._end(job_id, n, "submitted", data, failed=record.error or "failed")
            return
        if time.time() - submitted > self.s.job_timeout:
            self._end(job_id, n, "submitted", data, failed=f"timed_out: not finished {self.s.job_timeout:.0f}s "
                      "after submission")
            return
        self.store.move(job_id, n, ["submitted"], "submitted", due=time.time() + self.s.poll_interval)

    def _end(self, job_id: str, n: int, expect: str, data: dict[str, Any], failed: str | None = None,
             charge: float = 0.0) -> None:
        """End entry ``n`` (succeeded, or failed with ``failed``), then wake what waited for it and
        finish the job when it was the last."""
        state = "failed" if failed else "succeeded"
        data = {**data, "error": failed, "finished_at": data.get("finished_at") or iso_ms()}
        op = str(data.get("op"))
        states = self.store.move(job_id, n, [expect], state, entry=data, due=None, release=True,
                                 charge=(op, charge) if charge else None, now=time.time())
        if states is None:
            return
        log.log(logging.WARNING if failed else logging.INFO, "step %s (%s, take %s) %s%s [job_id=%s]", n, op,
                data.get("take"), state, f": {failed}" if failed else "", job_id)
        raw = self.rt.store.get(job_id) or {}
        for other in entries_of(raw):
            if other.state == "waiting" and other.data.get("after") == n:
                if failed:
                    states = self.store.move(job_id, other.n, ["waiting"], "failed",
                                             entry={**other.data, "error": f"its {op} step failed"},
                                             due=None) or states
                else:
                    states = self.store.move(job_id, other.n, ["waiting"], "queued", due=None, ready=True) or states
        if all(s in STEP_TERMINAL for s in states):
            self.finish(job_id)

    # -- the job ---------------------------------------------------------------------------------
    def finish(self, job_id: str) -> bool:
        """End the job when every entry has ended: succeeded, or failed with ``step_failed``."""
        raw = self.rt.store.get(job_id)
        if raw is None:
            return False
        entries = entries_of(raw)
        if not entries or any(e.state not in STEP_TERMINAL for e in entries):
            return False
        rec = JobRecord.from_hash(raw)
        failed = [e for e in entries if e.state == "failed"]
        if failed:
            first = failed[0]
            error = {"kind": "step_failed", "message": f"{len(failed)} of {len(entries)} follow-up steps failed; "
                     f"first: {first.op} (take {first.data.get('take')}): {first.data.get('error')}",
                     "steps": [{"op": e.op, "take": e.data.get("take"), "error": e.data.get("error")} for e in failed]}
            return bool(self.p._finish(job_id, rec, JobState.FAILED, {"error": error},
                                       expect=[JobState.SUBMITTED]))
        return bool(self.p._finish(job_id, rec, JobState.SUCCEEDED, {}, expect=[JobState.SUBMITTED]))

    def watch(self, job_id: str, rec: JobRecord) -> None:
        """The job's own due entry while its steps run: finish it if every entry ended (a worker
        died between the last move and the finish), put entries back on their schedules if one
        fell off, and come back a lease later."""
        if self.finish(job_id):
            return
        now = time.time()
        for entry in entries_of(dict(rec.raw)):
            ref = sub_id(job_id, entry.n)
            if entry.state == "queued":
                self.store.move(job_id, entry.n, ["queued"], "queued", ready=True)
            elif entry.state in ("submitting", "submitted") and self.rt.redis.zscore(self.rt.keys.due, ref) is None:
                self.rt.store.schedule(ref, now)
        self.rt.store.schedule(job_id, now + self.s.lease)

    def retry(self, job_id: str, rec: JobRecord) -> bool:
        """An operator's retry of a job that failed with ``step_failed``: only its failed entries run
        again (a MIDI entry whose stems entry failed waits for it again); the extension and every
        finished step stay. False when the job is not such a job any more."""
        entries = [e for e in entries_of(dict(rec.raw)) if e.state == "failed"]
        if not entries:
            return False
        moved = self.p.store.transition(
            job_id, JobState.SUBMITTED, expect=[JobState.FAILED],
            fields={"error": None, "finished_at": None, "event": None, "retried": rec.retried + 1},
            due=time.time() + self.s.lease)
        if not moved:
            return False
        self.rt.gates.release(job_id)  # its steps hold the in-flight slots, not the job
        self.rt.redis.delete(*[self.rt.keys.dedup(h, f"{job_id}:job.failed")
                               for h in self.rt.routes.names_for(rec.tenant)])
        failed = {e.n for e in entries}
        for e in entries:
            after = e.data.get("after")
            clean = {k: v for k, v in e.data.items() if k not in ("error", "result", "kie_task_id", "finished_at",
                                                                 "conflict", "outcome_unknown")}
            clean["attempts"] = 0
            if isinstance(after, int) and after in failed:
                self.store.move(job_id, e.n, ["failed"], "waiting", entry=clean, due=None)
            else:
                self.store.move(job_id, e.n, ["failed"], "queued", entry=clean, due=None, ready=True)
        log.info("retried by operator: %d failed follow-up steps run again [job_id=%s]", len(entries), job_id)
        return True

    def hint(self, job_id: str, n: int, body: dict[str, Any]) -> bool:
        """A step's callback (a hint): note the task it names when the entry has none (a 409 or an
        unknown submit), and poll it now. False when no such entry waits."""
        raw = self.rt.store.get(job_id)
        entries = entries_of(raw or {})
        if raw is None or n >= len(entries) or entries[n].state not in ("submitting", "submitted"):
            return False
        entry = entries[n]
        parsed = parse_step_callback(OPERATIONS[entry.op], body)
        if entry.state == "submitting":
            # Its submit's answer has not been recorded (yet, or ever: the worker died): keep the task
            # the callback names for whoever resolves the submit.
            if parsed.task_id and not entry.data.get("hint_task_id"):
                self.store.move(job_id, n, ["submitting"], "submitting",
                                entry={**entry.data, "hint_task_id": parsed.task_id})
            return True
        if not entry.data.get("kie_task_id") and parsed.task_id:
            log.info("step %s (%s): its callback names task %s [job_id=%s]", n, entry.op, parsed.task_id, job_id)
            self.store.move(job_id, n, ["submitted"], "submitted", entry={**entry.data, "kie_task_id": parsed.task_id},
                            due=time.time())
        else:
            self.store.move(job_id, n, ["submitted"], "submitted", due=time.time())
        return True


__all__ = ["Steps", "has_plan", "view"]
