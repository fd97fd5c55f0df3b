"""``Reaper``: removes what destroyed sandboxes held, in the background, retrying what fails.

Why: removing a container with its bridge network and packet filter rules takes the engine
40-50 ms, and nothing in it is the caller's business once the sandbox can no longer run anything.
A backend makes the sandbox unusable at once (kills its processes, closes its channel) and hands
the slow removal to a reaper, so ``destroy`` costs the caller about a millisecond.

Nothing may be lost on the way:

* a job that raises is retried after a growing pause (:class:`RetryPolicy`); after the last
  attempt the failure is logged, and what is left still carries its owner's label, so a later
  ``reap`` (``rayflow sandbox gc``) finds it;
* :meth:`Reaper.flush` waits until every job submitted so far has finished (succeeded or given
  up): callers that need "gone now" (tests, a backend's ``owned``) use it;
* :meth:`Reaper.close` flushes and stops the workers, and runs by itself when the reaper is
  garbage-collected or the interpreter exits, so a process that ends right after ``destroy``
  still removes everything;
* a job submitted after ``close`` runs in the caller's thread instead.

The queue is ordered by when each job is due (now, or after its retry pause), so one failing
removal does not hold up the others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("rayflow.sandbox.reaper")

#: How long interpreter exit (or garbage collection of a reaper) waits for queued removals.
EXIT_FLUSH_S = 120.0

Job = Callable[[], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing job is tried, and how long to pause between tries."""

    attempts: int = 6
    first_pause_s: float = 0.1
    factor: float = 2.0
    max_pause_s: float = 5.0

    def pause_after(self, failures: int) -> float | None:
        """Seconds to wait after the ``failures``-th failed try; ``None`` when it was the last."""
        if failures >= self.attempts:
            return None
        return min(self.max_pause_s, self.first_pause_s * self.factor ** (failures - 1))


class Ticket:
    """One submitted job: wait for it, and see how it ended."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.failures = 0
        #: The last failure when the job gave up, else ``None``.
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job has finished; False when ``timeout_s`` passed first."""
        return self._done.wait(timeout_s)

    def _finish(self, error: BaseException | None) -> None:
        self.error = error
        self._done.set()


@dataclass(order=True)
class _Entry:
    due: float
    seq: int
    ticket: Ticket = field(compare=False)
    job: Job = field(compare=False)


class _Queue:
    """The reaper's state and its worker loop; holds no reference to the :class:`Reaper`, so the
    reaper can be garbage-collected (which closes this queue) while workers still run."""

    def __init__(self, name: str, workers: int, retry: RetryPolicy, clock: Callable[[], float]) -> None:
        self.name = name
        self.workers = workers
        self.retry = retry
        self.clock = clock
        self.cond = threading.Condition()
        self.heap: list[_Entry] = []
        self.seq = itertools.count()
        self.running = 0
        self.closed = False
        self.threads: list[threading.Thread] = []

    def submit(self, key: str, job: Job) -> Ticket:
        ticket = Ticket(key)
        with self.cond:
            if not self.closed:
                heapq.heappush(self.heap, _Entry(self.clock(), next(self.seq), ticket, job))
                if len(self.threads) < self.workers:
                    self._start_worker()
                self.cond.notify()
                return ticket
        self._run_inline(ticket, job)
        return ticket

    def _start_worker(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run_inline(self, ticket: Ticket, job: Job) -> None:
        """After close: try the job here, pausing between tries as the workers would."""
        while True:
            error = self._attempt(ticket, job)
            if error is None:
                ticket._finish(None)
                return
            pause = self._after_failure(ticket, error)
            if pause is None:
                return
            time.sleep(pause)

    def _attempt(self, ticket: Ticket, job: Job) -> BaseException | None:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - any failure is retried, then logged
            return exc
        return None

    def _after_failure(self, ticket: Ticket, error: BaseException) -> float | None:
        """Count a failed try; the pause before the next one, or ``None`` (given up, logged)."""
        ticket.failures += 1
        pause = self.retry.pause_after(ticket.failures)
        if pause is None:
            log.error(
                "%s: giving up on %s after %d tries (a later reap will find it): %s",
                self.name,
                ticket.key,
                ticket.failures,
                error,
            )
            ticket._finish(error)
        else:
            log.warning("%s: removing %s failed, retrying in %.2f s: %s", self.name, ticket.key, pause, error)
        return pause

    def _work(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.heap and self.heap[0].due <= self.clock():
                        entry = heapq.heappop(self.heap)
                        self.running += 1
                        break
                    if not self.heap and self.closed:
                        return
                    timeout = None if not self.heap else max(0.0, self.heap[0].due - self.clock())
                    self.cond.wait(timeout)
            error = self._attempt(entry.ticket, entry.job)
            pause = None
            if error is None:
                entry.ticket._finish(None)
            else:
                pause = self._after_failure(entry.ticket, error)
            with self.cond:
                if pause is not None:
                    entry.due = self.clock() + pause
                    heapq.heappush(self.heap, entry)
                self.running -= 1
                self.cond.notify_all()

    def flush(self, timeout_s: float | None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.heap and self.running == 0, timeout_s)

    def close(self, timeout_s: float | None) -> bool:
        """Refuse new jobs (they run inline), finish the queued ones, stop the workers."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        finished = self.flush(timeout_s)
        if finished:
            for thread in list(self.threads):
                if thread is not threading.current_thread():
                    thread.join()
        return finished

    def pending(self) -> int:
        with self.cond:
            return len(self.heap) + self.running


class Reaper:
    """Runs removal jobs on background threads; see the module docstring."""

    def __init__(
        self,
        name: str = "rayflow-reaper",
        *,
        workers: int = 1,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError("a reaper needs at least one worker")
        self._queue = _Queue(name, workers, retry or RetryPolicy(), clock)
        # Runs at garbage collection or at interpreter exit, whichever comes first; the daemon
        # workers are still alive during atexit, so queued removals are finished, not dropped.
        self._finalizer = weakref.finalize(self, self._queue.close, EXIT_FLUSH_S)

    def submit(self, key: str, job: Job) -> Ticket:
        """Queue ``job`` (``key`` names it in logs); it runs on a worker, retried until it succeeds
        or the retry policy gives up."""
        return self._queue.submit(key, job)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every job submitted so far has finished; False when ``timeout_s`` passed first."""
        return self._queue.flush(timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish the queued jobs and stop the workers; later jobs run in the submitting thread."""
        if self._finalizer.detach() is None:
            return self._queue.flush(timeout_s)
        return self._queue.close(timeout_s)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._queue.pending()

    @property
    def closed(self) -> bool:
        return self._queue.closed
