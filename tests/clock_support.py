"""A wall clock the test moves by hand, for code that takes ``clock=`` (token lifetimes, caches)."""

from __future__ import annotations


class SteppedClock:
    """Returns ``now``; the test sets or advances it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
