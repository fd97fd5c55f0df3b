"""Specification of the judges: heuristic rules, test-summary parsing and the model judge's fallbacks."""

from __future__ import annotations

import json

import pytest

from rayflow.memory.judge import (
    HeuristicJudge,
    Judge,
    LLMJudge,
    find_json,
    parse_test_summary,
    render_trajectory,
)
from rayflow.wire.memory_records import Outcome, Step, Trajectory

PYTEST_FAILED = """\
============================= test session starts ==============================
collected 4 items

tests/test_api.py ..F.                                                   [100%]

=================================== FAILURES ===================================
    def test_get():
>       assert client.get("/x").status_code == 200
E       AssertionError: assert 500 == 200

tests/test_api.py:12: AssertionError
=========================== short test summary info ============================
FAILED tests/test_api.py::test_get - AssertionError: assert 500 == 200
========================= 1 failed, 3 passed in 0.21s ==========================
"""
PYTEST_PASSED = "tests/test_api.py ....                                  [100%]\n=========== 4 passed in 0.19s ==========="
UNITTEST_FAILED = "..F\n----------------------------------------------------------------------\nRan 3 tests in 0.002s\n\nFAILED (failures=1)\n"
UNITTEST_OK = "...\n----------------------------------------------------------------------\nRan 3 tests in 0.001s\n\nOK\n"
TRACEBACK = """\
Traceback (most recent call last):
  File "/work/app/main.py", line 3, in <module>
    import requests
ModuleNotFoundError: No module named 'requests'
"""


def _trajectory(*steps: Step, **signals: object) -> Trajectory:
    return Trajectory(task_id="t", query="fix the endpoint", steps=steps, **signals)  # type: ignore[arg-type]


# --- test summaries ---------------------------------------------------------------------------
def test_pytest_summary_counts_passed_and_failed() -> None:
    summary = parse_test_summary(PYTEST_FAILED)
    assert summary is not None
    assert (summary.passed, summary.failed, summary.errors) == (3, 1, 0)


def test_pytest_summary_counts_errors() -> None:
    summary = parse_test_summary("===== 2 passed, 1 error in 1.02s =====")
    assert summary is not None and summary.errors == 1 and summary.broken == 1


def test_quiet_pytest_summary_is_read() -> None:
    summary = parse_test_summary("....\n4 passed in 0.05s")
    assert summary is not None and summary.passed == 4


def test_last_pytest_summary_wins() -> None:
    summary = parse_test_summary("1 failed, 2 passed in 0.1s\n...\n3 passed in 0.1s")
    assert summary is not None and summary.failed == 0 and summary.passed == 3


def test_unittest_failure_summary_is_read() -> None:
    summary = parse_test_summary(UNITTEST_FAILED)
    assert summary is not None and (summary.passed, summary.failed) == (2, 1)


def test_unittest_ok_summary_is_read() -> None:
    summary = parse_test_summary(UNITTEST_OK)
    assert summary is not None and (summary.passed, summary.failed) == (3, 0)


def test_text_without_a_summary_gives_none() -> None:
    assert parse_test_summary("collected 4 items, 3 passed the review") is None


# --- heuristic judge --------------------------------------------------------------------------
def test_reported_failed_tests_make_a_failure() -> None:
    verdict = HeuristicJudge().judge(_trajectory(tests_passed=9, tests_failed=1))
    assert verdict.outcome is Outcome.FAILURE
    assert verdict.judge == "heuristic"


def test_reported_passing_tests_and_exit_zero_make_a_confident_success() -> None:
    verdict = HeuristicJudge().judge(_trajectory(tests_passed=5, tests_failed=0, exit_code=0))
    assert verdict.outcome is Outcome.SUCCESS
    assert verdict.confidence > 0.8


def test_pytest_failure_output_is_a_failure_when_counts_are_not_given() -> None:
    verdict = HeuristicJudge().judge(_trajectory(Step("pytest -q", PYTEST_FAILED)))
    assert verdict.outcome is Outcome.FAILURE
    assert "1 failed" in verdict.reason


def test_pytest_passing_output_is_a_success() -> None:
    verdict = HeuristicJudge().judge(_trajectory(Step("pytest -q", PYTEST_PASSED)))
    assert verdict.outcome is Outcome.SUCCESS


def test_fixed_failure_earlier_in_the_trajectory_does_not_count_against_success() -> None:
    trajectory = _trajectory(
        Step("pytest -q", PYTEST_FAILED),
        Step("edit app.py", ""),
        Step("pytest -q", PYTEST_PASSED),
        exit_code=0,
    )
    assert HeuristicJudge().judge(trajectory).outcome is Outcome.SUCCESS


def test_reported_counts_take_precedence_over_output_text() -> None:
    trajectory = _trajectory(Step("pytest -q", PYTEST_PASSED), tests_passed=3, tests_failed=2)
    assert HeuristicJudge().judge(trajectory).outcome is Outcome.FAILURE


def test_nonzero_exit_code_is_a_failure() -> None:
    assert HeuristicJudge().judge(_trajectory(exit_code=2)).outcome is Outcome.FAILURE


def test_traceback_in_final_output_is_a_failure() -> None:
    verdict = HeuristicJudge().judge(_trajectory(final_output=TRACEBACK))
    assert verdict.outcome is Outcome.FAILURE
    assert "traceback" in verdict.reason


def test_error_line_in_last_observation_is_a_failure() -> None:
    trajectory = _trajectory(Step("git push", "error: failed to push some refs to 'origin'"))
    assert HeuristicJudge().judge(trajectory).outcome is Outcome.FAILURE


def test_reward_at_threshold_is_a_success_and_below_is_a_failure() -> None:
    judge = HeuristicJudge(reward_threshold=0.5)
    assert judge.judge(_trajectory(reward=0.5)).outcome is Outcome.SUCCESS
    assert judge.judge(_trajectory(reward=0.2)).outcome is Outcome.FAILURE


def test_no_signals_is_a_low_confidence_failure() -> None:
    verdict = HeuristicJudge().judge(_trajectory(Step("ls", "README.md")))
    assert verdict.outcome is Outcome.FAILURE
    assert verdict.confidence <= 0.1


def test_tie_between_signals_is_a_failure() -> None:
    verdict = HeuristicJudge().judge(_trajectory(exit_code=0, reward=0.0))
    assert verdict.outcome is Outcome.FAILURE


def test_confidence_grows_as_more_signals_agree() -> None:
    judge = HeuristicJudge()
    one = judge.judge(_trajectory(exit_code=0)).confidence
    two = judge.judge(_trajectory(exit_code=0, reward=1.0)).confidence
    three = judge.judge(_trajectory(exit_code=0, reward=1.0, tests_passed=4, tests_failed=0)).confidence
    assert one < two < three <= 0.99


def test_dissenting_signal_lowers_confidence() -> None:
    judge = HeuristicJudge()
    agreeing = judge.judge(_trajectory(exit_code=0, tests_passed=4, tests_failed=0))
    dissent = judge.judge(_trajectory(exit_code=0, tests_passed=4, tests_failed=0, final_output=TRACEBACK))
    assert dissent.outcome is Outcome.SUCCESS
    assert dissent.confidence < agreeing.confidence


def test_heuristic_judge_satisfies_the_judge_protocol() -> None:
    assert isinstance(HeuristicJudge(), Judge)


# --- JSON in answers --------------------------------------------------------------------------
def test_json_is_found_inside_fences_with_prose_around() -> None:
    answer = 'Sure, here it is:\n```json\n{"outcome": "success"}\n```\nHope this helps {not json}'
    assert find_json(answer, dict) == {"outcome": "success"}


def test_json_is_found_in_bare_prose() -> None:
    assert find_json('My verdict is {"a": [1, 2]} as requested.', dict) == {"a": [1, 2]}


def test_json_of_the_wrong_type_is_not_returned() -> None:
    assert find_json('{"a": 1}', list) is None


def test_garbage_gives_no_json() -> None:
    assert find_json("no braces { here at all", dict) is None


# --- prompt rendering -------------------------------------------------------------------------
def test_rendered_trajectory_is_scrubbed() -> None:
    trajectory = _trajectory(Step("cat .env", "DB_PASSWORD=hunter22\nOWNER=jane@example.com"))
    text = render_trajectory(trajectory)
    assert "hunter22" not in text and "jane@example.com" not in text
    assert "[REDACTED:password]" in text


def test_rendered_trajectory_is_bounded_and_keeps_the_last_step() -> None:
    steps = [Step(f"command {i}", "output line\n" * 200) for i in range(50)]
    steps.append(Step("pytest -q", PYTEST_FAILED))
    text = render_trajectory(_trajectory(*steps), max_chars=3000)
    assert len(text) <= 3000
    assert "1 failed, 3 passed" in text
    assert "steps omitted" in text


# --- model judge ------------------------------------------------------------------------------
def test_llm_judge_reads_a_fenced_json_answer() -> None:
    answer = 'Looking at it:\n```json\n{"outcome": "success", "confidence": 0.9, "reason": "tests pass"}\n```'
    verdict = LLMJudge(lambda prompt: answer, name="model").judge(_trajectory(Step("pytest", PYTEST_PASSED)))
    assert verdict.outcome is Outcome.SUCCESS
    assert verdict.confidence == 0.9
    assert verdict.reason == "tests pass"
    assert verdict.judge == "model"


def test_llm_judge_clamps_confidence_into_range() -> None:
    answer = json.dumps({"outcome": "FAILURE", "confidence": 7, "reason": "broken"})
    verdict = LLMJudge(lambda prompt: answer).judge(_trajectory())
    assert verdict.outcome is Outcome.FAILURE and verdict.confidence == 1.0


def test_llm_judge_falls_back_to_heuristic_on_garbage() -> None:
    verdict = LLMJudge(lambda prompt: "I think it went fine!").judge(
        _trajectory(Step("pytest", PYTEST_FAILED))
    )
    assert verdict.outcome is Outcome.FAILURE
    assert verdict.judge == "heuristic"
    assert "not a usable JSON verdict" in verdict.reason


def test_llm_judge_falls_back_on_an_unknown_outcome_word() -> None:
    answer = '{"outcome": "partial", "confidence": 0.9}'
    verdict = LLMJudge(lambda prompt: answer).judge(_trajectory(exit_code=1))
    assert verdict.judge == "heuristic" and verdict.outcome is Outcome.FAILURE


def test_llm_judge_falls_back_when_completion_raises() -> None:
    def broken(prompt: str) -> str:
        raise TimeoutError("upstream timed out")

    verdict = LLMJudge(broken).judge(_trajectory(tests_passed=3, tests_failed=0))
    assert verdict.outcome is Outcome.SUCCESS
    assert verdict.judge == "heuristic"
    assert "TimeoutError" in verdict.reason


def test_llm_judge_fallback_without_signals_does_not_claim_success() -> None:
    verdict = LLMJudge(lambda prompt: "").judge(_trajectory(Step("ls", "README.md")))
    assert verdict.outcome is Outcome.FAILURE


def test_llm_judge_prompt_is_scrubbed_and_bounded() -> None:
    seen: list[str] = []

    def complete(prompt: str) -> str:
        seen.append(prompt)
        return '{"outcome": "failure", "confidence": 0.5, "reason": "r"}'

    token = "gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    steps = [Step("env", f"GITHUB_TOKEN={token}\n" * 100)] * 30
    LLMJudge(complete, max_prompt_chars=4000).judge(_trajectory(*steps))
    assert len(seen[0]) <= 4000
    assert token not in seen[0] and "a1B2c3D4e5F6" not in seen[0]


def test_llm_judge_reason_is_scrubbed() -> None:
    answer = '{"outcome": "failure", "confidence": 0.4, "reason": "password=hunter22 was wrong"}'
    verdict = LLMJudge(lambda prompt: answer).judge(_trajectory())
    assert "hunter22" not in verdict.reason


@pytest.mark.parametrize("confidence", ['"high"', "true", "null"])
def test_llm_judge_falls_back_on_a_non_numeric_confidence(confidence: str) -> None:
    answer = f'{{"outcome": "success", "confidence": {confidence}}}'
    verdict = LLMJudge(lambda prompt: answer).judge(_trajectory(exit_code=1))
    assert verdict.judge == "heuristic"


def test_llm_judge_satisfies_the_judge_protocol() -> None:
    assert isinstance(LLMJudge(lambda prompt: ""), Judge)
