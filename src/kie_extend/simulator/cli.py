"""Command line: `python -m kie_extend.simulator [--host H] [--port P] [--state-file PATH] [--knob value ...]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from kie_extend.simulator.config import SimConfig
from kie_extend.simulator.server import serve
from kie_extend.simulator.state import StateError


def build_parser(prog: str = "kie-extend simulator") -> argparse.ArgumentParser:
    """The simulator's argument parser (host, port, verbose, and one flag per knob)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Fake of KIE.AI's Suno 'Upload And Extend Audio' provider.")
    parser.add_argument("--host", default=os.environ.get("KIE_SIM_HOST", "127.0.0.1"),
                        help="address to listen on [env KIE_SIM_HOST, default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KIE_SIM_PORT", "8787")),
                        help="port to listen on, 0 = any free port [env KIE_SIM_PORT, default 8787]")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--state-file", default=os.environ.get("KIE_SIM_STATE_FILE") or None, metavar="PATH",
                        help="keep tasks, credits, counters and uploads in this JSON file (written atomically) "
                             "and start from it, so a restarted simulator still knows its tasks "
                             "[env KIE_SIM_STATE_FILE, default: memory only]")
    SimConfig.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "kie-extend simulator") -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the exit status. ``prog``: the command's name in
    usage lines."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        config = SimConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        server = serve(config, host=args.host, port=args.port, verbose=args.verbose, state_file=args.state_file)
    except StateError as exc:
        print(f"KIE simulator: {exc} (move it away to start empty)", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"KIE simulator could not listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    known = len(server.simulator.tasks)
    kept = f"; state in {args.state_file} ({known} task(s) restored)" if args.state_file else ""
    print(f"KIE simulator listening on {server.url}{kept}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
