"""``SandboxWrapper``: a sandbox that forwards every call to an inner one.

Backends and the warm pool add a little to the channel sandbox they hold (a kill reason read from
a cgroup, a lease, a network gateway); they subclass this and override only what they add, instead
of each repeating the whole forwarding surface of the :class:`~rayflow.sandbox.backend.Sandbox`
protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rayflow.sandbox.backend import OutputCallback, Sandbox
from rayflow.sandbox.spec import ExecResult, SandboxSpec, SandboxStats


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

    def download(self, remote_dir: str, local_dir: Path) -> None:
        self._inner.download(remote_dir, local_dir)

    def stats(self) -> SandboxStats:
        return self._inner.stats()

    def destroy(self) -> None:
        self._inner.destroy()

    def __enter__(self) -> SandboxWrapper:  # noqa: PYI034 - subclasses return themselves too
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()
