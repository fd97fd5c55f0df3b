"""Minting short-lived access tokens (EdDSA JWTs) for sandboxes.

Why short-lived and narrow: a sandbox runs untrusted agent code, so its token is assumed to leak;
a few minutes of validity, one tenant, the namespaces it works in and only the scopes it needs
bound what a leaked token can do. Every input is validated here, and again by the verifier, so a
mistake on either side fails closed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable

import jwt

from rayflow.auth.claims import (
    Claims,
    check_name,
    normalize_namespace_patterns,
    normalize_scopes,
)
from rayflow.auth.keys import SigningKeys
from rayflow.errors import ConfigError, InvalidInputError
from rayflow.tenant import validate_tenant_name

#: The one signing algorithm: Ed25519 signatures.
SIGNING_ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "rayflow-hub"
DEFAULT_AUDIENCE = "rayflow-reasoningbank"
DEFAULT_TTL_S = 300
MAX_TTL_S = 3600
#: Bits of randomness in a token id; enough that ids never collide across all tokens ever issued.
JTI_BYTES = 16


class TokenIssuer:
    """Signs tokens with the ring's active key; the ``kid`` goes in the header so verifiers pick the key."""

    def __init__(
        self,
        key_ring: SigningKeys,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        default_ttl_s: int = DEFAULT_TTL_S,
        max_ttl_s: int = MAX_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _positive_int(max_ttl_s):
            raise ConfigError("max_ttl_s must be a positive integer number of seconds")
        if not _positive_int(default_ttl_s) or default_ttl_s > max_ttl_s:
            raise ConfigError("default_ttl_s must be a positive integer no larger than max_ttl_s")
        if not issuer or not audience:
            raise ConfigError("issuer and audience must be non-empty")
        self.key_ring = key_ring
        self.issuer = issuer
        self.audience = audience
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self._clock = clock

    def issue(
        self,
        sub: str,
        tenant: str,
        namespaces: Iterable[str],
        scopes: Iterable[str],
        ttl_s: int | None = None,
    ) -> str:
        """A signed token for ``sub`` acting in ``tenant`` on ``namespaces`` with ``scopes``.

        Raises :class:`InvalidInputError` (or its :class:`InvalidNamespaceError`) for an unknown
        scope, a malformed namespace pattern, or a lifetime that is not in ``1..max_ttl_s``.
        """
        token, _ = self.issue_with_claims(sub, tenant, namespaces, scopes, ttl_s)
        return token

    def issue_with_claims(
        self,
        sub: str,
        tenant: str,
        namespaces: Iterable[str],
        scopes: Iterable[str],
        ttl_s: int | None = None,
    ) -> tuple[str, Claims]:
        """Like :meth:`issue`, also returning the claims (for the ``jti`` and ``exp`` a revocation needs)."""
        lifetime = self.default_ttl_s if ttl_s is None else ttl_s
        if not _positive_int(lifetime) or lifetime > self.max_ttl_s:
            raise InvalidInputError(f"token lifetime must be an integer in 1..{self.max_ttl_s} seconds")
        kid, private_key = self.key_ring.signing_key()
        issued_at = int(self._clock())
        claims = Claims(
            sub=check_name(sub, "subject"),
            tenant=validate_tenant_name(tenant),
            namespaces=normalize_namespace_patterns(namespaces),
            scopes=normalize_scopes(scopes),
            iat=issued_at,
            exp=issued_at + lifetime,
            jti=secrets.token_urlsafe(JTI_BYTES),
            aud=self.audience,
            iss=self.issuer,
            kid=kid,
        )
        token = jwt.encode(
            claims.to_payload(), private_key, algorithm=SIGNING_ALGORITHM, headers={"kid": kid, "typ": "JWT"}
        )
        return token, claims

    def __repr__(self) -> str:
        return f"TokenIssuer(issuer={self.issuer!r}, audience={self.audience!r}, max_ttl_s={self.max_ttl_s})"


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0
