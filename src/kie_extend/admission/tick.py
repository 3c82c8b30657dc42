"""The tick: hands due work to workers. Beat runs it every KIE_TICK_INTERVAL (see beat.py).

It releases parked jobs when there is room and no pause, claims what falls due before the next
tick under a lease and sends it out with a countdown to its exact time, claims due handler
deliveries, snapshots the provider's balance once per KIE_BALANCE_INTERVAL (credits/reconcile.py),
and, while submission is paused, lets one caller per KIE_PAUSE_PROBE_INTERVAL probe
the provider's credit endpoint (one per KIE_UNREACHABLE_PROBE_INTERVAL while KIE cannot be reached,
see reach.py). Every claim is one Lua script, so any number of beats is safe.
"""

from __future__ import annotations

import logging
import random
import time

from kie_extend import errors as E
from kie_extend.credits.reconcile import record_balance, snapshot_due
from kie_extend.store.record import iso_ms
from kie_extend.store.invariants import Invariants
from kie_extend.infra.metrics import record_tick
from kie_extend.admission.queues import Admitted
from kie_extend.infra import tracing
from kie_extend.infra.runtime import Dispatcher, Runtime

log = logging.getLogger("kie_extend.admission.tick")

#: Longest connect and read timeout (seconds) of the reachability probe, which runs in the tick.
PROBE_TIMEOUT = 3.0
#: Most jobs one tick's share of the invariant sweep looks at.
SWEEP_BUDGET = 2000
#: A tick hands out at least this many poll messages before one carries two jobs or more, so a
#: small batch of due work still spreads over the workers' processes.
POLL_SPREAD = 8


def poll_batches(due: list[tuple[str, float]], now: float, most: int,
                 spread: int = POLL_SPREAD) -> list[tuple[list[str], float | None]]:
    """Group a tick's due jobs (``(job_id, at)``, ``at`` in epoch seconds) into poll messages:
    ``[(job_ids, at or None), ...]``. Up to ``spread`` due jobs go out one per message, as before;
    more share messages of at most ``most`` jobs (KIE_POLL_BATCH), in time order, each sent at its
    latest job's time (None when that is already due), so no job runs before its time (a booked
    rate slot) and none waits longer than the gap between its own time and its group's last."""
    if not due:
        return []
    ordered = sorted(due, key=lambda item: item[1])
    count = len(ordered)
    size = 1 if count <= spread else min(max(most, 1), -(-count // spread))
    out: list[tuple[list[str], float | None]] = []
    for start in range(0, count, size):
        group = ordered[start:start + size]
        at = group[-1][1]
        out.append(([job_id for job_id, _ in group], at if at > now else None))
    return out


class Scheduler:
    """One tick's worth of hand-outs, over the shared Redis schedules."""

    def __init__(self, rt: Runtime, dispatcher: Dispatcher) -> None:
        self.rt = rt
        self.s = rt.settings
        self.store = rt.store
        self.gates = rt.gates
        self.dispatch = dispatcher

    def tick(self) -> dict[str, int]:
        """Hand due work to workers: admitted jobs, due steps, due deliveries, expired deadlines,
        the pause probe and, once per KIE_SWEEP_INTERVAL, the invariant sweep."""
        now = time.time()
        paused = self.gates.paused()
        if paused and self.gates.take_probe_turn(self.s.pause_probe_interval):
            self._probe(paused)
        if self.rt.reach.probe_turn():
            self._probe_reach()
        # Admission decides at slot time, one tick ahead: the slots that free up before the next
        # tick go to the jobs whose turn it is now (they land on the due schedule at their slot).
        admitted = self.rt.admission.admit(self.s.claim_batch, horizon=self.s.tick_interval)
        if tracing.enabled():
            self._trace_admitted(admitted)
        # Look one tick ahead: what falls due before the next tick goes out now as a short
        # countdown, so a booked rate slot or a poll is not late by up to a whole tick.
        due = self.store.claim_due(now + self.s.tick_interval, self.s.lease, self.s.claim_batch)
        most = 1 if tracing.enabled() else self.s.poll_batch  # a traced message joins one job's trace
        for job_ids, at in poll_batches(due, now, most):
            self.dispatch.poll_many(job_ids, at=at)
        deliveries = self.store.claim_deliveries(now, self.s.lease, self.s.claim_batch)
        for job_id, handler in deliveries:
            self.dispatch.deliver(job_id, handler)
        expired = self._deadlines(now)
        self._balance(now)
        if random.random() < 0.01:
            self.store.trim_indexes(now - self.s.retention)
        repaired = self._sweep(now)
        # Written last: a tick that keeps failing part-way shows as stalled (metrics.render's
        # kie_extend_last_tick_timestamp_seconds), not as alive. The same round trip samples the
        # queue depth for the dashboard's charts.
        record_tick(self.rt)
        return {"admitted": len(admitted), "due": len(due), "deliveries": len(deliveries), "expired": expired,
                "repaired": repaired}

    def _trace_admitted(self, admitted: list[Admitted]) -> None:
        """One ``kie.admit`` span per job this tick gave a slot, in the job's trace (an HGET each;
        only called when tracing is on)."""
        for a in admitted:
            traceparent = tracing.job_traceparent(self.rt.redis, self.rt.keys.job(a.job_id))
            with tracing.job_span("kie.admit", a.job_id, traceparent, kie_admission__granted=True,
                                  kie_admission__at=a.at):
                pass

    def _deadlines(self, now: float) -> int:
        """Cancel queued jobs whose ``not_after`` has passed (reason ``deadline``)."""
        found = self.rt.redis.zrangebyscore(self.rt.keys.deadlines, "-inf", now, start=0, num=self.s.claim_batch)
        if not found:
            return 0
        from kie_extend.jobs.pipeline import Pipeline

        pipeline = Pipeline(self.rt, self.dispatch)
        n = 0
        for raw_id in found:
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if pipeline.cancel(job_id, "deadline") == "cancelled":
                n += 1
            else:
                self.rt.redis.zrem(self.rt.keys.deadlines, job_id)  # not queued any more
        return n

    def _balance(self, now: float) -> bool:
        """Snapshot the provider's credit balance for reconciliation (credits/reconcile.py), at most
        once per KIE_BALANCE_INTERVAL across every beat; True when one was taken. Short timeouts:
        the tick must not stall behind a KIE that hangs; a failed read is logged and skipped."""
        if not snapshot_due(self.rt.redis, self.rt.keys, self.s.balance_interval):
            return False
        timeout = (min(self.s.connect_timeout, PROBE_TIMEOUT), min(self.s.read_timeout, PROBE_TIMEOUT))
        try:
            balance = self.rt.client.credits(timeout=timeout)
        except E.ProviderError as exc:
            log.warning("balance snapshot skipped: %s", exc)
            return False
        record_balance(self.rt.redis, self.rt.keys, balance, now)
        return True

    def _sweep(self, now: float) -> int:
        """The invariant sweep: a pass starts once per KIE_SWEEP_INTERVAL (one beat of many) and
        goes through at most SWEEP_BUDGET jobs per tick, so a tick's cost does not grow with the
        backlog. Stranded jobs are put back on a schedule, counted and logged."""
        if self.s.sweep_interval <= 0:
            return 0
        r, keys = self.rt.redis, self.rt.keys
        if not r.set(keys.sweep_lock + ":step", "1", nx=True, px=max(1000, int(self.s.lease * 1000))):
            return 0  # another beat is sweeping this tick
        try:
            state = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                     for k, v in r.hgetall(keys.sweep_last).items()}
            if "phase" in state:
                cursor = (int(state["phase"]), int(state["pos"]))
            elif r.set(keys.sweep_lock, "1", nx=True, px=max(1, int(self.s.sweep_interval * 1000))):
                cursor = (0, 0)
                state = {"checked_so_far": "0", "violations_so_far": "0"}
            else:
                return 0
            report = Invariants(r, keys).check(repair=True, grace=self.s.sweep_grace, now=now, cursor=cursor,
                                               budget=SWEEP_BUDGET)
            for v in report.violations:
                # A vanished record or request is a lost job (evicted or deleted): an error, not a repair.
                level = logging.ERROR if v.kind in ("missing_record", "missing_request") else logging.WARNING
                log.log(level, "sweep: %s: %s%s", v.kind, v.detail, " (repaired)" if v.repaired else "",
                        extra={"job_id": v.job_id})
                self.store.stat(f"sweep_{v.kind}")
            checked = int(state.get("checked_so_far") or 0) + report.checked
            found = int(state.get("violations_so_far") or 0) + len(report.violations)
            if report.cursor is None:
                pipe = r.pipeline()
                pipe.delete(keys.sweep_last)
                pipe.hset(keys.sweep_last, mapping={"at": repr(now), "checked": checked, "violations": found})
                pipe.execute()
            else:
                r.hset(keys.sweep_last, mapping={"phase": report.cursor[0], "pos": report.cursor[1],
                                                 "checked_so_far": checked, "violations_so_far": found})
            return report.repaired
        finally:
            r.delete(keys.sweep_lock + ":step")

    def _probe(self, paused: dict[str, str]) -> dict[str, str] | None:
        try:
            balance = self.rt.client.credits()
        except E.ProviderError as exc:
            self.rt.redis.hset(self.rt.keys.pause, mapping={"last_probe": iso_ms(), "last_probe_error": str(exc)[:200]})
            return paused
        if balance <= 0:
            self.rt.redis.hset(self.rt.keys.pause, mapping={"last_probe": iso_ms(), "last_probe_error": "no credits"})
            return paused
        self.gates.resume()
        log.warning("provider probe succeeded (credits %.1f); submission resumed", balance)
        return None

    def _probe_reach(self) -> bool:
        """Ask the credit endpoint whether KIE can be reached again; True when it answered (any
        code: KIE itself answered) and submission resumed."""
        reach = self.rt.reach
        # Short timeouts: the probe runs in beat's tick, which must not stall behind a KIE that hangs.
        timeout = (min(self.s.connect_timeout, PROBE_TIMEOUT), min(self.s.read_timeout, PROBE_TIMEOUT))
        try:
            self.rt.client.credits(timeout=timeout)
        except E.ProviderError as exc:
            if E.is_unreachable(exc):
                reach.probe_failed(str(exc))
                log.warning("KIE still cannot be reached (%s); next probe in %gs", exc, reach.probe_interval)
                return False
            if isinstance(exc, E.AccountError):
                self.gates.pause(exc.code, exc.msg or type(exc).__name__)  # reachable, but the account is not
        if reach.answered("probe"):
            self.store.stat("provider_reachable_again")
            log.warning("KIE answers again; submission resumed")
        return True
