"""The done-when of the swarm: a two-node Ray cluster, real Docker sandboxes and a real hub.

A job of the demo's fixing agent runs across both nodes (its repository only in the object store,
its coordinator on the node the driver is not on); a worker actor killed mid-job and a
non-head node lost mid-job both still give every subtask exactly once, and no container is left
behind once the job (and its garbage collection) has finished.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from rayflow.jobs.demo_codebase import decompose_codebase, generate_codebase
from rayflow.sandbox.spec import OWNER_LABEL, Limits
from rayflow.swarm.job import AgentRef, Job, TaskList
from tests.swarm_support import run_in_background, started_worker

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]

LESSONS = "demo/fixes"


@pytest.fixture(scope="module")
def cluster(ray_cluster_factory, docker_client):
    from rayflow.sandbox.image import build_sandbox_image

    build_sandbox_image()
    return ray_cluster_factory(regions=("us-west", "eu-central"), cpus_per_node=2)


@pytest.fixture(scope="module")
def swarm(cluster, tmp_path_factory):
    from rayflow.api import Swarm

    # The coordinator may run on any node; here it is kept on the head, the node no test takes away.
    state = tmp_path_factory.mktemp("swarm-docker")
    return Swarm(hub_region="us-west", state_dir=state, coordinator_region="us-west")


@pytest.fixture(scope="module")
def codebase(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codebase")
    generate_codebase(root, 10, seed=3)
    return root


def fixing_job(codebase: Path, *, workers: int = 3) -> Job:
    tasks = [{**task, "memory": True, "namespace": LESSONS} for task in decompose_codebase(codebase)]
    return Job(
        AgentRef.python("rayflow.guest.agents.fixer:fix_module", timeout_s=300),
        TaskList(tasks),
        upload=str(codebase),
        memory_namespaces=(f"{LESSONS}/*",),
        backend="docker",
        workers=workers,
        limits=Limits(cpus=0.5, memory_bytes=256 * 1024 * 1024),
    )


def rayflow_containers(docker_client, job: Job) -> list:
    return [
        c for c in docker_client.containers.list(all=True, filters={"label": OWNER_LABEL})
        if c.labels.get("rayflow.job") == job.name
    ]


def check_exactly_once(result, job: Job) -> list:
    rows = list(result.results())
    assert [r.index for r in rows] == list(range(len(job.decomposition.tasks)))
    assert len({r.subtask_id for r in rows}) == len(rows)
    return rows


def check_recovered(outcome: dict, job: Job, docker_client) -> None:
    """A job that lost a worker mid-run: it finished, every subtask passed once, no container is left."""
    assert "error" not in outcome, outcome.get("error")
    rows = check_exactly_once(outcome["result"], job)
    assert all(r.ok for r in rows)
    assert outcome["result"].summary["coordinator"]["worker_failures"] >= 1
    assert rayflow_containers(docker_client, job) == []


def test_a_fixing_job_runs_in_docker_sandboxes_on_both_nodes(
    swarm, cluster, codebase, docker_client, tmp_path
):
    """Nothing of the job lives on the workers' or the coordinator's disk: its repository is packed into
    the object store and removed from the driver's before the job runs, and its coordinator runs on
    the node the driver is not on, handing every result back through Ray. (``swarm`` started the hub.)"""
    import ray

    from rayflow.api import Swarm

    repository = Path(shutil.copytree(codebase, tmp_path / "codebase"))
    away = Swarm(hub_region="us-west", state_dir=tmp_path / "state", coordinator_region="eu-central")
    try:
        job = away.pack(fixing_job(repository))
        shutil.rmtree(repository)
        result = away.run(job, progress=False, timeout_s=600)
        coordinator_node = ray.get(away._coordinator_actor().node_id.remote())
    finally:
        away.close()
    assert coordinator_node == cluster.node_ids["eu-central"] != ray.get_runtime_context().get_node_id()
    rows = check_exactly_once(result, job)
    assert all(r.ok and r.value["passed"] for r in rows), [r.error for r in rows if not r.ok]
    assert {r.node_id for r in rows} == set(cluster.node_ids.values())
    assert all(r.sandbox_id for r in rows)
    assert rayflow_containers(docker_client, job) == []


def test_the_second_run_learns_from_the_first_through_the_hub(swarm, codebase):
    first = swarm.run(fixing_job(codebase), progress=False, timeout_s=600)
    second = swarm.run(fixing_job(codebase), progress=False, timeout_s=600)
    assert second.summary["memory_hits"] > 0
    assert second.summary["attempts"] <= first.summary["attempts"]


def test_a_worker_killed_mid_job_still_completes_every_subtask_once(swarm, codebase, docker_client):
    import ray

    job = fixing_job(codebase, workers=2)
    thread, outcome = run_in_background(swarm, job, timeout_s=600)
    ray.kill(started_worker(f"{job.name}-w001", time.monotonic() + 180, ready_timeout_s=180, swarm=swarm))
    thread.join(timeout=900)
    check_recovered(outcome, job, docker_client)


def test_losing_a_non_head_node_mid_job_still_completes_every_subtask_once(swarm, cluster, codebase, docker_client):
    import ray

    job = fixing_job(codebase, workers=3)
    thread, outcome = run_in_background(swarm, job, timeout_s=600)
    deadline = time.monotonic() + 180
    # Wait until a worker is running on the non-head node, then take that node away.
    victim_node = cluster.node_ids["eu-central"]
    while time.monotonic() < deadline:
        placed = [
            ray.get(ray.get_actor(f"{job.name}-w{i:03d}", namespace="rayflow").ready.remote(), timeout=180)
            for i in (1, 2, 3) if _exists(f"{job.name}-w{i:03d}")
        ]
        if any(info["node_id"] == victim_node for info in placed):
            break
    # ... and until the coordinator counts all three as ready, so the node takes running workers with it.
    coordinator = swarm._coordinator_actor()
    while time.monotonic() < deadline and ray.get(coordinator.progress.remote())["workers_ready"] < 3:
        thread.join(timeout=0.05)
    node = next(n for n in cluster.cluster.worker_nodes if n.node_id == victim_node)
    cluster.cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=900)
    check_recovered(outcome, job, docker_client)


def _exists(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace="rayflow")
    except ValueError:
        return False
    return True
