"""The swarm demo job end to end on a real two-node Ray cluster: three jobs, one learning from another.

The demo runs once per module (process sandboxes, so it runs on every machine) and the tests
read what it returned and wrote; the Docker variant runs it again with containers.
"""

from __future__ import annotations

import json

import pytest

from rayflow.jobs.demo import RUNS, DemoSettings, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODULES = 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    settings = DemoSettings(modules=MODULES, workers=2, backend="process", out=out, progress=False)
    return run_demo(settings), out


def test_every_run_has_exactly_one_result_per_module(demo):
    result, _ = demo
    for plan in RUNS:
        assert result.outcomes[plan.label].results_per_index == [1] * MODULES


def test_every_module_is_fixed_in_every_run(demo):
    result, _ = demo
    assert all(result.outcomes[plan.label].passed == MODULES for plan in RUNS)


def test_memory_off_never_hits_memory(demo):
    result, _ = demo
    assert result.outcomes["memory-off"].memory_hits == 0


def test_run_two_needs_fewer_attempts_than_memory_off(demo):
    result, _ = demo
    assert result.outcomes["run-2"].attempts < result.outcomes["memory-off"].attempts
    assert result.numbers["reduction"] > 0


def test_run_two_finds_the_lessons_of_run_one(demo):
    result, _ = demo
    assert result.outcomes["run-2"].memory_hits > 0


def test_timelines_and_the_comparison_plot_are_written_as_png(demo):
    _, out = demo
    names = [f"timeline-{plan.label}.png" for plan in RUNS] + ["comparison.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert all((out / f"timeline-{plan.label}.html").stat().st_size > 0 for plan in RUNS)


def test_summary_json_holds_the_comparison_of_the_three_runs(demo):
    result, out = demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparison"] == result.numbers
    assert set(summary["runs"]) == {plan.label for plan in RUNS}
    assert summary["settings"]["modules"] == MODULES


@pytest.mark.docker
def test_demo_with_docker_sandboxes_fixes_every_module_and_learns(ray_cluster, docker_client, tmp_path):
    settings = DemoSettings(modules=MODULES, workers=2, backend="docker", out=tmp_path, progress=False)
    result = run_demo(settings)
    assert result.backend == "docker"
    assert result.numbers["all_passed"] and result.numbers["exactly_once"]
    assert result.outcomes["run-2"].attempts < result.outcomes["memory-off"].attempts
    assert result.outcomes["run-2"].memory_hits > 0
