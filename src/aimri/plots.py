"""Plots as self-contained SVG strings: no plotting dependency, and they embed in any HTML report."""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [10.0**e * m for e in range(a, b + 1) for m in (1, 2, 5) if lo <= 10.0**e * m <= hi]
        return ticks or [lo, hi]
    step = (hi - lo) / n or 1.0
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= step), default=step)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _frame(
    width: int,
    height: int,
    box: tuple[int, int, int, int],
    title: str,
    y_range: tuple[float, float],
    y_label: str,
    fy: Callable[[float], float],
) -> list[str]:
    """An SVG's opening, title, horizontal y grid with tick labels and the rotated y label; box = (left, top,
    plot width, plot height)."""
    left, top, pw, ph = box
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for t in _ticks(*y_range, False):
        out.append(f'<line x1="{left - 4}" y1="{fy(t):.1f}" x2="{left + pw}" y2="{fy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{fy(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">{escape(y_label)}</text>'
    )
    return out


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    x_label: str,
    y_label: str,
    title: str = "",
    log_x: bool = False,
    notes: dict[str, list[str]] | None = None,
    highlight: tuple[float, float, str] | None = None,
    width: int = 640,
    height: int = 400,
) -> str:
    """Lines with markers, one per series; `notes` labels each point of a series (e.g. its strength);
    `highlight` rings one point (x, y, caption)."""
    points = [p for pts in series.values() for p in pts if all(math.isfinite(v) for v in p)]
    if not points:
        raise ValueError("nothing to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if log_x:
        xs = [x for x in xs if x > 0] or [1.0]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(0.0, min(ys)), max(ys)
    if log_x:
        x_lo, x_hi = x_lo / 1.2, x_hi * 1.2
    else:
        pad = (x_hi - x_lo) * 0.05 or 1.0
        x_lo, x_hi = x_lo - pad, x_hi + pad
    y_hi = y_hi + (y_hi - y_lo) * 0.08 or 1.0
    left, right, top, bottom = 64, 150, 36, 48
    pw, ph = width - left - right, height - top - bottom

    def fx(x: float) -> float:
        if log_x:
            return left + pw * (math.log(max(x, 1e-12)) - math.log(x_lo)) / (math.log(x_hi) - math.log(x_lo))
        return left + pw * (x - x_lo) / (x_hi - x_lo)

    def fy(y: float) -> float:
        return top + ph * (1 - (y - y_lo) / (y_hi - y_lo))

    out = _frame(width, height, (left, top, pw, ph), title, (y_lo, y_hi), y_label, fy)
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _ticks(x_lo, x_hi, log_x):
        out.append(f'<line x1="{fx(t):.1f}" y1="{top + ph}" x2="{fx(t):.1f}" y2="{top + ph + 4}" stroke="#999"/>')
        out.append(f'<text x="{fx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        good = [
            (x, y, j) for j, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)
        ]
        if len(good) > 1:
            path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y, _ in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y, j in good:
            out.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.5" fill="{colour}"/>')
            note = (notes or {}).get(name, [])
            if j < len(note) and note[j]:
                out.append(f'<text x="{fx(x) + 5:.1f}" y="{fy(y) - 5:.1f}" fill="{colour}">{escape(note[j])}</text>')
        out.append(f'<rect x="{left + pw + 12}" y="{top + 6 + 18 * i}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + pw + 26}" y="{top + 15 + 18 * i}">{escape(name)}</text>')
    if highlight is not None:
        x, y, caption = highlight
        out.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="8" fill="none" stroke="black" stroke-width="1.5"/>')
        out.append(f'<text x="{fx(x) + 10:.1f}" y="{fy(y) + 14:.1f}" font-weight="bold">{escape(caption)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_plot(
    groups: dict[str, dict[str, float]], y_label: str, title: str = "", width: int = 640, height: int = 320
) -> str:
    """Grouped bars: `groups` maps a group (e.g. a measure) to {series: value} (e.g. before / after); the
    series keep their colour across groups. Values may be negative (bars hang from zero)."""
    names = list(dict.fromkeys(s for g in groups.values() for s in g))
    values = [v for g in groups.values() for v in g.values() if math.isfinite(v)]
    if not values:
        raise ValueError("nothing to plot")
    y_lo, y_hi = min(0.0, min(values)), max(0.0, max(values))
    y_hi = y_hi + (y_hi - y_lo) * 0.08 or 1.0
    left, right, top, bottom = 64, 120, 36, 64
    pw, ph = width - left - right, height - top - bottom
    slot = pw / max(1, len(groups))
    bar = slot * 0.8 / max(1, len(names))

    def fy(y: float) -> float:
        return top + ph * (1 - (y - y_lo) / (y_hi - y_lo))

    out = _frame(width, height, (left, top, pw, ph), title, (y_lo, y_hi), y_label, fy)
    out.append(f'<line x1="{left}" y1="{fy(0):.1f}" x2="{left + pw}" y2="{fy(0):.1f}" stroke="#999"/>')
    for k, (group, series) in enumerate(groups.items()):
        x0 = left + k * slot + slot * 0.1
        for i, name in enumerate(names):
            v = series.get(name)
            if v is None or not math.isfinite(v):
                continue
            y1, y2 = sorted((fy(0), fy(v)))
            out.append(
                f'<rect x="{x0 + i * bar:.1f}" y="{y1:.1f}" width="{bar * 0.9:.1f}" height="{max(0.5, y2 - y1):.1f}" '
                f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(name)}: {v:.4g}</title></rect>'
            )
        out.append(f'<text x="{x0 + slot * 0.4:.1f}" y="{top + ph + 16}" text-anchor="middle">{escape(group)}</text>')
    for i, name in enumerate(names):
        out.append(
            f'<rect x="{left + pw + 12}" y="{top + 6 + 18 * i}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        )
        out.append(f'<text x="{left + pw + 26}" y="{top + 15 + 18 * i}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
