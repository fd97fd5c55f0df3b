"""A hub replica's federation membership on its own disk: its key, its credential, what it trusts,
and the peers it keeps connections to.

Why on disk: a replica restarted by Ray (``max_restarts``) must rejoin its federation with the
same identity and the same peers, without the operator who set it up. Its private key is made
here and never leaves this directory (only its public key goes to the operator, who signs a
credential for it); the key file is owner-only, as the hub's other secrets.

Layout under ``<state_dir>/federation``: ``replica.key`` (raw Ed25519, 0600), ``membership``
(msgpack: credential, trust) and ``peers`` (msgpack: the peer addresses to dial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from rayflow.errors import ConfigError, InvalidInputError
from rayflow.hub.federation import PeerAddress
from rayflow.owner_only_file import ensure_private_dir, read_owner_only, write_owner_only
from rayflow.sync.identity import FederationAuthority, FederationTrust, ReplicaCredential, ReplicaIdentity

#: Most peers one replica keeps (a federation of more regions than this is not what this is for).
MAX_PEERS = 64


class FederationFiles:
    """The files of one replica's membership (see the module docstring)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir) / "federation"

    def public_key(self) -> bytes:
        """This replica's public key, making its key pair on first use."""
        key = self._private_key()
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _private_key(self) -> Ed25519PrivateKey:
        path = self.dir / "replica.key"
        raw = read_owner_only(path, label="replica key")
        if raw is None:
            ensure_private_dir(self.dir)
            key = Ed25519PrivateKey.generate()
            write_owner_only(path, key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
            return key
        if len(raw) != 32:
            raise ConfigError(f"{path} is not a raw Ed25519 private key")
        return Ed25519PrivateKey.from_private_bytes(raw)

    def save_membership(self, credential: ReplicaCredential, trust: FederationTrust) -> ReplicaIdentity:
        """Record the operator's credential for this replica (it must name this replica's key)."""
        identity = ReplicaIdentity(credential, self._private_key())  # refuses a credential for another key
        if credential.federation != trust.federation:
            raise ConfigError("the credential and the trust name different federations")
        write_owner_only(self.dir / "membership", msgpack.packb([credential.to_wire(), trust.to_wire()]))
        return identity

    def membership(self) -> tuple[ReplicaIdentity, FederationTrust] | None:
        """The saved identity and trust, or None when this replica never joined a federation."""
        raw = read_owner_only(self.dir / "membership", label="federation membership")
        if raw is None:
            return None
        try:
            credential_wire, trust_wire = msgpack.unpackb(raw)
            credential = ReplicaCredential.from_wire(credential_wire)
            trust = FederationTrust.from_wire(trust_wire)
        except (ValueError, TypeError, InvalidInputError, msgpack.UnpackException) as exc:
            raise ConfigError(f"{self.dir / 'membership'} is damaged: {exc}") from exc
        return ReplicaIdentity(credential, self._private_key()), trust

    def save_peers(self, peers: list[PeerAddress]) -> None:
        if len(peers) > MAX_PEERS:
            raise ConfigError(f"at most {MAX_PEERS} peers per replica")
        write_owner_only(self.dir / "peers", msgpack.packb([_peer_to_wire(peer) for peer in peers]))

    def peers(self) -> list[PeerAddress]:
        raw = read_owner_only(self.dir / "peers", label="federation peers")
        if raw is None:
            return []
        try:
            return [_peer_from_wire(item) for item in msgpack.unpackb(raw)]
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ConfigError(f"{self.dir / 'peers'} is damaged: {exc}") from exc


def _peer_to_wire(peer: PeerAddress) -> list[Any]:
    return [peer.replica_id, peer.host, peer.port, peer.ca_pem, peer.server_name]


def _peer_from_wire(item: Any) -> PeerAddress:
    replica_id, host, port, ca_pem, server_name = item
    if not (
        isinstance(replica_id, str)
        and isinstance(host, str)
        and isinstance(port, int)
        and isinstance(ca_pem, bytes)
    ):
        raise TypeError("a peer is [replica id, host, port, CA PEM, server name]")
    return PeerAddress(replica_id, host, port, ca_pem, server_name if isinstance(server_name, str) else None)


def load_or_create_authority(path: Path | str, federation: str) -> FederationAuthority:
    """The federation's root key kept by the operator at ``path`` (owner-only), made on first use.

    Whoever holds this file can make members of the federation: it belongs with the operator
    (the driver's state directory, a secrets store), never on a hub's node.
    """
    path = Path(path)
    raw = read_owner_only(path, label="federation root key")
    if raw is None:
        ensure_private_dir(path.parent)
        authority = FederationAuthority.generate(federation)
        write_owner_only(path, msgpack.packb([federation, authority.private_bytes()]))
        return authority
    try:
        stored, key = msgpack.unpackb(raw)
        authority = FederationAuthority.from_private_bytes(stored, key)
    except (ValueError, TypeError, InvalidInputError, msgpack.UnpackException) as exc:
        raise ConfigError(f"{path} is not a federation root key: {exc}") from exc
    if stored != federation:
        raise ConfigError(f"{path} holds the root key of federation {stored!r}, not {federation!r}")
    return authority
