"""``SandboxWorker``: a Ray actor that owns one sandbox at a time: for its whole life, or per subtask.

A thin shell over :class:`rayflow.swarm.worker_core.WorkerCore`: the constructor provisions the sandbox
(so the actor is "ready" when its sandbox is), ``run`` executes one subtask at a time (the actor
has a single thread of execution), ``shutdown`` destroys the sandbox and ends the actor. With the
job's ``isolation="subtask"`` (carried by the plan) each subtask gets a fresh sandbox while the
core's pool prepares the next in a background thread of this actor; ``shutdown`` then destroys
both, the one in use and the one prepared or being prepared. Tokens are
minted by the region's :class:`~actors.hub_replica.HubReplica`, which holds the signing keys; the
worker never sees a key. If the actor dies without ``shutdown`` (killed, node lost), its sandboxes
stay labelled with this process as owner, and the garbage collector the coordinator runs
(:func:`actors.fleet.collect_garbage_on_nodes`) removes them once this process is gone.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import ray

from actors.hub_replica import get_hub_replica
from rayflow.auth.claims import Scope
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
        self._core = WorkerCore(
            worker_id,
            plan,
            sandboxes.create,
            hub=hub,
            mint_token=mint,
            node_id=ray.get_runtime_context().get_node_id(),
        )
        # A worker that is garbage-collected or whose process exits normally still removes its sandbox.
        self._finalizer = weakref.finalize(self, WorkerCore.close, self._core)
        self._provisioned = [event.to_dict() for event in self._core.start()]

    def ready(self) -> dict[str, Any]:
        """The provision span and where the worker lives (returns once the sandbox is ready)."""
        return {"events": self._provisioned, **self._core.describe()}

    def adopt(self, plan: WorkerPlan, worker_id: str) -> dict[str, Any]:
        """Hand this warm worker to a job (see :meth:`WorkerCore.adopt`)."""
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
