"""Tokens that hold in every region: signing keys and revocations carried by the change log.

A token is signed by the hub that minted it (EdDSA, its key ring's active key). For a sandbox
that moved to, or failed over to, another region's hub to be served there, every replica must
know every replica's public signing keys; for a revocation to hold everywhere, every replica
must know every revoked token id. Both travel as federation-wide changes of the bank's log
(``auth.key``, ``auth.revoke``; scope ``*``), so they replicate like everything else, within the
replication lag, and a replica back from a partition or a restart catches up on them too.

Only public keys travel: a replica's private signing keys never leave its state directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rayflow.auth.keys import KeyRing
from rayflow.auth.revocation import RevocationList
from rayflow.errors import NotFoundError
from rayflow.memory.store import FEDERATION_SCOPE, Change, Mutation, Store


def publish_signing_keys(ring: KeyRing, store: Store, *, clock: Callable[[], float] = time.time) -> list[str]:
    """Log every key of ``ring`` the federation does not know yet; returns the kids published."""
    known = {kid for (kid,) in store.reader().execute("SELECT kid FROM federation_keys")}
    mutations = [
        Mutation(
            "auth.key",
            kid,
            {
                "public_key": ring.public_key(kid).public_bytes(Encoding.Raw, PublicFormat.Raw),
                "created_at": clock(),
            },
        )
        for kid in ring.kids()
        if kid not in known
    ]
    store.commit(FEDERATION_SCOPE, mutations)
    return [mutation.entity_id for mutation in mutations]


class FederatedKeys:
    """Public keys by ``kid``: this hub's own ring first, then every replica's published keys."""

    def __init__(self, ring: KeyRing, store: Store) -> None:
        self.ring = ring
        self.store = store
        self._cache: dict[str, Ed25519PublicKey] = {}
        self._lock = threading.Lock()

    def public_key(self, kid: str) -> Ed25519PublicKey:
        if kid in self.ring:
            return self.ring.public_key(kid)
        with self._lock:
            cached = self._cache.get(kid)
        if cached is not None:
            return cached
        row = (
            self.store.reader()
            .execute("SELECT public_key FROM federation_keys WHERE kid = ?", (kid,))
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"unknown signing key {kid!r}", kid=kid)
        key = Ed25519PublicKey.from_public_bytes(row[0])
        with self._lock:
            self._cache[kid] = key
        return key

    def __contains__(self, kid: object) -> bool:
        if not isinstance(kid, str):
            return False
        try:
            self.public_key(kid)
        except NotFoundError:
            return False
        return True


class FederatedRevocations:
    """The deny-list as every replica sees it: this hub's own list (immediate, durable) plus the
    revocations logged anywhere in the federation (kept in memory, updated as the log grows)."""

    def __init__(self, local: RevocationList, store: Store) -> None:
        self.local = local
        self.store = store
        self._revoked = {jti for (jti,) in store.reader().execute("SELECT jti FROM federation_revocations")}
        store.add_listener(self._learn)

    def _learn(self, changes: Sequence[Change]) -> None:
        for change in changes:
            if change.kind == "auth.revoke":
                self._revoked.add(change.entity_id)

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked or self.local.is_revoked(jti)

    def revoke(self, jti: str, expires_at: float, reason: str) -> None:
        """Revoke here at once, and in every region as the change replicates."""
        self.local.revoke(jti, expires_at, reason)
        self.store.commit(
            FEDERATION_SCOPE,
            [Mutation("auth.revoke", jti, {"expires_at": float(expires_at), "reason": reason})],
        )

    def close(self) -> None:
        self.local.close()
