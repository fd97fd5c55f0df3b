"""Globally unique, time-ordered identifiers for memory items, trajectories and runs.

Why not SQLite autoincrement: hub replicas in several regions create items concurrently and
later exchange them, so an id must be unique without coordination. Why time-ordered: ids
sorted as strings follow creation time, which keeps B-tree inserts local and makes logs
readable. The layout is 48 bits of Unix milliseconds followed by 80 random bits, written in
Crockford base32 (26 characters, like a ULID).
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_LENGTH = 26


def new_id(now_ms: int | None = None) -> str:
    """A new 26-character id; ``now_ms`` is injectable for tests."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"timestamp out of range: {ms}")
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(_ID_LENGTH):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def id_timestamp_ms(item_id: str) -> int:
    """The creation time (Unix ms) encoded in an id made by :func:`new_id`."""
    if len(item_id) != _ID_LENGTH:
        raise ValueError(f"not a rayflow id: {item_id!r}")
    value = 0
    for ch in item_id.upper():
        idx = _ALPHABET.find(ch)
        if idx < 0:
            raise ValueError(f"not a rayflow id: {item_id!r}")
        value = (value << 5) | idx
    return value >> 80


def is_valid_id(item_id: object) -> bool:
    """True for a well-formed id string (used to reject bad input before touching storage)."""
    if not isinstance(item_id, str) or len(item_id) != _ID_LENGTH:
        return False
    return all(ch in _ALPHABET for ch in item_id)
