"""Specification of token verification: every forged, stale or misdirected token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rayflow.auth import KeyRing, Scope, TokenIssuer, TokenVerifier
from rayflow.auth.verifier import REQUIRED_CLAIMS
from rayflow.errors import AuthError, ConfigError
from tests.clock_support import SteppedClock

START = 1_700_000_000.0


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(START)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.ephemeral()


@pytest.fixture
def issuer(ring, clock) -> TokenIssuer:
    return TokenIssuer(ring, clock=clock)


@pytest.fixture
def verifier(ring, clock) -> TokenVerifier:
    return TokenVerifier(ring, revocations=None, clock=clock, leeway_s=5)


@pytest.fixture
def token(issuer) -> str:
    return issuer.issue("sbx-1", "acme", ["swarm/*"], [Scope.READ, Scope.WRITE])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def valid_payload(now: float = START, **changes: Any) -> dict[str, Any]:
    payload = {
        "sub": "sbx-1",
        "tenant": "acme",
        "namespaces": ["swarm/*"],
        "scope": "reasoningbank:read",
        "iat": int(now),
        "exp": int(now) + 300,
        "jti": "forged-jti",
        "aud": "rayflow-reasoningbank",
        "iss": "rayflow-hub",
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None}


def sign_with_ring(ring: KeyRing, payload: dict[str, Any]) -> str:
    kid, key = ring.signing_key()
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid})


def refusal(verifier: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert token not in str(info.value)
    assert token not in repr(info.value.to_dict())
    return info.value


# --- round trip --------------------------------------------------------------------------------
def test_issued_token_verifies_to_the_same_claims(issuer, verifier):
    token, claims = issuer.issue_with_claims("sbx-1", "acme", ["swarm/*", "shared"], [Scope.READ])
    assert verifier.verify(token) == claims


def test_verified_claims_keep_the_signing_kid(ring, token, verifier):
    assert verifier.verify(token).kid == ring.active_kid


# --- tampering ---------------------------------------------------------------------------------
def test_changed_payload_with_original_signature_is_refused(token, verifier):
    header, _, signature = token.split(".")
    widened = segment(valid_payload(namespaces=["*"], scope="admin"))
    assert refusal(verifier, f"{header}.{widened}.{signature}").details["reason"] == "bad_signature"


def test_token_signed_by_a_foreign_key_under_our_kid_is_refused(ring, verifier):
    foreign = jwt.encode(
        valid_payload(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": ring.active_kid}
    )
    assert refusal(verifier, foreign).details["reason"] == "bad_signature"


def test_flipped_signature_byte_is_refused(token, verifier):
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[5] != "A" else "B").join([signature[:5], signature[6:]])
    assert refusal(verifier, f"{header}.{payload}.{flipped}").details["reason"] == "bad_signature"


def test_alg_none_is_refused(ring, verifier):
    unsigned = f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': ring.active_kid})}.{segment(valid_payload())}."
    assert refusal(verifier, unsigned).details["reason"] == "bad_algorithm"


@pytest.mark.parametrize("encoding", ["raw", "pem"])
def test_hs256_signed_with_the_public_key_is_refused(ring, verifier, encoding):
    public = ring.public_key(ring.active_kid)
    if encoding == "raw":
        secret = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    else:
        secret = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = (
        f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': ring.active_kid})}.{segment(valid_payload())}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert refusal(verifier, f"{signing_input}.{b64url(mac)}").details["reason"] == "bad_algorithm"


def test_unknown_kid_is_refused(ring, verifier):
    _, key = ring.signing_key()
    token = jwt.encode(valid_payload(), key, algorithm="EdDSA", headers={"kid": "k_unknown"})
    assert refusal(verifier, token).details["reason"] == "unknown_key"


def test_token_without_kid_is_refused(ring, verifier):
    _, key = ring.signing_key()
    assert (
        refusal(verifier, jwt.encode(valid_payload(), key, algorithm="EdDSA")).details["reason"]
        == "unknown_key"
    )


@pytest.mark.parametrize(
    "garbage", ["x", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9", "\u00e9.\u00e9.\u00e9", "a" * 9000]
)
def test_garbage_is_refused_as_malformed(verifier, garbage):
    assert refusal(verifier, garbage).details["reason"] == "malformed"


def test_token_with_empty_payload_and_signature_is_refused(ring, verifier):
    empty = f"{segment({'alg': 'EdDSA', 'kid': ring.active_kid})}.."
    assert refusal(verifier, empty).details["reason"] == "bad_signature"


# --- audience, issuer, claims ------------------------------------------------------------------
def test_wrong_audience_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(aud="some-other-service"))
    assert refusal(verifier, token).details["reason"] == "wrong_audience"


def test_audience_list_containing_ours_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(aud=["rayflow-reasoningbank", "other"]))
    assert refusal(verifier, token).details["reason"] == "wrong_audience"


def test_wrong_issuer_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(iss="someone-else"))
    assert refusal(verifier, token).details["reason"] == "wrong_issuer"


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_token_missing_a_required_claim_is_refused(ring, verifier, claim):
    token = sign_with_ring(ring, valid_payload(**{claim: None}))
    assert refusal(verifier, token).details["reason"] == "missing_claim"


@pytest.mark.parametrize(
    "pattern", ["acme/../startup", "a//b", "swarm/*/x", "\uff53warm", "swarm\u2215x", "Swarm/*"]
)
def test_signed_token_with_a_namespace_trick_is_refused(ring, verifier, pattern):
    token = sign_with_ring(ring, valid_payload(namespaces=[pattern]))
    assert refusal(verifier, token).details["reason"] == "malformed_claims"


def test_signed_token_with_an_unknown_scope_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(scope="reasoningbank:read superuser"))
    assert refusal(verifier, token).details["reason"] == "malformed_claims"


def test_signed_token_with_a_lifetime_above_the_maximum_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(exp=int(START) + 7200))
    assert refusal(verifier, token).details["reason"] == "lifetime_too_long"


def test_signed_token_expiring_before_it_was_issued_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(exp=int(START) - 1))
    assert refusal(verifier, token).details["reason"] == "lifetime_too_long"


def test_signed_token_with_a_fractional_expiry_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(exp=START + 100.5))
    assert refusal(verifier, token).details["reason"] == "malformed_claims"


def test_signed_token_with_a_non_string_subject_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(sub=12))
    assert refusal(verifier, token).details["reason"] == "malformed_claims"


def test_signed_token_with_a_not_before_claim_is_refused(ring, verifier):
    token = sign_with_ring(ring, valid_payload(nbf=int(START)))
    assert refusal(verifier, token).details["reason"] == "malformed_claims"


# --- time --------------------------------------------------------------------------------------
def test_expired_token_is_refused(token, verifier, clock):
    clock.now = START + 300 + 5
    assert refusal(verifier, token).details["reason"] == "expired"


def test_token_just_inside_the_leeway_after_expiry_is_accepted(token, verifier, clock):
    clock.now = START + 300 + 4
    assert verifier.verify(token).sub == "sbx-1"


def test_token_issued_in_the_future_is_refused(issuer, verifier, clock):
    clock.now = START + 60
    early = issuer.issue("sbx-1", "acme", ["*"], [Scope.READ])
    clock.now = START
    assert refusal(verifier, early).details["reason"] == "not_yet_valid"


def test_cache_hit_still_refuses_a_token_that_expired_since(token, verifier, clock):
    verifier.verify(token)
    assert verifier.cached_tokens == 1
    clock.now = START + 400
    assert refusal(verifier, token).details["reason"] == "expired"
    assert verifier.cached_tokens == 0


# --- keys --------------------------------------------------------------------------------------
def test_tokens_of_the_previous_key_verify_after_rotation(issuer, ring, verifier):
    old_token = issuer.issue("sbx-1", "acme", ["*"], [Scope.READ])
    ring.rotate()
    new_token = issuer.issue("sbx-2", "acme", ["*"], [Scope.READ])
    assert verifier.verify(old_token).sub == "sbx-1"
    assert verifier.verify(new_token).sub == "sbx-2"


def test_tokens_of_a_retired_key_are_refused_even_when_cached(issuer, ring, verifier):
    old_kid = ring.active_kid
    old_token = issuer.issue("sbx-1", "acme", ["*"], [Scope.READ])
    verifier.verify(old_token)
    ring.rotate()
    ring.retire(old_kid)
    assert refusal(verifier, old_token).details["reason"] == "unknown_key"


def test_tokens_of_a_retired_key_are_refused_when_not_cached(issuer, ring, clock):
    old_kid = ring.active_kid
    old_token = issuer.issue("sbx-1", "acme", ["*"], [Scope.READ])
    ring.rotate()
    ring.retire(old_kid)
    fresh = TokenVerifier(ring, revocations=None, clock=clock)
    assert refusal(fresh, old_token).details["reason"] == "unknown_key"


def test_verifier_with_another_ring_refuses_our_tokens(token, clock):
    stranger = TokenVerifier(KeyRing.ephemeral(), revocations=None, clock=clock)
    assert refusal(stranger, token).details["reason"] == "unknown_key"


# --- cache -------------------------------------------------------------------------------------
def test_cache_is_bounded_and_drops_the_least_recently_used(issuer, ring, clock):
    verifier = TokenVerifier(ring, revocations=None, clock=clock, cache_size=2)
    tokens = [issuer.issue(f"sbx-{i}", "acme", ["*"], [Scope.READ]) for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert verifier.cached_tokens == 2


def test_verifier_without_cache_still_verifies(token, ring, clock):
    verifier = TokenVerifier(ring, revocations=None, clock=clock, cache_size=0)
    assert verifier.verify(token).sub == verifier.verify(token).sub == "sbx-1"
    assert verifier.cached_tokens == 0


def test_verifier_refuses_a_configuration_without_audience(ring):
    with pytest.raises(ConfigError):
        TokenVerifier(ring, audience="", revocations=None)
