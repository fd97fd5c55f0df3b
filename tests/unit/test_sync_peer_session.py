"""The hub-to-hub sync protocol: its messages, and PeerSession machines wired back to back in memory.

The harness: each replica has an :class:`InMemoryDeltaLog` (a test double of the store's change
log, which is all a session reads), and each connection is two :class:`Pipe` s that carry bytes
in whatever chunks a test chooses. Every pipe decodes what passes through it, so a test can count
the deltas shipped, and every link checks on each delta sent that the sender stays within the
credit the receiver granted (with the acknowledgements the sender had actually received).

Every replica is a member of one federation, whose root (made once for this module) issued its
credential, so the sessions authenticate each other as in production before they sync; the
hostile cases of that handshake are in ``test_sync_peer_auth.py``.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections import Counter, deque
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayflow.errors import (
    AuthError,
    ConfigError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RayflowError,
)
from rayflow.sync.delta import Delta
from rayflow.sync.identity import (
    FederationAuthority,
    ReplicaIdentity,
    channel_binding,
    new_nonce,
    transcript,
)
from rayflow.sync.messages import (
    MAX_MESSAGE_BYTES,
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
    encode_message,
    frame_message,
    frame_reader,
)
from rayflow.sync.peer_session import (
    CaughtUp,
    Closed,
    DeltasReceived,
    PeerIdentified,
    PeerSession,
    ProtocolError,
    SessionState,
)
from rayflow.sync.vector_clock import VectorClock

FEDERATION = "test-federation"
V = VectorClock.of
NOW = 1_800_000_000
#: The federation's root, generated once for the module; every replica here holds a credential from it.
AUTHORITY = FederationAuthority.generate(FEDERATION)
TRUST = AUTHORITY.trust()


@functools.cache
def identity(replica: str) -> ReplicaIdentity:
    """``replica``'s key and credential (one per replica name, for the whole module)."""
    return ReplicaIdentity.create(AUTHORITY, replica, "region-1", not_after=NOW + 86_400)


def binding(responder: str) -> bytes:
    """The channel binding of connections to ``responder``: the fingerprint of its CA certificate."""
    return channel_binding(f"CA certificate of {responder}".encode())


def new_session(replica: str, source: Any, role: str, responder: str, /, **options: Any) -> PeerSession:
    """``replica``'s session, of ``role`` on a connection to (or from) ``responder``; ``options``
    override any argument."""
    arguments = {
        "identity": identity(replica),
        "trust": TRUST,
        "role": role,
        "binding": binding(responder),
        "clock": lambda: NOW,
        **options,
    }
    return PeerSession(source, source.head(), **arguments)


# --- test doubles -----------------------------------------------------------------------------
class InMemoryDeltaLog:
    """Test double of one replica's change log: deltas in the order this replica applied them.

    ``apply`` insists that every delta arrives exactly once and after everything its context
    names, so any duplicate or out-of-order delivery by a session fails the test right there.
    """

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.entries: list[Delta] = []
        self._head = VectorClock()

    def head(self) -> VectorClock:
        return self._head

    def write(self, body: bytes = b"change", tenant: str = "acme") -> Delta:
        seq = self._head.get(self.replica_id) + 1
        delta = Delta(self.replica_id, seq, tenant, self._head, body)
        self._append(delta)
        return delta

    def apply(self, deltas: tuple[Delta, ...]) -> None:
        for delta in deltas:
            assert delta.origin != self.replica_id, f"{self.replica_id} was handed its own change {delta.key}"
            assert delta.seq == self._head.get(delta.origin) + 1, (
                f"{self.replica_id} got {delta.key} twice or too early (has {self._head.get(delta.origin)})"
            )
            assert delta.context <= self._head, f"{self.replica_id} got {delta.key} before its causes"
            self._append(delta)

    def deltas_after(self, vector: VectorClock, max_bytes: int) -> list[Delta]:
        out: list[Delta] = []
        total = 0
        for delta in self.entries:
            if delta.seq <= vector.get(delta.origin):
                continue
            if out and total + delta.size > max_bytes:
                break
            out.append(delta)
            total += delta.size
        return out

    def _append(self, delta: Delta) -> None:
        self.entries.append(delta)
        self._head = self._head.advance(delta.origin, delta.seq)


class OriginGroupedDeltaLog(InMemoryDeltaLog):
    """A log that serves deltas grouped by origin, later origins first: per-origin order but not
    causal order, as a naive source might. Receivers must hold back and pull again."""

    def deltas_after(self, vector: VectorClock, max_bytes: int) -> list[Delta]:
        lacking = [d for d in self.entries if d.seq > vector.get(d.origin)]
        lacking.sort(key=lambda d: (d.origin, d.seq))
        lacking.sort(key=lambda d: d.origin, reverse=True)
        out: list[Delta] = []
        total = 0
        for delta in lacking:
            if out and total + delta.size > max_bytes:
                break
            out.append(delta)
            total += delta.size
        return out


class Pipe:
    """One direction of a connection: bytes in as written, out in chunks the test chooses.

    It decodes frames as they are written (to count and check them) and reports each message
    once its last byte has been delivered.
    """

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._reader = frame_reader()
        self._frames: deque[tuple[int, Message]] = deque()
        self._parsed = 0
        self._delivered = 0
        self.written: list[Message] = []

    def __len__(self) -> int:
        return len(self._bytes)

    def write(self, data: bytes) -> list[Message]:
        self._bytes += data
        new = []
        for body in self._reader.feed(data):
            self._parsed += 4 + len(body)
            message = decode_message(body)
            self._frames.append((self._parsed, message))
            new.append(message)
        self.written += new
        return new

    def take(self, size: int | None = None) -> tuple[bytes, list[Message]]:
        size = len(self._bytes) if size is None else min(size, len(self._bytes))
        chunk = bytes(self._bytes[:size])
        del self._bytes[:size]
        self._delivered += size
        done = []
        while self._frames and self._frames[0][0] <= self._delivered:
            done.append(self._frames.popleft()[1])
        return chunk, done

    @property
    def deltas_shipped(self) -> list[Delta]:
        return [d for m in self.written if isinstance(m, Deltas) for d in m.deltas]


class Link:
    """A connection between two replicas: a session at each end and a pipe each way, with credit checks."""

    def __init__(self, mesh: Mesh, a: str, b: str, **options) -> None:
        self.ends = (a, b)
        # a opened the connection to b.
        self.sessions = {
            a: new_session(a, mesh.logs[a], "initiator", b, expected_peer=b, **options),
            b: new_session(b, mesh.logs[b], "responder", b, expected_peer=a, **options),
        }
        self.pipes = {(a, b): Pipe(), (b, a): Pipe()}
        #: Delta bytes sent src -> dst and not yet returned by an Ack the sender had received.
        self.in_flight = {(a, b): 0, (b, a): 0}
        self.max_in_flight = {(a, b): 0, (b, a): 0}

    def flush(self, src: str, dst: str) -> int:
        data = self.sessions[src].data_to_send()
        window = self.sessions[dst].window_bytes
        for message in self.pipes[(src, dst)].write(data):
            if isinstance(message, Deltas):
                for delta in message.deltas:
                    in_flight = self.in_flight[(src, dst)]
                    assert in_flight == 0 or in_flight + delta.size <= window, (
                        f"{src} sent {delta.size} bytes with {in_flight} of {window} outstanding"
                    )
                    self.in_flight[(src, dst)] = in_flight + delta.size
                    self.max_in_flight[(src, dst)] = max(
                        self.max_in_flight[(src, dst)], in_flight + delta.size
                    )
        return len(data)

    def deliver(self, src: str, dst: str, size: int | None = None) -> None:
        chunk, messages = self.pipes[(src, dst)].take(size)
        for message in messages:
            if isinstance(message, Ack):
                # An Ack from src returns credit for what dst sent to src.
                self.in_flight[(dst, src)] -= message.window_bytes
                assert self.in_flight[(dst, src)] >= 0
        self.sessions[dst].receive(chunk)


class Mesh:
    """Replicas with in-memory logs and the links between them; the test plays the network and the shells."""

    def __init__(
        self, *replicas: str, log_type: type[InMemoryDeltaLog] = InMemoryDeltaLog, **options
    ) -> None:
        self.logs = {r: log_type(r) for r in replicas}
        self.options = options
        self.links: dict[frozenset[str], Link] = {}
        self.events: dict[str, list[object]] = {r: [] for r in replicas}
        self.retired: list[Link] = []

    def link(self, a: str, b: str) -> Link:
        return self.links[frozenset((a, b))]

    def session(self, replica: str, peer: str) -> PeerSession:
        return self.link(replica, peer).sessions[replica]

    def sessions_of(self, replica: str) -> list[PeerSession]:
        return [link.sessions[replica] for key, link in self.links.items() if replica in key]

    def connect(self, a: str, b: str, *, both_start: bool = True, **options) -> Link:
        link = Link(self, a, b, **{**self.options, **options})
        self.links[frozenset((a, b))] = link
        link.sessions[a].connect()
        if both_start:
            link.sessions[b].connect()
        return link

    def cut(self, a: str, b: str) -> None:
        """The network fails: bytes in flight are lost, both shells see the transport end."""
        link = self.links.pop(frozenset((a, b)))
        for replica, session in link.sessions.items():
            session.connection_lost()
            self.drain(replica, session)
        self.retired.append(link)

    def write(self, replica: str, count: int = 1, body: bytes = b"change") -> None:
        for _ in range(count):
            self.logs[replica].write(body)
            for session in self.sessions_of(replica):
                session.local_changed()
        self.drain(replica)

    def flush(self, src: str, dst: str) -> int:
        return self.link(src, dst).flush(src, dst)

    def deliver(self, src: str, dst: str, size: int | None = None) -> None:
        link = self.link(src, dst)
        link.deliver(src, dst, size)
        self.drain(dst)

    def drain(self, replica: str, extra: PeerSession | None = None) -> None:
        """Play the replica's shell: apply delivered deltas, report them durable, tell the other sessions."""
        log = self.logs[replica]
        while True:
            progressed = False
            for session in [*self.sessions_of(replica), *([extra] if extra else [])]:
                while (event := session.next_event()) is not None:
                    progressed = True
                    self.events[replica].append(event)
                    if isinstance(event, DeltasReceived):
                        log.apply(event.deltas)
                        session.applied(log.head())
                        for other in self.sessions_of(replica):
                            if other is not session:
                                other.local_changed()
            if not progressed:
                return

    def settle(self, max_rounds: int = 10_000) -> None:
        """Flush and deliver everything until nobody has anything to say."""
        for _ in range(max_rounds):
            moved = 0
            for link in list(self.links.values()):
                a, b = link.ends
                for src, dst in ((a, b), (b, a)):
                    moved += link.flush(src, dst)
                    if len(link.pipes[(src, dst)]):
                        moved += 1
                        self.deliver(src, dst)
            if not moved:
                return
        raise AssertionError("the mesh did not settle")

    def errors(self) -> list[ProtocolError]:
        return [e for events in self.events.values() for e in events if isinstance(e, ProtocolError)]

    def assert_converged(self) -> None:
        heads = {replica: log.head() for replica, log in self.logs.items()}
        assert len(set(heads.values())) == 1, heads
        for log in self.logs.values():
            assert Counter(d.key for d in log.entries) == Counter(
                d.key for other in self.logs.values() for d in other.entries if d.origin == other.replica_id
            )
        assert self.errors() == []


def _events(session: PeerSession) -> list[object]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def _delta(
    origin: str = "r-a", seq: int = 1, body: bytes = b"x", context: dict[str, int] | None = None
) -> Delta:
    context = dict(context or {})
    context[origin] = seq - 1
    return Delta(origin, seq, "acme", V(context), body)


def _body(value: dict) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- messages ---------------------------------------------------------------------------------
ALL_MESSAGES = [
    Hello(
        "r-a",
        FEDERATION,
        PROTOCOL_VERSION,
        V({"r-a": 3, "r-b": 1}),
        4096,
        identity("r-a").credential,
        b"n" * 32,
    ),
    Proof(b"s" * 64),
    Pull(V({"r-a": 2}), 1000),
    Deltas((_delta(), _delta(seq=2)), V({"r-a": 2})),
    Deltas((), None),
    Ack(V({"r-b": 7}), 0),
    Notify(V({"r-a": 9})),
    Goodbye("shutting down"),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_encoding(message):
    assert decode_message(encode_message(message)) == message
    assert frame_reader().feed(frame_message(message)) == [encode_message(message)]


def _hello_wire(**changes) -> dict:
    value = {"v": PROTOCOL_VERSION, "type": "hello", **ALL_MESSAGES[0].to_wire()}
    value.update(changes)
    return {k: v for k, v in value.items() if v is not ...}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_hello_wire(type="gossip"), id="unknown type"),
        pytest.param(_hello_wire(type=None), id="type missing"),
        pytest.param(_hello_wire(v=2), id="newer version"),
        pytest.param(_hello_wire(v=True), id="version as bool"),
        pytest.param(_hello_wire(v=...), id="no version"),
        pytest.param(_hello_wire(replica_id=7), id="id of wrong type"),
        pytest.param(_hello_wire(replica_id=""), id="empty id"),
        pytest.param(_hello_wire(window_bytes=True), id="window as bool"),
        pytest.param(_hello_wire(window_bytes=0), id="window zero"),
        pytest.param(_hello_wire(window_bytes=2**40), id="window too large"),
        pytest.param(_hello_wire(applied=[1, 2]), id="clock of wrong type"),
        pytest.param(_hello_wire(applied={"r-a": -1}), id="negative counter"),
        pytest.param(_hello_wire(extra=1), id="extra field"),
        pytest.param(_hello_wire(federation=...), id="missing field"),
        pytest.param(_hello_wire(credential=...), id="no credential"),
        pytest.param(_hello_wire(credential=None), id="credential none"),
        pytest.param(_hello_wire(credential="r-a"), id="credential a string"),
        pytest.param(_hello_wire(credential=identity("r-a").credential.to_wire()[:5]), id="credential short"),
        pytest.param(
            _hello_wire(credential=[*identity("r-a").credential.to_wire()[:5], b""]), id="credential unsigned"
        ),
        pytest.param(
            _hello_wire(credential=[*identity("r-a").credential.to_wire()[:5], b"s" * 63]),
            id="credential signature short",
        ),
        pytest.param(
            _hello_wire(credential=[FEDERATION, "r-a", "region-1", b"k" * 31, NOW, b"s" * 64]),
            id="credential key short",
        ),
        pytest.param(_hello_wire(nonce=...), id="no nonce"),
        pytest.param(_hello_wire(nonce=b"n" * 31), id="nonce short"),
        pytest.param(_hello_wire(nonce=b"n" * 33), id="nonce long"),
        pytest.param(_hello_wire(nonce="n" * 32), id="nonce a string"),
        pytest.param({"v": 1, "type": "proof", "signature": b"s" * 63}, id="proof short"),
        pytest.param({"v": 1, "type": "proof", "signature": "s" * 64}, id="proof a string"),
        pytest.param({"v": 1, "type": "proof", "signature": None}, id="proof none"),
        pytest.param({"v": 1, "type": "proof"}, id="proof missing"),
        pytest.param({"v": 1, "type": "proof", "signature": b"s" * 64, "key": b"k"}, id="proof extra field"),
        pytest.param(
            {"v": 1, "type": "deltas", "deltas": [["r-a", 1, "acme", {}, "text"]], "up_to": None},
            id="delta body not bytes",
        ),
        pytest.param({"v": 1, "type": "deltas", "deltas": {"a": 1}, "up_to": None}, id="deltas not a list"),
        pytest.param({"v": 1, "type": "ack", "applied": {}, "window_bytes": -5}, id="negative credit"),
        pytest.param({"v": 1, "type": "goodbye", "reason": "x" * 2000}, id="reason too long"),
        pytest.param([1, "hello"], id="not a map"),
    ],
)
def test_decoding_refuses_malformed_messages_with_invalid_input(value):
    with pytest.raises(InvalidInputError):
        decode_message(_body(value))


def test_decoding_refuses_a_body_above_the_message_limit():
    with pytest.raises(PayloadTooLargeError):
        decode_message(b"\x00" * (MAX_MESSAGE_BYTES + 1))


def test_frame_reader_refuses_an_oversize_length_from_the_header_alone():
    reader = frame_reader()
    with pytest.raises(PayloadTooLargeError):
        reader.feed(struct.pack(">I", MAX_MESSAGE_BYTES + 1))
    assert reader.buffered_bytes == 0


@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_invalid_input(data):
    try:
        decode_message(data)
    except InvalidInputError:
        pass


@given(st.sampled_from(ALL_MESSAGES), st.data())
def test_decoding_corrupted_messages_raises_only_invalid_input(message, data):
    body = bytearray(encode_message(message))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
    try:
        decode_message(bytes(body))
    except InvalidInputError:
        pass


@given(st.lists(st.sampled_from(ALL_MESSAGES), max_size=8), st.lists(st.integers(1, 40), max_size=50))
def test_frames_split_and_merged_anyhow_come_out_whole_and_in_order(messages, cuts):
    stream = b"".join(frame_message(m) for m in messages)
    reader = frame_reader()
    bodies = []
    offset = 0
    for size in itertools.chain(cuts, [len(stream)]):
        bodies += reader.feed(stream[offset : offset + size])
        offset += size
    assert [decode_message(b) for b in bodies] == messages
    assert reader.at_frame_boundary


# --- sessions: sync -------------------------------------------------------------------------------
def test_two_replicas_converge_after_concurrent_writes():
    mesh = Mesh("r-a", "r-b")
    mesh.write("r-a", 5)
    mesh.write("r-b", 7)
    mesh.connect("r-a", "r-b")
    mesh.settle()
    mesh.write("r-a", 3)
    mesh.write("r-b", 2)
    mesh.settle()
    mesh.assert_converged()
    assert len(mesh.logs["r-a"].entries) == 17


def test_the_handshake_identifies_the_peer_and_reports_catching_up():
    mesh = Mesh("r-a", "r-b")
    mesh.write("r-b", 2)
    mesh.connect("r-a", "r-b", both_start=False)
    mesh.settle()
    events_of_a = mesh.events["r-a"]
    assert events_of_a[0] == PeerIdentified("r-b", V({"r-b": 2}))
    assert CaughtUp(V({"r-b": 2})) in events_of_a
    assert CaughtUp(V({"r-b": 2})) == [e for e in events_of_a if isinstance(e, CaughtUp)][-1]
    assert mesh.session("r-a", "r-b").state is SessionState.ESTABLISHED
    assert mesh.session("r-b", "r-a").peer_id == "r-a"


def test_three_replicas_converge_through_a_full_mesh():
    mesh = Mesh("r-a", "r-b", "r-c")
    for a, b in (("r-a", "r-b"), ("r-b", "r-c"), ("r-a", "r-c")):
        mesh.connect(a, b)
    for round_ in range(4):
        for replica in mesh.logs:
            mesh.write(replica, round_ + 1)
        mesh.settle()
    mesh.assert_converged()


def test_a_replica_relays_changes_in_causal_order_to_one_it_alone_reaches():
    mesh = Mesh("r-a", "r-b", "r-c")
    mesh.connect("r-a", "r-b")
    mesh.connect("r-b", "r-c")
    mesh.write("r-a", 3)
    mesh.settle()
    mesh.write("r-b", 2)  # depends on r-a's changes
    mesh.write("r-c", 1)
    mesh.settle()
    mesh.assert_converged()


def test_a_replica_back_from_a_partition_receives_only_what_it_missed():
    mesh = Mesh("r-a", "r-b")
    mesh.connect("r-a", "r-b")
    mesh.write("r-a", 20)
    mesh.write("r-b", 10)
    mesh.settle()
    mesh.cut("r-a", "r-b")
    mesh.write("r-a", 5)
    mesh.write("r-b", 3)
    link = mesh.connect("r-a", "r-b")  # new sessions, from what each log holds
    mesh.settle()
    mesh.assert_converged()
    assert [d.key for d in link.pipes[("r-a", "r-b")].deltas_shipped] == [("r-a", s) for s in range(21, 26)]
    assert [d.key for d in link.pipes[("r-b", "r-a")].deltas_shipped] == [("r-b", s) for s in range(11, 14)]
    sent = link.sessions["r-a"].stats
    assert sent.deltas_sent == 5 and sent.delta_bytes_sent == sum(
        d.size for d in link.pipes[("r-a", "r-b")].deltas_shipped
    )


def test_a_partitioned_replica_catches_up_on_every_origin_from_one_peer():
    mesh = Mesh("r-a", "r-b", "r-c")
    mesh.connect("r-a", "r-b")
    mesh.connect("r-a", "r-c")
    mesh.write("r-c", 4)
    mesh.settle()
    mesh.cut("r-a", "r-c")
    mesh.write("r-a", 3)
    mesh.write("r-b", 6)
    mesh.settle()
    link = mesh.connect("r-c", "r-b")
    mesh.settle()
    mesh.assert_converged()
    shipped = Counter(d.origin for d in link.pipes[("r-b", "r-c")].deltas_shipped)
    assert shipped == {"r-a": 3, "r-b": 6}


def test_frames_delivered_one_byte_at_a_time_still_converge():
    mesh = Mesh("r-a", "r-b")
    mesh.write("r-a", 4)
    mesh.write("r-b", 4)
    link = mesh.connect("r-a", "r-b")
    for _ in range(200):
        for src, dst in (("r-a", "r-b"), ("r-b", "r-a")):
            link.flush(src, dst)
            while len(link.pipes[(src, dst)]):
                mesh.deliver(src, dst, 1)
    mesh.assert_converged()


def test_frames_merged_into_one_delivery_are_all_handled():
    mesh = Mesh("r-a", "r-b", max_batch_bytes=50)
    mesh.write("r-a", 10)
    link = mesh.connect("r-a", "r-b")
    mesh.flush("r-a", "r-b")
    mesh.deliver("r-a", "r-b")  # a's Hello
    mesh.flush("r-b", "r-a")
    mesh.deliver("r-b", "r-a")  # b's Hello and Proof
    mesh.flush("r-a", "r-b")
    assert sum(isinstance(m, Deltas) for m in link.pipes[("r-a", "r-b")].written) >= 5
    mesh.deliver("r-a", "r-b")  # many frames in one chunk
    assert mesh.logs["r-b"].head() == V({"r-a": 10})


# --- sessions: flow control -----------------------------------------------------------------------
def test_a_sender_never_exceeds_the_credit_the_receiver_granted():
    mesh = Mesh("r-a", "r-b", window_bytes=500)
    link = mesh.connect("r-a", "r-b")
    mesh.write("r-a", 60, body=b"p" * 40)
    mesh.settle()  # the link asserts the credit on every delta sent
    mesh.assert_converged()
    sizes = {d.size for d in mesh.logs["r-a"].entries}
    assert link.max_in_flight[("r-a", "r-b")] <= 500
    assert link.max_in_flight[("r-a", "r-b")] > 500 - max(sizes)  # the window was used, not just respected
    assert sum(isinstance(m, Ack) for m in link.pipes[("r-b", "r-a")].written) > 1


def test_a_receiver_that_does_not_apply_stops_the_sender_at_its_window():
    log_a, log_b = InMemoryDeltaLog("r-a"), InMemoryDeltaLog("r-b")
    for _ in range(30):
        log_a.write(b"q" * 60)
    a = new_session("r-a", log_a, "initiator", "r-b")
    b = new_session("r-b", log_b, "responder", "r-b", window_bytes=400)
    a.connect()
    b.receive(a.data_to_send())
    a.receive(b.data_to_send())
    sent = Pipe()
    for _ in range(5):
        sent.write(a.data_to_send())
    assert 0 < a.stats.delta_bytes_sent <= 400
    assert a.stats.send_credit < max(d.size for d in log_a.entries)
    # More local changes are not pushed, only announced.
    log_a.write(b"late")
    a.local_changed()
    assert [type(m) for m in sent.write(a.data_to_send())] == [Notify]
    # b takes the deltas but never reports them durable: no credit comes back.
    _, messages = sent.take()
    b.receive(b"".join(frame_message(m) for m in messages))
    delivered = [d for e in _events(b) if isinstance(e, DeltasReceived) for d in e.deltas]
    assert delivered and b.stats.receive_credit < 100
    a.receive(b.data_to_send())
    assert a.data_to_send() == b""
    # Once b reports them durable, the credit returns and a resumes.
    log_b.apply(tuple(delivered))
    b.applied(log_b.head())
    a.receive(b.data_to_send())
    assert any(isinstance(m, Deltas) and m.deltas for m in Pipe().write(a.data_to_send()))


def test_duplicates_and_held_back_deltas_return_their_credit_at_once():
    session, _ = _session(window_bytes=1000)
    session.receive(_handshake(session))
    duplicate = _delta("r-me", 1)  # the session's own change, which it has
    held_back = _delta("r-peer", 1, context={"r-other": 1})  # waits for r-other:1
    session.receive(frame_message(Deltas((duplicate, held_back), None)))
    assert not any(isinstance(e, DeltasReceived) for e in _events(session))
    acks = [m for m in Pipe().write(session.data_to_send()) if isinstance(m, Ack)]
    assert [a.window_bytes for a in acks] == [duplicate.size + held_back.size]


def test_delivered_deltas_return_their_credit_once_durable():
    session, log = _session(window_bytes=1000)
    session.receive(_handshake(session))
    delta = _delta("r-peer", 1)
    session.receive(frame_message(Deltas((delta,), None)))
    assert [e.deltas for e in _events(session) if isinstance(e, DeltasReceived)] == [(delta,)]
    assert not any(isinstance(m, Ack) for m in Pipe().write(session.data_to_send()))
    log.apply((delta,))
    session.applied(log.head())
    [ack] = [m for m in Pipe().write(session.data_to_send()) if isinstance(m, Ack)]
    assert ack == Ack(V({"r-me": 1, "r-peer": 1}), delta.size)


def test_a_delta_larger_than_the_whole_window_is_sent_alone():
    mesh = Mesh("r-a", "r-b", window_bytes=200)
    link = mesh.connect("r-a", "r-b")
    mesh.write("r-a", 1, body=b"s" * 20)
    mesh.write("r-a", 1, body=b"L" * 1000)
    mesh.write("r-a", 2, body=b"s" * 20)
    mesh.settle()
    mesh.assert_converged()
    batches = [m.deltas for m in link.pipes[("r-a", "r-b")].written if isinstance(m, Deltas) and m.deltas]
    assert any(len(batch) == 1 and len(batch[0].body) == 1000 for batch in batches)


def test_deltas_held_back_or_dropped_by_the_receive_window_are_pulled_again():
    mesh = Mesh("r-a", "r-b", "r-c", log_type=OriginGroupedDeltaLog, max_buffered=2)
    mesh.connect("r-a", "r-b")
    mesh.write("r-a", 5)
    mesh.settle()
    mesh.write("r-b", 6)  # each depends on r-a's changes
    mesh.settle()
    link = mesh.connect("r-c", "r-b")  # r-b serves its own changes first: not a causal order
    mesh.settle()
    mesh.assert_converged()
    assert link.sessions["r-c"].stats.pulls_sent >= 1
    assert link.sessions["r-c"].window.stats.dropped > 0


# --- sessions: hostile or wrong peers -------------------------------------------------------------
PEER_NONCE = new_nonce()


def _session(**options) -> tuple[PeerSession, InMemoryDeltaLog]:
    """r-me's session, the responder on a connection from r-peer, played by hand."""
    log = InMemoryDeltaLog("r-me")
    log.write()
    return new_session("r-me", log, "responder", "r-me", **options), log


def _peer_hello(replica_id: str = "r-peer", federation: str = FEDERATION, window: int = 10_000) -> bytes:
    credential = identity(replica_id).credential
    return frame_message(
        Hello(replica_id, federation, PROTOCOL_VERSION, VectorClock(), window, credential, PEER_NONCE)
    )


def _handshake(session: PeerSession, peer: str = "r-peer") -> bytes:
    """Start ``session`` and return what an honest ``peer`` (the initiator) answers: Hello and Proof."""
    session.connect()
    [hello] = Pipe().write(session.data_to_send())
    signed = transcript(FEDERATION, peer, "r-me", PEER_NONCE, hello.nonce, binding("r-me"))
    return _peer_hello(peer) + frame_message(Proof(identity(peer).prove(signed)))


def _assert_refused(session: PeerSession, error_type: type[RayflowError]) -> ProtocolError:
    events = _events(session)
    failures = [e for e in events if isinstance(e, ProtocolError)]
    assert len(failures) == 1 and type(failures[0].error) is error_type, events
    assert isinstance(events[-1], Closed) and events[-1].initiator == "local"
    assert session.closed
    goodbye = Pipe().write(session.data_to_send())[-1]
    assert isinstance(goodbye, Goodbye) and goodbye.reason
    return failures[0]


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        pytest.param(_frame(b"\xc1\xc1\xc1"), InvalidInputError, id="garbage body"),
        pytest.param(
            struct.pack(">I", MAX_MESSAGE_BYTES + 1) + b"xx", PayloadTooLargeError, id="oversize length"
        ),
        pytest.param(_frame(_body({"v": 1, "type": "gossip"})), InvalidInputError, id="unknown message type"),
        pytest.param(_frame(_body({"v": 9, "type": "hello"})), InvalidInputError, id="unknown version"),
        pytest.param(frame_message(Ack(VectorClock(), 0)), InvalidInputError, id="ack before hello"),
        pytest.param(_peer_hello(federation="other"), PermissionDeniedError, id="other federation"),
        pytest.param(_peer_hello(replica_id="r-me"), InvalidInputError, id="our own id"),
        pytest.param(_peer_hello() + _peer_hello(), InvalidInputError, id="second hello"),
    ],
)
def test_hostile_or_wrong_input_is_refused_with_a_typed_error_and_closes(data, error_type):
    session, _ = _session()
    session.connect()
    session.data_to_send()
    session.receive(data)
    _assert_refused(session, error_type)
    session.receive(_peer_hello())  # ignored once closed
    assert session.next_event() is None


def test_a_hello_from_another_replica_than_expected_is_refused():
    session, _ = _session(expected_peer="r-expected")
    session.receive(_peer_hello("r-impostor"))
    assert _assert_refused(session, AuthError).error.details["got"] == "r-impostor"


def test_deltas_beyond_the_granted_credit_are_a_protocol_error():
    session, _ = _session(window_bytes=100)
    session.receive(_handshake(session))
    first, second = _delta("r-peer", 1, b"a" * 60), _delta("r-peer", 2, b"b" * 60)
    session.receive(frame_message(Deltas((first,), None)))  # alone: allowed even if above the window
    session.receive(frame_message(Deltas((second,), None)))
    refused = _assert_refused(session, InvalidInputError)
    assert "credit" in refused.reason


def test_an_ack_returning_more_credit_than_was_used_is_a_protocol_error():
    session, _ = _session()
    session.receive(_handshake(session))
    session.receive(frame_message(Ack(VectorClock(), 10)))
    _assert_refused(session, InvalidInputError)


def test_a_change_of_ours_we_never_made_is_a_protocol_error():
    session, _ = _session()
    session.receive(_handshake(session))
    session.receive(frame_message(Deltas((_delta("r-me", 1), _delta("r-me", 2)), None)))
    _assert_refused(session, InvalidInputError)


def test_valid_frames_before_a_bad_one_in_the_same_delivery_are_still_handled():
    session, _ = _session()
    session.receive(
        _handshake(session) + frame_message(Deltas((_delta("r-peer", 1),), None)) + b"\x00\x00\x00\x01\xc1"
    )
    events = _events(session)
    assert [type(e) for e in events] == [PeerIdentified, DeltasReceived, ProtocolError, Closed]


def test_a_goodbye_from_the_peer_closes_the_session():
    session, _ = _session()
    session.receive(_handshake(session) + frame_message(Goodbye("maintenance")))
    events = _events(session)
    assert events[-1] == Closed("maintenance", "peer")
    assert session.data_to_send() == b""


def test_closing_sends_a_goodbye_and_ends_the_session():
    session, _ = _session()
    session.connect()
    session.close("shutting down")
    messages = Pipe().write(session.data_to_send())
    assert [type(m) for m in messages] == [Hello, Goodbye]
    assert _events(session) == [Closed("shutting down", "local")]


def test_a_lost_connection_emits_closed_once():
    session, _ = _session()
    session.connection_lost()
    session.connection_lost()
    assert _events(session) == [Closed("connection lost", "transport")]


@pytest.mark.parametrize(
    "options",
    [
        {"window_bytes": 0},
        {"window_bytes": True},
        {"max_batch_bytes": 2**40},
        {"expected_peer": "r-me"},
        {"expected_peer": ""},
        {"identity": "r-me"},
        {"trust": FEDERATION},
        {"trust": FederationAuthority.generate("another-federation").trust()},
        {"role": "client"},
        {"role": None},
        {"binding": b"b" * 31},
        {"binding": "b" * 32},
        {"clock": NOW},
    ],
    ids=repr,
)
def test_bad_options_are_refused_with_config_error(options):
    with pytest.raises(ConfigError):
        _session(**options)


def test_misuse_by_the_caller_raises_invalid_input():
    session, _ = _session()
    with pytest.raises(InvalidInputError):
        session.receive("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        session.applied({"r-me": 1})  # type: ignore[arg-type]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=200), st.integers(1, 50))
def test_random_bytes_after_the_hello_never_raise_and_close_with_a_typed_error(data, chunk):
    session, _ = _session()
    session.receive(_handshake(session))
    for offset in range(0, len(data), chunk):
        session.receive(data[offset : offset + chunk])
    events = _events(session)
    for event in events:
        if isinstance(event, ProtocolError):
            assert isinstance(event.error, RayflowError)
    if session.closed:
        assert isinstance(events[-1], Closed)


# --- sessions: random interleavings -----------------------------------------------------------
REPLICAS = ("r-a", "r-b", "r-c")

actions = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(1, 3), st.integers(0, 300)),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 400)),
    st.tuples(st.just("deliver_all"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("cut"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("connect"), st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replica_count=st.sampled_from([2, 3]),
    window=st.sampled_from([150, 600, 4096]),
    max_batch=st.sampled_from([100, 1000]),
    log_type=st.sampled_from([InMemoryDeltaLog, OriginGroupedDeltaLog]),
    max_buffered=st.sampled_from([1, 10_000]),
    steps=st.lists(actions, max_size=60),
)
def test_any_interleaving_of_writes_deliveries_and_reconnects_converges(
    replica_count, window, max_batch, log_type, max_buffered, steps
):
    names = REPLICAS[:replica_count]
    mesh = Mesh(
        *names, log_type=log_type, window_bytes=window, max_batch_bytes=max_batch, max_buffered=max_buffered
    )
    for a, b in itertools.combinations(names, 2):
        mesh.connect(a, b)
    written = 0
    for step in steps:
        kind, i, j = step[0], names[step[1] % replica_count], names[step[2] % replica_count]
        connected = i != j and frozenset((i, j)) in mesh.links
        if kind == "write":
            mesh.write(i, step[2], body=b"w" * step[3])
            written += step[2]
        elif kind == "deliver" and connected:
            mesh.flush(i, j)
            mesh.deliver(i, j, step[3])
        elif kind == "deliver_all" and connected:
            mesh.flush(i, j)
            mesh.deliver(i, j)
        elif kind == "cut" and connected:
            mesh.cut(i, j)
        elif kind == "connect" and i != j and not connected:
            mesh.connect(i, j, both_start=step[1] < step[2])
    for a, b in itertools.combinations(names, 2):
        if frozenset((a, b)) not in mesh.links:
            mesh.connect(a, b)
    mesh.settle()
    mesh.assert_converged()
    for log in mesh.logs.values():
        assert len(log.entries) == written  # every change once, at every replica


line_actions = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("deliver"), st.integers(0, 3), st.one_of(st.none(), st.integers(1, 300))),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_buffered=st.integers(0, 3),
    window=st.sampled_from([120, 1000, 8000]),
    steps=st.lists(line_actions, max_size=50),
)
def test_a_relay_serving_out_of_causal_order_into_a_tiny_window_still_delivers_everything_once(
    max_buffered, window, steps
):
    mesh = Mesh(
        "r-a", "r-b", "r-c", log_type=OriginGroupedDeltaLog, window_bytes=window, max_buffered=max_buffered
    )
    mesh.connect("r-a", "r-c")
    mesh.connect("r-c", "r-b")
    directions = [("r-a", "r-c"), ("r-c", "r-a"), ("r-c", "r-b"), ("r-b", "r-c")]
    written = 0
    for kind, which, amount in steps:
        if kind == "write":
            mesh.write(("r-a", "r-b", "r-c")[which], amount)
            written += amount
        else:
            src, dst = directions[which]
            mesh.flush(src, dst)
            mesh.deliver(src, dst, amount)
    mesh.settle()
    mesh.assert_converged()
    assert all(len(log.entries) == written for log in mesh.logs.values())
