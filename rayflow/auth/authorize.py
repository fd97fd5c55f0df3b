"""The authorization decision: may these verified claims perform an operation needing a scope in a namespace?

Pure on purpose: no clock, no I/O, no hub state, so every rule is tested directly. Which scope an
operation needs is the hub's table; this module only decides.

Rules:

* the operation's scope must be granted; ``admin`` implies read and write;
* ``admin`` reaches every namespace, but only of the token's own tenant;
* otherwise the namespace must be covered by one of the token's patterns, and a tenant-wide
  operation (``namespace=None``) needs the ``*`` pattern;
* a token never acts on another tenant: when the hub passes the tenant a request names, it must
  equal the token's tenant.
"""

from __future__ import annotations

from rayflow.auth.claims import ALL_SCOPES, WHOLE_TENANT, Claims, Scope
from rayflow.errors import InvalidInputError, PermissionDeniedError
from rayflow.namespace import normalize_namespace

_IMPLIED_BY_ADMIN = frozenset({Scope.READ, Scope.WRITE})


def effective_scopes(claims: Claims) -> frozenset[str]:
    """The scopes the token grants, with the ones ``admin`` implies added."""
    if Scope.ADMIN in claims.scopes:
        return claims.scopes | _IMPLIED_BY_ADMIN
    return claims.scopes


def authorize(claims: Claims, op_scope: str, namespace: str | None, *, tenant: str | None = None) -> None:
    """Return if allowed; raise :class:`PermissionDeniedError` (``details["reason"]``) if not.

    ``namespace=None`` marks an operation over the whole tenant. A malformed ``namespace`` raises
    :class:`InvalidNamespaceError` (the request is wrong, not merely unauthorized); an
    ``op_scope`` this version does not know raises :class:`InvalidInputError`, since that is a
    bug in the caller's operation table, and is never treated as allowed.
    """
    if op_scope not in ALL_SCOPES:
        raise InvalidInputError(f"unknown operation scope {op_scope!r}")
    if tenant is not None and tenant != claims.tenant:
        raise PermissionDeniedError("token is not valid for this tenant", reason="wrong_tenant")
    canonical = None if namespace is None else normalize_namespace(namespace, allow_root=True)
    if op_scope not in effective_scopes(claims):
        raise PermissionDeniedError(f"token lacks the scope {op_scope!r}", reason="missing_scope")
    if Scope.ADMIN in claims.scopes:
        return
    if canonical is None:
        if WHOLE_TENANT not in claims.namespaces:
            raise PermissionDeniedError(
                "operation spans the whole tenant; token is limited to some namespaces", reason="namespace"
            )
        return
    if not claims.allows_namespace(canonical):
        raise PermissionDeniedError(f"token does not cover namespace {canonical!r}", reason="namespace")
