"""TLS material for the RPC server: a private CA and a server certificate it signs, kept on disk.

Why a private CA: hubs run on machines without public DNS names, and sandboxes must still verify
whom they talk to. On first start a CA and a server certificate are generated into a state
directory; clients pin the CA (its PEM is handed to them with their token), so verification stays
``CERT_REQUIRED`` with no public trust store involved. Later starts reuse the files; the server
certificate alone is reissued when its names differ from what the server is asked to serve (a hub
that comes back on another node address must not keep naming the old one), when it nears expiry,
or when it was not signed by the current CA. Reissuing the CA itself (only
when its files are missing or unreadable) invalidates every pinned client, so it never happens
silently otherwise.

Keys are ECDSA P-256 (aioquic signs with ECDSA_SECP256R1_SHA256). Private keys are written 0600
through a temporary file and an atomic rename, so a crash never leaves a half-written key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rayflow.errors import ConfigError

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
#: Names every server certificate covers, so loopback clients always verify.
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=365)
#: A server certificate this close to expiry is reissued at start.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Certificates start this long before "now" so a peer with a slightly slow clock accepts them.
BACKDATE = datetime.timedelta(minutes=5)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ServerTlsFiles:
    """Paths of the server's TLS material and the CA certificate clients pin."""

    state_dir: Path
    ca_cert_path: Path
    server_cert_path: Path
    server_key_path: Path
    ca_pem: bytes


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file in the same dir + rename)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _write_public(path: Path, data: bytes) -> None:
    _write_private(path, data)
    os.chmod(path, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rayflow"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("rayflow hub CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: list[str],
    ips: list[IPAddress],
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(name) for name in dns_names] + [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else "rayflow hub"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(state_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The stored CA, or None when it is missing, unreadable or its key does not match."""
    try:
        cert = x509.load_pem_x509_certificate((state_dir / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((state_dir / CA_KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _server_cert_usable(
    state_dir: Path,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ips: list[IPAddress],
    now: datetime.datetime,
) -> bool:
    """True when the stored server certificate is signed by the CA, covers the names and is fresh."""
    try:
        cert = x509.load_pem_x509_certificate((state_dir / SERVER_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((state_dir / SERVER_KEY_FILE).read_bytes(), password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < now or cert.not_valid_before_utc > now:
        return False
    have_names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return {name.lower() for name in dns_names} == have_names and set(ips) == have_ips


def _split_names(names: Iterable[str]) -> tuple[list[str], list[IPAddress]]:
    """Separate IP literals from DNS names, keeping order and dropping duplicates.

    A wildcard address (``0.0.0.0``, ``::``) is what a server binds to, never what a client dials,
    so it is left out.
    """
    dns_names: list[str] = []
    ips: list[IPAddress] = []
    for raw in [*DEFAULT_DNS_NAMES, *DEFAULT_IP_ADDRESSES, *names]:
        name = raw.strip()
        if not name:
            raise ConfigError("an empty name cannot go into a certificate")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if name.lower() not in (n.lower() for n in dns_names):
                dns_names.append(name)
            continue
        if ip not in ips and not ip.is_unspecified:
            ips.append(ip)
    return dns_names, ips


def ensure_server_tls(
    state_dir: str | os.PathLike[str],
    names: Iterable[str] = (),
    *,
    now: datetime.datetime | None = None,
) -> ServerTlsFiles:
    """Create or reuse the CA and the server certificate in ``state_dir``.

    ``names`` are extra DNS names or IP addresses the server certificate must cover, on top of
    localhost, 127.0.0.1 and ::1 (an RPC server passes the address it binds, so a hub on a node
    address ``10.0.3.7`` gets an IP SAN for it). The certificate names exactly these: a stored one
    naming more or fewer is reissued under the same CA, so pinned clients keep working.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = now or _utcnow()
    dns_names, ips = _split_names(names)

    ca = _load_ca(directory)
    if ca is None:
        ca_cert, ca_key = _new_ca(now)
        _write_private(directory / CA_KEY_FILE, _key_pem(ca_key))
        _write_public(directory / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_cert, ca_key = ca

    if not _server_cert_usable(directory, ca_cert, dns_names, ips, now):
        cert, key = _new_server_cert(ca_cert, ca_key, dns_names, ips, now)
        _write_private(directory / SERVER_KEY_FILE, _key_pem(key))
        _write_public(directory / SERVER_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))

    return ServerTlsFiles(
        state_dir=directory,
        ca_cert_path=directory / CA_CERT_FILE,
        server_cert_path=directory / SERVER_CERT_FILE,
        server_key_path=directory / SERVER_KEY_FILE,
        ca_pem=(directory / CA_CERT_FILE).read_bytes(),
    )


def verified_name(host: str) -> str:
    """The name a client checks the server certificate against when it dials ``host``.

    A specific non-loopback IP address is checked as itself (it is in the certificate when the
    server binds it, see :func:`ensure_server_tls`); loopback, wildcard and DNS hosts keep
    ``localhost``, which every certificate covers.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return DEFAULT_DNS_NAMES[0]
    return DEFAULT_DNS_NAMES[0] if ip.is_loopback or ip.is_unspecified else str(ip)


def certificate_names(cert_pem: bytes) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses (as strings) in a PEM certificate's SAN, for checks and display."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName)), [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]
