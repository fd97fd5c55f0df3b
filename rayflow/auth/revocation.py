"""The persisted deny-list of revoked token ids (``jti``), answered from memory.

Why in memory: the check runs on every request, so :meth:`RevocationList.is_revoked` is one set
lookup. Why SQLite underneath: a revocation must survive a restart and reach every process that
verifies tokens; several hub processes share one database file (WAL, ``synchronous=FULL`` so an
acknowledged revocation is on disk).

Other processes' revocations are picked up by :meth:`RevocationList.refresh`, which costs one
``PRAGMA data_version`` when nothing changed and reads only rows newer than the last one seen
(ids come from ``AUTOINCREMENT`` and are never reused). ``is_revoked`` refreshes on its own at
most every ``poll_interval_s``.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import apsw

from rayflow.errors import ConfigError, InvalidInputError, StorageError
from rayflow.owner_only_file import ensure_private_dir

#: How long after its token's expiry an entry is kept: longer than any verifier's clock leeway.
DEFAULT_PRUNE_GRACE_S = 300.0
DEFAULT_POLL_INTERVAL_S = 0.5
MAX_JTI_LENGTH = 256
MAX_REASON_LENGTH = 500
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked_tokens (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT NOT NULL UNIQUE,
    expires_at REAL NOT NULL,
    reason TEXT NOT NULL,
    revoked_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_tokens_expiry ON revoked_tokens(expires_at);
"""


class RevocationCheck(Protocol):
    """What a verifier asks of a deny-list."""

    def is_revoked(self, jti: str) -> bool:
        """Whether the token with this id has been revoked."""


class RevocationList:
    """Revoked token ids in SQLite, mirrored in an in-memory map of ``jti -> expires_at``."""

    def __init__(
        self,
        path: Path | str,
        *,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}
        self._last_seq = 0
        self._data_version = -1
        self._next_poll = 0.0
        self._conn = self._open()
        self.refresh()

    # --- queries ---------------------------------------------------------------------------
    def is_revoked(self, jti: str) -> bool:
        """Whether ``jti`` is revoked: a set lookup, plus a cheap change check every ``poll_interval_s``."""
        if self._monotonic() >= self._next_poll:
            self.refresh()
        return jti in self._expires

    def __contains__(self, jti: object) -> bool:
        return jti in self._expires

    def __len__(self) -> int:
        return len(self._expires)

    # --- changes ---------------------------------------------------------------------------
    def revoke(self, jti: str, expires_at: float, reason: str) -> None:
        """Deny the token ``jti`` from now on; ``expires_at`` is its ``exp`` (when the entry may be pruned).

        Revoking an id twice keeps the first entry. Returns once the entry is durable on disk.
        """
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidInputError(f"jti must be a string of 1..{MAX_JTI_LENGTH} characters")
        if (
            isinstance(expires_at, bool)
            or not isinstance(expires_at, (int, float))
            or not math.isfinite(expires_at)
        ):
            raise InvalidInputError("expires_at must be a finite number of unix seconds")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH:
            raise InvalidInputError(f"reason must be a string of at most {MAX_REASON_LENGTH} characters")
        with self._lock:
            self._write(
                "INSERT OR IGNORE INTO revoked_tokens(jti, expires_at, reason, revoked_at) VALUES (?, ?, ?, ?)",
                (jti, float(expires_at), reason, self._wall_clock()),
            )
            self._pull_new_rows()

    def prune(self, now: float, *, grace_s: float = DEFAULT_PRUNE_GRACE_S) -> int:
        """Drop entries whose token expired more than ``grace_s`` before ``now``; returns how many rows went.

        Such tokens fail the expiry check anyway; ``grace_s`` must exceed every verifier's leeway.
        """
        cutoff = now - grace_s
        with self._lock:
            self._write("DELETE FROM revoked_tokens WHERE expires_at < ?", (cutoff,))
            removed = self._conn.changes()
            self._expires = {jti: exp for jti, exp in self._expires.items() if exp >= cutoff}
        return removed

    def refresh(self) -> None:
        """Pick up revocations committed by other connections or processes since the last look."""
        with self._lock:
            try:
                (version,) = self._conn.execute("PRAGMA data_version").fetchone()
                if version != self._data_version:
                    self._data_version = version
                    self._pull_new_rows()
            except apsw.Error as exc:
                raise StorageError(f"cannot read revocation list {self.path}: {exc}") from exc
            self._next_poll = self._monotonic() + self.poll_interval_s

    def close(self) -> None:
        """Close the database connection; the in-memory view stays readable but no longer refreshes."""
        with self._lock:
            self._conn.close()
            self._next_poll = math.inf

    def __repr__(self) -> str:
        return f"RevocationList(path={str(self.path)!r}, revoked={len(self._expires)})"

    # --- internals -------------------------------------------------------------------------
    def _open(self) -> apsw.Connection:
        ensure_private_dir(self.path.parent)
        # SQLite gives its -wal and -shm files the database file's mode: create it owner-only.
        fd = os.open(self.path, os.O_CREAT | os.O_RDONLY, 0o600)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        if mode & 0o022:
            # Whoever can write the deny-list can un-revoke a stolen token.
            raise ConfigError(
                f"revocation list {self.path} has mode {mode:04o}, so group or others can change it; "
                f"run 'chmod 600 {self.path}' once you have checked its contents",
                path=str(self.path),
            )
        try:
            conn = apsw.Connection(str(self.path))
            conn.setbusytimeout(10_000)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version <= SCHEMA_VERSION:
                with conn:
                    conn.execute(_SCHEMA)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except apsw.Error as exc:
            raise StorageError(f"cannot open revocation list {self.path}: {exc}") from exc
        if version > SCHEMA_VERSION:
            conn.close()
            raise ConfigError(
                f"revocation list {self.path} has schema {version}; this rayflow reads {SCHEMA_VERSION}",
                path=str(self.path),
            )
        return conn

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(sql, params)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except apsw.Error as exc:
            raise StorageError(f"cannot write revocation list {self.path}: {exc}") from exc

    def _pull_new_rows(self) -> None:
        rows = self._conn.execute(
            "SELECT seq, jti, expires_at FROM revoked_tokens WHERE seq > ? ORDER BY seq", (self._last_seq,)
        ).fetchall()
        if not rows:
            return
        # Copy, then swap: readers of ``_expires`` never see a map being resized under them.
        updated = dict(self._expires)
        for seq, jti, expires_at in rows:
            updated[jti] = expires_at
            self._last_seq = seq
        self._expires = updated
