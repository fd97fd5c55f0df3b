"""The RPC server: aioquic connections driving the sans-IO protocol, with handlers run as tasks.

A thin shell: every decision (limits, framing, early data, timeouts) is made by
:class:`~rayflow.wire.rpc_protocol.RpcServerConnection` and :class:`~rayflow.rpc.dispatch.Dispatcher`;
this module moves their events onto QUIC streams. One bad client never takes the server down: a
failure on a stream is answered or the stream reset, and an unexpected error while handling a
connection's events closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from rayflow.rpc.dispatch import Authenticate, Dispatcher
from rayflow.rpc.tickets import DEFAULT_TICKET_TTL_S, SessionTicketStore
from rayflow.rpc.tls import ensure_server_tls
from rayflow.wire.rpc_frames import DEFAULT_MAX_FRAME_BYTES
from rayflow.wire.rpc_protocol import (
    DEFAULT_ALPN,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_STREAM_READ_TIMEOUT_S,
    STREAM_REFUSED,
    STREAM_TIMED_OUT,
    CallAbandoned,
    CallReceived,
    ProtocolFailure,
    RpcServerConnection,
    StreamRefused,
)

logger = logging.getLogger(__name__)


def send_side_done(quic: QuicConnection, stream_id: int) -> bool:
    """True once everything we sent on a stream is acknowledged (or the stream was reset or dropped).

    aioquic has no public delivery notification, so this reads its stream table; a stream it no
    longer tracks is done.
    """
    stream = quic._streams.get(stream_id)
    return stream is None or stream.sender.is_finished


async def listen_quic(
    host: str, port: int, make_server: Callable[[], QuicServer]
) -> tuple[QuicServer, tuple[str, int]]:
    """Bind a UDP socket at ``host:port`` (0: any free port) and serve QUIC on it; returns the
    server and the address really bound. A port in use raises :class:`OSError`."""
    loop = asyncio.get_running_loop()
    family, _, _, _, sockaddr = (await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    server = make_server()
    await loop.create_datagram_endpoint(lambda: server, sock=sock)
    bound = sock.getsockname()
    return server, (bound[0], bound[1])


class _ServerConnectionProtocol(QuicConnectionProtocol):
    """One QUIC connection of the server: feeds the sans-IO state, runs calls, sends answers."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, server: RpcServer) -> None:
        super().__init__(quic, stream_handler)
        self._server = server
        self._rpc = server._new_connection_state()
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None
        self._failed = False

    # --- aioquic hooks ------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        # Acknowledgements arrive in datagrams: release the bytes of answers the peer now holds.
        for stream_id in self._rpc.awaiting_delivery():
            if send_side_done(self._quic, stream_id):
                self._rpc.response_delivered(stream_id)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if self._failed:
            return
        try:
            self._handle(event)
        except Exception:
            # A bug or an unexpected state on this connection must not reach the event loop (or
            # the other connections): drop this one.
            logger.exception("RPC connection failed; closing it")
            self._fail_connection()

    # --- event handling -----------------------------------------------------------------------
    def _handle(self, event: events.QuicEvent) -> None:
        now = self._loop.time()
        if isinstance(event, events.StreamDataReceived):
            for rpc_event in self._rpc.receive_stream_data(
                event.stream_id, event.data, event.end_stream, now
            ):
                self._apply(rpc_event)
            self._arm_expiry()
        elif isinstance(event, (events.StreamReset, events.StopSendingReceived)):
            for rpc_event in self._rpc.stream_reset(event.stream_id):
                self._apply(rpc_event)
        elif isinstance(event, events.HandshakeCompleted):
            self._rpc.handshake_completed()
        elif isinstance(event, events.ConnectionTerminated):
            self._connection_ended()

    def _apply(self, rpc_event: object) -> None:
        if isinstance(rpc_event, CallReceived):
            task = asyncio.get_running_loop().create_task(self._serve_call(rpc_event))
            self._calls[rpc_event.stream_id] = task
            self._server._tasks.add(task)
            task.add_done_callback(self._server._tasks.discard)
        elif isinstance(rpc_event, ProtocolFailure):
            if rpc_event.stop_receiving:
                self._stop_receiving(rpc_event.stream_id, STREAM_REFUSED)
            self._send_answer(rpc_event.stream_id, rpc_event.frame)
        elif isinstance(rpc_event, CallAbandoned):
            task = self._calls.pop(rpc_event.stream_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(rpc_event, StreamRefused):
            self._stop_receiving(rpc_event.stream_id, STREAM_REFUSED)
            self._transmit_soon()

    async def _serve_call(self, call: CallReceived) -> None:
        try:
            frame = await self._server.dispatcher.answer(
                call.request,
                peer=self._quic.get_peer_address(),
                early_data=call.early_data,
                authenticate=self._server.authenticate,
                max_frame_bytes=self._server.max_response_bytes,
            )
        except asyncio.CancelledError:
            return
        finally:
            self._calls.pop(call.stream_id, None)
        if self._failed or not self._rpc.response_queued(call.stream_id, len(frame)):
            return
        self._send_answer(call.stream_id, frame)

    def _send_answer(self, stream_id: int, frame: bytes) -> None:
        try:
            self._quic.send_stream_data(stream_id, frame, end_stream=True)
        except (ValueError, RuntimeError):
            # The peer reset or stopped the stream meanwhile: nobody reads the answer.
            self._rpc.response_delivered(stream_id)
            return
        self._transmit_soon()

    def _stop_receiving(self, stream_id: int, error_code: int) -> None:
        # aioquic raises ValueError for a stream it already forgot: nothing is left to stop then.
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, error_code)

    # --- timers and teardown ------------------------------------------------------------------
    def _arm_expiry(self) -> None:
        when = self._rpc.next_expiry()
        if when is None or (self._expiry_at is not None and self._expiry_at <= when):
            return
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at = when
        self._expiry_timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        self._expiry_at = None
        if self._failed:
            return
        expired = self._rpc.expire(self._loop.time())
        for stream_id in expired:
            self._stop_receiving(stream_id, STREAM_TIMED_OUT)
            self._quic.reset_stream(stream_id, STREAM_TIMED_OUT)
        if expired:
            logger.info("reset %d RPC streams whose request did not complete in time", len(expired))
            self.transmit()
        self._arm_expiry()

    def _fail_connection(self) -> None:
        self._failed = True
        self._connection_ended()
        self.close(error_code=QuicErrorCode.APPLICATION_ERROR, reason_phrase="internal error")

    def _connection_ended(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
            self._expiry_at = None
        self._rpc.connection_lost()
        for task in list(self._calls.values()):
            task.cancel()
        self._calls.clear()


class RpcServer:
    """Serves a :class:`Dispatcher` over QUIC (TLS 1.3, ALPN ``rayflow/1``) on one UDP socket."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_dir: str,
        alpn: str = DEFAULT_ALPN,
        server_names: Sequence[str] = (),
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_response_bytes: int | None = None,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
        stream_read_timeout_s: float = DEFAULT_STREAM_READ_TIMEOUT_S,
        idle_timeout_s: float = 60.0,
        ticket_ttl_s: float = DEFAULT_TICKET_TTL_S,
        authenticate: Authenticate | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.port = port
        self.tls_dir = tls_dir
        self.alpn = alpn
        self.server_names = tuple(server_names)
        self.max_frame_bytes = max_frame_bytes
        #: Largest answer the server sends; a bigger result becomes a ``payload_too_large`` error.
        self.max_response_bytes = max_response_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_concurrent_calls = max_concurrent_calls
        self.stream_read_timeout_s = stream_read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.authenticate = authenticate
        self.tickets = SessionTicketStore(ttl_s=ticket_ttl_s)
        self.ca_pem: bytes = b""
        self._quic_server: QuicServer | None = None
        self._address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Fail at construction, not at the first connection, on inconsistent limits.
        self._new_connection_state()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on; the real port when started with port 0."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        return self._address

    def _new_connection_state(self) -> RpcServerConnection:
        return RpcServerConnection(
            max_frame_bytes=self.max_frame_bytes,
            max_inflight_bytes=self.max_inflight_bytes,
            max_concurrent_calls=self.max_concurrent_calls,
            stream_read_timeout_s=self.stream_read_timeout_s,
        )

    def _configuration(self) -> QuicConfiguration:
        tls_files = ensure_server_tls(self.tls_dir, [self.host, *self.server_names])
        self.ca_pem = tls_files.ca_pem
        configuration = QuicConfiguration(
            alpn_protocols=[self.alpn],
            is_client=False,
            idle_timeout=self.idle_timeout_s,
            # The connection window starts at the in-flight bound; aioquic widens it as data is
            # consumed, and the sans-IO state enforces the real bound on what is held.
            max_data=self.max_inflight_bytes,
            max_stream_data=min(self.max_frame_bytes + 4, 1024 * 1024),
        )
        configuration.load_cert_chain(tls_files.server_cert_path, tls_files.server_key_path)
        return configuration

    async def start(self) -> None:
        """Generate or load TLS material and start listening."""
        if self._quic_server is not None:
            raise RuntimeError("the server is already started")
        self._quic_server, self._address = await listen_quic(
            self.host,
            self.port,
            lambda: QuicServer(
                configuration=self._configuration(),
                create_protocol=self._create_protocol,
                session_ticket_fetcher=self.tickets.pop,
                session_ticket_handler=self.tickets.add,
            ),
        )

    def _create_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> _ServerConnectionProtocol:
        return _ServerConnectionProtocol(quic, stream_handler, server=self)

    async def close(self) -> None:
        """Close every connection, stop listening and cancel running calls."""
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> RpcServer:  # noqa: PYI034 - the class is not meant to be subclassed
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
