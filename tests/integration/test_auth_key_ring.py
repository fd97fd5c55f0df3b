"""Specification of the key ring file: owner-only permissions, persistence of rotation and retirement."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from rayflow.auth import KeyRing, Scope, TokenIssuer, TokenVerifier
from rayflow.errors import AuthError, ConfigError, InvalidInputError, NotFoundError

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ring_path(tmp_path: Path) -> Path:
    return tmp_path / "auth" / "signing-keys.json"


def test_new_ring_file_is_owner_only_in_an_owner_only_directory(ring_path):
    KeyRing.load_or_create(ring_path)
    assert _mode(ring_path) == 0o600
    assert _mode(ring_path.parent) == 0o700


def test_loading_again_returns_the_same_keys(ring_path):
    first = KeyRing.load_or_create(ring_path)
    again = KeyRing.load_or_create(ring_path)
    assert again.active_kid == first.active_kid
    assert again.kids() == first.kids()


def test_ring_file_readable_by_others_is_refused_with_a_chmod_hint(ring_path):
    KeyRing.load_or_create(ring_path)
    ring_path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyRing.load_or_create(ring_path)


def test_rotation_is_persisted_and_keeps_older_keys(ring_path):
    ring = KeyRing.load_or_create(ring_path)
    old_kid = ring.active_kid
    new_kid = ring.rotate()
    reloaded = KeyRing.load_or_create(ring_path)
    assert reloaded.active_kid == new_kid
    assert reloaded.kids() == [old_kid, new_kid]
    assert _mode(ring_path) == 0o600


def test_retirement_is_persisted(ring_path):
    ring = KeyRing.load_or_create(ring_path)
    old_kid = ring.active_kid
    ring.rotate()
    ring.retire(old_kid)
    assert old_kid not in KeyRing.load_or_create(ring_path)


def test_active_key_cannot_be_retired(ring_path):
    ring = KeyRing.load_or_create(ring_path)
    with pytest.raises(InvalidInputError, match="rotate first"):
        ring.retire(ring.active_kid)


def test_retiring_an_unknown_kid_is_not_found(ring_path):
    with pytest.raises(NotFoundError):
        KeyRing.load_or_create(ring_path).retire("k_missing")


def test_changes_by_two_instances_of_one_file_are_both_kept(ring_path):
    first = KeyRing.load_or_create(ring_path)
    second = KeyRing.load_or_create(ring_path)
    kid_a = first.rotate()
    kid_b = second.rotate()
    assert {kid_a, kid_b} <= set(KeyRing.load_or_create(ring_path).kids())


def test_reload_picks_up_a_rotation_made_elsewhere(ring_path):
    hub = KeyRing.load_or_create(ring_path)
    new_kid = KeyRing.load_or_create(ring_path).rotate()
    assert new_kid not in hub
    hub.reload()
    assert hub.active_kid == new_kid


def test_tokens_of_a_reloaded_ring_verify_across_instances(ring_path):
    issuing = KeyRing.load_or_create(ring_path)
    token = TokenIssuer(issuing).issue("sbx-1", "acme", ["*"], [Scope.READ])
    verifying = TokenVerifier(KeyRing.load_or_create(ring_path), revocations=None)
    assert verifying.verify(token).sub == "sbx-1"


def test_token_of_a_key_retired_in_the_file_is_refused_after_reload(ring_path):
    ring = KeyRing.load_or_create(ring_path)
    old_kid = ring.active_kid
    token = TokenIssuer(ring).issue("sbx-1", "acme", ["*"], [Scope.READ])
    verifier = TokenVerifier(ring, revocations=None)
    verifier.verify(token)
    other = KeyRing.load_or_create(ring_path)
    other.rotate()
    other.retire(old_kid)
    ring.reload()
    with pytest.raises(AuthError, match="retired"):
        verifier.verify(token)


def test_ring_file_with_a_foreign_version_is_refused(ring_path):
    KeyRing.load_or_create(ring_path)
    doc = json.loads(ring_path.read_text())
    doc["version"] = 99
    ring_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="version"):
        KeyRing.load_or_create(ring_path)


def test_ring_file_naming_a_missing_active_key_is_refused(ring_path):
    KeyRing.load_or_create(ring_path)
    doc = json.loads(ring_path.read_text())
    doc["active"] = "k_missing"
    ring_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="active"):
        KeyRing.load_or_create(ring_path)


def test_private_keys_never_appear_in_repr(ring_path):
    ring = KeyRing.load_or_create(ring_path)
    secret = json.loads(ring_path.read_text())["keys"][ring.active_kid]["private_key"]
    assert secret not in repr(ring)
