"""The local multi-region launcher: config validation, and a real two-region cluster driven by its CLI.

The cluster is started once for the module through ``python -m clusters.local up`` (the
command a person runs), on free ports, with its state in a temporary directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.cluster_config import ClusterSpec, RegionSpec, load_cluster_config
from clusters.local import ClusterState, driver_env, free_tcp_port, load_state
from rayflow.errors import ConfigError

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REGIONS = ("us-west", "eu-central")


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- config validation ------------------------------------------------------------------------
def test_shipped_config_describes_two_regions() -> None:
    spec = load_cluster_config(REPO_ROOT / "clusters" / "local-regions.yaml")

    assert [region.name for region in spec.regions] == ["us-west", "eu-central"]


def test_config_defaults_fill_missing_fields(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions:\n  - name: ap-south\n")

    spec = load_cluster_config(config)

    assert spec == ClusterSpec(regions=(RegionSpec(name="ap-south", nodes=1, cpus=1),))


def test_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "head_prot: 7000\nregions:\n  - name: us-west\n")

    with pytest.raises(ConfigError, match="head_prot: unknown key"):
        load_cluster_config(config)


def test_unknown_region_key_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions:\n  - name: us-west\n    cpu: 2\n")

    with pytest.raises(ConfigError, match=r"regions\[0\]\.cpu: unknown key"):
        load_cluster_config(config)


def test_duplicate_region_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions:\n  - name: us-west\n  - name: us-west\n")

    with pytest.raises(ConfigError, match="'us-west' is listed twice"):
        load_cluster_config(config)


@pytest.mark.parametrize("cpus", ["0", "-2"])
def test_non_positive_cpus_are_rejected(tmp_path: Path, cpus: str) -> None:
    config = _write(tmp_path / "c.yaml", f"regions:\n  - name: us-west\n    cpus: {cpus}\n")

    with pytest.raises(ConfigError, match=r"regions\[0\]\.cpus: must be a positive number"):
        load_cluster_config(config)


def test_boolean_is_not_a_cpu_count(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions:\n  - name: us-west\n    cpus: true\n")

    with pytest.raises(ConfigError, match="expected a whole number"):
        load_cluster_config(config)


def test_region_name_must_be_a_valid_label_value(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions:\n  - name: 'us west'\n")

    with pytest.raises(ConfigError, match=r"regions\[0\]\.name: 'us west' is not a valid name"):
        load_cluster_config(config)


def test_empty_region_list_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions: []\n")

    with pytest.raises(ConfigError, match="'regions' must be a non-empty list"):
        load_cluster_config(config)


def test_object_store_below_ray_minimum_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "object_store_mb: 10\nregions:\n  - name: us-west\n")

    with pytest.raises(ConfigError, match="object_store_mb: must be a number >= 75"):
        load_cluster_config(config)


def test_config_that_is_not_yaml_is_rejected(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "regions: [unclosed\n")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(config)


# --- a real cluster ---------------------------------------------------------------------------
def test_up_reports_a_head_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupier:
        occupier.bind(("", 0))
        occupier.listen()
        port = occupier.getsockname()[1]
        config = _write(tmp_path / "c.yaml", f"head_port: {port}\nregions:\n  - name: us-west\n")

        result = _launcher("up", config, tmp_path / "state")

    assert result.returncode == 1
    assert f"head_port {port} is already in use" in result.stderr


def _launcher(command: str, config: Path, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clusters.local",
            command,
            "--config",
            str(config),
            "--state-dir",
            str(state_dir),
        ],
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A two-region cluster started by the launcher CLI; brought down after the module."""
    work = tmp_path_factory.mktemp("cluster")
    config = _write(
        work / "regions.yaml",
        f"name: rf-test\nhead_port: {free_tcp_port()}\nobject_store_mb: 100\n"
        "regions:\n  - name: us-west\n    cpus: 1\n  - name: eu-central\n    cpus: 1\n",
    )
    state_dir = work / "state"
    started = _launcher("up", config, state_dir)
    assert started.returncode == 0, f"`up` failed:\n{started.stdout}\n{started.stderr}"
    state = load_state(state_dir)
    assert state is not None
    try:
        yield {"config": config, "state_dir": state_dir, "state": state}
    finally:
        _launcher("down", config, state_dir)


@pytest.fixture(scope="module")
def driver(launched: dict[str, Any]) -> Iterator[Any]:
    """This process connected to the launched cluster as a Ray driver."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with driver_env(launched["state_dir"]):
        ray.init(address=launched["state"].address, logging_level="WARNING", log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


def test_every_region_has_a_live_node_with_its_resource_and_label(driver: Any) -> None:
    nodes = [node for node in driver.nodes() if node["Alive"]]

    regions_seen = {
        node["Labels"]["rayflow/region"]: node["Resources"].get(f"region:{node['Labels']['rayflow/region']}")
        for node in nodes
    }
    assert regions_seen == {"us-west": 1.0, "eu-central": 1.0}


@pytest.mark.parametrize("region", REGIONS)
def test_task_pinned_to_a_region_runs_on_that_regions_node(driver: Any, region: str) -> None:
    @driver.remote(num_cpus=0)
    def node_id() -> str:
        return driver.get_runtime_context().get_node_id()

    expected = next(
        node["NodeID"]
        for node in driver.nodes()
        if node["Alive"] and node["Labels"].get("rayflow/region") == region
    )

    ran_on = driver.get(node_id.options(resources={f"region:{region}": 0.01}).remote(), timeout=120)

    assert ran_on == expected


def test_status_reports_every_node_running_and_alive(launched: dict[str, Any]) -> None:
    result = _launcher("status", launched["config"], launched["state_dir"])

    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert sorted((row[0], row[4], row[5]) for row in rows) == [
        ("eu-central", "running", "alive"),
        ("us-west", "running", "alive"),
    ]


def test_up_refuses_to_start_a_second_copy(launched: dict[str, Any]) -> None:
    result = _launcher("up", launched["config"], launched["state_dir"])

    assert result.returncode == 1
    assert "still up" in result.stderr


def test_down_stops_every_node_process(launched: dict[str, Any], driver: Any) -> None:
    # Runs last in this module: the cluster is gone afterwards.
    driver.shutdown()
    state: ClusterState = launched["state"]

    result = _launcher("down", launched["config"], launched["state_dir"])

    assert result.returncode == 0, result.stderr
    assert [node.pid for node in state.nodes if _running(node.pid)] == []
    assert load_state(launched["state_dir"]) is None
