"""One replica's side of one sync connection to one peer replica, as a sans-IO state machine.

:class:`PeerSession` takes the bytes the transport delivered (:meth:`~PeerSession.receive`) and
what happened locally (:meth:`~PeerSession.local_changed`, :meth:`~PeerSession.applied`), and
gives back bytes to send (:meth:`~PeerSession.data_to_send`) and events
(:meth:`~PeerSession.next_event`). No sockets, no event loop, and the clock is a parameter: the
QUIC shell that owns the stream and the store that applies the deltas are elsewhere, so every
interleaving can be tested with plain function calls.

The protocol is symmetric: both sides run this machine, and each both serves what the other lacks
and receives what it lacks.

* **Handshake.** Each side sends :class:`~rayflow.sync.messages.Hello` with its replica id, its
  federation credential and a fresh nonce (either may start; one that receives a Hello first
  answers with its own). Once a side has both Hellos it sends :class:`~rayflow.sync.messages.Proof`:
  its signature over the :func:`~rayflow.sync.identity.transcript` of this connection (federation,
  initiator's and responder's ids and nonces, and the channel binding, the fingerprint of the
  responder's TLS trust anchor; see :mod:`rayflow.sync.identity`). The peer is identified, and
  nothing is synced, until its Proof verifies against the federation trust at the clock's time:
  before that only Hello, Proof and Goodbye are accepted, and nothing else is sent. A Hello of
  another federation, with our own replica id, whose id is not its credential's, from another
  replica than ``expected_peer``, or whose credential is not live in the federation (a
  stranger's, expired, revoked) is refused at once, before this side signs anything for it; a
  Proof that does not verify (a copied credential without its key, a proof replayed from another
  connection, a relay through another TLS endpoint, the two sides disagreeing on their roles) is
  refused too.
* **Catch-up and push.** After the handshake each side knows what the other has applied and sends,
  in batches read from its log on demand, every delta the other lacks; afterwards new local
  changes are pushed as they come. A replica back from a partition therefore receives only what
  it missed. A sender tracks what the peer has (its Hello, its Acks, what it sent us) and what
  has been sent since: the *cursor* it serves after.
* **Flow control.** Each side grants the other ``window_bytes`` of credit, counted in
  :attr:`Delta.size`. A delta's credit comes back (in an :class:`~rayflow.sync.messages.Ack`)
  once the receiver no longer holds it for us: when the shell reports it durable through
  :meth:`~PeerSession.applied`, or at once if it was a duplicate, or held back in the
  :class:`~rayflow.sync.receive_window.ReceiveWindow` (bounded on its own), or dropped there.
  A sender never has more than the window outstanding, except one lone delta larger than the
  whole window, which may be sent when nothing else is outstanding (else a large change could
  never move). A receiver checks the same rule and treats a breach as a protocol error.
* **Bounded memory.** The log is the buffer: deltas are read from the
  :class:`DeltaSource` only when :meth:`~PeerSession.data_to_send` is called and only within
  credit, so a slow or gone peer costs at most its window. Acks, pulls and notifications are
  coalesced into one pending message each.
* **Repair.** A batch that brings the peer up to the sender's head says so (``up_to``). If the
  receiver then still lacks part of it (a delta held back for a cause that never came, or
  dropped for space), it sends :class:`~rayflow.sync.messages.Pull` with what it has delivered,
  and the sender rewinds its cursor there. A sender whose credit is used up sends
  :class:`~rayflow.sync.messages.Notify` with its head, so the peer knows it lags.

Errors: bytes from the peer never raise. A malformed or oversized frame, a message out of place,
a refused Hello or Proof, a breach of credit, produce :class:`ProtocolError` then :class:`Closed`,
and a :class:`~rayflow.sync.messages.Goodbye` is queued for the peer. Methods raise
:class:`~rayflow.errors.InvalidInputError` (or :class:`~rayflow.errors.ConfigError`) for a
misuse by the caller, and pass on whatever the :class:`DeltaSource` raises (a store raises
:class:`~rayflow.errors.StorageError`) or the clock raises. A clock that returns something other
than finite unix seconds closes the session and raises :class:`~rayflow.errors.ConfigError`
from the call that read it. Not thread-safe: one owner drives a session.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    FederationTrust,
    ReplicaCredential,
    ReplicaIdentity,
    new_nonce,
    transcript,
    verify_proof,
)
from rayflow.sync.messages import (
    MAX_DELTAS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    MAX_REASON_LENGTH,
    MAX_WINDOW_BYTES,
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
from rayflow.sync.receive_window import DEFAULT_MAX_BUFFERED, DEFAULT_MAX_BUFFERED_BYTES, ReceiveWindow
from rayflow.sync.vector_clock import VectorClock, validate_replica_id

#: Credit granted to the peer by default: delta bytes it may send before we return some.
DEFAULT_WINDOW_BYTES = 4 * 1024 * 1024
#: Default bound on one Deltas message (sum of :attr:`Delta.size`).
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
#: Largest batch option accepted: half a frame, so a batch always encodes within one.
MAX_BATCH_BYTES = MAX_MESSAGE_BYTES // 2
#: Who opened the transport connection (``role``): the initiator; who accepted it: the responder.
ROLES = ("initiator", "responder")


class DeltaSource(Protocol):
    """The local change log, as the session reads it (a store adapter, or a test double)."""

    def head(self) -> VectorClock:
        """The local version vector: per origin, the highest seq durably held."""
        ...

    def deltas_after(self, vector: VectorClock, max_bytes: int) -> Sequence[Delta]:
        """The local deltas ``vector`` lacks, at most ``max_bytes`` of :attr:`Delta.size` in all
        (at least one if any is lacking), in an order where each comes after the lacking deltas
        its context names: the order the log applied them is one (it is also per-origin seq order).
        """
        ...


# --- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerIdentified:
    """The peer proved its identity: who it is and what it had applied when it connected."""

    peer_id: str
    peer_applied: VectorClock


@dataclass(frozen=True)
class DeltasReceived:
    """Deltas to apply to the store, in this order (causal order, each delivered once per session).

    Apply them, then call :meth:`PeerSession.applied` with what is durable, which returns credit.
    """

    deltas: tuple[Delta, ...]


@dataclass(frozen=True)
class CaughtUp:
    """Everything the peer held as of ``peer_head`` has been delivered here."""

    peer_head: VectorClock


@dataclass(frozen=True)
class ProtocolError:
    """The peer broke the protocol (or was refused); the session closes right after this event."""

    reason: str
    error: RayflowError


@dataclass(frozen=True)
class Closed:
    """The session is over. ``initiator`` is ``"local"``, ``"peer"`` (its Goodbye) or ``"transport"``."""

    reason: str
    initiator: str


Event = PeerIdentified | DeltasReceived | CaughtUp | ProtocolError | Closed


class SessionState(enum.Enum):
    NEW = "new"  # nothing sent or received
    HELLO_SENT = "hello_sent"  # our Hello is out, the peer's not yet in
    PROVING = "proving"  # both Hellos exchanged and our Proof out; the peer's Proof not yet verified
    ESTABLISHED = "established"  # the peer's Proof verified (ours is out too)
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionStats:
    """Counters of one session, for metrics and tests."""

    deltas_sent: int
    delta_bytes_sent: int
    deltas_received: int
    delta_bytes_received: int
    #: Credit we may still use towards the peer, and what the peer may still use towards us.
    send_credit: int
    receive_credit: int
    pulls_sent: int
    pulls_received: int
    messages_sent: int
    messages_received: int


class PeerSession:
    """This replica's state for one connection to one peer replica (sans-IO, symmetric).

    ``identity`` is this replica's credential and key, and names this replica (:attr:`local_id`);
    ``trust`` is what it pins to recognise its peers, and names the federation. ``role`` is
    ``"initiator"`` on the side that opened the transport connection and ``"responder"`` on the
    side that accepted it. ``binding`` is :func:`~rayflow.sync.identity.channel_binding` of the
    responder's TLS CA certificate: the one the initiator pinned for this peer, or the
    responder's own. ``clock`` gives unix seconds, against which credentials expire.
    """

    def __init__(
        self,
        source: DeltaSource,
        applied: VectorClock,
        *,
        identity: ReplicaIdentity,
        trust: FederationTrust,
        role: str,
        binding: bytes,
        clock: Callable[[], float],
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        expected_peer: str | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        if not isinstance(identity, ReplicaIdentity):
            raise ConfigError(f"identity must be a ReplicaIdentity, not {type(identity).__name__}")
        if not isinstance(trust, FederationTrust):
            raise ConfigError(f"trust must be a FederationTrust, not {type(trust).__name__}")
        if identity.credential.federation != trust.federation:
            raise ConfigError(
                "the replica's credential is of another federation than the one it trusts",
                credential=identity.credential.federation,
                trust=trust.federation,
            )
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}: {role!r}")
        if not isinstance(binding, bytes) or len(binding) != 32:
            raise ConfigError(
                "binding must be the 32-byte channel_binding() of the responder's CA certificate"
            )
        if not callable(clock):
            raise ConfigError("clock must be a callable returning unix seconds")
        local_id = identity.replica_id
        if expected_peer is not None:
            try:
                validate_replica_id(expected_peer)
            except InvalidInputError as exc:
                raise ConfigError(exc.message) from None
        if expected_peer == local_id:
            raise ConfigError("expected_peer is this replica's own id")
        if not callable(getattr(source, "head", None)) or not callable(getattr(source, "deltas_after", None)):
            raise ConfigError("source must have head() and deltas_after(vector, max_bytes)")
        if not isinstance(applied, VectorClock):
            raise ConfigError(f"applied must be a VectorClock, not {type(applied).__name__}")
        _check_option(window_bytes, MAX_WINDOW_BYTES, "window_bytes")
        _check_option(max_batch_bytes, MAX_BATCH_BYTES, "max_batch_bytes")
        self._identity = identity
        self._trust = trust
        self._role = role
        self.local_id = local_id
        self.federation = trust.federation
        self.expected_peer = expected_peer
        self.window_bytes = window_bytes
        self.max_batch_bytes = max_batch_bytes
        self._source = source
        self._state = SessionState.NEW
        self._reader = frame_reader()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._binding = binding
        self._clock = clock
        self._nonce = new_nonce()
        #: The peer's Hello once accepted, and the transcript both sides sign; the peer is
        #: identified only once its Proof of that transcript verifies.
        self._peer: Hello | None = None
        self._transcript = b""
        self._peer_credential: ReplicaCredential | None = None
        self.protocol: int | None = None

        # Receiving: what we hold, and the credit we granted.
        self._window = ReceiveWindow(
            applied, max_buffered=max_buffered, max_buffered_bytes=max_buffered_bytes
        )
        #: What the shell reported durable (and the local head, durable by definition).
        self._durable = applied
        self._local_head = applied
        #: Delivered deltas not yet durable, per origin in delivery order: (seq, size). Their
        #: credit returns when the durable vector covers them.
        self._undurable: dict[str, deque[tuple[int, int]]] = {}
        self._received_bytes = 0
        self._credit_given_back = 0
        self._credit_to_give_back = 0
        self._pull_wanted = False
        self._last_pull_after: VectorClock | None = None
        self._peer_head = VectorClock()

        # Sending: what the peer has, what we sent it, and the credit it granted.
        self._peer_window = 0
        self._sent_bytes = 0
        self._credit_returned = 0
        #: Proven held by the peer: its Hello, Acks, Notifies, heads, and deltas it sent us.
        self._peer_has = VectorClock()
        #: What we serve after: ``_peer_has`` joined with everything sent since (rewound by Pull).
        self._cursor = VectorClock()
        self._batch_cap = max_batch_bytes
        self._serve_pending = False
        self._owe_up_to = False
        self._notified: VectorClock | None = None

        self._deltas_sent = 0
        self._deltas_received = 0
        self._pulls_sent = 0
        self._pulls_received = 0
        self._messages_sent = 0
        self._messages_received = 0

    # --- observation --------------------------------------------------------------------------
    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is SessionState.CLOSED

    @property
    def peer_id(self) -> str | None:
        """The peer's replica id, once its Proof verified."""
        return None if self._peer_credential is None else self._peer_credential.replica_id

    @property
    def peer_known(self) -> VectorClock:
        """What the peer is known to hold (its Hello, Acks and Notifies, and what it sent)."""
        return self._peer_has

    @property
    def peer_head(self) -> VectorClock:
        """The latest head the peer announced (``up_to`` or Notify)."""
        return self._peer_head

    @property
    def delivered(self) -> VectorClock:
        """What this session has delivered or been told is durable: its receive window's applied vector."""
        return self._window.applied

    @property
    def window(self) -> ReceiveWindow:
        """The receive window (read it; the session drives it)."""
        return self._window

    @property
    def stats(self) -> SessionStats:
        return SessionStats(
            deltas_sent=self._deltas_sent,
            delta_bytes_sent=self._sent_bytes,
            deltas_received=self._deltas_received,
            delta_bytes_received=self._received_bytes,
            send_credit=self._peer_window - (self._sent_bytes - self._credit_returned),
            receive_credit=self.window_bytes - (self._received_bytes - self._credit_given_back),
            pulls_sent=self._pulls_sent,
            pulls_received=self._pulls_received,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
        )

    # --- inputs from the shell ----------------------------------------------------------------
    def connect(self) -> None:
        """Start the handshake: queue our Hello (a no-op once it is sent or the session closed)."""
        if self._state is SessionState.NEW:
            self._send_hello()

    def receive(self, data: bytes) -> None:
        """Bytes the transport delivered, split or merged anyhow. Never raises for their content."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"receive() takes bytes, not {type(data).__name__}")
        if self.closed:
            return
        try:
            # One frame at a time: a bad frame then costs only itself and what follows it.
            bodies = self._reader.feed(bytes(data), max_frames=1)
            while bodies and not self.closed:
                self._messages_received += 1
                self._handle(decode_message(bodies[0]))
                bodies = self._reader.feed(b"", max_frames=1)
        except _ClockError as misuse:
            # The caller's clock, not the peer, failed: the session cannot go on, and says why.
            self.close("the local clock failed")
            raise misuse.error from None
        except RayflowError as error:
            self._fail(error)

    def local_changed(self) -> None:
        """The local log grew (a local commit, or deltas applied from any peer): serve and re-check."""
        if self.closed:
            return
        head = self._read_head()
        self._learn_durable(head)
        self._serve_pending = True

    def applied(self, vector: VectorClock) -> None:
        """Everything in ``vector`` is durable in the local store now: credit for it is returned."""
        if not isinstance(vector, VectorClock):
            raise InvalidInputError(f"applied() takes a VectorClock, not {type(vector).__name__}")
        if not self.closed:
            self._learn_durable(vector)

    def close(self, reason: str = "closed") -> None:
        """End the session: queue a Goodbye for the peer and emit :class:`Closed`."""
        if self.closed:
            return
        reason = str(reason)[:MAX_REASON_LENGTH]
        self._send(Goodbye(reason))
        self._close(reason, "local")

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The transport ended (reset, timeout, end of stream): emit :class:`Closed`."""
        if self.closed:
            return
        self._out.clear()
        self._close(str(reason)[:MAX_REASON_LENGTH], "transport")

    # --- outputs to the shell -----------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now: control messages, then delta batches within credit.

        Delta batches are read from the source here, on demand; errors of the source propagate.
        """
        if self._state is SessionState.ESTABLISHED:
            self._flush_ack()
            self._flush_pull()
            if self._serve_pending:
                self._serve()
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> Event | None:
        """The next event, or None when there is none (drain after every call into the session)."""
        return self._events.popleft() if self._events else None

    # --- handling messages --------------------------------------------------------------------
    def _handle(self, message: Message) -> None:
        if isinstance(message, Goodbye):
            self._out.clear()
            self._close(message.reason, "peer")
            return
        if isinstance(message, Hello):
            self._on_hello(message)
            return
        if self._peer is None:
            raise InvalidInputError(f"expected a hello first, got {message.TYPE}")
        if isinstance(message, Proof):
            self._on_proof(message)
            return
        if self._state is not SessionState.ESTABLISHED:
            raise AuthError(f"the peer sent {message.TYPE} before proving its identity")
        if isinstance(message, Deltas):
            self._on_deltas(message)
        elif isinstance(message, Ack):
            self._on_ack(message)
        elif isinstance(message, Pull):
            self._on_pull(message)
        else:
            assert isinstance(message, Notify)
            self._learn_peer_has(message.head)
            self._peer_head = self._peer_head.merge(message.head)

    def _on_hello(self, hello: Hello) -> None:
        if self._peer is not None:
            raise InvalidInputError("a second hello in one session")
        if hello.federation != self.federation:
            raise PermissionDeniedError("the peer belongs to another federation", federation=hello.federation)
        if hello.replica_id != hello.credential.replica_id:
            raise AuthError(
                "the peer's hello names another replica than its credential",
                hello=hello.replica_id,
                credential=hello.credential.replica_id,
            )
        if hello.replica_id == self.local_id:
            raise InvalidInputError("the peer has this replica's own id (connected to itself?)")
        if self.expected_peer is not None and hello.replica_id != self.expected_peer:
            raise AuthError(
                "the peer is not the replica expected on this connection",
                expected=self.expected_peer,
                got=hello.replica_id,
            )
        # A stranger's, expired or revoked credential is refused before we sign anything for it
        # (and, on a responder, before we show it our own credential).
        self._trust.check(hello.credential, now=self._now())
        self._peer = hello
        self.protocol = min(PROTOCOL_VERSION, hello.protocol)
        if self._state is SessionState.NEW:
            self._send_hello()
        if self._role == "initiator":
            ids, nonces = (self.local_id, hello.replica_id), (self._nonce, hello.nonce)
        else:
            ids, nonces = (hello.replica_id, self.local_id), (hello.nonce, self._nonce)
        self._transcript = transcript(self.federation, *ids, *nonces, self._binding)
        self._send(Proof(self._identity.prove(self._transcript)))
        self._state = SessionState.PROVING

    def _on_proof(self, proof: Proof) -> None:
        if self._state is not SessionState.PROVING:
            raise InvalidInputError("a second proof in one session")
        hello = self._peer
        assert hello is not None
        verify_proof(self._trust, hello.credential, self._transcript, proof.signature, now=self._now())
        self._peer_credential = hello.credential
        self._peer_window = hello.window_bytes
        self._peer_has = hello.applied
        self._cursor = hello.applied
        self._state = SessionState.ESTABLISHED
        self._events.append(PeerIdentified(hello.replica_id, hello.applied))
        self._serve_pending = True
        self._owe_up_to = True

    def _now(self) -> float:
        now = self._clock()
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise _ClockError(ConfigError(f"the clock returned {now!r}, not unix seconds"))
        return now

    def _on_deltas(self, message: Deltas) -> None:
        delivered: list[Delta] = []
        highest: dict[str, int] = {}
        own_seq = max(self._durable.get(self.local_id), self._local_head.get(self.local_id))
        for delta in message.deltas:
            size = delta.size
            outstanding = self._received_bytes - self._credit_given_back
            if outstanding > 0 and outstanding + size > self.window_bytes:
                raise InvalidInputError(
                    "the peer sent deltas beyond the credit granted",
                    outstanding=outstanding,
                    size=size,
                    window=self.window_bytes,
                )
            if delta.origin == self.local_id and delta.seq > own_seq:
                raise InvalidInputError("the peer sent a change of this replica that it never made")
            self._received_bytes += size
            self._deltas_received += 1
            if delta.seq > highest.get(delta.origin, 0):
                highest[delta.origin] = delta.seq
            ready = self._window.offer(delta)
            if any(item.key == delta.key for item in ready):
                self._undurable.setdefault(delta.origin, deque()).append((delta.seq, size))
            else:
                # A duplicate, or held back or dropped by the window (bounded on its own): the
                # peer's credit need not wait for it.
                self._credit_to_give_back += size
            delivered.extend(ready)
        self._learn_peer_has(VectorClock.of(highest))
        if delivered:
            self._events.append(DeltasReceived(tuple(delivered)))
        if message.up_to is not None:
            self._learn_peer_has(message.up_to)
            self._peer_head = self._peer_head.merge(message.up_to)
            if message.up_to <= self._window.applied:
                self._events.append(CaughtUp(message.up_to))
            else:
                self._pull_wanted = True

    def _on_ack(self, ack: Ack) -> None:
        outstanding = self._sent_bytes - self._credit_returned
        if ack.window_bytes > outstanding:
            raise InvalidInputError(
                "the peer returned more credit than was used", returned=ack.window_bytes, used=outstanding
            )
        self._credit_returned += ack.window_bytes
        self._learn_peer_has(ack.applied)
        self._serve_pending = True

    def _on_pull(self, pull: Pull) -> None:
        self._pulls_received += 1
        self._cursor = pull.after.merge(self._peer_has)
        self._batch_cap = min(self.max_batch_bytes, pull.max_bytes)
        self._owe_up_to = True
        self._serve_pending = True

    # --- state updates ------------------------------------------------------------------------
    def _learn_peer_has(self, vector: VectorClock) -> None:
        if not vector <= self._peer_has:
            self._peer_has = self._peer_has.merge(vector)
        if not vector <= self._cursor:
            self._cursor = self._cursor.merge(vector)

    def _read_head(self) -> VectorClock:
        head = self._source.head()
        if not isinstance(head, VectorClock):
            raise InvalidInputError(
                f"the delta source's head() returned {type(head).__name__}, not a VectorClock"
            )
        self._local_head = self._local_head.merge(head)
        return head

    def _learn_durable(self, vector: VectorClock) -> None:
        if vector <= self._durable:
            return
        self._durable = self._durable.merge(vector)
        if not self._durable <= self._window.applied:
            # Changes that reached the store another way (another peer, a local commit): deltas
            # held back for them may go now, and copies of them still to come are duplicates.
            ready = self._window.reset_to(self._window.applied.merge(self._durable))
            if ready:
                self._events.append(DeltasReceived(tuple(ready)))
        for origin, pending in self._undurable.items():
            durable_seq = self._durable.get(origin)
            while pending and pending[0][0] <= durable_seq:
                self._credit_to_give_back += pending.popleft()[1]

    # --- producing messages -------------------------------------------------------------------
    def _send(self, message: Message) -> None:
        self._out += frame_message(message)
        self._messages_sent += 1

    def _send_hello(self) -> None:
        self._send(
            Hello(
                self.local_id,
                self.federation,
                PROTOCOL_VERSION,
                self._durable,
                self.window_bytes,
                self._identity.credential,
                self._nonce,
            )
        )
        self._state = SessionState.HELLO_SENT

    def _flush_ack(self) -> None:
        while self._credit_to_give_back > 0:
            amount = min(self._credit_to_give_back, MAX_WINDOW_BYTES)
            self._send(Ack(self._durable, amount))
            self._credit_to_give_back -= amount
            self._credit_given_back += amount

    def _flush_pull(self) -> None:
        if not self._pull_wanted:
            return
        self._pull_wanted = False
        after = self._window.wants()
        # Pull again only after progress: a peer that cannot serve what it announced must not
        # make the two sides loop.
        if after != self._last_pull_after:
            self._last_pull_after = after
            self._send(Pull(after, self.max_batch_bytes))
            self._pulls_sent += 1

    def _serve(self) -> None:
        """Send what the peer lacks, batch by batch, while credit lasts."""
        self._serve_pending = False
        head = self._read_head()
        while True:
            if head <= self._cursor:
                if self._owe_up_to:
                    self._send(Deltas((), head))
                    self._owe_up_to = False
                return
            outstanding = self._sent_bytes - self._credit_returned
            if outstanding > 0 and outstanding >= self._peer_window:
                self._notify(head)
                return
            limit = max(1, min(self._batch_cap, self._peer_window - outstanding))
            batch = self._source.deltas_after(self._cursor, limit)
            taken, blocked = self._take(batch, outstanding)
            if not taken:
                if blocked:
                    self._notify(head)
                # Otherwise the source holds nothing the cursor lacks (its head ran ahead of
                # its log, or it broke its contract): wait for the next change or Ack.
                return
            message, frame = self._fit(taken, head)
            self._out += frame
            self._messages_sent += 1
            for delta in message.deltas:
                self._cursor = self._cursor.advance(delta.origin, delta.seq)
            self._sent_bytes += message.size
            self._deltas_sent += len(message.deltas)
            if message.up_to is not None:
                self._owe_up_to = False
                return

    def _take(self, batch: Sequence[Delta], outstanding: int) -> tuple[list[Delta], bool]:
        """The prefix of ``batch`` to send now; and whether credit (not the source) stopped it."""
        taken: list[Delta] = []
        total = 0
        cursor = self._cursor
        for delta in batch:
            if not isinstance(delta, Delta):
                raise InvalidInputError(f"the delta source returned {type(delta).__name__}, not a Delta")
            if delta.seq <= cursor.get(delta.origin):
                continue
            if taken and (total + delta.size > self._batch_cap or len(taken) >= MAX_DELTAS_PER_MESSAGE):
                break
            in_flight = outstanding + total
            if in_flight > 0 and in_flight + delta.size > self._peer_window:
                return taken, True
            taken.append(delta)
            total += delta.size
            cursor = cursor.advance(delta.origin, delta.seq)
        return taken, False

    def _fit(self, taken: list[Delta], head: VectorClock) -> tuple[Deltas, bytes]:
        """The Deltas message (and its frame) for the longest prefix of ``taken`` that fits one frame."""
        while True:
            cursor = self._cursor
            for delta in taken:
                cursor = cursor.advance(delta.origin, delta.seq)
            message = Deltas(tuple(taken), head if head <= cursor else None)
            try:
                frame = frame_message(message)
            except PayloadTooLargeError:
                if len(taken) == 1:
                    raise
                # Delta.size counts characters, not UTF-8 bytes: rare batches of wide names
                # encode larger than budgeted.
                taken = taken[: len(taken) // 2]
                continue
            return message, frame

    def _notify(self, head: VectorClock) -> None:
        if head != self._notified and not head <= self._peer_has:
            self._notified = head
            self._send(Notify(head))

    # --- ending -------------------------------------------------------------------------------
    def _fail(self, error: RayflowError) -> None:
        reason = str(error.message)[:MAX_REASON_LENGTH]
        self._events.append(ProtocolError(reason, error))
        self._send(Goodbye(reason))
        self._close(reason, "local")

    def _close(self, reason: str, initiator: str) -> None:
        self._state = SessionState.CLOSED
        self._reader = frame_reader()
        self._events.append(Closed(reason, initiator))


class _ClockError(Exception):
    """Carries the caller's clock failure through :meth:`PeerSession.receive`, which would
    otherwise blame the peer for any :class:`RayflowError`."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(error.message)
        self.error = error


def _check_option(value: object, high: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
        raise ConfigError(f"{name} must be an integer in 1..{high}: {value!r}")
