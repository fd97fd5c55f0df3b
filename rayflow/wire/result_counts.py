"""Counters over a run's subtask results: the numbers its summary and its report both give.

Why one class: the results log keeps a running summary of a run and the synthesis step tallies the
results it reads back; a person comparing the two must find the same passes, attempts, retries,
memory hits and re-dispatches, so both count with this class.

Why standard library only: the synthesis step also runs inside a sandbox (pattern B) that has
rayflow's light modules but none of its dependencies; this module imports nothing beyond
:mod:`rayflow.wire.subtasks` and is shipped into the sandbox image with it.
"""

from __future__ import annotations

from typing import Any

from rayflow.wire.subtasks import SubtaskResult


class ResultCounts:
    """Totals over subtask results, updated one result at a time (no I/O).

    ``sign=-1`` takes a result back out, for a log in which a later result for the same subtask
    replaces an earlier one.
    """

    def __init__(self) -> None:
        self.subtasks = 0
        self.ok = 0
        self.attempts = 0
        #: Subtasks whose agent needed more than one attempt.
        self.retried = 0
        self.memory_hits = 0
        #: Subtasks that got at least one memory hit.
        self.with_memory_hits = 0
        self.dispatches = 0
        #: Subtasks dispatched more than once (their first worker was lost).
        self.redispatched = 0
        #: Agent time summed over subtasks.
        self.busy_s = 0.0
        #: Subtasks whose agent made memory calls; of them, those with a call that succeeded (they
        #: reached the hub) and those with a call that failed (see :mod:`rayflow.wire.memory_use`).
        self.memory_used = 0
        self.memory_reached = 0
        self.memory_failed = 0
        #: Subtasks with memory errors, by the kind (error class) of their last one.
        self.memory_error_kinds: dict[str, int] = {}
        #: The first memory error seen, as written down, for a report to quote.
        self.memory_error_example = ""

    @property
    def failed(self) -> int:
        return self.subtasks - self.ok

    def add(self, result: SubtaskResult, sign: int = 1) -> None:
        """Count ``result`` in (``sign=1``) or out again (``sign=-1``)."""
        self.subtasks += sign
        self.ok += sign * result.ok
        self.attempts += sign * result.attempts
        self.retried += sign * (result.attempts > 1)
        self.memory_hits += sign * result.memory_hits
        self.with_memory_hits += sign * (result.memory_hits > 0)
        self.dispatches += sign * result.dispatches
        self.redispatched += sign * (result.dispatches > 1)
        self.busy_s += sign * result.duration_s
        use = result.memory
        if use is not None and use.used:
            self.memory_used += sign
            self.memory_reached += sign * use.reached
            if use.errors:
                self.memory_failed += sign
                kind = use.error_kind or "error"
                self.memory_error_kinds[kind] = self.memory_error_kinds.get(kind, 0) + sign
                if sign > 0 and not self.memory_error_example:
                    self.memory_error_example = use.last_error

    def memory_summary(self) -> dict[str, Any]:
        """The memory counters under the names a run's summary (and so a report) gives them."""
        return {
            "subtasks_using_memory": self.memory_used,
            "subtasks_reaching_hub": self.memory_reached,
            "subtasks_with_memory_errors": self.memory_failed,
            "memory_error_kinds": {kind: n for kind, n in self.memory_error_kinds.items() if n > 0},
            "memory_error_example": self.memory_error_example,
        }
