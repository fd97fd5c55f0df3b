"""``HubReplica``: a Ray actor hosting one ReasoningBank hub on its node, found by region name.

A thin shell over :class:`rayflow.hub.server.HubServer`. The actor is async: the hub's QUIC server
runs on the actor's event loop, next to the actor's own methods. Its state directory is a path on
the node's disk passed at creation, so when Ray restarts the actor (``max_restarts``) the new
incarnation reopens the same SQLite bank, keys and TLS material and serves everything that was
acknowledged before. The QUIC port may change across a restart: clients ask :meth:`address` again.

Where it listens: by default on its Ray node's own address (``ray.util.get_node_ip_address()``,
evaluated on the node, again after every restart), so workers on the region's other nodes, and
their sandboxes, reach it by plain routing; its TLS certificate names that address (an IP SAN)
next to ``localhost``/``127.0.0.1`` (:func:`rayflow.rpc.tls.ensure_server_tls`), and
:meth:`HubReplica.endpoint` hands out that address with it as the name to verify. Why the node
address and not ``0.0.0.0``: the address handed out is then the one bound (nothing to advertise
apart, nothing to get wrong on a multi-homed node), and the hub is not exposed on the node's other
interfaces (Docker bridge gateways, a public NIC). Pass ``host="127.0.0.1"`` for a hub only this
machine uses; sandboxes then reach it through their gateway as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import ray

from actors.placement import pin_to_region
from rayflow.hub.federation import PeerAddress
from rayflow.hub.server import HubServer
from rayflow.sync.identity import FederationTrust, ReplicaCredential
from rayflow.wire.hub_endpoint import HubEndpoint

#: Ray namespace of rayflow's named actors.
RAY_NAMESPACE = "rayflow"


def hub_actor_name(region: str) -> str:
    """The name a region's hub replica is registered under."""
    return f"hub-{region}"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class HubReplica:
    """One hub replica. Create it with :func:`start_hub_replica`; find it with :func:`get_hub_replica`."""

    def __init__(self, state_dir: str, region: str, host: str | None = None, port: int = 0) -> None:
        # Runs on the replica's node: its address is the one the region reaches it at.
        bind = host or ray.util.get_node_ip_address()
        self._server = HubServer(state_dir, host=bind, port=port, region=region)
        self._region = region
        self._started: asyncio.Task[None] | None = None

    async def _ready(self) -> HubServer:
        # __init__ does not run on the actor's event loop; the QUIC server starts on first use.
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._server.start())
        await asyncio.shield(self._started)
        return self._server

    async def address(self) -> tuple[str, int]:
        """(host, port) of the QUIC endpoint."""
        return (await self._ready()).address

    async def ca_pem(self) -> bytes:
        """The CA certificate clients pin."""
        return (await self._ready()).ca_pem

    async def endpoint(self) -> HubEndpoint:
        """Everything a worker needs to connect: the address, the CA to pin, the region.

        The host is the address the replica is bound to (its node's, by default), reachable from
        every node of the region and from their sandboxes; ``server_name`` is that address too
        (the certificate's IP SAN), or ``localhost`` for a loopback replica.
        """
        return (await self._ready()).endpoint

    async def node_id(self) -> str:
        """The Ray node this replica runs on (its bank and state directory are on that node's disk)."""
        await self._ready()
        return ray.get_runtime_context().get_node_id()

    async def issue_token(
        self, sub: str, tenant: str, namespaces: list[str], scopes: list[str], ttl_s: int | None = None
    ) -> str:
        """Mint a token for a sandbox (the coordinator calls this; it is inside the cluster's trust)."""
        return (await self._ready()).issue_token(sub, tenant, namespaces, scopes, ttl_s)

    # -- federation (the operator's side is actors.federation.federate_hubs) ---------------------
    async def federation_key(self) -> tuple[str, bytes]:
        """(replica id, public key) of this replica, for the operator to sign a credential."""
        return (await self._ready()).federation_key()

    async def join_federation(self, credential: ReplicaCredential, trust: FederationTrust) -> PeerAddress:
        """Join with the operator's credential; returns where peers reach this replica."""
        return await (await self._ready()).join_federation(credential, trust)

    async def add_peer(self, peer: PeerAddress) -> None:
        """Keep a sync connection to ``peer`` (remembered across restarts of this actor)."""
        await (await self._ready()).add_peer(peer)

    async def federation_status(self) -> dict[str, Any]:
        """The peers this replica knows, its bank's version vector and state digest."""
        server = await self._ready()
        node = server.federation
        return {
            "replica_id": server.bank.store.replica_id,
            "peers": {} if node is None else {k: dataclasses.asdict(v) for k, v in node.peers().items()},
            "version_vector": server.bank.store.version_vector(),
            "digest": server.bank.store.state_digest(),
        }

    async def stop(self) -> None:
        """Close the QUIC server and the bank cleanly (before the actor is killed on purpose)."""
        if self._started is not None:
            await self._server.close()
            self._started = None


def start_hub_replica(
    region: str,
    state_dir: str,
    *,
    host: str | None = None,
    port: int = 0,
    detached: bool = False,
    pinned: bool = True,
) -> Any:
    """Create the named hub replica of ``region``, pinned to a node of that region.

    ``host=None`` binds the node's own address (see the module's docstring); ``"127.0.0.1"``
    keeps the replica to its machine.

    ``pinned=False`` places it anywhere: for a cluster whose nodes carry no region resources
    (a plain ``ray.init()`` on a laptop), where ``region`` is only a name.
    """
    options: dict[str, Any] = {"name": hub_actor_name(region), "namespace": RAY_NAMESPACE, "num_cpus": 0}
    if pinned:
        options["resources"] = pin_to_region(region)
    if detached:
        options["lifetime"] = "detached"
    return HubReplica.options(**options).remote(state_dir, region, host, port)


def get_hub_replica(region: str) -> Any:
    """The running hub replica of ``region`` (raises ``ValueError`` if there is none)."""
    return ray.get_actor(hub_actor_name(region), namespace=RAY_NAMESPACE)
