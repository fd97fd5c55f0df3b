"""The swarm on a real two-node Ray cluster: placement, exactly-once results, a worker killed mid-job,
a repository that only the object store holds, and a coordinator on the node the driver is not on.

Sandboxes here come from the process backend so the Ray behaviour is tested on every machine;
the same flows with Docker sandboxes, a node lost mid-job and pattern B run on an isolated
two-region cluster in ``test_isolated_swarm.py``.
"""

from __future__ import annotations

import shutil
import time

import pytest

from rayflow.errors import ConfigError
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.sandbox.spec import Limits
from rayflow.swarm.job import AgentRef, FileGlob, Job, TaskList
from tests.swarm_support import run_in_background

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Real CPU work of a few hundred milliseconds, so a job lasts long enough to be interrupted.
WORK = "python3 -c 'import json,sys; t=json.load(sys.stdin); print(sum(i*i for i in range(1500000)), t[\"n\"])'"

#: Prints the file its task names, read in the sandbox's copy of the repository.
CAT_PATH = "python3 -c 'import json,sys; print(open(json.load(sys.stdin)[\"path\"]).read())'"
#: Prints its task's number.
ECHO_N = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"n\"])'"


@pytest.fixture(scope="module")
def swarm(ray_cluster, tmp_path_factory):
    from rayflow.api import Swarm

    return Swarm(hub_region="us-west", state_dir=tmp_path_factory.mktemp("swarm-state"))


def test_job_runs_every_subtask_once_across_both_nodes(swarm, ray_cluster):
    job = Job(AgentRef.shell(WORK), TaskList([{"n": i} for i in range(8)]), backend="process", workers=3,
              limits=Limits(cpus=0.5))
    result = swarm.run(job, progress=False)
    rows = list(result.results())
    assert [r.index for r in rows] == list(range(8))
    assert all(r.ok for r in rows)
    assert {r.node_id for r in rows} == set(ray_cluster.node_ids.values())
    assert all(r.output_tail.strip().endswith(str(r.index)) for r in rows)


def test_results_are_recorded_in_the_hub_namespace_of_the_job(swarm):
    from rayflow.wire.hub_client import SyncHubClient

    job = Job(AgentRef.shell(WORK), TaskList([{"n": i} for i in range(3)]), backend="process", workers=2,
              limits=Limits(cpus=0.5))
    swarm.run(job, progress=False)
    import ray

    endpoint = swarm.endpoint()
    token = ray.get(swarm.hub.issue_token.remote("reader", job.tenant, [job.results_scope],
                                                  ["reasoningbank:read"]))
    with SyncHubClient.for_endpoint(endpoint, token=token) as hub:
        hits = hub.search("result of", k=10, namespace=job.results_namespace, domain="swarm-result")
    assert sorted(hit["item"]["source_task"] for hit in hits) == [f"{job.name}-{i:05d}" for i in range(3)]


def test_glob_decomposition_gives_one_subtask_per_matching_file(swarm, tmp_path):
    repo = tmp_path / "repo"
    for name in ("a.py", "b.py", "pkg/c.py", "notes.txt", ".hidden/d.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(f"# {name}\n")
    job = Job(AgentRef.shell("python3 -c 'import json,sys; print(open(json.load(sys.stdin)[\"path\"]).read())'"),
              FileGlob(str(repo), "**/*.py"), backend="process", workers=2, limits=Limits(cpus=0.5))
    result = swarm.run(job, progress=False)
    rows = list(result.results())
    assert [r.output_tail.strip() for r in rows] == ["# a.py", "# b.py", "# pkg/c.py"]


def test_a_repository_removed_from_the_driver_after_packing_still_reaches_every_subtask(swarm, tmp_path):
    """As if the workers' nodes never had the driver's directory: the job is packed into the object
    store, the directory is removed, and every subtask (each in a fresh sandbox) still reads it."""
    repo = tmp_path / "repo"
    for name in ("a.py", "pkg/b.py", "c.py", "notes.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(f"# {name}\n")
    job = Job(AgentRef.shell(CAT_PATH), FileGlob(str(repo), "**/*.py"), backend="process", workers=2,
              limits=Limits(cpus=0.5), isolation="subtask")
    packed = swarm.pack(job)
    shutil.rmtree(repo)
    rows = list(swarm.run(packed, progress=False).results())
    assert [r.output_tail.strip() for r in rows] == ["# a.py", "# c.py", "# pkg/b.py"]
    assert len({r.sandbox_id for r in rows}) == 3


def test_a_repository_above_the_upload_limit_is_refused_before_anything_runs(swarm, tmp_path):
    from rayflow.api import Swarm

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "blob.bin").write_bytes(b"x" * 4096)
    small = Swarm(hub_region="us-west", state_dir=swarm.state_dir, max_upload_bytes=1024)
    job = Job(AgentRef.shell("true"), TaskList([{}]), upload=str(repo), backend="process", workers=1)
    with pytest.raises(ConfigError, match="4096 bytes"):
        small.run(job, progress=False)
    assert small._coordinator is None


def test_the_hub_a_driver_started_outlives_that_driver_for_the_next_one(ray_cluster, tmp_path):
    """A hub is the cluster's service: the driver that happened to start it may exit (a finished
    `ray job submit`, a notebook closed) while later drivers keep using it by name."""
    import subprocess
    import sys

    import ray
    from ray._private.state import actors as actor_table  # the state API needs a dashboard

    from actors.hub_replica import get_hub_replica

    region = "driver-started"
    first_driver = (
        "import sys\n"
        "from rayflow.api import Swarm, init\n"
        "init(sys.argv[1], log_to_driver=False)\n"
        "Swarm(hub_region=sys.argv[2], state_dir=sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", first_driver, ray_cluster.address, region, str(tmp_path / "state")],
        check=True, timeout=180, capture_output=True,
    )
    hub = get_hub_replica(region)
    endpoint = ray.get(hub.endpoint.remote(), timeout=120)
    assert actor_table(hub._actor_id.hex())["IsDetached"]
    assert endpoint.region == region and endpoint.port > 0
    ray.kill(hub, no_restart=True)


def test_a_coordinator_on_the_other_node_returns_every_result_to_the_driver(ray_cluster, tmp_path):
    import ray

    from rayflow.api import Swarm

    away = Swarm(hub_region="us-west", state_dir=tmp_path / "state", coordinator_region="eu-central")
    job = Job(AgentRef.shell(ECHO_N), TaskList([{"n": i} for i in range(6)]), backend="process", workers=2,
              limits=Limits(cpus=0.5))
    try:
        result = away.run(job, progress=False)
        coordinator_node = ray.get(away._coordinator_actor().node_id.remote())
    finally:
        away.close()  # the coordinator and its own copy of the log are gone: the driver reads its own
    assert coordinator_node == ray_cluster.node_ids["eu-central"] != ray.get_runtime_context().get_node_id()
    rows = list(result.results())
    assert [r.index for r in rows] == list(range(6))
    assert all(r.ok and r.output_tail.strip() == str(r.index) for r in rows)
    assert result.summary["subtasks"] == 6 and result.summary["ok"] == 6
    assert len(result.events) > 0 and "Passed       6" in result.report
    assert (tmp_path / "state" / "jobs" / f"{job.name}.jsonl").is_file()


def test_a_worker_killed_mid_job_still_gives_every_subtask_exactly_once(swarm, tmp_path):
    import ray

    started = tmp_path / "started.log"
    # Each run notes which worker runs it before working, so the test kills a worker mid-subtask.
    agent = f"echo $RAYFLOW_WORKER >> {started}; {WORK}"
    job = Job(AgentRef.shell(agent), TaskList([{"n": i} for i in range(10)]), backend="process", workers=2,
              limits=Limits(cpus=0.5))
    runner, outcome = run_in_background(swarm, job)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (started.exists() and started.read_text().strip()):
        runner.join(timeout=0.05)
    victim = started.read_text().split()[0]
    ray.kill(ray.get_actor(victim, namespace="rayflow"))
    runner.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    rows = list(result.results())
    assert [r.index for r in rows] == list(range(10))
    assert all(r.ok for r in rows)
    coordinator = result.summary.get("coordinator") or {}
    assert coordinator.get("worker_failures", 0) >= 1
    assert ProcessBackend().owned() == []


def test_a_swarm_pinned_to_a_region_places_every_worker_there(swarm, ray_cluster, tmp_path):
    from rayflow.api import Swarm

    pinned = Swarm(hub_region="us-west", state_dir=swarm.state_dir, region="eu-central")
    try:
        job = Job(AgentRef.shell(WORK), TaskList([{"n": i} for i in range(4)]), backend="process", workers=2,
                  limits=Limits(cpus=0.5))
        rows = list(pinned.run(job, progress=False).results())
    finally:
        pinned.close()
    assert {r.node_id for r in rows} == {ray_cluster.node_ids["eu-central"]}


def test_pattern_b_through_the_coordinator_actor_decomposes_and_synthesizes_in_a_sandbox(swarm, tmp_path):
    repo = tmp_path / "repo"
    for name in ("one.py", "two.py", "skip.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(f"# {name}\n")
    job = Job(AgentRef.shell("cat"), FileGlob(str(repo), "*.py"), backend="process", workers=2,
              limits=Limits(cpus=0.5), pattern="B")
    result = swarm.run(job, progress=False)
    assert [r.value for r in result.results()] == [None, None]
    assert result.summary["subtasks"] == 2 and result.summary["ok"] == 2
    assert result.summary["phase_spans"]["decompose"] == 1
    assert "Passed       2" in result.report
    assert ProcessBackend().owned() == []
