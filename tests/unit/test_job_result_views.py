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
from rayflow.wire.synthesis import health_lines, synthesize_report
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
    # About 50 subtask rows, the summary's numbers and at most 20 workers: never a row per subtask.
    assert page.count("<tr") < 130
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


# --- where the work ran and how healthy it was ------------------------------------------------
NO_HANDSHAKE = "TransportError: no handshake with 10.0.0.9:4433 within 10.0 s"


def placed_results(count: int, *, workers: int = 3, broken: set[int] = frozenset(), memory: bool = True) -> list[SubtaskResult]:
    """Results on ``workers`` workers over two nodes in two regions; ``broken`` subtasks' memory calls failed."""
    from rayflow.wire.memory_use import MemoryUse

    results = []
    for i in range(count):
        use = MemoryUse(1, 0, 1, 0, NO_HANDSHAKE) if i in broken else MemoryUse(2, 2, 0, 3)
        value = {"attempts": 1, "memory": use.to_dict()} if memory else {"attempts": 1}
        worker = i % workers
        results.append(SubtaskResult(f"job-{i}", i, True, value=value, worker_id=f"w{worker}",
                                     node_id=f"node-{worker % 2}", region=("eu", "us")[worker % 2],
                                     started_at=T0 + i, ended_at=T0 + i + 1))
    return results


def logged(tmp_path: Path, results: list[SubtaskResult], **meta: object) -> JobResult:
    log = ResultsLog(tmp_path / "placed.jsonl")
    log.set_meta(job_id="placed", pattern="A", **meta)
    for result in results:
        log.append(result)
    return JobResult.from_log(log)


COORDINATOR = {
    "workers_asked": 4, "workers_ready": 3, "launch_failures": 2, "start_failure_codes": {"hub_unreachable": 2},
    "start_failures": [
        {"worker": "w3", "node": "node-9", "region": "ap", "code": "hub_unreachable",
         "message": f"the hub at 10.0.0.9:4433 could not be reached from node node-9 (region ap): {NO_HANDSHAKE}"},
        {"worker": "w4", "node": "node-9", "region": "ap", "code": "hub_unreachable", "message": "again"},
    ],
}


def test_a_summary_counts_memory_health_regions_and_each_workers_place(tmp_path: Path) -> None:
    summary = logged(tmp_path, placed_results(8, broken={1, 2})).summary
    assert (summary["subtasks_using_memory"], summary["subtasks_reaching_hub"],
            summary["subtasks_with_memory_errors"]) == (8, 6, 2)
    assert summary["memory_error_kinds"] == {"TransportError": 2}
    assert summary["memory_error_example"] == NO_HANDSHAKE
    assert summary["memory_hits"] == 18  # the runner's search hits, for agents that report none
    assert summary["regions"] == {"eu": 5, "us": 3}
    assert summary["workers"]["w1"] == {"subtasks": 3, "ok": 3, "failed": 0, "node": "node-1", "region": "us"}


def test_a_replaced_result_takes_its_memory_errors_out_again(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path / "r.jsonl")
    first, again = placed_results(1, broken={0})[0], placed_results(1)[0]
    log.append(first)
    log.append(again)
    summary = log.summary()
    assert (summary["subtasks_with_memory_errors"], summary["subtasks_reaching_hub"]) == (0, 1)
    assert summary["memory_error_kinds"] == {}


def test_the_report_leads_with_where_the_work_ran_and_a_marked_memory_warning(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(8, broken={1, 2}), memory=True)
    report = synthesize_report(job.summary, job.results())
    head = report.split("\n\n")[1].splitlines()
    assert head == [
        "Workers: 3 on 2 node(s) in 2 region(s)",
        "WARNING: Memory: 6 of 8 subtasks could reach the hub (2 with errors: TransportError x2); 18 hits",
    ]
    assert "Memory use   8 subtasks made memory calls: 6 reached the hub, 2 had errors" in report
    assert "  w1  node node-1  region us  3 subtasks (3 passed)" in report
    assert f"Memory errors in 2 subtasks of 8 that used memory: TransportError x2\n  e.g. {NO_HANDSHAKE}" in report
    assert report.rstrip().endswith("All subtasks passed, but the run was degraded: see the warnings above.")


def test_a_healthy_run_says_where_it_ran_and_that_memory_was_reached_without_a_warning(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(4))
    report = synthesize_report(job.summary, job.results())
    assert "Memory: 4 of 4 subtasks that used it reached the hub; 12 hits" in report
    assert "WARNING" not in report and report.rstrip().endswith("All subtasks passed.")
    assert job.warnings == []


def test_the_report_says_how_many_workers_were_asked_started_and_where_and_why_others_failed(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(3, memory=False), coordinator=COORDINATOR)
    report = synthesize_report(job.summary, job.results())
    assert ("WARNING: Workers asked 4, started 3, failed to start 2 "
            "(the hub could not be reached x2 (node node-9, region ap))") in report
    assert "Failed worker starts (2): the hub could not be reached x2 (node node-9, region ap)" in report
    assert "  w3 (node node-9, region ap): hub_unreachable: the hub at 10.0.0.9:4433 could not be reached" in report
    assert "Memory:" not in report  # no agent used memory and the job did not say it was on


def test_the_report_lists_a_bounded_number_of_workers() -> None:
    report = synthesize_report({}, placed_results(30, workers=25))
    assert "Workers: 25 on 2 node(s) in 2 region(s)" in report
    assert report.count("  w") == 20 and "  ... and 5 more workers" in report
    assert report.index("  w2  node") < report.index("  w10  node")  # natural order


def test_a_job_result_leads_with_the_same_lines_warnings_in_red(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(8, broken={1, 2}), coordinator=COORDINATOR)
    assert job.headline().splitlines()[1:] == [
        "Workers: 3 on 2 node(s) in 2 region(s)",
        "⚠ Workers asked 4, started 3, failed to start 2 (the hub could not be reached x2 (node node-9, region ap))",
        "⚠ Memory: 6 of 8 subtasks could reach the hub (2 with errors: TransportError x2); 18 hits",
    ]
    assert len(job.warnings) == 2
    text = rendered(job, width=200)
    assert "⚠ Memory: 6 of 8 subtasks could reach the hub" in text
    assert "where the work ran" in text and "node-1" in text and "us" in text
    assert [w["worker"] for w in job.workers()] == ["w0", "w1", "w2"]
    assert job.workers()[1] == {"worker": "w1", "node": "node-1", "region": "us", "subtasks": 3, "ok": 3, "failed": 0}


def test_a_job_results_table_shows_memory_errors_and_regions(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(8, broken={1, 2}))
    selection = select_rows(job.results())
    assert (selection.memory_errors, selection.regions) == (2, {"eu", "us"})
    text = rendered(job.table(), width=200)
    assert "memory errors" in text and "region" in text and "2 subtasks" in text and "2 regions" in text


def test_the_html_view_marks_warnings_and_lists_workers(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(8, broken={1}))
    page = job._repr_html_()
    assert "<p style='color:#b00020'><b>⚠ Memory: 7 of 8 subtasks could reach the hub" in page
    assert "<p>Workers: 3 on 2 node(s) in 2 region(s)</p>" in page
    assert "where the work ran: 3 workers" in page and "<td>node-1</td><td>us</td>" in page


def test_json_round_trip_keeps_regions_memory_counts_and_the_warnings(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(5, broken={4}), coordinator=COORDINATOR)
    again = JobResult.from_json(job.to_json())
    assert list(again.results()) == list(job.results())
    assert [r.region for r in again.results()] == ["eu", "us", "eu", "eu", "us"]
    assert again.results().__next__().memory == job.results().__next__().memory
    assert again.headline() == job.headline() and again.warnings == job.warnings


# --- the sandbox image line ---------------------------------------------------------------------
def image_check(*nodes: tuple[str, str, str, float, int], seconds: float = 0.31, earlier: bool = False) -> dict:
    """A summary's ``images`` entry: (node, engine, action, seconds, bytes moved) per node."""
    return {
        "image": "rayflow-sandbox:latest", "checked_at": 1_700_000_000.0, "seconds": seconds, "earlier": earlier,
        "nodes": [{"node_id": node, "region": "eu", "engine_id": engine, "action": action, "seconds": s,
                   "bytes_moved": moved} for node, engine, action, s, moved in nodes],
    }


ALL_CURRENT = image_check(("node-0", "E1", "current", 0.2, 0), ("node-1", "E1", "current", 0.2, 0))


def test_the_image_line_follows_the_workers_line_in_the_report_and_the_job_result(tmp_path: Path) -> None:
    job = logged(tmp_path, placed_results(4), images=ALL_CURRENT)
    expected = [
        "Workers: 3 on 2 node(s) in 2 region(s)",
        "Sandbox image rayflow-sandbox:latest: current on 2 node(s) (1 engine), checked in 0.3 s",
        "Memory: 4 of 4 subtasks that used it reached the hub; 12 hits",
    ]
    assert synthesize_report(job.summary, job.results()).split("\n\n")[1].splitlines() == expected
    assert job.headline().splitlines()[1:] == expected
    assert job.warnings == []
    assert JobResult.from_json(job.to_json()).headline() == job.headline()


def test_the_image_line_says_where_it_was_built_loaded_and_shared_with_times_and_bytes() -> None:
    check = image_check(
        ("ab12cd34ef56", "E1", "built", 61.04, 138_400_000),
        ("node-2", "E2", "loaded", 8.21, 138_400_000),
        ("node-3", "E3", "loaded", 6.0, 138_400_000),
        ("node-4", "E3", "shared", 0.1, 0),
        ("node-5", "E4", "current", 0.2, 0),
        ("node-6", "E5", "current", 0.2, 0),
        seconds=72.54,
    )
    lines = [text for text, _ in health_lines({"images": check})]
    assert lines == [(
        "Sandbox image rayflow-sandbox:latest: built on node ab12cd34 in 61.0 s, current on 2 node(s) (2 engines), "
        "loaded on 2 node(s) in 8.2 s (277 MB), shared by 1 more node(s) on the same engine(s), checked in 72.5 s"
    )]


def test_the_image_line_of_a_check_made_for_an_earlier_job_says_when_and_how_long_it_took() -> None:
    check = {**image_check(("node-0", "E1", "built", 55.0, 0), seconds=55.2), "earlier": True}
    text = (
        "Sandbox image rayflow-sandbox:latest: checked for an earlier job on the same nodes at "
        "2023-11-14 22:13:20 UTC (built on node node-0 in 55.0 s, in 55.2 s)"
    )
    assert health_lines({"images": check}) == [(text, False)]


def test_a_summary_without_an_image_check_has_no_image_line() -> None:
    summary = {"workers": {"w0": {"subtasks": 1, "node": "n", "region": "r"}}, "subtasks": 1}
    assert [text for text, _ in health_lines(summary)] == ["Workers: 1 on 1 node(s) in 1 region(s)"]
    assert health_lines({**summary, "images": "garbled"}) == health_lines(summary)
