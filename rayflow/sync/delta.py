"""Deltas: one change-log record in transit between replicas, with the causal context it needs.

Why a context: some changes only make sense after others (deleting or linking an item another
replica created). A delta therefore carries its origin's version vector from just before the
change was committed; a receiver applies it only once it has applied everything that vector
names (see :mod:`rayflow.sync.receive_window`). The origin's own entry is always ``seq - 1``: a
replica's log is gap-free, so each change depends at least on its predecessor.

Why the body is opaque: the sync core moves and orders changes but never interprets them, so it
does not depend on the memory layer; the body is the encoded change record, decoded above.

Why so strict when decoding: deltas come from peers over a network. Everything that is not
exactly the expected shape becomes a typed :class:`~rayflow.errors.InvalidInputError`, and sizes
are bounded before anything is allocated for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from rayflow.errors import InvalidInputError, PayloadTooLargeError
from rayflow.sync.vector_clock import (
    MAX_REPLICA_ID_LENGTH,
    MAX_REPLICAS,
    VectorClock,
    validate_counter,
    validate_replica_id,
)

#: Largest change body one delta may carry.
MAX_DELTA_BYTES = 4 * 1024 * 1024
#: Longest tenant name carried (the tenant rule proper, stricter, is checked above this layer).
MAX_TENANT_LENGTH = 128
#: Largest encoded delta: the body plus a full context (ids, counters and msgpack framing).
MAX_ENCODED_DELTA_BYTES = MAX_DELTA_BYTES + MAX_REPLICAS * (MAX_REPLICA_ID_LENGTH * 4 + 16) + 4096
#: Default bound on one encoded batch of deltas.
MAX_BATCH_BYTES = 8 * 1024 * 1024

_WIRE_FIELDS = 5
# Longest msgpack string the decoder accepts: ids and tenant names of up to 128 characters of
# up to 4 UTF-8 bytes each.
_MAX_WIRE_STR_BYTES = 4 * max(MAX_REPLICA_ID_LENGTH, MAX_TENANT_LENGTH)
_DECODE_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


@dataclass(frozen=True)
class Delta:
    """Change number ``seq`` of replica ``origin``, for ``tenant``, with its causal ``context``.

    Construction validates every field, so a :class:`Delta` in hand is always well formed.
    """

    origin: str
    seq: int
    tenant: str
    #: The origin's version vector just before this change: everything it causally depends on.
    context: VectorClock
    #: The encoded change record; opaque to the sync core.
    body: bytes

    def __post_init__(self) -> None:
        validate_replica_id(self.origin)
        validate_counter(self.seq, what="seq")
        if self.seq < 1:
            raise InvalidInputError(f"a delta's seq starts at 1, got {self.seq}")
        if not isinstance(self.tenant, str) or not self.tenant or len(self.tenant) > MAX_TENANT_LENGTH:
            raise InvalidInputError(f"a delta's tenant must be a string of 1..{MAX_TENANT_LENGTH} characters")
        if not isinstance(self.context, VectorClock):
            raise InvalidInputError(f"a delta's context is a VectorClock, not {type(self.context).__name__}")
        if self.context.get(self.origin) != self.seq - 1:
            # A replica's own log has no gaps: change n is made right after change n - 1.
            raise InvalidInputError(
                f"context of {self.origin}:{self.seq} must name seq {self.seq - 1} of its origin, "
                f"not {self.context.get(self.origin)}"
            )
        if not isinstance(self.body, bytes):
            raise InvalidInputError(f"a delta's body is bytes, not {type(self.body).__name__}")
        if len(self.body) > MAX_DELTA_BYTES:
            raise PayloadTooLargeError(
                f"delta body of {len(self.body)} bytes exceeds {MAX_DELTA_BYTES}", size=len(self.body)
            )

    @property
    def key(self) -> tuple[str, int]:
        """``(origin, seq)``: what identifies a change across every replica."""
        return (self.origin, self.seq)

    @property
    def size(self) -> int:
        """Approximate bytes this delta costs to hold or send: body, names and context entries."""
        context_bytes = sum(len(replica) + 9 for replica, _ in self.context.items())
        return len(self.body) + len(self.origin) + len(self.tenant) + context_bytes + 16

    # --- wire ---------------------------------------------------------------------------------
    def to_wire(self) -> list[Any]:
        """Plain msgpack-ready form: ``[origin, seq, tenant, context, body]``."""
        return [self.origin, self.seq, self.tenant, self.context.to_wire(), self.body]

    @classmethod
    def from_wire(cls, obj: Any) -> Delta:
        """Rebuild a delta received from a peer; anything malformed raises :class:`InvalidInputError`."""
        if not isinstance(obj, (list, tuple)) or len(obj) != _WIRE_FIELDS:
            raise InvalidInputError(f"a delta on the wire is a list of {_WIRE_FIELDS} fields")
        origin, seq, tenant, context, body = obj
        return cls(origin, seq, tenant, VectorClock.from_wire(context), body)

    def encode(self) -> bytes:
        """msgpack bytes of :meth:`to_wire`."""
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Delta:
        """Parse bytes from :meth:`encode`; malformed or oversized input raises :class:`InvalidInputError`."""
        return cls.from_wire(_unpack(data, max_bytes=MAX_ENCODED_DELTA_BYTES, max_array_len=_WIRE_FIELDS))


@dataclass(frozen=True)
class DeltaBatch:
    """Several deltas in one message, with a bound on its encoded size.

    Why bounded: a pull answer must fit one frame of the transport, and a receiver must be able
    to refuse a huge message from its header-declared size alone.
    """

    deltas: tuple[Delta, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.deltas, tuple) or not all(isinstance(d, Delta) for d in self.deltas):
            raise InvalidInputError("a delta batch holds a tuple of Delta")

    @classmethod
    def take(cls, deltas: Sequence[Delta], max_bytes: int = MAX_BATCH_BYTES) -> DeltaBatch:
        """The longest prefix of ``deltas`` whose batch encodes to at most ``max_bytes``.

        A prefix, so a sender that answers "everything after seq n" in order can resume from
        the last delta sent. Raises :class:`PayloadTooLargeError` if not even the first fits (an
        empty batch would make a puller loop without progress).
        """
        taken: list[Delta] = []
        body_bytes = 0
        for delta in deltas:
            size = len(delta.encode())
            if _array_header_bytes(len(taken) + 1) + body_bytes + size > max_bytes:
                break
            taken.append(delta)
            body_bytes += size
        if deltas and not taken:
            raise PayloadTooLargeError(
                f"delta {deltas[0].origin}:{deltas[0].seq} alone exceeds the batch bound of {max_bytes} bytes"
            )
        return cls(tuple(taken))

    def to_wire(self) -> list[list[Any]]:
        """Plain msgpack-ready form: a list of delta wire forms."""
        return [delta.to_wire() for delta in self.deltas]

    @classmethod
    def from_wire(cls, obj: Any) -> DeltaBatch:
        """Rebuild a batch received from a peer; anything malformed raises :class:`InvalidInputError`."""
        if not isinstance(obj, (list, tuple)):
            raise InvalidInputError(f"a delta batch on the wire is a list, not {type(obj).__name__}")
        return cls(tuple(Delta.from_wire(item) for item in obj))

    def encode(self, max_bytes: int = MAX_BATCH_BYTES) -> bytes:
        """msgpack bytes of :meth:`to_wire`; raises :class:`PayloadTooLargeError` above ``max_bytes``."""
        data = msgpack.packb(self.to_wire(), use_bin_type=True)
        if len(data) > max_bytes:
            raise PayloadTooLargeError(
                f"delta batch of {len(data)} bytes exceeds {max_bytes}", size=len(data)
            )
        return data

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_BATCH_BYTES) -> DeltaBatch:
        """Parse bytes from :meth:`encode`; malformed input raises :class:`InvalidInputError`."""
        return cls.from_wire(_unpack(data, max_bytes=max_bytes, max_array_len=None))


def _array_header_bytes(count: int) -> int:
    """Bytes of a msgpack array header for ``count`` items (fixarray, array 16, array 32)."""
    if count < 16:
        return 1
    return 3 if count < 2**16 else 5


def _unpack(data: Any, *, max_bytes: int, max_array_len: int | None) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"encoded deltas are bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"encoded deltas of {len(data)} bytes exceed {max_bytes}", size=len(data))
    limits: dict[str, int] = {
        "max_bin_len": MAX_DELTA_BYTES,
        "max_str_len": _MAX_WIRE_STR_BYTES,
        "max_map_len": MAX_REPLICAS,
        "max_ext_len": 0,
    }
    if max_array_len is not None:
        limits["max_array_len"] = max_array_len
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, **limits)
    except _DECODE_ERRORS as exc:
        raise InvalidInputError(f"malformed encoded delta: {exc}") from exc
