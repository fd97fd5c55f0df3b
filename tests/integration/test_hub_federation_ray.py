"""Pattern C's memory on one Ray cluster spanning two regions: a hub replica per region, made one
federation by the operator (``Swarm.federate``), syncing over QUIC between the region nodes.

A token minted by the us-west hub is served by the eu-central hub; a write to one reaches the
other (same version vector, same state digest); a replica killed by Ray comes back on its node,
rejoins from its own disk and catches up with what was written while it was down.
"""

from __future__ import annotations

from typing import Any

import pytest

from rayflow.errors import AuthError
from rayflow.wire.hub_client import SyncHubClient
from tests.loop_support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RW = ["reasoningbank:read", "reasoningbank:write"]
REGIONS = ["us-west", "eu-central"]


@pytest.fixture(scope="module")
def federation(ray_cluster, tmp_path_factory) -> dict[str, Any]:
    import ray

    from actors.hub_replica import get_hub_replica, start_hub_replica
    from rayflow.api import Swarm

    for region in REGIONS:
        replica = start_hub_replica(region, str(tmp_path_factory.mktemp(f"hub-{region}")), detached=True)
        ray.get(replica.endpoint.remote(), timeout=120)
    swarm = Swarm(hub_region="us-west", state_dir=tmp_path_factory.mktemp("operator"))
    addresses = swarm.federate(REGIONS, federation="test-federation")
    hubs = {region: get_hub_replica(region) for region in REGIONS}
    yield {"hubs": hubs, "addresses": addresses, "swarm": swarm}
    for hub in hubs.values():
        ray.get(hub.stop.remote(), timeout=60)
        ray.kill(hub, no_restart=True)


def status(hub: Any) -> dict[str, Any]:
    import ray

    return ray.get(hub.federation_status.remote(), timeout=120)


def served(hub: Any, token: str) -> bool:
    import ray

    endpoint = ray.get(hub.endpoint.remote(), timeout=120)
    try:
        with SyncHubClient.for_endpoint(endpoint, token=token) as client:
            client.health()
    except AuthError:
        return False
    return True


def in_sync(hubs: dict[str, Any]) -> bool:
    seen = [status(hub) for hub in hubs.values()]
    return (
        len({s["digest"] for s in seen}) == 1
        and len({tuple(sorted(s["version_vector"].items())) for s in seen}) == 1
    )


def test_the_replicas_sit_on_their_region_nodes_and_identify_each_other(federation, ray_cluster):
    import ray

    hubs = federation["hubs"]
    for region, hub in hubs.items():
        assert ray.get(hub.node_id.remote(), timeout=60) == ray_cluster.node_ids[region]
    assert eventually(lambda: all(
        any(peer["identified"] for peer in status(hub)["peers"].values()) for hub in hubs.values()
    ))  # fmt: skip


def test_a_token_minted_in_one_region_is_served_in_the_other(federation):
    import ray

    us, eu = federation["hubs"]["us-west"], federation["hubs"]["eu-central"]
    token = ray.get(us.issue_token.remote("sandbox-1", "acme", ["*"], RW), timeout=60)
    assert served(us, token)
    assert eventually(lambda: served(eu, token))


def test_a_write_in_one_region_reaches_the_other_and_the_states_agree(federation):
    import ray

    us, eu = federation["hubs"]["us-west"], federation["hubs"]["eu-central"]
    token = ray.get(us.issue_token.remote("writer", "acme", ["*"], RW), timeout=60)
    endpoint = ray.get(us.endpoint.remote(), timeout=60)
    with SyncHubClient.for_endpoint(endpoint, token=token) as client:
        for i in range(5):
            client.store_pattern(namespace="runs", title=f"lesson {i}", content=f"lesson {i} about test {i}")
    us_replica = status(us)["replica_id"]
    assert eventually(
        lambda: status(eu)["version_vector"].get(us_replica, 0) == status(us)["version_vector"][us_replica]
    )
    assert eventually(lambda: in_sync(federation["hubs"]))


def test_a_replica_killed_by_ray_rejoins_from_its_disk_and_catches_up(federation):
    import ray

    us, eu = federation["hubs"]["us-west"], federation["hubs"]["eu-central"]
    before = ray.get(eu.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=60)
    ray.kill(eu, no_restart=False)
    token = ray.get(us.issue_token.remote("writer-2", "acme", ["*"], RW), timeout=60)
    endpoint = ray.get(us.endpoint.remote(), timeout=60)
    with SyncHubClient.for_endpoint(endpoint, token=token) as client:
        client.store_pattern(
            namespace="runs", title="while eu was down", content="written during the restart"
        )
    assert eventually(
        lambda: ray.get(eu.__ray_call__.remote(lambda self: __import__("os").getpid())) != before
    )
    assert eventually(lambda: in_sync(federation["hubs"]))
