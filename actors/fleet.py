"""``RayFleet``: the coordinator's workers as ``SandboxWorker`` actors spread over the cluster.

Placement is explicit: each worker asks Ray for exactly the CPU its sandbox is limited to (a
0.5-CPU sandbox holds 0.5 of a node's CPU), optionally a region's pin resource, and uses the
``SPREAD`` strategy so a job's workers land on as many nodes as have room. Actor calls become
``concurrent.futures`` futures (``ObjectRef.future()``), which is what the Ray-free coordinator
loop waits on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.hub_replica import RAY_NAMESPACE
from actors.placement import pin_to_region, region_of
from actors.sandbox_worker import SandboxWorker
from rayflow.errors import DeadlineExceededError, RayflowError, error_from_code
from rayflow.sandbox.image_transfer import (
    DEFAULT_MAX_IMAGE_BYTES,
    EngineImage,
    ImageProbe,
    NodeImageRecord,
    plan_image_transfers,
)
from rayflow.swarm.worker_core import WorkerPlan
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.subtasks import PhaseEvent, Subtask, SubtaskResult

log = logging.getLogger("rayflow.actors.fleet")

T = TypeVar("T")
U = TypeVar("U")


def mapped(future: cf.Future[T], convert: Callable[[T], U]) -> cf.Future[U]:
    """A future resolving to ``convert(future.result())`` (or to the same exception)."""
    out: cf.Future[U] = cf.Future()

    def done(source: cf.Future[T]) -> None:
        try:
            out.set_result(convert(source.result()))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on ``out``
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


def _outcome(reply: dict[str, Any]) -> tuple[SubtaskResult, list[PhaseEvent]]:
    return SubtaskResult.from_dict(reply["result"]), [PhaseEvent.from_dict(e) for e in reply["events"]]


class RayWorker:
    """A started ``SandboxWorker`` actor."""

    def __init__(self, actor: Any, worker_id: str, node_id: str, stopping: list[Any] | None = None) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.node_id = node_id
        #: Where the shutdown call is kept, so the fleet can wait for the sandbox's removal.
        self._stopping = stopping if stopping is not None else []

    def run(self, subtask: Subtask) -> cf.Future[tuple[SubtaskResult, list[PhaseEvent]]]:
        return mapped(self.actor.run.remote(subtask.to_dict()).future(), _outcome)

    def stop(self) -> None:
        try:
            self._stopping.append(self.actor.shutdown.remote())
        except Exception:  # noqa: BLE001 - an actor already gone has nothing to stop
            log.debug("shutdown of %s could not be sent", self.worker_id, exc_info=True)


class RayFleet:
    """Starts ``SandboxWorker`` actors for one job."""

    def __init__(
        self,
        plan: WorkerPlan,
        *,
        backend: str,
        cpus: float,
        hub: HubEndpoint | None = None,
        hub_region: str | None = None,
        tenant: str = "default",
        region: str | None = None,
        warm: list[Any] | None = None,
    ) -> None:
        self._plan = plan
        #: Started ``SandboxWorker`` actors of the same sandbox profile, handed out before cold starts.
        self._warm = list(warm or [])
        self._backend = backend
        self._hub = hub
        self._hub_region = hub_region
        self._tenant = tenant
        self._options: dict[str, Any] = {"num_cpus": cpus, "scheduling_strategy": "SPREAD"}
        if region is not None:
            self._options["resources"] = pin_to_region(region)
        self.actors: dict[str, Any] = {}
        self._stopping: list[Any] = []

    def launch(self, worker_id: str) -> cf.Future[tuple[RayWorker, list[PhaseEvent]]]:
        if self._warm:
            actor = self._warm.pop()
            self.actors[worker_id] = actor
            started = actor.adopt.remote(self._plan, worker_id).future()
        else:
            actor = self._new_actor(worker_id, name=worker_id, namespace=RAY_NAMESPACE)
            self.actors[worker_id] = actor
            started = actor.ready.remote().future()
        # A worker whose start failed (a hub it cannot reach) reports why and is shut down.
        started.add_done_callback(lambda f: self._stop_failed(f, actor, worker_id))
        return mapped(started, self._started(actor, worker_id))

    def _stop_failed(self, started: cf.Future[Any], actor: Any, worker_id: str) -> None:
        if not started.cancelled() and started.exception() is not None:
            RayWorker(actor, worker_id, "", self._stopping).stop()

    def start_warm(self, count: int) -> list[Any]:
        """Start ``count`` unnamed workers ahead of any job (their sandboxes provisioning in the background).

        They are not this fleet's: a later job's fleet adopts them (``warm``) or shuts them down.
        """
        return [self._new_actor(f"warm-{uuid.uuid4().hex[:10]}") for _ in range(count)]

    def _new_actor(self, worker_id: str, **naming: Any) -> Any:
        """A ``SandboxWorker`` of this fleet's plan, placed by the fleet's options (``naming``: its Ray name)."""
        return SandboxWorker.options(**self._options, **naming).remote(
            worker_id, self._plan, self._backend, self._hub, self._hub_region, self._tenant
        )

    def _started(self, actor: Any, worker_id: str) -> Callable[[dict[str, Any]], tuple[RayWorker, list[PhaseEvent]]]:
        def started(info: dict[str, Any]) -> tuple[RayWorker, list[PhaseEvent]]:
            events = [PhaseEvent.from_dict(e) for e in info["events"]]
            return RayWorker(actor, worker_id, str(info.get("node_id") or ""), self._stopping), events

        return started

    def close(self, timeout_s: float = 120.0) -> None:
        """Shut down warm workers nobody adopted (never reused by another job), then wait until every
        stopped worker has removed its sandbox, so a finished job leaves no container behind."""
        for actor in self._warm:
            RayWorker(actor, "", "", self._stopping).stop()
        self._warm.clear()
        self.actors.clear()
        pending, self._stopping = self._stopping, []
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout_s)


@ray.remote(num_cpus=0)
def _collect_garbage(backends: list[str]) -> list[str]:
    from rayflow.sandbox.gc import collect_garbage, owner_alive_by_pid
    from rayflow.sandbox.select import select_backend

    reaped: list[str] = []
    for name in backends:
        try:
            backend = select_backend(name, allow_unisolated=name == "process")
        except Exception:  # noqa: BLE001 - a backend this node lacks has nothing to reap
            continue
        reaped.extend(collect_garbage([backend], owner_alive_by_pid))
    return reaped


@ray.remote(num_cpus=0)
def _probe_image(image: str) -> EngineImage:
    from rayflow.sandbox.image_transfer import probe_engine_image

    return probe_engine_image(image)


@ray.remote(num_cpus=0)
def _build_image(image: str) -> float:
    from rayflow.sandbox.image import build_sandbox_image

    started = time.monotonic()
    build_sandbox_image(image)
    return time.monotonic() - started


@ray.remote(num_cpus=0, num_returns=2)
def _export_image(image: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The archive and what describes it, as two objects: the caller fetches only the small one,
    and owns both (an object ``ray.put`` inside a task would die with the task's worker process)."""
    from rayflow.sandbox.image_transfer import export_image

    started = time.monotonic()
    exported = export_image(image, max_bytes=max_bytes)
    meta = {"image_hash": exported.image_hash, "size": exported.size, "seconds": time.monotonic() - started}
    return meta, exported.data


@ray.remote(num_cpus=0)
def _load_image(image: str, image_hash: str, data: bytes) -> float:
    from rayflow.sandbox.image_transfer import load_image

    started = time.monotonic()
    load_image(data, tag=image, image_hash=image_hash)
    return time.monotonic() - started


def _on_node(task: Any, node_id: str) -> Any:
    return task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def _wait(ref: Any, node_id: str, what: str, deadline: float, timeout_s: float) -> Any:
    """``ray.get(ref)`` by ``deadline``; a failure becomes a typed error naming the node and the step."""
    try:
        return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
    except ray.exceptions.GetTimeoutError:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - a task that just ended has nothing to cancel
            log.debug("cancelling %s on node %s failed", what, node_id, exc_info=True)
        raise DeadlineExceededError(
            f"{what} on node {node_id} did not finish within {timeout_s:g} s", node=node_id, timeout_s=timeout_s
        ) from None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, RayflowError):
            raise error_from_code(
                cause.code, f"{what} on node {node_id} failed: {cause.message}", **{**cause.details, "node": node_id}
            ) from cause
        raise RayflowError(
            f"{what} on node {node_id} failed: {type(cause).__name__}: {cause}", node=node_id
        ) from cause
    except ray.exceptions.RayError as exc:
        raise RayflowError(f"{what} on node {node_id} failed: {exc}", node=node_id) from exc


def _discard(ref: Any) -> None:
    """Take the error of a result nobody will use, so Ray does not log it as unhandled."""
    try:
        ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - the error was reported through the call's other result
        log.debug("unused result of a failed call dropped", exc_info=True)


def ensure_image_on_nodes(
    image: str, timeout_s: float = 900.0, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> list[NodeImageRecord]:
    """Make sure every alive node's engine holds the current sandbox image; say what it took per node.

    Every node is probed at once (which engine it uses, whether that engine holds the image
    current). Then, per engine rather than per node (nodes may share one): when some engine holds
    the image, it is exported once (at most ``max_bytes``) into Ray's object store and loaded on
    one node of each engine lacking it, in parallel; when none does, it is built on one node (offline,
    ``debootstrap``) and then moved the same way. No engine ever runs two builds of the image. Each
    node's step must end within ``timeout_s``; a failure raises a typed
    :class:`~rayflow.errors.RayflowError` naming the node and the step.
    """
    nodes = {node["NodeID"]: node for node in ray.nodes() if node.get("Alive")}
    deadline = time.monotonic() + timeout_s
    refs = {node_id: _on_node(_probe_image, node_id).remote(image) for node_id in nodes}
    probes = []
    for node_id, ref in refs.items():
        found: EngineImage = _wait(ref, node_id, f"probing the sandbox image {image}", deadline, timeout_s)
        node = nodes[node_id]
        region = region_of(node.get("Labels"), node.get("Resources"))
        probes.append(ImageProbe(node_id, region, found.engine_id, found.present, found.current, found.seconds))
    plan = plan_image_transfers(probes)
    spent = {probe.node_id: probe.seconds for probe in probes}
    moved: dict[str, int] = {}
    if plan.build_on is not None:
        ref = _on_node(_build_image, plan.build_on).remote(image)
        what = f"building the sandbox image {image}"
        spent[plan.build_on] += _wait(ref, plan.build_on, what, time.monotonic() + timeout_s, timeout_s)
    if plan.export_from is not None:
        source = plan.export_from
        meta_ref, data_ref = _on_node(_export_image, source).remote(image, max_bytes)
        try:
            meta = _wait(meta_ref, source, f"exporting the sandbox image {image}", time.monotonic() + timeout_s,
                         timeout_s)
        except RayflowError:
            _discard(data_ref)
            raise
        spent[source] += float(meta["seconds"])
        moved[source] = int(meta["size"])
        deadline = time.monotonic() + timeout_s
        loads = {
            node_id: _on_node(_load_image, node_id).remote(image, meta["image_hash"], data_ref)
            for node_id in plan.load_on
        }
        for node_id, ref in loads.items():
            what = f"loading the sandbox image {image} (exported on node {source})"
            spent[node_id] += _wait(ref, node_id, what, deadline, timeout_s)
            moved[node_id] = int(meta["size"])
    records = [
        NodeImageRecord(
            probe.node_id,
            probe.region,
            probe.engine_id,
            plan.actions[probe.node_id],
            round(spent[probe.node_id], 3),
            moved.get(probe.node_id, 0),
        )
        for probe in probes
    ]
    for record in records:
        log.info("sandbox image %s on node %s: %s in %.1f s", image, record.node_id, record.action, record.seconds)
    return records


def collect_garbage_on_nodes(backends: list[str], timeout_s: float = 120.0) -> list[str]:
    """Reap sandboxes of dead owners (killed workers) on every alive node; returns their ids."""
    refs = [
        _collect_garbage.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(backends)
        for node in ray.nodes()
        if node.get("Alive")
    ]
    reaped: list[str] = []
    for ref in refs:
        try:
            reaped.extend(ray.get(ref, timeout=timeout_s))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            # A node that died since it was listed has nothing this sweep can reach; its engine's
            # leftovers are found by the next sweep of a node sharing that engine, or die with it.
            log.warning("garbage collection on a node failed: %s", exc)
    return reaped
