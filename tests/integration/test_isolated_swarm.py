"""The swarm's end-to-end behaviours on an isolated two-region cluster with a 40 ms link.

Every node has its own address and its own /tmp (so its own Ray session and rayflow state); the
jobs are submitted from the host with ``ray job submit`` and run :mod:`tests.isolated_jobs` on the
head node, which prints what it saw; the tests judge it. Docker sandboxes, the real hub, the demo's
fixing agent: pattern A across both regions (coordinator on the node the driver is not on,
repository only in the object store), learning through the hub, pattern B, a worker killed mid-job,
a hub replica restarted on its node, the region hubs federating across the link, and a node
killed mid-job (``clusters.local kill-node``, last: the node stays down). One cluster for the module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.isolated_support import isolated_cluster, launcher, scenario, submit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="an isolated cluster needs root (namespaces, TUN devices)"),
]

NAME = "rayflow-swarm-apart"
SUBNET = "100.95.0.0/16"
JOB = ["python", "tests/isolated_jobs.py"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> Iterator[dict[str, Any]]:
    from rayflow.sandbox.image import build_sandbox_image

    # Built on the host, where the Debian mirror is reachable; every node's check then finds it current.
    build_sandbox_image()
    yield from isolated_cluster(tmp_path_factory, NAME, SUBNET, head_port=6391, cpus=2)


def run(cluster: dict[str, Any], name: str, **options: Any) -> dict[str, Any]:
    code, output = submit(cluster, [*JOB, name], timeout=1500, **options)
    assert code == 0, output[-5000:]
    return scenario(output)


def check_exactly_once_and_passed(run: dict[str, Any]) -> list[dict[str, Any]]:
    assert "error" not in run, run.get("error")
    rows = run["rows"]
    assert [r["index"] for r in rows] == list(range(run["tasks"]))
    assert len({r["subtask_id"] for r in rows}) == len(rows)
    assert all(r["ok"] and r["passed"] for r in rows), [r["error"] for r in rows if not r["ok"]]
    assert run["containers_left"] == []
    return rows


def test_pattern_a_runs_on_both_regions_with_its_coordinator_away_and_the_next_run_learns(
    cluster: dict[str, Any],
) -> None:
    seen = run(cluster, "fixing")
    nodes = seen["nodes"]

    across = check_exactly_once_and_passed(seen["across"])
    assert {r["node_id"] for r in across} == set(nodes.values())
    assert {r["region"] for r in across} == {"us-west", "eu-central"}
    assert all(r["sandbox_id"].startswith("dk-") for r in across)
    assert seen["coordinator_node"] == nodes["eu-central"]  # the driver runs on the us-west head
    assert any(line.startswith("Workers: ") and "in 2 region(s)" in line for line in seen["across"]["health"])
    # The image was checked on both nodes before work was placed (one engine: both current).
    image_line = "Sandbox image rayflow-sandbox:latest: current on 2 node(s) (1 engine), checked in "
    assert any(line.startswith(image_line) for line in seen["across"]["health"]), seen["across"]["health"]
    check_exactly_once_and_passed(seen["first"])
    check_exactly_once_and_passed(seen["second"])
    assert seen["second"]["memory_hits"] > 0 and seen["second"]["memory_errors"] == 0
    assert seen["second"]["attempts"] <= seen["first"]["attempts"]


def test_pattern_b_decomposes_and_synthesizes_in_sandboxes_and_fixes_every_module(
    cluster: dict[str, Any],
) -> None:
    seen = run(cluster, "pattern-b")["run"]

    check_exactly_once_and_passed(seen)
    assert seen["phase_spans"]["decompose"] == 1
    # The report is what the synthesize step returned from its sandbox (empty had it failed).
    assert f"Passed       {seen['tasks']}" in seen["report"]
    assert "Workers: " in seen["report"] and "Memory: " in seen["report"]


def test_a_worker_killed_mid_job_still_gives_every_subtask_once(cluster: dict[str, Any]) -> None:
    seen = run(cluster, "kill-worker")

    check_exactly_once_and_passed(seen["run"])
    assert seen["run"]["worker_failures"] >= 1


def test_a_hub_replica_restarted_on_its_node_serves_every_acknowledged_item_from_that_nodes_disk(
    cluster: dict[str, Any],
) -> None:
    seen = run(cluster, "hub-restart")

    assert seen["before"]["node_id"] == seen["after"]["node_id"] == seen["nodes"]["eu-central"]
    assert seen["after"]["pid"] != seen["before"]["pid"]
    assert seen["served"] == seen["acked"] and len(seen["acked"]) == 20
    assert seen["before"]["state_dir"] == seen["after"]["state_dir"]
    assert seen["before"]["state_dir"].startswith("/tmp/rayflow-state/hubs/eu-central")
    assert seen["before"]["state_files"]  # the bank and keys are on the eu-central node's disk ...
    assert (
        seen["driver_node"] == seen["nodes"]["us-west"] and not seen["driver_sees_bank"]
    )  # ... not the head's


def test_the_region_hubs_federate_across_the_link_and_converge(cluster: dict[str, Any]) -> None:
    seen = run(cluster, "federation")

    nodes = {node["region"]: node["address"] for node in cluster["status"]["nodes"]}
    assert seen["sync_hosts"] == nodes  # each replica syncs from its own node's address
    assert len(set(seen["digests"].values())) == 1, seen["digests"]
    vectors = list(seen["vectors"].values())
    assert vectors[0] == vectors[1] and sum(vectors[0].values()) >= sum(seen["written"].values())
    assert all(any(peer["identified"] for peer in peers.values()) for peers in seen["peers"].values())
    assert seen["token_served_in_other_region"]


def test_a_node_killed_mid_job_still_gives_every_subtask_once(cluster: dict[str, Any]) -> None:
    """Last in the module (pytest keeps file order): the killed node stays down until ``down``."""
    killed: list[str] = []

    def kill_when_asked(line: str) -> None:
        if line.startswith("KILL-NODE ") and not killed:
            label = line.split()[1]
            answer = launcher("kill-node", label, state_dir=cluster["state_dir"], config=cluster["config"])
            assert answer.returncode == 0, answer.stderr
            killed.append(label)

    seen = run(cluster, "lose-node", on_line=kill_when_asked)

    assert killed == ["eu-central-0"] and seen["node_lost"]
    rows = check_exactly_once_and_passed(seen["run"])
    assert seen["run"]["worker_failures"] >= 1
    assert {r["node_id"] for r in rows} >= {seen["nodes"]["us-west"]}
    status = launcher(
        "status", "--json", state_dir=cluster["state_dir"], config=cluster["config"], timeout=60
    )
    eu = next(node for node in json.loads(status.stdout)["nodes"] if node["region"] == "eu-central")
    assert not eu["running"] and not eu["alive"]
