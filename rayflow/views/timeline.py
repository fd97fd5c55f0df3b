"""The timeline of a swarm run: one row per worker plus the coordinator, colored spans per phase.

It is drawn the way the design's phase diagram reads (decompose, provision, execute, memory sync,
aggregate, in seconds from job start), as a PNG (matplotlib, an optional extra) or as a
self-contained HTML page with an inline SVG that needs nothing from the internet.

Why spans are merged: a 1000-subtask run has thousands of spans, most a few pixels wide.
Back-to-back spans of one phase on one row are drawn as one bar (its tooltip says how many it
holds), which keeps the picture readable and the files small. Labels are drawn only where they fit.
"""

from __future__ import annotations

import html
import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError
from rayflow.wire.subtasks import Phase, PhaseEvent

COORDINATOR = "coordinator"

#: One color per phase, from a palette that color-blind readers can tell apart (Okabe-Ito).
PHASE_COLORS: dict[Phase, str] = {
    Phase.DECOMPOSE: "#CC79A7",
    Phase.PROVISION: "#E69F00",
    Phase.EXECUTE: "#0072B2",
    Phase.MEMORY_SYNC: "#009E73",
    Phase.AGGREGATE: "#D55E00",
}
#: Memory sync happens inside an agent's run, so it is drawn as a thinner bar on top of execute.
THIN_PHASES = frozenset({Phase.MEMORY_SYNC})
FAILED_EDGE = "#B00020"
#: Spans closer than this fraction of the run are merged into one bar (about half a pixel).
MERGE_FRACTION = 1 / 2000
#: Above this many rows, spans carry no text labels.
MAX_LABELLED_ROWS = 30
MAX_LABELS = 400


@dataclass(frozen=True)
class Bar:
    """One drawn bar: one span, or several back-to-back spans of one phase on one row."""

    actor: str
    phase: Phase
    start: float
    end: float
    ok: bool
    count: int
    label: str

    @property
    def duration_s(self) -> float:
        return self.end - self.start


class Timeline:
    """A run's phase events, ordered into rows, with the totals and critical path they imply."""

    def __init__(self, events: Iterable[PhaseEvent], title: str = "swarm run") -> None:
        self.events: list[PhaseEvent] = sorted(events, key=lambda e: (e.start, e.end))
        self.title = title
        self.t0 = min((e.start for e in self.events), default=0.0)
        self.t1 = max((e.end for e in self.events), default=self.t0)

    # --- numbers ------------------------------------------------------------------------------
    @property
    def wall_s(self) -> float:
        """Seconds from the first span's start to the last span's end."""
        return max(0.0, self.t1 - self.t0)

    def rows(self) -> list[str]:
        """The actors, coordinator first, then workers in natural order (w-2 before w-10)."""
        actors = {e.actor for e in self.events}
        workers = sorted(actors - {COORDINATOR}, key=_natural_key)
        return ([COORDINATOR] if COORDINATOR in actors else []) + workers

    def phase_totals(self) -> dict[str, float]:
        """Wall seconds during which each phase ran anywhere (overlapping spans counted once)."""
        totals: dict[str, float] = {}
        for phase in Phase:
            spans = [(e.start, e.end) for e in self.events if e.phase is phase]
            if spans:
                totals[phase.value] = round(_union_length(spans), 6)
        return totals

    def phase_busy_s(self) -> dict[str, float]:
        """Seconds spent in each phase summed over all actors (20 workers provisioning 1 s = 20 s)."""
        busy: dict[str, float] = {}
        for e in self.events:
            busy[e.phase.value] = busy.get(e.phase.value, 0.0) + max(0.0, e.end - e.start)
        return {k: round(v, 6) for k, v in busy.items()}

    def critical_path(self) -> list[PhaseEvent]:
        """The chain of spans that decided when the run ended, earliest first.

        Walks back from the span that ended last; each step goes to the span that ended last
        before the current one started (what it most plausibly waited for). Spans nested inside
        another span of the same actor (a memory search during an agent's run) are part of their
        parent, not steps of their own. Idle gaps are not on the path, so
        ``critical_path_s <= wall_s`` and the difference is time spent waiting.
        """
        top_level = _outermost(self.events)
        if not top_level:
            return []
        by_end = sorted(top_level, key=lambda e: (e.end, e.start))
        ends = [e.end for e in by_end]
        tolerance = self.wall_s * 1e-9
        position = len(by_end) - 1
        chain = [by_end[position]]
        while True:
            candidate = min(bisect_right(ends, chain[-1].start + tolerance), position) - 1
            if candidate < 0:
                break
            position = candidate
            chain.append(by_end[position])
        return chain[::-1]

    @property
    def critical_path_s(self) -> float:
        """Length of :meth:`critical_path`: the run's time with every wait removed."""
        return round(sum(max(0.0, e.end - e.start) for e in self.critical_path()), 6)

    def bars(self) -> list[Bar]:
        """The spans as drawn: per row and phase, back-to-back spans merged into one bar."""
        tolerance = self.wall_s * MERGE_FRACTION
        groups: dict[tuple[str, Phase, bool], list[PhaseEvent]] = {}
        for e in self.events:
            groups.setdefault((e.actor, e.phase, e.ok), []).append(e)
        bars: list[Bar] = []
        for (actor, phase, ok), spans in groups.items():
            current: Bar | None = None
            for e in spans:  # already sorted by start
                if current is not None and e.start <= current.end + tolerance:
                    current = Bar(
                        actor,
                        phase,
                        current.start,
                        max(current.end, e.end),
                        ok,
                        current.count + 1,
                        current.label,
                    )
                    continue
                if current is not None:
                    bars.append(current)
                current = Bar(actor, phase, e.start, e.end, ok, 1, e.label)
            if current is not None:
                bars.append(current)
        return bars

    # --- PNG ----------------------------------------------------------------------------------
    def plot(self, path_png: str | Path, *, width_in: float = 12.0, dpi: int = 110) -> Path:
        """Draw the timeline to a PNG: rows of phase-colored bars, a legend, seconds from start."""
        plt = _pyplot()
        rows = self.rows()
        row_of = {actor: i for i, actor in enumerate(rows)}
        height_in = min(30.0, max(3.2, 1.9 + 0.3 * max(1, len(rows))))
        fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=dpi)
        try:
            bars = self.bars()
            self._draw_bars(ax, bars, row_of)
            self._draw_labels(ax, bars, row_of, axis_px=width_in * dpi * 0.8)
            self._style_axes(ax, rows)
            self._draw_legend(ax)
            path = Path(path_png)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path

    def _draw_bars(self, ax: Any, bars: Sequence[Bar], row_of: dict[str, int]) -> None:
        grouped: dict[tuple[str, Phase, bool], list[tuple[float, float]]] = {}
        for bar in bars:
            grouped.setdefault((bar.actor, bar.phase, bar.ok), []).append(
                (bar.start - self.t0, bar.duration_s)
            )
        for (actor, phase, ok), ranges in grouped.items():
            thin = phase in THIN_PHASES
            height = 0.34 if thin else 0.72
            ax.broken_barh(
                ranges,
                (row_of[actor] - height / 2, height),
                facecolors=PHASE_COLORS[phase],
                edgecolors=FAILED_EDGE if not ok else "none",
                linewidth=1.2 if not ok else 0,
                hatch="////" if not ok else None,
                zorder=3 if thin else 2,
            )

    def _draw_labels(self, ax: Any, bars: Sequence[Bar], row_of: dict[str, int], axis_px: float) -> None:
        if len(row_of) > MAX_LABELLED_ROWS or self.wall_s <= 0:
            return
        px_per_s = axis_px / self.wall_s
        drawn = 0
        for bar in bars:
            if bar.count != 1 or not bar.label or bar.phase in THIN_PHASES:
                continue
            if bar.duration_s * px_per_s < 6.5 * len(bar.label) + 6:
                continue
            ax.text(
                bar.start - self.t0 + bar.duration_s / 2,
                row_of[bar.actor],
                bar.label,
                ha="center",
                va="center",
                fontsize=7.5,
                color="white",
                zorder=4,
                clip_on=True,
            )
            drawn += 1
            if drawn >= MAX_LABELS:
                return

    def _style_axes(self, ax: Any, rows: Sequence[str]) -> None:
        ax.set_ylim(max(1, len(rows)) - 0.5, -0.5)
        ax.set_xlim(0, max(self.wall_s, 1e-3) * 1.01)
        step = max(1, math.ceil(len(rows) / 60))
        ax.set_yticks(range(0, len(rows), step))
        ax.set_yticklabels(rows[::step], fontsize=8 if len(rows) <= 40 else 6)
        ax.set_xlabel("seconds from job start")
        ax.grid(axis="x", color="#dddddd", zorder=0)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        workers = len(rows) - (1 if COORDINATOR in rows else 0)
        ax.set_title(
            f"{self.title}: {workers} workers, {len(self.events)} spans, wall {self.wall_s:.2f} s, "
            f"critical path {self.critical_path_s:.2f} s",
            fontsize=10,
            loc="left",
        )
        if not self.events:
            ax.text(0.5, 0.5, "no phase events", transform=ax.transAxes, ha="center")

    def _draw_legend(self, ax: Any) -> None:
        from matplotlib.patches import Patch

        totals, busy = self.phase_totals(), self.phase_busy_s()
        handles = [
            Patch(
                facecolor=PHASE_COLORS[phase],
                label=f"{phase.value.replace('_', ' ')}  {totals[phase.value]:.2f} s · Σ {busy[phase.value]:.2f} s",
            )
            for phase in Phase
            if phase.value in totals
        ]
        if any(not e.ok for e in self.events):
            handles.append(Patch(facecolor="white", edgecolor=FAILED_EDGE, hatch="////", label="failed"))
        if handles:
            ax.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                fontsize=8,
                frameon=False,
                title="phase: wall · summed over rows",
                title_fontsize=8,
                alignment="left",
            )

    # --- HTML ---------------------------------------------------------------------------------
    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page with the timeline as inline SVG (tooltips, no scripts)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.html(), encoding="utf-8")
        return target

    def html(self) -> str:
        """The page :meth:`to_html` writes."""
        return _HtmlTimeline(self).render()


class _HtmlTimeline:
    """Lays a timeline out as SVG: a name column, one band per row, a time axis on top."""

    LABEL_W = 170
    PLOT_W = 900
    AXIS_H = 28

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.rows = timeline.rows()
        self.row_h = 20 if len(self.rows) <= 100 else 12
        self.scale = self.PLOT_W / max(timeline.wall_s, 1e-3)

    def x(self, t: float) -> float:
        return self.LABEL_W + (t - self.timeline.t0) * self.scale

    def render(self) -> str:
        tl = self.timeline
        height = self.AXIS_H + self.row_h * len(self.rows) + 8
        width = self.LABEL_W + self.PLOT_W + 20
        opening = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        svg = [opening + 'font-family="sans-serif" font-size="11">', _FAILED_PATTERN]
        svg.extend(self._axis(height))
        svg.extend(self._row_bands(width))
        svg.extend(self._bar_rects())
        svg.append("</svg>")
        totals, busy = tl.phase_totals(), tl.phase_busy_s()
        legend = "".join(
            f'<span class="key"><i style="background:{PHASE_COLORS[p]}"></i>'
            f"{html.escape(p.value.replace('_', ' '))} {totals[p.value]:.2f} s wall, "
            f"{busy[p.value]:.2f} s summed</span>"
            for p in Phase
            if p.value in totals
        )
        workers = len(self.rows) - (1 if COORDINATOR in self.rows else 0)
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>{html.escape(tl.title)} timeline</title><style>"
            "body{font-family:sans-serif;margin:16px;color:#222}"
            ".key{margin-right:14px;white-space:nowrap}"
            ".key i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}"
            "</style></head><body>"
            f"<h3>{html.escape(tl.title)}</h3>"
            f"<p>{workers} workers, {len(tl.events)} spans, wall {tl.wall_s:.2f} s, "
            f"critical path {tl.critical_path_s:.2f} s. Hover a bar for details; hatched bars failed.</p>"
            f"<p>{legend}</p>{''.join(svg)}</body></html>\n"
        )

    def _axis(self, height: int) -> list[str]:
        wall = self.timeline.wall_s
        step = _nice_step(wall)
        parts = []
        tick = 0.0
        while tick <= wall + step * 1e-9:
            x = self.x(self.timeline.t0 + tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{self.AXIS_H - 6}" x2="{x:.1f}" y2="{height}" stroke="#e4e4e4"/>'
            )
            parts.append(
                f'<text x="{x:.1f}" y="{self.AXIS_H - 10}" text-anchor="middle">{_format_tick(tick, step)}</text>'
            )
            tick += step
        parts.append(
            f'<text x="{self.LABEL_W - 14}" y="{self.AXIS_H - 10}" text-anchor="end" fill="#666">seconds</text>'
        )
        return parts

    def _row_bands(self, width: int) -> list[str]:
        parts = []
        for i, actor in enumerate(self.rows):
            y = self.AXIS_H + i * self.row_h
            if i % 2:
                parts.append(f'<rect x="0" y="{y}" width="{width}" height="{self.row_h}" fill="#f6f6f6"/>')
            parts.append(
                f'<text class="row" x="{self.LABEL_W - 8}" y="{y + self.row_h * 0.7:.1f}" '
                f'text-anchor="end">{html.escape(actor)}</text>'
            )
        return parts

    def _bar_rects(self) -> list[str]:
        row_of = {actor: i for i, actor in enumerate(self.rows)}
        parts = []
        ordered = sorted(self.timeline.bars(), key=lambda b: b.phase in THIN_PHASES)
        for bar in ordered:
            thin = bar.phase in THIN_PHASES
            bar_h = self.row_h * (0.4 if thin else 0.75)
            y = self.AXIS_H + row_of[bar.actor] * self.row_h + (self.row_h - bar_h) / 2
            w = max(0.8, bar.duration_s * self.scale)
            what = f"{bar.count} spans" if bar.count > 1 else (bar.label or "span")
            tip = (
                f"{bar.actor} · {bar.phase.value} · {what} · {bar.start - self.timeline.t0:.2f}–"
                f"{bar.end - self.timeline.t0:.2f} s ({bar.duration_s:.2f} s){'' if bar.ok else ' · FAILED'}"
            )
            box = f'x="{self.x(bar.start):.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h:.1f}"'
            hatch = (
                ""
                if bar.ok
                else f'<rect {box} fill="url(#failed)" stroke="{FAILED_EDGE}" stroke-width="1.2"/>'
            )
            parts.append(
                f'<g><title>{html.escape(tip)}</title><rect {box} fill="{PHASE_COLORS[bar.phase]}"/>{hatch}</g>'
            )
        return parts


#: Diagonal stripes laid over failed bars, the SVG twin of the PNG's hatching.
_FAILED_PATTERN = (
    '<defs><pattern id="failed" width="6" height="6" patternUnits="userSpaceOnUse" '
    'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" '
    f'stroke="{FAILED_EDGE}" stroke-width="2"/></pattern></defs>'
)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), or a clear error."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(
            "drawing a timeline needs matplotlib: pip install 'rayflow[plots]' "
            "(or use Timeline.to_html, which needs nothing extra)"
        ) from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _outermost(events: Sequence[PhaseEvent]) -> list[PhaseEvent]:
    """The events not lying wholly inside an earlier-starting event of the same actor."""
    reach: dict[str, float] = {}
    kept: list[PhaseEvent] = []
    for e in sorted(events, key=lambda e: (e.start, -e.end)):
        if e.end <= reach.get(e.actor, -math.inf):
            continue
        kept.append(e)
        reach[e.actor] = max(reach.get(e.actor, -math.inf), e.end)
    return kept


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _union_length(spans: Sequence[tuple[float, float]]) -> float:
    total = 0.0
    current_start, current_end = None, None
    for start, end in sorted(spans):
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def _nice_step(span: float, target_ticks: int = 8) -> float:
    """A 1, 2 or 5 times a power of ten step that cuts ``span`` into about ``target_ticks`` parts."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * magnitude >= raw:
            return multiple * magnitude
    return 10 * magnitude


def _format_tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"
