"""``SandboxWrapper``: a sandbox that forwards every call to an inner one.

Backends and the warm pool add a little to the channel sandbox they hold (a kill reason read from
a cgroup, a lease, a network gateway); they subclass this and override only what they add, instead
of each repeating the whole forwarding surface of the :class:`~rayflow.sandbox.backend.Sandbox`
protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rayflow.sandbox.backend import OutputCallback, Sandbox
from rayflow.sandbox.spec import ExecResult, KillReason, SandboxSpec, SandboxStats


class SandboxWrapper:
    """Forwards the :class:`Sandbox` protocol to ``inner``."""

    def __init__(self, inner: Sandbox) -> None:
        self._inner = inner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def spec(self) -> SandboxSpec:
        return self._inner.spec

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
        return self._inner.exec(
            command,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout_s=timeout_s,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._inner.write_file(path, data, mode)

    def read_file(self, path: str) -> bytes:
        return self._inner.read_file(path)

    def upload(self, local_dir: Path, remote_dir: str) -> None:
        self._inner.upload(local_dir, remote_dir)

    def upload_archive(self, data: bytes, remote_dir: str) -> None:
        self._inner.upload_archive(data, remote_dir)

    def download(self, remote_dir: str, local_dir: Path) -> None:
        self._inner.download(remote_dir, local_dir)

    def stats(self) -> SandboxStats:
        return self._inner.stats()

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._inner.ping(timeout_s)

    def destroy(self) -> None:
        self._inner.destroy()

    def __enter__(self) -> SandboxWrapper:  # noqa: PYI034 - subclasses return themselves too
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


class KillCounters(Protocol):
    """The two counters of a sandbox's cgroup that tell how a command was stopped."""

    def oom_kills(self) -> int: ...

    def pids_refusals(self) -> int: ...


def refine_kill(result: ExecResult, new_ooms: int, new_refusals: int) -> ExecResult:
    """Correct the runtime's reason for a command's death with what the cgroup counted.

    The runtime calls any SIGKILL it did not send an OOM kill; the cgroup knows better: no new
    OOM kill means something else sent it. A failing command during which the pids limit refused
    a fork is reported as stopped by that limit.
    """
    killed = result.killed
    if killed is KillReason.OOM and new_ooms == 0:
        killed = None
    if killed is None and result.exit_code != 0:
        if new_ooms:
            killed = KillReason.OOM
        elif new_refusals:
            killed = KillReason.PIDS
    if killed is result.killed:
        return result
    return dataclasses.replace(result, killed=killed)


class CgroupJudgedSandbox(SandboxWrapper):
    """A wrapper that reads the sandbox's cgroup counters around each exec to name its kill reason.

    Shared by the backends that put a sandbox in a cgroup (Docker, Local); they only say where
    the counters are (:meth:`kill_counters`). Counters are per sandbox, so two execs running at
    once can be credited with each other's kill.
    """

    def kill_counters(self) -> KillCounters | None:
        """The sandbox's cgroup counters, or ``None`` when it has no readable cgroup."""
        return None

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
        counters = self.kill_counters()
        ooms = counters.oom_kills() if counters else 0
        refusals = counters.pids_refusals() if counters else 0
        result = super().exec(
            command,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout_s=timeout_s,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        if counters is None:
            return result
        return refine_kill(result, counters.oom_kills() - ooms, counters.pids_refusals() - refusals)
