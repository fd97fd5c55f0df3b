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
