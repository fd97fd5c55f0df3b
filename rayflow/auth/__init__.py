"""Access tokens for the ReasoningBank hub: signing keys, issuing, verifying, revoking, authorizing.

Sandboxes get short-lived EdDSA JWTs naming one tenant, the namespace patterns they may touch
and their scopes. The hub verifies each request's token (cached, but still checked against the
clock and the revocation list on every call) and then :func:`authorize`\\ s the operation.
"""

from rayflow.auth.authorize import authorize, effective_scopes
from rayflow.auth.claims import (
    ALL_SCOPES,
    WHOLE_TENANT,
    Claims,
    Scope,
    normalize_namespace_pattern,
    normalize_namespace_patterns,
)
from rayflow.auth.issuer import DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenIssuer
from rayflow.auth.keys import KeyRing, PublicKeys, SigningKeys
from rayflow.auth.revocation import RevocationCheck, RevocationList
from rayflow.auth.verifier import ACCEPTED_ALGORITHMS, TokenVerifier

__all__ = [
    "ACCEPTED_ALGORITHMS",
    "ALL_SCOPES",
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "WHOLE_TENANT",
    "Claims",
    "KeyRing",
    "PublicKeys",
    "RevocationCheck",
    "RevocationList",
    "Scope",
    "SigningKeys",
    "TokenIssuer",
    "TokenVerifier",
    "authorize",
    "effective_scopes",
    "normalize_namespace_pattern",
    "normalize_namespace_patterns",
]
