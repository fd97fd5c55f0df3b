"""Hybrid logical clock: timestamps that follow wall time yet respect causality across replicas.

Each change record carries one. A replica's clock never goes backwards, even if the wall clock
does, and after observing a remote timestamp every later local timestamp is greater than it, so
"last writer wins" picks the causally later write. The clock is sans-IO: the wall-clock source is
injected, which keeps it testable without sleeping.

A timestamp packs into one int64-compatible integer: ``wall_ms << 16 | logical``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_LOGICAL_BITS = 16
_LOGICAL_MAX = (1 << _LOGICAL_BITS) - 1
#: A remote timestamp further ahead of our wall clock than this is refused (a broken peer clock
#: would otherwise drag every replica's clock into the future).
DEFAULT_MAX_DRIFT_MS = 60_000


@dataclass(frozen=True, order=True)
class HLCTimestamp:
    """A point in hybrid logical time; ordered by (wall_ms, logical)."""

    wall_ms: int
    logical: int

    def pack(self) -> int:
        return (self.wall_ms << _LOGICAL_BITS) | self.logical

    @classmethod
    def unpack(cls, packed: int) -> HLCTimestamp:
        return cls(packed >> _LOGICAL_BITS, packed & _LOGICAL_MAX)


class ClockDriftError(ValueError):
    """A remote timestamp is implausibly far ahead of the local wall clock."""


class HybridLogicalClock:
    """Thread-safe HLC for one replica."""

    def __init__(
        self,
        wall_ms: Callable[[], int] | None = None,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        last: int = 0,
    ) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._max_drift_ms = max_drift_ms
        self._last = HLCTimestamp.unpack(last)
        self._lock = threading.Lock()

    @property
    def last(self) -> HLCTimestamp:
        return self._last

    def now(self) -> HLCTimestamp:
        """A timestamp for a local event, greater than every one issued or observed before."""
        with self._lock:
            wall = self._wall_ms()
            if wall > self._last.wall_ms:
                self._last = HLCTimestamp(wall, 0)
            else:
                self._last = self._advance_logical(self._last.wall_ms, self._last.logical)
            return self._last

    def observe(self, remote: HLCTimestamp) -> HLCTimestamp:
        """Merge a timestamp received from another replica; returns the new local time."""
        with self._lock:
            wall = self._wall_ms()
            if remote.wall_ms - wall > self._max_drift_ms:
                raise ClockDriftError(
                    f"remote clock is {remote.wall_ms - wall} ms ahead (limit {self._max_drift_ms} ms)"
                )
            top = max(wall, self._last.wall_ms, remote.wall_ms)
            if top == self._last.wall_ms and top == remote.wall_ms:
                logical = max(self._last.logical, remote.logical)
                self._last = self._advance_logical(top, logical)
            elif top == self._last.wall_ms:
                self._last = self._advance_logical(top, self._last.logical)
            elif top == remote.wall_ms:
                self._last = self._advance_logical(top, remote.logical)
            else:
                self._last = HLCTimestamp(top, 0)
            return self._last

    @staticmethod
    def _advance_logical(wall_ms: int, logical: int) -> HLCTimestamp:
        # On logical overflow borrow a millisecond: still monotonic, still close to wall time.
        if logical >= _LOGICAL_MAX:
            return HLCTimestamp(wall_ms + 1, 0)
        return HLCTimestamp(wall_ms, logical + 1)
