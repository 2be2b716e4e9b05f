"""An audience's growth as an SVG chart drawn on the server: geometry only (pure), the
template writes the elements, so every label is escaped like any other text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from audience_sync.pages import RunPoint

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP = 64, 12, 12
LINE_BOTTOM = 150  # members: a line in the upper band
BARS_TOP, BARS_BOTTOM = 166, 248  # entered up, exited down, around a middle axis


@dataclass(frozen=True)
class Bar:
    run_id: int
    x: float
    y: float
    width: float
    height: float
    count: int
    started_at: str | None


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class GrowthChart:
    """Members after each run (a polyline with a dot per run) and entered/exited bars."""

    width: int
    height: int
    points: str  # the polyline's "x,y x,y …"
    dots: list[tuple[float, float, RunPoint]]
    entered: list[Bar]
    exited: list[Bar]
    ticks: list[Tick]
    axis_y: float  # the bars' zero line
    bar_scale: int  # the largest entered or exited count, the bars' full height
    left: int
    right: int


def growth_chart(runs: Sequence[RunPoint]) -> GrowthChart | None:
    """The chart of ``runs`` (oldest first), or None when there is none to draw."""
    if not runs:
        return None
    plot = WIDTH - LEFT - RIGHT
    step = plot / len(runs)
    top = max(max(r.members for r in runs), 1)
    ceiling = _round_up(top)

    def member_y(members: int) -> float:
        return round(LINE_BOTTOM - (LINE_BOTTOM - TOP) * members / ceiling, 1)

    dots = [(round(LEFT + step * (i + 0.5), 1), member_y(r.members), r) for i, r in enumerate(runs)]
    axis = (BARS_TOP + BARS_BOTTOM) / 2
    half = (BARS_BOTTOM - BARS_TOP) / 2
    scale = max(max(max(r.entered, r.exited) for r in runs), 1)
    width = round(max(step * 0.7, 1.0), 1)
    entered, exited = [], []
    for i, r in enumerate(runs):
        x = round(LEFT + step * i + (step - width) / 2, 1)
        up = round(half * r.entered / scale, 1) if r.entered else 0.0
        down = round(half * r.exited / scale, 1) if r.exited else 0.0
        # A run that moved anyone gets a visible bar, however small next to the largest.
        if r.entered:
            up = max(up, 1.0)
            entered.append(Bar(r.run_id, x, axis - up, width, up, r.entered, r.started_at))
        if r.exited:
            down = max(down, 1.0)
            exited.append(Bar(r.run_id, x, axis, width, down, r.exited, r.started_at))
    ticks = [Tick(member_y(v), f"{v:,}") for v in (0, ceiling // 2, ceiling)]
    return GrowthChart(
        width=WIDTH,
        height=HEIGHT,
        points=" ".join(f"{x},{y}" for x, y, _ in dots),
        dots=dots,
        entered=entered,
        exited=exited,
        ticks=ticks,
        axis_y=axis,
        bar_scale=scale,
        left=LEFT,
        right=WIDTH - RIGHT,
    )


def _round_up(value: int) -> int:
    """``value`` rounded up to a number an axis can show: 1, 2 or 5 times a power of ten."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if value <= factor * magnitude:
                return factor * magnitude
        magnitude *= 10
