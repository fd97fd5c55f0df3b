"""Specification of token claims: namespace patterns, scopes and namespace coverage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rayflow.auth.claims import (
    ALL_SCOPES,
    WHOLE_TENANT,
    Claims,
    Scope,
    normalize_namespace_pattern,
    normalize_namespace_patterns,
    normalize_scopes,
)
from rayflow.errors import InvalidInputError, InvalidNamespaceError
from rayflow.namespace import normalize_namespace


def make_claims(*patterns: str, scopes: frozenset[str] = frozenset({Scope.READ})) -> Claims:
    return Claims(
        sub="sandbox-1",
        tenant="acme",
        namespaces=normalize_namespace_patterns(patterns),
        scopes=scopes,
        iat=1_700_000_000,
        exp=1_700_000_300,
        jti="jti-1",
        aud="rayflow-reasoningbank",
        iss="rayflow-hub",
        kid="k_1",
    )


PATH_TRICKS = [
    "acme/../startup",
    "a//b",
    "swarm/*/x",
    "\uff53warm",  # fullwidth 's'
    "swarm\u2215x",  # division slash
    "sw\u0430rm",  # Cyrillic 'a'
    "*/x",
    "swarm*",
    "swarm/x*",
    "**",
    "swarm/**",
    "/*",
    "*/*",
    "",
    "/",
    "..",
    "../*",
    "./swarm",
    "swarm/.hidden",
    "swarm/ x",
    "swarm\x00",
    "swarm/\n",
]


@pytest.mark.parametrize("pattern", PATH_TRICKS)
def test_namespace_pattern_tricks_are_rejected(pattern):
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace_pattern(pattern)


@pytest.mark.parametrize("pattern", PATH_TRICKS)
def test_claims_cannot_be_built_with_a_namespace_trick(pattern):
    with pytest.raises(InvalidNamespaceError):
        Claims(
            sub="s",
            tenant="acme",
            namespaces=(pattern,),
            scopes=frozenset({Scope.READ}),
            iat=1,
            exp=2,
            jti="j",
            aud="a",
            iss="i",
            kid="k",
        )


@pytest.mark.parametrize(
    ("pattern", "canonical"),
    [("*", "*"), ("swarm/*", "swarm/*"), ("/Swarm/Task-1/", "swarm/task-1"), ("Swarm/*", "swarm/*")],
)
def test_patterns_are_brought_to_canonical_form(pattern, canonical):
    assert normalize_namespace_pattern(pattern) == canonical


def test_claims_refuse_patterns_that_are_not_canonical():
    with pytest.raises(InvalidNamespaceError):
        Claims(
            sub="s",
            tenant="acme",
            namespaces=("Swarm/*",),
            scopes=frozenset({Scope.READ}),
            iat=1,
            exp=2,
            jti="j",
            aud="a",
            iss="i",
            kid="k",
        )


def test_a_bare_string_is_not_taken_as_a_list_of_patterns():
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace_patterns("swarm/*")


def test_an_empty_list_of_patterns_is_refused():
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace_patterns([])


def test_duplicate_patterns_collapse_in_order():
    assert normalize_namespace_patterns(["b", "a/*", "B", "a/*"]) == ("b", "a/*")


def test_unknown_scopes_are_refused():
    with pytest.raises(InvalidInputError, match="unknown scopes"):
        normalize_scopes([Scope.READ, "reasoningbank:delete"])


def test_known_scopes_are_the_three_documented_ones():
    assert ALL_SCOPES == {"reasoningbank:read", "reasoningbank:write", "admin"}


def test_subtree_pattern_allows_its_root_and_everything_below():
    claims = make_claims("swarm/*")
    assert claims.allows_namespace("swarm")
    assert claims.allows_namespace("swarm/task-1")
    assert claims.allows_namespace("swarm/task-1/sub")


def test_subtree_pattern_does_not_allow_a_sibling_sharing_its_prefix():
    assert not make_claims("swarm/*").allows_namespace("swarmx")
    assert not make_claims("swarm/*").allows_namespace("swarmx/a")


def test_exact_pattern_allows_only_that_namespace():
    claims = make_claims("swarm/task-1")
    assert claims.allows_namespace("swarm/task-1")
    assert not claims.allows_namespace("swarm/task-1/sub")
    assert not claims.allows_namespace("swarm")


def test_whole_tenant_pattern_allows_every_namespace_and_the_root():
    claims = make_claims(WHOLE_TENANT)
    assert claims.allows_namespace("anything/at/all")
    assert claims.allows_namespace("")


def test_only_the_whole_tenant_pattern_allows_the_root():
    assert not make_claims("swarm/*").allows_namespace("")


def test_namespaces_are_compared_in_canonical_form():
    assert make_claims("swarm/*").allows_namespace("/Swarm/Task-1/")


@pytest.mark.parametrize(
    "namespace", ["swarm/../other", "swarm//x", "swarm/\u2215x", "\uff53warm/x", "swarm/*"]
)
def test_malformed_namespaces_are_never_allowed(namespace):
    assert not make_claims("swarm/*").allows_namespace(namespace)


def test_claims_round_trip_through_the_payload():
    claims = make_claims("swarm/*", "shared", scopes=frozenset({Scope.READ, Scope.WRITE}))
    assert Claims.from_payload(claims.to_payload(), kid=claims.kid) == claims


def test_payload_with_a_non_integer_expiry_is_refused():
    payload = make_claims("swarm/*").to_payload()
    payload["exp"] = 1.5e9
    with pytest.raises(InvalidInputError):
        Claims.from_payload(payload, kid="k_1")


# --- property: coverage never leaves the pattern's subtree -----------------------------------
_SEGMENTS = st.sampled_from(["a", "b", "ab", "a-b", "a.b", "swarm", "swarmx", "Swarm", "x_1"])
_NAMESPACES = st.lists(_SEGMENTS, min_size=1, max_size=4).map("/".join)
_PATTERNS = st.one_of(st.just("*"), _NAMESPACES.map(lambda ns: ns + "/*"), _NAMESPACES)
_ANY_NAMESPACE = st.one_of(_NAMESPACES, st.text(max_size=24), _NAMESPACES.map(lambda ns: "/" + ns + "/"))


def _inside(namespace: str, pattern: str) -> bool:
    """Independent reference: compare segment lists, never string prefixes."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        base = pattern[:-2].split("/")
        return namespace.split("/")[: len(base)] == base
    return namespace == pattern


@given(pattern=_PATTERNS, namespace=_ANY_NAMESPACE)
def test_allows_namespace_never_allows_a_namespace_outside_the_pattern(pattern, namespace):
    claims = make_claims(pattern)
    if not claims.allows_namespace(namespace):
        return
    canonical = normalize_namespace(namespace, allow_root=True)
    assert _inside(canonical, claims.namespaces[0])


@given(pattern=_PATTERNS, namespace=_NAMESPACES)
def test_allows_namespace_allows_every_namespace_inside_the_pattern(pattern, namespace):
    claims = make_claims(pattern)
    canonical = normalize_namespace(namespace)
    if _inside(canonical, claims.namespaces[0]):
        assert claims.allows_namespace(namespace)
