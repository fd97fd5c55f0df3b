"""The messages two hub replicas exchange to sync deltas, their msgpack form and their framing.

A frame on the byte stream is a 4-byte big-endian body length, then a msgpack map: ``"v"`` (the
protocol version), ``"type"`` (the message's tag), then the message's own fields, nothing else.

Why so strict: every byte here comes from another region over a network. A message is a frozen
dataclass that validates its fields when built, so the same checks guard what we send and what
we accept; :func:`decode_message` turns every shape problem (unknown tag, wrong field types,
missing or extra fields, other version, oversize) into :class:`~rayflow.errors.InvalidInputError`
(:class:`~rayflow.errors.PayloadTooLargeError` for sizes) and lets nothing else escape. A frame's
declared length is checked from its header, before its body is buffered.

What the messages mean is :mod:`rayflow.sync.peer_session`'s business; in short:

* :class:`Hello` opens a session: who I am (my replica id and federation credential), a fresh
  nonce, my applied vector, the credit I grant you.
* :class:`Proof` proves it: the sender's signature over the handshake transcript (both Hellos'
  ids and nonces, and the channel binding; see :mod:`rayflow.sync.identity`).
* :class:`Deltas` carries a batch of deltas (and, when the batch brings the peer up to the
  sender's head, that head as ``up_to``).
* :class:`Ack` says what the receiver has made durable and returns credit.
* :class:`Pull` asks the peer to resend everything after a vector (gaps, dropped deltas).
* :class:`Notify` says the sender's log has grown beyond what it can push now.
* :class:`Goodbye` ends the session, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from rayflow.errors import InvalidInputError, PayloadTooLargeError
from rayflow.sync.delta import MAX_DELTA_BYTES, Delta
from rayflow.sync.identity import NONCE_BYTES, SIGNATURE_BYTES, ReplicaCredential, exact_bytes
from rayflow.sync.vector_clock import MAX_REPLICAS, VectorClock, validate_replica_id
from rayflow.wire.framing import FrameSplitter, frame

#: Version of this wire format, carried by every message. :class:`Hello` is always readable by
#: version 1, so a future version can be negotiated from it.
PROTOCOL_VERSION = 1
#: Largest frame body (one encoded message). One largest delta always fits in a Deltas message.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Largest credit (window) one side may grant or return at once.
MAX_WINDOW_BYTES = 1 << 30
#: Most deltas one Deltas message may carry.
MAX_DELTAS_PER_MESSAGE = 4096
MAX_FEDERATION_LENGTH = 128
MAX_REASON_LENGTH = 1024
#: Highest protocol version a Hello may announce (a bound, not a promise of support).
MAX_ANNOUNCED_PROTOCOL = 1 << 16

_ENVELOPE_KEYS = frozenset({"v", "type"})
_UNPACK_LIMITS = {
    "max_bin_len": MAX_DELTA_BYTES,
    # Strings are ids, tenant, federation and region names (<= 128 chars) and reasons (<= 1024 chars),
    # at most 4 UTF-8 bytes a character.
    "max_str_len": 4 * MAX_REASON_LENGTH,
    "max_array_len": MAX_DELTAS_PER_MESSAGE,
    "max_map_len": MAX_REPLICAS,
    "max_ext_len": 0,
}


# --- field checks -----------------------------------------------------------------------------
def _int_in(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInputError(f"{what} must be in {low}..{high}: {value}")
    return value


def _text(value: object, max_length: int, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > max_length or (not value and not allow_empty):
        low = 0 if allow_empty else 1
        raise InvalidInputError(f"{what} must be a string of {low}..{max_length} characters")
    return value


def _clock(value: object, what: str) -> VectorClock:
    if not isinstance(value, VectorClock):
        raise InvalidInputError(f"{what} must be a VectorClock, not {type(value).__name__}")
    return value


def _fields(obj: dict[str, Any], names: tuple[str, ...], what: str) -> list[Any]:
    keys = set(obj)
    if keys != set(names):
        missing = sorted(set(names) - keys)
        extra = sorted(str(key)[:64] for key in keys - set(names))[:10]
        raise InvalidInputError(f"{what} message has the wrong fields", missing=missing, extra=extra)
    return [obj[name] for name in names]


# --- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """Opens a session: the sender's identity and nonce, what it has applied and the credit it grants.

    Nothing in a Hello is believed until the sender's :class:`Proof` verifies.
    """

    TYPE: ClassVar[str] = "hello"

    replica_id: str
    #: Name of the set of replicas that sync together; a peer of another federation is refused.
    federation: str
    #: Highest protocol version the sender speaks.
    protocol: int
    #: The sender's applied (durable) version vector.
    applied: VectorClock
    #: Delta bytes (:attr:`Delta.size`) the receiver of this Hello may send before credit returns.
    window_bytes: int
    #: The sender's federation credential (it must name ``replica_id``; the session checks that).
    credential: ReplicaCredential
    #: The sender's fresh nonce for this connection (:func:`rayflow.sync.identity.new_nonce`).
    nonce: bytes

    def __post_init__(self) -> None:
        validate_replica_id(self.replica_id)
        _text(self.federation, MAX_FEDERATION_LENGTH, "federation")
        _int_in(self.protocol, 1, MAX_ANNOUNCED_PROTOCOL, "protocol")
        _clock(self.applied, "applied")
        _int_in(self.window_bytes, 1, MAX_WINDOW_BYTES, "window_bytes")
        if not isinstance(self.credential, ReplicaCredential) or not self.credential.signature:
            raise InvalidInputError("credential must be a signed ReplicaCredential")
        exact_bytes(self.nonce, NONCE_BYTES, "nonce")

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "federation": self.federation,
            "protocol": self.protocol,
            "applied": self.applied.to_wire(),
            "window_bytes": self.window_bytes,
            "credential": self.credential.to_wire(),
            "nonce": self.nonce,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Hello:
        names = ("replica_id", "federation", "protocol", "applied", "window_bytes", "credential", "nonce")
        replica_id, federation, protocol, applied, window, credential, nonce = _fields(obj, names, "hello")
        return cls(
            replica_id,
            federation,
            protocol,
            VectorClock.from_wire(applied),
            window,
            ReplicaCredential.from_wire(credential),
            nonce,
        )


@dataclass(frozen=True)
class Proof:
    """The sender's signature over the handshake transcript: it holds its credential's key, now, here."""

    TYPE: ClassVar[str] = "proof"

    signature: bytes

    def __post_init__(self) -> None:
        exact_bytes(self.signature, SIGNATURE_BYTES, "signature")

    def to_wire(self) -> dict[str, Any]:
        return {"signature": self.signature}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Proof:
        (signature,) = _fields(obj, ("signature",), "proof")
        return cls(signature)


@dataclass(frozen=True)
class Pull:
    """Asks the peer to (re)send every delta above ``after``, in batches of at most ``max_bytes``."""

    TYPE: ClassVar[str] = "pull"

    after: VectorClock
    #: Largest batch (sum of :attr:`Delta.size`) the puller wants in one Deltas message.
    max_bytes: int

    def __post_init__(self) -> None:
        _clock(self.after, "after")
        _int_in(self.max_bytes, 1, MAX_WINDOW_BYTES, "max_bytes")

    def to_wire(self) -> dict[str, Any]:
        return {"after": self.after.to_wire(), "max_bytes": self.max_bytes}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Pull:
        after, max_bytes = _fields(obj, ("after", "max_bytes"), "pull")
        return cls(VectorClock.from_wire(after), max_bytes)


@dataclass(frozen=True)
class Deltas:
    """A batch of deltas, in the order the receiver should offer them.

    ``up_to`` is set when, with this batch, the sender has sent everything its log held as of
    ``up_to`` that it believes the receiver lacks; ``None`` while more is coming.
    """

    TYPE: ClassVar[str] = "deltas"

    deltas: tuple[Delta, ...]
    up_to: VectorClock | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.deltas, tuple) or not all(isinstance(d, Delta) for d in self.deltas):
            raise InvalidInputError("deltas must be a tuple of Delta")
        if len(self.deltas) > MAX_DELTAS_PER_MESSAGE:
            raise InvalidInputError(f"a Deltas message carries at most {MAX_DELTAS_PER_MESSAGE} deltas")
        total = sum(delta.size for delta in self.deltas)
        if total > MAX_MESSAGE_BYTES:
            raise PayloadTooLargeError(
                f"a batch of {total} delta bytes exceeds {MAX_MESSAGE_BYTES}", size=total
            )
        if self.up_to is not None:
            _clock(self.up_to, "up_to")

    @property
    def size(self) -> int:
        """Sum of the deltas' :attr:`Delta.size`: what this batch costs in credit."""
        return sum(delta.size for delta in self.deltas)

    def to_wire(self) -> dict[str, Any]:
        return {
            "deltas": [delta.to_wire() for delta in self.deltas],
            "up_to": None if self.up_to is None else self.up_to.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Deltas:
        deltas, up_to = _fields(obj, ("deltas", "up_to"), "deltas")
        if not isinstance(deltas, list):
            raise InvalidInputError(f"field 'deltas' must be a list, not {type(deltas).__name__}")
        return cls(
            tuple(Delta.from_wire(item) for item in deltas),
            None if up_to is None else VectorClock.from_wire(up_to),
        )


@dataclass(frozen=True)
class Ack:
    """The receiver's durable applied vector, and the credit (delta bytes) it returns to the sender."""

    TYPE: ClassVar[str] = "ack"

    applied: VectorClock
    #: Credit returned by this Ack (added to what the sender may still send); may be zero.
    window_bytes: int

    def __post_init__(self) -> None:
        _clock(self.applied, "applied")
        _int_in(self.window_bytes, 0, MAX_WINDOW_BYTES, "window_bytes")

    def to_wire(self) -> dict[str, Any]:
        return {"applied": self.applied.to_wire(), "window_bytes": self.window_bytes}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Ack:
        applied, window = _fields(obj, ("applied", "window_bytes"), "ack")
        return cls(VectorClock.from_wire(applied), window)


@dataclass(frozen=True)
class Notify:
    """The sender's version vector has grown to ``head`` beyond what it could push yet."""

    TYPE: ClassVar[str] = "notify"

    head: VectorClock

    def __post_init__(self) -> None:
        _clock(self.head, "head")

    def to_wire(self) -> dict[str, Any]:
        return {"head": self.head.to_wire()}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Notify:
        (head,) = _fields(obj, ("head",), "notify")
        return cls(VectorClock.from_wire(head))


@dataclass(frozen=True)
class Goodbye:
    """The sender ends the session; nothing follows it."""

    TYPE: ClassVar[str] = "goodbye"

    reason: str = ""

    def __post_init__(self) -> None:
        _text(self.reason, MAX_REASON_LENGTH, "reason", allow_empty=True)

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Goodbye:
        (reason,) = _fields(obj, ("reason",), "goodbye")
        return cls(reason)


Message = Hello | Proof | Pull | Deltas | Ack | Notify | Goodbye
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Proof, Pull, Deltas, Ack, Notify, Goodbye)
}


# --- encoding ---------------------------------------------------------------------------------
def encode_message(message: Message) -> bytes:
    """The msgpack body of ``message`` (no length header); refuses bodies above MAX_MESSAGE_BYTES."""
    if type(message) not in MESSAGE_TYPES.values():
        raise InvalidInputError(f"not a sync message: {type(message).__name__}")
    body = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": message.TYPE, **message.to_wire()}, use_bin_type=True
    )
    if len(body) > MAX_MESSAGE_BYTES:
        raise PayloadTooLargeError(
            f"{message.TYPE} message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}", size=len(body)
        )
    return body


def frame_message(message: Message) -> bytes:
    """``message`` as one frame of the byte stream: length header, then body."""
    return frame(encode_message(message), MAX_MESSAGE_BYTES)


def decode_message(body: bytes) -> Message:
    """Parse one frame body; anything but a well-formed message of this version raises InvalidInputError."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"a message body is bytes, not {type(body).__name__}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise PayloadTooLargeError(
            f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}", size=len(body)
        )
    try:
        value = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input; all mean "malformed"
        raise InvalidInputError(f"malformed message body: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"a message is a map, not {type(value).__name__}")
    version = value.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version != PROTOCOL_VERSION:
        raise InvalidInputError("unsupported sync protocol version", version=repr(version)[:32])
    tag = value.get("type")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise InvalidInputError("unknown sync message type", type=repr(tag)[:64])
    return cls.from_wire({key: item for key, item in value.items() if key not in _ENVELOPE_KEYS})


def frame_reader(max_frame_bytes: int = MAX_MESSAGE_BYTES) -> FrameSplitter:
    """The incremental reader of a sync byte stream: the wall's length-prefixed framing, with the
    sync protocol's frame limit (an oversize length is refused from the header alone)."""
    return FrameSplitter(max_frame_bytes)
