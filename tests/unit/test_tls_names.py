"""What a hub's certificate names, and the name a client checks: the bound address, then localhost."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from rayflow.rpc.tls import certificate_names, ensure_server_tls, verified_name


def test_the_certificate_names_the_node_address_next_to_localhost(tmp_path: Path) -> None:
    files = ensure_server_tls(tmp_path / "tls", ["100.90.1.10"])
    dns_names, ips = certificate_names(files.server_cert_path.read_bytes())
    assert dns_names == ["localhost"]
    assert set(ips) == {"127.0.0.1", "::1", "100.90.1.10"}


def test_a_new_node_address_reissues_the_certificate_without_the_old_one_under_the_same_ca(
    tmp_path: Path,
) -> None:
    first = ensure_server_tls(tmp_path / "tls", ["100.90.1.10"])
    second = ensure_server_tls(tmp_path / "tls", ["100.90.2.11"])
    assert second.ca_pem == first.ca_pem
    pem = second.server_cert_path.read_bytes()
    _, ips = certificate_names(pem)
    assert "100.90.2.11" in ips and "100.90.1.10" not in ips
    x509.load_pem_x509_certificate(pem).verify_directly_issued_by(
        x509.load_pem_x509_certificate(second.ca_pem)
    )


def test_back_on_loopback_the_certificate_drops_the_node_address(tmp_path: Path) -> None:
    ensure_server_tls(tmp_path / "tls", ["100.90.1.10"])
    again = ensure_server_tls(tmp_path / "tls", ["127.0.0.1"])
    assert set(certificate_names(again.server_cert_path.read_bytes())[1]) == {"127.0.0.1", "::1"}


def test_unchanged_names_keep_the_certificate(tmp_path: Path) -> None:
    first = ensure_server_tls(tmp_path / "tls", ["100.90.1.10", "hub.internal"]).server_cert_path.read_bytes()
    again = ensure_server_tls(tmp_path / "tls", ["hub.internal", "100.90.1.10"]).server_cert_path.read_bytes()
    assert again == first


def test_a_wildcard_bind_is_not_a_name(tmp_path: Path) -> None:
    files = ensure_server_tls(tmp_path / "tls", ["0.0.0.0", "::"])
    assert set(certificate_names(files.server_cert_path.read_bytes())[1]) == {"127.0.0.1", "::1"}


def test_clients_check_a_real_address_as_itself_and_anything_else_as_localhost() -> None:
    assert verified_name("100.90.1.10") == "100.90.1.10"
    assert verified_name("fd00::7") == "fd00::7"
    assert verified_name("127.0.0.1") == "localhost"
    assert verified_name("::1") == "localhost"
    assert verified_name("0.0.0.0") == "localhost"
    assert verified_name("hub.internal") == "localhost"
