"""``ProcessBackend``: sandboxes that are plain host processes, with NO isolation.

The native baseline: the runtime (``python -m rayflow.guest serve``) runs as an ordinary child of
the caller, as the same user, with the host's filesystem and network. It exists to measure what
isolation costs, and to run where no container engine or user namespaces exist; it must never
hold untrusted code, so every ``create`` logs a warning saying so.

What it does do:

* a fresh temporary directory per sandbox stands in for the spec's ``workdir``: the runtime's
  working directory and ``HOME`` are that directory, and file operations and ``cwd`` values the
  host names under ``spec.workdir`` (``/workspace/...``) are mapped onto it by the runtime. Paths
  inside *commands* are not rewritten: a command should use relative paths or ``$RAYFLOW_WORKDIR``;
* the environment is the spec's ``env`` plus a minimal ``PATH``, ``HOME``, ``RAYFLOW_WORKDIR`` and
  the ``PYTHONPATH`` that makes this rayflow importable; nothing else leaks from the host;
* ``limits.memory_bytes`` becomes ``RLIMIT_AS`` of every command (address space, not resident
  memory: a program that reserves much more than it uses fails early). ``limits.pids`` is not
  enforced: ``RLIMIT_NPROC`` counts every process of the *user*, not of the sandbox. CPU, disk,
  wall time and network policy are not enforced either;
* the runtime leads its own session and every command stays in it, so destroying a sandbox kills
  the whole session (commands and what they started), then removes the directory;
* a registry directory holds one small JSON file per live sandbox (pid, process start time,
  owner), so ``owned`` and ``reap`` find sandboxes left behind by a crashed owner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayflow.errors import TransportError
from rayflow.sandbox import image
from rayflow.sandbox.channel_sandbox import ChannelSandbox
from rayflow.sandbox.spec import OWNER_LABEL, SandboxSpec
from rayflow.wire.guest_commands import GUEST_PACKAGE
from rayflow.wire.procfs import session_members, start_time

log = logging.getLogger("rayflow.sandbox.process_backend")

#: PATH of commands in a process sandbox.
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
#: How long destroy lets the runtime stop its commands after its stdin is closed.
GRACEFUL_STOP_S = 2.0
#: How long the first ping may take (a cold Python start on a loaded machine).
START_TIMEOUT_S = 30.0
#: Rounds of "kill every process left in the session"; each round catches children forked
#: while the previous one ran.
KILL_ROUNDS = 8


def default_registry_dir() -> Path:
    """Per-user registry of live process sandboxes, in the temporary directory."""
    return Path(tempfile.gettempdir()) / f"rayflow-process-sandboxes-{os.getuid()}"


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid`` (the runtime and every command it started)."""
    for _ in range(KILL_ROUNDS):
        members = session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class ProcessBackend:
    """Creates :class:`ChannelSandbox` instances backed by plain subprocesses (no isolation)."""

    name = "process"
    isolated = False

    def __init__(self, registry_dir: Path | None = None, *, python: str | None = None) -> None:
        self.registry_dir = Path(registry_dir) if registry_dir is not None else default_registry_dir()
        self.python = python or sys.executable
        self.registry_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def create(self, spec: SandboxSpec) -> ChannelSandbox:
        """Start a runtime process for ``spec`` and return the sandbox once it answers a ping."""
        sandbox_id = f"proc-{secrets.token_hex(6)}"
        spec = dataclasses.replace(spec, labels={**spec.labels, OWNER_LABEL: spec.owner})
        log.warning(
            "process sandbox %s for %r has NO isolation: commands run as this user on this host's "
            "filesystem and network; never run untrusted code with the process backend",
            sandbox_id,
            spec.owner,
        )
        workdir = tempfile.mkdtemp(prefix=f"rayflow-{sandbox_id}-")
        command = [self.python, "-m", GUEST_PACKAGE, "serve", "--workdir-alias", spec.workdir]
        if spec.limits.memory_bytes is not None:
            command += ["--exec-memory-bytes", str(spec.limits.memory_bytes)]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=workdir,
                env=self._environment(spec, workdir),
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        entry = self._register(sandbox_id, spec.owner, process.pid, workdir)
        teardown = _Teardown(process, workdir, entry)
        sandbox = ChannelSandbox(sandbox_id, spec, process, teardown)
        try:
            sandbox.ping(timeout_s=START_TIMEOUT_S)
        except BaseException:
            sandbox.destroy()
            raise
        return sandbox

    def owned(self) -> list[tuple[str, str]]:
        """(sandbox id, owner) of every process sandbox with a process still running."""
        return [(entry["id"], entry["owner"]) for entry in self._entries() if _is_running(entry)]

    def reap(self, owner_alive: Callable[[str], bool]) -> list[str]:
        """Destroy sandboxes whose owner is gone; registry entries of dead runtimes are cleaned too."""
        reaped = []
        for entry in self._entries():
            running = _is_running(entry)
            if running and owner_alive(entry["owner"]):
                continue
            if running:
                _kill_session(entry["pid"])
                reaped.append(entry["id"])
            shutil.rmtree(entry["workdir"], ignore_errors=True)
            Path(entry["path"]).unlink(missing_ok=True)
        return reaped

    # --- internals --------------------------------------------------------------------------
    def _environment(self, spec: SandboxSpec, workdir: str) -> dict[str, str]:
        package_root = str(image.package_root().parent)
        env: dict[str, str] = {}
        hub = spec.network.hub
        if hub is not None:
            # The host's own network: the hub is reached where it listens.
            env["RAYFLOW_HUB_HOST"], env["RAYFLOW_HUB_PORT"] = hub.host, str(hub.port)
        env.update(spec.env)
        env.update(
            {
                "PATH": spec.env.get("PATH", MINIMAL_PATH),
                "HOME": workdir,
                "RAYFLOW_WORKDIR": workdir,
                "PYTHONPATH": os.pathsep.join(filter(None, [package_root, spec.env.get("PYTHONPATH")])),
            }
        )
        return env

    def _register(self, sandbox_id: str, owner: str, pid: int, workdir: str) -> Path:
        entry = {"id": sandbox_id, "owner": owner, "pid": pid, "start": start_time(pid), "workdir": workdir}
        path = self.registry_dir / f"{sandbox_id}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entry))
        os.replace(temporary, path)
        return path

    def _entries(self) -> list[dict[str, Any]]:
        entries = []
        for path in sorted(self.registry_dir.glob("proc-*.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # removed meanwhile by its own destroy, or half-written
            if isinstance(entry, dict) and {"id", "owner", "pid", "start", "workdir"} <= set(entry):
                entry["path"] = str(path)
                entries.append(entry)
        return entries


def _is_running(entry: dict[str, Any]) -> bool:
    """True while anything of the entry's sandbox runs: its runtime, or commands that outlived it.

    The start time tells the runtime from an unrelated process that reused its pid. When no
    process has that pid, the session id cannot have been reused either (Linux keeps a pid number
    allocated while any process still carries it as session id), so its members are ours.
    """
    pid = int(entry["pid"])
    now = start_time(pid)
    if now is not None:
        return now == entry["start"]
    return bool(session_members(pid))


class _Teardown:
    """Stops one process sandbox: graceful stop, kill of its whole session, files removed. Once."""

    def __init__(self, process: subprocess.Popen[bytes], workdir: str, entry: Path) -> None:
        self._process = process
        self._workdir = workdir
        self._entry = entry
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        process = self._process
        try:
            # End of input asks the runtime to kill its commands and report their exits.
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(GRACEFUL_STOP_S)
        except subprocess.TimeoutExpired:
            pass
        # The runtime leads its session (its pid is the session id) and commands stay in it.
        _kill_session(process.pid)
        try:
            process.wait(GRACEFUL_STOP_S)
        except subprocess.TimeoutExpired as exc:
            raise TransportError("the process sandbox runtime did not stop", pid=process.pid) from exc
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._entry.unlink(missing_ok=True)
