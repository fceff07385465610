"""Charts for the console: small inline SVG drawn on the server, so the page needs no script.

One kind of chart covers the console's figures: horizontal bars with an optional interval per bar
(metrics against baselines, per activity bucket, conversion and revenue per variant). Labels are
escaped here; the result is marked safe for the templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

BAR = 20
GAP = 6
LABEL_WIDTH = 170
VALUE_WIDTH = 190
PLOT_WIDTH = 300


@dataclass(frozen=True)
class Bar:
    """One bar: its label, value, optional interval ``(low, high)`` and whether it is highlighted."""

    label: str
    value: float | None
    interval: tuple[float, float] | None = None
    highlight: bool = False


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def bars(
    rows: Sequence[Bar],
    *,
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:.4f}",
) -> Markup:
    """A horizontal bar chart with interval whiskers, as an ``<svg>`` element.

    The scale starts at 0 (or the lowest value when one is negative) and ends at the largest value
    or interval end; a bar without a value is drawn as "n/a".
    """
    values = [x for r in rows for x in (r.value, *(r.interval or ())) if _finite(x)]
    low = min([0.0, *values])
    high = max([0.0, *values])
    span = (high - low) or 1.0

    def x(v: float) -> float:
        return LABEL_WIDTH + PLOT_WIDTH * (v - low) / span

    height = len(rows) * (BAR + GAP) + 30
    width = LABEL_WIDTH + PLOT_WIDTH + VALUE_WIDTH
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
        f'<text x="0" y="14" class="chart-title">{escape(title)}</text>',
        f'<line x1="{x(0):.1f}" y1="20" x2="{x(0):.1f}" y2="{height - 4}" class="axis"/>',
    ]
    for i, row in enumerate(rows):
        top = 24 + i * (BAR + GAP)
        mid = top + BAR / 2
        parts.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{mid + 4:.1f}" text-anchor="end">{escape(row.label)}</text>'
        )
        if not _finite(row.value):
            parts.append(f'<text x="{LABEL_WIDTH + 4}" y="{mid + 4:.1f}" class="na">n/a</text>')
            continue
        assert row.value is not None
        left, right = sorted((x(0), x(row.value)))
        cls = "bar highlight" if row.highlight else "bar"
        width_px = max(right - left, 1)
        parts.append(f'<rect x="{left:.1f}" y="{top}" width="{width_px:.1f}" height="{BAR}" class="{cls}"/>')
        label = fmt(row.value)
        if row.interval is not None and all(_finite(v) for v in row.interval):
            lo, hi = row.interval
            parts.append(f'<line x1="{x(lo):.1f}" y1="{mid}" x2="{x(hi):.1f}" y2="{mid}" class="whisker"/>')
            for end in (x(lo), x(hi)):
                y1, y2 = top + 4, top + BAR - 4
                parts.append(f'<line x1="{end:.1f}" y1="{y1}" x2="{end:.1f}" y2="{y2}" class="whisker"/>')
            label += f" [{fmt(lo)}, {fmt(hi)}]"
        parts.append(
            f'<text x="{LABEL_WIDTH + PLOT_WIDTH + 8}" y="{mid + 4:.1f}" class="value">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
