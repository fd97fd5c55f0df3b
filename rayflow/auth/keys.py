"""The Ed25519 signing key ring for access tokens: one active key signs, older keys still verify.

Why a ring: rotating the signing key must not invalidate tokens already handed to running
sandboxes. After :meth:`KeyRing.rotate` new tokens carry the new ``kid`` while tokens signed
with the previous key keep verifying until that key is :meth:`KeyRing.retire`\\ d, which is the
moment they stop being accepted.

The ring lives in one JSON file with the owner-only discipline of
:mod:`rayflow.owner_only_file`. Changes are serialised across processes by a lock file and
made on a fresh read of the file, so two processes rotating or retiring never lose each
other's keys. Lookups by ``kid`` read an immutable snapshot and take no lock.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from rayflow.errors import ConfigError, InvalidInputError, NotFoundError
from rayflow.owner_only_file import (
    ensure_private_dir,
    exclusive_lock,
    read_owner_only,
    write_owner_only,
)

#: Version of the key ring file layout.
KEY_RING_FILE_VERSION = 1
#: Raw Ed25519 private keys are 32 bytes.
ED25519_KEY_BYTES = 32


class PublicKeys(Protocol):
    """What a verifier needs: public keys by ``kid``."""

    def public_key(self, kid: str) -> Ed25519PublicKey:
        """The public key for ``kid``; raises :class:`NotFoundError` for an unknown or retired kid."""

    def __contains__(self, kid: object) -> bool:
        """Whether ``kid`` still verifies."""


class SigningKeys(Protocol):
    """What an issuer needs: the active key and its ``kid``."""

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active ``(kid, private key)``."""


@dataclass(frozen=True)
class RingKey:
    """One key of the ring."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)
    created_at: float
    public_key: Ed25519PublicKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", self.private_key.public_key())

    @classmethod
    def generate(cls, created_at: float) -> RingKey:
        return cls(
            kid="k_" + secrets.token_hex(8), private_key=Ed25519PrivateKey.generate(), created_at=created_at
        )


@dataclass(frozen=True)
class _RingState:
    keys: Mapping[str, RingKey]
    active_kid: str


class KeyRing:
    """Ed25519 signing keys by ``kid``, persisted in one owner-only file (or held in memory only).

    File layout: ``{"version": 1, "active": "<kid>", "keys": {"<kid>": {"private_key": <base64 of
    the 32 raw bytes>, "created_at": <unix seconds>}}}``.
    """

    def __init__(self, state: _RingState, path: Path | None, clock: Callable[[], float]) -> None:
        self.path = path
        self._state = state
        self._clock = clock
        self._lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def load_or_create(cls, path: Path | str, *, clock: Callable[[], float] = time.time) -> KeyRing:
        """Load the ring at ``path``, creating it with one fresh key when the file does not exist."""
        path = Path(path)
        ensure_private_dir(path.parent)
        raw = read_owner_only(path)
        if raw is None:
            with exclusive_lock(path):
                # Another process may have created it between our read and taking the lock.
                raw = read_owner_only(path)
                if raw is None:
                    first = RingKey.generate(created_at=clock())
                    state = _RingState(keys={first.kid: first}, active_kid=first.kid)
                    write_owner_only(path, _encode(state))
                    return cls(state, path, clock)
        return cls(_decode(raw, path), path, clock)

    @classmethod
    def ephemeral(cls, *, clock: Callable[[], float] = time.time) -> KeyRing:
        """A ring with one fresh key that lives only in memory (tests, single-process tools)."""
        first = RingKey.generate(created_at=clock())
        return cls(_RingState(keys={first.kid: first}, active_kid=first.kid), None, clock)

    # --- reading ---------------------------------------------------------------------------
    @property
    def active_kid(self) -> str:
        """The ``kid`` of the key that signs new tokens."""
        return self._state.active_kid

    def kids(self) -> list[str]:
        """Every ``kid`` that still verifies, oldest first."""
        return [key.kid for key in sorted(self._state.keys.values(), key=lambda key: key.created_at)]

    def public_key(self, kid: str) -> Ed25519PublicKey:
        """The public key for ``kid``; raises :class:`NotFoundError` for an unknown or retired kid."""
        key = self._state.keys.get(kid)
        if key is None:
            raise NotFoundError("no signing key with this kid in the ring", kid=str(kid)[:64])
        return key.public_key

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active ``(kid, private key)``."""
        state = self._state
        return state.active_kid, state.keys[state.active_kid].private_key

    def __contains__(self, kid: object) -> bool:
        return kid in self._state.keys

    def __len__(self) -> int:
        return len(self._state.keys)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "<memory>"
        return f"KeyRing(path={where!r}, active_kid={self.active_kid!r}, keys={len(self)})"

    # --- changing --------------------------------------------------------------------------
    def rotate(self) -> str:
        """Add a fresh key and make it the active one; older keys keep verifying. Returns the new kid."""
        new_key = RingKey.generate(created_at=self._clock())

        def add(state: _RingState) -> _RingState:
            return _RingState(keys={**state.keys, new_key.kid: new_key}, active_kid=new_key.kid)

        self._change(add)
        return new_key.kid

    def retire(self, kid: str) -> None:
        """Remove ``kid``: tokens it signed stop verifying. The active key cannot be retired."""

        def remove(state: _RingState) -> _RingState:
            if kid not in state.keys:
                raise NotFoundError("no signing key with this kid in the ring", kid=str(kid)[:64])
            if kid == state.active_kid:
                raise InvalidInputError("the active signing key cannot be retired; rotate first", kid=kid)
            return _RingState(
                keys={other: key for other, key in state.keys.items() if other != kid},
                active_kid=state.active_kid,
            )

        self._change(remove)

    def reload(self) -> None:
        """Re-read the file, picking up rotations and retirements made by other processes."""
        if self.path is None:
            return
        with self._lock:
            self._state = self._read_current()

    def _change(self, change: Callable[[_RingState], _RingState]) -> None:
        with self._lock:
            if self.path is None:
                self._state = change(self._state)
                return
            with exclusive_lock(self.path):
                # Start from the file: another process may have changed the ring since we read it.
                state = change(self._read_current())
                write_owner_only(self.path, _encode(state))
                self._state = state

    def _read_current(self) -> _RingState:
        assert self.path is not None
        raw = read_owner_only(self.path)
        if raw is None:
            raise ConfigError(f"key ring file {self.path} has disappeared", path=str(self.path))
        return _decode(raw, self.path)


def _encode(state: _RingState) -> bytes:
    doc = {
        "version": KEY_RING_FILE_VERSION,
        "active": state.active_kid,
        "keys": {
            kid: {
                "private_key": base64.b64encode(
                    key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                ).decode("ascii"),
                "created_at": key.created_at,
            }
            for kid, key in sorted(state.keys.items())
        },
    }
    return json.dumps(doc, indent=2).encode("utf-8")


def _decode(raw: bytes, path: Path) -> _RingState:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"key ring file {path} is not valid JSON", path=str(path)) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
        raise ConfigError(f"key ring file {path} has no 'keys' object", path=str(path))
    if doc.get("version") != KEY_RING_FILE_VERSION:
        raise ConfigError(
            f"key ring file {path} has version {doc.get('version')!r}; this rayflow reads version "
            f"{KEY_RING_FILE_VERSION}",
            path=str(path),
        )
    keys: dict[str, RingKey] = {}
    for kid, item in doc["keys"].items():
        try:
            raw_key = base64.b64decode(item["private_key"], validate=True)
            if len(raw_key) != ED25519_KEY_BYTES:
                raise ValueError("wrong key size")
            keys[kid] = RingKey(
                kid=str(kid),
                private_key=Ed25519PrivateKey.from_private_bytes(raw_key),
                created_at=float(item.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ConfigError(f"key ring file {path} has a malformed key {kid!r}", path=str(path)) from exc
    active = doc.get("active")
    if not isinstance(active, str) or active not in keys:
        raise ConfigError(f"key ring file {path} names an active key it does not hold", path=str(path))
    return _RingState(keys=keys, active_kid=active)
