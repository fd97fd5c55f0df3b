"""A fixing agent: makes one module's tests pass by trying generic repairs, guided by shared memory.

``fix_module(context)`` is a python agent for :mod:`rayflow.guest.runner`. Its task::

    {"module": "app/mod_007.py", "test": "tests/test_mod_007.py",
     "memory": true, "namespace": "swarm/demo", "max_attempts": 40,
     "strategy_order": [...],   # optional: the order after memory's suggestions
     "seed": 3}                 # optional: shuffles the default order (ignored with strategy_order)

It runs the tests, reduces the first failure to an error signature
(:mod:`rayflow.guest.agents.signature`), asks the memory which strategies fixed that signature (or a
similar one) before, and tries those first, then the rest. One *attempt* is one strategy applied
at one site (:mod:`rayflow.guest.agents.repairs`), followed by a test run; a failed attempt is reverted,
so every attempt starts from the original module. On success it stores what worked, and it
reports to the memory whether each suggestion it tried worked, which moves that memory's
confidence.

Memory is advice, not a dependency: if the hub cannot be reached the agent still fixes the module
without it and says so in ``memory_errors``. With ``memory: false`` it never touches
``context.memory``. Standard library only (plus the runner's context): this runs inside a sandbox.
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from rayflow.errors import InvalidInputError
from rayflow.guest.agents.repairs import DEFAULT_ORDER, STRATEGIES, Candidate, build_scope, candidates
from rayflow.guest.agents.signature import ErrorSignature, TestFailure, parse_unittest_output, signature_of

DEFAULT_MAX_ATTEMPTS = 40
DEFAULT_NAMESPACE = "swarm/demo"
#: Memories retrieved per search.
SEARCH_K = 8
#: A memory of a *different* signature is followed only when its text is at least this similar.
MIN_SIMILARITY = 0.55
#: Seconds one test run may take.
TEST_TIMEOUT_S = 60.0
MEMORY_DOMAIN = "python-fix"
STRATEGY_TAG = "strategy:"
SIGNATURE_TAG = "sig:"
EDIT_PREFIX = "Edit: "


@dataclass(frozen=True)
class Suggestion:
    """A strategy the memory proposes, with the memories that proposed it."""

    strategy: str
    item_ids: tuple[str, ...]
    #: True when one of the memories was stored for exactly this signature.
    exact: bool
    #: Edits (candidate descriptions) that worked before, tried before this strategy's other sites.
    edits: tuple[str, ...] = ()


@dataclass
class TestRun:
    """The outcome of one run of the module's tests."""

    passed: bool
    failures: list[TestFailure] = field(default_factory=list)
    output: str = ""


# --- pure parts ---------------------------------------------------------------------------------
def suggestions_from_hits(hits: Sequence[Any], signature: ErrorSignature) -> list[Suggestion]:
    """Strategies named by search ``hits`` (the hub's wire form), best first.

    Memories stored for exactly this signature come first, then memories of other signatures
    whose similarity reaches :data:`MIN_SIMILARITY`; within each group by the hub's score (which
    already folds in each memory's reliability). Unknown strategies are ignored.
    """
    ranked: list[tuple[int, float, str, str]] = []
    for hit in hits:
        if not isinstance(hit, dict) or not isinstance(hit.get("item"), dict):
            continue
        item = hit["item"]
        tags = [str(t) for t in item.get("tags") or []]
        strategy = next((t[len(STRATEGY_TAG) :] for t in tags if t.startswith(STRATEGY_TAG)), None)
        if strategy not in STRATEGIES:
            continue
        exact = f"{SIGNATURE_TAG}{signature.digest}" in tags
        if not exact and float(hit.get("similarity", 0.0)) < MIN_SIMILARITY:
            continue
        edit = remembered_edit(str(item.get("content") or ""))
        ranked.append((0 if exact else 1, -float(hit.get("score", 0.0)), strategy, str(item.get("id")), edit))
    ranked.sort()
    merged: dict[str, Suggestion] = {}
    for group, _score, strategy, item_id, edit in ranked:
        known = merged.get(strategy) or Suggestion(strategy, (), False)
        edits = known.edits + ((edit,) if edit and edit not in known.edits else ())
        merged[strategy] = Suggestion(strategy, (*known.item_ids, item_id), known.exact or group == 0, edits)
    return list(merged.values())


def remembered_edit(content: str) -> str | None:
    """The ``Edit:`` line of a stored memory's content (see :func:`memory_content`)."""
    for line in content.splitlines():
        if line.startswith(EDIT_PREFIX):
            return line[len(EDIT_PREFIX) :]
    return None


def prefer_edits(found: Sequence[Candidate], edits: Sequence[str]) -> list[Candidate]:
    """``found`` with the candidates whose edit worked before moved to the front (stable)."""
    return sorted(found, key=lambda candidate: candidate.description not in edits)


def strategy_order(
    suggested: Sequence[str], explicit: Sequence[str] | None = None, seed: int | None = None
) -> list[str]:
    """The order to try strategies in: memory's suggestions, then ``explicit`` (or the default
    order, shuffled by ``seed`` when one is given), each strategy once."""
    if explicit is not None:
        unknown = [name for name in explicit if name not in STRATEGIES]
        if unknown:
            raise InvalidInputError(f"unknown repair strategies: {', '.join(unknown)}")
        rest = list(explicit)
    else:
        rest = list(DEFAULT_ORDER)
        if seed is not None:
            random.Random(seed).shuffle(rest)
    return list(dict.fromkeys([*suggested, *rest]))


def memory_content(signature: ErrorSignature, strategy: str, candidate: Candidate, module: str) -> str:
    """The text stored for a repair that worked: the failure, then what fixed it."""
    return (
        f"Failure: {signature.text}\n"
        f"Fix: {strategy} - {STRATEGIES[strategy].summary}\n"
        f"{EDIT_PREFIX}{candidate.description}\n"
        f"Module: {module}"
    )


# --- the agent ----------------------------------------------------------------------------------
class _Fixer:
    """One fixing session over one module (holds the context and what happened so far)."""

    def __init__(self, context: Any, bytecode_dir: str) -> None:
        task = context.task
        self.context = context
        self.module = _required_path(task, "module")
        self.test = _required_path(task, "test")
        self.use_memory = bool(task.get("memory", False))
        self.namespace = str(task.get("namespace") or DEFAULT_NAMESPACE)
        self.max_attempts = int(task.get("max_attempts") or DEFAULT_MAX_ATTEMPTS)
        self.explicit_order = task.get("strategy_order")
        self.seed = task.get("seed")
        self.memory_errors: list[str] = []
        self._bytecode_dir = bytecode_dir

    def run_tests(self) -> TestRun:
        # -B and an empty private pycache prefix: a revert within the same second must never
        # be served stale bytecode of the previous attempt.
        argv = [
            sys.executable,
            "-B",
            "-X",
            f"pycache_prefix={self._bytecode_dir}",
            "-m",
            "unittest",
            self.test,
        ]
        outcome = self.context.run(argv, timeout_s=TEST_TIMEOUT_S)
        output = outcome.stderr.decode("utf-8", "replace") + outcome.stdout.decode("utf-8", "replace")
        return TestRun(outcome.ok, parse_unittest_output(output), output)

    def _memory_call(self, what: str, call: Any) -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - memory is advice; its failure must not fail the fix
            self.memory_errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    def fix(self) -> dict[str, Any]:
        original = self.context.read_file(self.module).decode()
        first = self.run_tests()
        if first.passed:
            return self._result(True, 0, [], [], None, None)
        failure = (
            first.failures[0] if first.failures else TestFailure("", "", "ERROR", "UnknownError", "", ())
        )
        signature = signature_of(failure)
        suggestions: list[Suggestion] = []
        if self.use_memory:
            hits = self._memory_call(
                "search",
                lambda: self.context.memory.search(signature.text, k=SEARCH_K, namespace=self.namespace),
            )
            suggestions = suggestions_from_hits(hits or [], signature)
        order = strategy_order(
            [s.strategy for s in suggestions],
            None if self.explicit_order is None else list(self.explicit_order),
            None if self.seed is None else int(self.seed),
        )
        test_source = self.context.read_file(self.test).decode()
        scope = build_scope(original, test_source, first.failures, self.module)
        suggested = {s.strategy: s for s in suggestions}
        tried: list[dict[str, Any]] = []
        tried_strategies: list[str] = []
        winner: tuple[str, Candidate] | None = None
        for strategy in order:
            if len(tried) >= self.max_attempts or winner is not None:
                break
            remembered = suggested[strategy].edits if strategy in suggested else ()
            for candidate in prefer_edits(candidates(STRATEGIES[strategy], scope), remembered):
                if len(tried) >= self.max_attempts:
                    break
                patched = candidate.apply(original)
                if patched == original or not _compiles(patched):
                    continue
                if strategy not in tried_strategies:
                    tried_strategies.append(strategy)
                self.context.write_file(self.module, patched)
                passed = self.run_tests().passed
                tried.append(
                    {
                        "strategy": strategy,
                        "line": candidate.line,
                        "edit": candidate.description,
                        "passed": passed,
                        "from_memory": strategy in suggested,
                    }
                )
                if passed:
                    winner = (strategy, candidate)
                    break
                self.context.write_file(self.module, original)
        stored = self._learn(signature, suggestions, tried_strategies, winner) if self.use_memory else None
        return self._result(
            winner is not None,
            len(tried),
            tried,
            [s.strategy for s in suggestions if s.strategy in tried_strategies],
            signature,
            winner[0] if winner else None,
            suggestions=[s.strategy for s in suggestions],
            stored=stored,
        )

    def _learn(
        self,
        signature: ErrorSignature,
        suggestions: list[Suggestion],
        tried_strategies: list[str],
        winner: tuple[str, Candidate] | None,
    ) -> str | None:
        """Report each tried suggestion's outcome; store the winning repair unless an exact
        memory of it already exists (its success report is what strengthens it)."""
        winning = winner[0] if winner else None
        for suggestion in suggestions:
            if suggestion.strategy in tried_strategies:
                worked = suggestion.strategy == winning
                self._memory_call(
                    "report_outcome",
                    lambda s=suggestion, w=worked: self.context.memory.report_outcome(
                        list(s.item_ids), success=w
                    ),
                )
        if winner is None or any(s.exact and s.strategy == winning for s in suggestions):
            return None
        strategy, candidate = winner
        stored = self._memory_call(
            "store_pattern",
            lambda: self.context.memory.store_pattern(
                namespace=self.namespace,
                title=f"{strategy} fixes {signature.exception} in {signature.test_name}",
                content=memory_content(signature, strategy, candidate, self.module),
                tags=[
                    f"{STRATEGY_TAG}{strategy}",
                    f"{SIGNATURE_TAG}{signature.digest}",
                    f"exc:{signature.exception}",
                ],
                domain=MEMORY_DOMAIN,
                outcome="success",
                source_task=self.module,
            ),
        )
        return str(stored["id"]) if isinstance(stored, dict) and "id" in stored else None

    def _result(
        self,
        passed: bool,
        attempts: int,
        tried: list[dict[str, Any]],
        memory_hits: list[str],
        signature: ErrorSignature | None,
        strategy: str | None,
        *,
        suggestions: list[str] | None = None,
        stored: str | None = None,
    ) -> dict[str, Any]:
        return {
            "module": self.module,
            "passed": passed,
            "attempts": attempts,
            "memory_hits": len(memory_hits),
            "strategy": strategy,
            "signature": signature.text if signature else None,
            "signature_id": signature.digest if signature else None,
            "tried": tried,
            "memory_used": self.use_memory,
            "suggested": suggestions or [],
            "stored_id": stored,
            "memory_errors": list(self.memory_errors),
        }


def _required_path(task: Any, name: str) -> str:
    value = task.get(name)
    if (
        not isinstance(value, str)
        or not value
        or PurePath(value).is_absolute()
        or ".." in PurePath(value).parts
    ):
        raise InvalidInputError(f"task field {name!r} must be a relative path inside the work directory")
    return value


def _compiles(source: str) -> bool:
    try:
        compile(source, "<candidate>", "exec")
    except SyntaxError:
        return False
    return True


def fix_module(context: Any) -> dict[str, Any]:
    """Make the tests of ``context.task['module']`` pass; see the module docstring for the task
    and the result (``passed``, ``attempts``, ``memory_hits``, ``strategy``, ``signature``,
    ``tried``, ``memory_used``...)."""
    with tempfile.TemporaryDirectory(prefix="rayflow-fixer-pyc-") as bytecode_dir:
        return _Fixer(context, bytecode_dir).fix()
