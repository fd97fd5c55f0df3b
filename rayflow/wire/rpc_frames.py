"""The RPC wire format: length-prefixed msgpack frames, one request and one response per QUIC stream.

A frame is a 4-byte big-endian body length followed by a msgpack map. Every call has its own
bidirectional stream: the client writes one request frame and ends the stream, the server writes
one response frame and ends the stream. Binary values (embeddings) travel as msgpack ``bin``.

Why so strict: everything here parses bytes from an untrusted peer, so every shape problem becomes
a typed :class:`~rayflow.errors.InvalidInputError` (or :class:`~rayflow.errors.PayloadTooLargeError`
for an oversized frame, detected from the 4-byte header before the body is buffered) and nothing
else escapes. Request ids start at 1; a response that answers a request the server could not parse
carries id 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from rayflow.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    RayflowError,
    error_from_code,
)
from rayflow.wire.framing import MAX_DECLARABLE_BYTES, FrameSplitter, frame

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
#: Id of a response to a request whose own id could not be read.
UNKNOWN_REQUEST_ID = 0

_REQUEST_KEYS = frozenset({"v", "op", "id", "token", "args", "deadline_ms"})
_OK_RESPONSE_KEYS = frozenset({"v", "id", "ok", "result"})
_ERROR_RESPONSE_KEYS = frozenset({"v", "id", "ok", "error"})
_ERROR_KEYS = frozenset({"code", "message", "details"})


@dataclass(frozen=True)
class Request:
    """One decoded call: op name, client-chosen id, bearer token, keyword args, budget in ms."""

    op: str
    request_id: int
    token: str
    args: dict[str, Any]
    #: Time budget in milliseconds, counted from when the server reads the request (relative, so
    #: clocks of client and server need not agree); ``None`` means no deadline.
    deadline_ms: int | None


@dataclass(frozen=True)
class Response:
    """One decoded answer: the result of a call or the typed error it raised."""

    request_id: int
    ok: bool
    result: Any = None
    error: RayflowError | None = None


class FrameDecoder:
    """Incremental decoder of length-prefixed frames from a byte stream.

    ``feed`` returns the bodies of the frames completed by the bytes given; the declared length is
    checked against ``max_frame_bytes`` as soon as the header is complete, so an oversized frame is
    refused before its body is buffered. ``max_frames`` bounds how many frames one stream may carry
    (1 for this protocol): bytes after the last allowed frame are an error.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, max_frames: int | None = 1) -> None:
        self._splitter = FrameSplitter(max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self.max_frames = max_frames
        self.frames_decoded = 0

    @property
    def declared_length(self) -> int | None:
        """Body length announced by the current frame's header, once the header is complete."""
        return self._splitter.declared_length

    @property
    def buffered_bytes(self) -> int:
        return self._splitter.buffered_bytes

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return self._splitter.at_frame_boundary

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frame bodies it completes, in order."""
        if not data:
            return []
        if self.max_frames is not None and self.frames_decoded >= self.max_frames:
            raise InvalidInputError("unexpected data after the frame", extra_bytes=len(data))
        remaining = None if self.max_frames is None else self.max_frames - self.frames_decoded
        bodies = self._splitter.feed(data, remaining)
        self.frames_decoded += len(bodies)
        if self.max_frames is not None and self.frames_decoded >= self.max_frames and self._splitter.buffered_bytes:
            extra = self._splitter.buffered_bytes
            self._splitter.clear()
            raise InvalidInputError("unexpected data after the frame", extra_bytes=extra)
        return bodies

    def end(self) -> None:
        """The stream ended: a partially received frame is a truncation error."""
        self._splitter.end()


# --- encoding ---------------------------------------------------------------------------------
def encode_frame(body: dict[str, Any], *, max_frame_bytes: int | None = None) -> bytes:
    """Pack ``body`` and prefix its length; refuse a body above ``max_frame_bytes`` (or 4 GiB)."""
    packed = msgpack.packb(body, use_bin_type=True)
    return frame(packed, MAX_DECLARABLE_BYTES if max_frame_bytes is None else max_frame_bytes)


def encode_request(
    op: str,
    request_id: int,
    token: str,
    args: dict[str, Any],
    deadline_ms: int | None = None,
    *,
    max_frame_bytes: int | None = None,
) -> bytes:
    """A request frame; the same shape checks as the decoder, so a bad call fails at the caller."""
    body = {
        "v": PROTOCOL_VERSION,
        "op": op,
        "id": request_id,
        "token": token,
        "args": args,
        "deadline_ms": deadline_ms,
    }
    _check_request_body(body)
    try:
        return encode_frame(body, max_frame_bytes=max_frame_bytes)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"arguments cannot be sent: {exc}") from None


def encode_response(request_id: int, result: Any, *, max_frame_bytes: int | None = None) -> bytes:
    """A success frame carrying ``result`` (any msgpack-serializable value)."""
    return encode_frame(
        {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result},
        max_frame_bytes=max_frame_bytes,
    )


def encode_error(request_id: int, error: RayflowError) -> bytes:
    """A failure frame carrying the error's code, message and details.

    Details that do not serialize are dropped rather than failing the answer: the code and message
    always reach the caller.
    """
    payload = error.to_dict()
    body = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": payload}
    try:
        return encode_frame(body)
    except (TypeError, ValueError, OverflowError, PayloadTooLargeError):
        body["error"] = {"code": payload["code"], "message": str(payload["message"]), "details": {}}
        return encode_frame(body)


# --- decoding ---------------------------------------------------------------------------------
def _refuse_extension(code: int, data: bytes) -> Any:
    raise InvalidInputError(f"msgpack extension type {code} is not allowed")


def unpack_body(body: bytes) -> Any:
    """Parse one msgpack value; any parser failure is an InvalidInputError (the input is untrusted)."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_extension)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input; all mean "malformed"
        raise InvalidInputError(f"malformed msgpack body: {type(exc).__name__}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_version(body: dict[str, Any]) -> None:
    version = body.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise InvalidInputError("unsupported protocol version", version=repr(version)[:32])


def _check_keys(body: dict[str, Any], expected: frozenset[str], what: str) -> None:
    keys = set(body)
    if keys != expected:
        missing = sorted(expected - keys)
        extra = sorted(str(k)[:64] for k in keys - expected)
        raise InvalidInputError(f"{what} has the wrong fields", missing=missing, extra=extra)


def _check_request_body(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidInputError("request must be a map")
    _check_version(body)
    _check_keys(body, _REQUEST_KEYS, "request")
    if not isinstance(body["op"], str) or not body["op"]:
        raise InvalidInputError("request field 'op' must be a non-empty string")
    if not _is_int(body["id"]) or body["id"] < 0:
        raise InvalidInputError("request field 'id' must be a non-negative integer")
    if not isinstance(body["token"], str):
        raise InvalidInputError("request field 'token' must be a string")
    args = body["args"]
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise InvalidInputError("request field 'args' must be a map with string keys")
    deadline_ms = body["deadline_ms"]
    if deadline_ms is not None and (not _is_int(deadline_ms) or deadline_ms < 0):
        raise InvalidInputError("request field 'deadline_ms' must be a non-negative integer or nil")


def decode_request(body: bytes) -> Request:
    """Parse and shape-check a request frame body."""
    value = unpack_body(body)
    _check_request_body(value)
    return Request(
        op=value["op"],
        request_id=value["id"],
        token=value["token"],
        args=value["args"],
        deadline_ms=value["deadline_ms"],
    )


def _error_from_wire(payload: Any) -> RayflowError:
    if not isinstance(payload, dict):
        raise InvalidInputError("response field 'error' must be a map")
    _check_keys(payload, _ERROR_KEYS, "error")
    code, message, details = payload["code"], payload["message"], payload["details"]
    if not isinstance(code, str) or not code:
        raise InvalidInputError("error field 'code' must be a non-empty string")
    if not isinstance(message, str):
        raise InvalidInputError("error field 'message' must be a string")
    if not isinstance(details, dict):
        raise InvalidInputError("error field 'details' must be a map")
    # Details are attached after construction: a key such as "message" must not clash with the
    # constructor's own parameters.
    error = error_from_code(code, message)
    error.details = dict(details)
    return error


def decode_response(body: bytes) -> Response:
    """Parse and shape-check a response frame body; a failure is rebuilt as its typed error."""
    value = unpack_body(body)
    if not isinstance(value, dict):
        raise InvalidInputError("response must be a map")
    _check_version(value)
    ok = value.get("ok")
    if not isinstance(ok, bool):
        raise InvalidInputError("response field 'ok' must be a boolean")
    _check_keys(value, _OK_RESPONSE_KEYS if ok else _ERROR_RESPONSE_KEYS, "response")
    request_id = value["id"]
    if not _is_int(request_id) or request_id < 0:
        raise InvalidInputError("response field 'id' must be a non-negative integer")
    if ok:
        return Response(request_id=request_id, ok=True, result=value["result"])
    return Response(request_id=request_id, ok=False, error=_error_from_wire(value["error"]))
