"""Where a hub is: ``HubEndpoint``, its QUIC address, the CA to pin and the certificate name to check.

One typed value from the hub to everything that connects to it: the hub replica hands it out
(Ray pickles it), the swarm plans sandboxes with it, clients are built from it, and a sandbox reads
it back from the ``RAYFLOW_HUB_*`` environment variables. The token that authorizes calls is not
part of it: a hub has one endpoint but hands out many tokens (``RAYFLOW_HUB_TOKEN`` travels
separately). Standard library only, since the guest reads it inside sandboxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError

HOST_ENV = "RAYFLOW_HUB_HOST"
PORT_ENV = "RAYFLOW_HUB_PORT"
#: The CA certificate: PEM text, or the path of a PEM file.
CA_ENV = "RAYFLOW_HUB_CA"
#: Optional: the name the hub's certificate is checked against.
SERVER_NAME_ENV = "RAYFLOW_HUB_SERVER_NAME"
#: Not read here: the token a sandbox's calls carry.
TOKEN_ENV = "RAYFLOW_HUB_TOKEN"
#: Not read here, optional: seconds an agent's memory client waits for a connection to the hub.
CONNECT_TIMEOUT_ENV = "RAYFLOW_HUB_CONNECT_TIMEOUT_S"
#: The variables :meth:`HubEndpoint.from_env` cannot do without.
REQUIRED_ENV = (HOST_ENV, PORT_ENV, CA_ENV)
#: The name every hub certificate covers, whatever address a client dials.
DEFAULT_SERVER_NAME = "localhost"

_PEM_MARKER = b"-----BEGIN"


@dataclass(frozen=True)
class HubEndpoint:
    """A hub's QUIC address, the CA certificate clients pin, its region and the name to check.

    Validated on construction: a non-empty host, a port in 1..65535, a PEM CA certificate and a
    non-empty server name, else :class:`~rayflow.errors.ConfigError`.
    """

    host: str
    port: int
    ca_pem: bytes
    region: str = ""
    server_name: str = DEFAULT_SERVER_NAME

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError("a hub endpoint needs a host")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"a hub endpoint's port must be 1..65535, not {str(self.port)[:20]!r}")
        if not isinstance(self.ca_pem, bytes) or _PEM_MARKER not in self.ca_pem:
            raise ConfigError("a hub endpoint needs the hub's CA certificate in PEM form")
        if not isinstance(self.region, str):
            raise ConfigError("a hub endpoint's region is a string")
        if not isinstance(self.server_name, str) or not self.server_name.strip():
            raise ConfigError("a hub endpoint needs a server name to check the certificate against")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # --- environment ------------------------------------------------------------------------
    def to_env(self) -> dict[str, str]:
        """The ``RAYFLOW_HUB_*`` variables (all but the token) that :meth:`from_env` reads back."""
        return {
            HOST_ENV: self.host,
            PORT_ENV: str(self.port),
            CA_ENV: self.ca_pem.decode(),
            SERVER_NAME_ENV: self.server_name,
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HubEndpoint:
        """The endpoint the ``RAYFLOW_HUB_*`` variables name; ConfigError if incomplete or unusable.

        ``RAYFLOW_HUB_CA`` is PEM text when it holds a ``-----BEGIN`` marker (the certificate
        itself can travel in the environment, with no file to place), otherwise the path of a PEM
        file. ``RAYFLOW_HUB_SERVER_NAME`` is optional (default ``localhost``). A ConfigError for
        missing variables names every one of them in ``details["missing"]``.
        """
        missing = [name for name in REQUIRED_ENV if not env.get(name, "").strip()]
        if missing:
            names = ", ".join(missing)
            raise ConfigError(f"no hub configured (missing {names})", missing=names)
        try:
            port = int(env[PORT_ENV])
        except ValueError:
            raise ConfigError(f"{PORT_ENV} must be a port number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"{PORT_ENV} must be a port number", port=port)
        return cls(
            host=env[HOST_ENV].strip(),
            port=port,
            ca_pem=_read_ca(env[CA_ENV]),
            server_name=env.get(SERVER_NAME_ENV, "").strip() or DEFAULT_SERVER_NAME,
        )

    # --- plain values -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values (the CA as PEM text), for JSON; :meth:`from_dict` reads them back."""
        return {
            "host": self.host,
            "port": self.port,
            "ca_pem": self.ca_pem.decode(),
            "region": self.region,
            "server_name": self.server_name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HubEndpoint:
        """The endpoint ``data`` describes (as :meth:`to_dict` gives it; the CA as text or bytes)."""
        missing = [name for name in ("host", "port", "ca_pem") if name not in data]
        if missing:
            raise ConfigError(f"a hub endpoint needs {', '.join(missing)}", missing=", ".join(missing))
        ca_pem = data["ca_pem"]
        return cls(
            host=data["host"],
            port=data["port"],
            ca_pem=ca_pem.encode() if isinstance(ca_pem, str) else ca_pem,
            region=data.get("region", ""),
            server_name=data.get("server_name", DEFAULT_SERVER_NAME),
        )


def _read_ca(value: str) -> bytes:
    """``RAYFLOW_HUB_CA`` as PEM bytes: the text itself, or the contents of the file it names."""
    if _PEM_MARKER.decode() in value:
        return value.strip().encode() + b"\n"
    try:
        pem = Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{CA_ENV} names no readable PEM file: {exc.strerror}", path=value) from None
    if _PEM_MARKER not in pem:
        raise ConfigError(f"{CA_ENV} names a file that holds no PEM certificate", path=value)
    return pem
