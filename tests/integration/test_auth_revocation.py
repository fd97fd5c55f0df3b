"""Specification of the persisted revocation list and of its use by the token verifier."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import apsw
import pytest

from rayflow.auth import KeyRing, RevocationList, Scope, TokenIssuer, TokenVerifier
from rayflow.errors import AuthError, ConfigError, InvalidInputError
from tests.clock_support import SteppedClock

pytestmark = pytest.mark.integration

NOW = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "revocations.db"


# --- the list itself ---------------------------------------------------------------------------
def test_revoked_id_is_reported_revoked(db_path):
    revocations = RevocationList(db_path)
    revocations.revoke("jti-1", NOW + 300, "sandbox torn down")
    assert revocations.is_revoked("jti-1")
    assert not revocations.is_revoked("jti-2")


def test_revocations_survive_a_new_instance(db_path):
    first = RevocationList(db_path)
    first.revoke("jti-1", NOW + 300, "leaked")
    first.close()
    assert RevocationList(db_path).is_revoked("jti-1")


def test_second_instance_sees_a_revocation_after_refresh(db_path):
    reader = RevocationList(db_path, poll_interval_s=3600)
    writer = RevocationList(db_path)
    writer.revoke("jti-1", NOW + 300, "leaked")
    assert "jti-1" not in reader
    reader.refresh()
    assert reader.is_revoked("jti-1")


def test_is_revoked_refreshes_on_its_own_once_the_poll_interval_passed(db_path):
    monotonic = SteppedClock(100.0)
    reader = RevocationList(db_path, poll_interval_s=0.5, monotonic=monotonic)
    RevocationList(db_path).revoke("jti-1", NOW + 300, "leaked")
    assert not reader.is_revoked("jti-1")
    monotonic.now += 0.5
    assert reader.is_revoked("jti-1")


def test_revocation_written_by_another_process_is_seen_after_refresh(db_path):
    reader = RevocationList(db_path, poll_interval_s=3600)
    script = textwrap.dedent(
        f"""
        from rayflow.auth import RevocationList
        RevocationList({str(db_path)!r}).revoke("jti-from-child", {NOW + 300}, "revoked by another process")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    reader.refresh()
    assert reader.is_revoked("jti-from-child")


def test_revoking_twice_keeps_one_entry(db_path):
    revocations = RevocationList(db_path)
    revocations.revoke("jti-1", NOW + 300, "first")
    revocations.revoke("jti-1", NOW + 300, "second")
    assert len(revocations) == 1


def test_prune_drops_only_entries_whose_tokens_expired_before_the_grace(db_path):
    revocations = RevocationList(db_path)
    revocations.revoke("long-gone", NOW - 1000, "old")
    revocations.revoke("just-expired", NOW - 10, "recent")
    revocations.revoke("still-valid", NOW + 300, "current")
    assert revocations.prune(NOW, grace_s=300) == 1
    assert not revocations.is_revoked("long-gone")
    assert revocations.is_revoked("just-expired")
    assert revocations.is_revoked("still-valid")
    assert "long-gone" not in RevocationList(db_path)


def test_database_file_is_created_owner_only(db_path):
    RevocationList(db_path)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_database_writable_by_others_is_refused(db_path):
    RevocationList(db_path).close()
    db_path.chmod(0o666)
    with pytest.raises(ConfigError, match="chmod 600"):
        RevocationList(db_path)


def test_database_with_a_newer_schema_is_refused(db_path):
    RevocationList(db_path).close()
    connection = apsw.Connection(str(db_path))
    connection.execute("PRAGMA user_version=99")
    connection.close()
    with pytest.raises(ConfigError, match="schema"):
        RevocationList(db_path)


@pytest.mark.parametrize(
    ("jti", "expires_at"), [("", NOW), ("j" * 300, NOW), ("jti", float("inf")), ("jti", "soon")]
)
def test_malformed_revocations_are_refused(db_path, jti, expires_at):
    with pytest.raises(InvalidInputError):
        RevocationList(db_path).revoke(jti, expires_at, "reason")


# --- with the verifier -------------------------------------------------------------------------
@pytest.fixture
def wall_clock() -> SteppedClock:
    return SteppedClock(NOW)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.ephemeral()


@pytest.fixture
def issuer(ring, wall_clock) -> TokenIssuer:
    return TokenIssuer(ring, clock=wall_clock)


def test_cache_hit_still_refuses_a_token_revoked_after_it_was_cached(db_path, ring, issuer, wall_clock):
    revocations = RevocationList(db_path)
    verifier = TokenVerifier(ring, revocations=revocations, clock=wall_clock)
    token, claims = issuer.issue_with_claims("sbx-1", "acme", ["swarm/*"], [Scope.READ])
    verifier.verify(token)
    assert verifier.cached_tokens == 1
    revocations.revoke(claims.jti, claims.exp, "sandbox torn down")
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.details["reason"] == "revoked"


def test_cache_hit_refuses_a_token_revoked_by_another_instance_after_refresh(
    db_path, ring, issuer, wall_clock
):
    revocations = RevocationList(db_path, poll_interval_s=3600)
    verifier = TokenVerifier(ring, revocations=revocations, clock=wall_clock)
    token, claims = issuer.issue_with_claims("sbx-1", "acme", ["swarm/*"], [Scope.READ])
    verifier.verify(token)
    RevocationList(db_path).revoke(claims.jti, claims.exp, "revoked elsewhere")
    revocations.refresh()
    with pytest.raises(AuthError, match="revoked"):
        verifier.verify(token)


def test_revoked_token_is_refused_by_a_verifier_started_later(db_path, ring, issuer, wall_clock):
    token, claims = issuer.issue_with_claims("sbx-1", "acme", ["swarm/*"], [Scope.READ])
    RevocationList(db_path).revoke(claims.jti, claims.exp, "leaked")
    verifier = TokenVerifier(ring, revocations=RevocationList(db_path), clock=wall_clock)
    with pytest.raises(AuthError, match="revoked"):
        verifier.verify(token)


def test_other_tokens_still_verify_after_one_is_revoked(db_path, ring, issuer, wall_clock):
    revocations = RevocationList(db_path)
    verifier = TokenVerifier(ring, revocations=revocations, clock=wall_clock)
    _, revoked_claims = issuer.issue_with_claims("sbx-1", "acme", ["*"], [Scope.READ])
    kept = issuer.issue("sbx-2", "acme", ["*"], [Scope.READ])
    revocations.revoke(revoked_claims.jti, revoked_claims.exp, "leaked")
    assert verifier.verify(kept).sub == "sbx-2"
