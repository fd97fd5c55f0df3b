"""A sync session authenticates its peer with the federation identity before anything is synced.

Each hostile peer here is played either by a real :class:`PeerSession` with something wrong in
its set-up (a relay's channel binding, a revoked or expired credential, a confused role) or by
hand, with frames built as an attacker would build them (a stranger's credential, a stolen
credential with another key, a replayed proof, messages out of place). Every refusal must be a
:class:`ProtocolError` with a typed error, then :class:`Closed` and a Goodbye; the victim must
deliver nothing, identify nobody, and send nothing but its Hello, its Proof and that Goodbye.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayflow.errors import AuthError, ConfigError, InvalidInputError, PermissionDeniedError, RayflowError
from rayflow.sync.delta import Delta
from rayflow.sync.identity import (
    FederationAuthority,
    ReplicaIdentity,
    channel_binding,
    new_nonce,
    transcript,
)
from rayflow.sync.messages import (
    PROTOCOL_VERSION,
    Ack,
    Deltas,
    Goodbye,
    Hello,
    Message,
    Notify,
    Proof,
    Pull,
    decode_message,
    frame_message,
    frame_reader,
)
from rayflow.sync.peer_session import (
    Closed,
    DeltasReceived,
    PeerIdentified,
    PeerSession,
    ProtocolError,
    SessionState,
)
from rayflow.sync.vector_clock import VectorClock
from tests.clock_support import SteppedClock

FEDERATION = "acme-federation"
NOW = 1_800_000_000
LATER = NOW + 3600
#: The federation's root and its members, made once for the module.
AUTHORITY = FederationAuthority.generate(FEDERATION)
TRUST = AUTHORITY.trust()
US = ReplicaIdentity.create(AUTHORITY, "hub-us", "us-west", not_after=LATER)
EU = ReplicaIdentity.create(AUTHORITY, "hub-eu", "eu-central", not_after=LATER)
#: A member of the federation that would pass for another one.
MALLORY = ReplicaIdentity.create(AUTHORITY, "hub-mallory", "us-east", not_after=LATER)
#: hub-us opens the connections here; hub-eu accepts them, under its own CA.
EU_CA = b"-----BEGIN CERTIFICATE-----\nhub-eu's CA\n-----END CERTIFICATE-----\n"
BINDING = channel_binding(EU_CA)


class Log:
    """A replica's change log (the session's delta source), with one change of its own."""

    def __init__(self, replica_id: str) -> None:
        self.entries = [Delta(replica_id, 1, "acme", VectorClock(), b"secret of " + replica_id.encode())]

    def head(self) -> VectorClock:
        return VectorClock.of({d.origin: d.seq for d in self.entries})

    def deltas_after(self, vector: VectorClock, max_bytes: int) -> list[Delta]:
        return [d for d in self.entries if d.seq > vector.get(d.origin)]


def _session(me: ReplicaIdentity = EU, role: str = "responder", **options: Any) -> PeerSession:
    arguments = {"identity": me, "trust": TRUST, "role": role, "binding": BINDING, "clock": lambda: NOW}
    log = Log(me.replica_id)
    return PeerSession(log, VectorClock(), **{**arguments, **options})


def _messages(data: bytes) -> list[Message]:
    return [decode_message(body) for body in frame_reader().feed(data)]


def _events(session: PeerSession) -> list[object]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def _pump(a: PeerSession, b: PeerSession) -> dict[PeerSession, list[Message]]:
    """Connect ``a`` and carry bytes both ways until both are quiet; what each side sent."""
    a.connect()
    sent: dict[PeerSession, list[Message]] = {a: [], b: []}
    for _ in range(20):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                sent[src] += _messages(data)
                dst.receive(data)
        if not moved:
            return sent
    raise AssertionError("the sessions did not settle")


def _hello(
    identity: ReplicaIdentity = US, nonce: bytes | None = None, *, replica_id: str | None = None
) -> Hello:
    replica_id = identity.replica_id if replica_id is None else replica_id
    return Hello(
        replica_id,
        FEDERATION,
        PROTOCOL_VERSION,
        VectorClock(),
        10_000,
        identity.credential,
        nonce or new_nonce(),
    )


def _answer(victim: PeerSession, hello: Hello) -> bytes:
    """Deliver the attacker's ``hello`` to ``victim`` (the responder); return the victim's nonce."""
    victim.receive(frame_message(hello))
    sent = _messages(victim.data_to_send())
    assert [type(m) for m in sent] == [Hello, Proof], sent
    return sent[0].nonce


def _refused(
    session: PeerSession, error_type: type[RayflowError], match: str = "", sent: list[Message] | None = None
) -> ProtocolError:
    """``session`` refused its peer with one typed error, closed, delivered nothing and sent nothing of its log."""
    events = _events(session)
    failures = [e for e in events if isinstance(e, ProtocolError)]
    assert len(failures) == 1 and type(failures[0].error) is error_type, events
    assert match in failures[0].reason
    assert events[-1] == Closed(failures[0].reason, "local")
    assert not any(isinstance(e, (PeerIdentified, DeltasReceived)) for e in events), events
    assert session.closed and session.peer_id is None
    sent = (sent or []) + _messages(session.data_to_send())
    assert isinstance(sent[-1], Goodbye) and sent[-1].reason == failures[0].reason
    assert all(isinstance(m, (Hello, Proof, Goodbye)) for m in sent), sent
    assert session.stats.deltas_sent == 0 and session.stats.deltas_received == 0
    return failures[0]


# --- the happy path -------------------------------------------------------------------------------
def test_members_authenticate_each_other_then_sync():
    us, eu = _session(US, "initiator", expected_peer="hub-eu"), _session(EU, "responder")
    us.connect()
    eu.receive(us.data_to_send())
    # eu answered with its Hello and Proof, and waits for us's Proof before it trusts anything.
    assert eu.state is SessionState.PROVING and eu.peer_id is None and _events(eu) == []
    sent = _pump(us, eu)
    assert [type(m) for m in sent[us][:1]] == [Proof]  # after its Hello, sent above
    assert [type(m) for m in sent[eu][:2]] == [Hello, Proof]
    for session, peer in ((us, "hub-eu"), (eu, "hub-us")):
        events = _events(session)
        assert events[0] == PeerIdentified(peer, VectorClock())
        [received] = [e.deltas for e in events if isinstance(e, DeltasReceived)]
        assert received[0].origin == peer
        assert session.state is SessionState.ESTABLISHED and session.peer_id == peer


def test_a_local_change_before_the_peer_proved_itself_is_not_sent():
    eu = _session()
    hello = _hello()
    eu_nonce = _answer(eu, hello)
    eu.local_changed()
    assert eu.data_to_send() == b""
    signed = transcript(FEDERATION, "hub-us", "hub-eu", hello.nonce, eu_nonce, BINDING)
    eu.receive(frame_message(Proof(US.prove(signed))))
    assert _events(eu) == [PeerIdentified("hub-us", VectorClock())]
    [deltas] = _messages(eu.data_to_send())
    assert isinstance(deltas, Deltas) and [d.origin for d in deltas.deltas] == ["hub-eu"]


# --- who the peer is ------------------------------------------------------------------------------
def test_a_stranger_is_refused_before_the_responder_shows_or_signs_anything():
    stranger = ReplicaIdentity.create(
        FederationAuthority.generate(FEDERATION), "hub-us", "us-west", not_after=LATER
    )
    eu = _session()
    eu.receive(frame_message(_hello(stranger)))
    answer = _messages(eu.data_to_send())
    assert [type(m) for m in answer] == [Goodbye]  # no Hello (no credential shown), no Proof
    failure = _refused(eu, AuthError, "not signed by this federation", answer)
    assert failure.error.details == {"replica": "hub-us"}


def test_an_initiator_does_not_prove_itself_to_a_stranger():
    stranger = ReplicaIdentity.create(
        FederationAuthority.generate(FEDERATION), "hub-eu", "eu-central", not_after=LATER
    )
    us = _session(US, "initiator")
    us.connect()
    sent = _messages(us.data_to_send())
    us.receive(frame_message(_hello(stranger)))
    sent += _messages(us.data_to_send())
    assert [type(m) for m in sent] == [Hello, Goodbye]
    _refused(us, AuthError, "not signed", sent)


def test_a_peer_of_another_federation_is_refused():
    other = FederationAuthority.generate("other-federation")
    eu = _session()
    hello = _hello(ReplicaIdentity.create(other, "hub-us", "us-west", not_after=LATER))
    eu.receive(frame_message(dataclasses.replace(hello, federation="other-federation")))
    _refused(eu, PermissionDeniedError, "another federation")
    # The same credential in a Hello that claims our federation fails the credential check instead.
    eu = _session()
    eu.receive(frame_message(hello))
    _refused(eu, AuthError, "another federation")


def test_an_expired_credential_is_refused():
    old = ReplicaIdentity.create(AUTHORITY, "hub-old", "us-west", not_after=NOW - 1)
    eu = _session()
    eu.receive(frame_message(_hello(old)))
    _refused(eu, AuthError, "expired")


def test_a_credential_that_expires_during_the_handshake_is_refused_at_the_proof():
    brief = ReplicaIdentity.create(AUTHORITY, "hub-brief", "us-west", not_after=NOW + 5)
    clock = SteppedClock(NOW)
    us, eu = _session(brief, "initiator", clock=clock), _session(clock=clock)
    us.connect()
    eu.receive(us.data_to_send())
    us.receive(eu.data_to_send())
    clock.now = NOW + 6
    eu.receive(us.data_to_send())
    _refused(eu, AuthError, "expired")


def test_a_revoked_replica_is_refused():
    us, eu = _session(US, "initiator"), _session(trust=AUTHORITY.trust(revoked=frozenset({"hub-us"})))
    us.connect()
    eu.receive(us.data_to_send())
    answer = eu.data_to_send()
    _refused(eu, AuthError, "revoked", _messages(answer))
    # The revoked side learns why, and is not identified either.
    us.receive(answer)
    events = _events(us)
    assert events == [Closed("the peer replica is revoked from the federation", "peer")]


def test_a_hello_naming_another_replica_than_its_credential_is_refused():
    eu = _session()
    eu.receive(frame_message(_hello(MALLORY, replica_id="hub-us")))
    failure = _refused(eu, AuthError, "another replica than its credential")
    assert failure.error.details == {"hello": "hub-us", "credential": "hub-mallory"}


def test_a_member_is_refused_where_another_replica_is_expected():
    us = _session(US, "initiator", expected_peer="hub-eu")
    us.connect()
    sent = _messages(us.data_to_send())
    us.receive(frame_message(_hello(MALLORY)))
    assert _refused(us, AuthError, "expected", sent).error.details["got"] == "hub-mallory"


# --- what the peer proves -------------------------------------------------------------------------
def test_a_stolen_credential_presented_with_another_key_does_not_prove_itself():
    thief = ReplicaIdentity.create(AUTHORITY, "hub-thief", "us-west", not_after=LATER)
    eu = _session()
    hello = _hello(US)  # hub-us's credential, public, copied
    eu_nonce = _answer(eu, hello)
    signed = transcript(FEDERATION, "hub-us", "hub-eu", hello.nonce, eu_nonce, BINDING)
    eu.receive(frame_message(Proof(thief.prove(signed))))
    _refused(eu, AuthError, "does not verify")


def test_a_proof_replayed_from_another_connection_does_not_verify():
    us, eu = _session(US, "initiator"), _session()
    recorded = _pump(us, eu)[us]
    assert isinstance(eu.next_event(), PeerIdentified)
    hello, proof = recorded[:2]
    assert isinstance(hello, Hello) and isinstance(proof, Proof)
    # The attacker replays hub-us's Hello and Proof, byte for byte, to a new session of hub-eu.
    again = _session()
    again.receive(frame_message(hello))
    sent = _messages(again.data_to_send())
    again.receive(frame_message(proof))
    _refused(again, AuthError, "does not verify", sent)


def test_a_relay_through_another_tls_endpoint_is_refused_on_both_sides():
    # hub-us reached (and pinned) the relay's CA; the relay passes the bytes on to hub-eu.
    us = _session(US, "initiator", binding=channel_binding(b"the relay's CA certificate"))
    eu = _session()
    sent = _pump(us, eu)
    _refused(us, AuthError, "does not verify", sent[us])
    _refused(eu, AuthError, "does not verify", sent[eu])


def test_two_sides_that_both_claim_to_have_opened_the_connection_are_refused():
    us, eu = _session(US, "initiator"), _session(EU, "initiator")
    sent = _pump(us, eu)
    _refused(us, AuthError, "does not verify", sent[us])
    _refused(eu, AuthError, "does not verify", sent[eu])


def test_a_well_formed_but_wrong_signature_is_refused():
    eu = _session()
    _answer(eu, _hello())
    eu.receive(frame_message(Proof(b"\x00" * 64)))
    _refused(eu, AuthError, "does not verify")


# --- what the peer sends, and when ----------------------------------------------------------------
def _delta_of(origin: str) -> Delta:
    return Delta(origin, 1, "acme", VectorClock(), b"poison")


@pytest.mark.parametrize(
    "message",
    [
        Deltas((_delta_of("hub-us"),), VectorClock.of({"hub-us": 1})),
        Deltas((), VectorClock()),
        Pull(VectorClock(), 10_000),
        Ack(VectorClock(), 0),
        Notify(VectorClock.of({"hub-us": 1})),
    ],
    ids=lambda m: type(m).__name__,
)
def test_sync_messages_before_the_proof_are_refused(message):
    eu = _session()
    _answer(eu, _hello())
    eu.receive(frame_message(message))
    _refused(eu, AuthError, "before proving its identity")


def test_deltas_sent_ahead_of_a_valid_proof_are_refused_all_the_same():
    eu = _session()
    hello = _hello()
    eu_nonce = _answer(eu, hello)
    signed = transcript(FEDERATION, "hub-us", "hub-eu", hello.nonce, eu_nonce, BINDING)
    eu.receive(frame_message(Deltas((_delta_of("hub-us"),), None)) + frame_message(Proof(US.prove(signed))))
    _refused(eu, AuthError, "before proving")


def test_a_proof_before_any_hello_is_refused():
    eu = _session()
    eu.receive(frame_message(Proof(b"\x00" * 64)))
    _refused(eu, InvalidInputError, "hello first")


def test_a_second_proof_is_refused():
    eu = _session()
    hello = _hello()
    eu_nonce = _answer(eu, hello)
    proof = frame_message(
        Proof(US.prove(transcript(FEDERATION, "hub-us", "hub-eu", hello.nonce, eu_nonce, BINDING)))
    )
    eu.receive(proof + proof)
    events = _events(eu)
    assert [type(e) for e in events] == [PeerIdentified, ProtocolError, Closed]
    assert type(events[1].error) is InvalidInputError and "second proof" in events[1].reason
    assert not any(isinstance(m, Deltas) and m.deltas for m in _messages(eu.data_to_send()))


def _frame(value: dict) -> bytes:
    body = msgpack.packb({"v": PROTOCOL_VERSION, **value}, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"type": "proof", "signature": b"\x00" * 63}, id="signature short"),
        pytest.param({"type": "proof", "signature": b"\x00" * 65}, id="signature long"),
        pytest.param({"type": "proof", "signature": "s" * 64}, id="signature a string"),
        pytest.param({"type": "proof", "signature": None}, id="signature none"),
        pytest.param({"type": "proof", "signature": [b"\x00" * 64]}, id="signature a list"),
        pytest.param({"type": "proof"}, id="signature missing"),
        pytest.param({"type": "proof", "signature": b"\x00" * 64, "replica_id": "hub-eu"}, id="extra field"),
    ],
)
def test_a_malformed_proof_is_refused_with_invalid_input(value):
    eu = _session()
    _answer(eu, _hello())
    eu.receive(_frame(value))
    _refused(eu, InvalidInputError)


def _hello_wire(**changes: Any) -> dict:
    value = {"type": "hello", **_hello().to_wire(), **changes}
    return {k: v for k, v in value.items() if v is not ...}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_hello_wire(credential=US.credential.to_wire()[:5]), id="credential short"),
        pytest.param(_hello_wire(credential=[*US.credential.to_wire()[:5], b""]), id="credential unsigned"),
        pytest.param(_hello_wire(credential={"replica_id": "hub-us"}), id="credential a map"),
        pytest.param(_hello_wire(credential=...), id="credential missing"),
        pytest.param(_hello_wire(nonce=b"\x00" * 16), id="nonce short"),
        pytest.param(_hello_wire(nonce=None), id="nonce none"),
        pytest.param(_hello_wire(nonce=...), id="nonce missing"),
    ],
)
def test_a_malformed_hello_is_refused_with_invalid_input(value):
    eu = _session()
    eu.receive(_frame(value))
    _refused(eu, InvalidInputError)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300), st.integers(1, 64))
def test_nothing_the_peer_sends_before_its_proof_gets_anything_delivered(data, chunk):
    eu = _session()
    _answer(eu, _hello())
    for offset in range(0, len(data), chunk):
        eu.receive(data[offset : offset + chunk])
    events = _events(eu)
    assert not any(isinstance(e, (PeerIdentified, DeltasReceived)) for e in events)
    for event in events:
        if isinstance(event, ProtocolError):
            assert isinstance(event.error, RayflowError)
    assert all(isinstance(m, Goodbye) for m in _messages(eu.data_to_send()))


# --- the caller's side ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"identity": US.credential},
        {"trust": FederationAuthority.generate("other-federation").trust()},
        {"role": "server"},
        {"binding": EU_CA},
        {"clock": NOW},
        {"expected_peer": "hub-eu"},
    ],
    ids=lambda options: next(iter(options)),
)
def test_a_misconfigured_session_is_refused(options):
    with pytest.raises(ConfigError):
        _session(**options)


@pytest.mark.parametrize("reading", [None, "now", float("nan"), True])
def test_a_broken_clock_raises_to_the_caller_and_closes_the_session(reading):
    eu = _session(clock=lambda: reading)
    with pytest.raises(ConfigError, match="clock"):
        eu.receive(frame_message(_hello()))
    assert _events(eu) == [Closed("the local clock failed", "local")]
    assert [type(m) for m in _messages(eu.data_to_send())] == [Goodbye]
