"""The launcher of one subtask through the agent host (:mod:`rayflow.guest.agent_host`): connect, send, relay.

The worker execs this for every subtask instead of ``python -m rayflow.guest run SPEC``, and it
behaves the same towards the worker: the agent's own output streams to this process's stdout and
stderr, the runner's JSON result is the last line printed, and the exit code is 0 when the agent
succeeded, else 1. What differs is where the runner runs: in a child the warm host forks, with the
runtime and the hub client already imported, instead of in a fresh interpreter that imports them
again (a few hundred CPU milliseconds, multiplied by the sandbox's CPU limit into wall time).

Why it starts fast: it is run as ``python -I -S`` and loaded as a top-level module from the
``rayflow/guest`` directory (see :func:`rayflow.wire.guest_commands.launcher_argv`), so neither the ``rayflow`` package nor
``site`` is imported; it uses only ``socket``, ``json``, ``struct`` and ``os``. For the same reason it
imports nothing from rayflow but :mod:`rayflow.wire.guest_commands` (standard library only, loaded
the same way) and writes the frame header of :mod:`rayflow.wire.framing` (a 4-byte
big-endian body length) itself.

How it relays: the request carries the launcher's environment and working directory, and its
stdin, stdout and stderr as descriptors (``SCM_RIGHTS``), so the child reads and writes exactly
the streams a fresh runner would have had. When the host does not answer (never started, died,
refused the request) the launcher says so on stderr and execs the runner itself, as before the
host existed: correctness first.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

if __package__:  # imported as rayflow.guest.host_launcher (tests, the package's own tools)
    from rayflow.wire.guest_commands import runtime_argv
else:  # loaded as a top-level module by launcher_argv: no rayflow package, for a fast start
    from guest_commands import runtime_argv  # type: ignore[no-redef]

#: The frame header of :mod:`rayflow.wire.framing`: the body's length, 4 bytes big-endian.
HEADER = struct.Struct(">I")
#: Largest reply frame accepted (a result holds at most ~1 MiB of each output stream, escaped).
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Bytes read from the host at a time.
READ_BYTES = 1 << 16
#: Reply kinds that end a conversation with the host.
FINAL_KINDS = ("exit", "error", "pong")
#: Exit status of a launcher that got no result and no exit status from the host.
EXIT_NO_RESULT = 1


# --- frames (pure) ------------------------------------------------------------------------------
def encode(message: dict[str, object]) -> bytes:
    """One frame: the header, then ``message`` as JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def split_frames(buffer: bytearray) -> list[dict[str, object]]:
    """Remove every complete frame from ``buffer`` and return their messages, in order.

    Raises ``ValueError`` for a frame above :data:`MAX_REPLY_BYTES` or a body that is no JSON object.
    """
    messages = []
    while len(buffer) >= HEADER.size:
        (length,) = HEADER.unpack_from(buffer)
        if length > MAX_REPLY_BYTES:
            raise ValueError(f"reply frame of {length} bytes exceeds {MAX_REPLY_BYTES}")
        if len(buffer) < HEADER.size + length:
            break
        message = json.loads(bytes(buffer[HEADER.size : HEADER.size + length]))
        del buffer[: HEADER.size + length]
        if not isinstance(message, dict):
            raise ValueError("a reply frame holds no JSON object")  # noqa: TRY004 - malformed, as bad JSON is
        messages.append(message)
    return messages


class Conclusion:
    """What the launcher does once the host is done: print, then exit with a code or a signal.

    ``fall_back`` set means the host did not take the request: run the spec without it.
    """

    __slots__ = ("exit_code", "fall_back", "note", "signal", "stdout")

    def __init__(
        self,
        stdout: str | None = None,
        exit_code: int = 0,
        signal: int | None = None,
        note: str | None = None,
        fall_back: str | None = None,
    ) -> None:
        self.stdout = stdout
        self.exit_code = exit_code
        self.signal = signal
        self.note = note
        self.fall_back = fall_back

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Conclusion({fields})"


def conclude(messages: list[dict[str, object]]) -> Conclusion:
    """How a run ends, from the replies the host and its child sent (in order, maybe cut short).

    * a result: printed as the runner prints it; exit 0 when it is ok, else 1;
    * no result, killed for its timeout: a ``deadline_exceeded`` result (the runtime would have
      reported a killed runner; here the host killed it and says why);
    * no result, killed by a signal: the launcher dies by the same signal, so the sandbox reports
      it as it reported a killed runner (an unsent SIGKILL reads as the OOM killer's);
    * no result, an exit code: that code, nothing printed (the runner crashed; its traceback went
      to stderr), as a crashed runner;
    * an error reply: the host refused the request before starting anything, so it is safe to
      run the spec without the host.
    """
    result = None
    for message in messages:
        kind = message.get("kind")
        if kind == "error":
            error = message.get("error")
            detail = error.get("message") if isinstance(error, dict) else error
            return Conclusion(fall_back=f"the agent host refused the request: {detail}")
        if kind == "result" and isinstance(message.get("result"), dict):
            result = message["result"]
    exit_info = next((m for m in messages if m.get("kind") == "exit"), None)
    if result is not None:
        assert isinstance(result, dict)
        return Conclusion(json.dumps(result), 0 if result.get("ok") else 1)
    if exit_info is None:
        return Conclusion(
            exit_code=EXIT_NO_RESULT, note="the agent host closed the connection without a result"
        )
    if exit_info.get("killed") == "timeout":
        deadline = {
            "ok": False,
            "error": {"code": "deadline_exceeded", "message": "the agent ran past its timeout"},
        }
        return Conclusion(json.dumps(deadline), 1)
    signal_number = exit_info.get("signal")
    if isinstance(signal_number, int) and signal_number > 0:
        return Conclusion(exit_code=128 + signal_number, signal=signal_number)
    code = exit_info.get("exit_code")
    return Conclusion(
        exit_code=code if isinstance(code, int) and code > 0 else EXIT_NO_RESULT,
        note="the agent runner ended without a result",
    )


# --- I/O ----------------------------------------------------------------------------------------
def exchange(socket_path: str, request: dict[str, object], fds: list[int]) -> list[dict[str, object]]:
    """Send ``request`` (with ``fds``) and read replies until a final one or the end of the stream.

    ``OSError`` from connecting or sending means the host never got the request.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        data = encode(request)
        sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
        if sent < len(data):
            sock.sendall(data[sent:])
        return _replies(sock)
    finally:
        sock.close()


def _replies(sock: socket.socket) -> list[dict[str, object]]:
    buffer = bytearray()
    messages: list[dict[str, object]] = []
    while True:
        try:
            data = sock.recv(READ_BYTES)
        except OSError:
            return messages
        if not data:
            return messages
        buffer += data
        try:
            messages += split_frames(buffer)
        except ValueError:
            return messages
        if messages and messages[-1].get("kind") in FINAL_KINDS:
            return messages


def run(path: list[str], socket_path: str, spec_path: str) -> int:
    """Run the spec through the host; relay its result and exit status (see :func:`conclude`)."""
    request = {
        "kind": "run",
        "spec": os.path.abspath(spec_path),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
    }
    try:
        messages = exchange(socket_path, request, [0, 1, 2])
    except OSError as exc:
        return fall_back(
            path, spec_path, f"the agent host does not answer at {socket_path}: {exc.strerror or exc}"
        )
    outcome = conclude(messages)
    if outcome.fall_back is not None:
        return fall_back(path, spec_path, outcome.fall_back)
    if outcome.note is not None:
        sys.stderr.write(f"rayflow: {outcome.note}\n")
        sys.stderr.flush()
    if outcome.stdout is not None:
        sys.stdout.write(outcome.stdout + "\n")
        sys.stdout.flush()
    if outcome.signal is not None:
        import signal

        signal.signal(outcome.signal, signal.SIG_DFL)
        os.kill(os.getpid(), outcome.signal)
    return outcome.exit_code


def fall_back(path: list[str], spec_path: str, reason: str) -> int:
    """Run the spec in this process, as without a host: exec the runner (same pid, same streams)."""
    sys.stderr.write(f"rayflow: {reason}; running the subtask without the agent host\n")
    sys.stderr.flush()
    python = sys.executable or "python3"
    os.execv(python, runtime_argv(python, path, "run", spec_path))


def ping(socket_path: str) -> int:
    """Print the host's pong and exit 0, or exit 1 when it does not answer."""
    try:
        messages = exchange(socket_path, {"kind": "ping"}, [])
    except OSError as exc:
        sys.stderr.write(f"rayflow: the agent host does not answer at {socket_path}: {exc.strerror or exc}\n")
        return 1
    pong = next((m for m in messages if m.get("kind") == "pong"), None)
    if pong is None:
        sys.stderr.write(f"rayflow: the agent host at {socket_path} gave no pong\n")
        return 1
    sys.stdout.write(json.dumps(pong) + "\n")
    return 0


USAGE = "usage: host_launcher SOCKET run SPEC_FILE | host_launcher SOCKET ping"


def main(path: list[str], argv: list[str]) -> int:
    """``SOCKET run SPEC_FILE`` or ``SOCKET ping``; ``path`` is the runtime's import path."""
    if len(argv) == 3 and argv[1] == "run":
        return run(path, argv[0], argv[2])
    if len(argv) == 2 and argv[1] == "ping":
        return ping(argv[0])
    sys.stderr.write(USAGE + "\n")
    return 2
