"""What a person sees of a swarm run: the job result and its views, the synthesis report, progress."""

from __future__ import annotations

import io
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from rayflow.errors import InvalidInputError
from rayflow.swarm.results_log import ResultsLog
from rayflow.views.job_result import JobResult, select_rows
from rayflow.views.progress import LogDisplay, NotebookDisplay, ProgressCounts, RunProgress, progress_html
from rayflow.wire.subtasks import Pattern, Phase, PhaseEvent, SubtaskResult
from rayflow.wire.synthesis import synthesize_report
from tests.swarm_records import T0, subtask_result


def job_results(count: int, fail_every: int = 97) -> list[SubtaskResult]:
    return [
        subtask_result(
            i,
            ok=i % fail_every != 5 % fail_every,
            attempts=1 + i % 3,
            memory_hits=i % 2,
            dispatches=2 if i == 3 else 1,
            workers=20,
            spacing_s=0.1,
            duration_s=2.0,
        )
        for i in range(count)
    ]


def job_events(workers: int) -> list[PhaseEvent]:
    events = [PhaseEvent(Phase.DECOMPOSE, "coordinator", T0 - 1, T0, "decompose")]
    events += [PhaseEvent(Phase.EXECUTE, f"w-{w}", T0, T0 + 5, f"job-{w}") for w in range(workers)]
    return events + [PhaseEvent(Phase.AGGREGATE, "coordinator", T0 + 5, T0 + 6, "synthesis")]


def logged_job(tmp_path: Path, count: int = 1000) -> JobResult:
    log = ResultsLog(tmp_path / "run.jsonl")
    log.set_meta(job_id="demo", pattern="B")
    results = job_results(count)
    random.Random(5).shuffle(results)
    for result in results:
        log.append(result)
    for event in job_events(20):
        log.append_event(event)
    return JobResult.from_log(log)


def rendered(renderable: object, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


# --- JobResult ------------------------------------------------------------------------------
def test_a_job_from_a_log_reads_its_identity_from_the_log_meta(tmp_path: Path) -> None:
    job = logged_job(tmp_path, 10)
    assert (job.job_id, job.pattern, len(job)) == ("demo", Pattern.FULL_SANDBOX, 10)


def test_results_come_in_index_order_and_failed_lists_only_failures(tmp_path: Path) -> None:
    job = logged_job(tmp_path)
    assert [r.index for r in job.results()] == list(range(1000))
    assert [r.index for r in job.failed()] == [i for i in range(1000) if i % 97 == 5]
    assert not job.ok


def test_events_of_a_logged_job_come_from_the_log(tmp_path: Path) -> None:
    assert len(logged_job(tmp_path, 5).events) == 22


def test_table_of_a_small_job_has_every_row_and_a_totals_line() -> None:
    job = JobResult("small", "A", {}, results=job_results(10))
    table = job.table()
    assert table.row_count == 11
    assert "total" in rendered(table)


def test_table_of_a_thousand_subtasks_is_bounded(tmp_path: Path) -> None:
    table = logged_job(tmp_path).table(max_rows=50)
    assert table.row_count <= 50 + 3
    text = rendered(table)
    assert "showing" in text and "of 1000 subtasks" in text


def test_table_of_a_big_job_shows_first_last_and_failures(tmp_path: Path) -> None:
    selection = select_rows(logged_job(tmp_path).results(), max_rows=40)
    assert [r.index for r in selection.head] == list(range(10))
    assert [r.index for r in selection.tail] == list(range(990, 1000))
    assert [r.index for r in selection.failures] == [102, 199, 296, 393, 490, 587, 684, 781, 878, 975]
    assert selection.hidden == 1000 - 30
    assert selection.hidden_failures == 0


def test_table_counts_failures_it_has_no_room_for() -> None:
    selection = select_rows(job_results(1000, fail_every=2), max_rows=20)
    assert len(selection.failures) == 10
    assert selection.shown == 20
    assert selection.hidden_failures == 500 - sum(
        not r.ok for r in (*selection.head, *selection.failures, *selection.tail)
    )


def test_table_totals_cover_every_subtask_not_only_shown_ones() -> None:
    results = job_results(1000)
    selection = select_rows(results, max_rows=20)
    assert selection.attempts == sum(r.attempts for r in results)
    assert selection.memory_hits == 500
    assert selection.dispatches == 1001
    assert len(selection.workers) == 20


def test_table_refuses_a_budget_too_small_to_show_anything() -> None:
    with pytest.raises(InvalidInputError):
        select_rows(job_results(10), max_rows=2)


def test_rich_rendering_has_the_headline_and_the_table(tmp_path: Path) -> None:
    text = rendered(logged_job(tmp_path))
    assert "demo (pattern B): 989/1000 passed" in text
    assert "tests_failed" in text


def test_html_view_has_a_bounded_table_the_summary_and_the_report(tmp_path: Path) -> None:
    job = logged_job(tmp_path)
    job.report = "the <report>"
    page = job._repr_html_()
    assert page.count("<tr") < 80
    assert "memory_hits" in page
    assert "the &lt;report&gt;" in page


def test_json_round_trip_keeps_everything(tmp_path: Path) -> None:
    job = logged_job(tmp_path, 50)
    job.report = "done"
    again = JobResult.from_json(job.to_json())
    assert (again.job_id, again.pattern, again.summary, again.report) == (
        job.job_id,
        job.pattern,
        job.summary,
        "done",
    )
    assert list(again.results()) == list(job.results())
    assert again.events == job.events


def test_from_json_rejects_a_document_of_another_kind() -> None:
    with pytest.raises(InvalidInputError):
        JobResult.from_json(json.dumps({"job_id": "x"}))
    with pytest.raises(InvalidInputError):
        JobResult.from_json("{not json")


def test_timeline_of_a_job_has_a_row_per_worker_and_the_coordinator(tmp_path: Path) -> None:
    assert len(logged_job(tmp_path, 5).timeline().rows()) == 21


# --- synthesis ------------------------------------------------------------------------------
def test_report_mentions_passes_attempts_memory_hits_and_phases(tmp_path: Path) -> None:
    job = logged_job(tmp_path)
    report = synthesize_report(job.summary, job.results())
    assert "Report of demo (pattern B: full sandbox)" in report
    assert "Passed       989" in report
    assert "Attempts     1999" in report
    assert "Memory hits  500" in report
    for phase in ("decompose", "execute", "aggregate"):
        assert phase in report
    assert "#5 job-5: tests_failed" in report


def test_report_reads_results_in_their_dict_form() -> None:
    report = synthesize_report({}, [r.to_dict() for r in job_results(3)])
    assert "Subtasks     3" in report
    assert "no phase events recorded" in report


def test_report_lists_a_bounded_number_of_failures() -> None:
    report = synthesize_report({}, job_results(1000, fail_every=1))
    assert "Failures (1000; first 20 listed)" in report
    assert report.count("tests_failed") == 20


def test_synthesis_imports_nothing_heavy() -> None:
    probe = (
        "import sys, rayflow.wire.synthesis as s;"
        "heavy = {'rich', 'numpy', 'ray', 'matplotlib', 'IPython'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- progress -------------------------------------------------------------------------------
def test_progress_on_a_pipe_is_silent_unless_asked() -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    with RunProgress(2, 10, "quiet", console=console) as progress:
        progress.worker_ready()
        progress.subtask_done(True)
    assert progress.mode == "silent"
    assert console.file.getvalue() == ""  # type: ignore[attr-defined]


def test_progress_on_a_pipe_logs_every_tenth_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    caplog.set_level(logging.INFO, logger="rayflow.views.progress")
    with RunProgress(20, 1000, "logged", console=console, log_every_pct=10) as progress:
        for _ in range(20):
            progress.worker_ready()
        for i in range(1000):
            progress.subtask_done(ok=i % 10 != 0)
    lines = [r.getMessage() for r in caplog.records]
    assert progress.mode == "log"
    assert sum("subtasks" in line and "%)" in line for line in lines) == 11  # start, then 10% .. 100%
    assert "all 20 sandboxes ready" in "\n".join(lines)
    assert lines[-1].endswith("subtasks 1000/1000 (100%), ok 900, failed 100, retried 0")


def test_progress_on_a_terminal_draws_bars_with_the_final_counts() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    with RunProgress(4, 1000, "bars", console=console) as progress:
        for _ in range(4):
            progress.worker_ready()
        for i in range(1000):
            progress.subtask_done(ok=i != 7)
        progress.subtask_retried()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert progress.mode == "terminal"
    assert "4/4" in text and "1000/1000" in text and "1 failed" in text and "1 retried" in text


class RecordedBlock:
    """A stand-in for a notebook output: keeps what it was last set to."""

    def __init__(self, markup: str) -> None:
        self.markups = [markup]

    def update(self, markup: str) -> None:
        self.markups.append(markup)


def test_notebook_display_redraws_at_most_once_per_interval() -> None:
    blocks: list[RecordedBlock] = []
    now = [0.0]

    def show(markup: str) -> RecordedBlock:
        blocks.append(RecordedBlock(markup))
        return blocks[-1]

    display = NotebookDisplay("nb", min_interval_s=1.0, show=show, clock=lambda: now[0])
    counts = ProgressCounts(2, 1000)
    display.start(counts)
    for i in range(1000):
        counts.done += 1
        now[0] = i * 0.01  # 10 s in all: about ten redraws
        display.update(counts)
    display.stop(counts)
    assert 10 <= display.redraws <= 13
    assert "value='1000'" in blocks[0].markups[-1]


def test_notebook_markup_shows_both_bars_and_the_counts() -> None:
    markup = progress_html(
        ProgressCounts(3, 10, workers_ready=2, done=4, ok=3, failed=1, retried=2), "job <x>"
    )
    assert "job &lt;x&gt;" in markup
    assert "<progress value='2' max='3'" in markup and "<progress value='4' max='10'" in markup
    assert "3 ok" in markup and "1 failed" in markup and "2 retried" in markup


def test_log_display_rejects_a_percentage_out_of_range() -> None:
    with pytest.raises(Exception, match="percentage"):
        LogDisplay("x", every_pct=0)
