"""Verifying access tokens: signature, issuer, audience, lifetime, claim shape and revocation.

Why the algorithm list is fixed: reading it from the token header is the classic way to accept
``alg: none`` or an HMAC token "signed" with the public key (RFC 8725, section 2.1). Only
``EdDSA`` is accepted, and the key is chosen by ``kid`` from the ring, never from the token.

Why a cache: an Ed25519 check plus JSON parsing costs tens of microseconds and the same token
arrives with every request of a sandbox. Verified claims are cached by a hash of the token (the
token itself is never kept), and a cache hit still checks expiry against the clock, the
revocation list and that the signing key has not been retired, so caching never extends what a
token may do.

Error messages say what was wrong with a token, never what the token was.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from rayflow.auth.claims import Claims
from rayflow.auth.issuer import DEFAULT_AUDIENCE, DEFAULT_ISSUER, MAX_TTL_S, SIGNING_ALGORITHM
from rayflow.auth.keys import PublicKeys
from rayflow.auth.revocation import RevocationCheck
from rayflow.errors import AuthError, ConfigError, InvalidInputError, NotFoundError

#: The accepted algorithms, fixed here and never derived from a token.
ACCEPTED_ALGORITHMS: tuple[str, ...] = (SIGNING_ALGORITHM,)
#: Claims a token must carry (besides the rayflow ones checked by :meth:`Claims.from_payload`).
REQUIRED_CLAIMS: tuple[str, ...] = ("sub", "iat", "exp", "jti", "aud", "iss", "tenant", "namespaces", "scope")
#: Longer strings are refused before any parsing; real tokens are a few hundred characters.
MAX_TOKEN_LENGTH = 8192
DEFAULT_LEEWAY_S = 5.0
DEFAULT_CACHE_SIZE = 4096

_DECODE_OPTIONS: dict[str, Any] = {
    "require": list(REQUIRED_CLAIMS),
    # Time is checked below against the injected clock, on cache hits as well as misses.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    # ``aud`` must be exactly our audience string, not a list that happens to contain it.
    "strict_aud": True,
}

# The reason codes travel in ``AuthError.details["reason"]`` so callers can branch without parsing text.
_PYJWT_REASONS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature", "token signature does not verify"),
    (jwt.InvalidAudienceError, "wrong_audience", "token is not meant for this audience"),
    (jwt.InvalidIssuerError, "wrong_issuer", "token was not issued by the expected issuer"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "token algorithm is not accepted"),
    (InvalidSubjectError, "malformed_claims", "token subject (sub) must be a string"),
    (InvalidJTIError, "malformed_claims", "token id (jti) must be a string"),
    (jwt.DecodeError, "malformed", "token is malformed"),
)


class TokenVerifier:
    """Checks tokens against the ring's public keys and returns their :class:`Claims`.

    ``revocations`` is required so a deployment chooses deliberately; ``None`` means no deny-list.
    """

    def __init__(
        self,
        key_ring: PublicKeys,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway_s: float = DEFAULT_LEEWAY_S,
        revocations: RevocationCheck | None,
        clock: Callable[[], float] = time.time,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_ttl_s: int = MAX_TTL_S,
    ) -> None:
        if not issuer or not audience:
            raise ConfigError("issuer and audience must be non-empty")
        if leeway_s < 0 or cache_size < 0 or max_ttl_s <= 0:
            raise ConfigError("leeway_s and cache_size must be >= 0 and max_ttl_s > 0")
        self.key_ring = key_ring
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self.revocations = revocations
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, token: str) -> Claims:
        """The token's claims; raises :class:`AuthError` (with ``details["reason"]``) when it is not valid now."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise AuthError("token is missing or malformed", reason="malformed")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._clock()
        with self._cache_lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
        if cached is not None:
            try:
                self._check_current(cached, now)
            except AuthError:
                self._forget(digest)
                raise
            return cached
        claims = self._verify_uncached(token)
        self._check_current(claims, now)
        if self._cache_size:
            with self._cache_lock:
                self._cache[digest] = claims
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return claims

    def clear_cache(self) -> None:
        """Forget every cached verification (the next call of each token pays the full check)."""
        with self._cache_lock:
            self._cache.clear()

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens are cached."""
        return len(self._cache)

    def __repr__(self) -> str:
        return (
            f"TokenVerifier(issuer={self.issuer!r}, audience={self.audience!r}, "
            f"leeway_s={self.leeway_s}, cached={len(self._cache)})"
        )

    # --- internals -------------------------------------------------------------------------
    def _verify_uncached(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed", reason="malformed") from None
        if header.get("alg") not in ACCEPTED_ALGORITHMS:
            raise AuthError("token algorithm is not accepted", reason="bad_algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("token header has no key id (kid)", reason="unknown_key")
        try:
            public_key = self.key_ring.public_key(kid)
        except NotFoundError:
            raise AuthError(
                "token was signed with an unknown or retired key", reason="unknown_key", kid=kid[:64]
            ) from None
        try:
            payload = jwt.decode(
                token,
                public_key,
                algorithms=list(ACCEPTED_ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                options=_DECODE_OPTIONS,  # type: ignore[arg-type]
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the required claim {exc.claim!r}", reason="missing_claim") from None
        except jwt.PyJWTError as exc:
            raise _translate(exc) from None
        self._check_lifetime(payload)
        try:
            return Claims.from_payload(payload, kid=kid)
        except InvalidInputError as exc:
            raise AuthError(f"token claims are malformed: {exc.message}", reason="malformed_claims") from None

    def _check_lifetime(self, payload: dict[str, Any]) -> None:
        issued_at, expires_at = payload.get("iat"), payload.get("exp")
        if type(issued_at) is not int or type(expires_at) is not int:
            raise AuthError("token times (iat, exp) must be integers", reason="malformed_claims")
        if not 0 < expires_at - issued_at <= self.max_ttl_s:
            raise AuthError(
                f"token lifetime must be in 1..{self.max_ttl_s} seconds", reason="lifetime_too_long"
            )
        if "nbf" in payload:
            raise AuthError("token carries an unexpected 'nbf' claim", reason="malformed_claims")

    def _check_current(self, claims: Claims, now: float) -> None:
        if now >= claims.exp + self.leeway_s:
            raise AuthError("token has expired", reason="expired")
        if claims.iat > now + self.leeway_s:
            raise AuthError("token is not valid yet", reason="not_yet_valid")
        if claims.kid not in self.key_ring:
            raise AuthError("token was signed with an unknown or retired key", reason="unknown_key")
        if self.revocations is not None and self.revocations.is_revoked(claims.jti):
            raise AuthError("token has been revoked", reason="revoked")

    def _forget(self, digest: bytes) -> None:
        with self._cache_lock:
            self._cache.pop(digest, None)


def _translate(exc: Exception) -> AuthError:
    for exc_type, reason, message in _PYJWT_REASONS:
        if isinstance(exc, exc_type):
            return AuthError(message, reason=reason)
    return AuthError("token is not valid", reason="invalid")
