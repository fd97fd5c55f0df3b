"""The Python face of rayflow for scripts and notebooks: ``rayflow.init()``, ``Swarm``, ``swarm.run(job)``.

This is the one module of the library that talks to Ray (imported lazily, so ``import rayflow``
stays light). A ``Swarm`` makes sure its region's ``HubReplica`` runs, then hands each job to a
``Coordinator`` actor placed on the driver's own node (pattern A's "coordinator on the host"; its
results file is therefore readable here), shows progress while it runs, and returns a
:class:`~rayflow.views.job_result.JobResult`.

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
from rayflow.wire.hub_endpoint import HubEndpoint

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
        #: Started workers waiting for a job, by sandbox profile and tenant (never shared across jobs).
        self._warm: dict[tuple[Any, ...], list[Any]] = {}
        self._coordinator: Any = None

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

    def endpoint(self) -> HubEndpoint:
        """The hub's address, CA and region (for a notebook that wants its own client)."""
        import ray

        return ray.get(self.hub.endpoint.remote())

    def _warm_key(self, job: Job) -> tuple[Any, ...]:
        from rayflow.swarm.worker_core import WorkerPlan, sandbox_profile

        plan = WorkerPlan.for_job(job, self.endpoint())
        # A worker's isolation is fixed when it starts (WorkerCore.adopt refuses another).
        return (job.backend, job.tenant, job.isolation, sandbox_profile(plan.spec))

    def prewarm(self, job: Job, count: int | None = None, *, wait: bool = True) -> int:
        """Start ``count`` (default ``job.workers``) workers for jobs like ``job`` ahead of time.

        Their sandboxes are created now, so a later ``run`` of a job with ``warm_pool=True`` and the
        same sandbox profile (backend, tenant, isolation, image, limits, network) skips the cold
        start. Each warm worker serves one job only and is then destroyed; returns how many are
        waiting. Warm workers hold their Ray resources (CPU) while they wait, so prewarm only what
        the next job will use. With ``isolation="subtask"`` a warm worker's pool has its next
        sandbox prepared too.
        """
        import ray

        from actors.fleet import RayFleet
        from rayflow.swarm.worker_core import WorkerPlan

        hub = self.endpoint()
        fleet = RayFleet(
            WorkerPlan.for_job(job, hub),
            backend=job.backend,
            cpus=job.limits.cpus or 1.0,
            hub=hub,
            hub_region=self.hub_region,
            tenant=job.tenant,
            region=self.region,
        )
        actors = fleet.start_warm(count if count is not None else job.workers)
        steps = []
        if job.pattern.value == "B":
            # Pattern B's coordinator has a sandbox of its own for its steps: start it too.
            steps.append(self._coordinator_actor().prewarm_steps.remote(job, self.hub_region))
        if wait:
            ray.get([actor.ready.remote() for actor in actors] + steps)
        waiting = self._warm.setdefault(self._warm_key(job), [])
        waiting.extend(actors)
        return len(waiting)

    def _coordinator_actor(self) -> Any:
        """The ``Coordinator`` actor, on the driver's own node, started once and reused for every job."""
        if self._coordinator is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from actors.coordinator import Coordinator

            here = ray.get_runtime_context().get_node_id()
            self._coordinator = Coordinator.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
            ).remote()
        return self._coordinator

    def close(self) -> None:
        """Stop the coordinator; shut down warm workers nobody used (their sandboxes are destroyed)."""
        if self._coordinator is not None:
            import ray

            try:
                ray.get(self._coordinator.close.remote(), timeout=120)
            except Exception:  # noqa: BLE001 - a coordinator that cannot answer is killed regardless
                log.warning("the coordinator did not close cleanly", exc_info=True)
            ray.kill(self._coordinator)
            self._coordinator = None
        for actors in self._warm.values():
            for actor in actors:
                try:
                    actor.shutdown.remote()
                except Exception:  # noqa: BLE001 - an actor already gone has nothing to shut down
                    log.debug("warm worker already gone", exc_info=True)
        self._warm.clear()

    def __enter__(self) -> Swarm:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, job: Job, *, progress: bool = True, timeout_s: float | None = None) -> Any:
        """Run ``job`` to the end and return its :class:`~rayflow.views.job_result.JobResult`."""
        import ray

        from rayflow.swarm.results_log import ResultsLog
        from rayflow.views.job_result import JobResult
        from rayflow.views.progress import RunProgress

        coordinator = self._coordinator_actor()
        warm = self._warm.pop(self._warm_key(job), []) if job.warm_pool else []
        done = coordinator.run.remote(job, str(self.results_dir), self.hub_region, self.region, warm)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        display = RunProgress(
            job.workers,
            _known_subtask_count(job),
            f"{job.name} (pattern {job.pattern.value})",
            mode="auto" if progress else "silent",
        )
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
        except BaseException:
            # A coordinator interrupted mid-job is not reused: its state is unknown.
            ray.kill(coordinator)
            self._coordinator = None
            raise
        return JobResult.from_log(ResultsLog(outcome["results_path"], readonly=True), outcome["report"])


def _known_subtask_count(job: Job) -> int:
    """How many subtasks the job has, when that is known before decomposing (else 0: the bar grows)."""
    from rayflow.swarm.job import TaskList

    if not isinstance(job.decomposition, TaskList):
        return 0
    # Parallel MaTTS dispatches k rollouts per subtask, and progress counts dispatched work.
    rollouts = job.matts.k if job.matts is not None and job.matts.mode == "parallel" else 1
    return len(job.decomposition.tasks) * rollouts


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
