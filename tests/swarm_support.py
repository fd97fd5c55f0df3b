"""Driving a swarm job from a test while the test interferes with it: shared by the Ray swarm tests.

Why a background run: a test that kills a worker or removes a node must do so while
``Swarm.run`` is still waiting for the job, so the run goes to a thread and the test thread finds
the worker to kill. Why wait for ``ready``: a worker actor exists (by name) before its sandbox is
up, and killing it then would test a failed start, not a worker lost mid-job.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def started_worker(name: str, deadline: float, *, ready_timeout_s: float, swarm: Any = None) -> Any:
    """The named worker actor once its sandbox is ready (looked up until ``deadline``).

    With ``swarm``, also wait until the coordinator itself has counted a worker ready, so that a
    kill right after lands on a worker the job is using, not on one still starting in its eyes.
    """
    import ray

    while time.monotonic() < deadline:
        try:
            actor = ray.get_actor(name, namespace="rayflow")
        except ValueError:
            continue
        ray.get(actor.ready.remote(), timeout=ready_timeout_s)
        if swarm is not None:
            coordinator = swarm._coordinator_actor()
            while time.monotonic() < deadline:
                if ray.get(coordinator.progress.remote(), timeout=ready_timeout_s)["workers_ready"] >= 1:
                    break
        return actor
    raise AssertionError(f"worker {name} never started")


def run_in_background(swarm: Any, job: Any, **run_options: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``swarm.run(job, progress=False, **run_options)`` in a thread.

    Returns the thread and a dict that gets ``"result"`` (the job result) or ``"error"`` (what the
    run raised, handed to the test thread to report).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = swarm.run(job, progress=False, **run_options)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome
