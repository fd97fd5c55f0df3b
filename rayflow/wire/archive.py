"""Directory trees as tar archives in memory, for ``upload`` and ``download`` over the channel.

An archive larger than one channel frame travels as several (:func:`split_archive` cuts it
between members), each a tar archive of its own, unpacked one after the other.

Why our own packing and unpacking rather than ``TarFile.add`` / ``extractall``: the archive comes
from the other side of a trust boundary (a download comes out of a sandbox that may be hostile),
so unpacking must never write outside the destination. Every member is checked before anything is
written: no absolute names, no ``..``, only regular files, directories and symlinks whose target
stays inside the tree (relative, and not climbing out). Hard links, devices, FIFOs and sparse
files are refused. While writing, the real path of each member's parent is checked again, so a
symlink unpacked earlier cannot redirect a later member outside. The packer never emits hard
links, so a tree it packs always unpacks.

Symlinks with an absolute target are refused too (their meaning depends on whose filesystem they
are read in); a tree holding one, such as a virtualenv, cannot be moved this way.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
from pathlib import Path

from rayflow.errors import InvalidInputError, NotFoundError, PayloadTooLargeError

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_PERMISSION_BITS = 0o777
#: What ends a tar archive: two zero blocks.
_END_OF_ARCHIVE_BYTES = 2 * tarfile.BLOCKSIZE
_END_OF_ARCHIVE = bytes(_END_OF_ARCHIVE_BYTES)


def pack_tree(root: Path) -> bytes:
    """A tar archive of everything under ``root`` (names relative to it, symlinks kept as links)."""
    if not root.is_dir():
        raise NotFoundError(f"no directory at {str(root)!r}", path=str(root))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(directory, name)
                _add(tar, path, os.path.relpath(path, root).replace(os.sep, "/"))
    return buffer.getvalue()


def split_archive(data: bytes, max_part_bytes: int) -> list[bytes]:
    """``data`` (a tar archive, as :func:`pack_tree` makes) as archives of at most ``max_part_bytes``.

    Cut between members, each part ending with the end-of-archive blocks, so the parts unpacked in
    order into the same directory give the tree ``data`` gives. An archive that fits is its own one
    part. One member larger than a part is refused (:class:`PayloadTooLargeError` naming it), and
    so is an archive led by a global header (which would apply to the first part only).
    """
    if len(data) <= max_part_bytes:
        return [data]
    spans: list[tuple[str, int]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                spans.append((member.name, member.offset))
            end = tar.offset
    except tarfile.TarError as exc:
        raise InvalidInputError(f"not a tar archive: {exc}") from None
    if spans and spans[0][1] != 0:
        raise InvalidInputError("an archive that starts with a global header cannot be split")
    room = max_part_bytes - _END_OF_ARCHIVE_BYTES
    parts: list[bytes] = []
    start = 0
    for position, (name, offset) in enumerate(spans):
        member_end = spans[position + 1][1] if position + 1 < len(spans) else end
        if member_end - offset > room:
            raise PayloadTooLargeError(
                f"{name[:200]!r} takes {member_end - offset} bytes packed, more than one part of "
                f"{max_part_bytes} bytes holds",
                member=name[:200], size=member_end - offset, limit=max_part_bytes,
            )
        if member_end - start > room:
            parts.append(data[start:offset] + _END_OF_ARCHIVE)
            start = offset
    if end > start:
        parts.append(data[start:end] + _END_OF_ARCHIVE)
    return parts


def _add(tar: tarfile.TarFile, path: str, arcname: str) -> None:
    info = os.lstat(path)
    member = tarfile.TarInfo(arcname)
    member.mode = stat.S_IMODE(info.st_mode) & _PERMISSION_BITS
    member.mtime = int(info.st_mtime)
    if stat.S_ISLNK(info.st_mode):
        member.type = tarfile.SYMTYPE
        member.linkname = os.readlink(path)
        tar.addfile(member)
    elif stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
        tar.addfile(member)
    elif stat.S_ISREG(info.st_mode):
        member.size = info.st_size
        with open(path, "rb") as handle:
            tar.addfile(member, handle)
    # Sockets, FIFOs and devices have no content to copy: they are left out.


def check_member(member: tarfile.TarInfo) -> str:
    """The member's normalized relative name, or an error if unpacking it could escape the tree."""
    name = member.name
    if not name or "\0" in name or name.startswith("/") or "\\" in name:
        raise InvalidInputError("archive member has an absolute or malformed name", member=name[:200])
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidInputError("archive member name leaves the tree", member=name[:200])
    clean = "/".join(parts)
    if member.type == tarfile.SYMTYPE:
        target = member.linkname
        if not target or target.startswith("/") or "\0" in target:
            raise InvalidInputError("archive symlink has an absolute or empty target", member=clean[:200])
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(clean), target))
        if resolved == ".." or resolved.startswith("../"):
            raise InvalidInputError("archive symlink points outside the tree", member=clean[:200])
    elif member.type not in _FILE_TYPES and member.type != tarfile.DIRTYPE:
        raise InvalidInputError(
            "archive member is not a file, directory or symlink", member=clean[:200], type=repr(member.type)
        )
    if member.sparse:
        raise InvalidInputError("sparse archive members are refused", member=clean[:200])
    return clean


def unpack_tree(archive: bytes, dest: Path) -> int:
    """Unpack ``archive`` under ``dest`` (created if missing); returns the number of members.

    Every member is checked before the first byte is written, so a refused archive leaves
    ``dest`` untouched.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            members = tar.getmembers()
            checked = [(check_member(member), member) for member in members]
            dest.mkdir(parents=True, exist_ok=True)
            root = os.path.realpath(dest)
            for name, member in checked:
                try:
                    _extract(tar, member, root, name)
                except OSError as exc:
                    raise InvalidInputError(
                        f"cannot unpack {name[:200]!r}: {exc.strerror}", member=name[:200], errno=exc.errno
                    ) from None
    except tarfile.TarError as exc:
        raise InvalidInputError(f"not a tar archive: {exc}") from None
    return len(checked)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, root: str, name: str) -> None:
    target = os.path.join(root, name)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # The parent may be a symlink unpacked earlier: follow it now and make sure we stay inside.
    if not _inside(root, os.path.realpath(parent)):
        raise InvalidInputError("archive member would be written outside the tree", member=name[:200])
    mode = member.mode & _PERMISSION_BITS
    if member.type == tarfile.DIRTYPE:
        if os.path.islink(target):
            raise InvalidInputError("archive directory replaces a symlink", member=name[:200])
        os.makedirs(target, exist_ok=True)
        os.chmod(target, mode | 0o700)
        return
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        os.unlink(target)
    if member.type == tarfile.SYMTYPE:
        os.symlink(member.linkname, target)
        return
    source = tar.extractfile(member)
    if source is None:
        raise InvalidInputError("archive file member has no content", member=name[:200])
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, source:
        while chunk := source.read(1 << 20):
            out.write(chunk)
    os.chmod(target, mode)
