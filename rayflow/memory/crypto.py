"""Encryption at rest of memory text fields with one AES-256-GCM data key per tenant.

Why per-tenant keys: deleting a tenant's key makes every copy of its rows unreadable (backups,
replicas, stray exports), and a bug that mixes tenants fails loudly on decryption instead of
leaking text. Why AAD: the caller binds each ciphertext to where it lives (for example
``b"<item_id>|title"``), so a ciphertext copied into another row or field does not decrypt.

Keys come from a :class:`KeyProvider`. :class:`FileKeyProvider` keeps them in one local file
with the same discipline ssh applies to private keys (see :mod:`rayflow.owner_only_file`); :class:`InMemoryKeyProvider` serves tests
and callers that fetch keys from a KMS themselves.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rayflow.errors import ConfigError, EncryptionError, InvalidInputError, UnknownTenantError
from rayflow.owner_only_file import ensure_private_dir, exclusive_lock, read_owner_only, write_owner_only

#: AES-256 needs a 32-byte key.
KEY_BYTES = 32
#: GCM's standard nonce size; random nonces are safe for about 2**32 encryptions per key.
NONCE_BYTES = 12
#: GCM's authentication tag appended to the ciphertext.
TAG_BYTES = 16
#: First byte of every blob, so the format can change later without guessing.
BLOB_VERSION = 1
#: Version of the key file layout.
KEY_FILE_VERSION = 1


@runtime_checkable
class KeyProvider(Protocol):
    """Where the per-tenant data keys come from."""

    def get_key(self, tenant: str) -> bytes:
        """The tenant's key; raises :class:`UnknownTenantError` when it has none."""

    def create_key(self, tenant: str) -> bytes:
        """Create the tenant's key, or return the existing one (idempotent)."""

    def has_key(self, tenant: str) -> bool:
        """Whether the tenant has a key."""

    def tenants(self) -> list[str]:
        """Every tenant with a key, sorted."""


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not tenant.strip():
        raise InvalidInputError("tenant must be a non-empty string", tenant=repr(tenant))


def _check_key(key: bytes, *, tenant: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise InvalidInputError(f"a tenant key must be {KEY_BYTES} bytes", tenant=tenant)
    return bytes(key)


class InMemoryKeyProvider:
    """Keys held in process memory: for tests, and for callers that inject keys from a KMS."""

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        for tenant, key in (keys or {}).items():
            _check_tenant(tenant)
            self._keys[tenant] = _check_key(key, tenant=tenant)

    def get_key(self, tenant: str) -> bytes:
        with self._lock:
            key = self._keys.get(tenant)
        if key is None:
            raise UnknownTenantError(f"no data key for tenant {tenant!r}", tenant=tenant)
        return key

    def create_key(self, tenant: str) -> bytes:
        _check_tenant(tenant)
        with self._lock:
            return self._keys.setdefault(tenant, secrets.token_bytes(KEY_BYTES))

    def has_key(self, tenant: str) -> bool:
        with self._lock:
            return tenant in self._keys

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def __repr__(self) -> str:
        return f"InMemoryKeyProvider(tenants={len(self._keys)})"


@dataclass(frozen=True)
class _KeyEntry:
    kid: str
    key: bytes = field(repr=False)
    created_at: float = 0.0


class FileKeyProvider:
    """Tenant keys in one JSON file that only its owner may read (mode 0600).

    Layout: ``{"version": 1, "keys": {"<tenant>": {"kid", "key" (base64), "created_at"}}}``.
    A file that group or others can access is refused, as ssh refuses such a private key:
    a key file that has been readable by others must be treated as leaked, and silently
    tightening its mode would hide that.

    Writes go to a 0600 temporary file that is fsynced and renamed over the key file, so a
    crash never leaves a half-written file. Creation is serialised within the process by a
    lock and across processes by ``flock`` on a sidecar ``.lock`` file (the key file itself is
    replaced on each write, so it cannot carry the lock); under that lock the file is read
    again, so two processes creating keys for different tenants both keep theirs.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, _KeyEntry] = {}
        if self.path.exists():
            self._entries = self._read()

    # --- KeyProvider ----------------------------------------------------------------------
    def get_key(self, tenant: str) -> bytes:
        return self._entry(tenant).key

    def key_id(self, tenant: str) -> str:
        """The key's public identifier (``kid``), safe to log; raises if the tenant has no key."""
        return self._entry(tenant).kid

    def create_key(self, tenant: str) -> bytes:
        _check_tenant(tenant)
        with self._lock:
            entry = self._entries.get(tenant)
            if entry is not None:
                return entry.key
            ensure_private_dir(self.path.parent)
            with exclusive_lock(self.path):
                # Another process may have written since we last read: start from the file.
                entries = self._read() if self.path.exists() else {}
                if tenant not in entries:
                    entries[tenant] = _KeyEntry(
                        kid="k_" + secrets.token_hex(8),
                        key=secrets.token_bytes(KEY_BYTES),
                        created_at=time.time(),
                    )
                    self._write(entries)
                self._entries = entries
            return entries[tenant].key

    def has_key(self, tenant: str) -> bool:
        try:
            self._entry(tenant)
        except UnknownTenantError:
            return False
        return True

    def tenants(self) -> list[str]:
        with self._lock:
            self._reload()
            return sorted(self._entries)

    def __repr__(self) -> str:
        return f"FileKeyProvider(path={str(self.path)!r}, tenants={len(self._entries)})"

    # --- internals ------------------------------------------------------------------------
    def _entry(self, tenant: str) -> _KeyEntry:
        with self._lock:
            entry = self._entries.get(tenant)
            if entry is None:
                # Another process may have created it since we loaded the file.
                self._reload()
                entry = self._entries.get(tenant)
        if entry is None:
            raise UnknownTenantError(f"no data key for tenant {tenant!r}", tenant=tenant)
        return entry

    def _reload(self) -> None:
        if self.path.exists():
            self._entries = self._read()

    def _read(self) -> dict[str, _KeyEntry]:
        raw = read_owner_only(self.path, label="key file")
        return {} if raw is None else self._parse(raw)

    def _parse(self, raw: bytes) -> dict[str, _KeyEntry]:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"key file {self.path} is not valid JSON", path=str(self.path)) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise ConfigError(f"key file {self.path} has no 'keys' object", path=str(self.path))
        version = doc.get("version")
        if version != KEY_FILE_VERSION:
            raise ConfigError(
                f"key file {self.path} has version {version!r}; this rayflow reads version {KEY_FILE_VERSION}",
                path=str(self.path),
            )
        entries: dict[str, _KeyEntry] = {}
        for tenant, item in doc["keys"].items():
            try:
                key = base64.b64decode(item["key"], validate=True)
                entry = _KeyEntry(
                    kid=str(item["kid"]), key=key, created_at=float(item.get("created_at", 0.0))
                )
            except (KeyError, TypeError, ValueError, binascii.Error) as exc:
                raise ConfigError(
                    f"key file {self.path} has a malformed entry for tenant {tenant!r}", path=str(self.path)
                ) from exc
            if len(entry.key) != KEY_BYTES:
                raise ConfigError(
                    f"key file {self.path} holds a key of the wrong size for tenant {tenant!r}",
                    path=str(self.path),
                )
            entries[tenant] = entry
        return entries

    def _write(self, entries: dict[str, _KeyEntry]) -> None:
        doc = {
            "version": KEY_FILE_VERSION,
            "keys": {
                tenant: {
                    "kid": entry.kid,
                    "key": base64.b64encode(entry.key).decode("ascii"),
                    "created_at": entry.created_at,
                }
                for tenant, entry in sorted(entries.items())
            },
        }
        write_owner_only(self.path, json.dumps(doc, indent=2).encode("utf-8"))


class TenantCipher:
    """AES-256-GCM over text with one tenant's key.

    Blob layout: 1 version byte, 12-byte random nonce, ciphertext with the 16-byte tag.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise EncryptionError(f"a tenant key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(bytes(key))

    def encrypt(self, plaintext: str, aad: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to ``aad`` (for example ``b"<item_id>|title"``)."""
        return self.encrypt_bytes(plaintext.encode("utf-8"), aad)

    def decrypt(self, blob: bytes, aad: bytes) -> str:
        """Decrypt a blob from :meth:`encrypt`; any tampering, wrong key or wrong AAD raises."""
        try:
            return self.decrypt_bytes(blob, aad).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EncryptionError("decrypted data is not UTF-8 text") from exc

    def encrypt_bytes(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt binary data (a msgpack body, say) bound to ``aad``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, bytes(plaintext), aad)
        return bytes([BLOB_VERSION]) + nonce + sealed

    def decrypt_bytes(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob from :meth:`encrypt_bytes`; any tampering, wrong key or wrong AAD raises."""
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise EncryptionError("ciphertext is too short to be valid")
        if blob[0] != BLOB_VERSION:
            raise EncryptionError(f"unknown ciphertext version {blob[0]}")
        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_BYTES :], aad)
        except InvalidTag as exc:
            raise EncryptionError(
                "ciphertext failed authentication (wrong key, wrong AAD or tampered)"
            ) from exc

    def __repr__(self) -> str:
        return "TenantCipher(key=<hidden>)"


class CipherCache:
    """One :class:`TenantCipher` per tenant, built once: AESGCM setup is not free per call."""

    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self._ciphers: dict[str, TenantCipher] = {}

    def cipher(self, tenant: str) -> TenantCipher:
        """The tenant's cipher; raises :class:`UnknownTenantError` when the tenant has no key."""
        with self._lock:
            found = self._ciphers.get(tenant)
        if found is not None:
            return found
        built = TenantCipher(self.provider.get_key(tenant))
        with self._lock:
            return self._ciphers.setdefault(tenant, built)

    def forget(self, tenant: str) -> None:
        """Drop a cached cipher, e.g. after the tenant's key was deleted or replaced."""
        with self._lock:
            self._ciphers.pop(tenant, None)

    def __repr__(self) -> str:
        return f"CipherCache(provider={self.provider!r}, cached={len(self._ciphers)})"
