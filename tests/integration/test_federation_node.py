"""Hub replicas federating over real QUIC on loopback: real SQLite banks, real TLS, Ed25519 replica
identities; each node in its own thread's event loop, as each hub replica runs its own.

Three replicas in a full mesh write concurrently and converge to one digest; a replica stopped
and restarted from its disk catches up with what it missed; a replica of another federation
(or one revoked) gets nothing and gives nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.hub.federation import FederationNode, PeerAddress
from rayflow.ids import new_id
from rayflow.memory.store import Mutation, Store
from rayflow.sync.identity import FederationAuthority, ReplicaIdentity
from tests.loop_support import LoopThread, eventually
from tests.store_support import item_payload

pytestmark = pytest.mark.integration

LATER = int(time.time()) + 3600
CONVERGE_S = 60.0


class NodeThread(LoopThread):
    """A FederationNode on an event loop of its own thread; its store is written from the test."""

    def __init__(
        self, root: Path, identity: ReplicaIdentity, authority: FederationAuthority, **trust: Any
    ) -> None:
        super().__init__()
        self.store = Store(root / f"{identity.replica_id}.sqlite3", replica_id=identity.replica_id)
        self.node = FederationNode(
            self.store, identity, authority.trust(**trust), tls_dir=str(root / f"{identity.replica_id}-tls")
        )
        self.call(self.node.start())

    def add_peer(self, peer: PeerAddress) -> None:
        self.run(lambda: self.node.add_peer(peer))

    def stop(self) -> None:
        self.call(self.node.close())
        self.stop_loop()
        self.store.close()


def write_some(store: Store, count: int) -> None:
    for _ in range(count):
        item = new_id()
        store.commit("acme", [Mutation("item.put", item, item_payload(title=item.encode()))])
        store.commit("acme", [Mutation("counter.add", item, {"origin": store.replica_id, "uses": 1})])


@pytest.fixture
def authority() -> FederationAuthority:
    return FederationAuthority.generate("acme-federation")


@pytest.fixture
def mesh(tmp_path: Path, authority: FederationAuthority) -> Iterator[dict[str, NodeThread]]:
    nodes = {
        name: NodeThread(
            tmp_path, ReplicaIdentity.create(authority, name, region, not_after=LATER), authority
        )
        for name, region in (("hub-us", "us-west"), ("hub-eu", "eu-central"), ("hub-ap", "ap-south"))
    }
    nodes["hub-us"].store.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 1.0})])
    for name, node in nodes.items():
        for other_name, other in nodes.items():
            if name < other_name:  # one connection per pair, dialled by the smaller name
                node.add_peer(other.run(other.node.peer_address))
    yield nodes
    for node in nodes.values():
        node.stop()


def converged(nodes: dict[str, NodeThread]) -> bool:
    vectors = {tuple(sorted(n.store.version_vector().items())) for n in nodes.values()}
    digests = {n.store.state_digest() for n in nodes.values()}
    return len(vectors) == 1 and len(digests) == 1


def test_concurrent_writes_on_three_replicas_converge_to_one_digest(mesh):
    assert eventually(lambda: all(n.store.version_vector().get("hub-us") for n in mesh.values()))
    writers = [threading.Thread(target=write_some, args=(node.store, 25)) for node in mesh.values()]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert eventually(lambda: converged(mesh)), {n: x.store.version_vector() for n, x in mesh.items()}
    assert all(sum(n.store.version_vector().values()) == 1 + 3 * 50 for n in mesh.values())
    statuses = mesh["hub-us"].run(mesh["hub-us"].node.peers)
    assert {s.replica_id for s in statuses.values() if s.identified} == {"hub-eu", "hub-ap"}


def test_a_replica_restarted_from_its_disk_catches_up_with_what_it_missed(mesh, tmp_path, authority):
    assert eventually(lambda: converged(mesh))
    eu = mesh.pop("hub-eu")
    identity = eu.node.identity
    eu.stop()
    write_some(mesh["hub-us"].store, 20)
    write_some(mesh["hub-ap"].store, 20)
    back = NodeThread(tmp_path, identity, authority)  # same bank file, same identity
    mesh["hub-eu"] = back
    for name in ("hub-us", "hub-ap"):
        back.add_peer(mesh[name].run(mesh[name].node.peer_address))
    assert eventually(lambda: converged(mesh))
    assert back.store.version_vector()["hub-us"] == mesh["hub-us"].store.version_vector()["hub-us"]


def test_a_stranger_or_a_revoked_replica_gets_nothing_and_gives_nothing(mesh, tmp_path, authority):
    us = mesh["hub-us"]
    assert eventually(lambda: converged(mesh))
    write_some(us.store, 3)
    other_authority = FederationAuthority.generate("acme-federation")
    stranger = NodeThread(tmp_path, ReplicaIdentity.create(other_authority, "hub-x", "us-west", not_after=LATER),
                          other_authority)  # fmt: skip
    revoked = NodeThread(tmp_path, ReplicaIdentity.create(authority, "hub-r", "us-west", not_after=LATER),
                         authority)  # fmt: skip
    try:
        # hub-us has revoked hub-r (its credential is otherwise valid); the stranger's credential
        # is signed by another root.
        us.node.trust = authority.trust(revoked=frozenset({"hub-r"}))
        for outsider in (stranger, revoked):
            outsider.add_peer(us.run(us.node.peer_address))
        assert eventually(lambda: all(
            outsider.run(outsider.node.peers)[us.node.identity.replica_id].last_error for outsider in (stranger, revoked)
        ))  # fmt: skip
        assert stranger.store.version_vector() == {} and revoked.store.version_vector() == {}
        assert "hub-x" not in us.store.version_vector() and "hub-r" not in us.store.version_vector()
    finally:
        stranger.stop()
        revoked.stop()


class SilentPeer:
    """A QUIC client of the sync port that never says who it is (a LinkHandler)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def opened(self, link: Any) -> None:
        link.send(b"")  # nothing: the stream exists but carries no hello

    def received(self, data: bytes) -> None:
        return None

    def lost(self, reason: str) -> None:
        self.reason = reason


def test_silent_or_surplus_connections_are_closed_and_the_node_keeps_serving(tmp_path, authority):
    from rayflow.rpc.stream_link import open_link

    us = NodeThread(
        tmp_path, ReplicaIdentity.create(authority, "hub-us", "us-west", not_after=LATER), authority
    )
    eu = NodeThread(
        tmp_path, ReplicaIdentity.create(authority, "hub-eu", "eu-central", not_after=LATER), authority
    )
    try:
        us.node.handshake_timeout_s, us.node.max_connections = 1.0, 2
        us.store.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 1.0})])
        host, port = us.node.address
        silent = [SilentPeer() for _ in range(3)]
        for peer in silent:
            eu.call(open_link(peer, host, port, ca_pem=us.node.ca_pem))
        assert eventually(lambda: all(peer.reason for peer in silent), 30)
        reasons = sorted(str(peer.reason) for peer in silent)
        assert any("too many" in reason for reason in reasons), reasons
        assert sum("no proof of identity" in reason for reason in reasons) == 2, reasons
        eu.add_peer(us.run(us.node.peer_address))  # a member is still served
        assert eventually(lambda: eu.store.version_vector() == us.store.version_vector())
    finally:
        us.stop()
        eu.stop()
