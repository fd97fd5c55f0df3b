"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes of body.

Shared by the QUIC RPC layer and the host-to-sandbox channel, which frame msgpack bodies the
same way. Sans-IO and standard library only (it ships inside sandbox images): bytes go in,
complete bodies come out, and a declared length above the limit is refused from the header
alone, before the body is buffered.
"""

from __future__ import annotations

import struct

from rayflow.errors import InvalidInputError, PayloadTooLargeError

HEADER_BYTES = 4
#: The largest length the 4-byte header can express.
MAX_DECLARABLE_BYTES = (1 << 32) - 1
_HEADER = struct.Struct(">I")


def frame(body: bytes, max_frame_bytes: int = MAX_DECLARABLE_BYTES) -> bytes:
    """``body`` with its length header; refuses bodies above ``max_frame_bytes``."""
    limit = min(max_frame_bytes, MAX_DECLARABLE_BYTES)
    if len(body) > limit:
        raise PayloadTooLargeError(
            f"frame of {len(body)} bytes exceeds the limit of {limit}", size=len(body), limit=limit
        )
    return _HEADER.pack(len(body)) + body


class FrameSplitter:
    """Incremental splitter: bytes in, complete frame bodies out, in order."""

    def __init__(self, max_frame_bytes: int) -> None:
        if not 0 < max_frame_bytes <= MAX_DECLARABLE_BYTES:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_DECLARABLE_BYTES}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._declared: int | None = None

    @property
    def declared_length(self) -> int | None:
        """Body length announced by the current frame's header, once the header is complete."""
        return self._declared

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return not self._buffer and self._declared is None

    def feed(self, data: bytes, max_frames: int | None = None) -> list[bytes]:
        """Add ``data``; return the bodies it completes (at most ``max_frames``; the rest stays buffered)."""
        self._buffer += data
        bodies: list[bytes] = []
        while max_frames is None or len(bodies) < max_frames:
            if self._declared is None:
                if len(self._buffer) < HEADER_BYTES:
                    break
                (declared,) = _HEADER.unpack_from(self._buffer)
                if declared > self.max_frame_bytes:
                    self.clear()
                    raise PayloadTooLargeError(
                        f"frame of {declared} bytes exceeds the limit of {self.max_frame_bytes}",
                        size=declared,
                        limit=self.max_frame_bytes,
                    )
                self._declared = declared
                del self._buffer[:HEADER_BYTES]
            if len(self._buffer) < self._declared:
                break
            bodies.append(bytes(self._buffer[: self._declared]))
            del self._buffer[: self._declared]
            self._declared = None
        return bodies

    def end(self) -> None:
        """The stream ended: a partially received frame is a truncation error."""
        if not self.at_frame_boundary:
            declared, received = self._declared, len(self._buffer)
            self.clear()
            raise InvalidInputError("stream ended inside a frame (truncated)", declared=declared, received=received)

    def clear(self) -> None:
        self._buffer.clear()
        self._declared = None
