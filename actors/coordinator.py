"""``Coordinator``: the Ray actor that runs a job — a thin shell over :class:`rayflow.swarm.coordinator_core.CoordinatorCore`.

It is a threaded actor (``max_concurrency``) so that ``progress`` and ``cancel`` answer while
``run`` is busy. Its workers are ``SandboxWorker`` actors (:class:`actors.fleet.RayFleet`); its
hub is the region's ``HubReplica``. For pattern B it also creates a sandbox of its own for the
decomposition and synthesis steps, on its own node.

It may run on any node: nothing it is handed names a path of the driver's machine. The job's
repository arrives packed in Ray's object store (the job's upload, fetched by the workers that
unpack it, :mod:`actors.upload`); the results log is written to a scratch directory on the
coordinator's own disk, and the driver reads it back through :meth:`Coordinator.results`, a
bounded chunk of whole lines at a time, then has it removed with :meth:`Coordinator.forget`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from actors.fleet import RayFleet, collect_garbage_on_nodes, ensure_image_on_nodes
from actors.hub_replica import get_hub_replica
from actors.sandbox_worker import token_minter
from rayflow.sandbox.image import DEFAULT_TAG
from rayflow.sandbox.image_transfer import image_check_summary
from rayflow.sandbox.select import probe_engine, select_backend
from rayflow.swarm.coordinator_core import CoordinatorCore, HubSession, start_step_core
from rayflow.swarm.dispatch_loop import RunStats
from rayflow.swarm.job import Job
from rayflow.swarm.matts import MattsPlan
from rayflow.swarm.results_log import LOG_CHUNK_BYTES, read_log_chunk
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
        #: (image, alive node ids) -> the ``images`` summary entry of the check made for them.
        self._images_checked: dict[tuple[str, frozenset[str]], dict[str, Any]] = {}
        #: Where results logs go unless a run names a directory: on this actor's own node.
        self._scratch: Path | None = None
        #: Job name -> its results log, for the driver to read back (``results``).
        self._logs: dict[str, Path] = {}
        #: The backends of the coordinator's own sandboxes (pattern B), by name: one each, so
        #: what they remove in the background is waited for in one place (:meth:`_flush_steps`).
        self._step_backends: dict[str, Any] = {}
        self._step_lock = threading.Lock()

    def _step_backend(self, name: str) -> Any:
        with self._step_lock:  # the actor runs up to four calls at once
            if name not in self._step_backends:
                self._step_backends[name] = select_backend(name, allow_unisolated=name == "process")
            return self._step_backends[name]

    def _flush_steps(self, timeout_s: float = 60.0) -> None:
        """Wait until destroyed step sandboxes are gone from their engine (Docker removes them in
        the background): when a job's run returns, none of its containers is left."""
        for backend in self._step_backends.values():
            flush = getattr(backend, "flush", None)
            if callable(flush):
                flush(timeout_s)

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
        plan = WorkerPlan.for_job(job, hub.endpoint if hub is not None else None)
        self._warm_steps[key], _ = start_step_core(plan, self._step_backend(job.backend).create, hub)

    def close(self) -> None:
        """Destroy sandboxes started for jobs that never came; remove the results logs kept here."""
        for core in self._warm_steps.values():
            core.close()
        self._warm_steps.clear()
        self._flush_steps()
        self._logs.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def node_id(self) -> str:
        """The Ray node this coordinator runs on (its results logs are on that node's disk)."""
        return ray.get_runtime_context().get_node_id()

    def results(
        self, job_name: str, offset: int = 0, max_bytes: int = LOG_CHUNK_BYTES, rollouts: bool = False
    ) -> dict[str, Any]:
        """Whole lines of the results log of ``job_name`` (a job this coordinator ran) from byte
        ``offset``, about ``max_bytes`` of them: a :class:`~rayflow.swarm.results_log.LogChunk` as a
        dict. ``rollouts``: the log of every parallel-MaTTS rollout instead."""
        path = self._logs.get(job_name)
        if path is None:
            raise KeyError(f"this coordinator keeps no results log of job {job_name!r}")
        if rollouts:
            path = MattsPlan.rollouts_path(path)
        return read_log_chunk(path, offset, max_bytes).to_dict()

    def forget(self, job_name: str) -> None:
        """Remove the results logs of ``job_name`` from this node (the driver has its own copy)."""
        path = self._logs.pop(job_name, None)
        if path is not None:
            path.unlink(missing_ok=True)
            MattsPlan.rollouts_path(path).unlink(missing_ok=True)

    def _results_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="rayflow-coordinator-"))
        return self._scratch

    def run(
        self,
        job: Job,
        results_dir: str | None = None,
        hub_region: str | None = None,
        region: str | None = None,
        warm: list[Any] | None = None,
    ) -> dict[str, Any]:
        """Run ``job``; ``warm`` are started workers of the job's sandbox profile, used before cold ones.

        The results log goes to ``results_dir`` on this node, by default a scratch directory of this
        actor's; ``results`` reads it back from anywhere."""
        self._stats = RunStats()
        images = self._check_images(job)
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
            step_sandboxes = self._step_backend(job.backend).create
            step_core = self._warm_steps.pop(self._step_key(job, hub), None)
        self._runner = CoordinatorCore(
            job,
            make_fleet,
            results_dir if results_dir is not None else self._results_dir(),
            hub=hub,
            create_step_sandbox=step_sandboxes,
            step_core=step_core,
            collect_garbage=lambda: collect_garbage_on_nodes([job.backend]),
            on_progress=self._remember,
            image_check=images,
        )
        self._logs[job.name] = Path(self._runner.results_path)
        try:
            outcome = self._runner.run()
        finally:
            self._flush_steps()
        self._stats = outcome.stats
        data = dataclasses.asdict(outcome)
        return data

    def _check_images(self, job: Job) -> dict[str, Any] | None:
        """Make rayflow's own image current on every alive node, once per (image, set of nodes).

        The image is built offline where no engine has it, else moved between engines through the
        object store (:func:`actors.fleet.ensure_image_on_nodes`). Returns the ``images`` entry of the
        run's summary: what this check did per node, or, when an earlier job already checked the same
        image on the same nodes, that check's entry marked ``earlier`` (``None``: no check applies,
        e.g. another backend or image, or no Docker engine here).
        """
        if job.backend not in ("docker", "auto") or job.image != DEFAULT_TAG:
            return None
        nodes = frozenset(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        earlier = self._images_checked.get((job.image, nodes))
        if earlier is not None:
            return {**earlier, "earlier": True}
        if not docker_engine_answers():
            return None
        checked_at, started = time.time(), time.monotonic()
        records = ensure_image_on_nodes(job.image)
        summary = image_check_summary(
            job.image, records, checked_at=checked_at, seconds=time.monotonic() - started
        )
        self._images_checked[(job.image, nodes)] = summary
        return summary

    def _remember(self, stats: RunStats) -> None:
        self._stats = dataclasses.replace(stats, errors=list(stats.errors[-5:]))

    def progress(self) -> dict[str, Any]:
        return dataclasses.asdict(self._stats)

    def cancel(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
