"""A readers-writer lock: many concurrent readers or one writer, with writers served first.

Why: an hnswlib index answers concurrent queries safely, but a query that runs while an insert
or delete rewires the graph can read half-written links. Queries therefore share the lock and
mutations take it alone. Writers are preferred (a waiting writer stops new readers from
entering) so that a steady stream of queries cannot starve an insert forever.

The lock is not reentrant: a thread that holds it for reading and asks again while a writer is
waiting would wait for itself. Callers keep their locked sections flat.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Shared/exclusive lock with writer preference, usable as ``with lock.read():`` / ``with lock.write():``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active_readers = 0
        self._writer_active = False
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        """How many threads hold the lock for reading right now (for observability and tests)."""
        with self._cond:
            return self._active_readers

    @property
    def writers_waiting(self) -> int:
        """How many threads are queued for the write lock right now."""
        with self._cond:
            return self._writers_waiting

    @property
    def write_locked(self) -> bool:
        """True while a writer holds the lock."""
        with self._cond:
            return self._writer_active

    def acquire_read(self, timeout: float | None = None) -> bool:
        """Take a shared hold; wait while a writer holds or waits. False if ``timeout`` ran out."""
        with self._cond:
            entered = self._cond.wait_for(
                lambda: not self._writer_active and self._writers_waiting == 0, timeout=timeout
            )
            if not entered:
                return False
            self._active_readers += 1
            return True

    def release_read(self) -> None:
        """Give back a shared hold taken by :meth:`acquire_read`."""
        with self._cond:
            if self._active_readers <= 0:
                raise RuntimeError("release_read without a matching acquire_read")
            self._active_readers -= 1
            if self._active_readers == 0:
                self._cond.notify_all()

    def acquire_write(self, timeout: float | None = None) -> bool:
        """Take the exclusive hold; wait for readers and any writer to leave. False on timeout."""
        with self._cond:
            self._writers_waiting += 1
            try:
                entered = self._cond.wait_for(
                    lambda: not self._writer_active and self._active_readers == 0, timeout=timeout
                )
            finally:
                self._writers_waiting -= 1
            if not entered:
                # Readers held back by this writer's place in the queue may go now.
                self._cond.notify_all()
                return False
            self._writer_active = True
            return True

    def release_write(self) -> None:
        """Give back the exclusive hold taken by :meth:`acquire_write`."""
        with self._cond:
            if not self._writer_active:
                raise RuntimeError("release_write without a matching acquire_write")
            self._writer_active = False
            self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared for the duration of a ``with`` block."""
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the duration of a ``with`` block."""
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()
