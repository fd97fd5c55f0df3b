"""``SandboxWorker``: a Ray actor that owns one sandbox at a time: for its whole life, or per subtask.

A thin shell over :class:`rayflow.swarm.worker_core.WorkerCore`: the constructor provisions the sandbox
(so the actor is "ready" when its sandbox is), ``run`` executes one subtask at a time (the actor
has a single thread of execution), ``shutdown`` destroys the sandbox and ends the actor. With the
job's ``isolation="subtask"`` (carried by the plan) each subtask gets a fresh sandbox while the
core's pool prepares the next in a background thread of this actor; ``shutdown`` then destroys
both, the one in use and the one prepared or being prepared. The job's repository comes with the
plan as an upload source: packed once on the driver into Ray's object store, fetched by this actor
(:mod:`actors.upload`) and kept for every fresh sandbox with subtask isolation. Tokens are
minted by the region's :class:`~actors.hub_replica.HubReplica`, which holds the signing keys; the
worker never sees a key. If the actor dies without ``shutdown`` (killed, node lost), its sandboxes
stay labelled with this process as owner, and the garbage collector the coordinator runs
(:func:`actors.fleet.collect_garbage_on_nodes`) removes them once this process is gone.

A start that fails with a rayflow error (a hub its sandbox cannot reach, a sandbox that cannot be
provisioned) is kept and raised by ``ready``, typed, so the coordinator counts it with its code and
where it happened; an exception out of the constructor would reach it only as an untyped actor
death. The fleet then shuts the actor down. Each worker knows its node's region (its label or
region resource, :func:`actors.placement.region_of`), and its results carry it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import ray

from actors.hub_replica import get_hub_replica
from actors.placement import region_of
from rayflow.auth.claims import Scope
from rayflow.errors import RayflowError
from rayflow.sandbox.select import select_backend
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.subtasks import Subtask

log = logging.getLogger("rayflow.actors.sandbox_worker")


def token_minter(hub_region: str, tenant: str) -> Any:
    """A :class:`~rayflow.swarm.worker_core.TokenMinter` asking the region's hub replica for tokens."""

    def mint(sub: str, namespaces: list[str], ttl_s: int) -> str:
        hub = get_hub_replica(hub_region)
        return ray.get(hub.issue_token.remote(sub, tenant, namespaces, [Scope.READ, Scope.WRITE], ttl_s))

    return mint


def node_region(node_id: str) -> str:
    """The region of this process's node: its ``rayflow/region`` label, else its region resource."""
    try:
        region = region_of(ray.get_runtime_context().get_node_labels())
    except Exception:  # noqa: BLE001 - an older Ray without node labels: read the node table
        region = ""
    if region:
        return region
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return region_of(node.get("Labels"), node.get("Resources"))
    return ""


@ray.remote(max_restarts=0, max_task_retries=0)
class SandboxWorker:
    """One worker, one sandbox in use at a time. Create it through :class:`actors.fleet.RayFleet`."""

    def __init__(
        self,
        worker_id: str,
        plan: WorkerPlan,
        backend: str,
        hub: HubEndpoint | None = None,
        hub_region: str | None = None,
        tenant: str = "default",
    ) -> None:
        sandboxes = select_backend(backend, allow_unisolated=backend == "process")
        self._backend = sandboxes
        mint = token_minter(hub_region, tenant) if hub is not None and hub_region else None
        node_id = ray.get_runtime_context().get_node_id()
        self._core = WorkerCore(
            worker_id,
            plan,
            sandboxes.create,
            hub=hub,
            mint_token=mint,
            node_id=node_id,
            region=node_region(node_id),
        )
        # A worker that is garbage-collected or whose process exits normally still removes its sandbox.
        self._finalizer = weakref.finalize(self, WorkerCore.close, self._core)
        self._start_error: RayflowError | None = None
        self._provisioned: list[dict[str, Any]] = []
        try:
            self._provisioned = [event.to_dict() for event in self._core.start()]
        except RayflowError as exc:
            self._start_error = exc  # the core closed itself; ready() reports why, typed

    def ready(self) -> dict[str, Any]:
        """The provision span and where the worker lives (returns once the sandbox is ready);
        raises the start's error when the start failed."""
        if self._start_error is not None:
            raise self._start_error
        return {"events": self._provisioned, **self._core.describe()}

    def adopt(self, plan: WorkerPlan, worker_id: str) -> dict[str, Any]:
        """Hand this warm worker to a job (see :meth:`WorkerCore.adopt`)."""
        if self._start_error is not None:
            raise self._start_error
        events = [event.to_dict() for event in self._core.adopt(plan, worker_id)]
        return {"events": events, **self._core.describe()}

    def run(self, subtask: dict[str, Any]) -> dict[str, Any]:
        result, events = self._core.run(Subtask.from_dict(subtask))
        return {"result": result.to_dict(), "events": [event.to_dict() for event in events]}

    def shutdown(self) -> None:
        """Destroy the sandbox (with subtask isolation: also the one being prepared), then end this actor."""
        try:
            self._core.close()
            # Backends that remove in the background (Docker) finish before the process goes.
            flush = getattr(self._backend, "flush", None)
            if callable(flush):
                flush(60.0)
        finally:
            ray.actor.exit_actor()
