"""What a sandbox is asked to be, and what running a command in it gave back.

Plain frozen records shared by every backend (Docker, Linux namespaces, plain process, E2B), so a
caller describes a sandbox once and can move it between backends. Validation happens here, at
construction, so a wrong limit fails before any container exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from rayflow.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox; ``None`` means "backend default"."""

    #: CPU cores the sandbox may use (0.5 = half a core).
    cpus: float | None = 1.0
    #: Memory in bytes; swap is set equal so memory cannot spill to disk.
    memory_bytes: int | None = 512 * MIB
    #: Maximum number of processes/threads (stops fork bombs).
    pids: int | None = 256
    #: Size of the writable scratch space (tmpfs) in bytes.
    disk_bytes: int | None = 256 * MIB
    #: Wall-clock lifetime of the whole sandbox, in seconds.
    wall_time_s: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("cpus", "memory_bytes", "pids", "disk_bytes", "wall_time_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ConfigError(f"limits.{name} must be positive, not {value!r}")
        if self.memory_bytes is not None and self.memory_bytes < 6 * MIB:
            raise ConfigError("limits.memory_bytes below 6 MiB cannot start a process")


class NetworkMode(str, Enum):
    """How much of the network a sandbox sees."""

    #: No network interface but loopback.
    NONE = "none"
    #: Only the ReasoningBank hub's address and port.
    HUB_ONLY = "hub-only"
    #: Only the listed host:port pairs.
    ALLOW_LIST = "allow-list"


@dataclass(frozen=True)
class Endpoint:
    """A host and port a sandbox may reach."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"invalid endpoint {self.host!r}:{self.port!r}")


@dataclass(frozen=True)
class NetworkPolicy:
    """Network access of a sandbox. Sandboxes never reach each other, whatever the mode."""

    mode: NetworkMode = NetworkMode.NONE
    #: For ``HUB_ONLY``: the hub; for ``ALLOW_LIST``: every reachable endpoint.
    allow: tuple[Endpoint, ...] = ()
    #: For ``ALLOW_LIST``: the first endpoint is the hub (its address is given to the sandbox as
    #: ``RAYFLOW_HUB_HOST``/``PORT``, as in ``HUB_ONLY``), the others are further services.
    hub_first: bool = False

    def __post_init__(self) -> None:
        mode = NetworkMode(self.mode)
        object.__setattr__(self, "mode", mode)
        if mode is NetworkMode.NONE and self.allow:
            raise ConfigError("network mode 'none' takes no endpoints")
        if mode is NetworkMode.HUB_ONLY and len(self.allow) != 1:
            raise ConfigError("network mode 'hub-only' takes exactly the hub's endpoint")
        if mode is NetworkMode.ALLOW_LIST and not self.allow:
            raise ConfigError("network mode 'allow-list' needs at least one endpoint")
        if self.hub_first and mode is not NetworkMode.ALLOW_LIST:
            raise ConfigError("hub_first only applies to network mode 'allow-list'")

    @property
    def hub(self) -> Endpoint | None:
        """The hub's endpoint, when the policy names one."""
        if self.mode is NetworkMode.HUB_ONLY or self.hub_first:
            return self.allow[0]
        return None

    @classmethod
    def none(cls) -> NetworkPolicy:
        return cls(NetworkMode.NONE)

    @classmethod
    def hub_only(cls, host: str, port: int) -> NetworkPolicy:
        return cls(NetworkMode.HUB_ONLY, (Endpoint(host, port),))

    @classmethod
    def hub_and(cls, host: str, port: int, *others: tuple[str, int]) -> NetworkPolicy:
        """The hub plus further endpoints (a model API, a package mirror)."""
        endpoints = (Endpoint(host, port), *(Endpoint(h, p) for h, p in others))
        if not others:
            return cls(NetworkMode.HUB_ONLY, endpoints)
        return cls(NetworkMode.ALLOW_LIST, endpoints, hub_first=True)

    @classmethod
    def allow_list(cls, *endpoints: tuple[str, int]) -> NetworkPolicy:
        return cls(NetworkMode.ALLOW_LIST, tuple(Endpoint(h, p) for h, p in endpoints))


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox (read-only unless said otherwise)."""

    source: str
    target: str
    read_only: bool = True


#: Label every rayflow sandbox carries, naming its owner, so leftovers can be found and reaped.
OWNER_LABEL = "rayflow.owner"


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one sandbox."""

    #: Image name (Docker, E2B template); ignored by backends that run the host's filesystem.
    image: str = "rayflow-sandbox:latest"
    limits: Limits = field(default_factory=Limits)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    #: Free-form labels; ``OWNER_LABEL`` is added by the backend from ``owner``.
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Who owns the sandbox (worker id, job id); used to find and reap leftovers.
    owner: str = ""
    #: Default timeout of one exec, in seconds.
    exec_timeout_s: float = 300.0
    #: Working directory inside the sandbox.
    workdir: str = "/workspace"

    def __post_init__(self) -> None:
        if not self.owner:
            raise ConfigError("a sandbox needs an owner (worker or job id) so leftovers can be reaped")
        if self.exec_timeout_s <= 0:
            raise ConfigError("exec_timeout_s must be positive")
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str) or "=" in key or "\0" in value:
                raise ConfigError(f"invalid environment variable {key!r}")
        if not self.workdir.startswith("/"):
            raise ConfigError("workdir must be an absolute path inside the sandbox")


class KillReason(str, Enum):
    """Why a command did not end on its own."""

    TIMEOUT = "timeout"
    OOM = "oom"
    PIDS = "pids"
    OUTPUT_LIMIT = "output-limit"
    SANDBOX_DESTROYED = "sandbox-destroyed"


@dataclass(frozen=True)
class ExecResult:
    """How one command in a sandbox ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    #: Set when the command was killed rather than exiting by itself.
    killed: KillReason | None = None
    #: True when output beyond the capture limit was dropped.
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None


@dataclass(frozen=True)
class SandboxStats:
    """Resource usage of a sandbox so far (fields a backend cannot measure are ``None``)."""

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    pids: int | None = None
    disk_bytes: int | None = None
