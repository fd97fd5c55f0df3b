"""``Coordinator``: the Ray actor that runs a job — a thin shell over :class:`rayflow.swarm.coordinator_core.CoordinatorCore`.

It is a threaded actor (``max_concurrency``) so that ``progress`` and ``cancel`` answer while
``run`` is busy. Its workers are ``SandboxWorker`` actors (:class:`actors.fleet.RayFleet`); its
hub is the region's ``HubReplica``. For pattern B it also creates a sandbox of its own for the
decomposition and synthesis steps, on its own node.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from actors.fleet import RayFleet, collect_garbage_on_nodes, ensure_image_on_nodes
from actors.hub_replica import get_hub_replica
from actors.sandbox_worker import token_minter
from rayflow.sandbox.image import DEFAULT_TAG
from rayflow.sandbox.select import probe_engine, select_backend
from rayflow.swarm.coordinator_core import CoordinatorCore, HubSession, start_step_core
from rayflow.swarm.dispatch_loop import RunStats
from rayflow.swarm.job import Job
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan, sandbox_profile
from rayflow.wire.subtasks import Pattern


def hub_session(hub_region: str, tenant: str) -> HubSession:
    """How to reach the region's hub replica and mint tokens for ``tenant``."""
    endpoint = ray.get(get_hub_replica(hub_region).endpoint.remote())
    return HubSession(endpoint, token_minter(hub_region, tenant))


def docker_engine_answers() -> bool:
    return probe_engine().ok


@ray.remote(max_concurrency=4, num_cpus=0, max_restarts=0)
class Coordinator:
    """Runs jobs one at a time; ask ``progress()`` meanwhile."""

    def __init__(self) -> None:
        self._runner: CoordinatorCore | None = None
        self._stats = RunStats()
        #: Started sandboxes for the steps of the next pattern-B job, by profile (each used once).
        self._warm_steps: dict[tuple[Any, ...], WorkerCore] = {}
        self._images_checked: set[tuple[str, frozenset[str]]] = set()

    @staticmethod
    def _step_key(job: Job, hub: HubSession | None) -> tuple[Any, ...]:
        plan = WorkerPlan.for_job(job, hub.endpoint if hub is not None else None)
        return (job.backend, job.tenant, sandbox_profile(plan.spec))

    def prewarm_steps(self, job: Job, hub_region: str | None = None) -> None:
        """Start the coordinator's own sandbox for a coming pattern-B job like ``job``."""
        hub = hub_session(hub_region, job.tenant) if hub_region is not None else None
        key = self._step_key(job, hub)
        if key in self._warm_steps:
            return
        create = select_backend(job.backend, allow_unisolated=job.backend == "process").create
        plan = WorkerPlan.for_job(job, hub.endpoint if hub is not None else None)
        self._warm_steps[key], _ = start_step_core(plan, create, hub)

    def close(self) -> None:
        """Destroy sandboxes started for jobs that never came."""
        for core in self._warm_steps.values():
            core.close()
        self._warm_steps.clear()

    def run(
        self,
        job: Job,
        results_dir: str,
        hub_region: str | None = None,
        region: str | None = None,
        warm: list[Any] | None = None,
    ) -> dict[str, Any]:
        """Run ``job``; ``warm`` are started workers of the job's sandbox profile, used before cold ones."""
        self._stats = RunStats()
        nodes = frozenset(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        if (
            job.backend in ("docker", "auto")
            and job.image == DEFAULT_TAG
            and (job.image, nodes) not in self._images_checked
            and docker_engine_answers()
        ):
            # rayflow's own image is built offline where missing or stale (cached by content hash);
            # checked once per set of nodes, not before every job.
            ensure_image_on_nodes(job.image)
            self._images_checked.add((job.image, nodes))
        hub = hub_session(hub_region, job.tenant) if hub_region is not None else None
        cpus = job.limits.cpus or 1.0

        def make_fleet(plan: WorkerPlan) -> RayFleet:
            return RayFleet(
                plan,
                backend=job.backend,
                cpus=cpus,
                hub=hub.endpoint if hub is not None else None,
                hub_region=hub_region,
                tenant=job.tenant,
                region=region,
                warm=warm,
            )

        step_sandboxes = None
        step_core = None
        if job.pattern is Pattern.FULL_SANDBOX:
            step_sandboxes = select_backend(job.backend, allow_unisolated=job.backend == "process").create
            step_core = self._warm_steps.pop(self._step_key(job, hub), None)
        self._runner = CoordinatorCore(
            job,
            make_fleet,
            results_dir,
            hub=hub,
            create_step_sandbox=step_sandboxes,
            step_core=step_core,
            collect_garbage=lambda: collect_garbage_on_nodes([job.backend]),
            on_progress=self._remember,
        )
        outcome = self._runner.run()
        self._stats = outcome.stats
        data = dataclasses.asdict(outcome)
        return data

    def _remember(self, stats: RunStats) -> None:
        self._stats = dataclasses.replace(stats, errors=list(stats.errors[-5:]))

    def progress(self) -> dict[str, Any]:
        return dataclasses.asdict(self._stats)

    def cancel(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
