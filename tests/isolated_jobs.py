"""Swarm scenarios run as Ray jobs inside an isolated cluster, each printing what it saw as JSON.

Why a job script: an isolated cluster's nodes live in namespaces of their own, so a test on the
host is not a Ray node and cannot be a driver; it submits this script with ``ray job submit`` (as a
user would), the script runs on the head node and prints one ``SCENARIO {json}`` line for the test
to judge. The script only observes and records; every judgement is an assertion in the test.

Usage (what the test submits)::

    python tests/isolated_jobs.py {fixing,pattern-b,kill-worker,lose-node,hub-restart,federation}

``lose-node`` prints ``KILL-NODE <label>`` once a worker runs on that node and every worker is
ready, then waits for Ray to see the node dead: the test kills the node from the host
(``clusters.local kill-node``) when it reads the line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayflow.jobs.demo_codebase import decompose_codebase, generate_codebase
from rayflow.sandbox.spec import OWNER_LABEL, Limits
from rayflow.swarm.job import AgentRef, Job, TaskList
from tests.swarm_support import run_in_background, started_worker

LESSONS = "isolated/fixes"
MODULES = 6
#: The node-loss job is longer: the kill travels through the job's log stream to the host and
#: back (seconds), and must land while the node's workers are still busy.
MODULES_LONG = 18
REGION_LABEL = "rayflow/region"
NODE_LABEL = "rayflow/node"
VICTIM = "eu-central"
RW = ["reasoningbank:read", "reasoningbank:write"]


def nodes_by_region() -> dict[str, str]:
    import ray

    return {
        (n.get("Labels") or {}).get(REGION_LABEL, ""): n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and (n.get("Labels") or {}).get(REGION_LABEL)
    }


def fixing_job(codebase: Path, *, workers: int, pattern: str = "A") -> Job:
    tasks = [{**task, "memory": True, "namespace": LESSONS} for task in decompose_codebase(codebase)]
    return Job(
        AgentRef.python("rayflow.guest.agents.fixer:fix_module", timeout_s=300),
        TaskList(tasks),
        upload=str(codebase),
        memory_namespaces=(f"{LESSONS}/*",),
        backend="docker",
        workers=workers,
        limits=Limits(cpus=0.5, memory_bytes=256 * 1024 * 1024),
        pattern=pattern,
    )


def containers_left(job: Job) -> list[str]:
    """Names of this job's containers still known to the node's engine (none, once it finished)."""
    import docker

    client = docker.from_env(timeout=60)
    try:
        # The low-level list: one call, no per-container inspect that a removal could race.
        listed = client.api.containers(all=True, filters={"label": [OWNER_LABEL, f"rayflow.job={job.name}"]})
        return [name for c in listed for name in c.get("Names") or []]
    finally:
        client.close()


def describe(result: Any, job: Job) -> dict[str, Any]:
    """What a finished run left: one row per result, its summary's counters, report and containers."""
    rows = [
        {
            "index": r.index,
            "subtask_id": r.subtask_id,
            "ok": r.ok,
            "passed": bool(isinstance(r.value, dict) and r.value.get("passed")),
            "node_id": r.node_id,
            "region": r.region,
            "sandbox_id": r.sandbox_id,
            "error": r.error,
        }
        for r in result.results()
    ]
    summary = result.summary
    coordinator = summary.get("coordinator") or {}
    return {
        "job": job.name,
        "tasks": len(job.decomposition.tasks),
        "rows": rows,
        "attempts": summary.get("attempts"),
        "memory_hits": summary.get("memory_hits"),
        "memory_errors": summary.get("subtasks_with_memory_errors"),
        "worker_failures": coordinator.get("worker_failures", 0),
        "phase_spans": summary.get("phase_spans") or {},
        "health": [text for text, _ in result.health()],
        "report": result.report,
        "containers_left": containers_left(job),
    }


def finished(thread: threading.Thread, outcome: dict[str, Any], job: Job) -> dict[str, Any]:
    thread.join(timeout=1200)
    if "result" not in outcome:
        error = outcome.get("error")
        return {"error": f"{type(error).__name__}: {error}" if error else "the run did not finish in 1200 s"}
    return describe(outcome["result"], job)


# --- scenarios -------------------------------------------------------------------------------
def fixing(scratch: Path) -> dict[str, Any]:
    """Pattern A across both regions, coordinator on the node the driver is not on, repository only
    in the object store; then two more runs sharing the lessons (the second learns from the first)."""
    import ray

    from rayflow.api import Swarm

    codebase = scratch / "codebase"
    generate_codebase(codebase, MODULES, seed=3)
    away = Swarm(hub_region="us-west", coordinator_region="eu-central")
    try:
        job = away.pack(fixing_job(codebase, workers=3))
        shutil.rmtree(codebase)
        across = describe(away.run(job, progress=False, timeout_s=900), job)
        coordinator_node = ray.get(away._coordinator_actor().node_id.remote())
    finally:
        away.close()
    generate_codebase(codebase, MODULES, seed=3)
    swarm = Swarm(hub_region="us-west", coordinator_region="us-west")
    try:
        first_job, second_job = fixing_job(codebase, workers=2), fixing_job(codebase, workers=2)
        first = describe(swarm.run(first_job, progress=False, timeout_s=900), first_job)
        second = describe(swarm.run(second_job, progress=False, timeout_s=900), second_job)
    finally:
        swarm.close()
    return {
        "across": across,
        "coordinator_node": coordinator_node,
        "first": first,
        "second": second,
    }


def pattern_b(scratch: Path) -> dict[str, Any]:
    """Pattern B: decomposition and synthesis in sandboxes of the coordinator's, subtasks on both nodes."""
    from rayflow.api import Swarm

    codebase = scratch / "codebase"
    generate_codebase(codebase, MODULES, seed=5)
    swarm = Swarm(hub_region="us-west", coordinator_region="us-west")
    try:
        job = fixing_job(codebase, workers=3, pattern="B")
        return {"run": describe(swarm.run(job, progress=False, timeout_s=900), job)}
    finally:
        swarm.close()


def kill_worker(scratch: Path) -> dict[str, Any]:
    """A worker actor killed once its sandbox is up: the job still gives every subtask once."""
    import ray

    from rayflow.api import Swarm

    codebase = scratch / "codebase"
    generate_codebase(codebase, MODULES, seed=7)
    swarm = Swarm(hub_region="us-west", coordinator_region="us-west")
    try:
        job = fixing_job(codebase, workers=2)
        thread, outcome = run_in_background(swarm, job, timeout_s=900)
        victim = started_worker(f"{job.name}-w001", time.monotonic() + 300, ready_timeout_s=300, swarm=swarm)
        victim_node = ray.get(victim.ready.remote(), timeout=120)["node_id"]
        ray.kill(victim)
        return {"run": finished(thread, outcome, job), "victim_node": victim_node}
    finally:
        swarm.close()


def lose_node(scratch: Path) -> dict[str, Any]:
    """The eu-central node killed from outside while its workers run: every subtask still once."""
    import ray

    from rayflow.api import Swarm

    codebase = scratch / "codebase"
    generate_codebase(codebase, MODULES_LONG, seed=9)
    nodes = nodes_by_region()
    victim_node = nodes[VICTIM]
    label = next((n.get("Labels") or {}).get(NODE_LABEL) for n in ray.nodes() if n["NodeID"] == victim_node)
    # The coordinator and the hub stay on the head, the node the test keeps.
    swarm = Swarm(hub_region="us-west", coordinator_region="us-west")
    try:
        job = fixing_job(codebase, workers=3)
        thread, outcome = run_in_background(swarm, job, timeout_s=900)
        deadline = time.monotonic() + 300
        placed: set[str] = set()
        while victim_node not in placed and time.monotonic() < deadline:
            for i in (1, 2, 3):
                try:
                    actor = ray.get_actor(f"{job.name}-w{i:03d}", namespace="rayflow")
                except ValueError:
                    continue
                placed.add(ray.get(actor.ready.remote(), timeout=300)["node_id"])
            if victim_node not in placed:
                time.sleep(0.2)  # workers not all created yet: ask the GCS again shortly
        print(f"KILL-NODE {label}", flush=True)
        asked_at = time.monotonic()
        while time.monotonic() < deadline + 300:
            if not any(n["NodeID"] == victim_node and n.get("Alive") for n in ray.nodes()):
                break
            time.sleep(0.5)  # Ray marks the node dead once its heartbeats are missed
        lost = not any(n["NodeID"] == victim_node and n.get("Alive") for n in ray.nodes())
        lost_after = time.monotonic() - asked_at
        return {
            "lost_after_s": round(lost_after, 1),
            "run": finished(thread, outcome, job),
            "finished_after_s": round(time.monotonic() - asked_at, 1),
            "victim_node": victim_node,
            "node_lost": lost,
            "nodes": nodes,
        }
    finally:
        swarm.close()


def hub_restart(scratch: Path) -> dict[str, Any]:
    """A hub replica on the eu-central node killed and restarted by Ray: same node, same bank on
    that node's private disk, every acknowledged item served again."""
    import ray

    from actors.hub_replica import get_hub_replica
    from rayflow.api import Swarm
    from rayflow.wire.hub_client import SyncHubClient

    swarm = Swarm(hub_region="eu-central")
    hub = get_hub_replica("eu-central")

    def incarnation() -> dict[str, Any]:
        return ray.get(
            hub.__ray_call__.remote(
                lambda self: {
                    "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id(),
                    "state_dir": str(self._server.state_dir),
                    "state_files": sorted(p.name for p in self._server.state_dir.iterdir()),
                }
            ),
            timeout=180,
        )

    def client() -> SyncHubClient:
        endpoint = ray.get(hub.endpoint.remote(), timeout=180)
        token = ray.get(hub.issue_token.remote("restart", "durable", ["*"], RW), timeout=60)
        return SyncHubClient.for_endpoint(endpoint, token=token)

    before = incarnation()
    with client() as memory:
        acked = {
            memory.store_pattern(
                namespace="restart", title=f"Lesson {i}", content=f"lesson {i} about flaky test number {i}"
            )["id"]: f"Lesson {i}"
            for i in range(20)
        }
    ray.kill(hub, no_restart=False)
    deadline = time.monotonic() + 300
    after = before
    while after["pid"] == before["pid"] and time.monotonic() < deadline:
        try:
            after = incarnation()
        except ray.exceptions.RayActorError:
            time.sleep(0.2)  # between incarnations: Ray is restarting it
    with client() as memory:
        served = {item_id: memory.get(item_id)["title"] for item_id in acked}
    ray.kill(hub, no_restart=True)
    del swarm
    return {
        "before": before,
        "after": after,
        "acked": acked,
        "served": served,
        "nodes": nodes_by_region(),
        "driver_node": ray.get_runtime_context().get_node_id(),
        "driver_sees_bank": Path(before["state_dir"]).exists() and any(Path(before["state_dir"]).iterdir()),
    }


def federation(scratch: Path) -> dict[str, Any]:
    """The two regions' hubs made one federation across the emulated link: writes on both sides
    converge, a token minted in one region is served in the other."""
    import ray

    from actors.hub_replica import get_hub_replica
    from rayflow.api import Swarm
    from rayflow.errors import AuthError
    from rayflow.wire.hub_client import SyncHubClient

    regions = ["us-west", "eu-central"]
    swarms = [Swarm(hub_region=region) for region in regions]  # each starts its region's hub
    addresses = swarms[0].federate(regions, federation="isolated")
    hubs = {region: get_hub_replica(region) for region in regions}
    started = time.monotonic()
    written: dict[str, int] = {}
    for region, hub in hubs.items():
        # A tenant per region: tenant data keys are not shared between replicas yet, so a
        # replica writes only for tenants whose key it made (the others' rows it holds sealed).
        token = ray.get(hub.issue_token.remote(f"writer-{region}", f"acme-{region}", ["*"], RW), timeout=60)
        with SyncHubClient.for_endpoint(ray.get(hub.endpoint.remote(), timeout=60), token=token) as client:
            for i in range(10):
                client.store_pattern(
                    namespace="runs", title=f"{region} {i}", content=f"lesson {i} from {region}"
                )
        written[region] = 10

    def statuses() -> dict[str, Any]:
        return {r: ray.get(h.federation_status.remote(), timeout=120) for r, h in hubs.items()}

    seen = statuses()
    while time.monotonic() - started < 120 and len({s["digest"] for s in seen.values()}) > 1:
        time.sleep(0.2)  # polling the replicas while they sync over the link
        seen = statuses()
    converged_after = time.monotonic() - started
    us_token = ray.get(hubs["us-west"].issue_token.remote("roamer", "acme-us-west", ["*"], RW), timeout=60)
    try:
        with SyncHubClient.for_endpoint(
            ray.get(hubs["eu-central"].endpoint.remote(), timeout=60), token=us_token
        ) as c:
            c.health()
        served_elsewhere = True
    except AuthError:
        served_elsewhere = False
    for hub in hubs.values():
        ray.kill(hub, no_restart=True)
    return {
        "sync_hosts": {region: address.host for region, address in addresses.items()},
        "digests": {r: s["digest"] for r, s in seen.items()},
        "vectors": {r: s["version_vector"] for r, s in seen.items()},
        "peers": {r: s["peers"] for r, s in seen.items()},
        "written": written,
        "converged_after_s": round(converged_after, 2),
        "token_served_in_other_region": served_elsewhere,
    }


SCENARIOS = {
    "fixing": fixing,
    "pattern-b": pattern_b,
    "kill-worker": kill_worker,
    "lose-node": lose_node,
    "hub-restart": hub_restart,
    "federation": federation,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    from rayflow.api import init

    init(log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="isolated-job-") as scratch:
        outcome = SCENARIOS[args.scenario](Path(scratch))
    outcome["nodes"] = outcome.get("nodes") or nodes_by_region()
    print("SCENARIO " + json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
