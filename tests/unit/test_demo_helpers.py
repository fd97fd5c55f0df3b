"""The demo's and `rayflow run`'s pure parts: headline numbers, exactly-once counting, job options."""

from __future__ import annotations

import json

import pytest

from rayflow.cli import job_from_options
from rayflow.errors import ConfigError
from rayflow.jobs.demo import RUNS, RunOutcome, comparison, reduction, results_per_index
from rayflow.swarm.job import FileGlob, TaskList


def outcome(label: str, attempts: int, hits: int, per_index=(1, 1)) -> RunOutcome:
    return RunOutcome(label, f"job-{label}", label != RUNS[0].label, 2, 2, attempts, hits, hits, 1.0,
                      results_per_index=list(per_index))


def test_the_reduction_is_the_share_of_baseline_work_saved():
    assert reduction(10, 4) == pytest.approx(0.6)
    assert reduction(0, 4) == 0.0


def test_the_comparison_reports_each_run_and_the_reduction():
    outcomes = {RUNS[0].label: outcome(RUNS[0].label, 10, 0), RUNS[1].label: outcome(RUNS[1].label, 7, 1),
                RUNS[2].label: outcome(RUNS[2].label, 4, 2)}
    numbers = comparison(outcomes)
    assert (numbers["attempts_memory_off"], numbers["attempts_run1"], numbers["attempts_run2"]) == (10, 7, 4)
    assert numbers["reduction"] == pytest.approx(0.6) and numbers["exactly_once"] and numbers["all_passed"]


def test_a_subtask_reported_twice_is_not_exactly_once():
    outcomes = {plan.label: outcome(plan.label, 2, 0) for plan in RUNS}
    outcomes[RUNS[2].label] = outcome(RUNS[2].label, 2, 0, per_index=(1, 2))
    assert not comparison(outcomes)["exactly_once"]


def test_results_per_index_counts_and_refuses_unknown_indexes():
    assert results_per_index([0, 2, 2], 3) == [1, 0, 2]
    with pytest.raises(ConfigError):
        results_per_index([3], 3)


def test_run_options_need_exactly_one_agent_and_one_decomposition(tmp_path):
    with pytest.raises(ConfigError):
        job_from_options(agent_shell="true", agent_python="m:f", tasks=None, glob="*.py", repo=tmp_path)
    with pytest.raises(ConfigError):
        job_from_options(agent_shell="true", agent_python=None, tasks=None, glob=None, repo=None)
    with pytest.raises(ConfigError):
        job_from_options(agent_shell="true", agent_python=None, tasks=None, glob="*.py", repo=None)


def test_run_options_build_a_glob_job_that_uploads_its_repository(tmp_path):
    job = job_from_options(agent_shell="true", agent_python=None, tasks=None, glob="*.py", repo=tmp_path)
    assert isinstance(job.decomposition, FileGlob) and job.upload == str(tmp_path.resolve())


def test_run_options_read_a_task_list_file(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"n": 1}, {"n": 2}]))
    job = job_from_options(agent_shell=None, agent_python="pkg.mod:fn", tasks=tasks, glob=None, repo=None)
    assert isinstance(job.decomposition, TaskList) and [t["n"] for t in job.decomposition.tasks] == [1, 2]


# --- memory that could not be used ----------------------------------------------------------------
def memory_job_result(label: str, errors: list[bool]):
    from rayflow.views.job_result import JobResult
    from rayflow.wire.memory_use import MemoryUse
    from rayflow.wire.subtasks import SubtaskResult

    results = []
    for index, failed in enumerate(errors):
        use = MemoryUse(1, 0, 1, 0, "TransportError: no handshake") if failed else MemoryUse(1, 1, 0, 2)
        results.append(SubtaskResult(f"{label}-{index}", index, True,
                                     value={"attempts": 2, "memory_hits": 0, "memory": use.to_dict()},
                                     worker_id="w1", node_id="n1"))
    from rayflow.swarm.results_log import RunSummary

    summary = RunSummary()
    for result in results:
        summary.add_result(result)
    return JobResult(f"job-{label}", "A", summary.to_dict(), results=results)


def test_an_outcome_counts_memory_use_errors_and_keeps_the_results_warnings():
    from rayflow.jobs.demo import outcome_of

    result = outcome_of("run-1", True, memory_job_result("run-1", [True, False, True]), 3)
    assert (result.memory_used, result.memory_reached, result.memory_errors) == (3, 1, 2)
    assert result.memory_last_error == "TransportError: no handshake"
    assert result.warnings and "1 of 3 subtasks could reach the hub" in result.warnings[0]
    assert not result.memory_unusable


def test_a_run_meant_to_use_memory_that_never_reached_the_hub_fails_the_demo_with_a_clear_message(monkeypatch):
    from rayflow.jobs import demo

    outcomes = {plan.label: demo.outcome_of(plan.label, plan.memory, memory_job_result(plan.label, [plan.memory] * 2), 2)
                for plan in RUNS}
    assert [o.label for o in outcomes.values() if o.memory_unusable] == ["run-1", "run-2"]
    numbers = comparison(outcomes)
    assert numbers["memory_unusable"] == ["run-1", "run-2"] and numbers["memory_errors_run1"] == 2
    message = demo.memory_unusable_message(outcomes)
    assert message is not None and message.startswith("run-1: memory was on but none of its 2 subtasks could use it")
    assert "TransportError: no handshake" in message
    monkeypatch.setattr(demo, "run_demo", lambda settings, console: demo.DemoResult(outcomes, numbers, "", {}, "process"))
    assert demo.main([]) == demo.EXIT_MEMORY_UNUSABLE


def test_the_run_table_shows_memory_errors():
    import io

    from rich.console import Console

    from rayflow.jobs.demo import outcome_of, run_table

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(run_table(outcome_of("run-1", True, memory_job_result("run-1", [True, False]), 2), "memory on"))
    text = console.file.getvalue()
    assert "memory errors" in text and "1 of 2 modules that used memory" in text
