"""Federation identity: credentials signed by the federation root, and handshake proofs bound to
nonces and the TLS channel, so that only a member holding its own key is recognised."""

from __future__ import annotations

import pytest

from rayflow.errors import AuthError, InvalidInputError
from rayflow.sync.identity import (
    FederationAuthority,
    ReplicaCredential,
    ReplicaIdentity,
    channel_binding,
    new_nonce,
    transcript,
    verify_proof,
)

NOW = 1_800_000_000
LATER = NOW + 3600


@pytest.fixture(scope="module")
def authority() -> FederationAuthority:
    return FederationAuthority.generate("acme-federation")


@pytest.fixture(scope="module")
def members(authority):
    return {
        name: ReplicaIdentity.create(authority, name, region, not_after=LATER)
        for name, region in (("hub-us", "us-west"), ("hub-eu", "eu-central"))
    }


def handshake(
    initiator: ReplicaIdentity, responder: ReplicaIdentity, binding: bytes = b""
) -> tuple[bytes, bytes, bytes]:
    """(signed transcript, initiator's proof, responder's proof) of one connection."""
    signed = transcript(
        "acme-federation", initiator.replica_id, responder.replica_id, new_nonce(), new_nonce(),
        binding or channel_binding(b"responder certificate"),
    )  # fmt: skip
    return signed, initiator.prove(signed), responder.prove(signed)


def test_members_recognise_each_other(authority, members):
    trust = authority.trust()
    us, eu = members["hub-us"], members["hub-eu"]
    signed, from_us, from_eu = handshake(us, eu)
    verify_proof(trust, us.credential, signed, from_us, now=NOW)
    verify_proof(trust, eu.credential, signed, from_eu, now=NOW)


def test_credentials_round_trip_and_survive_only_untouched(authority, members):
    trust = authority.trust()
    credential = members["hub-us"].credential
    assert ReplicaCredential.from_wire(credential.to_wire()) == credential
    trust.check(credential, now=NOW)
    wire = credential.to_wire()
    for index, forged in ((2, "eu-central"), (1, "hub-evil"), (4, LATER + 10**6)):
        tampered = ReplicaCredential.from_wire([*wire[:index], forged, *wire[index + 1 :]])
        with pytest.raises(AuthError, match="not signed"):
            trust.check(tampered, now=NOW)


def test_strangers_expired_and_revoked_replicas_are_refused(authority, members):
    stranger = ReplicaIdentity.create(FederationAuthority.generate("acme-federation"), "hub-x", "us-west",
                                      not_after=LATER)  # fmt: skip
    with pytest.raises(AuthError, match="not signed"):
        authority.trust().check(stranger.credential, now=NOW)
    other_federation = ReplicaIdentity.create(
        FederationAuthority.generate("other"), "hub-y", "us-west", not_after=LATER
    )
    with pytest.raises(AuthError, match="another federation"):
        authority.trust().check(other_federation.credential, now=NOW)
    with pytest.raises(AuthError, match="expired"):
        authority.trust().check(members["hub-us"].credential, now=LATER + 1)
    with pytest.raises(AuthError, match="revoked"):
        authority.trust(revoked=frozenset({"hub-eu"})).check(members["hub-eu"].credential, now=NOW)


def test_a_copied_credential_without_its_key_proves_nothing(authority, members):
    thief = ReplicaIdentity.create(authority, "hub-thief", "us-west", not_after=LATER)
    signed, _, _ = handshake(members["hub-us"], members["hub-eu"])
    with pytest.raises(AuthError, match="does not verify"):
        verify_proof(authority.trust(), members["hub-us"].credential, signed, thief.prove(signed), now=NOW)
    with pytest.raises(InvalidInputError):
        ReplicaIdentity(members["hub-us"].credential, thief.private_key)


def test_a_proof_from_another_connection_or_channel_does_not_verify(authority, members):
    us, eu = members["hub-us"], members["hub-eu"]
    old, from_us, _ = handshake(us, eu)
    fresh, _, _ = handshake(us, eu)
    relayed, _, _ = handshake(us, eu, binding=channel_binding(b"an attacker's certificate"))
    for signed in (fresh, relayed):
        with pytest.raises(AuthError, match="does not verify"):
            verify_proof(authority.trust(), us.credential, signed, from_us, now=NOW)
    verify_proof(authority.trust(), us.credential, old, from_us, now=NOW)
    with pytest.raises(AuthError, match="malformed"):
        verify_proof(authority.trust(), us.credential, old, "not bytes", now=NOW)


def test_keys_survive_a_round_trip_through_bytes(authority, members):
    us = members["hub-us"]
    again = ReplicaIdentity.from_private_bytes(us.credential, us.private_bytes())
    signed, _, _ = handshake(us, members["hub-eu"])
    verify_proof(authority.trust(), us.credential, signed, again.prove(signed), now=NOW)
    restored = FederationAuthority.from_private_bytes("acme-federation", authority.private_bytes())
    assert restored.public_key == authority.public_key


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        "credential",
        ["f", "r", "reg", b"k", 1, b"s"],
        ["f", "r", "reg", b"\0" * 32, -1, b"\0" * 64],
        ["f", "", "reg", b"\0" * 32, 1, b"\0" * 64],
        ["f", "r", "reg", b"\0" * 32, True, b"\0" * 64],
        ["f", "r", "reg", b"\0" * 32, 1, b""],
        ["f" * 500, "r", "reg", b"\0" * 32, 1, b"\0" * 64],
        ["f", "r", 7, b"\0" * 32, 1, b"\0" * 64],
    ],
)
def test_malformed_credentials_are_typed_errors(wire):
    with pytest.raises(InvalidInputError):
        ReplicaCredential.from_wire(wire)


def test_a_trust_round_trips_and_malformed_ones_are_typed_errors(authority):
    trust = authority.trust(revoked=frozenset({"hub-b", "hub-a"}))
    assert type(trust).from_wire(trust.to_wire()) == trust
    for wire in (None, [], ["f", b"\0" * 32], ["f", b"short", []], ["f", b"\0" * 32, [""]], ["f", b"\0" * 32, "x"]):
        with pytest.raises(InvalidInputError):
            type(trust).from_wire(wire)
