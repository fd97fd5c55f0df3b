"""Sequential test-time scaling inside one sandbox: run an agent up to ``r`` times, each time told
how the previous attempt went, and stop at the first success.

``refine(context)`` is a python agent for :mod:`rayflow.guest.runner`. Its task is the subtask's
own task plus::

    {"inner": "package.module:function",      # the agent refined (or {"kind": "shell", "command": ...})
     "r": 3,                                  # at most this many attempts
     "revise": "package.module:function",     # optional: plans the next attempt's task
     "inner_timeout_s": 600}                  # optional: limit of one shell attempt

Each attempt gets the subtask's task plus ``refinement`` (0, 1, ...) and, from the second on,
``feedback`` = the previous attempt's value (``{"error": ...}`` when it raised). A reviser,
``revise(task, history) -> task``, may rewrite the task from all previous values: agents that
ignore feedback can still be steered (:func:`untried_strategies_first` makes the fixer try the
strategies it has not tried yet). Restoring the work tree between attempts is the inner agent's
business: the fixer reverts every failed edit itself.

The result is the final attempt's value (the first success, else the last value returned) plus
``refinements`` (a summary of every attempt), ``attempts`` summed over the attempts so a report
counts the work, and ``matts`` (how many attempts ran and why it stopped). If no attempt returned
a value at all, the last attempt's error is raised, so the runner reports the failure.

Standard library only (plus the runner's context and rayflow's errors): this runs in a sandbox.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rayflow.errors import InvalidInputError

#: Task fields that steer the refinement and are not passed on to the inner agent.
CONTROL_FIELDS = ("inner", "r", "revise", "inner_timeout_s")
FEEDBACK_FIELD = "feedback"
REFINEMENT_FIELD = "refinement"
MAX_REFINEMENTS = 100
SUMMARY_TEXT_CHARS = 300
SHELL_OUTPUT_CHARS = 2000
DEFAULT_SHELL_TIMEOUT_S = 600.0
_SCALARS = (str, int, float, bool, type(None))


class _RefinementContext:
    """The runner's context as one attempt sees it: everything shared, except its own task."""

    def __init__(self, outer: Any, task: dict[str, Any]) -> None:
        self._outer = outer
        self.task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outer, name)


def _load(target: str, what: str) -> Callable[..., Any]:
    module_name, _, attribute = str(target).partition(":")
    if not module_name or not attribute:
        raise InvalidInputError(f"the {what} is named 'module:function'", target=str(target))
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise InvalidInputError(f"the {what} {target!r} is not a callable", target=str(target))
    return function


def attempt_succeeded(value: Any) -> bool:
    """Whether an attempt's value reports success: its ``passed`` field, else its ``ok`` field,
    else yes (the agent returned without raising)."""
    if isinstance(value, Mapping):
        if "passed" in value:
            return bool(value["passed"])
        if "ok" in value:
            return bool(value["ok"])
    return True


def attempt_count(value: Any) -> int:
    """The agent's own attempts in one refinement (its ``attempts`` field), else 1."""
    if isinstance(value, Mapping) and isinstance(value.get("attempts"), int):
        return int(value["attempts"])
    return 1


def _clip(text: str) -> str:
    return text if len(text) <= SUMMARY_TEXT_CHARS else text[: SUMMARY_TEXT_CHARS - 5] + "[...]"


def attempt_summary(number: int, value: Any, error: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A bounded record of one attempt: its outcome and the scalar fields of its value."""
    summary: dict[str, Any] = {
        REFINEMENT_FIELD: number,
        "succeeded": error is None and attempt_succeeded(value),
        "attempts": attempt_count(value) if error is None else 0,
        "error": dict(error) if error is not None else None,
    }
    if isinstance(value, Mapping):
        kept: dict[str, Any] = {}
        for name, item in value.items():
            if isinstance(item, _SCALARS):
                kept[str(name)] = _clip(item) if isinstance(item, str) else item
            elif isinstance(item, (list, tuple)) and all(isinstance(x, _SCALARS) for x in item):
                kept[str(name)] = list(item)
        strategies = list(dict.fromkeys(str(entry["strategy"]) for entry in _tried(value)))
        if strategies:
            kept["tried_strategies"] = strategies
        summary["value"] = kept
    elif isinstance(value, _SCALARS) and error is None:
        summary["value"] = _clip(value) if isinstance(value, str) else value
    return summary


def _error_of(exc: BaseException) -> dict[str, str]:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, str) and isinstance(message, str):
        return {"code": code, "message": message}
    return {"code": "agent_failed", "message": f"{type(exc).__name__}: {exc}"}


# --- steering the next attempt ------------------------------------------------------------------
def _tried(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, Mapping) or not isinstance(value.get("tried"), list):
        return []
    return [entry for entry in value["tried"] if isinstance(entry, Mapping) and entry.get("strategy")]


def failed_strategies(history: Sequence[Any]) -> list[str]:
    """Strategies some previous attempt tried without passing, in the order first tried."""
    names = [
        str(entry["strategy"]) for value in history for entry in _tried(value) if not entry.get("passed")
    ]
    return list(dict.fromkeys(names))


def untried_strategies_first(task: Mapping[str, Any], history: Sequence[Any]) -> dict[str, Any]:
    """A reviser for the fixer: its next ``strategy_order`` puts strategies no attempt has tried
    yet first, and those already tried (which may still work at another site) last.

    The base order is the task's ``strategy_order``, else the fixer's default order (shuffled by
    the task's ``seed`` as the fixer would), so the first attempt and the revision agree.
    """
    from rayflow.guest.agents.fixer import strategy_order

    explicit = task.get("strategy_order")
    seed = task.get("seed")
    base = strategy_order(
        [],
        list(explicit) if isinstance(explicit, (list, tuple)) else None,
        seed if isinstance(seed, int) else None,
    )
    failed = set(failed_strategies(history))
    return {
        **dict(task),
        "strategy_order": [name for name in base if name not in failed]
        + [name for name in base if name in failed],
    }


# --- running the inner agent ------------------------------------------------------------------
def _shell_attempt(
    context: Any, spec: Mapping[str, Any], task: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """One attempt of a shell agent, as the runner would start it: task JSON on stdin and in a file."""
    from rayflow.guest.runner import run_shell_agent

    command = spec.get("command")
    if not isinstance(command, str) or not command:
        raise InvalidInputError("a shell inner agent needs a 'command' string")
    outcome = run_shell_agent(command, task, context.workdir, timeout_s)
    output = outcome.stdout.decode("utf-8", "replace") + outcome.stderr.decode("utf-8", "replace")
    return {
        "passed": outcome.ok,
        "exit_code": outcome.exit_code,
        "timed_out": outcome.timed_out,
        "output": output[-SHELL_OUTPUT_CHARS:],
    }


def _inner_runner(task: Mapping[str, Any]) -> Callable[[Any, dict[str, Any]], Any]:
    inner = task.get("inner")
    if isinstance(inner, str):
        agent = _load(inner, "inner agent")
        return lambda context, attempt_task: agent(_RefinementContext(context, attempt_task))
    if isinstance(inner, Mapping) and inner.get("kind") == "shell":
        timeout_s = float(task.get("inner_timeout_s") or DEFAULT_SHELL_TIMEOUT_S)
        return lambda context, attempt_task: _shell_attempt(context, inner, attempt_task, timeout_s)
    if isinstance(inner, Mapping) and inner.get("kind") == "python":
        return _inner_runner({**dict(task), "inner": inner.get("target")})
    raise InvalidInputError("task field 'inner' names the refined agent: 'module:function' or a shell spec")


def _refinements(task: Mapping[str, Any]) -> int:
    r = task.get("r", 1)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_REFINEMENTS:
        raise InvalidInputError(f"task field 'r' is a whole number from 1 to {MAX_REFINEMENTS}", r=str(r))
    return r


def refine(context: Any) -> dict[str, Any]:
    """Run ``context.task['inner']`` up to ``r`` times until an attempt succeeds; see the module
    docstring for the task and the result."""
    task = dict(context.task)
    r = _refinements(task)
    run_inner = _inner_runner(task)
    revise = _load(str(task["revise"]), "reviser") if task.get("revise") else None
    base = {name: value for name, value in task.items() if name not in CONTROL_FIELDS}
    history: list[Any] = []
    summaries: list[dict[str, Any]] = []
    final: tuple[int, Any] | None = None
    last_error: BaseException | None = None
    stopped = "exhausted"
    attempt_task = dict(base)
    for number in range(r):
        attempt_task = {**attempt_task, REFINEMENT_FIELD: number}
        try:
            value = run_inner(context, attempt_task)
            json.dumps(value)
        except Exception as exc:  # noqa: BLE001 - a failed attempt is feedback for the next one
            last_error = exc
            error = _error_of(exc)
            history.append({"error": error})
            summaries.append(attempt_summary(number, None, error))
        else:
            history.append(value)
            summaries.append(attempt_summary(number, value))
            final = (number, value)
            if attempt_succeeded(value):
                stopped = "succeeded"
                break
        if number + 1 < r:
            attempt_task = dict(revise(dict(base), list(history))) if revise is not None else dict(base)
            attempt_task[FEEDBACK_FIELD] = history[-1]
    if final is None:
        assert last_error is not None
        raise last_error
    chosen, value = final
    result = dict(value) if isinstance(value, Mapping) else {"value": value}
    result.update(
        attempts=sum(summary["attempts"] for summary in summaries),
        final_attempts=attempt_count(value),
        refinements=summaries,
        matts={"mode": "sequential", "r": r, "used": len(summaries), "stopped": stopped, "final": chosen},
    )
    return result
