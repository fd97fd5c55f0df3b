"""Conversion between ReasoningBank records and the plain msgpack values that travel over RPC.

Records go out as dicts of plain values (embeddings as bytes); trajectories come in as dicts and
are checked field by field, so a malformed argument becomes an
:class:`~rayflow.errors.InvalidInputError` naming the field instead of a crash deep in the bank.
"""

from __future__ import annotations

from typing import Any

from rayflow.errors import InvalidInputError
from rayflow.wire.memory_records import MemoryItem, ScoredItem, Step, Trajectory, Verdict

MAX_STEPS = 500


def item_to_wire(item: MemoryItem) -> dict[str, Any]:
    """A memory item as plain values (the tenant is implied by the caller's token)."""
    return {
        "id": item.id,
        "namespace": item.namespace,
        "title": item.title,
        "description": item.description,
        "content": item.content,
        "tags": list(item.tags),
        "domain": item.domain,
        "outcome": item.outcome.value,
        "prior_confidence": item.prior_confidence,
        "reliability": item.reliability,
        "uses": item.uses,
        "successes": item.successes,
        "failures": item.failures,
        "created_at": item.created_at,
        "last_used_at": item.last_used_at,
        "source_task": item.source_task,
        "source_agent": item.source_agent,
        # Versions made concurrently in other regions and not reconciled yet (usually none).
        "siblings": [
            {
                "replica": version.replica,
                "title": version.title,
                "description": version.description,
                "content": version.content,
                "tags": list(version.tags),
                "domain": version.domain,
                "outcome": version.outcome.value,
            }
            for version in item.siblings
        ],
    }


def scored_to_wire(scored: ScoredItem) -> dict[str, Any]:
    """A retrieval result with every score component."""
    return {
        "item": item_to_wire(scored.item),
        "rank": scored.rank,
        "score": scored.score,
        "similarity": scored.similarity,
        "recency": scored.recency,
        "reliability": scored.reliability,
    }


def verdict_to_wire(verdict: Verdict) -> dict[str, Any]:
    return {
        "outcome": verdict.outcome.value,
        "confidence": verdict.confidence,
        "reason": verdict.reason,
        "judge": verdict.judge,
    }


def trajectory_from_wire(data: object) -> Trajectory:
    """Build a :class:`Trajectory` from a received dict, checking every field's type."""
    if not isinstance(data, dict):
        raise InvalidInputError("trajectory must be a map")
    known = {
        "task_id", "query", "steps", "namespace", "domain", "agent_id", "exit_code", "tests_passed",
        "tests_failed", "reward", "final_output", "used_item_ids",
    }  # fmt: skip
    unknown = set(data) - known
    if unknown:
        raise InvalidInputError(f"unknown trajectory fields: {', '.join(sorted(map(str, unknown)))}")
    task_id = _field(data, "task_id", str, required=True)
    query = _field(data, "query", str, required=True)
    raw_steps = _field(data, "steps", list, default=[])
    if len(raw_steps) > MAX_STEPS:
        raise InvalidInputError(f"trajectory has more than {MAX_STEPS} steps")
    steps = []
    for i, step in enumerate(raw_steps):
        if (
            not isinstance(step, (list, tuple))
            or len(step) != 2
            or not all(isinstance(part, str) for part in step)
        ):
            raise InvalidInputError(f"steps[{i}] must be [action, observation] strings")
        steps.append(Step(step[0], step[1]))
    used = _field(data, "used_item_ids", list, default=[])
    if not all(isinstance(x, str) for x in used):
        raise InvalidInputError("used_item_ids must be strings")
    return Trajectory(
        task_id=task_id,
        query=query,
        steps=tuple(steps),
        namespace=_field(data, "namespace", str, default="default"),
        domain=_field(data, "domain", str, default=""),
        agent_id=_field(data, "agent_id", str, default=""),
        exit_code=_field(data, "exit_code", int, default=None),
        tests_passed=_field(data, "tests_passed", int, default=None),
        tests_failed=_field(data, "tests_failed", int, default=None),
        reward=_number(data.get("reward")),
        final_output=_field(data, "final_output", str, default=""),
        used_item_ids=tuple(used),
    )


def trajectory_to_wire(trajectory: Trajectory) -> dict[str, Any]:
    """The inverse of :func:`trajectory_from_wire` (used by clients)."""
    return {
        "task_id": trajectory.task_id,
        "query": trajectory.query,
        "steps": [[s.action, s.observation] for s in trajectory.steps],
        "namespace": trajectory.namespace,
        "domain": trajectory.domain,
        "agent_id": trajectory.agent_id,
        "exit_code": trajectory.exit_code,
        "tests_passed": trajectory.tests_passed,
        "tests_failed": trajectory.tests_failed,
        "reward": trajectory.reward,
        "final_output": trajectory.final_output,
        "used_item_ids": list(trajectory.used_item_ids),
    }


def _field(data: dict[str, Any], name: str, kind: type, *, required: bool = False, default: Any = None) -> Any:
    if name not in data or data[name] is None:
        if required:
            raise InvalidInputError(f"trajectory.{name} is required")
        return default
    value = data[name]
    # bool is an int subclass; a flag where a count belongs is a client bug worth refusing.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInputError(f"trajectory.{name} must be {kind.__name__}")
    return value


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError("trajectory.reward must be a number")
    return float(value)
