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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="an isolated cluster needs root (namespaces, TUN devices)"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "rayflow-apart-test"
SUBNET = "100.93.0.0/16"
CONFIG = f"""
name: {NAME}
isolation: netns
subnet: {SUBNET}
head_port: 6390
object_store_mb: 100
regions:
  - {{name: us-west, nodes: 1, cpus: 1}}
  - {{name: eu-central, nodes: 1, cpus: 1}}
links:
  - {{between: [us-west, eu-central], rtt_ms: 40, loss: 0.0}}
"""

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


def _launcher(
    *args: str, state_dir: Path, config: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clusters.local",
            *args,
            "--config",
            str(config),
            "--state-dir",
            str(state_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("apart")
    config = work / "apart.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    state_dir = work / "state"
    prefix = netns_fabric.fabric_prefix(NAME)
    # A leftover of a crashed run, which `up` must clear away before it builds its own.
    subprocess.run(["ip", "netns", "add", f"{prefix}-stray"], capture_output=True, check=False)
    assert f"{prefix}-stray" in netns_fabric.leftover_namespaces(prefix)
    up = _launcher("up", state_dir=state_dir, config=config)
    assert up.returncode == 0, up.stdout + up.stderr
    status = _launcher("status", "--json", state_dir=state_dir, config=config, timeout=60)
    try:
        yield {
            "config": config,
            "state_dir": state_dir,
            "prefix": prefix,
            "up": up.stdout,
            "status_rc": status.returncode,
            "status": json.loads(status.stdout),
        }
    finally:
        down = _launcher("down", state_dir=state_dir, config=config, timeout=120)
        left = netns_fabric.leftover_namespaces(prefix)
        netns_fabric.teardown(prefix)
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == [], f"`down` left namespaces behind: {left}"
        stray = subprocess.run(["pgrep", "-f", f"rf-{prefix}|clusters.link_emulator.*{state_dir}"],
                               capture_output=True, text=True, check=False).stdout.split()  # fmt: skip
        assert stray == [], f"`down` left processes behind: {stray}"


def _node(cluster: dict[str, Any], region: str) -> dict[str, Any]:
    return next(node for node in cluster["status"]["nodes"] if node["region"] == region)


def _namespace(cluster: dict[str, Any], region: str) -> str:
    return f"{cluster['prefix']}-{region}-0"


def _round_trips(cluster: dict[str, Any], count: int = 15) -> list[str]:
    """UDP round trips from the us-west node to the eu-central node, through the emulated link."""
    eu = _node(cluster, "eu-central")["address"]
    server = subprocess.Popen(
        ["ip", "netns", "exec", _namespace(cluster, "eu-central"), sys.executable, "-m", "clusters.udp_probe",
         "serve", "9911"],  # fmt: skip
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            ["ip", "netns", "exec", _namespace(cluster, "us-west"), sys.executable, "-m", "clusters.udp_probe",
             "ping", eu, "9911", str(count), "0", "0.5"],  # fmt: skip
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
    token = cluster["state_dir"] / "ray-auth-token"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    submit = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--address",
            cluster["status"]["dashboard_url"],
            "--working-dir",
            str(tmp_path),
            "--",
            "python",
            "probe.py",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    lines = [line for line in submit.stdout.splitlines() if line.startswith("PROBE ")]
    assert submit.returncode == 0 and lines, submit.stdout[-3000:] + submit.stderr[-2000:]
    probe = json.loads(lines[0][len("PROBE ") :])

    assert probe["us"]["ip"] == _node(cluster, "us-west")["address"]
    assert probe["eu_ip"] == _node(cluster, "eu-central")["address"]
    assert probe["us"]["markers"] == []  # the eu node's /tmp is its own
    assert probe["us"]["reached_other_loopback"] is False


def test_the_demo_submitted_from_the_host_runs_on_both_regions_and_learns(cluster: dict[str, Any]) -> None:
    # The job's driver runs on the head node, whose /tmp is its own: its output goes to the
    # repository checkout, which every node of this machine shares (as an NFS home would).
    (REPO_ROOT / ".rayflow").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="demo-out-", dir=REPO_ROOT / ".rayflow"))
    token = cluster["state_dir"] / "ray-auth-token"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster["status"]["dashboard_url"],
         "--", "python", "-m", "rayflow.jobs.demo", "--modules", "6", "--workers", "2",
         "--out", str(out)],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    try:
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in output, output[-4000:]
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
    cut = _launcher(
        "partition", "us-west", "eu-central", state_dir=cluster["state_dir"], config=cluster["config"]
    )
    assert cut.returncode == 0, cut.stderr
    try:
        assert set(_round_trips(cluster, count=4)) == {"lost"}
    finally:
        healed = _launcher(
            "heal", "us-west", "eu-central", state_dir=cluster["state_dir"], config=cluster["config"]
        )
    assert healed.returncode == 0, healed.stderr
    assert "lost" not in _round_trips(cluster, count=4)


def test_partition_of_an_unknown_region_is_refused(cluster: dict[str, Any]) -> None:
    answer = _launcher(
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
