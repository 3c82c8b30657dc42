"""Callback delivery machinery: one timer thread with a heap of due jobs, a few sender threads, signing."""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import requests

Job = Callable[[], None]
log = logging.getLogger(__name__)


def sign(task_id: str, timestamp: int, secret: str) -> str:
    """base64(HMAC-SHA256(secret, f"{task_id}.{timestamp}")), the provider's webhook signature."""
    mac = hmac.new(secret.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def post_callback(url: str, body: dict[str, Any], secret: str | None, timeout: float) -> bool:
    """POST one callback; True when the receiver answered HTTP 200."""
    headers = {"Content-Type": "application/json", "User-Agent": "kie-simulator-callback/1.0"}
    if secret:
        ts = int(time.time())
        data = body.get("data") or {}
        task_id = str(data.get("task_id") or data.get("taskId") or body.get("task_id") or body.get("taskId") or "")
        headers["X-Webhook-Timestamp"] = str(ts)
        headers["X-Webhook-Signature"] = sign(task_id, ts, secret)
    try:
        resp = requests.post(url, json=body, headers=headers, timeout=timeout)
        resp.close()
        return resp.status_code == 200
    except (requests.RequestException, ValueError):
        return False


class Scheduler:
    """Run jobs at monotonic due times without blocking callers; jobs of one shard run in order."""

    def __init__(self, workers: int = 4) -> None:
        self._heap: list[tuple[float, int, int, str, Job]] = []
        self._seq = itertools.count()
        self._epoch = 0
        self._cond = threading.Condition()
        self._closed = False
        self._queues: list[queue.Queue[tuple[int, Job] | None]] = [queue.Queue() for _ in range(max(1, workers))]
        self._threads: list[threading.Thread] = []
        self._started = False

    def _start(self) -> None:
        self._started = True
        timer = threading.Thread(target=self._timer_loop, name="kie-sim-timer", daemon=True)
        self._threads.append(timer)
        for i, q in enumerate(self._queues):
            self._threads.append(threading.Thread(target=self._worker_loop, args=(q,),
                                                  name=f"kie-sim-callback-{i}", daemon=True))
        for t in self._threads:
            t.start()

    def call_at(self, due: float, shard: str, job: Job) -> None:
        """Run `job` at monotonic time `due` on the sender thread chosen by `shard`."""
        with self._cond:
            if self._closed:
                return
            if not self._started:
                self._start()
            shard_no = zlib.crc32(shard.encode()) % len(self._queues)
            heapq.heappush(self._heap, (due, next(self._seq), shard_no, shard, job))
            self._cond.notify()

    def clear(self) -> None:
        """Drop every pending job (jobs already queued for sending are skipped too)."""
        with self._cond:
            self._heap.clear()
            self._epoch += 1

    def pending(self) -> int:
        """Number of jobs waiting for their due time."""
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        """Stop the threads; pending jobs are dropped."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._epoch += 1
            self._cond.notify_all()
        for q in self._queues:
            q.put(None)

    def _timer_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, shard_no, _, job = heapq.heappop(self._heap)
                epoch = self._epoch
            self._queues[shard_no].put((epoch, job))

    def _worker_loop(self, q: queue.Queue[tuple[int, Job] | None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            epoch, job = item
            with self._cond:
                if epoch != self._epoch:
                    continue
            try:
                job()
            except Exception:  # a failing job must not kill the sender thread
                log.exception("simulator callback job failed")
