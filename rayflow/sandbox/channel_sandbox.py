"""``ChannelSandbox``: the host side of the channel, a :class:`Sandbox` over a runtime's pipes.

Every backend starts ``python -m rayflow.guest serve`` as the sandbox's main process, isolated in
its own way, and hands the started process to a ``ChannelSandbox``; exec and file calls are then
the same on every backend. A backend supplies only what differs: the ``teardown`` that removes the
sandbox and, optionally, a ``stats`` measured from outside (cgroups, the container engine).

Threads: one reader thread decodes events and routes them by request id to the waiting calls, so
any number of threads may call ``exec`` at once. Output callbacks run on the reader thread, in the
order the chunks arrived; a slow callback delays every call of this sandbox.

Output: a command's stdout and stderr are kept in memory up to ``max_output_bytes`` together;
a command writing more is killed (``killed=OUTPUT_LIMIT``, ``truncated=True``) with the output
up to the cap, so a runaway ``yes`` cannot fill the host's memory.

Failure: if the runtime exits, or sends bytes that do not decode (the sandbox is not trusted),
the channel is closed for good: waiting calls fail with :class:`~rayflow.errors.TransportError`
and so does every later call. Commands still running when the sandbox is *destroyed* instead end
with ``killed=SANDBOX_DESTROYED`` and the output received so far.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from rayflow.errors import (
    DeadlineExceededError,
    InvalidInputError,
    RayflowError,
    TransportError,
)
from rayflow.sandbox.backend import OutputCallback
from rayflow.sandbox.spec import ExecResult, KillReason, SandboxSpec, SandboxStats
from rayflow.wire import archive
from rayflow.wire.channel import (
    DEFAULT_MAX_FRAME_BYTES,
    Event,
    ExitInfo,
    FrameDecoder,
    encode_frame,
    exec_request,
    parse_event,
    request,
)

log = logging.getLogger("rayflow.sandbox")

#: Default cap on one command's stdout + stderr kept by the host; beyond it the command is killed.
DEFAULT_MAX_OUTPUT_BYTES = 32 * 1024 * 1024
#: How long a call other than exec may take before the host gives up on it.
DEFAULT_CALL_TIMEOUT_S = 600.0
#: Extra time the host waits past an exec's own timeout (the runtime enforces the timeout; this
#: only guards against a runtime that stopped answering).
EXEC_GRACE_S = 30.0
#: How long ``destroy`` waits for the reader thread after the teardown.
READER_JOIN_S = 5.0
#: Room an ``upload`` request takes around its archive (id, kind, path and msgpack headers).
UPLOAD_ENVELOPE_BYTES = 4096


class RuntimeProcess(Protocol):
    """What ``ChannelSandbox`` needs of the started runtime (``subprocess.Popen`` fits)."""

    stdin: Any
    stdout: Any

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class _Call:
    """One request in flight: where its events are collected until it completes."""

    kind: str
    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    exit: ExitInfo | None = None
    value: Any = None
    error: RayflowError | None = None
    destroyed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class ChannelSandbox:
    """A sandbox driven through the runtime's stdin/stdout; see the module docstring."""

    def __init__(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        process: RuntimeProcess,
        teardown: Callable[[], None],
        stats: Callable[[], SandboxStats] | None = None,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        self._id = sandbox_id
        self._spec = spec
        self._process = process
        self._teardown = teardown
        self._stats = stats
        self.max_frame_bytes = max_frame_bytes
        self.max_output_bytes = max_output_bytes
        self.call_timeout_s = call_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed: RayflowError | None = None
        self._destroyed = False
        self._reader = threading.Thread(
            target=self._read_events, name=f"rayflow-sandbox-{sandbox_id}", daemon=True
        )
        self._reader.start()

    @property
    def id(self) -> str:
        return self._id

    @property
    def spec(self) -> SandboxSpec:
        return self._spec

    @property
    def alive(self) -> bool:
        """False once the channel closed (runtime exited, broke the protocol, or was destroyed)."""
        return self._closed is None

    # --- calls ------------------------------------------------------------------------------
    def exec(
        self,
        command: Sequence[str] | str,
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``command`` in the sandbox; ``timeout_s`` defaults to the spec's ``exec_timeout_s``."""
        timeout = self._spec.exec_timeout_s if timeout_s is None else timeout_s
        call = _Call("exec", on_stdout=on_stdout, on_stderr=on_stderr)
        request_id = self._next_id()
        message = exec_request(
            request_id,
            command if isinstance(command, str) else list(command),
            stdin=stdin or None,
            env=dict(env) if env else None,
            cwd=cwd,
            timeout_s=timeout,
            max_output=self.max_output_bytes,
        )
        self._call(request_id, message, call, timeout + EXEC_GRACE_S)
        stdout, stderr = b"".join(call.stdout), b"".join(call.stderr)
        if call.destroyed:
            return ExecResult(137, stdout, stderr, 0.0, killed=KillReason.SANDBOX_DESTROYED)
        assert call.exit is not None
        info = call.exit
        return ExecResult(
            exit_code=info.exit_code,
            stdout=stdout,
            stderr=stderr,
            duration_s=info.duration_s,
            killed=KillReason(info.killed) if info.killed else None,
            truncated=info.truncated,
        )

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._simple("write_file", path=path, data=bytes(data), mode=mode)

    def read_file(self, path: str) -> bytes:
        value = self._simple("read_file", path=path)
        if not isinstance(value, bytes):
            raise self._protocol_violation("read_file answered with something else than bytes")
        return value

    def upload(self, local_dir: Path, remote_dir: str) -> None:
        """Copy the tree at ``local_dir`` to ``remote_dir`` (created if missing) as a tar archive."""
        self.upload_archive(archive.pack_tree(Path(local_dir)), remote_dir)

    def upload_archive(self, data: bytes, remote_dir: str) -> None:
        """Unpack ``data``, a tar archive made by :func:`rayflow.wire.archive.pack_tree`, at
        ``remote_dir``: one ``upload`` request, or one per part when it is larger than a frame."""
        room = self.max_frame_bytes - UPLOAD_ENVELOPE_BYTES - len(remote_dir.encode())
        for part in archive.split_archive(bytes(data), room):
            self._simple("upload", path=remote_dir, archive=part)

    def download(self, remote_dir: str, local_dir: Path) -> None:
        """Copy the tree at ``remote_dir`` into ``local_dir``; a hostile archive is refused whole."""
        value = self._simple("download", path=remote_dir)
        if not isinstance(value, bytes):
            raise self._protocol_violation("download answered with something else than bytes")
        archive.unpack_tree(value, Path(local_dir))

    def stats(self) -> SandboxStats:
        """The backend's own measurement when it gave one, else the runtime's."""
        if self._stats is not None:
            return self._stats()
        value = self._simple("stats")
        if not isinstance(value, dict):
            raise self._protocol_violation("stats answered with something else than a map")
        known = {name: value.get(name) for name in SandboxStats.__dataclass_fields__}
        return SandboxStats(**known)

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Round trip to the runtime (backends use it to wait until a sandbox is ready)."""
        value = self._simple("ping", timeout_s=timeout_s)
        return value if isinstance(value, dict) else {}

    def destroy(self) -> None:
        """Run the backend's teardown once; later calls (and calls from other threads) do nothing."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        try:
            self._teardown()
        finally:
            self._close(TransportError("the sandbox was destroyed", sandbox=self._id), destroyed=True)
            self._reader.join(READER_JOIN_S)
            for pipe in (self._process.stdin, self._process.stdout):
                try:
                    pipe.close()
                except (OSError, ValueError):
                    pass

    def __enter__(self) -> ChannelSandbox:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed"
        return f"ChannelSandbox(id={self._id!r}, {state})"

    # --- plumbing ---------------------------------------------------------------------------
    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def _simple(self, kind: str, *, timeout_s: float | None = None, **fields: Any) -> Any:
        request_id = self._next_id()
        call = _Call(kind)
        self._call(request_id, request(request_id, kind, **fields), call, timeout_s or self.call_timeout_s)
        if call.destroyed:
            raise TransportError("the sandbox was destroyed", sandbox=self._id)
        return call.value

    def _call(self, request_id: int, message: dict[str, Any], call: _Call, wait_s: float) -> None:
        """Send one request and wait for the event that completes it."""
        frame = encode_frame(message, max_frame_bytes=self.max_frame_bytes)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            self._pending[request_id] = call
        try:
            with self._write_lock:
                self._process.stdin.write(frame)
                self._process.stdin.flush()
        except (OSError, ValueError) as exc:
            self._close(TransportError(f"the sandbox runtime is not reading: {exc}", sandbox=self._id))
        if not call.done.wait(wait_s):
            with self._lock:
                self._pending.pop(request_id, None)
            raise DeadlineExceededError(
                f"the sandbox runtime did not answer a {call.kind} within {wait_s:.0f} s", sandbox=self._id
            )
        if call.error is not None:
            raise call.error

    def _protocol_violation(self, what: str) -> TransportError:
        error = TransportError(f"sandbox runtime broke the protocol: {what}", sandbox=self._id)
        self._close(error)
        return error

    def _close(self, error: RayflowError, destroyed: bool = False) -> None:
        """Close the channel once: complete every pending call (destroyed, or with ``error``)."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = error
            pending = list(self._pending.values())
            self._pending.clear()
        for call in pending:
            if destroyed:
                call.destroyed = True
            else:
                call.error = error
            call.done.set()
        if not destroyed and self._process.poll() is None:
            # The runtime broke the protocol while alive: nothing it says can be trusted any more.
            try:
                self._process.kill()
            except OSError:
                pass

    def _read_events(self) -> None:
        stream: BinaryIO = self._process.stdout
        read = getattr(stream, "read1", stream.read)
        decoder = FrameDecoder(self.max_frame_bytes)
        try:
            while True:
                data = read(1 << 16)
                if not data:
                    decoder.end()
                    break
                for message in decoder.feed(data):
                    self._route(parse_event(message))
        except InvalidInputError as exc:
            self._close(TransportError(f"sandbox channel broken: {exc.message}", sandbox=self._id))
            return
        except (OSError, ValueError) as exc:
            if not self._destroyed:
                log.warning("sandbox %s: reading its channel failed: %s", self._id, exc)
        self._close(
            TransportError("the sandbox runtime exited", sandbox=self._id, exit_code=self._process.poll()),
            destroyed=self._destroyed,
        )

    def _route(self, event: Event) -> None:
        with self._lock:
            call = self._pending.get(event.id)
        if call is None:
            if event.kind == "error":
                log.warning("sandbox %s runtime: %s", self._id, event.error)
            return  # a call the host stopped waiting for
        if event.kind in ("stdout", "stderr"):
            if call.kind != "exec":
                raise InvalidInputError(f"output event for a {call.kind} request")
            (call.stdout if event.kind == "stdout" else call.stderr).append(event.data)
            callback = call.on_stdout if event.kind == "stdout" else call.on_stderr
            if callback is not None:
                try:
                    callback(event.data)
                except Exception:
                    log.exception("sandbox %s: output callback failed", self._id)
            return
        if event.kind == "exit" and call.kind != "exec" or event.kind == "result" and call.kind == "exec":
            raise InvalidInputError(f"{event.kind} event for a {call.kind} request")
        with self._lock:
            self._pending.pop(event.id, None)
        call.exit, call.value, call.error = event.exit, event.value, event.error
        call.done.set()
