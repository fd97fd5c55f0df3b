"""One long-lived byte stream between two endpoints over QUIC: the transport of hub-to-hub sync.

The RPC (:mod:`rayflow.rpc.quic_server`) is request/response, a stream per call. Replication is a
conversation that lasts as long as the connection (hello, proofs, pulls, pushes, acks), so it
gets its own ALPN and exactly one bidirectional stream per connection: the first one the
initiator opens. Everything the conversation means lives in a sans-IO session
(:class:`rayflow.sync.peer_session.PeerSession`); this module only moves its bytes, and tells
the owner when bytes arrived and when the connection ended, through a :class:`LinkHandler`.

Why a handler object rather than callbacks per event: the owner decides, after each batch of
input, what to apply and what to send (the session's events drive a store), and must see the
connection end exactly once, whatever ended it (the peer, an idle timeout, a bad frame, close).

Certificates: the server presents the hub's TLS certificate (:func:`rayflow.rpc.tls.ensure_server_tls`);
a client pins the peer's CA certificate and checks the name, as the RPC client does. Who the peer
*is* (a member of the federation) is proved inside the stream by the session, not here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from rayflow.errors import TransportError
from rayflow.rpc.quic_server import listen_quic
from rayflow.rpc.tls import ensure_server_tls

logger = logging.getLogger(__name__)

#: The ALPN of hub-to-hub sync (version 1 of the sync protocol).
SYNC_ALPN = "rayflow-sync/1"
#: QUIC stream flow-control window per connection; the session's own credit bounds what it sends.
STREAM_WINDOW_BYTES = 16 * 1024 * 1024


class Link(Protocol):
    """What a handler may do with its connection."""

    def send(self, data: bytes) -> None: ...

    def close(self, reason: str = "") -> None: ...


class LinkHandler(Protocol):
    """The owner's side of one connection."""

    def opened(self, link: Link) -> None:
        """The connection is up (called once, before any ``received``). The initiator's stream
        exists and it may send; the responder answers once bytes arrived (its sends before the
        initiator's first bytes are dropped: the stream does not exist yet)."""

    def received(self, data: bytes) -> None:
        """Bytes of the stream, in order, in chunks of any size."""

    def lost(self, reason: str) -> None:
        """The connection ended (called once; nothing is received or sent after it)."""


class _LinkProtocol(QuicConnectionProtocol):
    """One QUIC connection carrying one link."""

    def __init__(
        self, quic: QuicConnection, stream_handler: Any = None, *, handler: LinkHandler | None = None
    ) -> None:
        super().__init__(quic, stream_handler)
        self.handler: LinkHandler | None = handler
        self.stream_id: int | None = None
        self.ended = False
        self.ready: asyncio.Future[None] = self._loop.create_future()
        #: Called once when the link ends (the client closes its UDP socket then).
        self.on_end: Callable[[], None] | None = None

    # -- the Link a handler sees ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.ended or self.stream_id is None or not data:
            return
        self._quic.send_stream_data(self.stream_id, data)
        self.transmit()

    def close(self, reason: str = "") -> None:
        if self.ended:
            return
        self._quic.close(reason_phrase=reason[:200])
        self.transmit()
        self._end(reason or "closed")

    # -- aioquic hooks --------------------------------------------------------------------------
    def open_stream(self) -> None:
        """The initiator's side: open the one stream and tell the handler."""
        self.stream_id = self._quic.get_next_available_stream_id()
        self._opened()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if self.ended:
            return
        try:
            self._handle(event)
        except Exception:
            # A handler bug must not reach the event loop or the other connections.
            logger.exception("sync link failed; closing it")
            self.close("internal error")

    def _handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            if not self.ready.done():
                self.ready.set_result(None)
            if not self._quic.configuration.is_client:
                # The responder's handler starts now, not at the first byte: a peer that connects
                # and says nothing is still on its clock (and counted against the node's bound).
                self._opened()
        elif isinstance(event, events.StreamDataReceived):
            if self.stream_id is None:
                self.stream_id = event.stream_id  # the responder: the initiator's first stream
            if event.stream_id != self.stream_id:
                self.close("one stream per sync connection")
                return
            if event.data and self.handler is not None:
                self.handler.received(event.data)
            if event.end_stream:
                self.close("the peer ended the stream")
        elif isinstance(event, events.StreamReset):
            self.close("the peer reset the stream")
        elif isinstance(event, events.ConnectionTerminated):
            self._end(event.reason_phrase or f"QUIC error {event.error_code}")

    def _opened(self) -> None:
        if self.handler is not None:
            self.handler.opened(self)

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.ready.done():
            self.ready.set_exception(TransportError(f"sync connection failed: {reason}"))
            self.ready.exception()  # nobody may be waiting
        try:
            if self.handler is not None:
                self.handler.lost(reason)
        finally:
            if self.on_end is not None:
                # ``close`` sent the CONNECTION_CLOSE frame synchronously; the socket can go.
                self._loop.call_soon(self.on_end)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end(str(exc) if exc else "the connection was lost")


class StreamLinkServer:
    """Accepts sync connections on one UDP socket; ``new_handler()`` makes the handler of each."""

    def __init__(
        self,
        new_handler: Callable[[], LinkHandler],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_dir: str,
        server_names: Sequence[str] = (),
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.new_handler = new_handler
        self.host = host
        self.port = port
        self.tls_dir = tls_dir
        self.server_names = tuple(server_names)
        self.idle_timeout_s = idle_timeout_s
        self.ca_pem = b""
        self._server: QuicServer | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the sync server is not started")
        return self._address

    async def start(self) -> None:
        tls_files = ensure_server_tls(self.tls_dir, [self.host, *self.server_names])
        self.ca_pem = tls_files.ca_pem
        configuration = QuicConfiguration(
            alpn_protocols=[SYNC_ALPN],
            is_client=False,
            idle_timeout=self.idle_timeout_s,
            max_data=STREAM_WINDOW_BYTES,
            max_stream_data=STREAM_WINDOW_BYTES,
        )
        configuration.load_cert_chain(tls_files.server_cert_path, tls_files.server_key_path)
        self._server, self._address = await listen_quic(
            self.host,
            self.port,
            lambda: QuicServer(configuration=configuration, create_protocol=self._create_protocol),
        )

    def _create_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> _LinkProtocol:
        return _LinkProtocol(quic, stream_handler, handler=self.new_handler())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


async def open_link(
    handler: LinkHandler,
    host: str,
    port: int,
    *,
    ca_pem: bytes,
    server_name: str | None = None,
    connect_timeout_s: float = 10.0,
    idle_timeout_s: float = 60.0,
) -> Link:
    """Connect to a sync server (its CA pinned), open the stream and hand it to ``handler``.

    Returns once the handshake completed and ``handler.opened`` ran; the connection then lives on
    the running loop until either side closes it (``handler.lost`` says when; its UDP socket is
    closed then). A peer not reached within ``connect_timeout_s`` is a :class:`TransportError`.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve {host!r}: {exc}") from None
    family, _, _, _, address = infos[0]
    configuration = QuicConfiguration(
        alpn_protocols=[SYNC_ALPN],
        is_client=True,
        idle_timeout=idle_timeout_s,
        max_data=STREAM_WINDOW_BYTES,
        max_stream_data=STREAM_WINDOW_BYTES,
        server_name=server_name or host,
        verify_mode=ssl.CERT_REQUIRED,
    )
    configuration.load_verify_locations(cadata=ca_pem)
    quic = QuicConnection(configuration=configuration)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _LinkProtocol(quic, handler=handler), sock=sock
        )
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot open a UDP socket: {exc}") from None
    link: _LinkProtocol = protocol  # type: ignore[assignment]
    link.on_end = transport.close
    link.connect(address)
    try:
        await asyncio.wait_for(asyncio.shield(link.ready), timeout=connect_timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        link.close("no handshake")
        raise TransportError(
            f"no handshake with the sync peer at {host}:{port} within {connect_timeout_s:g} s"
        ) from None
    link.open_stream()
    return link
