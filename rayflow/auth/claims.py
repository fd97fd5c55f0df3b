"""What a verified access token says: subject, tenant, namespace patterns, scopes and validity.

Why patterns are validated twice (when a token is issued and again when one is verified): the
issuer is the only party that should ever sign a token, but a verifier must not trust that a
signed token was built by this code; a pattern such as ``a/../b`` or a Unicode look-alike that
slipped through would otherwise widen access. Both sides go through
:func:`normalize_namespace_pattern`, which leans on :func:`rayflow.namespace.normalize_namespace`
for the path rules and only adds the wildcard forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rayflow.errors import InvalidInputError, InvalidNamespaceError
from rayflow.namespace import namespace_within, normalize_namespace
from rayflow.tenant import validate_tenant_name

#: The pattern that covers every namespace of the token's tenant.
WHOLE_TENANT = "*"
#: Suffix that turns a namespace into "this namespace and everything below it".
SUBTREE_SUFFIX = "/*"
#: Upper bound on patterns in one token: keeps tokens small and checks cheap.
MAX_NAMESPACE_PATTERNS = 64
#: Upper bound on the subject string carried in a token (the tenant follows :mod:`rayflow.tenant`).
MAX_NAME_LENGTH = 256


class Scope:
    """The scopes a token can grant; plain strings so they compare equal to what a token carries."""

    READ = "reasoningbank:read"
    WRITE = "reasoningbank:write"
    #: Implies READ and WRITE anywhere inside the token's own tenant (never another tenant).
    ADMIN = "admin"


#: Every scope this version knows; tokens carrying anything else are refused.
ALL_SCOPES: frozenset[str] = frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN})


def normalize_namespace_pattern(pattern: str) -> str:
    """Validate one namespace pattern and return its canonical form.

    Accepted forms: ``*`` (the whole tenant), ``<namespace>/*`` (that namespace and its subtree)
    and ``<namespace>`` (exactly that namespace). A ``*`` anywhere else, including inside a
    segment, is refused rather than interpreted, as is anything the namespace rules refuse.
    """
    if not isinstance(pattern, str):
        raise InvalidNamespaceError(f"namespace pattern must be a string, got {type(pattern).__name__}")
    if pattern == WHOLE_TENANT:
        return WHOLE_TENANT
    if pattern.endswith(SUBTREE_SUFFIX):
        base = pattern[: -len(SUBTREE_SUFFIX)]
        suffix = SUBTREE_SUFFIX
    else:
        base = pattern
        suffix = ""
    if "*" in base:
        raise InvalidNamespaceError(f"'*' is only allowed as a whole last segment: {pattern!r}")
    return normalize_namespace(base) + suffix


def normalize_namespace_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """Canonical, de-duplicated patterns in their given order; refuses a bare string and an empty set."""
    if isinstance(patterns, (str, bytes)):
        # A bare string would be iterated character by character into nonsense patterns.
        raise InvalidNamespaceError("namespace patterns must be a sequence of strings, not one string")
    canonical: list[str] = []
    for pattern in patterns:
        normal = normalize_namespace_pattern(pattern)
        if normal not in canonical:
            canonical.append(normal)
    if not canonical:
        raise InvalidNamespaceError("a token needs at least one namespace pattern")
    if len(canonical) > MAX_NAMESPACE_PATTERNS:
        raise InvalidNamespaceError(f"a token may carry at most {MAX_NAMESPACE_PATTERNS} namespace patterns")
    return tuple(canonical)


def normalize_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a frozenset; refuses unknown scopes, a bare string and an empty set."""
    if isinstance(scopes, (str, bytes)):
        raise InvalidInputError("scopes must be a collection of strings, not one string")
    granted = frozenset(scopes)
    unknown = sorted(str(scope) for scope in granted - ALL_SCOPES)
    if unknown:
        raise InvalidInputError(f"unknown scopes {unknown}; known scopes are {sorted(ALL_SCOPES)}")
    if not granted:
        raise InvalidInputError("a token needs at least one scope")
    return granted


def pattern_allows(pattern: str, namespace: str) -> bool:
    """Whether canonical ``pattern`` covers canonical ``namespace`` (segment-wise, never by prefix text)."""
    if pattern == WHOLE_TENANT:
        return True
    if pattern.endswith(SUBTREE_SUFFIX):
        base = pattern[: -len(SUBTREE_SUFFIX)]
        return namespace_within(namespace, base)
    return namespace == pattern


def check_name(value: object, what: str) -> str:
    """A subject: a non-empty printable ASCII string without spaces or slashes.

    Deliberately looser than the tenant rule (:func:`rayflow.tenant.validate_tenant_name`): a
    subject only identifies the token holder in logs and audits, while a tenant must name
    something the bank could have created.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"{what} must be a string of 1..{MAX_NAME_LENGTH} characters")
    if not value.isascii() or not value.isprintable() or " " in value or "/" in value:
        raise InvalidInputError(f"{what} may only use printable ASCII without spaces or '/'")
    return value


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified content of one access token.

    ``namespaces`` are canonical patterns inside ``tenant``; constructing a ``Claims`` with a
    non-canonical pattern fails, so no code path can hold claims that widen access by accident.
    """

    sub: str
    tenant: str
    namespaces: tuple[str, ...]
    scopes: frozenset[str]
    iat: int
    exp: int
    jti: str
    aud: str
    iss: str
    kid: str

    def __post_init__(self) -> None:
        check_name(self.sub, "subject")
        validate_tenant_name(self.tenant)
        if not isinstance(self.namespaces, tuple):
            raise InvalidNamespaceError("namespace patterns must be a tuple")
        if normalize_namespace_patterns(self.namespaces) != self.namespaces:
            raise InvalidNamespaceError("namespace patterns are not in canonical form")
        if not isinstance(self.scopes, frozenset) or normalize_scopes(self.scopes) != self.scopes:
            raise InvalidInputError("scopes must be a frozenset of known scopes")
        if not isinstance(self.jti, str) or not self.jti:
            raise InvalidInputError("token id (jti) must be a non-empty string")

    def allows_namespace(self, namespace: str) -> bool:
        """Whether one of the patterns covers ``namespace``; malformed namespaces are never allowed.

        The root (``""``, the whole tenant) is covered only by ``*``.
        """
        try:
            canonical = normalize_namespace(namespace, allow_root=True)
        except InvalidNamespaceError:
            return False
        return any(pattern_allows(pattern, canonical) for pattern in self.namespaces)

    def to_payload(self) -> dict[str, Any]:
        """The JWT claim set: registered claims plus ``tenant``, ``namespaces`` and a space-separated ``scope``."""
        return {
            "sub": self.sub,
            "tenant": self.tenant,
            "namespaces": list(self.namespaces),
            "scope": " ".join(sorted(self.scopes)),
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
            "aud": self.aud,
            "iss": self.iss,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, kid: str) -> Claims:
        """Claims from a signature-checked payload; raises :class:`InvalidInputError` when malformed.

        Patterns must already be canonical: a signed token whose patterns need rewriting was not
        made by :class:`~rayflow.auth.issuer.TokenIssuer` and is refused rather than repaired.
        """
        namespaces = payload.get("namespaces")
        if not isinstance(namespaces, list) or not all(isinstance(item, str) for item in namespaces):
            raise InvalidInputError("claim 'namespaces' must be a list of strings")
        scope = payload.get("scope")
        if not isinstance(scope, str):
            raise InvalidInputError("claim 'scope' must be a space-separated string")
        for name in ("iat", "exp"):
            if type(payload.get(name)) is not int:
                raise InvalidInputError(f"claim '{name}' must be an integer")
        for name in ("jti", "aud", "iss"):
            if not isinstance(payload.get(name), str):
                raise InvalidInputError(f"claim '{name}' must be a string")
        return cls(
            sub=payload.get("sub"),  # type: ignore[arg-type]  # checked in __post_init__
            tenant=payload.get("tenant"),  # type: ignore[arg-type]
            namespaces=tuple(namespaces),
            scopes=frozenset(scope.split(" ")) if scope else frozenset(),
            iat=payload["iat"],
            exp=payload["exp"],
            jti=payload["jti"],
            aud=payload["aud"],
            iss=payload["iss"],
            kid=kid,
        )
