"""The operator's side of a federation on one Ray cluster: make the region hubs members and join
them in a full mesh.

Each replica makes its own key pair on its own node (:meth:`HubReplica.federation_key`); only its
public key comes here, where the federation's root key signs a credential for it; the replica
saves the credential and starts its sync endpoint; then every pair of replicas is connected once
(the replica earlier in the list dials; sync runs both ways on one connection). Replicas remember
their membership and peers on their own disk, so Ray restarting one needs nothing from here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray

from actors.hub_replica import get_hub_replica
from rayflow.hub.federation import PeerAddress
from rayflow.sync.identity import FederationAuthority

#: How long a replica credential is valid (re-run the federation to renew).
DEFAULT_CREDENTIAL_S = 30 * 24 * 3600


def federate_hubs(
    regions: Sequence[str],
    authority: FederationAuthority,
    *,
    valid_s: int = DEFAULT_CREDENTIAL_S,
    timeout_s: float = 120.0,
) -> dict[str, PeerAddress]:
    """Make the hub replicas of ``regions`` members of ``authority``'s federation and connect
    them pairwise; returns each region's sync address. Running it again renews credentials."""
    if len(set(regions)) != len(regions) or len(regions) < 2:
        raise ValueError(f"a federation needs two or more distinct regions, got {list(regions)}")
    replicas = {region: get_hub_replica(region) for region in regions}
    keys = dict(
        zip(regions, ray.get([r.federation_key.remote() for r in replicas.values()], timeout=timeout_s))
    )
    not_after = int(time.time()) + valid_s
    trust = authority.trust()
    joined = ray.get(
        [
            replicas[region].join_federation.remote(
                authority.issue(replica_id, region, public_key, not_after=not_after), trust
            )
            for region, (replica_id, public_key) in keys.items()
        ],
        timeout=timeout_s,
    )
    addresses = dict(zip(regions, joined))
    ray.get(
        [
            replicas[first].add_peer.remote(addresses[second])
            for i, first in enumerate(regions)
            for second in regions[i + 1 :]
        ],
        timeout=timeout_s,
    )
    return addresses
