"""Parallel MaTTS as pure logic: rollout expansion, grouping, the judge, contrast lessons and the plan.

The rollouts here are the demo fixer's, so the tests that read its vocabulary (strategies, error
signatures, tags) use its profile, :data:`rayflow.jobs.fixer_profile.FIXER_PROFILE`; what MaTTS
does for an agent it knows nothing about is in ``test_matts_generic.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from typing import Any

import pytest

from rayflow.errors import ConfigError, InvalidInputError, RayflowError
from rayflow.guest.agents.matts_refine import attempt_succeeded, failed_strategies, untried_strategies_first
from rayflow.jobs.fixer_profile import FIXER, FIXER_PROFILE, fixer_matts
from rayflow.swarm.dispatch_loop import DispatchLoop
from rayflow.swarm.job import AgentRef, Job, Matts, TaskList
from rayflow.swarm.matts import (
    REFINE_AGENT,
    MattsPlan,
    RolloutGroups,
    RolloutSink,
    contrast,
    expand_rollouts,
    group_result,
    judge_rollouts,
    original_index,
    rollout_id,
    rollout_index,
    split_rollout_id,
)
from rayflow.wire.subtasks import Phase, PhaseEvent, Subtask, SubtaskResult


def subtasks(n: int, **task: Any) -> list[Subtask]:
    return [Subtask(f"job-{i:05d}", i, {"module": f"app/mod_{i:03d}.py", **task}) for i in range(n)]


def fix_value(strategy: str | None, tried: list[tuple[str, bool]], **extra: Any) -> dict[str, Any]:
    return {
        "module": "app/mod_000.py",
        "passed": strategy is not None,
        "attempts": len(tried),
        "strategy": strategy,
        "signature": "AssertionError: <num> != <num> in test_counts",
        "signature_id": "0123456789abcdef",
        "tried": [
            {"strategy": name, "line": 3, "edit": f"{name} at line 3", "passed": passed, "from_memory": False}
            for name, passed in tried
        ],
        **extra,
    }


def rollout(
    number: int,
    *,
    value: Any = None,
    ok: bool = True,
    original: str = "job-00000",
    index: int = 0,
    k: int = 3,
    error: dict[str, str] | None = None,
    **fields: Any,
) -> SubtaskResult:
    return SubtaskResult(
        subtask_id=rollout_id(original, number),
        index=rollout_index(index, k, number),
        ok=ok,
        value=value,
        error=error,
        worker_id=f"w{number}",
        **fields,
    )


class ListSink:
    def __init__(self) -> None:
        self.results: list[SubtaskResult] = []
        self.events: list[PhaseEvent] = []

    def append(self, result: SubtaskResult) -> None:
        self.results.append(result)

    def append_event(self, event: PhaseEvent) -> None:
        self.events.append(event)


# --- expansion ------------------------------------------------------------------------------------
def test_expansion_gives_k_rollouts_per_subtask_with_unique_ids_and_indexes():
    expanded = list(expand_rollouts(subtasks(5), 3))
    assert len(expanded) == 15
    assert len({s.id for s in expanded}) == 15
    assert sorted(s.index for s in expanded) == list(range(15))


def test_expansion_ids_and_indexes_map_back_to_the_original_subtask():
    originals = subtasks(4)
    for rolled in expand_rollouts(originals, 3):
        original_id, number = split_rollout_id(rolled.id)
        source = originals[original_index(rolled.index, 3)]
        assert original_id == source.id
        assert rolled.index == rollout_index(source.index, 3, number)
        assert rolled.task["rollout"] == number and rolled.task["rollouts"] == 3


def test_expansion_keeps_rollouts_of_one_subtask_adjacent_so_they_run_at_once():
    expanded = list(expand_rollouts(subtasks(3), 4))
    assert [original_index(s.index, 4) for s in expanded] == [0] * 4 + [1] * 4 + [2] * 4


def test_expansion_is_lazy_over_the_decomposition():
    endless = (Subtask(f"t-{i}", i, {}) for i in itertools.count())
    first = list(itertools.islice(expand_rollouts(endless, 2), 5))
    assert [s.id for s in first] == ["t-0~r0", "t-0~r1", "t-1~r0", "t-1~r1", "t-2~r0"]


def test_rollout_zero_is_the_task_as_written_and_others_explore_with_their_own_seeds():
    expanded = list(expand_rollouts(subtasks(2), 3, seed=7))
    for rolled in expanded:
        if rolled.task["rollout"] == 0:
            assert "seed" not in rolled.task
    seeds = [s.task["seed"] for s in expanded if s.task["rollout"] > 0]
    assert len(set(seeds)) == len(seeds) == 4
    assert [s.task for s in expand_rollouts(subtasks(2), 3, seed=7)] == [s.task for s in expanded]
    assert [s.task for s in expand_rollouts(subtasks(2), 3, seed=8)] != [s.task for s in expanded]


def test_a_pinned_strategy_order_is_rotated_per_rollout():
    order = ["a", "b", "c", "d", "e", "f"]
    expanded = list(expand_rollouts(subtasks(1, strategy_order=order), 3, profile=FIXER_PROFILE))
    assert [s.task["strategy_order"][0] for s in expanded] == ["a", "c", "e"]
    assert all(sorted(s.task["strategy_order"]) == order for s in expanded)


def test_a_rollout_number_outside_k_is_refused():
    with pytest.raises(InvalidInputError):
        rollout_index(0, 3, 3)


def test_ids_that_are_not_rollouts_do_not_parse():
    assert split_rollout_id("job-00001") is None
    assert split_rollout_id("job~rx") is None
    assert split_rollout_id("a~r1~r2") == ("a~r1", 2)


# --- grouping -------------------------------------------------------------------------------------
def three_rollouts() -> list[SubtaskResult]:
    return [
        rollout(0, value=fix_value(None, [("widen_upper_bound", False), ("guard_none", False)])),
        rollout(1, value=fix_value("flip_comparison", [("guard_none", False), ("flip_comparison", True)])),
        rollout(2, value=fix_value("flip_comparison", [("flip_comparison", True)])),
    ]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_groups_emit_exactly_one_result_once_all_rollouts_arrive_in_any_order(order):
    groups = RolloutGroups(3)
    rollouts = three_rollouts()
    emitted = [groups.add(rollouts[i]) for i in order]
    assert emitted[:2] == [None, None]
    grouped = emitted[2]
    assert grouped is not None
    assert grouped.result.subtask_id == "job-00000" and grouped.result.index == 0
    assert grouped.result.value["matts"]["winner"] == 2
    assert groups.waiting == 0


def test_grouped_value_keeps_every_rollout_in_rollout_order():
    grouped = group_result("job-00000", 0, list(reversed(three_rollouts())), k=3, profile=FIXER_PROFILE)
    kept = grouped.value["rollouts"]
    assert [r["rollout"] for r in kept] == [0, 1, 2]
    assert [r["subtask_id"] for r in kept] == ["job-00000~r0", "job-00000~r1", "job-00000~r2"]
    assert [r["succeeded"] for r in kept] == [False, True, True]
    assert kept[1]["value"]["tried_strategies"] == ["guard_none", "flip_comparison"]
    assert [r["worker_id"] for r in kept] == ["w0", "w1", "w2"]


def test_grouped_attempts_count_all_rollouts_and_keep_the_winners_own():
    grouped = group_result("job-00000", 0, three_rollouts(), k=3)
    assert grouped.attempts == 2 + 2 + 1
    assert grouped.value["winner_attempts"] == 1
    assert grouped.value["strategy"] == "flip_comparison"


def test_a_rollout_the_ledger_gave_up_on_still_completes_its_group():
    groups = RolloutGroups(3)
    lost = rollout(
        1, ok=False, error={"code": "worker_lost", "message": "gave up after 3 dispatches"}, dispatches=3
    )
    rollouts = three_rollouts()
    assert groups.add(rollouts[2]) is None
    assert groups.add(lost) is None
    grouped = groups.add(rollouts[0])
    assert grouped is not None
    assert grouped.result.ok and grouped.result.value["matts"]["winner"] == 2
    assert grouped.result.value["rollouts"][1]["error"]["code"] == "worker_lost"
    assert grouped.result.dispatches == 3


def test_a_group_whose_rollouts_all_failed_reports_failure_with_the_best_error():
    failures = [
        rollout(0, ok=False, error={"code": "killed_timeout", "message": "killed"}),
        rollout(1, ok=False, value=None, exit_code=1, error={"code": "agent_failed", "message": "boom"}),
    ]
    grouped = group_result("job-00000", 0, failures, k=2)
    assert not grouped.ok
    assert grouped.error["code"] == "agent_failed"


def test_a_second_result_for_the_same_rollout_is_ignored():
    groups = RolloutGroups(2)
    first = rollout(0, k=2, value={"passed": False})
    assert groups.add(first) is None
    assert groups.add(rollout(0, k=2, value={"passed": True})) is None
    grouped = groups.add(rollout(1, k=2, value={"passed": False}))
    assert grouped is not None and grouped.result.value["rollouts"][0]["value"] == {"passed": False}
    assert groups.add(rollout(1, k=2, value={"passed": True})) is None
    assert groups.duplicates_ignored == 2


def test_groups_of_different_subtasks_complete_independently():
    groups = RolloutGroups(2)
    assert groups.add(rollout(0, k=2, original="b", index=1, value={})) is None
    assert groups.add(rollout(0, k=2, original="a", index=0, value={})) is None
    done_a = groups.add(rollout(1, k=2, original="a", index=0, value={}))
    assert done_a is not None and done_a.result.subtask_id == "a" and done_a.result.index == 0
    assert groups.waiting == 1


def test_draining_completes_partial_groups_and_lists_the_missing_rollouts():
    groups = RolloutGroups(3)
    groups.add(three_rollouts()[1])
    drained = groups.drain()
    assert len(drained) == 1
    assert drained[0].result.value["matts"]["missing"] == [0, 2]
    assert groups.drain() == []


def test_expect_gives_groups_the_original_id_and_memory_namespace():
    groups = RolloutGroups(2)
    original = Subtask("weird~name", 0, {"namespace": "swarm/demo"})
    rolled = list(groups.expand([original]))
    groups.add(SubtaskResult(rolled[0].id, rolled[0].index, True, value={}))
    grouped = groups.add(SubtaskResult(rolled[1].id, rolled[1].index, True, value={}))
    assert grouped.result.subtask_id == "weird~name"
    assert grouped.namespace == "swarm/demo"


# --- the judge ------------------------------------------------------------------------------------
def test_judge_prefers_success_then_score_then_fewer_attempts_then_lower_rollout():
    slow = rollout(0, value={"passed": True, "attempts": 5})
    fast = rollout(1, value={"passed": True, "attempts": 2})
    failed = rollout(2, value={"passed": False, "attempts": 1})
    assert judge_rollouts([slow, fast, failed]) is fast
    scored = rollout(0, value={"passed": True, "attempts": 9, "score": 0.9})
    assert judge_rollouts([scored, fast]) is scored
    twin = rollout(2, value={"passed": True, "attempts": 2})
    assert judge_rollouts([twin, fast]) is fast


def test_judge_is_the_same_for_every_order_of_the_rollouts():
    results = [
        *three_rollouts(),
        rollout(3, k=4, value=fix_value("flip_comparison", [("flip_comparison", True)])),
    ]
    chosen = {judge_rollouts(list(order)).subtask_id for order in itertools.permutations(results)}
    assert chosen == {"job-00000~r2"}


def test_judge_ranks_an_agent_that_ran_above_a_lost_worker():
    lost = rollout(0, ok=False, error={"code": "worker_lost", "message": "x"})
    ran = rollout(1, ok=False, exit_code=1, error={"code": "agent_failed", "message": "y"})
    assert judge_rollouts([lost, ran]) is ran


def test_judge_reads_a_shell_agents_test_summary_as_its_score():
    few = rollout(0, ok=False, exit_code=1, output_tail="Ran 4 tests in 0.01s\n\nFAILED (failures=3)\n")
    most = rollout(1, ok=False, exit_code=1, output_tail="Ran 4 tests in 0.01s\n\nFAILED (failures=1)\n")
    assert judge_rollouts([few, most]) is most


def test_judge_refuses_an_empty_group():
    with pytest.raises(InvalidInputError):
        judge_rollouts([])


# --- contrast -------------------------------------------------------------------------------------
def test_contrast_names_the_winning_repair_and_the_strategies_that_failed():
    lesson = contrast(three_rollouts(), profile=FIXER_PROFILE)
    assert lesson["outcome"] == "success"
    assert "strategy:flip_comparison" in lesson["tags"]
    assert "sig:0123456789abcdef" in lesson["tags"]
    assert {"failed:widen_upper_bound", "failed:guard_none"} <= set(lesson["tags"])
    assert "Edit: flip_comparison at line 3" in lesson["content"]
    assert "Failed here: widen_upper_bound, guard_none" in lesson["content"]
    assert lesson["confidence"] == pytest.approx(2 / 3, abs=0.001)
    assert lesson["source_task"] == "job-00000"
    assert set(lesson) >= {"title", "content", "tags", "domain", "outcome"}


def test_contrast_tags_only_the_winner_as_a_strategy_so_failures_are_never_suggested():
    lesson = contrast(three_rollouts(), profile=FIXER_PROFILE)
    assert [t for t in lesson["tags"] if t.startswith("strategy:")] == ["strategy:flip_comparison"]


def test_a_strategy_that_failed_at_one_site_but_worked_at_another_is_not_called_failed():
    results = [
        rollout(0, k=2, value=fix_value(None, [("flip_comparison", False)])),
        rollout(1, k=2, value=fix_value("flip_comparison", [("flip_comparison", True)])),
    ]
    assert "failed:flip_comparison" not in contrast(results, profile=FIXER_PROFILE)["tags"]


def test_contrast_of_rollouts_that_all_failed_is_a_warning_without_a_strategy():
    results = [
        rollout(0, k=2, value=fix_value(None, [("guard_none", False)])),
        rollout(1, k=2, value=fix_value(None, [("reverse_sort", False)])),
    ]
    lesson = contrast(results, profile=FIXER_PROFILE)
    assert lesson["outcome"] == "failure"
    assert not [t for t in lesson["tags"] if t.startswith("strategy:")]
    assert {"failed:guard_none", "failed:reverse_sort"} <= set(lesson["tags"])


def test_the_fixers_contrast_lesson_is_word_for_word_the_one_its_memory_lookup_was_written_for():
    assert contrast(three_rollouts(), profile=FIXER_PROFILE) == {
        "title": "flip_comparison fixes AssertionError where 2 other strategies failed",
        "description": "contrast of 3 rollouts on 'AssertionError: <num> != <num> in test_counts'",
        "content": "Failure: AssertionError: <num> != <num> in test_counts\n"
        "Fix: flip_comparison (rollout 2 of 3, 1 attempts)\n"
        "Edit: flip_comparison at line 3\n"
        "Failed here: widen_upper_bound, guard_none\n"
        "rollout 0: failed; 2 attempts; tried widen_upper_bound, guard_none\n"
        "rollout 1: succeeded; 2 attempts; tried guard_none, flip_comparison\n"
        "rollout 2: succeeded; 1 attempts; tried flip_comparison",
        "tags": [
            "matts",
            "contrast",
            "sig:0123456789abcdef",
            "strategy:flip_comparison",
            "failed:widen_upper_bound",
            "failed:guard_none",
        ],
        "domain": "matts",
        "outcome": "success",
        "confidence": 0.667,
        "source_task": "job-00000",
    }


def test_the_fixers_warning_lesson_is_word_for_word_the_one_before_profiles():
    results = [
        rollout(0, k=2, value=fix_value(None, [("guard_none", False)])),
        rollout(1, k=2, value=fix_value(None, [("reverse_sort", False)])),
    ]
    assert contrast(results, profile=FIXER_PROFILE) == {
        "title": "2 strategies failed in 2 rollouts",
        "description": "contrast of 2 rollouts on 'AssertionError: <num> != <num> in test_counts'",
        "content": "Failure: AssertionError: <num> != <num> in test_counts\n"
        "Failed here: guard_none, reverse_sort\n"
        "rollout 0: failed; 1 attempts; tried guard_none\n"
        "rollout 1: failed; 1 attempts; tried reverse_sort",
        "tags": ["matts", "contrast", "sig:0123456789abcdef", "failed:guard_none", "failed:reverse_sort"],
        "domain": "matts",
        "outcome": "failure",
        "confidence": 0.667,
        "source_task": "job-00000",
    }


def test_a_parallel_plan_contrasts_with_the_profile_its_job_names():
    groups = MattsPlan.for_job(job(fixer_matts("parallel", k=3))).groups()
    grouped = [groups.add(result) for result in three_rollouts()][-1]
    assert grouped is not None
    assert grouped.lesson == contrast(three_rollouts(), profile=FIXER_PROFILE)


def test_contrast_of_generic_agents_says_which_rollout_succeeded_where_others_failed():
    results = [
        rollout(0, k=2, ok=False, error={"code": "agent_failed", "message": "ValueError: bad input"}),
        rollout(1, k=2, value={"ok": True}),
    ]
    lesson = contrast(results)
    assert lesson["outcome"] == "success"
    assert "rollout 1: succeeded" in lesson["content"]
    assert "agent_failed: ValueError: bad input" in lesson["content"]


def test_rollouts_that_all_ended_alike_teach_nothing_by_contrast():
    assert contrast([rollout(0, k=2, value={}), rollout(1, k=2, value={})]) is None
    assert (
        contrast(
            [rollout(0, k=1, value=fix_value("flip_comparison", [("flip_comparison", True)]))],
            profile=FIXER_PROFILE,
        )
        is None
    )


# --- the sink -------------------------------------------------------------------------------------
def test_rollout_sink_logs_every_rollout_and_one_grouped_result_and_stores_its_lesson():
    main, rollouts, stored = ListSink(), ListSink(), []
    sink = RolloutSink(
        main,
        rollouts,
        RolloutGroups(3, profile=FIXER_PROFILE),
        store_lesson=lambda ns, args: stored.append((ns, args)),
        lesson_namespace="swarm/job/lessons",
    )
    for result in three_rollouts():
        sink.append(result)
    sink.append_event(PhaseEvent(Phase.EXECUTE, "w0", 1.0, 2.0, "job-00000~r0"))
    assert len(rollouts.results) == 3
    assert [r.subtask_id for r in main.results] == ["job-00000"]
    assert len(main.events) == 1
    assert [ns for ns, _ in stored] == ["swarm/job/lessons"]
    assert sink.finish() == []


def test_a_failing_lesson_store_never_loses_the_result():
    main = ListSink()

    def broken(namespace: str, args: dict[str, Any]) -> None:
        raise RayflowError("hub down")

    sink = RolloutSink(main, None, RolloutGroups(3), store_lesson=broken, lesson_namespace="x")
    for result in three_rollouts():
        sink.append(result)
    assert len(main.results) == 1 and sink.lesson_failures == 1


# --- the plan -------------------------------------------------------------------------------------
def job(matts: Matts | None, **fields: Any) -> Job:
    return Job(
        AgentRef.python(FIXER, timeout_s=60), TaskList([{"module": "a.py"}]), name="mj", matts=matts, **fields
    )


def test_a_plan_without_matts_changes_nothing():
    plan = MattsPlan.for_job(job(None))
    original = subtasks(2)
    assert list(plan.transform(original)) == original
    assert plan.agent.target == FIXER
    main = ListSink()
    sink = plan.wrap_sink(main)
    sink.append(SubtaskResult("a", 0, True))
    assert len(main.results) == 1 and sink.finish() == []


def test_a_sequential_plan_swaps_the_agent_and_names_the_original_as_inner():
    plan = MattsPlan.for_job(job(fixer_matts("sequential", r=4)))
    assert plan.agent.target == REFINE_AGENT and plan.agent.timeout_s == 240
    task = next(plan.transform(subtasks(1))).task
    assert task["inner"] == FIXER and task["r"] == 4
    assert task["revise"] == "rayflow.guest.agents.matts_refine:untried_strategies_first"
    assert task["module"] == "app/mod_000.py"


def test_a_task_that_names_its_own_reviser_keeps_it():
    plan = MattsPlan.for_job(job(fixer_matts("sequential", r=2)))
    task = next(plan.transform([Subtask("s", 0, {"revise": "mine:revise"})])).task
    assert task["revise"] == "mine:revise"


def test_a_sequential_plan_passes_a_shell_agent_as_a_spec():
    shell_job = Job(AgentRef.shell("make test"), TaskList([{}]), name="sj", matts=Matts("sequential", r=2))
    task = next(MattsPlan.for_job(shell_job).transform(subtasks(1))).task
    assert task["inner"] == {"kind": "shell", "command": "make test"} and "revise" not in task


def test_a_parallel_plan_expands_subtasks_and_groups_results_through_its_sink():
    plan = MattsPlan.for_job(job(Matts("parallel", k=3)))
    main, rollouts = ListSink(), ListSink()
    sink = plan.wrap_sink(main, rollouts)
    dispatched = list(plan.transform(subtasks(2), sink))
    assert len(dispatched) == 6
    for rolled in reversed(dispatched):
        sink.append(SubtaskResult(rolled.id, rolled.index, True, value={"passed": True}))
    assert [r.subtask_id for r in main.results] == ["job-00001", "job-00000"]
    assert len(rollouts.results) == 6


def test_a_job_without_memory_stores_no_lessons():
    stored: list[tuple[str, dict[str, Any]]] = []
    plan = MattsPlan.for_job(job(fixer_matts("parallel", k=3), memory=False))
    sink = plan.wrap_sink(ListSink(), store_lesson=lambda ns, args: stored.append((ns, args)))
    for result in three_rollouts():
        sink.append(result)
    assert stored == []


def test_lessons_default_to_the_jobs_first_concrete_memory_namespace():
    assert MattsPlan.for_job(job(Matts(k=2))).lesson_namespace == "swarm/mj/lessons"
    shared = job(Matts(k=2), memory_namespaces=("shared/*", "lessons/python"))
    assert MattsPlan.for_job(shared).lesson_namespace == "lessons/python"


def test_rollouts_log_sits_next_to_the_results_log():
    assert MattsPlan.rollouts_path("/runs/mj.jsonl").as_posix() == "/runs/mj.rollouts.jsonl"


def test_a_sequential_plan_without_its_inner_agent_is_refused():
    plan = MattsPlan(job(None), "sequential")
    with pytest.raises(ConfigError):
        list(plan.transform(subtasks(1)))


# --- the refinement agent's pure parts ----------------------------------------------------------------
def test_an_attempt_succeeds_by_passed_then_ok_then_by_returning():
    assert not attempt_succeeded({"passed": False, "ok": True})
    assert attempt_succeeded({"ok": True}) and not attempt_succeeded({"ok": False})
    assert attempt_succeeded("done")


def test_untried_strategies_come_first_in_the_next_attempt():
    history = [fix_value(None, [("widen_upper_bound", False)]), {"error": {"code": "agent_failed"}}]
    task = untried_strategies_first(
        {"strategy_order": ["widen_upper_bound", "guard_none", "reverse_sort"]}, history
    )
    assert task["strategy_order"] == ["guard_none", "reverse_sort", "widen_upper_bound"]
    assert failed_strategies(history) == ["widen_upper_bound"]


# --- through the real coordinator and ledger ---------------------------------------------------------
class BarrierWorker:
    """A worker whose run only finishes once ``barrier`` has as many runs waiting as it has parties."""

    def __init__(self, worker_id: str, pool: cf.ThreadPoolExecutor, barrier: threading.Barrier) -> None:
        self.worker_id = worker_id
        self.node_id = "node"
        self._pool = pool
        self._barrier = barrier

    def run(self, subtask: Subtask) -> cf.Future:
        def work() -> tuple[SubtaskResult, list[PhaseEvent]]:
            self._barrier.wait(timeout=30)
            value = {"passed": subtask.task["rollout"] == 1, "attempts": 1 + subtask.task["rollout"]}
            return SubtaskResult(subtask.id, subtask.index, True, value=value, worker_id=self.worker_id), []

        return self._pool.submit(work)

    def stop(self) -> None:
        self.stopped = True


class BarrierFleet:
    def __init__(self, parties: int) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=2 * parties)
        self._barrier = threading.Barrier(parties)

    def launch(self, worker_id: str) -> cf.Future:
        done: cf.Future = cf.Future()
        done.set_result((BarrierWorker(worker_id, self._pool, self._barrier), []))
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def test_rollouts_of_one_subtask_run_at_once_on_different_workers_through_the_coordinator():
    plan = MattsPlan.for_job(job(Matts("parallel", k=3), workers=3))
    main, rollouts = ListSink(), ListSink()
    sink = plan.wrap_sink(main, rollouts)
    # Each run waits for two others: a subtask's three rollouts can only finish by running together.
    stats = DispatchLoop(BarrierFleet(3), sink, workers=3).run(plan.transform(subtasks(4), sink))
    assert stats.done == 12
    assert [r.subtask_id for r in main.results] == [f"job-{i:05d}" for i in range(4)]
    for grouped in main.results:
        assert {r["worker_id"] for r in grouped.value["rollouts"]} == {"w001", "w002", "w003"}
        assert grouped.value["matts"]["winner"] == 1
    assert len(rollouts.results) == 12
