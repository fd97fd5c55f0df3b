"""Shared fixtures: real multi-region Ray clusters (one per test module) and a Docker client.

Why module scope: starting Ray nodes costs seconds on a two-core machine, so a test module
shares one cluster instead of paying that per test. Why real nodes: region placement is only
tested when the regions are different Ray nodes, so the cluster is built with
``ray.cluster_utils.Cluster`` (separate raylets in this machine) rather than one local node.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Set before Ray is imported anywhere: no usage reports, no warnings about import order.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
# Token authentication, with a token of this test run: Ray enables it by itself once
# ~/.ray/auth_token exists, and nodes and drivers must agree on it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

REPO_ROOT = Path(__file__).resolve().parents[1]
# `clusters` lives at the repository root and is not an installed package; pytest run from
# another directory (or as the `pytest` script) would not find it otherwise.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from actors.placement import REGION_LABEL_KEY, pin_to_region, region_resource
from clusters.local import free_tcp_port as _free_tcp_port

#: Regions of the default test cluster; a module overrides the `ray_cluster_regions` fixture to change them.
DEFAULT_TEST_REGIONS: tuple[str, ...] = ("us-west", "eu-central")
#: Small object stores: tests move tiny objects, and the machine has other work to do.
TEST_OBJECT_STORE_BYTES = 128 * 1024 * 1024


@dataclass
class RegionCluster:
    """A running local Ray cluster with one node per region and a driver connected to it."""

    address: str
    #: region name -> Ray node id (hex) of the node serving that region.
    node_ids: dict[str, str]
    cluster: Any = field(repr=False)

    @staticmethod
    def pin(region: str) -> dict[str, float]:
        """Resources to pass to ``.options(resources=...)`` so work runs in ``region``."""
        return pin_to_region(region)


def start_region_cluster(regions: Sequence[str], cpus_per_node: int = 1) -> RegionCluster:
    """Start a head node for ``regions[0]`` plus one worker node per further region, and connect.

    Each node carries the resource ``region:<name>`` and the label ``rayflow/region=<name>``,
    exactly as the ``clusters.local`` launcher tags its nodes.
    """
    import ray
    from ray.cluster_utils import Cluster

    if not regions or len(set(regions)) != len(regions):
        raise ValueError(f"regions must be non-empty and distinct, got {list(regions)}")
    if ray.is_initialized():
        # A driver left over from another module would keep this process tied to a dead cluster.
        ray.shutdown()

    def node_args(region: str) -> dict[str, Any]:
        return {
            "num_cpus": cpus_per_node,
            "num_gpus": 0,
            "resources": {region_resource(region): 1},
            "labels": {REGION_LABEL_KEY: region},
            "object_store_memory": TEST_OBJECT_STORE_BYTES,
            # Ray's fixed default (52365) would collide with any other cluster on this machine.
            "dashboard_agent_listen_port": _free_tcp_port(),
        }

    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args(regions[0]), "include_dashboard": False},
    )
    try:
        for region in regions[1:]:
            cluster.add_node(**node_args(region))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        node_ids = {}
        for node in ray.nodes():
            region = (node.get("Labels") or {}).get(REGION_LABEL_KEY)
            if node.get("Alive") and region:
                node_ids[region] = node["NodeID"]
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise
    return RegionCluster(address=cluster.address, node_ids=node_ids, cluster=cluster)


def stop_region_cluster(region_cluster: RegionCluster) -> None:
    """Disconnect the driver and stop every node of ``region_cluster``."""
    import ray

    ray.shutdown()
    region_cluster.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster_factory() -> Iterator[Callable[..., RegionCluster]]:
    """A function that starts a region cluster; all it started are stopped after the module.

    Ray allows one driver per process, so starting a second cluster stops the first one.
    """
    started: list[RegionCluster] = []

    def make(regions: Sequence[str] = DEFAULT_TEST_REGIONS, cpus_per_node: int = 1) -> RegionCluster:
        while started:
            stop_region_cluster(started.pop())
        region_cluster = start_region_cluster(regions, cpus_per_node=cpus_per_node)
        started.append(region_cluster)
        return region_cluster

    yield make
    while started:
        stop_region_cluster(started.pop())


@pytest.fixture(scope="module")
def ray_cluster_regions() -> tuple[str, ...]:
    """Regions of the module's ``ray_cluster``; override this fixture in a module to change them."""
    return DEFAULT_TEST_REGIONS


@pytest.fixture(scope="module")
def ray_cluster(
    ray_cluster_factory: Callable[..., RegionCluster], ray_cluster_regions: tuple[str, ...]
) -> RegionCluster:
    """One running multi-region cluster shared by every test of a module."""
    return ray_cluster_factory(regions=ray_cluster_regions)


def docker_is_required() -> bool:
    """True in CI and under scripts/test.sh, where a missing engine is a failure, not a skip."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("RAYFLOW_TEST_DOCKER") == "1"


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    """A Docker SDK client talking to a live engine; skips locally when there is none."""
    import requests

    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        reason = f"no Docker engine answers ({exc}); ./scripts/test.sh starts one"
        if docker_is_required():
            pytest.fail(f"{reason}; CI or RAYFLOW_TEST_DOCKER=1 requires it", pytrace=False)
        pytest.skip(reason)
    try:
        yield client
    finally:
        client.close()
