"""Judges that decide whether an agent's trajectory succeeded, from its signals or with a model.

Why a judge at all: the ReasoningBank learns from failures as much as from successes, so every
trajectory is labelled before it is distilled, and the label's confidence becomes the prior
confidence of the memory items made from it.

:class:`HeuristicJudge` reads the signals a runtime already has (exit code, test counts, reward,
the text of the last output). :class:`LLMJudge` asks a completion function and falls back to the
heuristic whenever the answer is missing or unreadable, so a broken model never turns into a
claimed success.

The functions :func:`render_trajectory` and :func:`find_json` are shared with distillation: both
judges and distillers show a bounded, scrubbed trajectory to a model and read JSON back.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rayflow.memory.scrub import scrub_text
from rayflow.wire.memory_records import Outcome, Step, Trajectory, Verdict

log = logging.getLogger(__name__)


@runtime_checkable
class Judge(Protocol):
    """Decides the outcome of a trajectory."""

    name: str

    def judge(self, trajectory: Trajectory) -> Verdict:
        """The verdict on ``trajectory``."""


# --- reading test runner output ---------------------------------------------------------------
@dataclass(frozen=True)
class TestSummary:
    """Counts read from a test runner's summary line."""

    __test__ = False  # keeps pytest from collecting this record as a test class

    passed: int
    failed: int
    errors: int
    source: str

    @property
    def broken(self) -> int:
        """Failed plus errored tests."""
        return self.failed + self.errors


_PYTEST_DURATION = re.compile(r"\bin \d+(?:\.\d+)?s\b")
_PYTEST_COUNT = re.compile(r"\b(\d+) (passed|failed|errors?)\b")
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in ", re.MULTILINE)
_UNITTEST_FAILED = re.compile(r"^FAILED \(([^)]*)\)", re.MULTILINE)
_UNITTEST_OK = re.compile(r"^OK\b", re.MULTILINE)


def parse_test_summary(text: str) -> TestSummary | None:
    """The last pytest or unittest summary in ``text``, or None if there is none."""
    for line in reversed(text.splitlines()):
        if _PYTEST_DURATION.search(line):
            counts = _PYTEST_COUNT.findall(line)
            if counts:
                found = {"passed": 0, "failed": 0, "error": 0}
                for number, word in counts:
                    found["error" if word.startswith("error") else word] += int(number)
                return TestSummary(found["passed"], found["failed"], found["error"], line.strip(" ="))
    ran = list(_UNITTEST_RAN.finditer(text))
    if ran:
        last = ran[-1]
        total = int(last.group(1))
        rest = text[last.end() :]
        failed_line = _UNITTEST_FAILED.search(rest)
        if failed_line:
            counts = dict(re.findall(r"(\w+)=(\d+)", failed_line.group(1)))
            failures, errors = int(counts.get("failures", 0)), int(counts.get("errors", 0))
            passed = max(0, total - failures - errors - int(counts.get("skipped", 0)))
            return TestSummary(passed, failures, errors, f"Ran {total} tests: {failed_line.group(0)}")
        if _UNITTEST_OK.search(rest):
            return TestSummary(total, 0, 0, f"Ran {total} tests: OK")
    return None


_FAILURE_TEXT = (
    ("traceback", re.compile(r"Traceback \(most recent call last\)")),
    ("FAILED line", re.compile(r"^(?:FAILED|ERROR) \S", re.MULTILINE)),
    ("exception line", re.compile(r"^[\w.]*(?:Error|Exception): ", re.MULTILINE)),
    ("'error:'", re.compile(r"(?i)(?:^|\s)(?:error|fatal)(?:\[[\w-]+\])?: ", re.MULTILINE)),
    ("npm ERR!", re.compile(r"^npm ERR!", re.MULTILINE)),
)


def failure_markers(text: str) -> list[str]:
    """Names of the failure patterns found in ``text`` (tracebacks, ``error:`` lines, ...)."""
    return [name for name, pattern in _FAILURE_TEXT if pattern.search(text)]


# --- the heuristic judge ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Signal:
    outcome: Outcome
    weight: float
    detail: str


#: Weight of each kind of signal: test results are the most direct evidence.
TESTS_WEIGHT = 3.0
EXIT_CODE_WEIGHT = 2.0
REWARD_WEIGHT = 2.0
TEXT_WEIGHT = 1.0
MIN_CONFIDENCE = 0.05
MAX_CONFIDENCE = 0.99


class HeuristicJudge:
    """Weighs the trajectory's own signals; each signal votes success or failure.

    Rules:

    - Tests (weight 3): the reported ``tests_failed``/``tests_passed`` if any is given, otherwise
      the last pytest or unittest summary in the final output or the observations (newest first).
      Any failed or errored test votes failure; otherwise passing tests (or a reported
      ``tests_failed == 0``) vote success.
    - Exit code (weight 2): 0 votes success, anything else failure.
    - Reward (weight 2): at least ``reward_threshold`` votes success, below it failure.
    - Text (weight 1): a traceback, ``FAILED``/``ERROR`` test lines, an ``...Error:`` line or an
      ``error:``/``fatal:`` line in the final output or the last observation votes failure.
      Only the end of the trajectory counts: errors an agent fixed along the way are progress.

    The outcome is the side with more weight; a tie or no signal at all is a failure, because
    a success claimed without evidence would teach other agents a wrong strategy. Confidence is
    ``agreeing / total weight * (1 - 0.5 ** (agreeing weight / 2))``: it grows with how much
    evidence agrees and shrinks with dissent, clamped to [0.05, 0.99].
    """

    def __init__(self, name: str = "heuristic", *, reward_threshold: float = 0.5) -> None:
        self.name = name
        self.reward_threshold = reward_threshold

    def judge(self, trajectory: Trajectory) -> Verdict:
        signals = self.signals(trajectory)
        if not signals:
            return Verdict(
                Outcome.FAILURE,
                MIN_CONFIDENCE,
                "no signals (no tests, exit code, reward or output)",
                self.name,
            )
        weight = {outcome: sum(s.weight for s in signals if s.outcome is outcome) for outcome in Outcome}
        outcome = Outcome.SUCCESS if weight[Outcome.SUCCESS] > weight[Outcome.FAILURE] else Outcome.FAILURE
        agreeing = weight[outcome]
        total = sum(weight.values())
        confidence = agreeing / total * (1.0 - 0.5 ** (agreeing / 2.0))
        confidence = min(MAX_CONFIDENCE, max(MIN_CONFIDENCE, confidence))
        agree_count = sum(1 for s in signals if s.outcome is outcome)
        details = "; ".join(f"{s.detail} -> {s.outcome.value}" for s in signals)
        reason = f"{details} ({agree_count} of {len(signals)} signals agree)"
        return Verdict(outcome, round(confidence, 4), reason, self.name)

    def signals(self, trajectory: Trajectory) -> list[_Signal]:
        """Every signal found in the trajectory, in the order of the rules."""
        signals: list[_Signal] = []
        tests = self._tests_signal(trajectory)
        if tests is not None:
            signals.append(tests)
        if trajectory.exit_code is not None:
            outcome = Outcome.SUCCESS if trajectory.exit_code == 0 else Outcome.FAILURE
            signals.append(_Signal(outcome, EXIT_CODE_WEIGHT, f"exit code {trajectory.exit_code}"))
        if trajectory.reward is not None:
            outcome = Outcome.SUCCESS if trajectory.reward >= self.reward_threshold else Outcome.FAILURE
            signals.append(_Signal(outcome, REWARD_WEIGHT, f"reward {trajectory.reward:g}"))
        last_text = _last_texts(trajectory)
        markers = failure_markers(last_text)
        if markers:
            signals.append(_Signal(Outcome.FAILURE, TEXT_WEIGHT, "last output shows " + ", ".join(markers)))
        return signals

    def _tests_signal(self, trajectory: Trajectory) -> _Signal | None:
        passed, failed = trajectory.tests_passed, trajectory.tests_failed
        if passed is not None or failed is not None:
            if failed:
                return _Signal(Outcome.FAILURE, TESTS_WEIGHT, f"{failed} tests failed (reported)")
            if passed or failed == 0:
                return _Signal(Outcome.SUCCESS, TESTS_WEIGHT, f"{passed or 0} passed, 0 failed (reported)")
            return None
        summary = latest_test_summary(trajectory)
        if summary is None:
            return None
        if summary.broken:
            return _Signal(Outcome.FAILURE, TESTS_WEIGHT, f"test summary '{summary.source}'")
        if summary.passed:
            return _Signal(Outcome.SUCCESS, TESTS_WEIGHT, f"test summary '{summary.source}'")
        return None


def latest_test_summary(trajectory: Trajectory) -> TestSummary | None:
    """The newest test summary: in the final output, else in the observations from last to first."""
    for text in (trajectory.final_output, *(s.observation for s in reversed(trajectory.steps))):
        summary = parse_test_summary(text) if text else None
        if summary is not None:
            return summary
    return None


def _last_texts(trajectory: Trajectory) -> str:
    last_observation = trajectory.steps[-1].observation if trajectory.steps else ""
    return "\n".join(t for t in (last_observation, trajectory.final_output) if t)


# --- showing a trajectory to a model ----------------------------------------------------------
ACTION_CHARS = 400
OBSERVATION_CHARS = 1200
FINAL_OUTPUT_CHARS = 1500
QUERY_CHARS = 1000


def clip(text: str, limit: int, *, keep_tail: bool = False) -> str:
    """``text`` cut to at most ``limit`` characters, marking the cut.

    With ``keep_tail`` the cut is in the middle, because the end of a command's output (the
    error, the test summary) matters as much as its start.
    """
    if len(text) <= limit:
        return text
    cut = " [...] "
    if limit <= len(cut) + 2:
        return text[:limit]
    if keep_tail:
        head = (limit - len(cut)) // 3
        tail = limit - len(cut) - head
        return text[:head] + cut + text[-tail:]
    return text[: limit - len(cut.rstrip())] + cut.rstrip()


def _render_step(number: int, step: Step) -> str:
    action = clip(scrub_text(step.action).strip(), ACTION_CHARS)
    lines = [f"[{number}] action: {action}"]
    if step.observation.strip():
        observation = clip(scrub_text(step.observation).strip(), OBSERVATION_CHARS, keep_tail=True)
        lines.append("    observation: " + observation.replace("\n", "\n    "))
    return "\n".join(lines)


def render_trajectory(trajectory: Trajectory, max_chars: int = 6000) -> str:
    """A scrubbed, bounded text form of a trajectory for a prompt.

    When the steps do not fit, the first step and as many of the last steps as fit are kept
    (the start says what was tried, the end says how it ended) and the gap is stated.
    """
    signals = [
        f"{name}={value}"
        for name, value in (
            ("exit_code", trajectory.exit_code),
            ("tests_passed", trajectory.tests_passed),
            ("tests_failed", trajectory.tests_failed),
            ("reward", trajectory.reward),
        )
        if value is not None
    ]
    head = [f"Task: {clip(scrub_text(trajectory.query).strip(), QUERY_CHARS)}"]
    if trajectory.domain:
        head.append(f"Domain: {scrub_text(trajectory.domain)}")
    head.append("Signals: " + (", ".join(signals) if signals else "none reported"))
    head.append(f"Steps ({len(trajectory.steps)}):")
    tail = ""
    if trajectory.final_output.strip():
        final = clip(scrub_text(trajectory.final_output).strip(), FINAL_OUTPUT_CHARS, keep_tail=True)
        tail = "Final output: " + final
    budget = max_chars - len("\n".join(head)) - len(tail) - 2
    blocks = [_render_step(i + 1, step) for i, step in enumerate(trajectory.steps)]
    kept_first: list[str] = []
    kept_last: list[str] = []
    used = 0
    if blocks and len(blocks[0]) + 1 <= budget:
        kept_first.append(blocks[0])
        used += len(blocks[0]) + 1
    for block in reversed(blocks[len(kept_first) :]):
        room = budget - 40 - used - 1
        if len(block) > room:
            if not kept_last and room > 80:
                # The last step says how the attempt ended: shorten it rather than lose it.
                kept_last.insert(0, clip(block, room, keep_tail=True))
            break
        kept_last.insert(0, block)
        used += len(block) + 1
    omitted = len(blocks) - len(kept_first) - len(kept_last)
    body = kept_first + ([f"... {omitted} steps omitted ..."] if omitted else []) + kept_last
    text = "\n".join([*head, *body, *([tail] if tail else [])])
    return clip(text, max_chars, keep_tail=True)


# --- reading JSON out of a model's answer -----------------------------------------------------
_FENCE = re.compile(r"```[\w-]*\s*\n?(.*?)```", re.DOTALL)
#: Bounds the work spent on a long or hostile answer.
MAX_ANSWER_CHARS = 50_000
MAX_DECODE_ATTEMPTS = 500


def find_json(answer: str, want: type[dict | list]) -> Any | None:
    """The first JSON value of type ``want`` in ``answer``: inside ``` fences first, then anywhere.

    Models wrap JSON in fences or prose; decoding is tried from every ``{``/``[`` so prose
    around the value does not matter.
    """
    answer = answer[:MAX_ANSWER_CHARS]
    opener = "{" if want is dict else "["
    decoder = json.JSONDecoder()
    candidates = [m.group(1) for m in _FENCE.finditer(answer)] + [answer]
    attempts = 0
    for candidate in candidates:
        start = candidate.find(opener)
        while start != -1 and attempts < MAX_DECODE_ATTEMPTS:
            attempts += 1
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, want):
                return value
            start = candidate.find(opener, start + 1)
    return None


# --- the model judge --------------------------------------------------------------------------
JUDGE_INSTRUCTIONS = """\
You review the work of a coding agent. Decide whether it completed the task below.
Count it as a success only if the trajectory shows evidence that the task was done
(for example tests that pass after the change). When the evidence is missing or mixed,
answer failure.

Answer with one JSON object and nothing else:
{"outcome": "success" or "failure", "confidence": a number from 0 to 1, "reason": "one sentence"}
"""
REASON_CHARS = 500


def parse_verdict_answer(answer: str) -> tuple[Outcome, float, str] | None:
    """Outcome, confidence and reason from a model's answer, or None when it is not usable."""
    found = find_json(answer, dict)
    if found is None:
        return None
    outcome_text = found.get("outcome")
    if not isinstance(outcome_text, str) or outcome_text.strip().lower() not in ("success", "failure"):
        return None
    confidence = found.get("confidence", 0.5)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        return None
    if math.isnan(confidence):
        return None
    reason = found.get("reason", "")
    reason = reason if isinstance(reason, str) else json.dumps(reason)
    return Outcome(outcome_text.strip().lower()), min(1.0, max(0.0, float(confidence))), reason


class LLMJudge:
    """Asks a completion function for a verdict; falls back to a heuristic judge when it fails.

    ``complete`` takes a prompt and returns the model's text. It is called with a scrubbed
    trajectory of bounded size. Exceptions from it and unreadable answers never escape: the
    fallback judge decides, and the verdict's reason says that it did.
    """

    def __init__(
        self,
        complete: Callable[[str], str],
        name: str = "llm",
        *,
        fallback: Judge | None = None,
        max_prompt_chars: int = 6000,
    ) -> None:
        self.name = name
        self._complete = complete
        self.fallback: Judge = fallback if fallback is not None else HeuristicJudge()
        self.max_prompt_chars = max_prompt_chars

    def prompt(self, trajectory: Trajectory) -> str:
        """The full prompt sent to ``complete`` for ``trajectory``."""
        budget = max(500, self.max_prompt_chars - len(JUDGE_INSTRUCTIONS) - 2)
        return JUDGE_INSTRUCTIONS + "\n" + render_trajectory(trajectory, budget)

    def judge(self, trajectory: Trajectory) -> Verdict:
        try:
            answer = self._complete(self.prompt(trajectory))
        except Exception as exc:  # noqa: BLE001 - a failing model must degrade, not crash the caller
            log.warning("judge %s: completion failed with %s", self.name, type(exc).__name__)
            why = f"completion raised {type(exc).__name__}: {clip(scrub_text(str(exc)), 200)}"
            return self._fall_back(trajectory, why)
        parsed = parse_verdict_answer(answer) if isinstance(answer, str) else None
        if parsed is None:
            log.warning("judge %s: answer was not a usable JSON verdict", self.name)
            return self._fall_back(trajectory, "answer was not a usable JSON verdict")
        outcome, confidence, reason = parsed
        reason = clip(scrub_text(" ".join(reason.split())), REASON_CHARS) or "no reason given"
        return Verdict(outcome, confidence, reason, self.name)

    def _fall_back(self, trajectory: Trajectory, why: str) -> Verdict:
        verdict = self.fallback.judge(trajectory)
        reason = f"{self.name} judge failed ({why}); {self.fallback.name} judge decided: {verdict.reason}"
        return Verdict(verdict.outcome, verdict.confidence, reason, verdict.judge)
