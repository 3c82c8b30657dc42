"""Enqueue many extend jobs at once with the Python API, then (optionally) wait for them.

``kie_extend.enqueue_many`` validates every item first and enqueues nothing if one is invalid;
the ValidationError names each bad field as ``[index].field``. Then it sends all messages on one
broker connection and returns the job ids in order.

    python examples/enqueue_many.py https://example.org/song.mp3 --count 20 --wait 600

Settings come from the environment like every kie-extend process (``KIE_BROKER_URL`` /
``KIE_REDIS_URL``, ``KIE_QUEUE``, ``KIE_KEY_PREFIX``, ...; see the README). Prints one job id per
line; with ``--wait``, one final line per job with its state, and exits 0 only if all succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time

from kie_extend import TERMINAL, ValidationError, enqueue_many, get_job, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upload_url", help="public http(s) URL of the source audio")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--continue-at", type=float, default=10.0)
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for every job to finish (0: do not wait)")
    args = parser.parse_args(argv)

    settings = load_settings()
    items = [
        {
            "request": {
                "uploadUrl": args.upload_url, "defaultParamFlag": True, "instrumental": True,
                "continueAt": args.continue_at, "model": "V4_5", "style": "ambient piano",
                "title": f"Batch take {i + 1}",
            },
            "metadata": {"batch_index": i},
            "idempotency_key": None,  # set one per item to make a re-run of the batch harmless
        }
        for i in range(args.count)
    ]
    try:
        job_ids = enqueue_many(items, settings=settings)
    except ValidationError as exc:
        print("nothing was enqueued; invalid items:", file=sys.stderr)
        for problem in exc.errors:
            print(f"  {problem['field']}: {problem['message']}", file=sys.stderr)
        return 2
    for job_id in job_ids:
        print(job_id, flush=True)
    if not args.wait:
        return 0

    terminal = {state.value for state in TERMINAL}
    deadline = time.monotonic() + args.wait
    records = {}
    while time.monotonic() < deadline:
        records = {job_id: get_job(job_id, settings=settings) for job_id in job_ids}
        if all(r["state"] in terminal for r in records.values()):
            break
        time.sleep(1.0)
    for job_id, record in records.items():
        error = record.get("error") or {}
        print(f"{job_id} {record['state']} tracks={len(record.get('tracks') or [])} {error.get('kind') or ''}".rstrip())
    return 0 if all(r["state"] == "succeeded" for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
