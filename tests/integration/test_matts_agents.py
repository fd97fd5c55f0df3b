"""MaTTS with real agents: sequential refinement through the runner, parallel rollouts as real processes.

A generated demo codebase is fixed with memory off. Sequential: ``rayflow.guest.agents.matts_refine:refine``
runs the fixer (or a small agent written here) several times in one work directory through
:func:`rayflow.guest.runner.run_spec`. Parallel: three rollouts of the fixer on one module run as
three ``python -m rayflow.guest run`` processes at once, each in its own copy of the codebase (as
each would have its own sandbox), and their results are grouped, judged and logged by the same
sink a job runner uses. The fixer's jobs name its profile (:mod:`rayflow.jobs.fixer_profile`);
the small agents written here run with the defaults, as any agent MaTTS knows nothing about.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rayflow.guest.agents.repairs import DEFAULT_ORDER
from rayflow.guest.runner import run_spec
from rayflow.jobs.demo_codebase import ModuleInfo, generate_codebase
from rayflow.jobs.fixer_profile import FIXER, FIXER_PROFILE, fixer_matts
from rayflow.swarm.job import AgentRef, Job, Matts, TaskList
from rayflow.swarm.matts import CONTRAST_TAGS, MattsPlan, RolloutSink
from rayflow.swarm.results_log import ResultsLog
from rayflow.swarm.worker_core import parse_runner_output
from rayflow.wire.subtasks import Subtask, SubtaskResult

pytestmark = pytest.mark.integration

REFINE = {"kind": "python", "target": "rayflow.guest.agents.matts_refine:refine"}
REVISE = FIXER_PROFILE.reviser
HUB_ENV = ("RAYFLOW_HUB_HOST", "RAYFLOW_HUB_PORT", "RAYFLOW_HUB_CA", "RAYFLOW_HUB_TOKEN")
#: Starts the runner only once stdin closes, so a test can hold several processes at the gate.
GATED_RUNNER = (
    "import runpy, sys; sys.stdin.read(); spec = sys.argv[1]; sys.argv = ['rayflow.guest', 'run', spec]; "
    "runpy.run_module('rayflow.guest', run_name='__main__', alter_sys=True)"
)


@pytest.fixture(scope="module")
def codebase(tmp_path_factory) -> tuple[Path, list[ModuleInfo]]:
    root = tmp_path_factory.mktemp("pristine")
    return root, generate_codebase(root, 6, seed=5)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)


def work_copy(pristine: Path, work: Path) -> Path:
    shutil.copytree(pristine, work)
    return work


def module_tests_pass(work: Path, module: ModuleInfo) -> bool:
    run = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", module.test], check=False, cwd=work, capture_output=True
    )
    return run.returncode == 0


def wrong_first(module: ModuleInfo) -> list[str]:
    """The default strategy order with the module's own strategy moved last."""
    return [name for name in DEFAULT_ORDER if name != module.strategy] + [module.strategy]


def fixer_refine_task(module: ModuleInfo, r: int, **extra: Any) -> dict[str, Any]:
    """A refine task over the fixer: memory off, one attempt per refinement, the right strategy last."""
    return {
        **module.task(),
        "memory": False,
        "max_attempts": 1,
        "strategy_order": wrong_first(module),
        "inner": FIXER,
        "r": r,
        **extra,
    }


def refine(task: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The runner's result of ``rayflow.guest.agents.matts_refine:refine`` on ``task`` in ``workdir``."""
    return run_spec({"agent": REFINE, "task": task, "workdir": str(workdir)})


# --- sequential ---------------------------------------------------------------------------------------
def test_refine_stops_at_the_first_success_and_reports_every_refinement(codebase, tmp_path):
    pristine, modules = codebase
    module = modules[0]
    work = work_copy(pristine, tmp_path / "work")
    task = fixer_refine_task(module, 20, revise=REVISE)
    result = refine(task, work)
    assert result["ok"], result["error"]
    value = result["value"]
    refinements = value["refinements"]
    assert value["passed"] and value["strategy"] == module.strategy
    assert value["matts"]["stopped"] == "succeeded"
    assert 1 < len(refinements) < 20
    assert [r["succeeded"] for r in refinements] == [False] * (len(refinements) - 1) + [True]
    assert [r["refinement"] for r in refinements] == list(range(len(refinements)))
    assert value["attempts"] == sum(r["attempts"] for r in refinements) == len(refinements)
    assert module_tests_pass(work, module)


def test_refine_steers_the_fixer_to_strategies_it_has_not_tried(codebase, tmp_path):
    pristine, modules = codebase
    module = modules[0]
    work = work_copy(pristine, tmp_path / "work")
    task = fixer_refine_task(module, 20, revise=REVISE)
    value = refine(task, work)["value"]
    tried = [r["value"]["tried_strategies"][0] for r in value["refinements"]]
    assert len(set(tried)) == len(tried)


def test_refine_that_never_succeeds_returns_the_last_value_and_leaves_the_module_as_it_was(
    codebase, tmp_path
):
    pristine, modules = codebase
    module = modules[0]
    work = work_copy(pristine, tmp_path / "work")
    task = fixer_refine_task(module, 1)
    result = refine(task, work)
    assert result["ok"], result["error"]
    value = result["value"]
    assert not value["passed"]
    assert value["matts"] == {"mode": "sequential", "r": 1, "used": 1, "stopped": "exhausted", "final": 0}
    assert (work / module.module).read_bytes() == (pristine / module.module).read_bytes()


AGENT_SOURCE = '''
def learns(context):
    """Succeeds on its third attempt; echoes what it was told."""
    task = context.task
    return {"passed": task["refinement"] >= 2, "attempts": 2, "feedback": task.get("feedback"),
            "module": task["module"]}


def breaks(context):
    raise ValueError("attempt " + str(context.task["refinement"]) + " broke")


def second_rollout_wins(context):
    """Fails in every parallel rollout but rollout 1."""
    if context.task["rollout"] != 1:
        raise ValueError("rollout " + str(context.task["rollout"]) + " found nothing")
    return {"passed": True, "answer": 42}
'''


@pytest.fixture
def local_agents(tmp_path, monkeypatch) -> str:
    package = tmp_path / "agents_here"
    package.mkdir()
    (package / "matts_probe.py").write_text(AGENT_SOURCE)
    monkeypatch.syspath_prepend(str(package))
    return "matts_probe"


def test_refine_feeds_each_attempt_the_previous_value(local_agents, tmp_path):
    task = {"module": "m.py", "inner": f"{local_agents}:learns", "r": 5}
    result = refine(task, tmp_path)
    assert result["ok"], result["error"]
    value = result["value"]
    assert value["matts"]["used"] == 3 and value["attempts"] == 6 and value["final_attempts"] == 2
    # The final (third) attempt was told the second's value, which had been told the first's.
    second = value["feedback"]
    assert second == {"passed": False, "attempts": 2, "module": "m.py", "feedback": second["feedback"]}
    assert second["feedback"] == {"passed": False, "attempts": 2, "module": "m.py", "feedback": None}


def test_refine_reports_the_last_error_when_no_attempt_returned(local_agents, tmp_path):
    task = {"inner": f"{local_agents}:breaks", "r": 3}
    result = refine(task, tmp_path)
    assert not result["ok"]
    assert result["error"]["code"] == "agent_failed"
    assert "attempt 2 broke" in result["error"]["message"]


def test_a_generic_agent_is_refined_through_a_sequential_plan_with_the_defaults(local_agents, tmp_path):
    job = Job(
        AgentRef.python(f"{local_agents}:learns"),
        TaskList([{"module": "m.py"}]),
        name="probe-seq",
        matts=Matts("sequential", r=5),
    )
    plan = MattsPlan.for_job(job)
    task = next(plan.transform([Subtask("probe-0", 0, {"module": "m.py"})])).task
    result = run_spec({"agent": plan.agent.to_spec(), "task": task, "workdir": str(tmp_path)})
    assert result["ok"], result["error"]
    assert result["value"]["passed"] and result["value"]["matts"]["used"] == 3


def test_refine_runs_a_shell_agent_until_it_exits_zero(tmp_path):
    command = 'n=$(cat tries 2>/dev/null || echo 0); echo $((n + 1)) > tries; test "$n" -ge 1'
    task = {"inner": {"kind": "shell", "command": command}, "r": 4}
    result = refine(task, tmp_path)
    assert result["ok"], result["error"]
    assert result["value"]["matts"]["used"] == 2 and result["value"]["exit_code"] == 0
    assert (tmp_path / "tries").read_text().strip() == "2"


# --- parallel -----------------------------------------------------------------------------------------
def result_of(subtask: Subtask, stdout: bytes) -> SubtaskResult:
    parsed = parse_runner_output(stdout)
    assert parsed is not None, stdout
    return SubtaskResult(
        subtask.id,
        subtask.index,
        bool(parsed["ok"]),
        value=parsed.get("value"),
        error=parsed.get("error"),
        exit_code=parsed.get("exit_code"),
        worker_id=subtask.id,
    )


def test_three_rollouts_run_as_processes_at_once_and_are_grouped_judged_and_all_kept(codebase, tmp_path):
    pristine, modules = codebase
    module = modules[2]
    job = Job(
        AgentRef.python(FIXER),
        TaskList([{**module.task(), "memory": False}]),
        name="matts-k3",
        matts=fixer_matts("parallel", k=3),
    )
    plan = MattsPlan.for_job(job, seed=1)
    main_log = ResultsLog(tmp_path / "matts-k3.jsonl")
    rollouts_log = ResultsLog(plan.rollouts_path(main_log.path))
    lessons: list[tuple[str, dict[str, Any]]] = []
    sink = plan.wrap_sink(main_log, rollouts_log, store_lesson=lambda ns, args: lessons.append((ns, args)))
    assert isinstance(sink, RolloutSink)
    original = Subtask(module.name, 0, {**module.task(), "memory": False})
    rollouts = list(plan.transform([original], sink))
    assert [r.id for r in rollouts] == [f"{module.name}~r0", f"{module.name}~r1", f"{module.name}~r2"]

    processes: dict[str, tuple[Subtask, subprocess.Popen[bytes]]] = {}
    try:
        for rollout in rollouts:
            work = work_copy(pristine, tmp_path / rollout.id)
            spec = tmp_path / f"{rollout.id}.json"
            spec.write_text(
                json.dumps({"agent": plan.agent.to_spec(), "task": dict(rollout.task), "workdir": str(work)})
            )
            processes[rollout.id] = (
                rollout,
                subprocess.Popen(
                    [sys.executable, "-c", GATED_RUNNER, str(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ),
            )
        # All three exist at once, held at the gate; closing their stdin releases them together.
        assert all(process.poll() is None for _, process in processes.values())
        with cf.ThreadPoolExecutor(max_workers=3) as pool:
            futures = {
                pool.submit(process.communicate, b""): rollout for rollout, process in processes.values()
            }
            for future in cf.as_completed(futures):
                stdout, _ = future.result()
                sink.append(result_of(futures[future], stdout))
    finally:
        for _, process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sink.finish() == []
    main_log.close()
    rollouts_log.close()

    grouped = list(ResultsLog(main_log.path, readonly=True))
    kept = list(ResultsLog(rollouts_log.path, readonly=True))
    assert [r.subtask_id for r in grouped] == [module.name]
    assert sorted(r.subtask_id for r in kept) == [r.id for r in rollouts]
    value = grouped[0].value
    assert [r["rollout"] for r in value["rollouts"]] == [0, 1, 2]
    assert all(r["succeeded"] for r in value["rollouts"])
    assert value["passed"] and value["strategy"] == module.strategy
    winner = value["rollouts"][value["matts"]["winner"]]
    assert winner["attempts"] == min(r["attempts"] for r in value["rollouts"]) == value["winner_attempts"]
    assert value["attempts"] == sum(r["attempts"] for r in value["rollouts"])
    # Different seeds made the rollouts explore in different orders.
    assert len({tuple(r["value"]["tried_strategies"]) for r in value["rollouts"]}) > 1

    assert len(lessons) == 1
    namespace, lesson = lessons[0]
    assert namespace == "swarm/matts-k3/lessons"
    assert f"strategy:{module.strategy}" in lesson["tags"] and lesson["outcome"] == "success"
    assert f"sig:{value['signature_id']}" in lesson["tags"]
    assert lesson["source_task"] == module.name


def test_a_generic_agents_rollouts_are_judged_and_contrasted_with_the_defaults(local_agents, tmp_path):
    job = Job(
        AgentRef.python(f"{local_agents}:second_rollout_wins"),
        TaskList([{}]),
        name="probe-par",
        matts=Matts("parallel", k=3),
    )
    plan = MattsPlan.for_job(job)
    main_log = ResultsLog(tmp_path / "probe-par.jsonl")
    lessons: list[dict[str, Any]] = []
    sink = plan.wrap_sink(main_log, store_lesson=lambda ns, args: lessons.append(args))
    for rollout in plan.transform([Subtask("probe-0", 0, {})], sink):
        ran = run_spec({"agent": plan.agent.to_spec(), "task": dict(rollout.task), "workdir": str(tmp_path)})
        value, error = ran.get("value"), ran.get("error")
        sink.append(SubtaskResult(rollout.id, rollout.index, ran["ok"], value=value, error=error))
    main_log.close()
    grouped = list(ResultsLog(main_log.path, readonly=True))
    assert [r.subtask_id for r in grouped] == ["probe-0"]
    assert grouped[0].ok and grouped[0].value["answer"] == 42 and grouped[0].value["matts"]["winner"] == 1
    assert [lesson["tags"] for lesson in lessons] == [[*CONTRAST_TAGS, "agent_failed"]]


# --- the fixer's profile against the real fixer ---------------------------------------------------------------
def test_a_real_fixer_value_has_every_field_its_profile_reads(codebase, tmp_path):
    pristine, modules = codebase
    module = modules[1]
    work = work_copy(pristine, tmp_path / "work")
    order = wrong_first(module)[::-1]
    task = {**module.task(), "memory": False, "max_attempts": 1, FIXER_PROFILE.order_field: order}
    result = run_spec({"agent": {"kind": "python", "target": FIXER}, "task": task, "workdir": str(work)})
    assert result["ok"], result["error"]
    value = result["value"]
    assert FIXER_PROFILE.chosen_field in value
    assert value[FIXER_PROFILE.signature_field] and value[FIXER_PROFILE.signature_id_field]
    tries = value[FIXER_PROFILE.tries_field]
    assert tries and all(
        {FIXER_PROFILE.try_name_key, FIXER_PROFILE.try_edit_key, "passed"} <= set(entry) for entry in tries
    )


def test_the_fixer_tries_strategies_in_the_order_its_profiles_order_field_gives(codebase, tmp_path):
    pristine, modules = codebase
    # A module whose repair is not the fixer's first by default, put first by the order field.
    module = next(m for m in modules if m.strategy != DEFAULT_ORDER[0])
    work = work_copy(pristine, tmp_path / "work")
    order = wrong_first(module)[::-1]
    task = {**module.task(), "memory": False, "max_attempts": 1, FIXER_PROFILE.order_field: order}
    result = run_spec({"agent": {"kind": "python", "target": FIXER}, "task": task, "workdir": str(work)})
    assert result["ok"], result["error"]
    tried = result["value"][FIXER_PROFILE.tries_field]
    assert [entry[FIXER_PROFILE.try_name_key] for entry in tried] == [module.strategy]
