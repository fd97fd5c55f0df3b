"""Made-up subtask results of a swarm run, shared by the unit tests of the results log and the report.

Why one builder: both test modules need many results with real-looking fields (a worker, a node,
start and end times, an error on failures), and the two must mean the same thing by a result with
``attempts=3`` or ``ok=False``. Each module keeps its own mix of outcomes (which indexes fail,
how many workers), since its expected numbers are computed from that mix.
"""

from __future__ import annotations

from rayflow.wire.subtasks import SubtaskResult

#: Start of every made-up run (seconds since the epoch, late 2023).
T0 = 1_700_000_000.0


def subtask_result(
    index: int,
    ok: bool = True,
    attempts: int = 1,
    memory_hits: int = 0,
    dispatches: int = 1,
    *,
    workers: int = 7,
    spacing_s: float = 1.0,
    duration_s: float = 0.5,
) -> SubtaskResult:
    """Subtask ``index`` of job ``job``: on worker ``w-(index % workers)`` and one of two nodes,
    started ``index * spacing_s`` after ``T0`` and lasting ``duration_s``; failures failed tests."""
    started_at = T0 + index * spacing_s
    return SubtaskResult(
        subtask_id=f"job-{index}",
        index=index,
        ok=ok,
        value={"attempts": attempts, "memory_hits": memory_hits},
        error=None if ok else {"code": "tests_failed", "message": "2 tests failed"},
        dispatches=dispatches,
        worker_id=f"w-{index % workers}",
        node_id=f"node-{index % 2}",
        started_at=started_at,
        ended_at=started_at + duration_s,
    )
