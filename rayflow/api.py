"""The Python face of rayflow for scripts and notebooks: ``rayflow.init()``, ``Swarm``, ``swarm.run(job)``.

This is the one module of the library that talks to Ray (imported lazily, so ``import rayflow``
stays light). A ``Swarm`` makes sure its region's ``HubReplica`` runs, then hands each job to a
``Coordinator`` actor placed on the driver's own node (pattern A's "coordinator on the host"; its
results file is therefore readable here), shows progress while it runs, and returns a
:class:`~rayflow.swarm.report.JobResult`.

Example::

    import rayflow
    from rayflow.swarm.job import AgentRef, FileGlob, Job

    rayflow.init()                       # or rayflow.init("auto") inside `ray job submit`
    swarm = rayflow.Swarm()
    result = swarm.run(Job(AgentRef.shell("python3 -m unittest -q"), FileGlob(".", "tests/test_*.py")))
    result.table()                       # a rich table; in Jupyter the result renders itself
    result.timeline().plot("run.png")
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from rayflow.config import load_config
from rayflow.swarm.job import Job

log = logging.getLogger("rayflow.api")

#: Ray namespace of rayflow's named actors (hub replicas).
RAY_NAMESPACE = "rayflow"
#: How often the driver asks the coordinator for progress.
PROGRESS_POLL_S = 0.25


def init(address: str | None = None, **ray_options: Any) -> None:
    """Connect to a Ray cluster (``address``, ``RAY_ADDRESS``, or a new local one); idempotent."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
    ray_options.setdefault("namespace", RAY_NAMESPACE)
    ray_options.setdefault("log_to_driver", True)
    # The driver's working tree must be importable by workers (rayflow itself, agents, clusters).
    ray.init(address=address, **ray_options)


def _region_is_a_resource(region: str) -> bool:
    import ray

    from actors.placement import region_resource

    return any(region_resource(region) in node.get("Resources", {}) for node in ray.nodes() if node.get("Alive"))


class Swarm:
    """Runs jobs on the connected Ray cluster with a ReasoningBank hub in ``hub_region``."""

    def __init__(
        self,
        *,
        hub_region: str = "local",
        state_dir: str | Path | None = None,
        results_dir: str | Path | None = None,
        region: str | None = None,
        start_hub: bool = True,
    ) -> None:
        import ray

        if not ray.is_initialized():
            init()
        config = load_config()
        self.state_dir = Path(state_dir or config.state_dir)
        self.results_dir = Path(results_dir or self.state_dir / "jobs")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.hub_region = hub_region
        self.region = region
        self.hub = self._ensure_hub(start_hub)

    def _ensure_hub(self, start: bool) -> Any:
        from actors.hub_replica import get_hub_replica, start_hub_replica

        try:
            return get_hub_replica(self.hub_region)
        except ValueError:
            if not start:
                raise
        hub_dir = self.state_dir / "hubs" / self.hub_region
        hub_dir.mkdir(parents=True, exist_ok=True)
        pinned = _region_is_a_resource(self.hub_region)
        actor = start_hub_replica(self.hub_region, str(hub_dir), pinned=pinned)
        import ray

        ray.get(actor.endpoint.remote())
        return actor

    def endpoint(self) -> dict[str, Any]:
        """The hub's address, CA and region (for a notebook that wants its own client)."""
        import ray

        return ray.get(self.hub.endpoint.remote())

    def run(self, job: Job, *, progress: bool = True, timeout_s: float | None = None) -> Any:
        """Run ``job`` to the end and return its :class:`~rayflow.swarm.report.JobResult`."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors.coordinator import Coordinator
        from rayflow.swarm.progress import RunProgress
        from rayflow.swarm.report import JobResult
        from rayflow.swarm.results_log import ResultsLog

        here = ray.get_runtime_context().get_node_id()
        coordinator = Coordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        ).remote()
        done = coordinator.run.remote(job, str(self.results_dir), self.hub_region, self.region)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        display = RunProgress(job.workers, None, f"{job.name} (pattern {job.pattern.value})", enabled=progress)
        seen = {"workers_ready": 0, "done": 0, "ok": 0, "worker_failures": 0}
        try:
            with display:
                while True:
                    ready, _ = ray.wait([done], timeout=PROGRESS_POLL_S)
                    _advance(display, seen, ray.get(coordinator.progress.remote()))
                    if ready:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        coordinator.cancel.remote()
                        raise TimeoutError(f"job {job.name} did not finish within {timeout_s} s")
                outcome = ray.get(done)
                _advance(display, seen, outcome["stats"])
        finally:
            ray.kill(coordinator)
        return JobResult.from_log(ResultsLog(outcome["results_path"], readonly=True), outcome["report"])


def _advance(display: Any, seen: dict[str, int], stats: dict[str, Any]) -> None:
    """Move the progress display forward by what changed since the last poll."""
    for _ in range(int(stats.get("workers_ready", 0)) - seen["workers_ready"]):
        display.worker_ready()
    for _ in range(int(stats.get("worker_failures", 0)) - seen["worker_failures"]):
        display.subtask_retried()
    new_done = int(stats.get("done", 0)) - seen["done"]
    new_ok = int(stats.get("ok", 0)) - seen["ok"]
    for position in range(new_done):
        display.subtask_done(position < new_ok)
    for key in seen:
        seen[key] = int(stats.get(key, 0))
