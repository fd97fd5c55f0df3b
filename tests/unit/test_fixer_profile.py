"""The host's description of the demo's fixer agrees with the fixer the sandbox runs.

The host never imports the guest, so :mod:`rayflow.jobs.fixer_profile` names the fixer's targets,
task fields and tag vocabulary as plain strings. Tests may import both sides: these load the
fixer (:mod:`rayflow.guest.agents.fixer`) and the refinement agent
(:mod:`rayflow.guest.agents.matts_refine`) and check each name against what they really use.
"""

from __future__ import annotations

from typing import Any

import pytest

from rayflow.errors import ConfigError
from rayflow.guest.agents import fixer, matts_refine
from rayflow.guest.agents.repairs import DEFAULT_ORDER
from rayflow.guest.agents.signature import ErrorSignature
from rayflow.jobs.demo import DemoSettings, demo_matts
from rayflow.jobs.fixer_profile import FIXER, FIXER_PROFILE
from rayflow.swarm.matts import REFINE_AGENT, contrast, rollout_id, rollout_index
from rayflow.wire.subtasks import SubtaskResult
from rayflow.wire.targets import load_callable

SIGNATURE = ErrorSignature("AssertionError", "<num> != <num>", "test_counts")
WINNER, LOSER = DEFAULT_ORDER[0], DEFAULT_ORDER[1]


def fixer_rollout(number: int, strategy: str | None, tried: list[tuple[str, bool]]) -> SubtaskResult:
    """A rollout whose value has the fields of the fixer's result (``_Fixer._result``)."""
    value = {
        "module": "app/mod_000.py",
        "passed": strategy is not None,
        "attempts": len(tried),
        "strategy": strategy,
        "signature": SIGNATURE.text,
        "signature_id": SIGNATURE.digest,
        "tried": [
            {"strategy": name, "line": 3, "edit": f"{name} at line 3", "passed": ok, "from_memory": False}
            for name, ok in tried
        ],
    }
    return SubtaskResult(rollout_id("m", number), rollout_index(0, 2, number), True, value=value)


def as_hit(lesson: dict[str, Any]) -> dict[str, Any]:
    """A stored lesson as the hub's search returns it to the fixer."""
    return {"item": {**lesson, "id": "lesson-1"}, "score": 0.9, "similarity": 0.2}


# --- targets ---------------------------------------------------------------------------------------------
def test_the_profiles_agent_is_the_fixers_entry_point():
    assert load_callable(FIXER) is fixer.fix_module


def test_the_profiles_reviser_is_the_refinement_agents_strategy_reviser():
    assert load_callable(FIXER_PROFILE.reviser) is matts_refine.untried_strategies_first


def test_the_sequential_plans_refinement_agent_exists_in_the_sandbox():
    assert load_callable(REFINE_AGENT) is matts_refine.refine


# --- tags and lines ----------------------------------------------------------------------------------------
def test_the_lesson_tag_prefixes_are_the_ones_the_fixers_memory_lookup_reads():
    assert FIXER_PROFILE.chosen_tag == fixer.STRATEGY_TAG
    assert FIXER_PROFILE.signature_tag == fixer.SIGNATURE_TAG
    assert FIXER_PROFILE.edit_prefix == fixer.EDIT_PREFIX


def test_the_fixer_reads_a_contrast_lesson_as_an_exact_suggestion_of_the_winning_edit():
    lesson = contrast(
        [fixer_rollout(0, None, [(LOSER, False)]), fixer_rollout(1, WINNER, [(WINNER, True)])],
        profile=FIXER_PROFILE,
    )
    suggestions = fixer.suggestions_from_hits([as_hit(lesson)], SIGNATURE)
    assert [(s.strategy, s.exact, s.edits) for s in suggestions] == [(WINNER, True, (f"{WINNER} at line 3",))]


def test_the_fixer_never_reads_a_failed_strategy_as_a_suggestion():
    lesson = contrast(
        [fixer_rollout(0, None, [(LOSER, False)]), fixer_rollout(1, None, [(WINNER, False)])],
        profile=FIXER_PROFILE,
    )
    assert f"{FIXER_PROFILE.failed_tag}{LOSER}" in lesson["tags"]
    assert fixer.suggestions_from_hits([as_hit(lesson)], SIGNATURE) == []


# --- task and value fields -----------------------------------------------------------------------------------
def test_the_order_rollouts_rotate_is_the_field_the_fixers_reviser_writes():
    revised = matts_refine.untried_strategies_first({"strategy_order": list(DEFAULT_ORDER)}, [])
    assert FIXER_PROFILE.order_field in revised
    assert revised[FIXER_PROFILE.order_field] == list(DEFAULT_ORDER)


def test_rollout_and_refinement_summaries_list_tried_strategies_under_one_name():
    value = fixer_rollout(0, None, [(LOSER, False)]).value
    summary = matts_refine.attempt_summary(0, value)
    assert summary["value"][FIXER_PROFILE.tried_summary_field] == [LOSER]


# --- the demo ----------------------------------------------------------------------------------------------
def test_the_demo_scales_the_fixer_with_its_profile():
    matts = demo_matts(DemoSettings(matts="parallel", matts_k=2))
    assert matts is not None and matts.k == 2 and matts.profile == FIXER_PROFILE


def test_the_demo_without_matts_runs_each_module_once():
    assert demo_matts(DemoSettings()) is None


def test_the_demo_refuses_an_unknown_matts_mode():
    with pytest.raises(ConfigError):
        DemoSettings(matts="beam")
