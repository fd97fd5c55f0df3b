"""The interface every sandbox backend implements: ``SandboxBackend.create(spec) -> Sandbox``.

A backend is one way to isolate work (a Docker container, Linux namespaces, a plain process, an
E2B microVM). Callers program against these two protocols only, so a worker can move between
backends by configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rayflow.sandbox.spec import ExecResult, SandboxSpec, SandboxStats

#: Called with each chunk of output as it arrives.
OutputCallback = Callable[[bytes], None]


@runtime_checkable
class Sandbox(Protocol):
    """One live, isolated environment. Every method may raise a :class:`~rayflow.errors.RayflowError`."""

    @property
    def id(self) -> str: ...

    @property
    def spec(self) -> SandboxSpec: ...

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
        """Run ``command`` (an argv list, or a string for ``/bin/sh -c``) and wait for it."""
        ...

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def read_file(self, path: str) -> bytes: ...

    def upload(self, local_dir: Path, remote_dir: str) -> None:
        """Copy a host directory tree into the sandbox."""
        ...

    def upload_archive(self, data: bytes, remote_dir: str) -> None:
        """Unpack a tree already packed as a tar archive (:func:`rayflow.wire.archive.pack_tree`)
        into the sandbox: what ``upload`` does after packing, for bytes that came from elsewhere."""
        ...

    def download(self, remote_dir: str, local_dir: Path) -> None:
        """Copy a directory tree out of the sandbox."""
        ...

    def stats(self) -> SandboxStats: ...

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Round trip to the in-sandbox runtime; it answers with its protocol, pid, interpreter and
        import path (so the host can start more Python in the sandbox exactly as the runtime runs)."""
        ...

    def destroy(self) -> None:
        """Stop and remove everything the sandbox holds; calling it again does nothing."""
        ...

    def __enter__(self) -> Sandbox: ...

    def __exit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class SandboxBackend(Protocol):
    """A way to make sandboxes."""

    #: Short name: "docker", "local", "process", "e2b".
    name: str
    #: False only for the no-isolation process backend.
    isolated: bool

    def create(self, spec: SandboxSpec) -> Sandbox: ...

    def owned(self) -> list[tuple[str, str]]:
        """(sandbox id, owner) of every sandbox of this backend still present on the machine."""
        ...

    def reap(self, owner_alive: Callable[[str], bool]) -> list[str]:
        """Destroy sandboxes whose owner is gone; returns their ids."""
        ...
