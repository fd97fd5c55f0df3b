"""A hub replica's place in its federation: sync sessions with peer replicas over QUIC, applied to
its bank's store.

:class:`FederationNode` is the asyncio shell around the sans-IO pieces: it listens for peers
(:class:`rayflow.rpc.stream_link.StreamLinkServer`, ALPN ``rayflow-sync/1``), dials the peers it is
told about and keeps dialling them (with backoff) while it runs, runs one
:class:`rayflow.sync.peer_session.PeerSession` per connection, applies what the sessions deliver
to the store (:func:`rayflow.hub.replication.apply_deltas`), and tells every session when the
store's log grew, whether by a local write or by another peer's changes (a store listener), so
new changes flow on without polling.

Why the node and not each session decides when to push: one store feeds every session; a change
applied from peer A must reach peer B, and only the node sees both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import RayflowError
from rayflow.hub.replication import StoreDeltaSource, apply_deltas
from rayflow.memory.store import Change, Store
from rayflow.rpc.stream_link import Link, StreamLinkServer, open_link
from rayflow.sync.identity import FederationTrust, ReplicaIdentity, channel_binding
from rayflow.sync.peer_session import Closed, DeltasReceived, PeerIdentified, PeerSession, ProtocolError
from rayflow.sync.vector_clock import VectorClock

log = logging.getLogger(__name__)

#: Seconds between dial attempts to an unreachable peer: doubling from the first to the last.
DIAL_BACKOFF_S = (0.2, 5.0)
#: Most sync connections a node holds at once (dialled and accepted); more are refused at once.
MAX_CONNECTIONS = 64
#: Seconds a connection may take to prove who it is; one that has not by then is closed.
HANDSHAKE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer replica listens for sync, and the CA its TLS certificate chains to."""

    replica_id: str
    host: str
    port: int
    ca_pem: bytes
    server_name: str | None = None


@dataclass
class PeerStatus:
    """What the node knows of one peer (for status pages and tests)."""

    replica_id: str
    connected: bool = False
    identified: bool = False
    last_error: str = ""
    deltas_received: int = 0
    connects: int = 0


class _Connection:
    """One connection's session, driven by the node (a :class:`LinkHandler`)."""

    def __init__(self, node: FederationNode, session: PeerSession, role: str, expected: str | None) -> None:
        self.node = node
        self.session = session
        self.role = role
        self.expected = expected
        self.link: Link | None = None
        self.peer_id: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # -- LinkHandler -----------------------------------------------------------------------------
    def opened(self, link: Link) -> None:
        self.link = link
        if len(self.node._connections) >= self.node.max_connections:
            # Hostile or not, a node serves a bounded number of peers: refuse before any work.
            link.close("too many sync connections")
            return
        self.node._connections.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.node.handshake_timeout_s, self._check_identified)
        if self.role == "initiator":
            self.session.connect()
        self.pump()

    def _check_identified(self) -> None:
        if self.peer_id is None and self.link is not None and not self.ended.done():
            self.node._status(self.expected or "?").last_error = "no proof of identity in time"
            self.link.close("no proof of identity in time")

    def received(self, data: bytes) -> None:
        self.session.receive(data)
        self.pump()

    def lost(self, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.session.connection_lost(reason)
        self.pump()
        self.node._connections.discard(self)
        if not self.ended.done():
            self.ended.set_result(reason)

    # -- the session's events --------------------------------------------------------------------
    def pump(self) -> None:
        """Handle every pending event, then send what the session wants to send."""
        while (event := self.session.next_event()) is not None:
            if isinstance(event, PeerIdentified):
                self.peer_id = event.peer_id
                status = self.node._status(event.peer_id)
                status.identified = status.connected = True
            elif isinstance(event, DeltasReceived):
                self.node._apply(self, event.deltas)
            elif isinstance(event, ProtocolError):
                log.warning(
                    "sync with %s refused: %s", self.peer_id or self.expected or "a peer", event.reason
                )
                self.node._status(self.peer_id or self.expected or "?").last_error = event.reason
            elif isinstance(event, Closed) and self.peer_id is not None:
                self.node._status(self.peer_id).connected = False
        data = self.session.data_to_send()
        if data and self.link is not None:
            self.link.send(data)
        if self.session.closed and self.link is not None:
            self.link.close("sync session closed")


@dataclass
class FederationNode:
    """One replica's federation endpoint (see the module docstring)."""

    store: Store
    identity: ReplicaIdentity
    trust: FederationTrust
    tls_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    server_names: Sequence[str] = ()
    clock: Callable[[], float] = time.time
    window_bytes: int = 4 * 1024 * 1024
    max_connections: int = MAX_CONNECTIONS
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    _server: StreamLinkServer | None = field(default=None, init=False)
    _connections: set[_Connection] = field(default_factory=set, init=False)
    _dialers: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _peers: dict[str, PeerStatus] = field(default_factory=dict, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen for peers and follow the store's log."""
        self._loop = asyncio.get_running_loop()
        self._server = StreamLinkServer(
            self._accept, host=self.host, port=self.port, tls_dir=self.tls_dir, server_names=self.server_names
        )
        await self._server.start()
        self.store.add_listener(self._store_changed)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start the node first"
        return self._server.address

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate peers pin to reach this node."""
        assert self._server is not None, "start the node first"
        return self._server.ca_pem

    def peer_address(self) -> PeerAddress:
        """How a peer reaches this node."""
        host, port = self.address
        return PeerAddress(self.identity.replica_id, host, port, self.ca_pem)

    def add_peer(self, peer: PeerAddress) -> None:
        """Keep a connection to ``peer`` while the node runs (dialled now, re-dialled when lost)."""
        if peer.replica_id in self._dialers or peer.replica_id == self.identity.replica_id:
            return
        self._status(peer.replica_id)
        self._dialers[peer.replica_id] = asyncio.get_running_loop().create_task(self._keep_dialling(peer))

    async def close(self) -> None:
        self._stopping = True
        for task in self._dialers.values():
            task.cancel()
        await asyncio.gather(*self._dialers.values(), return_exceptions=True)
        self._dialers.clear()
        for connection in list(self._connections):
            if connection.link is not None:
                connection.link.close("the replica is stopping")
        if self._server is not None:
            await self._server.close()
            self._server = None

    # -- status ----------------------------------------------------------------------------------
    def peers(self) -> dict[str, PeerStatus]:
        return dict(self._peers)

    def _status(self, replica_id: str) -> PeerStatus:
        return self._peers.setdefault(replica_id, PeerStatus(replica_id))

    # -- sessions --------------------------------------------------------------------------------
    def _session(self, role: str, binding: bytes, expected: str | None) -> PeerSession:
        return PeerSession(
            identity=self.identity,
            trust=self.trust,
            source=StoreDeltaSource(self.store),
            applied=VectorClock.of(self.store.version_vector()),
            role=role,
            binding=binding,
            clock=self.clock,
            expected_peer=expected,
            window_bytes=self.window_bytes,
        )

    def _accept(self) -> _Connection:
        # The responder binds the handshake to its own trust anchor, as the initiator pinned it.
        return _Connection(
            self, self._session("responder", channel_binding(self.ca_pem), None), "responder", None
        )

    async def _keep_dialling(self, peer: PeerAddress) -> None:
        delay = DIAL_BACKOFF_S[0]
        status = self._status(peer.replica_id)
        while not self._stopping:
            session = self._session("initiator", channel_binding(peer.ca_pem), peer.replica_id)
            connection = _Connection(self, session, "initiator", peer.replica_id)
            try:
                await open_link(
                    connection, peer.host, peer.port, ca_pem=peer.ca_pem, server_name=peer.server_name
                )
            except RayflowError as exc:
                status.last_error = exc.message
            else:
                status.connects += 1
                reason = await connection.ended
                status.last_error = reason
                if status.identified:
                    delay = DIAL_BACKOFF_S[0]  # it worked: the next loss is retried quickly
            await asyncio.sleep(delay)  # backoff between dial attempts, not a stand-in for work
            delay = min(delay * 2, DIAL_BACKOFF_S[1])

    def _apply(self, connection: _Connection, deltas: Sequence[Any]) -> None:
        apply_deltas(self.store, deltas)
        if connection.peer_id is not None:
            self._status(connection.peer_id).deltas_received += len(deltas)
        connection.session.applied(VectorClock.of(self.store.version_vector()))

    def _store_changed(self, changes: Sequence[Change]) -> None:
        # Runs on whichever thread committed; the sessions live on the node's loop.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._push)

    def _push(self) -> None:
        for connection in list(self._connections):
            connection.session.local_changed()
            connection.pump()
