"""Sans-IO RPC state per QUIC connection: what to do with stream bytes, without touching a socket.

:class:`RpcServerConnection` is fed what a QUIC connection delivers (stream data, resets, the end
of the handshake, the passing of time) and returns events for the asyncio shell to act on. It
holds the limits that keep one client from exhausting the server, because aioquic hands over every
received byte at once and has no backpressure of its own:

* a frame larger than ``max_frame_bytes`` is refused from its 4-byte header;
* the bytes held for a connection (requests being received or served, counted at their declared
  size as soon as the header is read, plus responses not yet acknowledged by the peer) stay below
  ``max_inflight_bytes``: a stream that would exceed it is refused with a retryable
  :class:`~rayflow.errors.OverloadedError` instead of being buffered;
* at most ``max_concurrent_calls`` calls are open at once (same refusal);
* a stream whose request is not complete ``stream_read_timeout_s`` after its first byte is
  expired: the shell resets it and its bytes are released.

A request that completed before the TLS handshake did arrived as 0-RTT early data, which an
attacker could replay; the call is marked so that only idempotent ops run from it.

:class:`RpcClientCalls` is the client's half: it frames requests, matches responses to pending
calls by stream id and turns truncated or garbled responses into
:class:`~rayflow.errors.TransportError`.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import (
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    RayflowError,
    TransportError,
)
from rayflow.wire.framing import HEADER_BYTES
from rayflow.wire.rpc_frames import (
    DEFAULT_MAX_FRAME_BYTES,
    UNKNOWN_REQUEST_ID,
    FrameDecoder,
    Request,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
)

#: ALPN protocol id of this wire format; a new incompatible format gets a new id.
DEFAULT_ALPN = "rayflow/1"
DEFAULT_MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_CALLS = 256
DEFAULT_STREAM_READ_TIMEOUT_S = 10.0
#: Responses can carry many embeddings, so the client accepts larger frames than it sends.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

#: Application error codes carried by QUIC RESET_STREAM / STOP_SENDING frames.
STREAM_REFUSED = 0x10
STREAM_TIMED_OUT = 0x11
STREAM_CANCELLED = 0x12


def is_client_bidi_stream(stream_id: int) -> bool:
    """QUIC stream ids ending in binary 00 are bidirectional streams opened by the client."""
    return stream_id % 4 == 0


# --- server events ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CallReceived:
    """A complete, well-formed request arrived on ``stream_id``: run it and answer."""

    stream_id: int
    request: Request
    #: True when the request completed before the handshake, i.e. it came as 0-RTT early data.
    early_data: bool


@dataclass(frozen=True)
class ProtocolFailure:
    """The stream's request is refused: send ``frame`` (``error``, encoded) on it and end the stream.

    The frame's bytes are held against the in-flight bound until the shell reports them delivered.
    """

    stream_id: int
    error: RayflowError
    frame: bytes = field(repr=False)
    #: True when the peer may still be sending: ask it to stop (QUIC STOP_SENDING).
    stop_receiving: bool = False


@dataclass(frozen=True)
class CallAbandoned:
    """The peer reset a stream whose call is running: cancel it, nobody will read the answer."""

    stream_id: int


@dataclass(frozen=True)
class StreamRefused:
    """Data on a stream this protocol does not use (unidirectional): stop it, answer nothing."""

    stream_id: int


ServerEvent = CallReceived | ProtocolFailure | CallAbandoned | StreamRefused


class _Phase(enum.Enum):
    RECEIVING = "receiving"  # request bytes still arriving
    RUNNING = "running"  # request complete, handler running
    ANSWERED = "answered"  # response queued, waiting for the peer's acknowledgement
    DISCARDING = "discarding"  # refused: later bytes are dropped until the peer ends the stream


@dataclass
class _ServerStream:
    opened_at: float
    decoder: FrameDecoder
    phase: _Phase = _Phase.RECEIVING
    receive_open: bool = True
    request_bytes: int = 0
    response_bytes: int = 0
    #: The complete request frame body, kept until the stream ends.
    body: bytes | None = field(default=None, repr=False)

    @property
    def held_bytes(self) -> int:
        return self.request_bytes + self.response_bytes


class RpcServerConnection:
    """The server's RPC state for one QUIC connection (sans-IO)."""

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
        stream_read_timeout_s: float = DEFAULT_STREAM_READ_TIMEOUT_S,
    ) -> None:
        if max_inflight_bytes < max_frame_bytes + HEADER_BYTES:
            raise ValueError("max_inflight_bytes must admit at least one frame of max_frame_bytes")
        if max_concurrent_calls < 1 or stream_read_timeout_s <= 0:
            raise ValueError("max_concurrent_calls and stream_read_timeout_s must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_concurrent_calls = max_concurrent_calls
        self.stream_read_timeout_s = stream_read_timeout_s
        self.handshake_complete = False
        self._streams: dict[int, _ServerStream] = {}
        # Every stream id ever opened, so that late bytes on a stream already answered, reset or
        # expired are dropped instead of opening a "new" call: ids below the floor are all seen,
        # the set holds the seen ids above it (tiny while streams arrive roughly in order).
        self._seen_floor = 0
        self._seen_above_floor: set[int] = set()

    # --- observation --------------------------------------------------------------------------
    @property
    def inflight_bytes(self) -> int:
        """Bytes held for this connection: requests (at declared size) plus unacknowledged responses."""
        return sum(stream.held_bytes for stream in self._streams.values())

    @property
    def open_calls(self) -> int:
        """Calls counted against ``max_concurrent_calls``: receiving, running or not yet acknowledged."""
        return sum(1 for stream in self._streams.values() if stream.phase is not _Phase.DISCARDING)

    @property
    def tracked_streams(self) -> int:
        return len(self._streams)

    def awaiting_delivery(self) -> list[int]:
        """Streams whose response bytes are held until the peer acknowledges them."""
        return [sid for sid, stream in self._streams.items() if stream.response_bytes]

    def next_expiry(self) -> float | None:
        """When the oldest unfinished request times out, for the shell's timer."""
        opened = [stream.opened_at for stream in self._streams.values() if stream.receive_open]
        return min(opened) + self.stream_read_timeout_s if opened else None

    # --- inputs -------------------------------------------------------------------------------
    def handshake_completed(self) -> None:
        """The TLS handshake finished: requests completed from now on are not early data."""
        self.handshake_complete = True

    def receive_stream_data(
        self, stream_id: int, data: bytes, end_stream: bool, now: float
    ) -> list[ServerEvent]:
        """Bytes (and maybe the end) of a stream arrived.

        A call starts only once its stream has ended with exactly one complete frame, so trailing
        bytes are refused before any handler runs.
        """
        if not is_client_bidi_stream(stream_id):
            return [StreamRefused(stream_id)]
        stream = self._streams.get(stream_id)
        if stream is None:
            if (not data and not end_stream) or self._was_seen(stream_id):
                return []
            self._mark_seen(stream_id)
            refusal = self._admission_refusal()
            if refusal is not None:
                return [self._refuse(stream_id, None, refusal, end_stream, now)]
            stream = _ServerStream(opened_at=now, decoder=FrameDecoder(self.max_frame_bytes))
            self._streams[stream_id] = stream
        if stream.phase is not _Phase.RECEIVING or not stream.receive_open:
            if end_stream:
                stream.receive_open = False
                self._forget_if_done(stream_id)
            return []
        try:
            bodies = stream.decoder.feed(data)
            if bodies:
                stream.body = bodies[0]
            self._reserve(stream)
            if not end_stream:
                return []
            stream.decoder.end()
            if stream.body is None:
                raise InvalidInputError("stream ended before a request frame arrived")
            request = decode_request(stream.body)
        except RayflowError as error:
            return [self._refuse(stream_id, stream, error, end_stream, now)]
        stream.phase = _Phase.RUNNING
        stream.receive_open = False
        stream.body = None
        return [CallReceived(stream_id, request, early_data=not self.handshake_complete)]

    def stream_reset(self, stream_id: int) -> list[ServerEvent]:
        """The peer reset its sending side of a stream (or asked us to stop sending on it)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return []
        stream.receive_open = False
        stream.request_bytes = 0
        if stream.phase is _Phase.RUNNING:
            del self._streams[stream_id]
            return [CallAbandoned(stream_id)]
        if stream.phase is _Phase.RECEIVING:
            del self._streams[stream_id]
        else:
            self._forget_if_done(stream_id)
        return []

    def response_queued(self, stream_id: int, response_bytes: int) -> bool:
        """The shell is about to send the answer of a running call; False if nobody waits for it."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is not _Phase.RUNNING:
            return False
        stream.phase = _Phase.ANSWERED
        stream.request_bytes = 0
        stream.response_bytes = response_bytes
        return True

    def response_delivered(self, stream_id: int) -> None:
        """The peer acknowledged the whole answer (or the stream is gone): release its bytes."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.response_bytes = 0
        if stream.phase is _Phase.ANSWERED:
            stream.phase = _Phase.DISCARDING
        self._forget_if_done(stream_id)

    def expire(self, now: float) -> list[int]:
        """Streams whose request did not complete in time; the shell resets them. All are forgotten."""
        to_reset: list[int] = []
        deadline = now - self.stream_read_timeout_s
        for stream_id, stream in list(self._streams.items()):
            if not stream.receive_open or stream.opened_at > deadline:
                continue
            if stream.phase is _Phase.RECEIVING:
                to_reset.append(stream_id)
                del self._streams[stream_id]
            else:
                # Refused and answered: only the peer's unfinished sending side remains.
                stream.receive_open = False
                stream.request_bytes = 0
                self._forget_if_done(stream_id)
        return to_reset

    def connection_lost(self) -> list[int]:
        """The connection ended; return the streams whose calls are still running (to cancel)."""
        running = [sid for sid, stream in self._streams.items() if stream.phase is _Phase.RUNNING]
        self._streams.clear()
        return running

    # --- internals ----------------------------------------------------------------------------
    def _admission_refusal(self) -> RayflowError | None:
        if self.open_calls >= self.max_concurrent_calls:
            return OverloadedError(
                "too many concurrent calls on this connection", limit=self.max_concurrent_calls
            )
        if self.inflight_bytes + HEADER_BYTES > self.max_inflight_bytes:
            return OverloadedError(
                "too many bytes in flight on this connection", limit=self.max_inflight_bytes
            )
        return None

    def _reserve(self, stream: _ServerStream) -> None:
        """Count the stream at its declared size; refuse it if that breaks the connection's bound."""
        declared = stream.decoder.declared_length
        if declared is not None:
            wanted = HEADER_BYTES + declared
        elif stream.body is not None:
            wanted = HEADER_BYTES + len(stream.body)
        else:
            wanted = stream.decoder.buffered_bytes
        if wanted <= stream.request_bytes:
            return
        others = self.inflight_bytes - stream.held_bytes
        if others + wanted + stream.response_bytes > self.max_inflight_bytes:
            raise OverloadedError(
                "too many bytes in flight on this connection", limit=self.max_inflight_bytes
            )
        stream.request_bytes = wanted

    def _refuse(
        self, stream_id: int, stream: _ServerStream | None, error: RayflowError, end_stream: bool, now: float
    ) -> ProtocolFailure:
        """Answer ``error`` on the stream and drop whatever else the peer sends on it."""
        if stream is None:
            stream = _ServerStream(opened_at=now, decoder=FrameDecoder(self.max_frame_bytes))
            self._streams[stream_id] = stream
        frame = encode_error(UNKNOWN_REQUEST_ID, error)
        stream.phase = _Phase.DISCARDING
        stream.body = None
        stream.request_bytes = 0
        stream.response_bytes = len(frame)
        stream.receive_open = not end_stream
        return ProtocolFailure(stream_id, error, frame, stop_receiving=not end_stream)

    def _was_seen(self, stream_id: int) -> bool:
        index = stream_id // 4
        return index < self._seen_floor or index in self._seen_above_floor

    def _mark_seen(self, stream_id: int) -> None:
        self._seen_above_floor.add(stream_id // 4)
        while self._seen_floor in self._seen_above_floor:
            self._seen_above_floor.remove(self._seen_floor)
            self._seen_floor += 1

    def _forget_if_done(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and not stream.receive_open
            and not stream.response_bytes
            and (stream.phase is _Phase.DISCARDING)
        ):
            del self._streams[stream_id]


# --- client -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallCompleted:
    """The call on ``stream_id`` returned ``result``."""

    stream_id: int
    request_id: int
    result: Any


@dataclass(frozen=True)
class CallFailed:
    """The call on ``stream_id`` failed with ``error`` (the server's typed error or a transport failure)."""

    stream_id: int
    request_id: int
    error: RayflowError


ClientEvent = CallCompleted | CallFailed


@dataclass
class _PendingCall:
    request_id: int
    op: str
    decoder: FrameDecoder
    body: bytes | None = field(default=None, repr=False)


class RpcClientCalls:
    """The client's RPC state for one QUIC connection (sans-IO): pending calls by stream id."""

    def __init__(self, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.max_response_bytes = max_response_bytes
        self._request_ids = itertools.count(1)
        self._pending: dict[int, _PendingCall] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start_call(
        self,
        stream_id: int,
        op: str,
        args: dict[str, Any],
        *,
        token: str,
        deadline_ms: int | None = None,
    ) -> tuple[int, bytes]:
        """Register a call on a fresh stream; return its request id and the frame to send."""
        if stream_id in self._pending:
            raise ValueError(f"stream {stream_id} already carries a call")
        request_id = next(self._request_ids)
        frame = encode_request(op, request_id, token, args, deadline_ms)
        self._pending[stream_id] = _PendingCall(request_id, op, FrameDecoder(self.max_response_bytes))
        return request_id, frame

    def receive_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> list[ClientEvent]:
        """Bytes of a response arrived; unknown streams (cancelled calls) are ignored."""
        call = self._pending.get(stream_id)
        if call is None:
            return []
        try:
            bodies = call.decoder.feed(data)
            if bodies:
                call.body = bodies[0]
            if not end_stream:
                return []
            call.decoder.end()
            if call.body is None:
                raise InvalidInputError("response stream ended without a frame")
            response = decode_response(call.body)
            if response.request_id != call.request_id and not (
                not response.ok and response.request_id == UNKNOWN_REQUEST_ID
            ):
                raise InvalidInputError(
                    "response answers another request", expected=call.request_id, got=response.request_id
                )
        except PayloadTooLargeError as error:
            del self._pending[stream_id]
            return [
                CallFailed(stream_id, call.request_id, TransportError(f"response refused: {error.message}"))
            ]
        except InvalidInputError as error:
            del self._pending[stream_id]
            return [
                CallFailed(stream_id, call.request_id, TransportError(f"garbled response: {error.message}"))
            ]
        del self._pending[stream_id]
        if response.ok:
            return [CallCompleted(stream_id, call.request_id, response.result)]
        assert response.error is not None
        return [CallFailed(stream_id, call.request_id, response.error)]

    def stream_reset(self, stream_id: int) -> list[ClientEvent]:
        """The server reset the stream (or stopped reading it) before answering."""
        call = self._pending.pop(stream_id, None)
        if call is None:
            return []
        return [CallFailed(stream_id, call.request_id, TransportError("the server reset the call's stream"))]

    def cancel(self, stream_id: int) -> None:
        """Forget a call the caller gave up on (its stream is reset by the shell)."""
        self._pending.pop(stream_id, None)

    def connection_lost(self, reason: str) -> list[ClientEvent]:
        """The connection ended: every pending call fails with a TransportError."""
        events: list[ClientEvent] = [
            CallFailed(stream_id, call.request_id, TransportError(f"connection lost: {reason}"))
            for stream_id, call in self._pending.items()
        ]
        self._pending.clear()
        return events
