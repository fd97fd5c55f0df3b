"""MaTTS for an agent it knows nothing about, and for one described by a profile of its own.

The engine (:mod:`rayflow.swarm.matts`) names no agent: a job's ``Matts.profile`` says what its
agent's values and tasks look like. With the default profile any agent is scaled: rollouts differ
by their seed, refinement is feedback only and lessons carry no agent's vocabulary.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from typing import Any

import pytest

from rayflow.errors import ConfigError
from rayflow.swarm.job import AgentRef, Job, Matts, MattsAgentProfile, TaskList
from rayflow.swarm.matts import CONTRAST_TAGS, MattsPlan, contrast, expand_rollouts, rollout_id, rollout_index
from rayflow.wire.subtasks import PhaseEvent, Subtask, SubtaskResult

SOLVER = "tools.solver:solve"


class ListSink:
    def __init__(self) -> None:
        self.results: list[SubtaskResult] = []

    def append(self, result: SubtaskResult) -> None:
        self.results.append(result)

    def append_event(self, event: PhaseEvent) -> None:
        pass


def solver_job(matts: Matts) -> Job:
    return Job(AgentRef.python(SOLVER, timeout_s=30), TaskList([{"puzzle": 1}]), name="solver", matts=matts)


def rollout(number: int, k: int = 2, **fields: Any) -> SubtaskResult:
    return SubtaskResult(rollout_id("solve-0", number), rollout_index(0, k, number), **{"ok": True, **fields})


def run_parallel(results_of: dict[int, dict[str, Any]]) -> tuple[list[SubtaskResult], list[dict[str, Any]]]:
    """Grouped results and stored lessons of one subtask whose rollout ``i`` reports ``results_of[i]``."""
    plan = MattsPlan.for_job(solver_job(Matts("parallel", k=len(results_of))))
    main, lessons = ListSink(), []
    sink = plan.wrap_sink(main, store_lesson=lambda namespace, lesson: lessons.append(lesson))
    for rolled in plan.transform([Subtask("solve-0", 0, {"puzzle": 1})], sink):
        sink.append(SubtaskResult(rolled.id, rolled.index, **results_of[rolled.task["rollout"]]))
    return main.results, lessons


FAILED = {"ok": False, "error": {"code": "agent_failed", "message": "ValueError: no solution"}}
SOLVED = {"ok": True, "value": {"passed": True, "answer": 42, "steps": ["guess", "check"]}}


# --- a generic agent with the defaults ------------------------------------------------------------------
def test_a_generic_agents_rollouts_become_one_result_carrying_the_winners_value():
    grouped, _ = run_parallel({0: FAILED, 1: SOLVED})
    assert [result.subtask_id for result in grouped] == ["solve-0"]
    assert grouped[0].ok and grouped[0].value["answer"] == 42
    assert grouped[0].value["matts"]["winner"] == 1


def test_a_generic_agents_lesson_carries_only_the_contrast_tags_and_error_codes():
    _, lessons = run_parallel({0: FAILED, 1: SOLVED})
    assert [lesson["tags"] for lesson in lessons] == [[*CONTRAST_TAGS, "agent_failed"]]
    assert "rollout 1: succeeded" in lessons[0]["content"]


def test_the_defaults_read_no_agent_vocabulary_even_from_values_that_have_it():
    fixer_like = {"signature": "KeyError: 'x'", "signature_id": "ab12", "strategy": "guard_none"}
    tried = [{"strategy": "guard_none", "edit": "guard at line 2", "passed": True}]
    lesson = contrast(
        [
            rollout(0, value={"passed": False, **fixer_like, "strategy": None, "tried": []}),
            rollout(1, value={"passed": True, **fixer_like, "tried": tried}),
        ]
    )
    assert lesson["tags"] == list(CONTRAST_TAGS)
    assert "Edit:" not in lesson["content"] and "tried" not in lesson["content"]


def test_a_generic_rollout_summary_keeps_the_values_scalars_and_lists_of_scalars():
    grouped, _ = run_parallel({0: SOLVED, 1: FAILED})
    kept = grouped[0].value["rollouts"][0]["value"]
    assert kept == {"passed": True, "answer": 42, "steps": ["guess", "check"]}


def test_without_an_order_field_rollouts_vary_only_their_seed():
    task = {"puzzle": 1, "strategy_order": ["a", "b", "c"]}
    expanded = list(expand_rollouts([Subtask("solve-0", 0, task)], 3))
    assert all(rolled.task["strategy_order"] == ["a", "b", "c"] for rolled in expanded)
    assert len({rolled.task.get("seed") for rolled in expanded}) == 3


def test_a_generic_agent_is_refined_on_feedback_alone():
    plan = MattsPlan.for_job(solver_job(Matts("sequential", r=3)))
    task = next(plan.transform([Subtask("solve-0", 0, {"puzzle": 1})])).task
    assert task["inner"] == SOLVER and task["r"] == 3
    assert "revise" not in task


# --- a profile of another agent ----------------------------------------------------------------------------
PROVER = MattsAgentProfile(
    reviser="tools.prover:next_tactics",
    order_field="tactics",
    tries_field="steps",
    try_name_key="tactic",
    try_edit_key="proof",
    tried_summary_field="tactics_tried",
    chosen_field="tactic",
    signature_field="goal",
    signature_id_field="goal_id",
    approaches_noun="tactics",
    chosen_tag="tactic=",
    signature_tag="goal=",
    failed_tag="dead-end=",
    edit_prefix="Proof: ",
)


def prover_value(tactic: str | None, steps: list[tuple[str, bool]]) -> dict[str, Any]:
    return {
        "passed": tactic is not None,
        "tactic": tactic,
        "goal": "Lemma: a + b = b + a",
        "goal_id": "g7",
        "steps": [{"tactic": name, "proof": f"by {name}", "passed": passed} for name, passed in steps],
    }


def test_a_profile_makes_lessons_speak_its_agents_vocabulary():
    lesson = contrast(
        [
            rollout(0, value=prover_value(None, [("simp", False)])),
            rollout(1, value=prover_value("ring", [("simp", False), ("ring", True)])),
        ],
        profile=PROVER,
    )
    assert lesson["tags"] == [*CONTRAST_TAGS, "goal=g7", "tactic=ring", "dead-end=simp"]
    assert "Proof: by ring" in lesson["content"]
    assert lesson["title"] == "ring fixes Lemma where 1 other tactics failed"


def test_a_profile_names_the_reviser_of_sequential_refinement():
    plan = MattsPlan.for_job(solver_job(Matts("sequential", r=2, profile=PROVER)))
    assert next(plan.transform([Subtask("p", 0, {})])).task["revise"] == "tools.prover:next_tactics"


def test_a_profile_names_the_task_order_that_rollouts_rotate():
    task = {"tactics": ["simp", "ring", "omega"]}
    expanded = list(expand_rollouts([Subtask("p", 0, task)], 3, profile=PROVER))
    assert [rolled.task["tactics"][0] for rolled in expanded] == ["simp", "ring", "omega"]


# --- the profile as data ---------------------------------------------------------------------------------
def test_a_profile_round_trips_through_json_and_pickle():
    assert MattsAgentProfile(**json.loads(json.dumps(asdict(PROVER)))) == PROVER
    assert pickle.loads(pickle.dumps(Matts("parallel", k=2, profile=PROVER))).profile == PROVER


def test_the_default_profile_knows_nothing():
    profile = Matts().profile
    assert profile == MattsAgentProfile()
    assert profile.reviser is None and profile.order_field is None and not profile.repairs
    assert not (profile.chosen_tag or profile.signature_tag or profile.failed_tag)


def test_a_failed_tag_that_reads_as_a_winner_tag_is_refused():
    with pytest.raises(ConfigError):
        MattsAgentProfile(chosen_tag="strategy:", failed_tag="strategy:failed:")


def test_a_reviser_not_named_module_function_is_refused():
    with pytest.raises(ConfigError):
        MattsAgentProfile(reviser="untried_first")
