"""The agent host: a long-lived, pre-imported process in the sandbox that forks one child per subtask.

``python -m rayflow.guest host --socket PATH`` imports the agent runner (and, when the sandbox
has hub settings, the hub client with aioquic and cryptography; and the modules named with
``--preload``) once, then listens on a unix socket. Each request names a spec file; the host forks
a child that runs :func:`rayflow.guest.runner.run_spec` on it and sends the runner's JSON result
back. Why: a fresh ``python -m rayflow.guest run`` pays ~0.3 CPU-seconds of interpreter start and
imports, and a sandbox limited to a fraction of a CPU turns that into seconds of wall time per
agent; a fork of a process that already holds those modules costs milliseconds.

Protocol: one request per connection, frames of :mod:`rayflow.wire.framing` with JSON bodies.

* client -> host: ``{"kind": "run", "spec": PATH, "env": {...}, "cwd": DIR}`` with the client's
  stdin, stdout and stderr attached as descriptors (``SCM_RIGHTS``); or ``{"kind": "ping"}``;
* host -> client: ``{"kind": "result", "result": {...}}`` (written by the child), then
  ``{"kind": "exit", "exit_code", "signal", "killed"}`` once the child is reaped; or
  ``{"kind": "pong", ...}``; or ``{"kind": "error", "error": {"code", "message"}}`` for a request
  it refused (nothing was started).

A child: leads a process group of its own; has the client's streams as its 0, 1 and 2, the
request's environment (in place of the host's, in the child only) and working directory; runs the
spec and exits. The host kills the child's group when the client's connection closes (the client
was killed, e.g. by the sandbox's exec timeout) and when the spec's ``timeout_s`` (plus a grace
for the runner's own reporting) has passed; it reaps every child. A request of the wrong shape
gets an ``error`` reply and the host goes on serving.

The host is single-threaded on purpose (a selector over the socket, the connections and one
pidfd per child): forking a process that runs other threads may copy a lock some thread holds.
It imports only the standard library and rayflow's own light modules until it preloads.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import InvalidInputError, OverloadedError, PayloadTooLargeError, RayflowError
from rayflow.wire.framing import FrameSplitter, frame
from rayflow.wire.procfs import pidfd

log = logging.getLogger("rayflow.guest.agent_host")

#: Largest request accepted (the environment is the bulk of it).
MAX_REQUEST_BYTES = 1024 * 1024
#: Largest spec file the host reads.
MAX_SPEC_BYTES = 64 * 1024 * 1024
#: How long a connection may take to deliver its request.
REQUEST_READ_S = 10.0
#: Seconds past the spec's ``timeout_s`` before the host kills a child (the runner enforces a
#: shell agent's timeout itself and needs a moment to report it).
CHILD_GRACE_S = 5.0
#: Connections (waiting requests and running children together) served at once.
MAX_CONNECTIONS = 256
#: Descriptors a run request carries: stdin, stdout, stderr.
STREAM_FDS = 3
#: How often children are polled for their exit where no pidfd is available.
EXIT_POLL_S = 0.1
#: How long a final reply may take to be written to a slow client.
REPLY_WRITE_S = 5.0
#: How long a child may take to write its result to a client that reads slowly.
RESULT_WRITE_S = 300.0
#: Always preloaded: what every child runs.
RUNNER_MODULE = "rayflow.guest.runner"
#: Preloaded when the sandbox has hub settings: the memory client (aioquic, cryptography).
HUB_CLIENT_MODULE = "rayflow.wire.hub_client"


# --- requests and replies (pure) --------------------------------------------------------------
@dataclass(frozen=True)
class RunRequest:
    """Run the spec at ``spec`` with environment ``env`` in directory ``cwd``."""

    spec: str
    env: dict[str, str]
    cwd: str


@dataclass(frozen=True)
class PingRequest:
    """Is the host there? Answered with its pid and what it preloaded."""


def parse_request(body: bytes) -> RunRequest | PingRequest:
    """The request in one frame's body; :class:`InvalidInputError` for anything malformed."""
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise InvalidInputError(f"a request is one JSON object: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidInputError("a request is one JSON object")
    kind = message.get("kind")
    if kind == "ping":
        return PingRequest()
    if kind != "run":
        raise InvalidInputError(f"unknown request kind {kind!r}", kind=str(kind))
    spec, cwd, env = message.get("spec"), message.get("cwd"), message.get("env", {})
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidInputError("a run request's 'cwd' is an absolute path")
    if not isinstance(spec, str) or not spec or "\0" in spec:
        raise InvalidInputError("a run request's 'spec' is a path")
    if not isinstance(env, dict) or not all(_env_entry(name, value) for name, value in env.items()):
        raise InvalidInputError("a run request's 'env' maps names to strings")
    return RunRequest(os.path.join(cwd, spec), dict(env), cwd)


def _env_entry(name: object, value: object) -> bool:
    return (
        isinstance(name, str)
        and isinstance(value, str)
        and bool(name)
        and "=" not in name
        and "\0" not in name
        and "\0" not in value
    )


def encode_reply(kind: str, **fields: Any) -> bytes:
    """One reply frame."""
    return frame(json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode())


def error_reply(error: RayflowError) -> bytes:
    return encode_reply("error", error={"code": error.code, "message": error.message})


def exit_fields(returncode: int, killed: str | None) -> dict[str, Any]:
    """The ``exit`` reply's fields from a child's return code (``-N``: killed by signal N)."""
    if returncode < 0:
        return {"exit_code": None, "signal": -returncode, "killed": killed}
    return {"exit_code": returncode, "signal": None, "killed": killed}


def spec_timeout(spec: Mapping[str, Any]) -> float | None:
    """The spec's ``timeout_s`` when it is a positive number."""
    value = spec.get("timeout_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def error_result(error: RayflowError) -> dict[str, Any]:
    """A runner result for a spec that could not be run, as ``python -m rayflow.guest run`` gives."""
    return {"ok": False, "error": {"code": error.code, "message": error.message}}


def parse_preload(text: str | None) -> list[str]:
    """``"a.b,c"`` -> ``["a.b", "c"]`` (blanks dropped)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def modules_to_preload(env: Mapping[str, str], extra: Iterable[str]) -> list[str]:
    """The runner, the hub client when the sandbox has hub settings, then ``extra``; no repeats."""
    names = [RUNNER_MODULE]
    if env.get("RAYFLOW_HUB_HOST", "").strip():
        names.append(HUB_CLIENT_MODULE)
    for name in extra:
        if name not in names:
            names.append(name)
    return names


def read_spec(path: str) -> dict[str, Any]:
    """The spec object in the file at ``path``; :class:`InvalidInputError` when unreadable or not one."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read the spec {path}: {exc.strerror}", path=path) from None
    if len(data) > MAX_SPEC_BYTES:
        raise PayloadTooLargeError(f"the spec {path} exceeds {MAX_SPEC_BYTES} bytes", path=path)
    try:
        spec = json.loads(data)
    except ValueError as exc:
        raise InvalidInputError(f"the spec {path} is no JSON: {exc}", path=path) from None
    if not isinstance(spec, dict):
        raise InvalidInputError("a subtask spec is a JSON object", path=path)
    return spec


# --- the host -------------------------------------------------------------------------------
@dataclass
class _Waiting:
    """A connection whose request has not fully arrived."""

    conn: socket.socket
    deadline: float
    splitter: FrameSplitter = field(default_factory=lambda: FrameSplitter(MAX_REQUEST_BYTES))
    fds: list[int] = field(default_factory=list)


@dataclass
class _Child:
    """A forked child running a spec, and the connection of the client waiting for it."""

    pid: int
    conn: socket.socket | None
    deadline: float | None
    pidfd: int | None
    killed: str | None = None


class AgentHost:
    """Serves run and ping requests on ``listener``; see the module docstring."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        preloaded: list[str] | None = None,
        run_spec: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listener = listener
        self.preloaded = list(preloaded or [])
        self._run_spec = run_spec
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[int, _Waiting] = {}
        self._children: dict[int, _Child] = {}
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until SIGTERM or SIGINT; children still running are killed then. Returns 0."""
        self._listener.setblocking(False)
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_read, selectors.EVENT_READ, ("signal", None))
        previous_wakeup = signal.set_wakeup_fd(self._wake_write.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stopping:
                for key, _ in self._selector.select(self._wait_s()):
                    kind, item = key.data
                    if kind == "accept":
                        self._accept()
                    elif kind == "request":
                        self._read_request(item)
                    elif kind == "client":
                        self._client_readable(item)
                    elif kind == "exit":
                        self._reap(item)
                    else:
                        self._drain_wakeups()
                self._enforce_deadlines()
                if any(child.pidfd is None for child in self._children.values()):
                    for child in list(self._children.values()):
                        self._reap(child)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._shut_down()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_read.recv(64):
                pass
        except BlockingIOError:
            pass

    def _wait_s(self) -> float | None:
        deadlines = [waiting.deadline for waiting in self._waiting.values()]
        deadlines += [child.deadline for child in self._children.values() if child.deadline is not None]
        waits = [max(0.0, min(deadlines) - self._clock())] if deadlines else []
        if any(child.pidfd is None for child in self._children.values()):
            waits.append(EXIT_POLL_S)
        return min(waits) if waits else None

    # -- connections ---------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accepting a connection failed: %s", exc)
            return
        if len(self._waiting) + len(self._children) >= MAX_CONNECTIONS:
            self._reply_and_close(
                conn, error_reply(OverloadedError("the agent host serves too many runs at once"))
            )
            return
        conn.setblocking(False)
        waiting = _Waiting(conn, self._clock() + REQUEST_READ_S)
        self._waiting[conn.fileno()] = waiting
        self._selector.register(conn, selectors.EVENT_READ, ("request", waiting))

    def _read_request(self, waiting: _Waiting) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(waiting.conn, 1 << 16, STREAM_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("a client connection failed before its request: %s", exc)
            self._drop_waiting(waiting)
            return
        waiting.fds += fds
        if not data:
            self._drop_waiting(waiting)  # the client left without asking anything
            return
        try:
            bodies = waiting.splitter.feed(data, max_frames=1)
            if not bodies:
                return
            request = parse_request(bodies[0])
        except RayflowError as exc:
            self._refuse(waiting, exc)
            return
        if isinstance(request, PingRequest):
            self._forget_waiting(waiting)
            self._close_fds(waiting.fds)
            reply = encode_reply(
                "pong", pid=os.getpid(), preloaded=self.preloaded, children=len(self._children)
            )
            self._reply_and_close(waiting.conn, reply)
            return
        if len(waiting.fds) != STREAM_FDS:
            self._refuse(waiting, InvalidInputError("a run request carries stdin, stdout and stderr"))
            return
        self._start(waiting, request)

    def _refuse(self, waiting: _Waiting, error: RayflowError) -> None:
        log.warning("refused a request: %s", error.message)
        self._forget_waiting(waiting)
        self._close_fds(waiting.fds)
        self._reply_and_close(waiting.conn, error_reply(error))

    def _forget_waiting(self, waiting: _Waiting) -> None:
        self._waiting.pop(waiting.conn.fileno(), None)
        try:
            self._selector.unregister(waiting.conn)
        except (KeyError, ValueError):
            pass

    def _drop_waiting(self, waiting: _Waiting) -> None:
        self._forget_waiting(waiting)
        self._close_fds(waiting.fds)
        waiting.conn.close()

    @staticmethod
    def _close_fds(fds: Iterable[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    @staticmethod
    def _reply_and_close(conn: socket.socket, reply: bytes) -> None:
        try:
            conn.settimeout(REPLY_WRITE_S)
            conn.sendall(reply)
        except OSError as exc:
            log.info("could not reply to a client: %s", exc)
        finally:
            conn.close()

    # -- children ------------------------------------------------------------------------------
    def _start(self, waiting: _Waiting, request: RunRequest) -> None:
        self._forget_waiting(waiting)
        try:
            spec = read_spec(request.spec)
        except RayflowError as exc:
            # What the runner itself answers for a spec it cannot read: a failed result.
            self._close_fds(waiting.fds)
            reply = encode_reply("result", result=error_result(exc))
            self._reply_and_close(waiting.conn, reply + encode_reply("exit", **exit_fields(1, None)))
            return
        timeout = spec_timeout(spec)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write the host's buffered output again
        try:
            pid = os.fork()
        except OSError as exc:
            self._close_fds(waiting.fds)
            self._reply_and_close(
                waiting.conn, error_reply(OverloadedError(f"cannot fork a child: {exc.strerror}"))
            )
            return
        if pid == 0:
            self._become_child(waiting.conn, request, spec, waiting.fds)
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass
        self._close_fds(waiting.fds)
        deadline = None if timeout is None else self._clock() + timeout + CHILD_GRACE_S
        child = _Child(pid, waiting.conn, deadline, pidfd(pid))
        self._children[pid] = child
        self._selector.register(waiting.conn, selectors.EVENT_READ, ("client", child))
        if child.pidfd is not None:
            self._selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))

    def _client_readable(self, child: _Child) -> None:
        """The client sent more (ignored) or left: then its child is killed (nobody waits for it)."""
        conn = child.conn
        if conn is None:
            return
        try:
            data = conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return
        self._selector.unregister(conn)
        conn.close()
        child.conn = None
        self._kill(child, "client-gone")

    def _kill(self, child: _Child, reason: str) -> None:
        if child.killed is None:
            child.killed = reason
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _enforce_deadlines(self) -> None:
        now = self._clock()
        for waiting in list(self._waiting.values()):
            if now >= waiting.deadline:
                self._refuse(waiting, InvalidInputError("the request did not arrive in time"))
        for child in list(self._children.values()):
            if child.deadline is not None and now >= child.deadline and child.killed is None:
                self._kill(child, "timeout")

    def _reap(self, child: _Child) -> None:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid == 0:
            return
        self._children.pop(child.pid, None)
        if child.pidfd is not None:
            self._selector.unregister(child.pidfd)
            os.close(child.pidfd)
        if child.conn is not None:
            self._selector.unregister(child.conn)
            self._reply_and_close(
                child.conn,
                encode_reply("exit", **exit_fields(os.waitstatus_to_exitcode(status), child.killed)),
            )
            child.conn = None

    def _shut_down(self) -> None:
        """Kill and reap every child, close every connection and the listener."""
        for child in list(self._children.values()):
            self._kill(child, "host-stopped")
        for child in list(self._children.values()):
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
            if child.pidfd is not None:
                os.close(child.pidfd)
            if child.conn is not None:
                child.conn.close()
        self._children.clear()
        for waiting in list(self._waiting.values()):
            self._close_fds(waiting.fds)
            waiting.conn.close()
        self._waiting.clear()
        self._selector.close()
        self._listener.close()
        self._wake_read.close()
        self._wake_write.close()

    # -- in the child ----------------------------------------------------------------------------
    def _become_child(
        self, conn: socket.socket, request: RunRequest, spec: dict[str, Any], fds: list[int]
    ) -> None:
        """Run ``spec`` in this forked child and exit; never returns into the host's loop."""
        code = 1
        try:
            os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            self._close_inherited(keep=conn)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            self._close_fds(fd for fd in fds if fd > 2)
            # A timeout, not blocking mode: the descriptor's O_NONBLOCK is shared with the host.
            conn.settimeout(RESULT_WRITE_S)
            os.environ.clear()
            os.environ.update(request.env)
            os.chdir(request.cwd)
            importlib.invalidate_caches()  # the work directory may have changed since the host started
            result = self._run(spec)
            code = 0 if result.get("ok") else 1
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            conn.sendall(encode_reply("result", result=result))
        except BaseException:  # noqa: BLE001 - a child reports and exits, whatever happened
            code = 1
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - stderr itself may be gone
                code = 1
        finally:
            os._exit(code)

    def _run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The runner's result for ``spec``, with its errors as ``python -m rayflow.guest run`` reports them."""
        run_spec = self._run_spec
        if run_spec is None:
            from rayflow.guest.runner import run_spec
        try:
            result = run_spec(spec)
        except RayflowError as exc:
            return error_result(exc)
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": {"code": "invalid_input", "message": str(exc)}}
        json.dumps(result)  # a result that cannot travel fails here, in the child, with a traceback
        return result

    def _close_inherited(self, keep: socket.socket) -> None:
        """Close the host's descriptors this child inherited, except its own client's connection."""
        for waiting in self._waiting.values():
            self._close_fds(waiting.fds)
            waiting.conn.close()
        for child in self._children.values():
            if child.pidfd is not None:
                os.close(child.pidfd)
            if child.conn is not None and child.conn is not keep:
                child.conn.close()
        self._selector.close()
        self._listener.close()
        self._wake_read.close()
        self._wake_write.close()


# --- starting a host ----------------------------------------------------------------------------
def answers(socket_path: str, timeout_s: float = 2.0) -> bool:
    """True when a host answers a ping at ``socket_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(socket_path)
        sock.sendall(frame(b'{"kind":"ping"}'))
        splitter = FrameSplitter(MAX_REQUEST_BYTES)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return False
            bodies = splitter.feed(data, max_frames=1)
            if bodies:
                return bool(json.loads(bodies[0]).get("kind") == "pong")
    except (OSError, ValueError, RayflowError):
        return False
    finally:
        sock.close()


def preload(names: Iterable[str]) -> list[str]:
    """Import ``names``; returns those that imported (a failure is logged: a child imports it again)."""
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module must not stop the host
            log.warning("preloading %s failed: %s: %s", name, type(exc).__name__, exc)
            continue
        loaded.append(name)
    return loaded


def listen(socket_path: str) -> socket.socket:
    """A listening socket at ``socket_path`` (owner-only); a stale socket file is replaced."""
    directory = os.path.dirname(socket_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener


def serve_host(
    socket_path: str, *, preload_names: Iterable[str] = (), detach: bool = False, log_path: str | None = None
) -> int:
    """Entry point of ``python -m rayflow.guest host``: preload, listen, serve.

    Once the socket listens it prints :func:`ready_line`. With ``detach`` the process then exits 0,
    leaving a forked host serving with its output in ``log_path`` (default: the socket's path +
    ``.log``): a caller that can only run commands to completion (the sandbox's exec) thus learns
    when the host is ready.
    The host stays in the sandbox's session, so destroying the sandbox kills it on every backend.
    """
    if answers(socket_path):
        print(f"an agent host already answers at {socket_path}")
        return 0
    loaded = preload(modules_to_preload(os.environ, preload_names))
    listener = listen(socket_path)
    if detach:
        _detach(log_path or f"{socket_path}.log", socket_path)
    else:
        print(ready_line(socket_path, os.getpid()), flush=True)
    host = AgentHost(listener, preloaded=loaded)
    owner = os.getpid()
    try:
        return host.serve()
    finally:
        if os.getpid() == owner:
            try:
                os.unlink(socket_path)
            except OSError:
                pass


def ready_line(socket_path: str, pid: int) -> str:
    """What a host prints once its socket listens (callers may wait for this line)."""
    return f"agent host ready at {socket_path} (pid {pid})"


def _detach(log_path: str, socket_path: str) -> None:
    """Fork; the parent reports readiness on its stdout and exits, the child goes on as the host."""
    ready = os.dup(1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    pid = os.fork()
    if pid:
        os.write(ready, f"{ready_line(socket_path, pid)}\n".encode())
        os._exit(0)
    os.close(ready)
    os.setpgid(0, 0)  # not a new session: destroying the sandbox's session must reach the host


__all__ = [
    "AgentHost",
    "PingRequest",
    "RunRequest",
    "answers",
    "exit_fields",
    "listen",
    "modules_to_preload",
    "parse_preload",
    "parse_request",
    "read_spec",
    "ready_line",
    "serve_host",
    "spec_timeout",
]
