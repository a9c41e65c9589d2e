"""Server-side SVG line charts for the dashboard (standard library only).

`line_chart` draws time series (x = unix seconds, labelled relative to the right edge: "-5 min" ... "now");
`progress_chart` draws a batch's cumulative finished requests against the time since it started. Both
return one self-contained `<svg>` element that scales to its container (width 100%, viewBox), the same
string for the same input, every label HTML-escaped. htmx swaps them into the live page.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito: distinguishable under the common colour-vision deficiencies (its yellow is too pale on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#999999")
_X_STEPS = (1, 2, 3, 5, 10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_CHAR_W = 6.2            # average glyph width of 11 px sans-serif, for layout estimates
_LEFT, _RIGHT, _TOP = 58, 18, 30   # plot margins: y tick labels + unit, "now" label, title
_X_LABELS, _LEGEND_ROW, _LEGEND_MAX_CHARS = 22, 16, 40


@dataclass
class Series:
    label: str                                   # legend text, e.g. "p99 worker-a"
    points: list[tuple[float, float | None]]     # (x = unix seconds, y); y None = gap: the line breaks
    color: str | None = None                     # CSS colour; default: PALETTE in order
    dashed: bool = False


@dataclass
class Threshold:
    label: str                                   # e.g. "SLO 1000 ms"
    value: float
    color: str = "#d62728"


def compact(v: float) -> str:
    """Short tick label: 1200 -> '1.2k', 250 -> '250', 0.5 -> '0.5', 3e6 -> '3M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.4g}{suffix}"
    return f"{v:.4g}"


def _n(v: float) -> str:
    """A coordinate rounded to 1 decimal, without a trailing '.0'."""
    s = f"{v:.1f}"
    s = s[:-2] if s.endswith(".0") else s
    return "0" if s == "-0" else s


def _nice_step(raw: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k that is >= raw."""
    if raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10.0 ** exp >= raw * (1 - 1e-9):
            return float(f"{m * 10.0 ** exp:.12g}")
    return float(f"{10.0 ** (exp + 1):.12g}")


def _y_ticks(lo: float, hi: float, min_step: float = 0.0) -> list[float]:
    """Nice round ticks from lo (rounded down to a tick) up to at least hi: 4-6 of them."""
    hi = hi if hi > lo else lo + 1
    step = max(_nice_step((hi - lo) / 5), min_step)
    while True:
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first <= 5:
            return [float(f"{k * step:.12g}") for k in range(first, last + 1)]
        step = _nice_step(step * 1.001)


def _x_ticks(x0: float, x1: float, from_right: bool) -> list[tuple[float, str]]:
    """(x, label) ticks every 'nice' interval, 4-7 of them, labelled relative to the right edge
    ('-2 min', ..., 'now') or to the left one ('0', '+1 min', ...)."""
    span = x1 - x0
    step = next((s for s in _X_STEPS if span / s < 7), 3600 * math.ceil(span / 3600 / 6))
    div, unit = (3600, "h") if step % 3600 == 0 else (60, "min") if step % 60 == 0 else (1, "s")
    ticks = []
    for k in range(math.floor(span / step + 1e-9) + 1):
        amount = f"{k * step // div} {unit}"
        if from_right:
            ticks.append((x1 - k * step, f"-{amount}" if k else "now"))
        else:
            ticks.append((x0 + k * step, f"+{amount}" if k else "0"))
    return ticks


def _legend_rows(entries: list[tuple[str, str, bool]], avail: float) -> list[list[tuple[float, tuple]]]:
    """Greedy wrapping of (label, colour, dashed) entries into rows of (x offset, entry)."""
    rows: list[list[tuple[float, tuple]]] = []
    x = avail + 1
    for entry in entries:
        w = 24 + min(len(entry[0]), _LEGEND_MAX_CHARS) * _CHAR_W + 16
        if x + w > avail and (not rows or rows[-1]):
            rows.append([])
            x = 0.0
        rows[-1].append((x, entry))
        x += w
    return rows


def _dash(dashed: bool) -> str:
    return ' stroke-dasharray="6 4"' if dashed else ""


def _chart(title: str, series: Sequence[Series], thresholds: Sequence[Threshold], *, y_unit: str,
           x_range: tuple[float, float], from_right: bool, y_min: float, y_max: float | None,
           width: int, height: int, y_format: Callable[[float], str] | None, min_step: float = 0.0) -> str:
    x0, x1 = x_range
    fmt = y_format or compact
    colours = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    values = [y for s in series for x, y in s.points if y is not None and x0 <= x <= x1]
    if y_max is None:
        top = max([*values, *(t.value for t in thresholds), y_min])
        y_max = y_min + (top - y_min) * 1.1          # headroom above the highest point or threshold
    ticks = _y_ticks(y_min, y_max, min_step)
    lo, hi = ticks[0], ticks[-1]

    entries = [(s.label, c, s.dashed) for s, c in zip(series, colours)]
    entries += [(t.label, t.color, True) for t in thresholds]
    rows = _legend_rows(entries, width - _LEFT - _RIGHT)
    pl, pr, pt = _LEFT, width - _RIGHT, _TOP
    pb = max(pt + 60, height - _X_LABELS - 4 - len(rows) * _LEGEND_ROW)
    h = max(height, pb + _X_LABELS + 4 + len(rows) * _LEGEND_ROW)

    def xp(x: float) -> str:
        return _n(pl + (x - x0) / (x1 - x0) * (pr - pl))

    def yp(y: float) -> str:
        return _n(pb - (min(max(y, lo), hi) - lo) / (hi - lo) * (pb - pt))

    t = escape(title)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{t}" '
           f'viewBox="0 0 {width} {h}" width="100%" font-family="system-ui, -apple-system, Segoe UI, sans-serif" '
           f'font-size="11" fill="#333">', f"<title>{t}</title>",
           f'<rect width="{width}" height="{h}" fill="#fff"/>',
           f'<text class="chart-title" x="8" y="18" font-size="13" font-weight="600">{t}</text>']
    out.append('<g class="y-axis">')
    for v in ticks:                                 # horizontal grid + y tick labels
        out.append(f'<line x1="{pl}" x2="{pr}" y1="{yp(v)}" y2="{yp(v)}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{pl - 6}" y="{_n(float(yp(v)) + 4)}" text-anchor="end">{escape(fmt(v))}</text>')
    out.append('</g><g class="x-axis">')
    for x, label in _x_ticks(x0, x1, from_right):   # x tick marks + labels
        out.append(f'<line x1="{xp(x)}" x2="{xp(x)}" y1="{pb}" y2="{pb + 4}" stroke="#888"/>')
        half = len(label) * _CHAR_W / 2              # keep edge labels ("+4 min") inside the chart
        cx = max(half + 2, min(float(xp(x)), width - half - 2))
        out.append(f'<text x="{_n(cx)}" y="{pb + 16}" text-anchor="middle">{escape(label)}</text>')
    out.append(f'</g><path class="axes" d="M{pl} {pt}V{pb}H{pr}" fill="none" stroke="#888"/>')
    out.append(f'<text class="unit" transform="rotate(-90)" x="{_n(-(pt + pb) / 2)}" y="13" text-anchor="middle">'
               f'{escape(y_unit)}</text>')

    visible = [th for th in thresholds if lo <= th.value <= hi]
    for th in visible:
        out.append(f'<line class="threshold" x1="{pl}" x2="{pr}" y1="{yp(th.value)}" y2="{yp(th.value)}" '
                   f'stroke="{escape(th.color)}" stroke-width="1.5" stroke-dasharray="5 4"/>')
    drawn = False
    for s, colour in zip(series, colours):
        segments: list[list[str]] = [[]]
        for x, y in s.points:
            if y is None:
                segments.append([])
            elif x0 <= x <= x1:
                segments[-1].append(f"{xp(x)},{yp(y)}")
        out.append(f'<g class="series" stroke="{escape(colour)}" fill="{escape(colour)}">')
        for seg in segments:
            if len(seg) == 1:                       # an isolated point: a dot, not an invisible line
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" stroke="none"/>')
            elif seg:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke-width="2" '
                           f'stroke-linejoin="round"{_dash(s.dashed)}/>')
            drawn = drawn or bool(seg)
        out.append("</g>")
    for th in visible:                              # labels last, haloed, so lines never hide them
        y = float(yp(th.value))
        ly = y - 4 if y - 14 >= pt else y + 13
        out.append(f'<text class="threshold-label" x="{pr - 4}" y="{_n(ly)}" text-anchor="end" '
                   f'fill="{escape(th.color)}" stroke="#fff" stroke-width="3" paint-order="stroke">'
                   f'{escape(th.label)}</text>')
    if not drawn:
        out.append(f'<text class="empty" x="{_n((pl + pr) / 2)}" y="{_n((pt + pb) / 2)}" text-anchor="middle" '
                   f'font-size="13" fill="#777">no data yet</text>')

    for r, row in enumerate(rows):                  # legend, in rows under the x labels
        y = pb + _X_LABELS + 8 + r * _LEGEND_ROW
        for dx, (label, colour, dashed) in row:
            x = pl + dx
            short = label if len(label) <= _LEGEND_MAX_CHARS else label[:_LEGEND_MAX_CHARS - 1] + "\u2026"
            tip = f"<title>{escape(label)}</title>" if short != label else ""
            out.append(f'<g class="legend">{tip}<line x1="{_n(x)}" x2="{_n(x + 18)}" y1="{y}" y2="{y}" '
                       f'stroke="{escape(colour)}" stroke-width="2.5"{_dash(dashed)}/>'
                       f'<text x="{_n(x + 23)}" y="{y + 4}">{escape(short)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def line_chart(title: str, series: list[Series], *, y_unit: str, thresholds: Sequence[Threshold] = (),
               x_window: tuple[float, float] | None = None, y_min: float = 0.0, y_max: float | None = None,
               width: int = 640, height: int = 260, y_format: Callable[[float], str] | None = None) -> str:
    """Time series against unix seconds. The x axis spans `x_window` when given (points outside it are
    left out), else the data's extent; the y axis runs from `y_min` to a nice maximum covering the data
    and thresholds with headroom, or to `y_max` (rounded up to a tick) when given."""
    if x_window is None:
        xs = [x for s in series for x, y in s.points if y is not None]
        x1 = max(xs, default=0.0)
        x_window = (min(xs, default=x1 - 300), x1)
    x0, x1 = x_window
    if x1 <= x0:
        x0 = x1 - 60
    return _chart(title, series, thresholds, y_unit=y_unit, x_range=(x0, x1), from_right=True, y_min=y_min,
                  y_max=y_max, width=width, height=height, y_format=y_format)


def progress_chart(title: str, points: list[tuple[float, float]], *, total: int, width: int = 640,
                   height: int = 220, start: float = 0.0) -> str:
    """Cumulative finished requests of a batch: `points` are (x, finished so far) with x in seconds since
    the batch started (or unix seconds with `start` = its start time). y runs from 0 to `total`."""
    elapsed = [(x - start, y) for x, y in points]
    if elapsed and elapsed[0][0] > 0:
        elapsed.insert(0, (0.0, 0.0))              # nothing had finished when the batch started
    end = max([x for x, _ in elapsed] + [60.0])
    finished = Series("finished", list(elapsed))
    return _chart(title, [finished], [Threshold(f"total {total}", total, "#666666")], y_unit="requests",
                  x_range=(0.0, end), from_right=False, y_min=0.0, y_max=max(total, 1), width=width,
                  height=height, y_format=None, min_step=1.0)
