"""Specification of token issuing: what goes into a token and what is refused."""

from __future__ import annotations

import jwt
import pytest

from rayflow.auth import KeyRing, Scope, TokenIssuer
from rayflow.errors import ConfigError, InvalidInputError, InvalidNamespaceError

NOW = 1_700_000_000


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.ephemeral()


@pytest.fixture
def issuer(ring: KeyRing) -> TokenIssuer:
    return TokenIssuer(ring, clock=lambda: NOW + 0.75)


def test_token_header_names_the_active_kid_and_eddsa(issuer, ring):
    header = jwt.get_unverified_header(issuer.issue("sbx-1", "acme", ["swarm/*"], [Scope.READ]))
    assert header["kid"] == ring.active_kid
    assert header["alg"] == "EdDSA"


def test_token_carries_tenant_patterns_scopes_and_registered_claims(issuer):
    token = issuer.issue("sbx-1", "acme", ["Swarm/*", "shared"], [Scope.WRITE, Scope.READ])
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "sbx-1",
        "tenant": "acme",
        "namespaces": ["swarm/*", "shared"],
        "scope": "reasoningbank:read reasoningbank:write",
        "iat": NOW,
        "exp": NOW + 300,
        "jti": payload["jti"],
        "aud": "rayflow-reasoningbank",
        "iss": "rayflow-hub",
    }


def test_token_ids_carry_128_random_bits(issuer):
    _, claims = issuer.issue_with_claims("sbx-1", "acme", ["*"], [Scope.READ])
    assert len(claims.jti) == 22  # 16 bytes, base64url without padding
    _, other = issuer.issue_with_claims("sbx-1", "acme", ["*"], [Scope.READ])
    assert other.jti != claims.jti


def test_explicit_ttl_sets_the_expiry(issuer):
    _, claims = issuer.issue_with_claims("sbx-1", "acme", ["*"], [Scope.READ], ttl_s=60)
    assert claims.exp - claims.iat == 60


def test_ttl_above_the_maximum_is_refused(issuer):
    with pytest.raises(InvalidInputError, match="lifetime"):
        issuer.issue("sbx-1", "acme", ["*"], [Scope.READ], ttl_s=3601)


@pytest.mark.parametrize("ttl", [0, -5, 1.5, True])
def test_ttl_that_is_not_a_positive_integer_is_refused(issuer, ttl):
    with pytest.raises(InvalidInputError):
        issuer.issue("sbx-1", "acme", ["*"], [Scope.READ], ttl_s=ttl)


def test_unknown_scope_is_refused(issuer):
    with pytest.raises(InvalidInputError, match="unknown scopes"):
        issuer.issue("sbx-1", "acme", ["*"], ["reasoningbank:everything"])


@pytest.mark.parametrize("pattern", ["acme/../startup", "a//b", "swarm/*/x", "\uff53warm", "swarm\u2215x"])
def test_namespace_trick_is_refused_at_issue_time(issuer, pattern):
    with pytest.raises(InvalidNamespaceError):
        issuer.issue("sbx-1", "acme", [pattern], [Scope.READ])


@pytest.mark.parametrize("tenant", ["", "ac me", "acme/other", "\u0430cme", "x" * 300])
def test_malformed_tenant_is_refused(issuer, tenant):
    with pytest.raises(InvalidInputError):
        issuer.issue("sbx-1", tenant, ["*"], [Scope.READ])


def test_default_ttl_above_the_maximum_is_a_config_error(ring):
    with pytest.raises(ConfigError):
        TokenIssuer(ring, default_ttl_s=7200, max_ttl_s=3600)


def test_after_rotation_new_tokens_carry_the_new_kid(issuer, ring):
    new_kid = ring.rotate()
    header = jwt.get_unverified_header(issuer.issue("sbx-1", "acme", ["*"], [Scope.READ]))
    assert header["kid"] == new_kid
