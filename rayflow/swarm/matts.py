"""Memory-aware test-time scaling of a job's subtasks: rollouts, their judge and what they teach.

Why here and not in the coordinator: MaTTS changes *what* is dispatched and *how results are
counted*, not how dispatching works. In parallel mode each subtask becomes ``k`` rollout
subtasks (:func:`expand_rollouts`); to the :class:`~rayflow.swarm.ledger.DispatchLedger` they
are ordinary subtasks with ids and indexes of their own, so the ``k`` rollouts of one subtask run
at once on different workers, are retried on their own, and are each recorded in the hub. A
:class:`RolloutGroups` aggregator then turns the ``k`` rollout results back into exactly one
result per original subtask, chosen by :func:`judge_rollouts`, keeping a summary of every
rollout (nothing is overwritten) and contrasting the winner with the others
(:func:`contrast`) into one lesson for the shared memory.

Sequential mode needs no change to dispatching at all: the job's agent is swapped for the
in-sandbox refinement agent (:mod:`rayflow.guest.agents.matts_refine`) with the original agent as its
``inner``. :class:`MattsPlan` bundles both so a job runner wires MaTTS in a few lines.

Nothing here knows any particular agent. What MaTTS may know about the job's agent (its reviser,
the task field ordering its approaches, how its value reports what it tried, the tags its memory
lookup reads) is the job's :class:`~rayflow.swarm.job.MattsAgentProfile`, in ``Matts.profile``;
the defaults fit any agent.

Pure: no Ray, no processes, no hub. Storing a lesson is a callback the caller provides.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from rayflow.errors import ConfigError, InvalidInputError, RayflowError
from rayflow.memory.judge import clip, parse_test_summary
from rayflow.swarm.job import AgentRef, Job, Matts, MattsAgentProfile
from rayflow.wire.memory_use import MEMORY_FIELD, MemoryUse
from rayflow.wire.subtasks import PhaseEvent, Subtask, SubtaskResult

log = logging.getLogger("rayflow.swarm.matts")

#: Separates a subtask's id from its rollout number: ``<subtask>~r<i>``.
ROLLOUT_MARK = "~r"
#: The in-sandbox refinement agent of sequential mode.
REFINE_AGENT = "rayflow.guest.agents.matts_refine:refine"
#: What MaTTS knows about an agent whose job names no profile: nothing.
ANY_AGENT = MattsAgentProfile()
#: Task fields MaTTS sets on each rollout (``seed`` only on rollouts after the first).
ROLLOUT_FIELD = "rollout"
ROLLOUTS_FIELD = "rollouts"
SEED_FIELD = "seed"
CONTRAST_DOMAIN = "matts"
CONTRAST_TAGS = ("matts", "contrast")
TITLE_CHARS = 80
CONTENT_CHARS = 2000
SUMMARY_TEXT_CHARS = 300
MAX_LESSON_TAGS = 24
#: Scalar types a rollout summary copies from an agent's value.
_SCALARS = (str, int, float, bool, type(None))


# --- ids and indexes ------------------------------------------------------------------------------
def rollout_id(subtask_id: str, rollout: int) -> str:
    """The id of rollout ``rollout`` of ``subtask_id``."""
    return f"{subtask_id}{ROLLOUT_MARK}{rollout}"


def split_rollout_id(subtask_id: str) -> tuple[str, int] | None:
    """``(original id, rollout number)`` of a rollout id, or ``None`` if it names no rollout."""
    original, mark, number = subtask_id.rpartition(ROLLOUT_MARK)
    if not mark or not original or not number.isdigit():
        return None
    return original, int(number)


def rollout_index(index: int, k: int, rollout: int) -> int:
    """The ledger index of rollout ``rollout`` of the subtask at ``index``.

    ``index * k + rollout``: unique across the job (rollout < k), reversible by division, and
    ordered so the rollouts log reads subtask by subtask.
    """
    if not 0 <= rollout < k:
        raise InvalidInputError("a rollout number is in [0, k)", rollout=rollout, k=k)
    return index * k + rollout


def original_index(index: int, k: int) -> int:
    """The index of the subtask whose rollout has ledger index ``index``."""
    return index // k


def rollout_seed(seed: int, index: int, rollout: int) -> int:
    """A seed for one rollout: stable across runs, different per subtask and rollout."""
    digest = hashlib.sha256(f"{seed}:{index}:{rollout}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _rotated(order: Sequence[Any], rollout: int, k: int) -> list[Any]:
    shift = (rollout * len(order)) // k
    return [*order[shift:], *order[:shift]]


def rollout_task(
    task: Mapping[str, Any],
    index: int,
    rollout: int,
    k: int,
    seed: int,
    *,
    profile: MattsAgentProfile = ANY_AGENT,
) -> dict[str, Any]:
    """The task of one rollout: the subtask's task plus its rollout number and an exploration knob.

    Rollout 0 is the subtask as the job wrote it (the baseline a run without MaTTS would make).
    Every other rollout gets a ``seed`` of its own and, when the task pins the order of its
    approaches (the profile's ``order_field``), that order rotated by ``rollout / k`` of its
    length, so rollouts start their search in different places instead of repeating each other.
    """
    varied = {**dict(task), ROLLOUT_FIELD: rollout, ROLLOUTS_FIELD: k}
    if rollout == 0:
        return varied
    base = task.get(SEED_FIELD)
    varied[SEED_FIELD] = rollout_seed(int(base) if isinstance(base, int) else seed, index, rollout)
    order_field = profile.order_field
    order = task.get(order_field) if order_field else None
    if order_field and isinstance(order, (list, tuple)) and order:
        varied[order_field] = _rotated(list(order), rollout, k)
    return varied


def expand_rollouts(
    subtasks: Iterable[Subtask], k: int, seed: int = 0, *, profile: MattsAgentProfile = ANY_AGENT
) -> Iterator[Subtask]:
    """Each subtask as ``k`` rollout subtasks, lazily, the rollouts of one subtask next to each other.

    Adjacent rollouts matter: the ledger hands out subtasks in order, so with at least ``k``
    workers the ``k`` rollouts of a subtask run at the same time.
    """
    if k < 1:
        raise InvalidInputError("k is at least 1", k=k)
    for subtask in subtasks:
        for rollout in range(k):
            yield Subtask(
                rollout_id(subtask.id, rollout),
                rollout_index(subtask.index, k, rollout),
                rollout_task(subtask.task, subtask.index, rollout, k, seed, profile=profile),
            )


# --- the judge --------------------------------------------------------------------------------------
def rollout_number(result: SubtaskResult, k: int | None = None) -> int:
    """Which rollout ``result`` is: from its id, else from its index when ``k`` is known, else 0."""
    parsed = split_rollout_id(result.subtask_id)
    if parsed is not None:
        return parsed[1]
    return result.index % k if k else 0


def succeeded(result: SubtaskResult) -> bool:
    """Whether a rollout did its job: the agent ran to the end and did not report ``passed: false``."""
    if not result.ok:
        return False
    value = result.value
    return not (isinstance(value, Mapping) and value.get("passed") is False)


def rollout_score(result: SubtaskResult) -> float | None:
    """A task-reported quality: the value's numeric ``score``, else the share of passing tests in
    the output's last test summary (shell agents), else ``None``."""
    value = result.value
    if isinstance(value, Mapping):
        score = value.get("score")
        if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
            return float(score)
    summary = parse_test_summary(result.output_tail) if result.output_tail else None
    if summary is not None and summary.passed + summary.broken > 0:
        return summary.passed / (summary.passed + summary.broken)
    return None


def rank_key(result: SubtaskResult) -> tuple[int, int, int, float, int, int]:
    """Sort key of a rollout, best first: success, then an agent that ran over one that crashed,
    then a result over none (a lost worker), then higher score, fewer attempts, lower rollout number.

    The last tie-breaker is the rollout number rather than the finish time: when a rollout ends
    depends on scheduling and on the clocks of different nodes, so it would make the choice vary
    between identical runs.
    """
    score = rollout_score(result)
    return (
        0 if succeeded(result) else 1,
        0 if result.ok else 1,
        0 if result.value is not None or result.exit_code is not None else 1,
        -score if score is not None else math.inf,
        result.attempts,
        rollout_number(result),
    )


def judge_rollouts(results: Sequence[SubtaskResult]) -> SubtaskResult:
    """The best of one subtask's rollouts (see :func:`rank_key`); the same for any order of ``results``."""
    if not results:
        raise InvalidInputError("there are no rollouts to judge")
    return min(results, key=lambda result: (rank_key(result), result.subtask_id))


# --- what each rollout did, kept -------------------------------------------------------------------
def _compact(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value, SUMMARY_TEXT_CHARS)
    return value


def rollout_summary(result: SubtaskResult, *, profile: MattsAgentProfile = ANY_AGENT) -> dict[str, Any]:
    """A bounded record of one rollout for the grouped result (the full result is in the rollouts log).

    From the agent's value it keeps scalar fields and lists of scalars; the agent's tries (the
    profile's ``tries_field``) are summarised as the distinct approaches they name, under the
    profile's ``tried_summary_field``.
    """
    summary: dict[str, Any] = {
        "rollout": rollout_number(result),
        "subtask_id": result.subtask_id,
        "ok": result.ok,
        "succeeded": succeeded(result),
        "score": rollout_score(result),
        "attempts": result.attempts,
        "duration_s": round(result.duration_s, 3),
        "dispatches": result.dispatches,
        "worker_id": result.worker_id,
        "node_id": result.node_id,
        "region": result.region,
        "sandbox_id": result.sandbox_id,
        "exit_code": result.exit_code,
        "error": dict(result.error) if result.error is not None else None,
    }
    value = result.value
    if isinstance(value, Mapping):
        kept: dict[str, Any] = {}
        for name, item in value.items():
            if isinstance(item, _SCALARS):
                kept[str(name)] = _compact(item)
            elif isinstance(item, (list, tuple)) and all(isinstance(x, _SCALARS) for x in item):
                kept[str(name)] = [_compact(x) for x in item]
        approaches = tried_approaches(value, profile)
        if approaches:
            kept[profile.tried_summary_field] = approaches
        summary["value"] = kept
    elif isinstance(value, _SCALARS):
        summary["value"] = _compact(value)
    return summary


def tries(value: Any, profile: MattsAgentProfile) -> list[Mapping[str, Any]]:
    """The tries an agent's value lists (the profile's ``tries_field``) that name an approach."""
    if profile.tries_field is None or not isinstance(value, Mapping):
        return []
    listed = value.get(profile.tries_field)
    if not isinstance(listed, list):
        return []
    return [entry for entry in listed if isinstance(entry, Mapping) and entry.get(profile.try_name_key)]


def tried_approaches(value: Any, profile: MattsAgentProfile = ANY_AGENT) -> list[str]:
    """The distinct approaches an agent's value says it tried, in the order first tried."""
    return list(dict.fromkeys(str(entry[profile.try_name_key]) for entry in tries(value, profile)))


def group_result(
    original_id: str,
    index: int,
    results: Sequence[SubtaskResult],
    *,
    k: int,
    missing: Sequence[int] = (),
    profile: MattsAgentProfile = ANY_AGENT,
) -> SubtaskResult:
    """The one result of a subtask from its rollouts: the winner's, with every rollout kept.

    The value is the winner's value (a mapping; any other value sits under ``"value"``) plus
    ``rollouts`` (a summary of each, in rollout order) and ``matts`` (the mode, ``k``, the
    winner, rollouts that never reported). ``attempts`` becomes the sum over rollouts, so a
    report counts the work scaling cost; ``winner_attempts`` keeps the winner's own. Timing spans
    from the first rollout's start to the last one's end; ``dispatches`` is the most any rollout
    needed, so a subtask counts as re-dispatched only when one of its rollouts was.
    """
    winner = judge_rollouts(results)
    ordered = sorted(results, key=lambda result: (rollout_number(result, k), result.subtask_id))
    summaries = [rollout_summary(result, profile=profile) for result in ordered]
    base = dict(winner.value) if isinstance(winner.value, Mapping) else {"value": winner.value}
    memory = _memory_of_rollouts(results)
    if memory is not None:
        # The scaled subtask used memory in every rollout: count all of them, as with attempts.
        base[MEMORY_FIELD] = memory.to_dict()
    value = {
        **base,
        "attempts": sum(result.attempts for result in results),
        "winner_attempts": winner.attempts,
        "matts": {
            "mode": "parallel",
            "k": k,
            "winner": rollout_number(winner, k),
            "succeeded": sum(succeeded(result) for result in results),
            "missing": sorted(missing),
        },
        "rollouts": summaries,
    }
    started = [result.started_at for result in results if result.started_at > 0]
    ended = [result.ended_at for result in results if result.ended_at > 0]
    return SubtaskResult(
        subtask_id=original_id,
        index=index,
        ok=winner.ok,
        value=value,
        error=winner.error,
        exit_code=winner.exit_code,
        output_tail=winner.output_tail,
        dispatches=max(result.dispatches for result in results),
        worker_id=winner.worker_id,
        node_id=winner.node_id,
        sandbox_id=winner.sandbox_id,
        region=winner.region,
        started_at=min(started) if started else 0.0,
        ended_at=max(ended) if ended else 0.0,
    )


def _memory_of_rollouts(results: Sequence[SubtaskResult]) -> MemoryUse | None:
    """The memory use of every rollout summed, or ``None`` when none used memory."""
    total: MemoryUse | None = None
    for result in results:
        use = result.memory
        if use is not None:
            total = use if total is None else total.merged(use)
    return total


# --- what the rollouts teach, by contrast ------------------------------------------------------------
def contrast(
    results: Sequence[SubtaskResult], *, profile: MattsAgentProfile = ANY_AGENT
) -> dict[str, Any] | None:
    """One lesson from comparing a subtask's rollouts, as ``store_pattern`` keyword arguments
    (``title, description, content, tags, domain, outcome, confidence, source_task``; the caller
    adds ``namespace``), or ``None`` when there is nothing to contrast.

    When the profile says where results name the failure the agent worked on and the approaches
    it tried, the lesson names which approach fixed this failure and which
    failed on it across all rollouts: a success is tagged with the profile's ``chosen_tag`` and
    ``signature_tag`` and carries an ``edit_prefix`` line, the form the agent's own memory lookup
    follows; failed approaches are tagged with ``failed_tag`` so they are never mistaken for
    suggestions. When no rollout succeeded the lesson is a warning (outcome ``failure``) without
    a winner's tag. Otherwise the lesson says which rollout succeeded where others failed, and
    with what errors; rollouts that all ended alike teach nothing by contrast.
    """
    if len(results) < 2:
        return None
    winner = judge_rollouts(results)
    if any(signature_of(result, profile) for result in results):
        return _repair_contrast(winner, results, profile)
    return _outcome_contrast(winner, results, profile)


def signature_of(result: SubtaskResult, profile: MattsAgentProfile = ANY_AGENT) -> tuple[str, str] | None:
    """``(text, digest)`` of the failure a result says its agent worked on, when it also lists its tries."""
    value = result.value
    if not profile.repairs or not isinstance(value, Mapping) or not value.get(profile.signature_field):
        return None
    if not isinstance(value.get(profile.tries_field), list):
        return None
    digest = value.get(profile.signature_id_field) if profile.signature_id_field else None
    return str(value[profile.signature_field]), str(digest or "")


def _chosen(result: SubtaskResult, profile: MattsAgentProfile) -> Any:
    value = result.value
    if profile.chosen_field is None or not isinstance(value, Mapping):
        return None
    return value.get(profile.chosen_field)


def _repair_contrast(
    winner: SubtaskResult, results: Sequence[SubtaskResult], profile: MattsAgentProfile
) -> dict[str, Any]:
    signature, digest = next(
        found for found in (signature_of(r, profile) for r in [winner, *results]) if found
    )
    name, edit = profile.try_name_key, profile.try_edit_key
    worked: dict[str, str] = {}
    failed: list[str] = []
    for result in sorted(results, key=rollout_number):
        for entry in tries(result.value, profile):
            approach = str(entry[name])
            if entry.get("passed"):
                worked.setdefault(approach, str(entry.get(edit) or ""))
            elif approach not in failed:
                failed.append(approach)
    failed = [approach for approach in failed if approach not in worked]
    lines = [f"Failure: {signature}"]
    win_approach = _chosen(winner, profile) if succeeded(winner) else None
    tags = [*CONTRAST_TAGS]
    if digest and profile.signature_tag:
        tags.append(f"{profile.signature_tag}{digest}")
    noun = profile.approaches_noun
    if win_approach:
        win_edit = next(
            (
                str(entry.get(edit) or "")
                for entry in tries(winner.value, profile)
                if entry.get("passed") and entry[name] == win_approach
            ),
            worked.get(str(win_approach), ""),
        )
        lines.append(
            f"Fix: {win_approach} (rollout {rollout_number(winner)} of {len(results)}, "
            f"{winner.attempts} attempts)"
        )
        if win_edit:
            lines.append(f"{profile.edit_prefix}{win_edit}")
        others = [approach for approach in worked if approach != win_approach]
        if others:
            lines.append("Also worked: " + ", ".join(others))
        if profile.chosen_tag:
            tags.append(f"{profile.chosen_tag}{win_approach}")
        exception = signature.split(":", 1)[0]
        agreeing = sum(succeeded(r) and _chosen(r, profile) == win_approach for r in results)
        title = (
            f"{win_approach} fixes {exception} where {len(failed)} other {noun} failed"
            if failed
            else f"{win_approach} fixes {exception} in {agreeing} of {len(results)} rollouts"
        )
        outcome, confidence = "success", agreeing / len(results)
    else:
        title = f"{len(failed)} {noun} failed in {len(results)} rollouts"
        outcome, confidence = "failure", len(results) / (len(results) + 1)
    lines.append("Failed here: " + (", ".join(failed) if failed else "none"))
    lines.extend(_rollout_lines(results, profile))
    if profile.failed_tag:
        tags.extend(f"{profile.failed_tag}{approach}" for approach in failed)
    return _lesson(
        title=title,
        description=f"contrast of {len(results)} rollouts on '{clip(signature, 120)}'",
        content="\n".join(lines),
        tags=tags,
        outcome=outcome,
        confidence=confidence,
        winner=winner,
    )


def _outcome_contrast(
    winner: SubtaskResult, results: Sequence[SubtaskResult], profile: MattsAgentProfile
) -> dict[str, Any] | None:
    wins = [result for result in results if succeeded(result)]
    codes = {str((result.error or {}).get("code", "")) for result in results if not succeeded(result)}
    if len(wins) == len(results) or (not wins and len(codes) <= 1):
        return None
    subject = split_rollout_id(winner.subtask_id)
    task_ref = subject[0] if subject else winner.subtask_id
    if wins:
        title = (
            f"{task_ref}: rollout {rollout_number(winner)} succeeded where {len(results) - len(wins)} failed"
        )
        outcome, confidence = "success", len(wins) / len(results)
    else:
        title = f"{task_ref}: all {len(results)} rollouts failed, {len(codes)} different ways"
        outcome, confidence = "failure", len(results) / (len(results) + 1)
    return _lesson(
        title=title,
        description=f"contrast of {len(results)} rollouts of {task_ref}",
        content="\n".join(_rollout_lines(results, profile)),
        tags=[*CONTRAST_TAGS, *sorted(code for code in codes if code)],
        outcome=outcome,
        confidence=confidence,
        winner=winner,
    )


def _rollout_lines(results: Sequence[SubtaskResult], profile: MattsAgentProfile) -> list[str]:
    lines = []
    for result in sorted(results, key=rollout_number):
        parts = [
            f"rollout {rollout_number(result)}: {'succeeded' if succeeded(result) else 'failed'}",
            f"{result.attempts} attempts",
        ]
        approaches = tried_approaches(result.value, profile)
        if approaches:
            parts.append("tried " + ", ".join(approaches))
        score = rollout_score(result)
        if score is not None:
            parts.append(f"score {score:g}")
        if result.error:
            parts.append(
                f"{result.error.get('code', 'error')}: {clip(str(result.error.get('message', '')), 160)}"
            )
        lines.append("; ".join(parts))
    return lines


def _lesson(
    *,
    title: str,
    description: str,
    content: str,
    tags: list[str],
    outcome: str,
    confidence: float,
    winner: SubtaskResult,
) -> dict[str, Any]:
    source = split_rollout_id(winner.subtask_id)
    return {
        "title": clip(title, TITLE_CHARS),
        "description": clip(description, 240),
        "content": clip(content, CONTENT_CHARS, keep_tail=True),
        "tags": list(dict.fromkeys(tags))[:MAX_LESSON_TAGS],
        "domain": CONTRAST_DOMAIN,
        "outcome": outcome,
        "confidence": round(min(0.95, max(0.05, confidence)), 3),
        "source_task": source[0] if source else winner.subtask_id,
    }


# --- grouping -----------------------------------------------------------------------------------------
@dataclass
class _Group:
    original_id: str
    namespace: str | None = None
    results: dict[int, SubtaskResult] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupedResult:
    """What finishing a group gives: the subtask's one result, its lesson and where the task keeps memory."""

    result: SubtaskResult
    lesson: dict[str, Any] | None
    #: The task's own ``namespace`` field (where its agent reads memory), when it had one.
    namespace: str | None


class RolloutGroups:
    """Collects rollout results in any order; completes a subtask once all ``k`` of its rollouts are in.

    A rollout counts as in whether it succeeded, failed, or was given up by the ledger (its
    failed result flows through the same sink), so every subtask completes exactly once. A second
    result for the same rollout is ignored. Only groups still waiting are held in memory.
    """

    def __init__(self, k: int, *, profile: MattsAgentProfile = ANY_AGENT) -> None:
        if k < 1:
            raise InvalidInputError("k is at least 1", k=k)
        self.k = k
        self.profile = profile
        self._groups: dict[int, _Group] = {}
        self._completed: set[int] = set()
        self.duplicates_ignored = 0

    def expect(self, subtask: Subtask) -> None:
        """Note an original subtask (its id and memory namespace) before its rollouts are dispatched."""
        namespace = subtask.task.get("namespace")
        group = self._groups.setdefault(subtask.index, _Group(subtask.id))
        group.original_id = subtask.id
        group.namespace = str(namespace) if isinstance(namespace, str) and namespace else None

    def expand(self, subtasks: Iterable[Subtask], seed: int = 0) -> Iterator[Subtask]:
        """:func:`expand_rollouts`, telling these groups about each subtask (:meth:`expect`) as it is pulled."""
        for subtask in subtasks:
            self.expect(subtask)
            yield from expand_rollouts([subtask], self.k, seed, profile=self.profile)

    def add(self, result: SubtaskResult) -> GroupedResult | None:
        """Take one rollout's result; the subtask's grouped result once it was the last one missing."""
        index = original_index(result.index, self.k)
        number = result.index % self.k
        if index in self._completed:
            self.duplicates_ignored += 1
            return None
        parsed = split_rollout_id(result.subtask_id)
        group = self._groups.setdefault(index, _Group(parsed[0] if parsed else result.subtask_id))
        if number in group.results:
            self.duplicates_ignored += 1
            return None
        group.results[number] = result
        if len(group.results) < self.k:
            return None
        return self._finish(index)

    def _finish(self, index: int) -> GroupedResult:
        group = self._groups.pop(index)
        self._completed.add(index)
        results = [group.results[number] for number in sorted(group.results)]
        missing = [number for number in range(self.k) if number not in group.results]
        return GroupedResult(
            group_result(group.original_id, index, results, k=self.k, missing=missing, profile=self.profile),
            contrast(results, profile=self.profile),
            group.namespace,
        )

    @property
    def waiting(self) -> int:
        """Subtasks with at least one rollout in and at least one still out."""
        return sum(1 for group in self._groups.values() if group.results)

    def drain(self) -> list[GroupedResult]:
        """Complete every group that has some rollouts in (a cancelled run): judged on what came back,
        the missing rollouts listed in ``matts.missing``. Groups with nothing in are dropped."""
        finished = [self._finish(index) for index in sorted(self._groups) if self._groups[index].results]
        self._groups.clear()
        return finished


# --- the results sink -------------------------------------------------------------------------------
class ResultsSink(Protocol):
    """Where the coordinator puts results and timeline events (a ``ResultsLog``)."""

    def append(self, result: SubtaskResult) -> None: ...

    def append_event(self, event: PhaseEvent) -> None: ...


#: Stores one lesson: ``(namespace, store_pattern keyword arguments)``.
LessonStore = Callable[[str, dict[str, Any]], Any]


class RolloutSink:
    """A results sink for parallel MaTTS: every rollout to the rollouts log, one grouped result per
    subtask to the main log, and each group's contrast lesson to memory.

    Timeline events go to the main log, so the run's timeline shows every rollout's sandbox work.
    A failing lesson store is logged and counted, never fatal: the results are what the run owes.
    """

    def __init__(
        self,
        main: ResultsSink,
        rollouts: ResultsSink | None,
        groups: RolloutGroups,
        *,
        store_lesson: LessonStore | None = None,
        lesson_namespace: str = "",
    ) -> None:
        self._main = main
        self._rollouts = rollouts
        self.groups = groups
        self._store_lesson = store_lesson
        self._lesson_namespace = lesson_namespace
        self.lessons_stored = 0
        self.lesson_failures = 0

    def append(self, result: SubtaskResult) -> None:
        if self._rollouts is not None:
            self._rollouts.append(result)
        grouped = self.groups.add(result)
        if grouped is not None:
            self._emit(grouped)

    def append_event(self, event: PhaseEvent) -> None:
        self._main.append_event(event)

    def finish(self) -> list[SubtaskResult]:
        """Emit the subtasks left incomplete (after a cancel); returns them."""
        drained = self.groups.drain()
        for grouped in drained:
            self._emit(grouped)
        return [grouped.result for grouped in drained]

    def _emit(self, grouped: GroupedResult) -> None:
        self._main.append(grouped.result)
        namespace = grouped.namespace or self._lesson_namespace
        if grouped.lesson is None or self._store_lesson is None or not namespace:
            return
        try:
            self._store_lesson(namespace, grouped.lesson)
            self.lessons_stored += 1
        except RayflowError as exc:
            self.lesson_failures += 1
            log.warning("storing the contrast lesson of %s failed: %s", grouped.result.subtask_id, exc)


class DirectSink:
    """The sink of a job without parallel MaTTS: results and events go straight to the main log."""

    def __init__(self, main: ResultsSink) -> None:
        self._main = main

    def append(self, result: SubtaskResult) -> None:
        self._main.append(result)

    def append_event(self, event: PhaseEvent) -> None:
        self._main.append_event(event)

    def finish(self) -> list[SubtaskResult]:
        """Nothing is ever held back here."""
        return []


# --- the plan a job runner wires in -----------------------------------------------------------------
def refine_task(
    task: Mapping[str, Any], inner: AgentRef, r: int, *, profile: MattsAgentProfile = ANY_AGENT
) -> dict[str, Any]:
    """The task of the refinement agent for one subtask: the subtask's task plus who refines what,
    and the profile's reviser unless the task names its own ``revise``."""
    if inner.kind == "python":
        inner_spec: Any = inner.target
    else:
        inner_spec = {"kind": "shell", "command": inner.command}
    fields: dict[str, Any] = {**dict(task), "inner": inner_spec, "r": r, "inner_timeout_s": inner.timeout_s}
    if profile.reviser and "revise" not in task:
        fields["revise"] = profile.reviser
    return fields


@dataclass(frozen=True)
class MattsPlan:
    """How a job's run changes under MaTTS: the agent to run, the subtasks to dispatch, the sink.

    ``MattsPlan.for_job(job)`` works for every job (without MaTTS it changes nothing), so wiring
    is unconditional::

        plan = MattsPlan.for_job(job)
        worker_plan = WorkerPlan.for_job(plan.job, hub_endpoint)
        rollouts_log = ResultsLog(plan.rollouts_path(results_path)) if plan.parallel else None
        sink = plan.wrap_sink(main_log, rollouts_log, store_lesson=...)
        DispatchLoop(fleet, sink, ...).run(plan.transform(decomposed_subtasks, sink))
        sink.finish()
    """

    #: The job with its agent swapped where MaTTS needs it (sequential: the refinement agent).
    job: Job
    mode: str | None
    k: int = 1
    r: int = 1
    #: Seed of the rollouts' exploration (same seed, same rollout tasks).
    seed: int = 0
    #: Where contrast lessons go when a subtask's task names no ``namespace`` of its own.
    lesson_namespace: str = ""
    #: Sequential: the job's original agent, run by the refinement agent.
    inner: AgentRef | None = None
    #: What MaTTS knows about the job's agent (``Matts.profile``).
    profile: MattsAgentProfile = ANY_AGENT

    @classmethod
    def for_job(cls, job: Job, *, seed: int = 0) -> MattsPlan:
        matts: Matts | None = job.matts
        if matts is None:
            return cls(job, None)
        if matts.mode == "sequential":
            inner = job.agent
            refine = AgentRef.python(REFINE_AGENT, timeout_s=inner.timeout_s * matts.r)
            return cls(
                replace(job, agent=refine),
                "sequential",
                r=matts.r,
                seed=seed,
                inner=inner,
                profile=matts.profile,
            )
        if job.workers < matts.k:
            log.info(
                "job %s: %d workers run fewer than k=%d rollouts at once", job.name, job.workers, matts.k
            )
        return cls(
            job,
            "parallel",
            k=matts.k,
            seed=seed,
            lesson_namespace=default_lesson_namespace(job),
            profile=matts.profile,
        )

    @property
    def parallel(self) -> bool:
        return self.mode == "parallel"

    @property
    def agent(self) -> AgentRef:
        return self.job.agent

    def groups(self) -> RolloutGroups:
        return RolloutGroups(self.k, profile=self.profile)

    def transform(
        self, subtasks: Iterable[Subtask], sink: RolloutSink | DirectSink | None = None
    ) -> Iterator[Subtask]:
        """The subtasks to dispatch: rollouts (parallel), refinement tasks (sequential) or as given.

        In parallel mode pass the sink from :meth:`wrap_sink`, so its groups learn each subtask's
        id and memory namespace as the subtask is pulled (without it, ids are parsed back from
        rollout ids and lessons go to :attr:`lesson_namespace`).
        """
        if self.mode == "parallel":
            if isinstance(sink, RolloutSink):
                return sink.groups.expand(subtasks, self.seed)
            return expand_rollouts(subtasks, self.k, self.seed, profile=self.profile)
        if self.mode == "sequential":
            inner = self.inner
            if inner is None:
                raise ConfigError("a sequential plan needs the job's original agent as its inner agent")
            return (
                Subtask(s.id, s.index, refine_task(s.task, inner, self.r, profile=self.profile))
                for s in subtasks
            )
        return iter(subtasks)

    def wrap_sink(
        self,
        main: ResultsSink,
        rollouts: ResultsSink | None = None,
        *,
        store_lesson: LessonStore | None = None,
    ) -> RolloutSink | DirectSink:
        """The sink the coordinator writes to. Parallel: a :class:`RolloutSink` over ``main`` and
        ``rollouts``; otherwise ``main`` unchanged (behind a :class:`DirectSink`). A job without
        memory (the control of a comparison) stores no lessons: they would reach the runs after it."""
        if not self.parallel:
            return DirectSink(main)
        return RolloutSink(
            main,
            rollouts,
            self.groups(),
            store_lesson=store_lesson if self.job.memory else None,
            lesson_namespace=self.lesson_namespace,
        )

    @staticmethod
    def rollouts_path(results_path: str | Path) -> Path:
        """The rollouts log next to a run's results log: ``<job>.rollouts.jsonl``."""
        path = Path(results_path)
        return path.with_name(f"{path.stem}.rollouts{path.suffix or '.jsonl'}")


def default_lesson_namespace(job: Job) -> str:
    """Where contrast lessons go by default: the job's first concrete memory namespace (the shared
    lessons its agents read), else ``swarm/<job>/lessons`` (inside the job's own results scope)."""
    for namespace in job.memory_namespaces:
        if "*" not in namespace:
            return namespace
    return f"{job.results_namespace}/lessons"
