"""The coordinator loop's own decisions, over a fleet whose workers never start."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from rayflow.swarm.dispatch_loop import DispatchLoop, SwarmError
from rayflow.wire.subtasks import Subtask


class NeverStartingFleet:
    """Workers that ask for resources no node has: their start never completes."""

    def __init__(self) -> None:
        self.launched: list[str] = []

    def launch(self, worker_id: str) -> cf.Future:
        self.launched.append(worker_id)
        return cf.Future()

    def close(self) -> None:
        self.closed = True


class Sink:
    def append(self, result) -> None:
        raise AssertionError("no result can exist")

    def append_event(self, event) -> None:
        raise AssertionError("no event can exist")


class SteppingClock:
    """Each reading is ten seconds after the last: time passes only when the loop looks."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def test_workers_that_never_start_end_the_job_with_a_clear_error():
    fleet = NeverStartingFleet()
    coordinator = DispatchLoop(fleet, Sink(), workers=2, launch_timeout_s=30.0, max_launch_failures=4, launch_check_s=0.01,
                              clock=SteppingClock())
    with pytest.raises(SwarmError, match="did not start within 30 s"):
        coordinator.run([Subtask("a", 0)])
    assert coordinator.stats.launch_failures >= 4
    assert len(fleet.launched) == coordinator.stats.launched
    assert fleet.closed
