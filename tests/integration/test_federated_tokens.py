"""A token minted in one region is accepted in the other, and a token revoked in one region is
refused in the other, once the two hubs have synced: two real hubs (QUIC RPC, SQLite banks, EdDSA
tokens) federating over a real sync link on loopback, each on its own event loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from rayflow.errors import AuthError
from rayflow.hub.federation import FederationNode
from rayflow.hub.server import HubServer
from rayflow.sync.identity import FederationAuthority, ReplicaIdentity
from rayflow.wire.hub_client import SyncHubClient
from tests.loop_support import LoopThread, eventually

pytestmark = pytest.mark.integration

RW = ["reasoningbank:read", "reasoningbank:write"]
LATER = int(time.time()) + 3600


class Region(LoopThread):
    """A hub and its federation node on an event loop of their own."""

    def __init__(self, root: Path, name: str, authority: FederationAuthority) -> None:
        super().__init__()
        self.hub = HubServer(root / name, region=name)
        identity = ReplicaIdentity.create(authority, self.hub.bank.store.replica_id, name, not_after=LATER)
        self.node = FederationNode(
            self.hub.bank.store, identity, authority.trust(), tls_dir=str(root / name / "sync-tls")
        )
        self.call(self.hub.start())
        self.call(self.node.start())

    def client(self, token: str) -> SyncHubClient:
        return SyncHubClient.for_endpoint(self.hub.endpoint, token=token)

    def stop(self) -> None:
        self.call(self.node.close())
        self.call(self.hub.close())
        self.stop_loop()


def accepted(region: Region, token: str) -> bool:
    """Whether ``region``'s hub serves a call made with ``token``."""
    try:
        with region.client(token) as hub:
            hub.search("flaky test", k=1)
    except AuthError:
        return False
    return True


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[tuple[Region, Region]]:
    authority = FederationAuthority.generate("acme-federation")
    us, eu = Region(tmp_path, "us-west", authority), Region(tmp_path, "eu-central", authority)
    for region in (us, eu):
        region.hub.bank.create_tenant("acme")
    yield us, eu
    us.stop()
    eu.stop()


def test_a_token_minted_in_one_region_is_refused_elsewhere_until_the_hubs_federate(regions):
    us, eu = regions
    token = us.hub.issue_token("sandbox-1", "acme", ["*"], RW)
    assert accepted(us, token)
    assert not accepted(eu, token)  # eu-central has never seen us-west's signing key
    eu.run(lambda: eu.node.add_peer(us.run(us.node.peer_address)))
    assert eventually(lambda: accepted(eu, token))


def test_a_token_revoked_in_one_region_is_refused_in_every_region(regions):
    us, eu = regions
    eu.run(lambda: eu.node.add_peer(us.run(us.node.peer_address)))
    token = us.hub.issue_token("sandbox-2", "acme", ["*"], RW)
    admin = us.hub.issue_token("operator", "acme", ["*"], ["admin"])
    assert eventually(lambda: accepted(eu, token))
    claims = jwt.decode(token, options={"verify_signature": False})
    with us.client(admin) as hub:
        hub.revoke(claims["jti"], expires_at=claims["exp"], reason="sandbox torn down")
    assert not accepted(us, token)
    assert eventually(lambda: not accepted(eu, token))
    # ... and a fresh token of the same region still works there and in the other.
    fresh = us.hub.issue_token("sandbox-3", "acme", ["*"], RW)
    assert accepted(us, fresh) and accepted(eu, fresh)
