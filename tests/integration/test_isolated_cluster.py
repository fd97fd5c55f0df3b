"""An isolated local cluster: every node in network and mount namespaces of its own, regions joined
through the link emulator, driven by ``python -m clusters.local`` as a person would.

One cluster for the module (Ray start-up costs tens of seconds here). Needs root, as the launcher
does (namespaces, TUN devices, bind mounts); every address used is inside the namespaces this
test creates (a /16 of the shared address space, 100.64.0.0/10).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters import netns_fabric
from tests.isolated_support import REPO_ROOT, isolated_cluster, launcher, node_of, submit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="an isolated cluster needs root (namespaces, TUN devices)"),
]

NAME = "rayflow-apart-test"
SUBNET = "100.93.0.0/16"

#: A Ray job: a task on each region reports its node's address, and what it sees of /tmp and of
#: the other node's loopback.
PROBE_JOB = textwrap.dedent(
    """
    import json, os, socket
    import ray

    ray.init()

    @ray.remote(num_cpus=0.1)
    class LoopbackListener:
        def __init__(self):
            self.server = socket.socket()
            self.server.bind(("127.0.0.1", 0))
            self.server.listen()
            open("/tmp/probe-marker-eu", "w").write("eu")

        def port(self):
            return self.server.getsockname()[1]

    @ray.remote(num_cpus=0.1)
    def look(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            reached = True
        except OSError:
            reached = False
        return {
            "ip": ray.util.get_node_ip_address(),
            "markers": sorted(f for f in os.listdir("/tmp") if f.startswith("probe-marker")),
            "reached_other_loopback": reached,
        }

    @ray.remote(num_cpus=0.1)
    def ip():
        return ray.util.get_node_ip_address()

    listener = LoopbackListener.options(resources={"region:eu-central": 0.01}).remote()
    port = ray.get(listener.port.remote())
    us = ray.get(look.options(resources={"region:us-west": 0.01}).remote(port))
    eu_ip = ray.get(ip.options(resources={"region:eu-central": 0.01}).remote())
    print("PROBE " + json.dumps({"us": us, "eu_ip": eu_ip}))
    """
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from isolated_cluster(tmp_path_factory, NAME, SUBNET, head_port=6390)


def _namespace(cluster: dict[str, Any], region: str) -> str:
    return f"{cluster['prefix']}-{region}-0"


def _round_trips(cluster: dict[str, Any], count: int = 15) -> list[str]:
    """UDP round trips from the us-west node to the eu-central node, through the emulated link."""
    eu = node_of(cluster, "eu-central")["address"]
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            _namespace(cluster, "eu-central"),
            sys.executable,
            "-m",
            "clusters.udp_probe",
            "serve",
            "9911",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                _namespace(cluster, "us-west"),
                sys.executable,
                "-m",
                "clusters.udp_probe",
                "ping",
                eu,
                "9911",
                str(count),
                "0",
                "0.5",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        server.kill()
        server.wait()
    return client.stdout.split()


def test_up_prints_the_dashboard_and_every_nodes_address(cluster: dict[str, Any]) -> None:
    status = cluster["status"]

    assert status["dashboard_url"] in cluster["up"]
    for node in status["nodes"]:
        assert node["address"] in cluster["up"]


def test_status_reports_two_nodes_in_two_regions_with_their_own_addresses(cluster: dict[str, Any]) -> None:
    status = cluster["status"]

    assert cluster["status_rc"] == 0
    assert status["isolation"] == "netns" and status["regions"] == ["eu-central", "us-west"]
    addresses = {node["address"] for node in status["nodes"]}
    assert len(addresses) == 2
    assert all(address.startswith("100.93.") for address in addresses)
    assert all(node["alive"] and node["running"] and len(node["node_id"]) == 56 for node in status["nodes"])


def test_up_cleared_the_leftovers_of_an_earlier_run(cluster: dict[str, Any]) -> None:
    assert f"{cluster['prefix']}-stray" not in netns_fabric.leftover_namespaces(cluster["prefix"])


def test_a_job_submitted_from_the_host_sees_nodes_that_share_neither_loopback_nor_tmp(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "probe.py").write_text(PROBE_JOB, encoding="utf-8")
    code, output = submit(cluster, ["python", "probe.py"], timeout=240, working_dir=tmp_path)
    lines = [line for line in output.splitlines() if line.startswith("PROBE ")]
    assert code == 0 and lines, output[-5000:]
    probe = json.loads(lines[0][len("PROBE ") :])

    assert probe["us"]["ip"] == node_of(cluster, "us-west")["address"]
    assert probe["eu_ip"] == node_of(cluster, "eu-central")["address"]
    assert probe["us"]["markers"] == []  # the eu node's /tmp is its own
    assert probe["us"]["reached_other_loopback"] is False


def test_the_demo_submitted_from_the_host_runs_on_both_regions_and_learns(cluster: dict[str, Any]) -> None:
    # The job's driver runs on the head node, whose /tmp is its own: its output goes to the
    # repository checkout, which every node of this machine shares (as an NFS home would).
    (REPO_ROOT / ".rayflow").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="demo-out-", dir=REPO_ROOT / ".rayflow"))
    code, output = submit(
        cluster,
        ["python", "-m", "rayflow.jobs.demo", "--modules", "6", "--workers", "2", "--out", str(out)],
        timeout=900,
    )
    try:
        assert code == 0 and "succeeded" in output, output[-4000:]
        assert "Workers: 2 on 2 node(s) in 2 region(s)" in output
        runs = json.loads((out / "summary.json").read_text())["runs"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert sorted(runs) == ["memory-off", "run-1", "run-2"]
    assert all(run["passed"] == run["subtasks"] == 6 for run in runs.values())
    assert runs["run-2"]["memory_hits"] > 0 and runs["run-2"]["memory_errors"] == 0


def test_packets_between_regions_take_the_links_round_trip_time(cluster: dict[str, Any]) -> None:
    trips = _round_trips(cluster)
    measured = [float(t) * 1000.0 for t in trips if t != "lost"]

    assert len(measured) == len(trips)
    assert statistics.median(measured) >= 39.0  # the 40 ms link is on the path (precision: benchmarks)


def test_a_partition_cuts_the_regions_apart_and_heal_joins_them_again(cluster: dict[str, Any]) -> None:
    cut = launcher(
        "partition", "us-west", "eu-central", state_dir=cluster["state_dir"], config=cluster["config"]
    )
    assert cut.returncode == 0, cut.stderr
    try:
        assert set(_round_trips(cluster, count=4)) == {"lost"}
    finally:
        healed = launcher(
            "heal", "us-west", "eu-central", state_dir=cluster["state_dir"], config=cluster["config"]
        )
    assert healed.returncode == 0, healed.stderr
    assert "lost" not in _round_trips(cluster, count=4)


def test_partition_of_an_unknown_region_is_refused(cluster: dict[str, Any]) -> None:
    answer = launcher(
        "partition", "us-west", "mars", state_dir=cluster["state_dir"], config=cluster["config"]
    )

    assert answer.returncode == 1 and "unknown region 'mars'" in answer.stderr


def test_down_leaves_no_namespace_interface_route_or_process(tmp_path: Path, cluster: dict[str, Any]) -> None:
    # Checked on a cluster of its own network only (no Ray: `down` of the module's cluster runs at
    # teardown): build a fabric and an emulator as `up` does, then take them down as `down` does.
    from clusters.local import ClusterState, _forget

    fabric = netns_fabric.plan_fabric("rayflow-apart-down", [("a", 1), ("b", 1)], "100.94.0.0/16")
    netns_fabric.apply(fabric)
    state = ClusterState("rayflow-apart-down", "", "", (), isolation="netns", fabric_prefix=fabric.prefix)

    _forget(state, tmp_path)

    assert netns_fabric.leftover_namespaces(fabric.prefix) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert fabric.prefix not in links and "100.94." not in routes
