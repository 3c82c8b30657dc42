"""The project's provider simulator with one extra read-only route for the benchmarks.

``python bench/simtap.py --port P [simulator flags...]`` runs exactly ``python -m kie_extend.simulator``
(same CLI, same knobs, same HTTP server), plus ``GET /_sim/bench/tasks``, which reports for every task
the wall-clock time the simulator created it (the moment its submission was accepted) and the time it
finishes (creation + its total generation time). The simulator keeps those as ``Task.created``
(monotonic) and ``Task.t_done`` but does not expose them over HTTP; the benchmarks need them to
measure submission spacing and the latency from "provider done" to ``finished_at`` exactly.
Nothing else changes; ``/_sim/*`` routes are not counted in the simulator's stats.
"""

from __future__ import annotations

import time
from typing import Any

from kie_extend.simulator import server
from kie_extend.simulator.core import Simulator
from kie_extend.simulator.protocol import SimReply, SimRequest, json_reply


class TapSimulator(Simulator):
    """The simulator plus ``GET /_sim/bench/tasks``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routes[("GET", "/_sim/bench/tasks")] = self._bench_tasks

    def _bench_tasks(self, req: SimRequest) -> SimReply:
        offset = time.time() - time.monotonic()  # CLOCK_MONOTONIC -> wall clock, same for every process
        with self.lock:
            tasks = list(self.tasks.values())
        out = {
            t.task_id: {
                "created": t.created + offset,
                "done": t.created + t.t_done + offset,
                "duration": t.t_done,
                "callback_url": getattr(t, "callback_url", None),
                "failed": getattr(t, "fail_code", None) is not None,
            }
            for t in tasks
        }
        with self.lock:
            follow = list(self.followups.values())
        for f in follow:  # follow-up tasks (WAV, stems, MIDI, video): the same clock, named by op
            out[f.task_id] = {"created": f.created + offset, "done": f.created + f.t_done + offset,
                              "duration": f.t_done, "callback_url": f.callback_url, "failed": f.fail, "op": f.op}
        return json_reply(out)


server.Simulator = TapSimulator  # type: ignore[misc]  # serve() builds the simulator by this name

if __name__ == "__main__":
    from kie_extend.simulator.cli import main

    raise SystemExit(main())
