"""Prometheus text exposition built from Redis, so every prefork process and machine adds up."""

from __future__ import annotations

import re

from .runtime import Runtime
from .states import JobState


def overview(rt: Runtime) -> dict[str, object]:
    """Jobs by state, gate use and pause, for ``kie-extend status`` and ``/metrics``."""
    store, gates = rt.store, rt.gates
    return {
        "jobs": {s.value: store.count(s) for s in JobState if s is not JobState.NOT_FOUND},
        "in_flight": gates.in_flight(),
        "max_in_flight": gates.max_in_flight,
        "rate_window_use": gates.window_use(),
        "rate_limit": f"{gates.limit}/{gates.window:g}s",
        "paused": gates.paused(),
        "due": int(rt.redis.zcard(rt.keys.due)),
        "blocked": int(rt.redis.zcard(rt.keys.blocked)),
        "dead_letters": int(rt.redis.llen(rt.keys.dead_letters)),
    }


def render(rt: Runtime) -> str:
    """The metrics in Prometheus text format."""
    ov = overview(rt)
    lines = ["# TYPE kie_extend_jobs gauge"]
    for state, n in ov["jobs"].items():  # type: ignore[union-attr]
        lines.append(f'kie_extend_jobs{{state="{state}"}} {n}')
    lines += [
        "# TYPE kie_extend_in_flight gauge", f"kie_extend_in_flight {ov['in_flight']}",
        "# TYPE kie_extend_paused gauge", f"kie_extend_paused {1 if ov['paused'] else 0}",
        "# TYPE kie_extend_dead_letters gauge", f"kie_extend_dead_letters {ov['dead_letters']}",
    ]
    stats = {k.decode(): v.decode() for k, v in rt.redis.hgetall(rt.keys.stats).items()}
    for name, value in sorted(stats.items()):
        m = re.match(r"^(submit|poll)_code_(.+)$", name)
        if m:
            lines.append(f'kie_extend_provider_responses_total{{call="{m.group(1)}",code="{m.group(2)}"}} {value}')
        else:
            metric = re.sub(r"[^a-zA-Z0-9_]", "_", name)
            lines.append(f"kie_extend_{metric}_total {value}")
    return "\n".join(lines) + "\n"
