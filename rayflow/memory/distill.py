"""Distillation of a judged trajectory into a few short lessons worth storing.

Why lessons and not transcripts: a transcript is long, specific and full of noise; what helps
the next agent is "this approach worked, proved by this command" or "this step failed with this
error; check this first". Successes give strategies, failures give warnings, and both are kept.

:class:`RuleDistiller` is deterministic (same input, same lessons) and needs no model.
:class:`LLMDistiller` asks a completion function and falls back to the rules on any bad answer.
Every text that leaves this module has been through :func:`~rayflow.memory.scrub.scrub`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from rayflow.errors import InvalidInputError
from rayflow.memory.judge import (
    clip,
    failure_markers,
    find_json,
    parse_test_summary,
    render_trajectory,
)
from rayflow.memory.scrub import scrub_text
from rayflow.wire.memory_records import Lesson, Outcome, Step, Trajectory, Verdict

log = logging.getLogger(__name__)

TITLE_CHARS = 80
DESCRIPTION_CHARS = 240
CONTENT_CHARS = 2000
MAX_TAGS = 8
#: Key actions listed in a strategy; the last ones are the path that finally worked.
MAX_KEY_ACTIONS = 6
ACTION_CHARS = 200
ERROR_LINE_CHARS = 300


@runtime_checkable
class Distiller(Protocol):
    """Turns a judged trajectory into lessons."""

    def distill(self, trajectory: Trajectory, verdict: Verdict, max_items: int = 3) -> list[Lesson]:
        """At most ``max_items`` lessons from ``trajectory``."""


# --- reading errors out of command output -----------------------------------------------------
_TRACEBACK = "Traceback (most recent call last)"
_PYTEST_E_LINE = re.compile(r"^E\s+(\S.*)$", re.MULTILINE)
_EXCEPTION_NAME = re.compile(r"\b([A-Z]\w*(?:Error|Exception|Exit|Interrupt))\b")
_PYTEST_FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) \S.*$", re.MULTILINE)
_GENERIC_ERROR_LINE = re.compile(
    r"^\s*(?:(?:error|fatal)(?:\[[\w-]+\])?:\s.*|[\w.]*(?:Error|Exception): .*|npm ERR! .*"
    r"|.*(?:command not found|No such file or directory|Permission denied).*)$",
    re.IGNORECASE | re.MULTILINE,
)


def _traceback_exception_line(text: str) -> str | None:
    """The exception line of the last traceback: the first unindented line after its frames."""
    start = text.rfind(_TRACEBACK)
    if start == -1:
        return None
    for line in text[start:].splitlines()[1:]:
        if line.strip() and not line[:1].isspace():
            return line.strip()
    return None


def extract_error_lines(text: str, limit: int = 3) -> list[str]:
    """The lines of ``text`` that best say what went wrong, most telling first.

    Order: the exception line of the last traceback, pytest's ``E`` line naming an exception,
    pytest's ``FAILED``/``ERROR`` summary lines, then ``error:``/``fatal:``/``...Error:`` lines.
    """
    found: list[str] = []

    def add(line: str | None) -> None:
        if line:
            line = clip(" ".join(line.split()), ERROR_LINE_CHARS)
            if line and line not in found:
                found.append(line)

    add(_traceback_exception_line(text))
    e_lines = [m.group(1) for m in _PYTEST_E_LINE.finditer(text)]
    add(next((line for line in e_lines if _EXCEPTION_NAME.search(line)), e_lines[0] if e_lines else None))
    for match in _PYTEST_FAILED_LINE.finditer(text):
        add(match.group(0))
    for match in _GENERIC_ERROR_LINE.finditer(text):
        add(match.group(0))
    return found[:limit]


def _step_failed(step: Step) -> bool:
    summary = parse_test_summary(step.observation)
    if summary is not None and summary.broken:
        return True
    return bool(failure_markers(step.observation)) or bool(extract_error_lines(step.observation, 1))


# --- advice for common errors -----------------------------------------------------------------
_ADVICE: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"ModuleNotFoundError|ImportError|No module named"),
        (
            "check that the package is installed for the interpreter that runs the command and "
            "that the import path is right"
        ),
    ),
    (
        re.compile(r"SyntaxError|IndentationError"),
        "check the edited file compiles (python -m py_compile) before running the tests",
    ),
    (
        re.compile(r"AssertionError|\bassert\b"),
        (
            "read the expected and actual values in the assertion and decide which side is wrong "
            "before changing code"
        ),
    ),
    (
        re.compile(r"FileNotFoundError|No such file or directory"),
        "check the path against the directory the command runs in",
    ),
    (
        re.compile(r"PermissionError|Permission denied"),
        "check file ownership and modes and where the command is allowed to write",
    ),
    (
        re.compile(r"AttributeError|TypeError|NameError"),
        "check the names and signatures in the current code rather than assuming them",
    ),
    (re.compile(r"KeyError|IndexError"), "check the actual keys or length of the data before indexing it"),
    (
        re.compile(r"(?i)TimeoutError|timed out|timeout"),
        "check for a hang or a missing service, and bound the command with a timeout",
    ),
    (
        re.compile(r"(?i)ConnectionError|connection refused"),
        "check that the service is running and reachable before calling it",
    ),
    (re.compile(r"(?i)command not found"), "check that the tool is installed and on PATH"),
    (
        re.compile(r"(?i)merge conflict|^CONFLICT"),
        "resolve the git conflicts and check git status before continuing",
    ),
    (
        re.compile(r"(?i)no matching distribution|ResolutionImpossible|could not find a version"),
        "check the package name, the version pin and that it supports this Python version",
    ),
)
_DEFAULT_ADVICE = "reproduce the failing step on its own and read its first error before changing code"


def advice_for(error_lines: Iterable[str]) -> str:
    """What to check first for these errors."""
    joined = "\n".join(error_lines)
    for pattern, advice in _ADVICE:
        if pattern.search(joined):
            return advice
    return _DEFAULT_ADVICE


# --- shaping text -----------------------------------------------------------------------------
_TOOLS = (
    "pytest", "unittest", "git", "pip", "uv", "poetry", "npm", "yarn", "pnpm", "node", "cargo", "go",
    "make", "docker", "ruff", "mypy", "tox", "nox", "mvn", "gradle", "curl", "sed", "grep",
)  # fmt: skip
_TOOL_PATTERN = re.compile(r"(?<![\w./-])(" + "|".join(_TOOLS) + r")(?![\w-])")
_VERIFY_ACTION = re.compile(
    r"\b(?:pytest|unittest|(?:npm|yarn|pnpm) (?:run )?test|cargo test|go test|make (?:test|check)|tox|nox"
    r"|mvn test|gradle test|ruff|mypy)\b"
)
_CLAIMS_DONE = re.compile(r"(?i)\b(?:all tests pass(?:ed)?|fixed|done|completed|resolved|works now)\b")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _title(text: str) -> str:
    text = _one_line(text)
    if len(text) <= TITLE_CHARS:
        return text
    cut = text[: TITLE_CHARS - 3]
    if " " in cut[TITLE_CHARS // 2 :]:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" ,;:-") + "..."


def _sentence(text: str) -> str:
    text = _one_line(text)
    if len(text) > DESCRIPTION_CHARS:
        cut = text[: DESCRIPTION_CHARS - 3]
        if " " in cut[DESCRIPTION_CHARS // 2 :]:
            cut = cut[: cut.rfind(" ")]
        text = cut.rstrip(" ,;:-") + "..."
    if not text.endswith((".", "!", "?")):
        text += "."
    return text[:1].upper() + text[1:]


def _action_text(action: str) -> str:
    lines = [line for line in action.strip().splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    if len(lines) > 1:
        first += " ..."
    return clip(first, ACTION_CHARS)


def _tag(raw: str) -> str:
    return re.sub(r"[^a-z0-9_.:+-]+", "-", raw.strip().lower()).strip("-")


def _tags(*groups: Iterable[str]) -> tuple[str, ...]:
    tags: list[str] = []
    for group in groups:
        for raw in group:
            tag = _tag(raw)
            if tag and tag not in tags:
                tags.append(tag)
    return tuple(tags[:MAX_TAGS])


def _scrubbed(trajectory: Trajectory) -> Trajectory:
    """The trajectory with every text scrubbed, so nothing derived from it can hold a secret."""
    return dataclasses.replace(
        trajectory,
        query=scrub_text(trajectory.query),
        domain=scrub_text(trajectory.domain),
        final_output=scrub_text(trajectory.final_output),
        steps=tuple(Step(scrub_text(s.action), scrub_text(s.observation)) for s in trajectory.steps),
    )


def make_lesson(
    title: str, description: str, content: str, outcome: Outcome, tags: Iterable[str], confidence: float
) -> Lesson:
    """A lesson with scrubbed text cut to the stored limits (title 80, sentence, content 2000)."""
    return Lesson(
        title=_title(scrub_text(title)),
        description=_sentence(scrub_text(description)),
        content=clip(scrub_text(content.strip()), CONTENT_CHARS),
        outcome=outcome,
        tags=_tags(tag for tag in map(scrub_text, tags) if "[REDACTED:" not in tag),
        confidence=min(1.0, max(0.0, confidence)),
    )


# --- the rule-based distiller -----------------------------------------------------------------
class RuleDistiller:
    """Deterministic lessons built from the trajectory's structure.

    Success: the strategy (key actions and the command that proved it), then how an error on
    the way was overcome, then the verification command on its own. Failure: the failing step
    with its error lines and what to check first, then the failing tests, then an action that
    was repeated without progress or a claim of being done that the verdict contradicts.
    """

    def distill(self, trajectory: Trajectory, verdict: Verdict, max_items: int = 3) -> list[Lesson]:
        if max_items < 0:
            raise InvalidInputError("max_items must be >= 0", max_items=max_items)
        if max_items == 0:
            return []
        clean = _scrubbed(trajectory)
        build = self._successes if verdict.outcome is Outcome.SUCCESS else self._failures
        return build(clean, verdict)[:max_items]

    # --- success ------------------------------------------------------------------------------
    def _successes(self, trajectory: Trajectory, verdict: Verdict) -> list[Lesson]:
        base_tags = self._base_tags(trajectory, [])
        task = _one_line(trajectory.query)
        proof = self._proof(trajectory)
        key_actions = self._key_actions(trajectory)
        lines = [f"Task: {clip(task, 300)}"]
        if key_actions:
            lines.append("What worked:")
            lines += [f"{i}. {action}" for i, action in enumerate(key_actions, 1)]
        if proof:
            lines.append(f"Proved by: {proof}")
        lines.append(f"Judged success: {clip(verdict.reason, 400)}")
        proof_words = f"verified by {proof}" if proof else "judged a success"
        steps_words = f" in {len(key_actions)} key steps" if key_actions else ""
        lessons = [
            make_lesson(
                f"Worked: {task}",
                f"An approach{steps_words} completed this task and was {proof_words}",
                "\n".join(lines),
                Outcome.SUCCESS,
                [*base_tags, "strategy"],
                verdict.confidence,
            )
        ]
        recovery = self._recovery(trajectory, verdict, base_tags)
        if recovery is not None:
            lessons.append(recovery)
        if proof:
            lessons.append(
                make_lesson(
                    f"Verify with: {proof}",
                    f"Running this check confirmed the task '{clip(task, 80)}' was done",
                    f"Task: {clip(task, 300)}\nCheck that proved it: {proof}\n"
                    "Run the same check after similar changes before declaring the work done.",
                    Outcome.SUCCESS,
                    [*base_tags, "verification"],
                    verdict.confidence,
                )
            )
        return lessons

    def _key_actions(self, trajectory: Trajectory) -> list[str]:
        actions: list[str] = []
        for step in trajectory.steps:
            action = _action_text(step.action)
            if not action or _step_failed(step):
                continue
            if action in actions:
                actions.remove(action)  # keep the latest position of a repeated action
            actions.append(action)
        return actions[-MAX_KEY_ACTIONS:]

    def _proof(self, trajectory: Trajectory) -> str:
        """The last passing check, as "`command` -> summary"; empty if there is none."""
        for step in reversed(trajectory.steps):
            summary = parse_test_summary(step.observation)
            is_check = _VERIFY_ACTION.search(step.action) is not None
            if (summary is not None and not summary.broken and summary.passed) or (
                is_check and summary is None and not _step_failed(step)
            ):
                proof = f"`{_action_text(step.action)}`"
                return f"{proof} -> {summary.source}" if summary is not None else proof
            if summary is not None and summary.broken:
                return ""  # the newest check failed: nothing proves the work
        summary = parse_test_summary(trajectory.final_output)
        if summary is not None and not summary.broken and summary.passed:
            return f"final output reports {summary.source}"
        return ""

    def _recovery(self, trajectory: Trajectory, verdict: Verdict, base_tags: list[str]) -> Lesson | None:
        failed_at = [i for i, step in enumerate(trajectory.steps) if _step_failed(step)]
        if not failed_at:
            return None
        index = failed_at[-1]
        failed = trajectory.steps[index]
        errors = extract_error_lines(failed.observation) or ["(no error line captured)"]
        fixes = [_action_text(s.action) for s in trajectory.steps[index + 1 : index + 4] if s.action.strip()]
        if not fixes:
            return None
        error_name = _EXCEPTION_NAME.search(errors[0])
        what = error_name.group(1) if error_name else clip(errors[0], 50)
        lines = [
            f"Task: {clip(_one_line(trajectory.query), 300)}",
            f"Step that failed: `{_action_text(failed.action)}`",
            "Error:",
            *[f"  {line}" for line in errors],
            "What fixed it:",
            *[f"{i}. {fix}" for i, fix in enumerate(fixes, 1)],
        ]
        return make_lesson(
            f"Recovered from {what}",
            f"The error '{clip(errors[0], 120)}' was overcome by '{clip(fixes[0], 80)}'",
            "\n".join(lines),
            Outcome.SUCCESS,
            [*base_tags, *self._exception_tags(errors), "recovery"],
            verdict.confidence,
        )

    # --- failure ------------------------------------------------------------------------------
    def _failures(self, trajectory: Trajectory, verdict: Verdict) -> list[Lesson]:
        task = _one_line(trajectory.query)
        steps = trajectory.steps
        failing_index = next((i for i in range(len(steps) - 1, -1, -1) if _step_failed(steps[i])), None)
        if failing_index is None and steps:
            failing_index = len(steps) - 1
        failing = steps[failing_index] if failing_index is not None else None
        error_source = failing.observation if failing is not None else ""
        errors = extract_error_lines(error_source) or extract_error_lines(trajectory.final_output)
        base_tags = self._base_tags(trajectory, errors)
        advice = advice_for(errors)
        lines = [f"Task: {clip(task, 300)}"]
        if failing is not None and failing_index is not None:
            lines.append(
                f"Failing step ({failing_index + 1} of {len(steps)}): `{_action_text(failing.action)}`"
            )
        if errors:
            lines.append("Error:")
            lines += [f"  {line}" for line in errors]
        lines.append(f"Check first: {advice}.")
        lines.append(f"Judged failure: {clip(verdict.reason, 400)}")
        headline = errors[0] if errors else "no error line was captured"
        error_name = _EXCEPTION_NAME.search(headline)
        what = f" ({error_name.group(1)})" if error_name else ""
        where = f"`{clip(_action_text(failing.action), 60)}`" if failing is not None else "the task"
        lessons = [
            make_lesson(
                f"Failed{what}: {task}",
                f"{where} failed with '{clip(headline, 120)}'; {advice}",
                "\n".join(lines),
                Outcome.FAILURE,
                [*base_tags, "pitfall"],
                verdict.confidence,
            )
        ]
        failed_tests = self._failed_tests(error_source + "\n" + trajectory.final_output)
        if failed_tests:
            lessons.append(
                make_lesson(
                    f"Tests left failing: {task}",
                    f"{len(failed_tests)} test{'s' if len(failed_tests) > 1 else ''} still failed when "
                    "the attempt ended",
                    f"Task: {clip(task, 300)}\nStill failing:\n"
                    + "\n".join(f"  {t}" for t in failed_tests)
                    + "\nRun these first on the next attempt and read each failure before editing.",
                    Outcome.FAILURE,
                    [*base_tags, "failing-tests"],
                    verdict.confidence,
                )
            )
        repeated = self._repeated_action(trajectory)
        if repeated is not None:
            action, count = repeated
            lessons.append(
                make_lesson(
                    f"Avoid repeating: {action}",
                    f"`{action}` was run {count} times without the task succeeding",
                    f"Task: {clip(task, 300)}\n`{action}` was run {count} times and the task still failed.\n"
                    "Change something between attempts (read the error, inspect the code, try another "
                    "approach) instead of re-running the same command.",
                    Outcome.FAILURE,
                    [*base_tags, "repeated-action"],
                    verdict.confidence,
                )
            )
        if _CLAIMS_DONE.search(trajectory.final_output):
            lessons.append(
                make_lesson(
                    f"Claimed done but failed: {task}",
                    "The final answer claimed the task was done, but the evidence showed it was not",
                    f"Task: {clip(task, 300)}\nFinal answer: {clip(_one_line(trajectory.final_output), 300)}\n"
                    f"Evidence: {clip(verdict.reason, 400)}\n"
                    "Run the checks that prove the task and read their result before declaring it done.",
                    Outcome.FAILURE,
                    [*base_tags, "unverified-claim"],
                    verdict.confidence,
                )
            )
        return lessons

    @staticmethod
    def _failed_tests(text: str) -> list[str]:
        tests: list[str] = []
        for match in _PYTEST_FAILED_LINE.finditer(text):
            test_id = match.group(0).split(" ", 1)[1].split(" - ", 1)[0].strip()
            if test_id not in tests:
                tests.append(test_id)
        return tests[:10]

    @staticmethod
    def _repeated_action(trajectory: Trajectory) -> tuple[str, int] | None:
        counts: dict[str, int] = {}
        for step in trajectory.steps:
            action = _action_text(step.action)
            if action:
                counts[action] = counts.get(action, 0) + 1
        best = max(counts.items(), key=lambda item: item[1], default=None)
        return best if best is not None and best[1] >= 3 else None

    # --- tags ---------------------------------------------------------------------------------
    @staticmethod
    def _exception_tags(errors: Iterable[str]) -> list[str]:
        return [name for line in errors for name in _EXCEPTION_NAME.findall(line)]

    def _base_tags(self, trajectory: Trajectory, errors: list[str]) -> list[str]:
        tools = [m.group(1) for s in trajectory.steps for m in _TOOL_PATTERN.finditer(s.action)]
        domain = [trajectory.domain] if trajectory.domain.strip() else []
        return [*domain, *self._exception_tags(errors), *tools]


def distill(trajectory: Trajectory, verdict: Verdict, *, max_items: int = 3) -> list[Lesson]:
    """At most ``max_items`` lessons from a judged trajectory, by the deterministic rules."""
    return RuleDistiller().distill(trajectory, verdict, max_items)


# --- the model distiller ----------------------------------------------------------------------
DISTILL_INSTRUCTIONS = """\
You turn the record of a coding agent's attempt into short lessons for other agents.
The attempt was judged a {outcome} ({reason}).
{focus}
Write at most {max_items} lessons. Answer with a JSON list and nothing else, each element:
{{"title": "at most 80 characters", "description": "one sentence",
  "content": "at most 2000 characters: concrete commands, error messages, checks",
  "tags": ["short", "lowercase", "words"]}}
"""
_FOCUS = {
    Outcome.SUCCESS: "Say what worked: the key actions and the command or test that proved it.",
    Outcome.FAILURE: "Say what went wrong and what to avoid or check first next time: the failing step and "
    "the exact error line.",
}


class LLMDistiller:
    """Asks a completion function for lessons as JSON; falls back to the rules on a bad answer."""

    def __init__(
        self,
        complete: Callable[[str], str],
        *,
        fallback: Distiller | None = None,
        max_prompt_chars: int = 6000,
    ) -> None:
        self._complete = complete
        self.fallback: Distiller = fallback if fallback is not None else RuleDistiller()
        self.max_prompt_chars = max_prompt_chars

    def prompt(self, trajectory: Trajectory, verdict: Verdict, max_items: int) -> str:
        """The full prompt sent to ``complete``."""
        head = DISTILL_INSTRUCTIONS.format(
            outcome=verdict.outcome.value,
            reason=clip(_one_line(scrub_text(verdict.reason)), 300),
            focus=_FOCUS[verdict.outcome],
            max_items=max_items,
        )
        budget = max(500, self.max_prompt_chars - len(head) - 2)
        return head + "\n" + render_trajectory(trajectory, budget)

    def distill(self, trajectory: Trajectory, verdict: Verdict, max_items: int = 3) -> list[Lesson]:
        if max_items < 0:
            raise InvalidInputError("max_items must be >= 0", max_items=max_items)
        if max_items == 0:
            return []
        try:
            answer = self._complete(self.prompt(trajectory, verdict, max_items))
        except Exception as exc:  # noqa: BLE001 - a failing model must degrade to the rules, not crash
            log.warning("distiller: completion failed with %s; using rules", type(exc).__name__)
            return self.fallback.distill(trajectory, verdict, max_items)
        lessons = self._parse(answer, trajectory, verdict) if isinstance(answer, str) else []
        if not lessons:
            log.warning("distiller: answer held no usable lessons; using rules")
            return self.fallback.distill(trajectory, verdict, max_items)
        return lessons[:max_items]

    @staticmethod
    def _parse(answer: str, trajectory: Trajectory, verdict: Verdict) -> list[Lesson]:
        found: Any = find_json(answer, list)
        if found is None:
            wrapped = find_json(answer, dict)
            found = wrapped.get("lessons") if isinstance(wrapped, dict) else None
        if not isinstance(found, list):
            return []
        domain = [trajectory.domain] if trajectory.domain.strip() else []
        lessons: list[Lesson] = []
        for item in found:
            if not isinstance(item, dict):
                continue
            fields = [item.get(name) for name in ("title", "description", "content")]
            if not all(isinstance(value, str) and value.strip() for value in fields):
                continue
            raw_tags = item.get("tags", [])
            tags = [t for t in raw_tags if isinstance(t, str)] if isinstance(raw_tags, list) else []
            title, description, content = (str(value) for value in fields)
            lessons.append(
                make_lesson(
                    title, description, content, verdict.outcome, [*domain, *tags], verdict.confidence
                )
            )
        return lessons
