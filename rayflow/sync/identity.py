"""Who a replica is to its federation: credentials signed by the federation's root key, and the
handshake proofs two replicas exchange so that each knows the other is a member.

Why not TLS client certificates: the QUIC stack (aioquic 1.7) checks a client certificate's
possession proof but not its chain, and accepts an empty one, so a server cannot rely on it to
refuse a stranger. Replicas therefore authenticate each other inside the connection, in the
sync protocol's hello: each side presents a :class:`ReplicaCredential` (its replica id, region
and Ed25519 public key, signed by the federation root) and signs a transcript holding both sides'
fresh nonces and the channel binding: the fingerprint of the responder's TLS trust anchor (its
CA certificate), which the initiator pins when it opens the connection and the responder knows
as its own, so the TLS layer has already proved that the endpoint holds a key under it. A
credential copied from a member is useless without its private key; a proof replayed from
another connection names other nonces; a proof relayed through another TLS endpoint names
another trust anchor.

Why sign-and-pin rather than a shared secret: a replica's key never leaves its node, one
replica can be revoked without re-keying the rest (:attr:`FederationTrust.revoked`), and
credentials expire (``not_after``), so a stolen disk stops working on its own.

Sans-IO: bytes in, bytes out; the clock is a parameter.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from rayflow.errors import AuthError, InvalidInputError
from rayflow.sync.vector_clock import validate_replica_id

#: Bytes of an Ed25519 public key, of a signature, and of a handshake nonce.
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 32
#: Longest federation or region name.
MAX_NAME_LENGTH = 128
#: Labels that keep a credential signature and a handshake signature from ever standing for each other.
_CREDENTIAL_LABEL = b"rayflow federation credential v1"
_TRANSCRIPT_LABEL = b"rayflow federation handshake v1"


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH:
        raise InvalidInputError(f"{what} must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
    return value


def exact_bytes(value: Any, size: int, what: str) -> bytes:
    """``value`` if it is exactly ``size`` bytes, else a typed error naming ``what``."""
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidInputError(f"{what} must be {size} bytes")
    return value


def _public(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class ReplicaCredential:
    """A federation's statement that ``replica_id`` in ``region`` holds ``public_key``, until ``not_after``."""

    federation: str
    replica_id: str
    region: str
    public_key: bytes
    not_after: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _name(self.federation, "federation")
        validate_replica_id(self.replica_id)
        _name(self.region, "region")
        exact_bytes(self.public_key, PUBLIC_KEY_BYTES, "a replica's public key")
        if isinstance(self.not_after, bool) or not isinstance(self.not_after, int) or self.not_after < 0:
            raise InvalidInputError("not_after must be a non-negative integer (unix seconds)")
        if self.signature:
            exact_bytes(self.signature, SIGNATURE_BYTES, "a credential signature")

    def signed_bytes(self) -> bytes:
        """The canonical bytes the federation root signs."""
        fields = [self.federation, self.replica_id, self.region, self.public_key, self.not_after]
        return _CREDENTIAL_LABEL + msgpack.packb(fields, use_bin_type=True)

    def to_wire(self) -> list[Any]:
        return [
            self.federation,
            self.replica_id,
            self.region,
            self.public_key,
            self.not_after,
            self.signature,
        ]

    @classmethod
    def from_wire(cls, obj: Any) -> ReplicaCredential:
        if not isinstance(obj, (list, tuple)) or len(obj) != 6:
            raise InvalidInputError("a replica credential is a list of 6 fields")
        credential = cls(*obj)
        if not credential.signature:
            raise InvalidInputError("a replica credential must be signed")
        return credential


class FederationAuthority:
    """The federation's root key: issues replica credentials (kept by the operator, not by replicas)."""

    def __init__(self, federation: str, private_key: Ed25519PrivateKey) -> None:
        self.federation = _name(federation, "federation")
        self._key = private_key

    @classmethod
    def generate(cls, federation: str) -> FederationAuthority:
        return cls(federation, Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, federation: str, raw: bytes) -> FederationAuthority:
        return cls(
            federation, Ed25519PrivateKey.from_private_bytes(exact_bytes(raw, 32, "a root private key"))
        )

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def trust(self, revoked: frozenset[str] = frozenset()) -> FederationTrust:
        """What every replica of the federation pins."""
        return FederationTrust(self.federation, self.public_key, revoked)

    def issue(self, replica_id: str, region: str, public_key: bytes, *, not_after: int) -> ReplicaCredential:
        unsigned = ReplicaCredential(self.federation, replica_id, region, public_key, not_after)
        return ReplicaCredential(
            self.federation,
            replica_id,
            region,
            public_key,
            not_after,
            self._key.sign(unsigned.signed_bytes()),
        )


@dataclass(frozen=True)
class FederationTrust:
    """What a replica pins to recognise its peers: the federation, its root key, the revoked replicas."""

    federation: str
    root_public_key: bytes
    revoked: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _name(self.federation, "federation")
        exact_bytes(self.root_public_key, PUBLIC_KEY_BYTES, "the federation root key")

    def to_wire(self) -> list[Any]:
        return [self.federation, self.root_public_key, sorted(self.revoked)]

    @classmethod
    def from_wire(cls, obj: Any) -> FederationTrust:
        if not isinstance(obj, (list, tuple)) or len(obj) != 3 or not isinstance(obj[2], (list, tuple)):
            raise InvalidInputError("a federation trust is [federation, root key, revoked replicas]")
        return cls(obj[0], obj[1], frozenset(validate_replica_id(r) for r in obj[2]))

    def check(self, credential: ReplicaCredential, *, now: float) -> None:
        """Raise :class:`AuthError` unless ``credential`` is a live credential of this federation."""
        if credential.federation != self.federation:
            raise AuthError("the peer belongs to another federation", federation=credential.federation)
        try:
            _public(self.root_public_key).verify(credential.signature, credential.signed_bytes())
        except InvalidSignature:
            raise AuthError(
                "the peer's credential is not signed by this federation", replica=credential.replica_id
            ) from None
        if credential.not_after < now:
            raise AuthError("the peer's credential has expired", replica=credential.replica_id)
        if credential.replica_id in self.revoked:
            raise AuthError("the peer replica is revoked from the federation", replica=credential.replica_id)


def new_nonce() -> bytes:
    """A fresh handshake nonce (each side sends one per connection)."""
    return secrets.token_bytes(NONCE_BYTES)


def channel_binding(trust_anchor: bytes) -> bytes:
    """What binds a handshake to one TLS endpoint: the SHA-256 of the responder's CA certificate
    (PEM or DER bytes, as the initiator pinned it and the responder holds it)."""
    return hashlib.sha256(trust_anchor).digest()


def transcript(
    federation: str,
    initiator: str,
    responder: str,
    initiator_nonce: bytes,
    responder_nonce: bytes,
    binding: bytes,
) -> bytes:
    """The bytes both replicas sign: who talks to whom, in which federation, on which channel, now."""
    fields = [
        federation,
        initiator,
        responder,
        exact_bytes(initiator_nonce, NONCE_BYTES, "the initiator's nonce"),
        exact_bytes(responder_nonce, NONCE_BYTES, "the responder's nonce"),
        exact_bytes(binding, 32, "the channel binding"),
    ]
    return _TRANSCRIPT_LABEL + msgpack.packb(fields, use_bin_type=True)


@dataclass(frozen=True)
class ReplicaIdentity:
    """A replica's own credential and private key (the key never leaves the replica's node)."""

    credential: ReplicaCredential
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        mine = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if mine != self.credential.public_key:
            raise InvalidInputError("the private key does not match the credential's public key")

    @classmethod
    def create(
        cls, authority: FederationAuthority, replica_id: str, region: str, *, not_after: int
    ) -> ReplicaIdentity:
        """A new key pair for ``replica_id`` and its credential from ``authority`` (at set-up time)."""
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(authority.issue(replica_id, region, public, not_after=not_after), key)

    @classmethod
    def from_private_bytes(cls, credential: ReplicaCredential, raw: bytes) -> ReplicaIdentity:
        return cls(
            credential, Ed25519PrivateKey.from_private_bytes(exact_bytes(raw, 32, "a replica's private key"))
        )

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def replica_id(self) -> str:
        return self.credential.replica_id

    def prove(self, signed: bytes) -> bytes:
        """This replica's signature over a handshake transcript."""
        return self.private_key.sign(signed)


def verify_proof(
    trust: FederationTrust, credential: ReplicaCredential, signed: bytes, proof: Any, *, now: float
) -> None:
    """Raise :class:`AuthError` unless ``proof`` is ``credential``'s holder signing ``signed``."""
    trust.check(credential, now=now)
    if not isinstance(proof, bytes) or len(proof) != SIGNATURE_BYTES:
        raise AuthError("the peer's handshake proof is malformed", replica=credential.replica_id)
    try:
        _public(credential.public_key).verify(proof, signed)
    except InvalidSignature:
        raise AuthError("the peer's handshake proof does not verify", replica=credential.replica_id) from None
