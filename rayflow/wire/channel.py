"""The host <-> sandbox channel format: length-prefixed msgpack frames, requests and events.

One byte stream in each direction (the runtime's stdin and stdout). A frame is a 4-byte
big-endian body length followed by one msgpack map. The host sends requests; the runtime answers
with events that carry the request's ``id``, so several calls can be in flight at once:

* requests: ``{"id", "kind": "exec" | "write_file" | "read_file" | "upload" | "download" |
  "stats" | "ping" | "shutdown", ...fields}``;
* events: ``{"id", "kind": "stdout" | "stderr" | "exit" | "result" | "error", ...fields}``.
  An exec yields any number of ``stdout``/``stderr`` chunks, then one ``exit``; every other
  request yields one ``result`` or one ``error``.

Why sans-IO: both ends parse bytes from a peer they do not trust (the host must survive a
compromised sandbox), so everything here is pure functions and a decoder object fed with bytes,
tested without a process. Every problem becomes a typed :class:`~rayflow.errors.InvalidInputError`
(:class:`~rayflow.errors.PayloadTooLargeError` for an oversized frame, refused from its header
before the body is buffered).

Framing errors and shape errors differ on purpose: a request of the wrong shape inside a good
frame is answered with an ``error`` event and the channel goes on, but garbage or an oversized
frame means the byte stream has lost its frame boundaries, and the only channel is then unusable.
The decoder stays failed after such an error, and both ends treat it as the end of the channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from rayflow.errors import (
    InvalidInputError,
    RayflowError,
    error_from_code,
)
from rayflow.wire.framing import FrameSplitter, frame

#: Bumped when a message shape changes incompatibly; answered by ``ping``.
PROTOCOL_VERSION = 1
#: Default largest frame: room for a file or tar archive of 64 MiB plus the envelope.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024 + 64 * 1024
#: Id of an error event answering a request whose own id could not be read.
UNKNOWN_ID = 0

REQUEST_KINDS = frozenset(
    {"exec", "write_file", "read_file", "upload", "download", "stats", "ping", "shutdown"}
)
EVENT_KINDS = frozenset({"stdout", "stderr", "exit", "result", "error"})
#: Why the runtime may report a command killed (the values of ``rayflow.sandbox.spec.KillReason``,
#: repeated here because the runtime does not import the host's sandbox package).
KILL_REASONS = frozenset({"timeout", "oom", "pids", "output-limit", "sandbox-destroyed"})


# --- framing ----------------------------------------------------------------------------------
def encode_frame(message: dict[str, Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Pack ``message`` as one frame; refuse a body above ``max_frame_bytes``."""
    try:
        packed = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"message cannot be encoded: {exc}") from None
    return frame(packed, max_frame_bytes)


def _refuse_extension(code: int, data: bytes) -> Any:
    raise InvalidInputError(f"msgpack extension type {code} is not allowed")


def unpack_message(body: bytes) -> dict[str, Any]:
    """Parse one frame body into a map with string keys; anything else is malformed."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_extension)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input; all mean "malformed"
        raise InvalidInputError(f"malformed msgpack body: {type(exc).__name__}") from None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise InvalidInputError("a frame must hold a map with string keys")
    return value


class FrameDecoder:
    """Incremental decoder: bytes in, complete messages out, in order.

    After any error the decoder is *failed*: frame boundaries are lost, so every later ``feed``
    raises again rather than guessing where the next frame starts.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._splitter = FrameSplitter(max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self._failure: InvalidInputError | None = None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return self._splitter.at_frame_boundary

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return the messages it completes."""
        if self._failure is not None:
            raise self._failure
        try:
            return [unpack_message(body) for body in self._splitter.feed(data)]
        except InvalidInputError as exc:
            self._fail(exc)
            raise

    def end(self) -> None:
        """The stream ended: a partly received frame is a truncation error."""
        if self._failure is not None:
            raise self._failure
        try:
            self._splitter.end()
        except InvalidInputError as exc:
            self._fail(exc)
            raise

    def _fail(self, error: InvalidInputError) -> None:
        self._failure = error
        self._splitter.clear()


# --- field checks -----------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _message_id(message: dict[str, Any]) -> int:
    value = message.get("id")
    if not _is_int(value) or value < 0:
        raise InvalidInputError("field 'id' must be a non-negative integer")
    return value


def _optional(message: dict[str, Any], name: str, check: Any, what: str) -> Any:
    value = message.get(name)
    if value is not None and not check(value):
        raise InvalidInputError(f"field '{name}' must be {what}", field=name)
    return value


def _required(message: dict[str, Any], name: str, check: Any, what: str) -> Any:
    if name not in message:
        raise InvalidInputError(f"field '{name}' is missing", field=name)
    value = message[name]
    if not check(value):
        raise InvalidInputError(f"field '{name}' must be {what}", field=name)
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _is_env(value: Any) -> bool:
    return _is_str_map(value) and all(k and "=" not in k and "\0" not in k + v for k, v in value.items())


def _is_argv(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(arg, str) and "\0" not in arg for arg in value)
    )


# --- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecRequest:
    """Run one command: an argv list, or a string for ``/bin/sh -c``."""

    id: int
    argv: list[str] | None = None
    shell: str | None = None
    stdin: bytes | None = None
    #: Extra variables, laid over the runtime's own environment.
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = None
    #: Cap on stdout + stderr bytes; the command is killed once it writes more.
    max_output: int | None = None

    @property
    def kind(self) -> str:
        return "exec"

    @property
    def command(self) -> list[str]:
        """The argv to start (a shell command runs under ``/bin/sh -c``)."""
        if self.argv is not None:
            return list(self.argv)
        return ["/bin/sh", "-c", self.shell or ""]


@dataclass(frozen=True)
class FileRequest:
    """``write_file`` (with ``data`` and ``mode``) or ``read_file`` of one path."""

    id: int
    kind: str
    path: str
    data: bytes = b""
    mode: int = 0o644


@dataclass(frozen=True)
class TreeRequest:
    """``upload`` (``archive`` is a tar of the tree to unpack at ``path``) or ``download`` of ``path``."""

    id: int
    kind: str
    path: str
    archive: bytes = b""


@dataclass(frozen=True)
class SimpleRequest:
    """``stats``, ``ping`` or ``shutdown``: no fields but the id."""

    id: int
    kind: str


Request = ExecRequest | FileRequest | TreeRequest | SimpleRequest


def request_id_of(message: dict[str, Any]) -> int:
    """The id to answer a malformed request with: its own if readable, else :data:`UNKNOWN_ID`."""
    value = message.get("id")
    return value if _is_int(value) and value >= 0 else UNKNOWN_ID


def parse_request(message: dict[str, Any]) -> Request:
    """Shape-check a decoded request and return its typed form."""
    request_id = _message_id(message)
    kind = message.get("kind")
    if kind not in REQUEST_KINDS:
        raise InvalidInputError("unknown request kind", kind=repr(kind)[:64])
    if kind == "exec":
        return _parse_exec(request_id, message)
    if kind in ("write_file", "read_file"):
        path = _required(message, "path", _is_path, "a non-empty path")
        if kind == "read_file":
            return FileRequest(request_id, kind, path)
        data = _required(message, "data", lambda v: isinstance(v, bytes), "bytes")
        mode = _optional(message, "mode", lambda v: _is_int(v) and 0 <= v <= 0o7777, "a file mode")
        return FileRequest(request_id, kind, path, data, 0o644 if mode is None else mode)
    if kind in ("upload", "download"):
        path = _required(message, "path", _is_path, "a non-empty path")
        if kind == "download":
            return TreeRequest(request_id, kind, path)
        archive = _required(message, "archive", lambda v: isinstance(v, bytes), "bytes")
        return TreeRequest(request_id, kind, path, archive)
    return SimpleRequest(request_id, kind)


def _parse_exec(request_id: int, message: dict[str, Any]) -> ExecRequest:
    argv = _optional(message, "argv", _is_argv, "a non-empty list of strings")
    shell = _optional(message, "shell", lambda v: isinstance(v, str) and "\0" not in v, "a string")
    if (argv is None) == (shell is None):
        raise InvalidInputError("an exec request needs exactly one of 'argv' and 'shell'")
    return ExecRequest(
        id=request_id,
        argv=argv,
        shell=shell,
        stdin=_optional(message, "stdin", lambda v: isinstance(v, bytes), "bytes"),
        env=dict(_optional(message, "env", _is_env, "a map of variable names to strings") or {}),
        cwd=_optional(message, "cwd", _is_path, "a non-empty path"),
        timeout_s=_optional(message, "timeout_s", _is_positive_number, "a positive number"),
        max_output=_optional(
            message, "max_output", lambda v: _is_int(v) and v >= 0, "a non-negative integer"
        ),
    )


def exec_request(
    request_id: int,
    command: list[str] | tuple[str, ...] | str,
    *,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    max_output: int | None = None,
) -> dict[str, Any]:
    """An exec request message; checked like the runtime checks it, so a bad call fails here."""
    message: dict[str, Any] = {"id": request_id, "kind": "exec"}
    if isinstance(command, str):
        message["shell"] = command
    else:
        message["argv"] = list(command)
    optional = {"stdin": stdin, "env": env, "cwd": cwd, "timeout_s": timeout_s, "max_output": max_output}
    message.update({name: value for name, value in optional.items() if value is not None})
    parse_request(message)
    return message


def request(request_id: int, kind: str, **fields: Any) -> dict[str, Any]:
    """Any other request message (``write_file``, ``read_file``, ``upload``, ...), shape-checked."""
    message = {"id": request_id, "kind": kind, **fields}
    parse_request(message)
    return message


# --- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitInfo:
    """How an exec ended, as the runtime saw it."""

    exit_code: int
    duration_s: float
    #: A :class:`~rayflow.sandbox.spec.KillReason` value, or ``None`` when it exited by itself.
    killed: str | None = None
    truncated: bool = False


@dataclass(frozen=True)
class Event:
    """One decoded event: output ``data``, an ``exit``, a ``result`` value or an ``error``."""

    id: int
    kind: str
    data: bytes = b""
    exit: ExitInfo | None = None
    value: Any = None
    error: RayflowError | None = None


def output_event(request_id: int, stream: str, data: bytes) -> dict[str, Any]:
    """A chunk of a command's ``stdout`` or ``stderr``."""
    return {"id": request_id, "kind": stream, "data": data}


def exit_event(
    request_id: int, exit_code: int, duration_s: float, killed: str | None = None, truncated: bool = False
) -> dict[str, Any]:
    return {
        "id": request_id,
        "kind": "exit",
        "exit_code": exit_code,
        "duration_s": duration_s,
        "killed": killed,
        "truncated": truncated,
    }


def result_event(request_id: int, value: Any = None) -> dict[str, Any]:
    return {"id": request_id, "kind": "result", "value": value}


def error_event(request_id: int, error: RayflowError) -> dict[str, Any]:
    """An error event; details that would not encode are dropped so the code always arrives."""
    details = {}
    for key, value in error.details.items():
        if isinstance(value, (str, int, float, bool, type(None))):
            details[key] = value
    return {
        "id": request_id,
        "kind": "error",
        "code": error.code,
        "message": str(error.message),
        "details": details,
    }


def parse_event(message: dict[str, Any]) -> Event:
    """Shape-check a decoded event and return its typed form."""
    event_id = _message_id(message)
    kind = message.get("kind")
    if kind not in EVENT_KINDS:
        raise InvalidInputError("unknown event kind", kind=repr(kind)[:64])
    if kind in ("stdout", "stderr"):
        return Event(event_id, kind, data=_required(message, "data", lambda v: isinstance(v, bytes), "bytes"))
    if kind == "exit":
        killed = _optional(
            message, "killed", lambda v: isinstance(v, str) and v in KILL_REASONS, "a kill reason"
        )
        info = ExitInfo(
            exit_code=_required(message, "exit_code", _is_int, "an integer"),
            duration_s=float(
                _required(message, "duration_s", lambda v: _is_positive_number(v) or v == 0, "a duration")
            ),
            killed=killed,
            truncated=bool(_optional(message, "truncated", lambda v: isinstance(v, bool), "a boolean")),
        )
        return Event(event_id, kind, exit=info)
    if kind == "result":
        return Event(event_id, kind, value=message.get("value"))
    code = _required(message, "code", lambda v: isinstance(v, str) and bool(v), "an error code")
    text = _optional(message, "message", lambda v: isinstance(v, str), "a string") or ""
    details = _optional(message, "details", lambda v: isinstance(v, dict), "a map") or {}
    error = error_from_code(code, text)
    error.details = dict(details)
    return Event(event_id, kind, error=error)
