"""The coordinator's dispatch bookkeeping: exactly once, retries elsewhere, lazy pulling."""

from __future__ import annotations

import pytest

from rayflow.swarm.ledger import DispatchLedger
from rayflow.wire.subtasks import Subtask, SubtaskResult


def subtasks(n: int) -> list[Subtask]:
    return [Subtask(f"s{i}", i, {"n": i}) for i in range(n)]


def ok(subtask: Subtask, worker: str = "w") -> SubtaskResult:
    return SubtaskResult(subtask.id, subtask.index, True, worker_id=worker)


LOST = {"code": "worker_lost", "message": "actor died"}


def test_each_subtask_is_assigned_once_and_then_the_ledger_is_finished():
    ledger = DispatchLedger(subtasks(3))
    seen = []
    while (assignment := ledger.assign("w1")) is not None:
        seen.append(assignment.subtask.id)
        assert ledger.completed(ok(assignment.subtask)) is not None
    assert seen == ["s0", "s1", "s2"]
    assert ledger.finished and ledger.done == 3


def test_a_second_result_for_the_same_subtask_is_dropped():
    ledger = DispatchLedger(subtasks(1))
    assignment = ledger.assign("w1")
    assert ledger.completed(ok(assignment.subtask)) is not None
    assert ledger.completed(ok(assignment.subtask, "w2")) is None
    assert ledger.duplicates_dropped == 1


def test_a_lost_workers_subtask_goes_to_another_worker_first():
    ledger = DispatchLedger(subtasks(2))
    first = ledger.assign("w1", other_workers=1)
    assert ledger.worker_failed("w1", LOST) == []
    # w1 would get the retry only if nobody else could; here w2 can.
    assert ledger.assign("w1", other_workers=1).subtask.id == "s1"
    retry = ledger.assign("w2", other_workers=1)
    assert retry.subtask.id == first.subtask.id and retry.dispatch == 2


def test_a_retry_comes_back_to_the_same_worker_when_it_is_the_only_one():
    ledger = DispatchLedger(subtasks(1))
    ledger.assign("w1")
    ledger.worker_failed("w1", LOST)
    assert ledger.assign("w1", other_workers=0).dispatch == 2


def test_after_max_dispatches_the_subtask_is_reported_failed_once():
    ledger = DispatchLedger(subtasks(1), max_dispatches=2)
    ledger.assign("w1")
    ledger.worker_failed("w1", LOST)
    ledger.assign("w2")
    [failed] = ledger.worker_failed("w2", LOST)
    assert not failed.ok and failed.dispatches == 2 and failed.error["code"] == "worker_lost"
    assert ledger.finished
    assert ledger.completed(ok(Subtask("s0", 0))) is None


def test_the_dispatch_count_is_carried_into_the_result():
    ledger = DispatchLedger(subtasks(1))
    ledger.assign("w1")
    ledger.worker_failed("w1", LOST)
    assignment = ledger.assign("w2")
    assert ledger.completed(ok(assignment.subtask, "w2")).dispatches == 2


def test_a_result_recovered_for_a_lost_worker_counts_and_is_not_rerun():
    ledger = DispatchLedger(subtasks(1))
    assignment = ledger.assign("w1")
    assert ledger.completed(ok(assignment.subtask)) is not None
    assert ledger.worker_failed("w1", LOST) == []
    assert ledger.assign("w2") is None and ledger.finished


def test_subtasks_are_pulled_lazily_from_the_decomposition():
    pulled = []

    def source():
        for subtask in subtasks(1000):
            pulled.append(subtask.id)
            yield subtask

    ledger = DispatchLedger(source())
    ledger.assign("w1")
    ledger.assign("w2")
    assert len(pulled) == 2


def test_a_decomposition_repeating_an_id_is_refused():
    ledger = DispatchLedger([Subtask("a", 0), Subtask("a", 1)])
    ledger.assign("w1")
    with pytest.raises(ValueError, match="twice"):
        ledger.assign("w2")
