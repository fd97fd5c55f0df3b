"""A job's upload: the files every sandbox of the job starts with, wherever its worker runs.

A worker unpacks the job's repository into each sandbox it prepares. Where the bytes come from
depends on where the worker runs, and :class:`UploadSource` hides that from
:class:`~rayflow.swarm.worker_core.WorkerCore`:

* ``from_directory``: a directory of this machine, packed each time it is loaded, so a sandbox
  gets the tree as it is then (thread fleets and tests, where worker and directory share a disk);
* ``from_archive``: an archive already packed (:func:`rayflow.wire.archive.pack_tree`'s format),
  held in memory;
* ``from_fetch``: a callable that returns the packed archive, for bytes stored elsewhere. The Ray
  shell packs a job's directory once on the driver, puts the archive into Ray's object store and
  hands workers a fetch that gets it from there (:mod:`actors.upload`), so a worker on a machine
  that never had the directory still gets every file.

Loading an archive or a fetch gives the same bytes every time, so a worker may keep what it
loaded and unpack it into every fresh sandbox (``isolation="subtask"``) instead of fetching again;
a directory is :attr:`UploadSource.live` and read anew each time.

Every kind is bounded: an upload above ``max_bytes`` (``Config.max_upload_bytes``, 512 MiB by
default) is a :class:`~rayflow.errors.ConfigError` saying how big it was, raised before packing
where the files alone are already too many bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rayflow.config import DEFAULT_MAX_UPLOAD_BYTES
from rayflow.errors import ConfigError
from rayflow.wire.archive import pack_tree

DIRECTORY = "directory"
ARCHIVE = "archive"
FETCH = "fetch"
KINDS = (DIRECTORY, ARCHIVE, FETCH)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def _too_big(what: str, size: int, limit: int) -> ConfigError:
    return ConfigError(
        f"{what} is {_mib(size)} ({size} bytes), over the upload limit of {_mib(limit)} ({limit} bytes); "
        "raise it with max_upload_bytes (RAYFLOW_MAX_UPLOAD_BYTES) or upload less",
        size=size,
        limit=limit,
    )


def tree_file_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed): what packing it reads."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def pack_directory(root: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> bytes:
    """``root`` packed as one archive; a :class:`ConfigError` if it is missing or above ``max_bytes``.

    The files' sizes are added up first, so a tree far too large is refused without packing it.
    """
    if not root.is_dir():
        raise ConfigError(f"the job's upload directory {root} does not exist", path=str(root))
    files = tree_file_bytes(root)
    if files > max_bytes:
        raise _too_big(f"the upload {root} (its files alone)", files, max_bytes)
    data = pack_tree(root)
    if len(data) > max_bytes:
        raise _too_big(f"the upload {root} packed", len(data), max_bytes)
    return data


@dataclass(frozen=True)
class UploadSource:
    """Where a job's packed upload comes from; build one with a ``from_*`` constructor."""

    kind: str
    #: ``directory``: the directory packed on each load.
    path: str | None = None
    #: ``archive``: the packed bytes.
    data: bytes | None = field(default=None, repr=False)
    #: ``fetch``: returns the packed bytes (it pickles: it travels to workers with the plan).
    fetch: Callable[[], bytes] | None = None
    #: Packed size when known ahead (archive, fetch), for messages and checks.
    size: int | None = None
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"upload kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        needed = {DIRECTORY: self.path, ARCHIVE: self.data, FETCH: self.fetch}[self.kind]
        if needed is None:
            raise ConfigError(
                f"a {self.kind} upload needs its {'path' if self.kind == DIRECTORY else self.kind}"
            )
        if self.max_bytes <= 0:
            raise ConfigError("max_upload_bytes must be positive")
        if self.size is not None and self.size > self.max_bytes:
            raise _too_big(f"the {self.kind} upload", self.size, self.max_bytes)

    @classmethod
    def from_directory(
        cls, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    ) -> UploadSource:
        """A directory of this machine, packed anew on every load."""
        return cls(DIRECTORY, path=str(path), max_bytes=max_bytes)

    @classmethod
    def from_archive(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> UploadSource:
        """Bytes already packed (checked against ``max_bytes`` now)."""
        return cls(ARCHIVE, data=bytes(data), size=len(data), max_bytes=max_bytes)

    @classmethod
    def from_fetch(
        cls, fetch: Callable[[], bytes], *, size: int | None = None, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    ) -> UploadSource:
        """Bytes ``fetch()`` returns, called where the upload is loaded (once per worker that keeps them)."""
        return cls(FETCH, fetch=fetch, size=size, max_bytes=max_bytes)

    @property
    def live(self) -> bool:
        """Whether each load reads the source anew (a directory), rather than giving the same bytes."""
        return self.kind == DIRECTORY

    def load(self) -> bytes:
        """The packed archive; a :class:`ConfigError` when it is missing or above ``max_bytes``."""
        if self.kind == DIRECTORY:
            assert self.path is not None
            return pack_directory(Path(self.path), self.max_bytes)
        if self.kind == ARCHIVE:
            assert self.data is not None
            return self.data
        assert self.fetch is not None
        data = self.fetch()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"the upload's fetch returned {type(data).__name__}, not bytes")
        if len(data) > self.max_bytes:
            raise _too_big("the fetched upload", len(data), self.max_bytes)
        return bytes(data) if not isinstance(data, bytes) else data

    def __str__(self) -> str:
        if self.kind == DIRECTORY:
            return f"directory {self.path}"
        size = f" of {self.size} bytes" if self.size is not None else ""
        return f"{self.kind}{size}"


__all__ = ["UploadSource", "pack_directory", "tree_file_bytes"]
