"""The RPC client: one QUIC connection carrying many concurrent calls, resumed with 0-RTT.

A thin shell over :class:`~rayflow.wire.rpc_protocol.RpcClientCalls`. Each call opens a stream, sends
one request frame and waits for the answer; the connection is opened on demand and reused while
alive. The last TLS session ticket the server sent is kept, so the next connection resumes the
session and calls the caller marks ``idempotent`` go out as 0-RTT early data, before the handshake
finishes; other calls wait for the handshake, because early data can be replayed by an attacker.

The server's CA certificate is pinned (``ca_pem``): no public trust store, and certificate checks
are always on. :class:`SyncRpcClient` drives the same client from synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from rayflow.errors import DeadlineExceededError, TooEarlyError, TransportError
from rayflow.wire.rpc_protocol import (
    DEFAULT_ALPN,
    DEFAULT_MAX_RESPONSE_BYTES,
    STREAM_CANCELLED,
    CallCompleted,
    CallFailed,
    ClientEvent,
    RpcClientCalls,
)

T = TypeVar("T")


@dataclass(frozen=True)
class HandshakeInfo:
    """How a connection's TLS handshake went."""

    alpn_protocol: str | None
    session_resumed: bool
    early_data_accepted: bool
    #: Seconds from sending the first packet to the handshake's completion.
    duration_s: float


class _ClientConnectionProtocol(QuicConnectionProtocol):
    """One QUIC connection of the client: routes stream events to the pending calls."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, max_response_bytes: int) -> None:
        super().__init__(quic, stream_handler)
        self.calls = RpcClientCalls(max_response_bytes=max_response_bytes)
        self.handshake: asyncio.Future[HandshakeInfo] = self._loop.create_future()
        self.started_at = self._loop.time()
        self.terminated = False
        self.early_data_possible = False
        self._waiters: dict[int, asyncio.Future[Any]] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._resolve(self.calls.receive_stream_data(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, events.StreamReset):
            # STOP_SENDING alone is not a failure: the server sends it when refusing a request
            # and still answers the refusal on the stream.
            self._resolve(self.calls.stream_reset(event.stream_id))
        elif isinstance(event, events.HandshakeCompleted):
            if not self.handshake.done():
                self.handshake.set_result(
                    HandshakeInfo(
                        alpn_protocol=event.alpn_protocol,
                        session_resumed=event.session_resumed,
                        early_data_accepted=event.early_data_accepted,
                        duration_s=self._loop.time() - self.started_at,
                    )
                )
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = True
            reason = event.reason_phrase or f"QUIC error {event.error_code}"
            if not self.handshake.done():
                self.handshake.set_exception(TransportError(f"handshake failed: {reason}"))
                # Nobody may be waiting on it (an early-data call that failed first).
                self.handshake.exception()
            self._resolve(self.calls.connection_lost(reason))

    def start_call(
        self, op: str, args: dict[str, Any], *, token: str, deadline_ms: int | None
    ) -> tuple[int, asyncio.Future[Any]]:
        if self.terminated:
            raise TransportError("the connection is closed")
        stream_id = self._quic.get_next_available_stream_id()
        _, frame = self.calls.start_call(stream_id, op, args, token=token, deadline_ms=deadline_ms)
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._waiters[stream_id] = waiter
        self._quic.send_stream_data(stream_id, frame, end_stream=True)
        self.transmit()
        return stream_id, waiter

    def cancel_call(self, stream_id: int) -> None:
        """The caller gave up: forget the call and tell the server to stop working on it."""
        self._waiters.pop(stream_id, None)
        self.calls.cancel(stream_id)
        if self.terminated:
            return
        self._quic.reset_stream(stream_id, STREAM_CANCELLED)
        # aioquic raises ValueError for a stream it already forgot (the answer was complete).
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, STREAM_CANCELLED)
        self.transmit()

    def fail_pending(self, reason: str) -> None:
        """Fail every call still waiting on this connection (it is being dropped)."""
        self._resolve(self.calls.connection_lost(reason))

    def _resolve(self, client_events: list[ClientEvent]) -> None:
        for client_event in client_events:
            waiter = self._waiters.pop(client_event.stream_id, None)
            if waiter is None or waiter.done():
                continue
            if isinstance(client_event, CallCompleted):
                waiter.set_result(client_event.result)
            elif isinstance(client_event, CallFailed):
                waiter.set_exception(client_event.error)


class RpcClient:
    """Calls ops on one RPC server over a reused QUIC connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_pem: bytes,
        alpn: str = DEFAULT_ALPN,
        server_name: str = "localhost",
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        if not ca_pem:
            raise ValueError("ca_pem is required: the client only trusts the pinned CA")
        self.host = host
        self.port = port
        self.ca_pem = ca_pem
        self.alpn = alpn
        self.server_name = server_name
        self.max_response_bytes = max_response_bytes
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        #: The newest session ticket from the server; the next connection resumes with it.
        self.session_ticket: SessionTicket | None = None
        #: The handshake of the newest connection, once it completed.
        self.last_handshake: HandshakeInfo | None = None
        self._conn: _ClientConnectionProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._open_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- connection lifecycle -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a connection is open (its handshake may still be running)."""
        return self._conn is not None and not self._conn.terminated

    async def connect(self) -> HandshakeInfo:
        """Open a connection (or reuse the live one) and wait for its handshake."""
        return await self._wait_handshake(await self._connection())

    async def reconnect(self) -> None:
        """Drop the current connection and open a new one, resuming the TLS session when possible.

        Returns without waiting for the handshake, so that idempotent calls made right after go out
        as 0-RTT early data; :meth:`handshake` waits for it.
        """
        async with self._open_lock:
            self._drop_connection()
        await self._connection()

    async def handshake(self) -> HandshakeInfo:
        """Wait for the current connection's handshake (opening a connection if there is none)."""
        return await self._wait_handshake(await self._connection())

    async def close(self) -> None:
        """Close the connection; calls still running fail with TransportError."""
        self._closed = True
        async with self._open_lock:
            self._drop_connection()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> RpcClient:  # noqa: PYI034 - the class is not meant to be subclassed
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- calls --------------------------------------------------------------------------------
    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        token: str = "",
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Call ``op`` with keyword ``args``; return its result or raise its typed error.

        ``timeout_s`` bounds the whole call (connecting included); the remaining budget is sent to
        the server as its deadline. ``idempotent`` allows sending the call as 0-RTT early data: set
        it only for ops whose replay is harmless. Cancelling the awaiting task resets the stream,
        and the server cancels the handler.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceededError("timeout_s must be positive", timeout_s=timeout_s)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        try:
            return await asyncio.wait_for(self._call(op, args or {}, token, deadline, idempotent), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(
                f"call {op!r} did not finish within {timeout_s} s", timeout_s=timeout_s
            ) from None

    async def _call(
        self, op: str, args: dict[str, Any], token: str, deadline: float | None, idempotent: bool
    ) -> Any:
        send_early = idempotent
        for _ in range(2):
            conn = await self._connection()
            if not (send_early and conn.early_data_possible):
                await self._wait_handshake(conn)
            deadline_ms = None
            if deadline is not None:
                deadline_ms = max(1, math.ceil((deadline - asyncio.get_running_loop().time()) * 1000))
            stream_id, waiter = conn.start_call(op, args, token=token, deadline_ms=deadline_ms)
            try:
                return await waiter
            except TooEarlyError:
                if not send_early:
                    raise
                # The server does not run this op from early data: resend once the handshake is done.
                send_early = False
            except asyncio.CancelledError:
                conn.cancel_call(stream_id)
                raise
        raise TransportError(f"call {op!r} was refused as early data twice")

    # --- internals ----------------------------------------------------------------------------
    async def _connection(self) -> _ClientConnectionProtocol:
        if self._closed:
            raise TransportError("the client is closed")
        conn = self._conn
        if conn is not None and not conn.terminated:
            return conn
        async with self._open_lock:
            if self._conn is not None and not self._conn.terminated:
                return self._conn
            self._drop_connection()
            await self._open()
            assert self._conn is not None
            return self._conn

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {self.host!r}: {exc}") from None
        family, _, _, _, address = infos[0]
        configuration = QuicConfiguration(
            alpn_protocols=[self.alpn],
            is_client=True,
            server_name=self.server_name,
            idle_timeout=self.idle_timeout_s,
        )
        configuration.load_verify_locations(cadata=self.ca_pem)
        ticket = self.session_ticket
        if ticket is not None and ticket.is_valid and ticket.server_name == self.server_name:
            configuration.session_ticket = ticket
        quic = QuicConnection(configuration=configuration, session_ticket_handler=self._remember_ticket)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _ClientConnectionProtocol(quic, max_response_bytes=self.max_response_bytes), sock=sock
            )
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot open a UDP socket: {exc}") from None
        conn: _ClientConnectionProtocol = protocol  # type: ignore[assignment]
        conn.early_data_possible = configuration.session_ticket is not None and (
            configuration.session_ticket.max_early_data_size is not None
        )
        conn.handshake.add_done_callback(self._record_handshake)
        conn.connect(address)
        self._conn = conn
        self._transport = transport

    def _record_handshake(self, handshake: asyncio.Future[HandshakeInfo]) -> None:
        if not handshake.cancelled() and handshake.exception() is None:
            self.last_handshake = handshake.result()

    def _remember_ticket(self, ticket: SessionTicket) -> None:
        self.session_ticket = ticket

    async def _wait_handshake(self, conn: _ClientConnectionProtocol) -> HandshakeInfo:
        try:
            return await asyncio.wait_for(asyncio.shield(conn.handshake), self.connect_timeout_s)
        except asyncio.TimeoutError:
            if self._conn is conn:
                self._drop_connection()
            raise TransportError(
                f"no handshake with {self.host}:{self.port} within {self.connect_timeout_s} s"
            ) from None

    def _drop_connection(self) -> None:
        """Close the current connection; its closing handshake finishes in the background."""
        conn, transport = self._conn, self._transport
        self._conn = self._transport = None
        if conn is None or transport is None:
            return
        conn.fail_pending("the client dropped the connection")
        if conn.terminated:
            transport.close()
            return
        conn.close()
        task = asyncio.get_running_loop().create_task(self._finish_close(conn, transport))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _finish_close(
        self, conn: _ClientConnectionProtocol, transport: asyncio.DatagramTransport
    ) -> None:
        try:
            await asyncio.wait_for(conn.wait_closed(), timeout=self.connect_timeout_s)
        except asyncio.TimeoutError:
            conn.terminated = True
        finally:
            transport.close()


class SyncRpcClient:
    """A blocking facade over :class:`RpcClient` for scripts and notebooks.

    Runs the one async implementation on a private event loop in a daemon thread, so it works even
    where an event loop is already running in the caller's thread (Jupyter).
    """

    def __init__(self, host: str, port: int, **client_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rayflow-rpc-client", daemon=True)
        self._thread.start()
        self._client: RpcClient = self._run(self._make_client(host, port, client_options))

    @staticmethod
    async def _make_client(host: str, port: int, client_options: dict[str, Any]) -> RpcClient:
        # Built inside the private loop so its asyncio primitives belong to that loop.
        return RpcClient(host, port, **client_options)

    @property
    def client(self) -> RpcClient:
        return self._client

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coroutine.close()
            raise TransportError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            future.cancel()
            raise

    def connect(self) -> HandshakeInfo:
        return self._run(self._client.connect())

    def reconnect(self) -> None:
        self._run(self._client.reconnect())

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        token: str = "",
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Same as :meth:`RpcClient.call`, blocking."""
        return self._run(self._client.call(op, args, token=token, timeout_s=timeout_s, idempotent=idempotent))

    def close(self) -> None:
        """Close the connection and stop the private loop's thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> SyncRpcClient:  # noqa: PYI034 - the class is not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
