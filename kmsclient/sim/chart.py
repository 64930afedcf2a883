"""A simulated fleet's timeline as an SVG chart, written by hand (no plotting library).

Top: licensed clients per group. Bottom: the count each host last reported per
application, with the thresholds (5 and 25) as dashed lines.
"""

from __future__ import annotations

from html import escape

from ..licensing import DAY, HOUR
from .fleet import Timeline

WIDTH = 960
PANEL_HEIGHT = 260
LEFT, RIGHT, TOP, GAP = 64, 220, 48, 64
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
)  # fmt: skip
THRESHOLDS = (5, 25)


def _nice_max(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above
    `value`, at least 5."""
    value = max(value, 5.0)
    scale = 1.0
    while scale * 10 <= value:
        scale *= 10
    for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def _ticks(top: float) -> list[float]:
    return [top * i / 5 for i in range(6)]


def _fmt(value: float) -> str:
    return f"{value:g}" if value < 10_000 else f"{value / 1000:g}k"


class _Panel:
    def __init__(self, y0: float, duration: float, y_max: float) -> None:
        self.y0 = y0
        self.duration = duration
        self.y_max = y_max
        self.width = WIDTH - LEFT - RIGHT

    def x(self, offset: float) -> float:
        return LEFT + self.width * offset / self.duration

    def y(self, value: float) -> float:
        return self.y0 + PANEL_HEIGHT * (1 - value / self.y_max)

    def frame(self, title: str, unit: str) -> list[str]:
        out = [
            f'<text x="{LEFT}" y="{self.y0 - 12}" class="title">{escape(title)}</text>',
            f'<rect x="{LEFT}" y="{self.y0}" width="{self.width}" height="{PANEL_HEIGHT}" '
            'class="frame"/>',
        ]
        for tick in _ticks(self.y_max):
            y = self.y(tick)
            out.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + self.width}" '
                f'y2="{y:.1f}" class="grid"/>'
            )
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="ytick">{_fmt(tick)}</text>')
        days = self.duration / DAY
        every = next(s for s in (1, 2, 5, 7, 10, 14, 30, 60, 90, 180, 365, 1e9) if days / s <= 12)
        if days <= 2:  # hours
            every_h = next(h for h in (1, 2, 3, 6, 12, 24) if self.duration / HOUR / h <= 12)
            marks = [i * every_h * HOUR for i in range(int(self.duration / (every_h * HOUR)) + 1)]
            labels = [f"{int(m // DAY)}d {int(m % DAY // HOUR):02d}h" for m in marks]
        else:
            marks = [i * every * DAY for i in range(int(days / every) + 1)]
            labels = [f"{int(m / DAY)}" for m in marks]
        bottom = self.y0 + PANEL_HEIGHT
        for mark, label in zip(marks, labels, strict=True):
            x = self.x(mark)
            out.append(
                f'<line x1="{x:.1f}" y1="{self.y0}" x2="{x:.1f}" y2="{bottom}" class="grid"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{bottom + 16}" class="xtick">{label}</text>')
        out.append(
            f'<text x="{LEFT + self.width / 2}" y="{bottom + 34}" class="axis">{unit}</text>'
        )
        return out

    def step_line(self, points: list[tuple[float, float | None]], color: str, dashed: bool) -> str:
        """A sample holds the state at the end of its period: drawn across that period;
        None leaves a gap."""
        path = [f"M{self.x(0):.1f},{self.y(0):.1f}"]
        previous = 0.0
        gap = False
        for offset, value in points:
            if value is None:
                gap = True
            elif gap:
                path.append(f"M{self.x(previous):.1f},{self.y(value):.1f}H{self.x(offset):.1f}")
                gap = False
            else:
                path.append(f"V{self.y(value):.1f}H{self.x(offset):.1f}")
            previous = offset
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        return f'<path d="{"".join(path)}" stroke="{color}" class="series"{dash}/>'


def _legend(y0: float, entries: list[tuple[str, str, bool]]) -> list[str]:
    out = []
    x = WIDTH - RIGHT + 16
    for i, (label, color, dashed) in enumerate(entries[:14]):
        y = y0 + 8 + i * 18
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        out.append(
            f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" '
            f'stroke-width="2.5"{dash}/>'
        )
        out.append(f'<text x="{x + 28}" y="{y + 4}" class="legend">{escape(label[:26])}</text>')
    return out


def to_svg(timeline: Timeline) -> str:
    scenario = timeline.scenario
    duration = scenario.duration
    samples = timeline.samples
    groups = [g.name for g in timeline.groups]
    series_keys = sorted({k for s in samples for k in s.counts})
    unit = "days" if duration / DAY > 2 else "time"
    height = TOP + 2 * PANEL_HEIGHT + GAP + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Arial, sans-serif">',
        "<style>.title{font-size:14px;font-weight:bold}.frame{fill:#fff;stroke:#444}"
        ".grid{stroke:#e4e4e4}.ytick{font-size:11px;text-anchor:end}"
        ".xtick{font-size:11px;text-anchor:middle}.axis{font-size:12px;text-anchor:middle}"
        ".legend{font-size:12px}.series{fill:none;stroke-width:2}"
        ".threshold{stroke:#888;stroke-dasharray:3 4}.note{font-size:10px;fill:#666}</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#fafafa"/>',
        f'<text x="{LEFT}" y="22" font-size="16" font-weight="bold">'
        f"{escape(scenario.name)}: {scenario.clients} clients, "
        f"{len(scenario.hosts)} host(s), {duration / DAY:g} days ({escape(timeline.mode)})"
        "</text>",
    ]
    # Licensed clients per group (and their total when there are several groups).
    lines: dict[str, list[tuple[float, float | None]]] = {
        g: [(s.offset, float(s.licensed[g])) for s in samples] for g in groups
    }
    if len(groups) > 1:
        lines["all groups"] = [(s.offset, float(sum(s.licensed.values()))) for s in samples]
    top = _nice_max(max((v or 0 for pts in lines.values() for _, v in pts), default=0))
    panel = _Panel(TOP + 20, duration, top)
    out += panel.frame("Licensed clients", unit)
    legend = []
    for i, (name, points) in enumerate(lines.items()):
        color = "#222" if name == "all groups" else PALETTE[i % len(PALETTE)]
        out.append(panel.step_line(points, color, name == "all groups"))
        legend.append((name, color, name == "all groups"))
    out += _legend(panel.y0, legend)
    # The count each host reported, per application.
    hosts = {h.name: h for h in scenario.hosts}
    counts: dict[str, list[tuple[float, float | None]]] = {k: [] for k in series_keys}
    for s in samples:
        for key in series_keys:
            down = hosts[key.partition("/")[0]].down(s.offset - timeline.step / 2)
            counts[key].append((s.offset, None if down else float(s.counts.get(key, 0))))
    top = _nice_max(max((v or 0 for pts in counts.values() for _, v in pts), default=0) * 1.1)
    panel = _Panel(TOP + 20 + PANEL_HEIGHT + GAP, duration, top)
    out += panel.frame("Count each host last reported, per application (gap: host down)", unit)
    for threshold in THRESHOLDS:
        if threshold < top:
            y = panel.y(threshold)
            out.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + panel.width}" '
                f'y2="{y:.1f}" class="threshold"/>'
            )
            out.append(
                f'<text x="{LEFT + panel.width - 4}" y="{y - 3:.1f}" class="note" '
                f'text-anchor="end">threshold {threshold}</text>'
            )
    legend = []
    for i, key in enumerate(series_keys):
        color = PALETTE[i % len(PALETTE)]
        out.append(panel.step_line(counts[key], color, False))
        legend.append((key, color, False))
    out += _legend(panel.y0, legend)
    out.append("</svg>")
    return "\n".join(x for x in out if x) + "\n"
