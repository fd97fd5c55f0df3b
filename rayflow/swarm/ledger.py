"""Who runs which subtask: the coordinator's dispatch bookkeeping, as a pure state machine.

No threads, no Ray, no clock: the coordinator's loop feeds it what happened (a worker is idle, a
result came back, a worker or its container failed) and asks what to do next. That keeps the
promises of a job testable on their own:

* every subtask appears exactly once in the result: a second result for the same subtask (a
  retried subtask whose first worker answered late after all) is dropped;
* a subtask whose worker or container failed goes back to the front of the queue and is given to
  a *different* worker when there is one, up to ``max_dispatches`` times; after that it is
  reported failed with the last failure as its error;
* subtasks are pulled lazily from the decomposition's iterator, so a 1000-file job holds only the
  in-flight subtasks and the retry queue in memory, plus a set of finished indexes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rayflow.wire.subtasks import Subtask, SubtaskResult


@dataclass
class _InFlight:
    subtask: Subtask
    worker_id: str
    dispatch: int


@dataclass
class _Retry:
    subtask: Subtask
    #: Workers this subtask already failed on; it avoids them while others are available.
    failed_on: set[str] = field(default_factory=set)
    dispatches: int = 0
    last_error: dict[str, str] | None = None


@dataclass(frozen=True)
class Assignment:
    """A subtask handed to a worker, and which dispatch of it this is (1 = first)."""

    subtask: Subtask
    worker_id: str
    dispatch: int


class DispatchLedger:
    """The state of one job's dispatching. Feed it events; it tells what runs where."""

    def __init__(self, subtasks: Iterable[Subtask], *, max_dispatches: int = 3) -> None:
        if max_dispatches < 1:
            raise ValueError("max_dispatches must be at least 1")
        self._source: Iterator[Subtask] | None = iter(subtasks)
        self._max_dispatches = max_dispatches
        self._retries: deque[_Retry] = deque()
        #: dispatch counts and failures of subtasks that failed at least once, by id.
        self._history: dict[str, _Retry] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._done: set[int] = set()
        self._seen_ids: set[str] = set()
        self.total_seen = 0
        self.duplicates_dropped = 0

    # -- what to run -----------------------------------------------------------------------
    def assign(self, worker_id: str, *, other_workers: int = 0) -> Assignment | None:
        """The next subtask for an idle ``worker_id``, or ``None`` when nothing is waiting.

        ``other_workers`` is how many other workers could take a retry this one already failed;
        when there are none, the retry comes back to this worker rather than never running.
        """
        retry = self._take_retry(worker_id, other_workers)
        if retry is not None:
            retry.dispatches += 1
            return self._start(retry.subtask, worker_id, retry.dispatches)
        subtask = self._pull()
        if subtask is None:
            return None
        return self._start(subtask, worker_id, 1)

    def _take_retry(self, worker_id: str, other_workers: int) -> _Retry | None:
        for position, retry in enumerate(self._retries):
            if worker_id not in retry.failed_on or other_workers == 0:
                del self._retries[position]
                return retry
        return None

    def _pull(self) -> Subtask | None:
        if self._source is None:
            return None
        for subtask in self._source:
            if subtask.id in self._seen_ids:
                raise ValueError(f"the decomposition yielded subtask id {subtask.id!r} twice")
            self._seen_ids.add(subtask.id)
            self.total_seen += 1
            return subtask
        self._source = None
        return None

    def _start(self, subtask: Subtask, worker_id: str, dispatch: int) -> Assignment:
        self._in_flight[subtask.id] = _InFlight(subtask, worker_id, dispatch)
        return Assignment(subtask, worker_id, dispatch)

    # -- what happened ---------------------------------------------------------------------
    def completed(self, result: SubtaskResult) -> SubtaskResult | None:
        """Record a subtask's result; returns it (with its dispatch count) or ``None`` if it is a duplicate."""
        if result.index in self._done:
            self.duplicates_dropped += 1
            return None
        flight = self._in_flight.pop(result.subtask_id, None)
        self._drop_retry(result.subtask_id)
        history = self._history.pop(result.subtask_id, None)
        dispatches = flight.dispatch if flight is not None else (history.dispatches if history else 1)
        self._done.add(result.index)
        return _with_dispatches(result, dispatches)

    def worker_failed(
        self, worker_id: str, error: dict[str, str], *, worker_name: str = ""
    ) -> list[SubtaskResult]:
        """A worker (or its container) died: its subtask goes back to the queue or, out of
        dispatches, becomes a failed result, which is returned so the caller records it."""
        failed: list[SubtaskResult] = []
        for subtask_id, flight in list(self._in_flight.items()):
            if flight.worker_id != worker_id:
                continue
            del self._in_flight[subtask_id]
            history = self._history.setdefault(subtask_id, _Retry(flight.subtask))
            history.failed_on.add(worker_id)
            history.dispatches = flight.dispatch
            history.last_error = dict(error)
            if flight.dispatch >= self._max_dispatches:
                del self._history[subtask_id]
                self._done.add(flight.subtask.index)
                failed.append(
                    SubtaskResult(
                        subtask_id=subtask_id,
                        index=flight.subtask.index,
                        ok=False,
                        error={
                            "code": error.get("code", "worker_lost"),
                            "message": f"gave up after {flight.dispatch} dispatches: "
                            + error.get("message", ""),
                        },
                        dispatches=flight.dispatch,
                        worker_id=worker_name or worker_id,
                    )
                )
            else:
                # Front of the queue: a retried subtask should not wait behind the whole job.
                self._retries.appendleft(history)
        return failed

    def abandon(self, error: dict[str, str]) -> Iterator[SubtaskResult]:
        """Give up on every subtask that has no result and is not running: those waiting for a retry
        and the rest of the decomposition, each a failed result with ``error`` (lazily, so a big
        decomposition is never held whole). Used when no worker can be started at all."""
        while self._retries:
            retry = self._retries.popleft()
            self._history.pop(retry.subtask.id, None)
            yield self._given_up(retry.subtask, error, retry.dispatches)
        while (subtask := self._pull()) is not None:
            yield self._given_up(subtask, error, 0)

    def _given_up(self, subtask: Subtask, error: dict[str, str], dispatches: int) -> SubtaskResult:
        self._done.add(subtask.index)
        return SubtaskResult(subtask.id, subtask.index, False, error=dict(error), dispatches=dispatches)

    def _drop_retry(self, subtask_id: str) -> None:
        for position, retry in enumerate(self._retries):
            if retry.subtask.id == subtask_id:
                del self._retries[position]
                return

    # -- where things stand ----------------------------------------------------------------
    def running_on(self, worker_id: str) -> Subtask | None:
        for flight in self._in_flight.values():
            if flight.worker_id == worker_id:
                return flight.subtask
        return None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def waiting_retries(self) -> int:
        return len(self._retries)

    @property
    def done(self) -> int:
        return len(self._done)

    @property
    def exhausted(self) -> bool:
        """True when the decomposition has yielded everything."""
        return self._source is None

    @property
    def finished(self) -> bool:
        """True once every subtask has exactly one result and none is running or waiting."""
        if self._in_flight or self._retries:
            return False
        if self._source is not None:
            # Peek: an iterator only says it is empty by being asked.
            subtask = self._pull()
            if subtask is None:
                return True
            self._retries.appendleft(_Retry(subtask))
            return False
        return True


def _with_dispatches(result: SubtaskResult, dispatches: int) -> SubtaskResult:
    if result.dispatches == dispatches:
        return result
    data = result.to_dict()
    data["dispatches"] = dispatches
    return SubtaskResult.from_dict(data)
