"""Files only their owner may read: checked reads, atomic 0600 writes and a cross-process lock.

Why this discipline (the one ssh applies to private keys): a secret file that group or others
could read must be treated as leaked, so it is refused with a hint rather than silently
tightened; a write never leaves a half-written file or a moment where the file has a wider mode.

Why a top-level module: both the memory data keys and the token signing keys are kept this way,
and :mod:`rayflow.memory` and :mod:`rayflow.auth` must not import each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from rayflow.errors import ConfigError


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0700 when it does not exist yet."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_owner_only(path: Path, *, label: str = "secret file") -> bytes | None:
    """The file's bytes, or ``None`` if it does not exist; refuses a group/other-accessible file.

    ``label`` names the file in error messages (``"key file"``, say), so the operator reading
    the error knows which of several secret files needs attention.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open {label} {path}: {exc.strerror}", path=str(path)) from exc
    with os.fdopen(fd, "rb") as handle:
        # The mode of the file actually opened, not of whatever the path names a moment later.
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{label} {path} has mode {mode:04o}, so group or others can access it; treat its "
                f"keys as exposed, and if they are not, run 'chmod 600 {path}'",
                path=str(path),
            )
        return handle.read()


def write_owner_only(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a 0600 temporary file, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL with mode 0600: the file never exists with a wider mode, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a filesystem that cannot fsync directories is tolerated."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the sidecar ``<path>.lock``.

    The sidecar carries the lock because ``path`` itself is replaced on every write.
    """
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)
