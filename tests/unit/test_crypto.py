"""Specification of per-tenant encryption: the cipher, the in-memory key provider and the cache."""

from __future__ import annotations

import pytest

from rayflow.errors import EncryptionError, InvalidInputError, UnknownTenantError
from rayflow.memory.crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    CipherCache,
    InMemoryKeyProvider,
    KeyProvider,
    TenantCipher,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
AAD = b"item-1|title"


def test_encrypt_then_decrypt_returns_the_text() -> None:
    cipher = TenantCipher(KEY_A)
    assert cipher.decrypt(cipher.encrypt("héllo wörld", AAD), AAD) == "héllo wörld"


def test_empty_text_round_trips() -> None:
    cipher = TenantCipher(KEY_A)
    assert cipher.decrypt(cipher.encrypt("", AAD), AAD) == ""


def test_blob_is_version_byte_nonce_and_sealed_text() -> None:
    blob = TenantCipher(KEY_A).encrypt("abc", AAD)
    assert blob[0] == 1
    assert len(blob) == 1 + NONCE_BYTES + len("abc") + TAG_BYTES


def test_same_text_encrypts_differently_each_time() -> None:
    cipher = TenantCipher(KEY_A)
    assert cipher.encrypt("same", AAD) != cipher.encrypt("same", AAD)


@pytest.mark.parametrize("position", [1, 1 + NONCE_BYTES, -1], ids=["nonce", "ciphertext", "tag"])
def test_tampered_blob_is_rejected(position: int) -> None:
    cipher = TenantCipher(KEY_A)
    blob = bytearray(cipher.encrypt("secret text", AAD))
    blob[position] ^= 0x01
    with pytest.raises(EncryptionError):
        cipher.decrypt(bytes(blob), AAD)


def test_unknown_version_byte_is_rejected() -> None:
    cipher = TenantCipher(KEY_A)
    blob = cipher.encrypt("x", AAD)
    with pytest.raises(EncryptionError, match="version"):
        cipher.decrypt(b"\x02" + blob[1:], AAD)


def test_truncated_blob_is_rejected() -> None:
    cipher = TenantCipher(KEY_A)
    with pytest.raises(EncryptionError):
        cipher.decrypt(cipher.encrypt("x", AAD)[:10], AAD)


def test_wrong_aad_is_rejected_so_a_ciphertext_cannot_move_to_another_field() -> None:
    cipher = TenantCipher(KEY_A)
    blob = cipher.encrypt("title text", b"item-1|title")
    with pytest.raises(EncryptionError):
        cipher.decrypt(blob, b"item-1|content")
    with pytest.raises(EncryptionError):
        cipher.decrypt(blob, b"item-2|title")


def test_wrong_key_is_rejected() -> None:
    blob = TenantCipher(KEY_A).encrypt("tenant a data", AAD)
    with pytest.raises(EncryptionError):
        TenantCipher(KEY_B).decrypt(blob, AAD)


def test_cipher_refuses_a_key_of_the_wrong_size() -> None:
    with pytest.raises(EncryptionError):
        TenantCipher(b"short")


def test_cipher_repr_hides_the_key() -> None:
    text = repr(TenantCipher(KEY_A))
    assert repr(KEY_A) not in text and KEY_A.hex() not in text


def test_in_memory_provider_raises_unknown_tenant_for_a_missing_key() -> None:
    with pytest.raises(UnknownTenantError):
        InMemoryKeyProvider().get_key("nobody")


def test_in_memory_create_key_is_idempotent() -> None:
    provider = InMemoryKeyProvider()
    first = provider.create_key("acme")
    assert len(first) == KEY_BYTES
    assert provider.create_key("acme") == first
    assert provider.get_key("acme") == first


def test_in_memory_provider_lists_tenants_sorted_and_knows_who_has_a_key() -> None:
    provider = InMemoryKeyProvider()
    provider.create_key("zeta")
    provider.create_key("alpha")
    assert provider.tenants() == ["alpha", "zeta"]
    assert provider.has_key("alpha") and not provider.has_key("beta")


def test_in_memory_provider_serves_injected_keys() -> None:
    provider = InMemoryKeyProvider({"acme": KEY_A})
    assert provider.get_key("acme") == KEY_A
    assert provider.create_key("acme") == KEY_A


def test_in_memory_provider_rejects_an_injected_key_of_the_wrong_size() -> None:
    with pytest.raises(InvalidInputError):
        InMemoryKeyProvider({"acme": b"too short"})


def test_empty_tenant_name_is_rejected() -> None:
    with pytest.raises(InvalidInputError):
        InMemoryKeyProvider().create_key("  ")


def test_in_memory_provider_repr_hides_keys() -> None:
    provider = InMemoryKeyProvider({"acme": KEY_A})
    assert KEY_A.hex() not in repr(provider) and repr(KEY_A) not in repr(provider)


def test_in_memory_provider_satisfies_the_key_provider_protocol() -> None:
    assert isinstance(InMemoryKeyProvider(), KeyProvider)


def test_cipher_cache_returns_the_same_cipher_for_a_tenant() -> None:
    cache = CipherCache(InMemoryKeyProvider({"acme": KEY_A}))
    assert cache.cipher("acme") is cache.cipher("acme")


def test_cipher_cache_ciphers_use_the_tenant_key() -> None:
    provider = InMemoryKeyProvider({"acme": KEY_A, "globex": KEY_B})
    cache = CipherCache(provider)
    blob = cache.cipher("acme").encrypt("hello", AAD)
    assert TenantCipher(KEY_A).decrypt(blob, AAD) == "hello"
    with pytest.raises(EncryptionError):
        cache.cipher("globex").decrypt(blob, AAD)


def test_cipher_cache_raises_unknown_tenant_without_a_key() -> None:
    with pytest.raises(UnknownTenantError):
        CipherCache(InMemoryKeyProvider()).cipher("nobody")


def test_cipher_cache_forget_builds_a_new_cipher_next_time() -> None:
    cache = CipherCache(InMemoryKeyProvider({"acme": KEY_A}))
    first = cache.cipher("acme")
    cache.forget("acme")
    assert cache.cipher("acme") is not first
