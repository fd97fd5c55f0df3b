"""Specification of the authorization decision: scopes, namespaces, admin and tenants."""

from __future__ import annotations

import pytest

from rayflow.auth import Claims, Scope, authorize, effective_scopes, normalize_namespace_patterns
from rayflow.errors import InvalidInputError, InvalidNamespaceError, PermissionDeniedError


def make_claims(patterns: list[str], scopes: set[str], tenant: str = "acme") -> Claims:
    return Claims(
        sub="sbx-1",
        tenant=tenant,
        namespaces=normalize_namespace_patterns(patterns),
        scopes=frozenset(scopes),
        iat=1_700_000_000,
        exp=1_700_000_300,
        jti="jti-1",
        aud="rayflow-reasoningbank",
        iss="rayflow-hub",
        kid="k_1",
    )


def denial_reason(claims: Claims, op_scope: str, namespace: str | None, **kwargs: str) -> str:
    with pytest.raises(PermissionDeniedError) as info:
        authorize(claims, op_scope, namespace, **kwargs)
    return info.value.details["reason"]


def test_read_token_may_read_inside_its_subtree():
    authorize(make_claims(["swarm/*"], {Scope.READ}), Scope.READ, "swarm/task-1")


def test_read_token_may_not_write():
    claims = make_claims(["swarm/*"], {Scope.READ})
    assert denial_reason(claims, Scope.WRITE, "swarm/task-1") == "missing_scope"


def test_write_token_may_not_read_unless_granted():
    claims = make_claims(["swarm/*"], {Scope.WRITE})
    assert denial_reason(claims, Scope.READ, "swarm/task-1") == "missing_scope"


def test_namespace_outside_the_patterns_is_denied():
    claims = make_claims(["swarm/*"], {Scope.READ})
    assert denial_reason(claims, Scope.READ, "swarmx/task-1") == "namespace"


def test_tenant_wide_operation_needs_the_whole_tenant_pattern():
    assert denial_reason(make_claims(["swarm/*"], {Scope.READ}), Scope.READ, None) == "namespace"
    authorize(make_claims(["*"], {Scope.READ}), Scope.READ, None)


def test_root_namespace_needs_the_whole_tenant_pattern():
    assert denial_reason(make_claims(["swarm/*"], {Scope.READ}), Scope.READ, "") == "namespace"


def test_admin_implies_read_and_write():
    assert effective_scopes(make_claims(["*"], {Scope.ADMIN})) == {Scope.ADMIN, Scope.READ, Scope.WRITE}


def test_admin_reaches_every_namespace_of_its_own_tenant():
    claims = make_claims(["swarm/*"], {Scope.ADMIN})
    authorize(claims, Scope.WRITE, "elsewhere/deep/down", tenant="acme")
    authorize(claims, Scope.READ, None, tenant="acme")
    authorize(claims, Scope.ADMIN, None, tenant="acme")


def test_admin_may_not_act_on_another_tenant():
    claims = make_claims(["*"], {Scope.ADMIN})
    assert denial_reason(claims, Scope.READ, "swarm", tenant="startup") == "wrong_tenant"


def test_non_admin_may_not_perform_admin_operations():
    claims = make_claims(["*"], {Scope.READ, Scope.WRITE})
    assert denial_reason(claims, Scope.ADMIN, None) == "missing_scope"


def test_any_token_is_denied_on_another_tenant():
    claims = make_claims(["*"], {Scope.READ})
    assert denial_reason(claims, Scope.READ, "swarm", tenant="startup") == "wrong_tenant"


@pytest.mark.parametrize("namespace", ["swarm/../other", "swarm//x", "swarm\u2215x", "\uff53warm"])
def test_malformed_namespace_is_an_input_error_not_a_grant(namespace):
    claims = make_claims(["*"], {Scope.ADMIN})
    with pytest.raises(InvalidNamespaceError):
        authorize(claims, Scope.READ, namespace)


def test_unknown_operation_scope_is_a_caller_bug():
    with pytest.raises(InvalidInputError):
        authorize(make_claims(["*"], {Scope.ADMIN}), "reasoningbank:delete", None)
