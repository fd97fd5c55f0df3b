"""The in-sandbox runtime: serves channel requests from stdin and writes events to stdout.

``python -m rayflow.guest serve`` is the main process of every sandbox. The host writes request
frames (:mod:`rayflow.wire.channel`) to its stdin; it answers on stdout. Why one long-lived
runtime instead of one ``docker exec`` per command: starting a command through it costs a fork and
a frame, not a round trip through a container engine, and every backend gets the same exec path.

How a command runs: in a thread of its own (so many run at once), as the leader of a fresh process
group inside the runtime's session, with its stdin, stdout and stderr on pipes. Output is streamed
back in chunks as it arrives. On timeout, on passing the output cap, or on shutdown the runtime
sends SIGKILL to the whole group, so children the command started die with it. A command that
dies by a SIGKILL the runtime did not send is reported as killed for ``oom``: on Linux that is
what the kernel's OOM killer does (a backend with cgroup information may refine the reason).
Processes that leave the group on purpose (``setsid``) escape this; backends kill the whole
sandbox from outside when it is destroyed.

Failure policy: a request of the wrong shape is answered with an ``error`` event and serving goes
on. A framing error (garbage, an oversized or truncated frame) means the stream has lost its frame
boundaries: the runtime answers with an ``error`` event of id 0, kills its commands and exits with
status 2, and the host sees the channel close.

The channel owns fds 0 and 1: at start they are moved to private descriptors, stdin is replaced by
``/dev/null`` and stdout by stderr, so a stray ``print`` cannot corrupt the frame stream.
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, RayflowError
from rayflow.wire.channel import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    UNKNOWN_ID,
    ExecRequest,
    FileRequest,
    FrameDecoder,
    Request,
    SimpleRequest,
    TreeRequest,
    encode_frame,
    error_event,
    exit_event,
    output_event,
    parse_request,
    request_id_of,
    result_event,
)
from rayflow.wire.procfs import own_group_options, pidfd, rss_bytes, session_members

log = logging.getLogger("rayflow.guest")

#: Bytes read from a command's pipe at a time, and so the largest output event.
CHUNK_BYTES = 64 * 1024
#: After a command's main process exits, how long to keep reading output its background children
#: still write to the inherited pipes before giving up on them.
DRAIN_AFTER_EXIT_S = 1.0
#: How often to check whether the main process exited, where a pidfd is not available.
EXIT_POLL_S = 0.1
#: How long shutdown waits for killed commands to report their exit.
SHUTDOWN_WAIT_S = 5.0
#: Entries visited at most when measuring disk use.
DISK_SCAN_LIMIT = 200_000
#: Exit status of the runtime after a framing error on its channel.
EXIT_CHANNEL_BROKEN = 2


# --- pure helpers -----------------------------------------------------------------------------
def resolve_path(path: str, base: str, alias: str | None = None) -> str:
    """Where ``path`` (as the host names it) is on this machine.

    Relative paths are under ``base`` (the sandbox's working directory). ``alias`` is the working
    directory as the host's spec names it, for runtimes whose working directory lives elsewhere
    (the process backend maps ``/workspace`` onto a temporary directory): paths under it are moved
    under ``base``.
    """
    if alias and alias != "/":
        alias = alias.rstrip("/")
        if path == alias or path.startswith(alias + "/"):
            return os.path.normpath(base + path[len(alias) :])
    return os.path.normpath(path if path.startswith("/") else os.path.join(base, path))


def exit_code_of(returncode: int) -> int:
    """A shell-style exit code: a death by signal N is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def kill_reason(returncode: int, sent: str | None) -> str | None:
    """Why a command was killed: the reason the runtime recorded, or ``oom`` for an unsent SIGKILL."""
    if sent is not None:
        return sent
    if returncode == -signal.SIGKILL:
        return "oom"
    return None


@dataclass
class _RunningExec:
    """A started command and the reason the runtime killed it, once it has."""

    process: subprocess.Popen[bytes]
    reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kill(self, reason: str) -> None:
        """SIGKILL the command's whole process group; the first reason given is kept."""
        with self.lock:
            if self.reason is None:
                self.reason = reason
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is already gone


class AgentServer:
    """Reads requests from ``in_fd``, writes events to ``out_fd``; one instance per sandbox."""

    def __init__(
        self,
        in_fd: int,
        out_fd: int,
        *,
        base_dir: str | None = None,
        workdir_alias: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        exec_memory_bytes: int | None = None,
    ) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self.base_dir = os.path.realpath(base_dir or os.getcwd())
        self.workdir_alias = workdir_alias
        self.max_frame_bytes = max_frame_bytes
        self.exec_memory_bytes = exec_memory_bytes
        self._decoder = FrameDecoder(max_frame_bytes)
        self._write_lock = threading.Lock()
        self._running: dict[int, _RunningExec] = {}
        self._running_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._stopping = False

    # --- the loop ---------------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until shutdown or end of input; returns the process exit status."""
        while True:
            try:
                data = os.read(self._in_fd, 1 << 16)
            except OSError as exc:
                log.error("channel read failed: %s", exc)
                self._stop("sandbox-destroyed")
                return EXIT_CHANNEL_BROKEN
            try:
                if not data:
                    self._decoder.end()
                    self._stop("sandbox-destroyed")
                    return 0
                messages = self._decoder.feed(data)
            except InvalidInputError as exc:
                log.error("channel broken: %s", exc.message)
                self._send_quietly(error_event(UNKNOWN_ID, exc))
                self._stop("sandbox-destroyed")
                return EXIT_CHANNEL_BROKEN
            for message in messages:
                if self._dispatch(message):
                    return 0

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Start handling one request; True when it asked the runtime to stop."""
        try:
            request = parse_request(message)
        except InvalidInputError as exc:
            self._send_quietly(error_event(request_id_of(message), exc))
            return False
        if isinstance(request, SimpleRequest) and request.kind == "shutdown":
            self._stop("sandbox-destroyed")
            self._send_quietly(result_event(request.id))
            return True
        if isinstance(request, SimpleRequest) and request.kind == "ping":
            self._send_quietly(result_event(request.id, runtime_identity()))
            return False
        target: Callable[[], None]
        if isinstance(request, ExecRequest):
            target = lambda: self._run_exec(request)
        else:
            target = lambda: self._run_call(request)
        self._spawn(target, f"rayflow-agent-{request.kind}-{request.id}")
        return False

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                target()
            finally:
                with self._running_lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._running_lock:
            self._threads.add(thread)
        thread.start()

    def _stop(self, reason: str) -> None:
        """Kill every running command and wait (bounded) for their exit events to go out."""
        self._stopping = True
        with self._running_lock:
            running = list(self._running.values())
            threads = list(self._threads)
        for item in running:
            item.kill(reason)
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop_for_signal(self) -> None:
        """Kill every running command at once (the runtime itself is being terminated)."""
        self._stopping = True
        with self._running_lock:
            running = list(self._running.values())
        for item in running:
            item.kill("sandbox-destroyed")

    # --- output -----------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        frame = encode_frame(message, max_frame_bytes=self.max_frame_bytes)
        with self._write_lock:
            view = memoryview(frame)
            while view:
                written = os.write(self._out_fd, view)
                view = view[written:]

    def _send_quietly(self, message: dict[str, Any]) -> None:
        """Send, or log when the host is gone: nobody is left to answer then."""
        try:
            self._send(message)
        except OSError as exc:
            log.error("cannot write to the channel: %s", exc)

    def _answer(self, request_id: int, compute: Callable[[], Any]) -> None:
        """Send ``compute()`` as a result, or the typed error it raised."""
        try:
            event = result_event(request_id, compute())
            self._send(event)
            return
        except RayflowError as exc:
            error = exc
        except OSError as exc:
            error = _os_error(exc)
        except Exception as exc:  # noqa: BLE001 - the runtime must never die from one request
            error = RayflowError(f"{type(exc).__name__}: {exc}")
        self._send_quietly(error_event(request_id, error))

    # --- file and tree requests -------------------------------------------------------------
    def _path(self, path: str) -> str:
        return resolve_path(path, self.base_dir, self.workdir_alias)

    def _run_call(self, request: Request) -> None:
        handlers: dict[str, Callable[[], Any]] = {}
        if isinstance(request, FileRequest):
            handlers = {
                "write_file": lambda: self._write_file(request),
                "read_file": lambda: self._read_file(request),
            }
        elif isinstance(request, TreeRequest):
            # Imported on first use: tarfile and pathlib cost every sandbox's start-up ~4 ms.
            from pathlib import Path

            from rayflow.wire import archive

            handlers = {
                "upload": lambda: archive.unpack_tree(request.archive, Path(self._path(request.path))),
                "download": lambda: archive.pack_tree(Path(self._path(request.path))),
            }
        elif request.kind == "stats":
            handlers = {"stats": self._stats}
        self._answer(request.id, handlers[request.kind])

    def _write_file(self, request: FileRequest) -> None:
        target = self._path(request.path)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        import tempfile  # on first use: it pulls in random, hashlib and shutil at start-up

        # Written beside the target and renamed over it, so a reader never sees half a file.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".rayflow-write-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(request.data)
            os.chmod(temporary, request.mode)
            os.replace(temporary, target)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def _read_file(self, request: FileRequest) -> bytes:
        target = self._path(request.path)
        with open(target, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            # Room for the event's envelope around the data.
            limit = self.max_frame_bytes - 1024
            if size > limit:
                raise PayloadTooLargeError(f"{request.path!r} has {size} bytes, more than {limit}", size=size)
            return handle.read(limit + 1)

    def _stats(self) -> dict[str, Any]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        members = session_members(os.getsid(0))
        memory = sum(rss_bytes(pid) for pid in members)
        return {
            "cpu_seconds": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            "memory_bytes": memory,
            "pids": len(members),
            "disk_bytes": _disk_bytes(self.base_dir),
        }

    # --- exec -------------------------------------------------------------------------------
    def _run_exec(self, request: ExecRequest) -> None:
        started = time.monotonic()
        cwd = self._path(request.cwd) if request.cwd else self.base_dir
        if not os.path.isdir(cwd):
            self._send_quietly(error_event(request.id, NotFoundError(f"no directory {request.cwd!r}")))
            return
        try:
            process = self._start(request, cwd)
        except OSError as exc:
            # The shell's conventions: 127 for a missing program, 126 for one that cannot run.
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            note = f"rayflow: cannot run {request.command[0]!r}: {exc.strerror}\n".encode()
            self._send_quietly(output_event(request.id, "stderr", note))
            self._send_quietly(exit_event(request.id, code, time.monotonic() - started))
            return
        running = _RunningExec(process)
        with self._running_lock:
            self._running[request.id] = running
        if self._stopping:
            running.kill("sandbox-destroyed")
        try:
            truncated = self._pump(request, running, started)
        except BaseException:
            running.kill("sandbox-destroyed")
            raise
        finally:
            # Forgotten before the reaping wait: once reaped, the group id may be reused, and a
            # late kill must not reach someone else's processes.
            with self._running_lock:
                self._running.pop(request.id, None)
        returncode = process.wait()
        self._send_quietly(
            exit_event(
                request.id,
                exit_code_of(returncode),
                time.monotonic() - started,
                killed=kill_reason(returncode, running.reason),
                truncated=truncated,
            )
        )

    def _start(self, request: ExecRequest, cwd: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **request.env}
        options = own_group_options()
        if self.exec_memory_bytes is not None:
            limit = self.exec_memory_bytes
            group_step = options.pop("preexec_fn", None)

            def limit_memory() -> None:
                # Runs in the child between fork and exec: plain system calls only, no locks.
                if group_step is not None:
                    group_step()
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

            options["preexec_fn"] = limit_memory
        return subprocess.Popen(
            request.command,
            stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            close_fds=True,
            **options,
        )

    def _pump(self, request: ExecRequest, running: _RunningExec, started: float) -> bool:
        """Feed stdin, stream output, enforce timeout and cap; returns whether output was dropped."""
        process = running.process
        assert process.stdout is not None and process.stderr is not None
        selector = selectors.DefaultSelector()
        streams = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr"}
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, "output")
        pending = memoryview(request.stdin or b"")
        if process.stdin is not None:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
        exit_fd = pidfd(process.pid)
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ, "exit")
        deadline = None if request.timeout_s is None else started + request.timeout_s
        cap = request.max_output
        sent = 0
        truncated = False
        exited_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and _has_exited(process.pid):
                    exited_at = now
                # Done once the command exited and its output ended; or, when background children
                # still hold the pipes, after a short drain (the command itself is done).
                if exited_at is not None and (not streams or now - exited_at >= DRAIN_AFTER_EXIT_S):
                    break
                if deadline is not None and now >= deadline and exited_at is None:
                    running.kill("timeout")
                    deadline = None
                waits = [EXIT_POLL_S if exit_fd is None else None]
                if deadline is not None:
                    waits.append(deadline - now)
                if exited_at is not None:
                    waits.append(exited_at + DRAIN_AFTER_EXIT_S - now)
                bounded = [wait for wait in waits if wait is not None]
                for key, _ in selector.select(max(0.0, min(bounded)) if bounded else None):
                    if key.data == "exit":
                        selector.unregister(key.fd)
                    elif key.data == "stdin":
                        pending = _feed_stdin(selector, process, pending)
                    else:
                        chunk = _read_chunk(key.fd)
                        if chunk is None:
                            continue
                        if not chunk:
                            selector.unregister(key.fd)
                            del streams[key.fd]
                            continue
                        if cap is not None and sent + len(chunk) > cap:
                            chunk = chunk[: max(0, cap - sent)]
                            if not truncated:
                                truncated = True
                                running.kill("output-limit")
                        if chunk:
                            sent += len(chunk)
                            self._send(output_event(request.id, streams[key.fd], chunk))
        except OSError as exc:
            # The host is gone (a write failed): stop the command, nobody will read its output.
            log.error("exec %d abandoned: %s", request.id, exc)
            running.kill("sandbox-destroyed")
        finally:
            selector.close()
            if exit_fd is not None:
                os.close(exit_fd)
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        return truncated


# --- process and filesystem helpers -----------------------------------------------------------
def _os_error(exc: OSError) -> RayflowError:
    where = {"path": exc.filename} if isinstance(exc.filename, str) else {}
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{exc.strerror}: {exc.filename}", **where)
    return InvalidInputError(f"{exc.strerror or exc}: {exc.filename}", errno=exc.errno, **where)


def _has_exited(pid: int) -> bool:
    """True once ``pid`` has exited; it is not reaped, so its pid (and group id) stay reserved."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _feed_stdin(
    selector: selectors.BaseSelector, process: subprocess.Popen[bytes], pending: memoryview
) -> memoryview:
    assert process.stdin is not None
    fd = process.stdin.fileno()
    try:
        written = os.write(fd, pending[:CHUNK_BYTES])
        pending = pending[written:]
    except BlockingIOError:
        return pending
    except (BrokenPipeError, ConnectionResetError):
        pending = pending[:0]  # the command stopped reading: the rest of stdin is dropped
    if not pending:
        selector.unregister(fd)
        process.stdin.close()
    return pending


def _read_chunk(fd: int) -> bytes | None:
    """Up to one chunk from ``fd``: ``b""`` at end of file, ``None`` when nothing is there yet."""
    try:
        return os.read(fd, CHUNK_BYTES)
    except BlockingIOError:
        return None


def _disk_bytes(root: str) -> int:
    """Bytes held by files under ``root`` (bounded walk: a huge tree gives a lower bound)."""
    total = 0
    visited = 0
    stack = [root]
    while stack and visited < DISK_SCAN_LIMIT:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            visited += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def serve_stdio(*, workdir_alias: str | None = None, exec_memory_bytes: int | None = None) -> int:
    """Run the runtime on this process's stdin and stdout; returns the exit status.

    The channel descriptors are moved off 0 and 1 first (see the module docstring).
    """
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    server = AgentServer(in_fd, out_fd, workdir_alias=workdir_alias, exec_memory_bytes=exec_memory_bytes)

    def on_term(signum: int, frame: object) -> None:
        server.stop_for_signal()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return server.serve()


def runtime_identity() -> dict[str, Any]:
    """What a ping answers: the protocol, the runtime's pid, and the interpreter and import path that
    run it, so the host can start more Python in the sandbox (an agent) exactly as the runtime runs."""
    import sys

    return {
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": sys.executable,
        "path": [entry for entry in sys.path if entry],
    }
