"""The Python face of rayflow for scripts and notebooks: ``rayflow.init()``, ``Swarm``, ``swarm.run(job)``.

This is the one module of the library that talks to Ray (imported lazily, so ``import rayflow``
stays light). A ``Swarm`` makes sure its region's ``HubReplica`` runs, then hands each job to a
``Coordinator`` actor, shows progress while it runs, and returns a
:class:`~rayflow.views.job_result.JobResult`.

Nothing a job hands the cluster is a path of the driver's machine, so no two nodes need to share
a disk: ``Swarm.run`` (or ``Swarm.pack`` ahead of it) packs the job's repository once, here, into
Ray's object store, where each worker fetches it (:mod:`actors.upload`); the coordinator may run
on any node (a soft preference for the driver's, which Ray may not follow, or pinned with
``coordinator_region``) and keeps its results log on its own disk, and the driver copies that log
back through the actor, a bounded chunk at a time, into its own ``results_dir`` before building
the result. A job that must outlive the loss of other nodes pins its coordinator to a region that
stays.

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
#: How long one chunk of a results log may take to come back from the coordinator.
RESULTS_CHUNK_TIMEOUT_S = 300.0


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
    """Runs jobs on the connected Ray cluster with a ReasoningBank hub in ``hub_region``.

    The hub is found by name, or started (detached) when the region has none: it belongs to the
    cluster, not to the driver that started it, and serves every later job until the cluster
    stops or someone stops it (``ray.kill(actors.hub_replica.get_hub_replica(region))``).
    """

    def __init__(
        self,
        *,
        hub_region: str = "local",
        state_dir: str | Path | None = None,
        results_dir: str | Path | None = None,
        region: str | None = None,
        start_hub: bool = True,
        coordinator_region: str | None = None,
        max_upload_bytes: int | None = None,
    ) -> None:
        """``region``: where workers run (a region's pin resource; default anywhere).
        ``coordinator_region``: where the coordinator runs (default: anywhere, this node preferred
        but not guaranteed). ``max_upload_bytes``: the largest packed repository a job may upload
        (default ``Config.max_upload_bytes``, 512 MiB)."""
        import ray

        if not ray.is_initialized():
            init()
        config = load_config()
        self.state_dir = Path(state_dir or config.state_dir)
        self.results_dir = Path(results_dir or self.state_dir / "jobs")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.hub_region = hub_region
        self.region = region
        self.coordinator_region = coordinator_region
        self.max_upload_bytes = max_upload_bytes if max_upload_bytes is not None else config.max_upload_bytes
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
        # Detached: the hub is the cluster's service, not this driver's. A non-detached actor dies
        # when its creator's handles go out of scope, under whichever later driver is using it
        # (found by name); the next `ray job submit` meets the same hub and its lessons.
        actor = start_hub_replica(self.hub_region, str(hub_dir), pinned=pinned, detached=True)
        import ray

        ray.get(actor.endpoint.remote())
        return actor

    def federate(self, regions: list[str], *, federation: str = "rayflow") -> dict[str, Any]:
        """Make the hub replicas of ``regions`` (each started, e.g. by a ``Swarm`` of that
        region) one federation and connect them in a full mesh (pattern C on one cluster).

        The federation's root key is made on first use and kept with the operator, in this
        driver's state directory (``federation/<name>.root``); each replica's own key stays on
        its node. Returns each region's sync address.
        """
        from actors.federation import federate_hubs
        from rayflow.hub.federation_state import load_or_create_authority

        authority = load_or_create_authority(self.state_dir / "federation" / f"{federation}.root", federation)
        return federate_hubs(regions, authority)

    def endpoint(self) -> HubEndpoint:
        """The hub's address, CA and region (for a notebook that wants its own client)."""
        import ray

        return ray.get(self.hub.endpoint.remote())

    def _warm_key(self, job: Job) -> tuple[Any, ...]:
        from rayflow.swarm.worker_core import WorkerPlan, sandbox_profile

        plan = WorkerPlan.for_job(job, self.endpoint())
        # A worker's isolation is fixed when it starts (WorkerCore.adopt refuses another).
        return (job.backend, job.tenant, job.isolation, sandbox_profile(plan.spec))

    def pack(self, job: Job) -> Job:
        """``job`` ready for any node: its repository packed once into Ray's object store, and a
        pattern-A file glob listed (see :func:`rayflow.swarm.job.packed_job`).

        ``run`` packs a job itself; pack ahead to pay for it once for several runs, or to be free
        to change or remove the directory before the run. A repository above ``max_upload_bytes``
        is a :class:`~rayflow.errors.ConfigError` saying how big it was. The archive stays in the
        object store while the returned job is referenced.
        """
        from actors.upload import put_upload
        from rayflow.swarm.job import packed_job

        limit = self.max_upload_bytes
        return packed_job(job, lambda data: put_upload(data, max_bytes=limit), max_bytes=limit)

    def prewarm(self, job: Job, count: int | None = None, *, wait: bool = True) -> int:
        """Start ``count`` (default ``job.workers``) workers for jobs like ``job`` ahead of time.

        Their sandboxes are created now, so a later ``run`` of a job with ``warm_pool=True`` and the
        same sandbox profile (backend, tenant, isolation, image, limits, network) skips the cold
        start. Each warm worker serves one job only and is then destroyed; returns how many are
        waiting. Warm workers hold their Ray resources (CPU) while they wait, so prewarm only what
        the next job will use. With ``isolation="subtask"`` a warm worker's pool has its next
        sandbox prepared too.
        """
        import dataclasses

        import ray

        from actors.fleet import RayFleet
        from rayflow.swarm.worker_core import WorkerPlan

        hub = self.endpoint()
        fleet = RayFleet(
            # Nothing to unpack yet: a warm worker gets its job's repository when adopted.
            dataclasses.replace(WorkerPlan.for_job(job, hub), upload=None),
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
            steps.append(self._coordinator_actor().prewarm_steps.remote(self.pack(job), self.hub_region))
        if wait:
            ray.get([actor.ready.remote() for actor in actors] + steps)
        waiting = self._warm.setdefault(self._warm_key(job), [])
        waiting.extend(actors)
        return len(waiting)

    def _coordinator_actor(self) -> Any:
        """The ``Coordinator`` actor, started once and reused for every job: in
        ``coordinator_region`` when set, else on any node, the driver's own preferred."""
        if self._coordinator is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from actors.coordinator import Coordinator
            from actors.placement import pin_to_region

            if self.coordinator_region is not None:
                options: dict[str, Any] = {"resources": pin_to_region(self.coordinator_region)}
            else:
                here = ray.get_runtime_context().get_node_id()
                options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=True)}
            self._coordinator = Coordinator.options(**options).remote()
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
        """Run ``job`` to the end and return its :class:`~rayflow.views.job_result.JobResult`.

        The job is packed first (see :meth:`pack`; a packed job is used as it is). Its results log
        is copied from the coordinator's node into ``results_dir/<job>.jsonl`` here, which the
        result reads."""
        import ray

        from rayflow.swarm.results_log import ResultsLog
        from rayflow.views.job_result import JobResult
        from rayflow.views.progress import RunProgress

        job = self.pack(job)
        coordinator = self._coordinator_actor()
        warm = self._warm.pop(self._warm_key(job), []) if job.warm_pool else []
        done = coordinator.run.remote(job, None, self.hub_region, self.region, warm)
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
        path = self._copy_results(coordinator, job)
        return JobResult.from_log(ResultsLog(path, readonly=True), outcome["report"])

    def _copy_results(self, coordinator: Any, job: Job) -> Path:
        """Copy the coordinator's results log of ``job`` (on its node's disk) into ``results_dir``,
        a bounded chunk at a time (with parallel MaTTS its rollouts log too), then have the
        coordinator remove its own."""
        import ray

        from rayflow.swarm.matts import MattsPlan
        from rayflow.swarm.results_log import LogChunk, copy_log

        def reader(rollouts: bool) -> Any:
            def read(offset: int) -> LogChunk:
                chunk = coordinator.results.remote(job.name, offset, rollouts=rollouts)
                return LogChunk.from_dict(ray.get(chunk, timeout=RESULTS_CHUNK_TIMEOUT_S))

            return read

        path = copy_log(reader(False), self.results_dir / f"{job.name}.jsonl")
        if job.matts is not None and job.matts.mode == "parallel":
            copy_log(reader(True), MattsPlan.rollouts_path(path))
        coordinator.forget.remote(job.name)
        return path


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
    # Workers that failed to start and memory errors, as warning lines (counters an older
    # coordinator lacks warn of nothing).
    display.observe(stats)
    for key in seen:
        seen[key] = int(stats.get(key, 0))
