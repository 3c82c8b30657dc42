"""Small server-rendered SVG charts for the dashboard: no JavaScript, no inline styles (the pages'
Content-Security-Policy forbids both), colours from classes in ``static/dashboard.css``.

Pure functions of their arguments: they return SVG markup as text (every label escaped) and touch
neither Redis nor HTTP. A point's value is shown on hover by its ``<title>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: Drawing size (SVG user units; the element scales to its card's width).
WIDTH, HEIGHT = 480, 170
#: Room for the axis labels: left, right, top, bottom.
PAD_L, PAD_R, PAD_T, PAD_B = 40, 10, 10, 24


@dataclass(frozen=True)
class Series:
    """One line: its name (legend and hover text), values (None = no data at that point) and the
    CSS class that colours it (``c-1`` … ``c-4`` in dashboard.css)."""

    name: str
    values: Sequence[float | None]
    css: str = "c-1"


def nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above ``value`` (at least 1): a round axis top."""
    if value <= 1:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= value:
            return float(step * exp)
    return float(10 * exp)  # pragma: no cover - the loop ends at 10


def fmt(value: float) -> str:
    """A number for a label: whole numbers without decimals, others with at most one."""
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def line_chart(series: Sequence[Series], labels: Sequence[str], *, title: str, unit: str = "",
               chart_id: str = "") -> str:
    """An SVG line chart of ``series`` over the points named by ``labels`` (one per value, oldest
    first; the first, middle and last are printed under the axis). The y axis runs from 0 to a round
    value above the highest one; a None value breaks its line. ``unit`` follows each hover value.
    Raises ValueError when a series has not one value per label."""
    n = len(labels)
    for s in series:
        if len(s.values) != n:
            raise ValueError(f"series {s.name!r} has {len(s.values)} values for {n} labels")
    top = nice_max(max([v for s in series for v in s.values if v is not None] or [0.0]))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return PAD_T + plot_h * (1 - v / top)

    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}"'
           + (f' id="{escape(chart_id)}"' if chart_id else "") + ' xmlns="http://www.w3.org/2000/svg">',
           f"<title>{escape(title)}</title>"]
    for frac in (0, 0.5, 1):  # grid lines and y labels
        gy = y(top * frac)
        out.append(f'<line class="grid" x1="{PAD_L}" y1="{gy:.1f}" x2="{WIDTH - PAD_R}" y2="{gy:.1f}"/>')
        out.append(f'<text class="axis" x="{PAD_L - 6}" y="{gy + 4:.1f}" text-anchor="end">{fmt(top * frac)}</text>')
    for i in sorted({0, n // 2, n - 1}) if n else []:
        anchor = "start" if i == 0 else ("end" if i == n - 1 else "middle")
        out.append(f'<text class="axis" x="{x(i):.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
                   f"{escape(labels[i])}</text>")
    for s in series:
        runs: list[list[tuple[int, float]]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append((i, float(v)))
        for run in (r for r in runs if r):
            if len(run) == 1:
                i, v = run[0]
                out.append(f'<circle class="line {s.css}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5"/>')
                continue
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in run)
            out.append(f'<polyline class="line {s.css}" data-series="{escape(s.name)}" points="{points}"/>')
        for i, v in enumerate(s.values):  # hover targets with the exact value
            if v is not None:
                out.append(f'<circle class="dot {s.css}" cx="{x(i):.1f}" cy="{y(float(v)):.1f}" r="4">'
                           f"<title>{escape(labels[i])} · {escape(s.name)}: {fmt(float(v))}{escape(unit)}</title>"
                           "</circle>")
    out.append("</svg>")
    return "".join(out)


def legend(series: Sequence[Series]) -> str:
    """The series' names with their colours, as an HTML list to put under a chart."""
    items = "".join(f'<li><span class="swatch {s.css}"></span>{escape(s.name)}</li>' for s in series)
    return f'<ul class="legend">{items}</ul>'


__all__ = ["Series", "line_chart", "legend", "nice_max", "fmt"]
