"""A small SVG line-chart writer for the HTML report.

Hand-written because the report must be one self-contained file and matplotlib
is not a dependency; a line chart with axes, ticks and a legend is all it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
WIDTH, HEIGHT = 720, 340
# The legend sits in the right margin, clear of the lines.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 180, 36, 48
_NUM_TICKS = 5


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]  # (x, y), drawn in this order


def nice_ticks(low: float, high: float, count: int = _NUM_TICKS) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    # Rounded so that 3 x 0.2 reads 0.6, not 0.6000000000000001.
    return [round(first + i * step, 12) for i in range(int(math.ceil((high - first) / step)) + 1)]


def line_chart(title: str, x_label: str, y_label: str, series: Sequence[Series], log_x: bool = False) -> str:
    """An ``<svg>`` element; y starts at zero, x is linear or log2."""
    points = [p for s in series for p in s.points if _finite(p)]
    if not points:
        return f"<p>{escape(title)}: no data</p>"
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    xs = [fx(x) for x, _ in points]
    x_ticks = _log2_ticks(points) if log_x else nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(0.0, max(y for _, y in points))
    x_lo, x_hi = (min(x_ticks), max(x_ticks)) if not log_x else (min(xs), max(max(xs), min(xs) + 1))
    x_label = f"{x_label} (log scale)" if log_x else x_label
    y_hi = y_ticks[-1]
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (fx(x) - x_lo) / (x_hi - x_lo or 1.0) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + plot_h - y / (y_hi or 1.0) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    parts += _axes(x_ticks, y_ticks, px, py, log_x)
    parts += [_axis_labels(x_label, y_label)]
    for i, s in enumerate(series):
        parts.append(_polyline(s, COLORS[i % len(COLORS)], px, py))
    parts += _legend(series)
    parts.append("</svg>")
    return "\n".join(parts)


def _finite(point: tuple[float, float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in point)


def _log2_ticks(points: Sequence[tuple[float, float]]) -> list[float]:
    return sorted({x for x, _ in points})


def _axes(x_ticks, y_ticks, px, py, log_x: bool) -> list[str]:
    bottom, right = HEIGHT - MARGIN_BOTTOM, WIDTH - MARGIN_RIGHT
    out = [f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
           f'<line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{bottom}" stroke="#333"/>']
    for y in y_ticks:
        out.append(f'<line x1="{MARGIN_LEFT}" y1="{py(y):.1f}" x2="{right}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x in x_ticks:
        out.append(f'<text x="{px(x):.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(x)}</text>')
    return out


def _axis_labels(x_label: str, y_label: str) -> str:
    mid_y = MARGIN_TOP + (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM) / 2
    return (f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_label)}</text>'
            f'<text x="14" y="{mid_y}" text-anchor="middle" transform="rotate(-90 14 {mid_y})">'
            f'{escape(y_label)}</text>')


def _polyline(series: Series, color: str, px, py) -> str:
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in series.points if _finite((x, y)))
    dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>'
                   for x, y in series.points if _finite((x, y)) and len(series.points) <= 32)
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>{dots}'


def _legend(series: Sequence[Series]) -> list[str]:
    out = []
    for i, s in enumerate(series):
        y = MARGIN_TOP + 8 + 14 * i
        color = COLORS[i % len(COLORS)]
        x = WIDTH - MARGIN_RIGHT + 12
        out.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{x + 14}" y="{y + 1}">{escape(s.name)}</text>')
    return out


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2g}"
