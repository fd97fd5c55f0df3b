"""Specification of the key file: permissions, atomic writes and sharing between instances and processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from rayflow.errors import ConfigError, UnknownTenantError
from rayflow.memory.crypto import KEY_BYTES, CipherCache, FileKeyProvider, KeyProvider, TenantCipher

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    FileKeyProvider(path).create_key("acme")
    assert _mode(path) == 0o600


def test_missing_parent_directory_is_created_with_mode_0700(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keys.json"
    FileKeyProvider(path).create_key("acme")
    assert _mode(path.parent) == 0o700


def test_key_file_readable_by_others_is_refused_with_a_chmod_hint(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    FileKeyProvider(path).create_key("acme")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        FileKeyProvider(path)


def test_key_file_writable_by_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    FileKeyProvider(path).create_key("acme")
    path.chmod(0o620)
    with pytest.raises(ConfigError):
        FileKeyProvider(path)


def test_no_file_is_written_until_a_key_is_created(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    provider = FileKeyProvider(path)
    assert provider.tenants() == []
    assert not path.exists()


def test_keys_survive_a_new_provider_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = FileKeyProvider(path).create_key("acme")
    assert len(key) == KEY_BYTES
    assert FileKeyProvider(path).get_key("acme") == key


def test_create_key_is_idempotent(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys.json")
    assert provider.create_key("acme") == provider.create_key("acme")


def test_unknown_tenant_raises(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys.json")
    provider.create_key("acme")
    with pytest.raises(UnknownTenantError):
        provider.get_key("globex")
    assert not provider.has_key("globex")


def test_two_providers_on_one_file_see_each_others_tenants(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first, second = FileKeyProvider(path), FileKeyProvider(path)
    key_a = first.create_key("acme")
    key_g = second.create_key("globex")
    assert first.get_key("globex") == key_g
    assert second.get_key("acme") == key_a
    assert first.tenants() == second.tenants() == ["acme", "globex"]


def test_second_provider_returns_the_key_the_first_created(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first, second = FileKeyProvider(path), FileKeyProvider(path)
    assert second.create_key("acme") == first.create_key("acme")


def test_two_processes_creating_keys_for_different_tenants_keep_all_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    script = textwrap.dedent(
        """
        import sys
        from rayflow.memory.crypto import FileKeyProvider
        provider = FileKeyProvider(sys.argv[1])
        for i in range(15):
            provider.create_key(f"{sys.argv[2]}-{i}")
        """
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), name]) for name in ("left", "right")
    ]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    tenants = FileKeyProvider(path).tenants()
    assert len(tenants) == 30
    assert {t.split("-")[0] for t in tenants} == {"left", "right"}


def test_file_holds_version_and_a_kid_per_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    provider = FileKeyProvider(path)
    provider.create_key("acme")
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["keys"]["acme"]["kid"] == provider.key_id("acme")


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    provider = FileKeyProvider(path)
    provider.create_key("acme")
    provider.create_key("globex")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", "keys.json.lock"]


def test_lock_file_is_private_too(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    FileKeyProvider(path).create_key("acme")
    assert _mode(tmp_path / "keys.json.lock") == 0o600


def test_provider_repr_shows_no_key_material(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    provider = FileKeyProvider(path)
    key = provider.create_key("acme")
    stored = json.loads(path.read_text())["keys"]["acme"]["key"]
    assert stored not in repr(provider) and key.hex() not in repr(provider)


def test_corrupt_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(ConfigError, match="not valid JSON"):
        FileKeyProvider(path)


def test_key_file_from_a_newer_version_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"version": 99, "keys": {}}).encode())
    os.close(fd)
    with pytest.raises(ConfigError, match="version"):
        FileKeyProvider(path)


def test_file_provider_works_with_the_cipher_cache(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys.json")
    key = provider.create_key("acme")
    assert isinstance(provider, KeyProvider)
    blob = CipherCache(provider).cipher("acme").encrypt("stored text", b"item-9|content")
    assert TenantCipher(key).decrypt(blob, b"item-9|content") == "stored text"


def test_threads_creating_keys_through_two_providers_keep_all_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    providers = [FileKeyProvider(path), FileKeyProvider(path)]

    def create(worker: int) -> None:
        for i in range(10):
            providers[worker % 2].create_key(f"w{worker}-{i}")

    threads = [threading.Thread(target=create, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(FileKeyProvider(path).tenants()) == 40
