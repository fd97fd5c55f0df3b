"""The run timeline: rows, phase totals, critical path, and the PNG and HTML drawings of it."""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

import pytest

from rayflow.errors import ConfigError
from rayflow.views.timeline import Timeline
from rayflow.wire.subtasks import Phase, PhaseEvent

T0 = 1_700_000_000.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_run(workers: int, subtasks: int, seed: int = 11) -> list[PhaseEvent]:
    """Decompose, provision every worker, run subtasks on whichever worker is free, aggregate."""
    rng = random.Random(seed)
    events = [PhaseEvent(Phase.DECOMPOSE, "coordinator", T0, T0 + 0.3, "decompose")]
    free_at: dict[str, float] = {}
    for w in range(workers):
        start = T0 + 0.3 + rng.uniform(0.0, 0.2)
        end = start + rng.uniform(0.5, 1.5)
        events.append(PhaseEvent(Phase.PROVISION, f"w-{w}", start, end, "sandbox"))
        free_at[f"w-{w}"] = end
    for i in range(subtasks):
        worker = min(free_at, key=free_at.__getitem__)
        start = free_at[worker]
        duration = rng.uniform(0.2, 3.0)
        events.append(
            PhaseEvent(Phase.EXECUTE, worker, start, start + duration, f"s-{i}", rng.random() > 0.05)
        )
        events.append(PhaseEvent(Phase.MEMORY_SYNC, worker, start + 0.05, start + 0.1, "search"))
        free_at[worker] = start + duration + 0.01
    end = max(free_at.values())
    events.append(PhaseEvent(Phase.AGGREGATE, "coordinator", end, end + 0.5, "synthesis"))
    return events


def spans(*rows: tuple[Phase, str, float, float]) -> list[PhaseEvent]:
    """One event per ``(phase, actor, start, end)`` row, times in seconds after ``T0``."""
    return [PhaseEvent(phase, actor, T0 + start, T0 + end) for phase, actor, start, end in rows]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_rows_put_the_coordinator_first_then_workers_in_natural_order() -> None:
    events = [PhaseEvent(Phase.EXECUTE, actor, T0, T0 + 1) for actor in ("w-10", "w-2", "coordinator", "w-1")]
    assert Timeline(events).rows() == ["coordinator", "w-1", "w-2", "w-10"]


def test_phase_totals_count_overlapping_spans_once() -> None:
    events = spans(
        (Phase.PROVISION, "w-0", 0, 2),
        (Phase.PROVISION, "w-1", 1, 3),
        (Phase.EXECUTE, "w-0", 3, 4),
        (Phase.EXECUTE, "w-1", 6, 7),
    )
    assert Timeline(events).phase_totals() == {"provision": 3.0, "execute": 2.0}


def test_phase_busy_sums_over_actors() -> None:
    events = [PhaseEvent(Phase.PROVISION, f"w-{i}", T0, T0 + 1.5) for i in range(4)]
    assert Timeline(events).phase_busy_s() == {"provision": 6.0}


def test_critical_path_follows_the_chain_that_ended_last() -> None:
    events = spans(
        (Phase.DECOMPOSE, "coordinator", 0, 1),
        (Phase.PROVISION, "w-0", 1, 3),
        (Phase.PROVISION, "w-1", 1, 2),
        (Phase.EXECUTE, "w-0", 3, 10),
        (Phase.EXECUTE, "w-1", 2, 5),
        (Phase.AGGREGATE, "coordinator", 12, 13),
    )
    timeline = Timeline(events)
    assert [(e.phase, e.actor) for e in timeline.critical_path()] == [
        (Phase.DECOMPOSE, "coordinator"),
        (Phase.PROVISION, "w-0"),
        (Phase.EXECUTE, "w-0"),
        (Phase.AGGREGATE, "coordinator"),
    ]
    assert timeline.critical_path_s == 11.0
    assert timeline.wall_s == 13.0


def test_spans_nested_in_an_agent_run_do_not_cut_the_critical_path_short() -> None:
    events = spans(
        (Phase.EXECUTE, "w-0", 0, 10),
        (Phase.MEMORY_SYNC, "w-0", 9, 10),
        (Phase.AGGREGATE, "coordinator", 10, 11),
    )
    assert Timeline(events).critical_path_s == 11.0


def test_back_to_back_spans_of_a_row_merge_into_one_bar() -> None:
    events = [PhaseEvent(Phase.EXECUTE, "w-0", T0 + i, T0 + i + 1, f"s-{i}") for i in range(1000)]
    bars = Timeline(events).bars()
    assert len(bars) == 1
    assert bars[0].count == 1000


def test_a_failed_span_is_its_own_bar_between_merged_ones() -> None:
    events = [PhaseEvent(Phase.EXECUTE, "w-0", T0 + i, T0 + i + 1, ok=i != 5) for i in range(10)]
    assert sorted((b.ok, b.count) for b in Timeline(events).bars()) == [(False, 1), (True, 4), (True, 5)]


def test_plot_writes_a_png_of_sane_size_for_twelve_workers(tmp_path: Path) -> None:
    path = Timeline(synthetic_run(12, 48), title="twelve").plot(tmp_path / "run.png")
    width, height = png_size(path)
    assert 800 <= width <= 2500
    assert 300 <= height <= 1500


def test_plot_of_twenty_workers_and_a_thousand_subtasks_stays_small(tmp_path: Path) -> None:
    path = Timeline(synthetic_run(20, 1000)).plot(tmp_path / "big.png")
    width, height = png_size(path)
    assert width <= 2500 and height <= 2000
    assert path.stat().st_size < 1_000_000


def test_plot_of_no_events_still_writes_a_png(tmp_path: Path) -> None:
    png_size(Timeline([]).plot(tmp_path / "empty.png"))


def test_plot_without_matplotlib_raises_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="plots"):
        Timeline(synthetic_run(2, 2)).plot(tmp_path / "x.png")


def test_html_has_a_row_for_every_worker(tmp_path: Path) -> None:
    path = Timeline(synthetic_run(20, 1000)).to_html(tmp_path / "run.html")
    page = path.read_text(encoding="utf-8")
    for name in ["coordinator", *(f"w-{i}" for i in range(20))]:
        assert f">{name}</text>" in page


def test_html_is_self_contained(tmp_path: Path) -> None:
    page = Timeline(synthetic_run(3, 10)).html()
    assert "<script" not in page
    assert "src=" not in page
    assert page.count("http") == page.count('xmlns="http://www.w3.org/2000/svg"')


def test_html_marks_failed_spans_in_their_tooltip() -> None:
    events = [PhaseEvent(Phase.EXECUTE, "w-0", T0, T0 + 1, "s-0", ok=False)]
    assert "FAILED" in Timeline(events).html()
