"""Specification of distillation: lessons from successes and failures, their limits and scrubbing."""

from __future__ import annotations

import json

import pytest

from rayflow.errors import InvalidInputError
from rayflow.memory.distill import (
    CONTENT_CHARS,
    TITLE_CHARS,
    Distiller,
    LLMDistiller,
    RuleDistiller,
    advice_for,
    distill,
    extract_error_lines,
)
from rayflow.wire.memory_records import Lesson, Outcome, Step, Trajectory, Verdict

GITHUB_TOKEN = "gh" + "p_" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa"
TRACEBACK = """\
Traceback (most recent call last):
  File "/work/app/main.py", line 3, in <module>
    import requests
ModuleNotFoundError: No module named 'requests'
"""
CHAINED_TRACEBACK = """\
Traceback (most recent call last):
  File "a.py", line 2, in <module>
    int("x")
ValueError: invalid literal for int() with base 10: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "a.py", line 4, in <module>
    raise RuntimeError("config broken")
RuntimeError: config broken
"""
PYTEST_FAILED = """\
tests/test_api.py ..F.                                                   [100%]
    def test_get():
>       assert client.get("/x").status_code == 200
E       AssertionError: assert 500 == 200
E        +  where 500 = <Response [500]>.status_code

tests/test_api.py:12: AssertionError
=========================== short test summary info ============================
FAILED tests/test_api.py::test_get - AssertionError: assert 500 == 200
========================= 1 failed, 3 passed in 0.21s ==========================
"""
PYTEST_PASSED = "tests/test_api.py ....                                  [100%]\n=========== 4 passed in 0.19s ==========="

FAILURE = Trajectory(
    task_id="t-fail",
    query="Make the /x endpoint return 200 (ask jane@example.com)",
    domain="python-web",
    steps=(
        Step("cat .env", f"GITHUB_TOKEN={GITHUB_TOKEN}\nDB_PASSWORD=hunter22"),
        Step(
            "python app.py --password hunter22",
            TRACEBACK
            + f"fatal: Authentication failed for 'https://bot:{GITHUB_TOKEN}@github.com/org/app.git/'",
        ),
    ),
    exit_code=1,
)
SUCCESS = Trajectory(
    task_id="t-ok",
    query="Make the /x endpoint return 200",
    domain="python-web",
    steps=(
        Step("pytest -q tests/test_api.py", PYTEST_FAILED),
        Step("sed -i 's/return 500/return 200/' app/views.py", ""),
        Step("pytest -q tests/test_api.py", PYTEST_PASSED),
    ),
    exit_code=0,
)
FAILED_VERDICT = Verdict(Outcome.FAILURE, 0.7, "exit code 1 -> failure", "heuristic")
SUCCESS_VERDICT = Verdict(Outcome.SUCCESS, 0.82, "test summary '4 passed in 0.19s' -> success", "heuristic")


def _all_text(lessons: list[Lesson]) -> str:
    return "\n".join(f"{x.title}\n{x.description}\n{x.content}\n{' '.join(x.tags)}" for x in lessons)


# --- error extraction -------------------------------------------------------------------------
def test_error_extraction_takes_the_exception_line_of_a_traceback() -> None:
    assert extract_error_lines(TRACEBACK)[0] == "ModuleNotFoundError: No module named 'requests'"


def test_error_extraction_takes_the_last_exception_of_a_chained_traceback() -> None:
    assert extract_error_lines(CHAINED_TRACEBACK)[0] == "RuntimeError: config broken"


def test_error_extraction_reads_pytest_failure_lines() -> None:
    lines = extract_error_lines(PYTEST_FAILED)
    assert lines[0] == "AssertionError: assert 500 == 200"
    assert "FAILED tests/test_api.py::test_get - AssertionError: assert 500 == 200" in lines


def test_error_extraction_reads_tool_error_lines() -> None:
    text = "To github.com:org/repo.git\n ! [rejected] main -> main\nerror: failed to push some refs"
    assert extract_error_lines(text) == ["error: failed to push some refs"]


def test_error_extraction_of_clean_output_is_empty() -> None:
    assert extract_error_lines("Successfully installed requests-2.32.3") == []


def test_advice_matches_the_error_kind() -> None:
    assert "installed" in advice_for(["ModuleNotFoundError: No module named 'requests'"])
    assert "reproduce" in advice_for(["something odd happened"])


# --- failure ----------------------------------------------------------------------------------
def test_failure_lesson_contains_the_extracted_error_line() -> None:
    lessons = distill(FAILURE, FAILED_VERDICT)
    assert lessons[0].outcome is Outcome.FAILURE
    assert "ModuleNotFoundError: No module named 'requests'" in lessons[0].content
    assert "python app.py" in lessons[0].content


def test_failure_lesson_says_what_to_check_first() -> None:
    lesson = distill(FAILURE, FAILED_VERDICT)[0]
    assert "Check first: check that the package is installed" in lesson.content


def test_no_secret_from_the_observations_survives_distillation() -> None:
    lessons = distill(FAILURE, FAILED_VERDICT, max_items=5)
    text = _all_text(lessons)
    assert "fatal: Authentication failed for 'https://[REDACTED:" in lessons[0].content
    for secret in (GITHUB_TOKEN, "jane@example.com"):
        assert secret not in text


def test_failure_tags_name_the_domain_the_exception_and_the_tool() -> None:
    failing = Trajectory(
        task_id="t", query="fix tests", domain="python-web", steps=(Step("pytest -q", PYTEST_FAILED),)
    )
    tags = distill(failing, FAILED_VERDICT)[0].tags
    assert tags[0] == "python-web"
    assert "assertionerror" in tags and "pytest" in tags


def test_failing_tests_become_their_own_lesson() -> None:
    failing = Trajectory(task_id="t", query="fix tests", steps=(Step("pytest -q", PYTEST_FAILED),))
    lessons = distill(failing, FAILED_VERDICT)
    assert any("tests/test_api.py::test_get" in x.content and "failing-tests" in x.tags for x in lessons)


def test_repeated_action_becomes_an_avoid_lesson() -> None:
    steps = tuple(Step("pytest -q", PYTEST_FAILED) for _ in range(3))
    lessons = distill(Trajectory(task_id="t", query="fix tests", steps=steps), FAILED_VERDICT, max_items=5)
    assert any(x.title == "Avoid repeating: pytest -q" for x in lessons)


def test_claim_of_done_contradicted_by_the_verdict_becomes_a_lesson() -> None:
    trajectory = Trajectory(
        task_id="t",
        query="fix tests",
        steps=(Step("pytest -q", PYTEST_FAILED),),
        final_output="All fixed, done.",
    )
    lessons = distill(trajectory, FAILED_VERDICT, max_items=5)
    assert any("unverified-claim" in x.tags for x in lessons)


def test_failure_without_steps_still_yields_a_lesson_from_the_final_output() -> None:
    trajectory = Trajectory(task_id="t", query="run the app", final_output=TRACEBACK)
    lesson = distill(trajectory, FAILED_VERDICT)[0]
    assert "ModuleNotFoundError" in lesson.content


# --- success ----------------------------------------------------------------------------------
def test_success_lesson_lists_key_actions_and_the_proof() -> None:
    lesson = distill(SUCCESS, SUCCESS_VERDICT)[0]
    assert lesson.outcome is Outcome.SUCCESS
    assert "sed -i 's/return 500/return 200/' app/views.py" in lesson.content
    assert "Proved by: `pytest -q tests/test_api.py` -> 4 passed in 0.19s" in lesson.content
    assert "strategy" in lesson.tags


def test_failed_steps_are_not_listed_as_what_worked() -> None:
    content = distill(SUCCESS, SUCCESS_VERDICT)[0].content
    worked = content.split("What worked:")[1].split("Proved by:")[0]
    assert worked.count("pytest -q") == 1  # the passing run, not the failing one


def test_success_after_an_error_yields_a_recovery_lesson() -> None:
    lessons = distill(SUCCESS, SUCCESS_VERDICT)
    recovery = next(x for x in lessons if "recovery" in x.tags)
    assert recovery.title == "Recovered from AssertionError"
    assert "sed -i" in recovery.content


def test_success_with_a_passing_check_yields_a_verification_lesson() -> None:
    lessons = distill(SUCCESS, SUCCESS_VERDICT)
    assert any("verification" in x.tags and "pytest -q tests/test_api.py" in x.content for x in lessons)


def test_lesson_confidence_comes_from_the_verdict() -> None:
    assert {x.confidence for x in distill(SUCCESS, SUCCESS_VERDICT)} == {0.82}


# --- limits and determinism -------------------------------------------------------------------
def test_max_items_bounds_the_number_of_lessons() -> None:
    assert len(distill(SUCCESS, SUCCESS_VERDICT, max_items=1)) == 1
    assert distill(SUCCESS, SUCCESS_VERDICT, max_items=0) == []


def test_negative_max_items_is_rejected() -> None:
    with pytest.raises(InvalidInputError):
        distill(SUCCESS, SUCCESS_VERDICT, max_items=-1)


def test_titles_descriptions_and_contents_are_bounded() -> None:
    long = Trajectory(
        task_id="t",
        query="Refactor " + "the very long module name " * 20,
        steps=tuple(
            Step(f"edit file_{i}.py " + "x" * 500, "Traceback (most recent call last):\n" + "y" * 5000)
            for i in range(30)
        ),
    )
    for lesson in distill(long, FAILED_VERDICT, max_items=5) + distill(long, SUCCESS_VERDICT, max_items=5):
        assert len(lesson.title) <= TITLE_CHARS
        assert len(lesson.content) <= CONTENT_CHARS
        assert "\n" not in lesson.description and lesson.description.endswith((".", "!", "?"))


def test_rule_distillation_is_deterministic() -> None:
    assert distill(SUCCESS, SUCCESS_VERDICT) == distill(SUCCESS, SUCCESS_VERDICT)
    assert distill(FAILURE, FAILED_VERDICT) == distill(FAILURE, FAILED_VERDICT)


def test_rule_distiller_satisfies_the_distiller_protocol() -> None:
    assert isinstance(RuleDistiller(), Distiller)


# --- model distiller --------------------------------------------------------------------------
def test_llm_distiller_reads_a_fenced_json_list() -> None:
    answer = (
        "Here:\n```json\n"
        + json.dumps(
            [
                {
                    "title": "Pin requests",
                    "description": "Install deps first.",
                    "content": "pip install requests",
                    "tags": ["pip", "Deps"],
                }
            ]
        )
        + "\n```"
    )
    lessons = LLMDistiller(lambda prompt: answer).distill(FAILURE, FAILED_VERDICT)
    assert len(lessons) == 1
    assert lessons[0].title == "Pin requests"
    assert lessons[0].outcome is Outcome.FAILURE and lessons[0].confidence == 0.7
    assert lessons[0].tags == ("python-web", "pip", "deps")


def test_llm_distiller_accepts_an_object_with_a_lessons_list() -> None:
    answer = json.dumps({"lessons": [{"title": "t", "description": "d", "content": "c"}]})
    assert len(LLMDistiller(lambda prompt: answer).distill(SUCCESS, SUCCESS_VERDICT)) == 1


def test_llm_distiller_scrubs_and_bounds_model_output() -> None:
    answer = json.dumps([{"title": "x" * 300, "description": "d", "content": f"use {GITHUB_TOKEN} " * 300}])
    lesson = LLMDistiller(lambda prompt: answer).distill(SUCCESS, SUCCESS_VERDICT)[0]
    assert len(lesson.title) <= TITLE_CHARS and len(lesson.content) <= CONTENT_CHARS
    assert GITHUB_TOKEN not in lesson.content


def test_llm_distiller_keeps_at_most_max_items() -> None:
    answer = json.dumps([{"title": f"t{i}", "description": "d", "content": "c"} for i in range(5)])
    assert len(LLMDistiller(lambda prompt: answer).distill(SUCCESS, SUCCESS_VERDICT, max_items=2)) == 2


def test_llm_distiller_falls_back_to_rules_on_garbage() -> None:
    lessons = LLMDistiller(lambda prompt: "lessons: be careful").distill(FAILURE, FAILED_VERDICT)
    assert lessons == distill(FAILURE, FAILED_VERDICT)


def test_llm_distiller_falls_back_when_items_lack_fields() -> None:
    answer = json.dumps([{"title": "only a title"}, "text"])
    assert LLMDistiller(lambda prompt: answer).distill(SUCCESS, SUCCESS_VERDICT) == distill(
        SUCCESS, SUCCESS_VERDICT
    )


def test_llm_distiller_falls_back_when_completion_raises() -> None:
    def broken(prompt: str) -> str:
        raise ConnectionError("down")

    assert LLMDistiller(broken).distill(FAILURE, FAILED_VERDICT) == distill(FAILURE, FAILED_VERDICT)


def test_llm_distiller_prompt_is_scrubbed() -> None:
    seen: list[str] = []

    def complete(prompt: str) -> str:
        seen.append(prompt)
        return "[]"

    LLMDistiller(complete).distill(FAILURE, FAILED_VERDICT)
    assert GITHUB_TOKEN not in seen[0] and "hunter22" not in seen[0]
    assert "what went wrong" in seen[0]


def test_llm_distiller_satisfies_the_distiller_protocol() -> None:
    assert isinstance(LLMDistiller(lambda prompt: "[]"), Distiller)
