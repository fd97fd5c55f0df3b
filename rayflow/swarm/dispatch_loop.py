"""The coordinator's loop: lease workers, dispatch subtasks with bounded concurrency, survive failures.

Written against a small :class:`Fleet` interface of ``concurrent.futures`` futures, not against
Ray: the Ray layer (``actors/fleet.py``) makes workers Ray actors spread over nodes, and
:class:`ThreadFleet` makes them threads of this process (tests, notebooks without a cluster).
Either way the same loop decides what runs where, through the pure
:class:`~rayflow.swarm.ledger.DispatchLedger`.

Failure handling: an agent that fails is a *result* (reported, not retried); a worker whose
actor, node or container fails is replaced by a fresh one, and its subtask goes to another
worker. A worker that fails to *start* is counted with where and why (:attr:`RunStats.start_failures`),
never silently replaced. Before rerunning, the coordinator asks :attr:`recover` whether the lost worker had
already recorded the result in the hub (it records each result before answering), so work that
finished is not done twice and each subtask still appears exactly once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayflow.errors import RayflowError
from rayflow.swarm.ledger import Assignment, DispatchLedger
from rayflow.swarm.worker_core import WorkerCore
from rayflow.wire.subtasks import PhaseEvent, Subtask, SubtaskResult

log = logging.getLogger("rayflow.swarm.dispatch_loop")

#: How often the loop looks at workers that are still starting, while nothing else happens.
LAUNCH_CHECK_S = 1.0

#: What a worker's run gives back.
RunOutcome = tuple[SubtaskResult, list[PhaseEvent]]
#: Failed starts kept with their details (the rest are counted, by error code).
MAX_START_FAILURES_KEPT = 20


class WorkerHandle(Protocol):
    """A started worker, wherever it lives."""

    worker_id: str
    node_id: str

    def run(self, subtask: Subtask) -> cf.Future[RunOutcome]: ...

    def stop(self) -> None:
        """Destroy the worker's sandbox and end the worker (best effort, never raises)."""
        ...


class Fleet(Protocol):
    """Starts workers. ``launch`` returns at once; the future resolves when the sandbox is ready."""

    def launch(self, worker_id: str) -> cf.Future[tuple[WorkerHandle, list[PhaseEvent]]]: ...

    def close(self) -> None: ...


class ResultSink(Protocol):
    def append(self, result: SubtaskResult) -> None: ...

    def append_event(self, event: PhaseEvent) -> None: ...


@dataclass
class RunStats:
    """Counters of one coordinator run (for the report and the progress display).

    Plain JSON-able fields only: the ``Coordinator`` actor hands them out as a dict for progress,
    and a run's summary keeps them; readers must accept dicts that lack fields added later.
    """

    #: Workers the job asked for at once.
    workers_asked: int = 0
    launched: int = 0
    launch_failures: int = 0
    #: Failed starts by error code (``hub_unreachable``, ``sandbox_failed``, ``start_timeout``...).
    start_failure_codes: dict[str, int] = field(default_factory=dict)
    #: The first :data:`MAX_START_FAILURES_KEPT` failed starts: ``{"worker", "node", "region", "code", "message"}``.
    start_failures: list[dict[str, str]] = field(default_factory=list)
    worker_failures: int = 0
    recovered_from_hub: int = 0
    done: int = 0
    ok: int = 0
    peak_in_flight: int = 0
    workers_ready: int = 0
    #: Peak resident memory of the coordinator's process (bytes), taken when the run ends.
    peak_rss_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    #: Results whose agent used memory; of them, those that reached the hub and those with memory
    #: errors (see :mod:`rayflow.wire.memory_use`), and the memory hits, as results come in.
    memory_used: int = 0
    memory_reached: int = 0
    memory_errors: int = 0
    memory_hits: int = 0
    #: The last memory error seen (``"<ErrorClass>: <message>"``).
    memory_last_error: str = ""
    #: Subtasks recorded as failed unrun because no worker could be started.
    abandoned: int = 0

    def start_failed(self, worker_id: str, exc: BaseException | None, message: str = "") -> None:
        """Count a worker that did not start: ``exc`` (or a ``message`` for a timeout) says why; a
        :class:`~rayflow.errors.RayflowError`'s ``node`` and ``region`` details say where."""
        error = error_of(exc) if exc is not None else {"code": "start_timeout", "message": message}
        details = getattr(exc, "details", None) or {}
        self.launch_failures += 1
        self.start_failure_codes[error["code"]] = self.start_failure_codes.get(error["code"], 0) + 1
        self.errors.append(f"{worker_id}: {error['message']}")
        if len(self.start_failures) < MAX_START_FAILURES_KEPT:
            self.start_failures.append({
                "worker": worker_id,
                "node": str(details.get("node") or ""),
                "region": str(details.get("region") or ""),
                "code": error["code"],
                "message": error["message"][:500],
            })

    def snapshot(self) -> RunStats:
        """A copy another thread may read while the run goes on (its lists and dicts its own)."""
        return dataclasses.replace(
            self,
            start_failure_codes=dict(self.start_failure_codes),
            start_failures=[dict(f) for f in self.start_failures],
            errors=list(self.errors),
        )

    def result_recorded(self, result: SubtaskResult) -> None:
        """Count a result the run keeps (its pass, and how its agent used memory)."""
        self.done += 1
        self.ok += int(result.ok)
        self.memory_hits += result.memory_hits
        use = result.memory
        if use is not None and use.used:
            self.memory_used += 1
            self.memory_reached += int(use.reached)
            if use.errors:
                self.memory_errors += 1
                self.memory_last_error = use.last_error


class SwarmError(RayflowError):
    """The swarm could not run the job at all (no worker could be started)."""

    code = "swarm_failed"


def error_of(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RayflowError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "worker_lost", "message": f"{type(exc).__name__}: {exc}"[:500]}


class DispatchLoop:
    """Runs one job's subtasks on a fleet. Use once: ``DispatchLoop(...).run(subtasks)``."""

    def __init__(
        self,
        fleet: Fleet,
        sink: ResultSink,
        *,
        workers: int,
        max_dispatches: int = 3,
        recover: Callable[[Subtask], SubtaskResult | None] | None = None,
        on_progress: Callable[[RunStats], None] | None = None,
        worker_prefix: str = "w",
        max_launch_failures: int | None = None,
        launch_timeout_s: float = 600.0,
        launch_check_s: float = LAUNCH_CHECK_S,
        close_fleet: bool = True,
        clock: Callable[[], float] = time.monotonic,
        abandon_on: Collection[str] = (),
    ) -> None:
        """``abandon_on``: error codes of failed starts after which a job that can start no worker
        at all (``max_launch_failures`` spent) records every subtask without a result as failed
        with that error and returns, so it still ends with a report; for any other last failure
        it raises :class:`SwarmError`, as it does by default."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._fleet = fleet
        self._sink = sink
        self._workers = workers
        self._max_dispatches = max_dispatches
        self._recover = recover
        self._on_progress = on_progress
        self._prefix = worker_prefix
        self._max_launch_failures = max_launch_failures if max_launch_failures is not None else 3 * workers
        self._launch_timeout_s = launch_timeout_s
        self._launch_check_s = launch_check_s
        #: False when the caller closes the fleet itself (after its report, so cleanup is not waited on first).
        self._close_fleet = close_fleet
        self._clock = clock
        self._abandon_on = frozenset(abandon_on)
        self._serial = 0
        self._cancelled = threading.Event()
        self.stats = RunStats(workers_asked=workers)
        self._last_start_code = ""

    def cancel(self) -> None:
        """Stop dispatching; running subtasks finish or are abandoned, workers are stopped."""
        self._cancelled.set()

    def _next_worker_id(self) -> str:
        self._serial += 1
        return f"{self._prefix}{self._serial:03d}"

    def run(self, subtasks: Iterable[Subtask]) -> RunStats:
        ledger = DispatchLedger(subtasks, max_dispatches=self._max_dispatches)
        launching: dict[cf.Future[Any], str] = {}
        launched_at: dict[cf.Future[Any], float] = {}
        running: dict[cf.Future[Any], tuple[WorkerHandle, Assignment]] = {}
        idle: list[WorkerHandle] = []
        live: dict[str, WorkerHandle] = {}

        def launch() -> None:
            worker_id = self._next_worker_id()
            future = self._fleet.launch(worker_id)
            launching[future] = worker_id
            launched_at[future] = self._clock()
            self.stats.launched += 1

        def dispatch() -> None:
            while idle and not self._cancelled.is_set():
                handle = idle.pop()
                others = len(live) - 1
                assignment = ledger.assign(handle.worker_id, other_workers=others)
                if assignment is None:
                    idle.append(handle)
                    return
                running[handle.run(assignment.subtask)] = (handle, assignment)
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(running))

        def record(result: SubtaskResult) -> None:
            self._sink.append(result)
            self.stats.result_recorded(result)

        try:
            for _ in range(self._workers):
                launch()
            while not self._cancelled.is_set():
                dispatch()
                if ledger.finished:
                    break
                if not running and not launching:
                    if self.stats.launch_failures >= self._max_launch_failures:
                        last = self.stats.errors[-1] if self.stats.errors else "unknown"
                        message = f"no worker could be started ({self.stats.launch_failures} tries); last: {last}"
                        code = self._last_start_code
                        if code not in self._abandon_on:
                            raise SwarmError(message, failures=self.stats.launch_failures)
                        log.warning("giving up the job's remaining subtasks: %s", message)
                        for failed in ledger.abandon({"code": code, "message": f"not run: {message}"}):
                            record(failed)
                            self.stats.abandoned += 1
                        break
                    launch()
                # Once the decomposition is used up, idle workers only cost sandboxes: stop them.
                if ledger.exhausted and ledger.waiting_retries == 0:
                    while idle:
                        handle = idle.pop()
                        live.pop(handle.worker_id, None)
                        handle.stop()
                done, _ = cf.wait([*launching, *running], timeout=self._launch_check_s, return_when=cf.FIRST_COMPLETED)
                self._give_up_slow_launches(launching, launched_at)
                for future in done:
                    if future in launching:
                        worker_id = launching.pop(future)
                        launched_at.pop(future, None)
                        try:
                            handle, events = future.result()
                        except BaseException as exc:  # noqa: BLE001 - a failed start is counted and retried
                            self.stats.start_failed(worker_id, exc)
                            error = error_of(exc)
                            self._last_start_code = error["code"]
                            log.warning("worker %s failed to start: %s: %s", worker_id, error["code"], error["message"])
                            continue
                        for event in events:
                            self._sink.append_event(event)
                        live[handle.worker_id] = handle
                        idle.append(handle)
                        self.stats.workers_ready += 1
                        continue
                    handle, assignment = running.pop(future)
                    try:
                        result, events = future.result()
                    except BaseException as exc:  # noqa: BLE001 - a lost worker is replaced, never fatal
                        self._worker_lost(ledger, handle, assignment, exc, record)
                        live.pop(handle.worker_id, None)
                        handle.stop()
                        if not ledger.finished:
                            launch()
                        continue
                    for event in events:
                        self._sink.append_event(event)
                    accepted = ledger.completed(result)
                    if accepted is not None:
                        record(accepted)
                    idle.append(handle)
                if self._on_progress is not None:
                    self._on_progress(self.stats.snapshot())
        finally:
            for handle in list(live.values()):
                handle.stop()
            for future in launching:
                future.add_done_callback(_stop_when_started)
            if self._close_fleet:
                self._fleet.close()
        return self.stats

    def _give_up_slow_launches(
        self, launching: dict[cf.Future[Any], str], launched_at: dict[cf.Future[Any], float]
    ) -> None:
        """A worker that cannot start in time (no node has the resources it asks for, an image that
        never builds) counts as a failed start; if it starts later after all, it is stopped."""
        now = self._clock()
        for future, started in list(launched_at.items()):
            if not future.done() and now - started > self._launch_timeout_s:
                worker_id = launching.pop(future)
                del launched_at[future]
                self.stats.start_failed(worker_id, None, f"did not start within {self._launch_timeout_s:.0f} s")
                self._last_start_code = "start_timeout"
                future.add_done_callback(_stop_when_started)

    def _worker_lost(
        self,
        ledger: DispatchLedger,
        handle: WorkerHandle,
        assignment: Assignment,
        exc: BaseException,
        record: Callable[[SubtaskResult], None],
    ) -> None:
        self.stats.worker_failures += 1
        error = error_of(exc)
        log.warning("worker %s lost while running %s: %s", handle.worker_id, assignment.subtask.id, error["message"])
        found = self._recover(assignment.subtask) if self._recover is not None else None
        if found is not None:
            self.stats.recovered_from_hub += 1
            accepted = ledger.completed(found)
            if accepted is not None:
                record(accepted)
            return
        for failed in ledger.worker_failed(handle.worker_id, error):
            record(failed)


def _stop_when_started(future: cf.Future[Any]) -> None:
    try:
        handle, _ = future.result()
    except BaseException:  # noqa: BLE001 - nothing started, nothing to stop
        return
    handle.stop()


# --- workers as threads of this process ---------------------------------------------------------
class ThreadWorker:
    """A :class:`WorkerCore` driven from a thread (one subtask at a time, as an actor would)."""

    def __init__(self, core: WorkerCore, pool: cf.ThreadPoolExecutor) -> None:
        self.core = core
        self.worker_id = core.worker_id
        self.node_id = core.node_id
        self._pool = pool

    def run(self, subtask: Subtask) -> cf.Future[RunOutcome]:
        return self._pool.submit(self.core.run, subtask)

    def stop(self) -> None:
        try:
            self.core.close()
        except Exception:  # noqa: BLE001 - stopping is best effort; leftovers are reaped by owner
            log.warning("stopping worker %s failed", self.worker_id, exc_info=True)


class ThreadFleet:
    """Workers as threads of this process: same loop, no cluster."""

    def __init__(self, make_core: Callable[[str], WorkerCore], max_workers: int) -> None:
        self._make_core = make_core
        self._pool = cf.ThreadPoolExecutor(max_workers=max(2, 2 * max_workers), thread_name_prefix="rayflow-worker")

    def launch(self, worker_id: str) -> cf.Future[tuple[WorkerHandle, list[PhaseEvent]]]:
        def start() -> tuple[WorkerHandle, list[PhaseEvent]]:
            core = self._make_core(worker_id)
            events = core.start()
            return ThreadWorker(core, self._pool), events

        return self._pool.submit(start)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
