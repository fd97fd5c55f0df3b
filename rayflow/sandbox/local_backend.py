"""The ``local`` backend: sandboxes made of Linux namespaces with bubblewrap, no daemon.

Each sandbox is one ``bwrap`` process tree running the in-sandbox runtime
(``python -m rayflow.guest serve``), whose stdin/stdout carry the channel to the host.

Isolation, and why each piece:

* New mount, pid, ipc, uts, cgroup and network namespaces: the sandbox sees its own processes
  only, and no network interface but loopback. A ``hub-only`` or ``allow-list`` sandbox instead
  starts in a network namespace of its own wired to the host by one fenced veth pair
  (:mod:`rayflow.sandbox.local_network`), which lets it reach the allowed endpoints only.
* The host filesystem is *not* bound whole: only ``/usr`` (and the ``/bin``, ``/lib*`` links),
  a short list of harmless ``/etc`` files, the Python installation, and the packages the
  runtime needs (``rayflow``, ``msgpack``, and the hub client's: aioquic and its dependencies)
  under ``/opt/rayflow/lib``. Home directories, the
  repository's state, ``/etc/shadow`` and keys are simply absent. All of it is read-only.
* ``/tmp`` and the workdir are private size-limited tmpfs mounts, gone with the sandbox.
* The runtime runs as a uid of its own (one per sandbox, from a high range no account uses), with
  no capabilities and ``no_new_privs``: it is unprivileged on the host too, not only inside a
  user namespace, and a per-uid limit such as ``RLIMIT_NPROC`` becomes a per-sandbox limit.
* Limits go into a cgroup (v1 or v2) made below the caller's own group: memory with swap, pids,
  CPU quota. Without a usable cgroup, rlimits are applied instead (address space, processes) and
  :attr:`LocalSandbox.limits_applied` says so. Wall time is a timer that destroys the sandbox.

The pure parts (the host layout, the ``bwrap`` argv, the limits plan, the registry records)
are functions of their inputs and tested without a process; :class:`LocalBackend` is the shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox import local_network, netfilter
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.cgroups import Cgroup, CgroupUnavailableError, remove_dirs
from rayflow.sandbox.spec import (
    OWNER_LABEL,
    ExecResult,
    KillReason,
    Limits,
    NetworkMode,
    SandboxSpec,
    SandboxStats,
)
from rayflow.sandbox.wrapper import CgroupJudgedSandbox, KillCounters
from rayflow.wire.guest_commands import GUEST_PACKAGE

#: Where the runtime's packages appear inside the sandbox.
SANDBOX_LIB = "/opt/rayflow/lib"
#: Packages the runtime imports; each is bound read-only under :data:`SANDBOX_LIB`.
RUNTIME_PACKAGES = ("rayflow", "msgpack")
#: Sandbox uids are ``UID_BASE + n``; far above any account or container remapping range.
UID_BASE = 1_700_000_000
UID_SPAN = 100_000_000
#: Host directories bound read-only when they are real directories (symlinks are recreated).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: ``/etc`` entries a shell, the dynamic linker, TLS clients and common tools need; none is secret.
ETC_FILES = (
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/ssl",
)
#: Runs the runtime with isolated, site-free start-up (the venv's ``.pth`` hooks cost ~13 ms),
#: calling its ``main`` directly (``runpy`` and what it imports cost ~4 ms more).
BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {SANDBOX_LIB!r}); "
    f"from {GUEST_PACKAGE}.__main__ import main; sys.exit(main())"
)
HOSTNAME = "sandbox"


# --- host layout ------------------------------------------------------------------------------
def hub_client_packages() -> tuple[tuple[str, str], ...]:
    """(host path, name) of every top-level module of the hub client's distributions installed here.

    The same set the Docker image carries (:func:`rayflow.sandbox.image.hub_client_distributions`),
    so an agent in a bubblewrap sandbox reaches memory over QUIC as one in a container does; empty
    when the client's packages are not installed (agents then get a clear error on ``memory``).
    """
    from rayflow.sandbox.image import hub_client_distributions

    found: dict[str, str] = {}
    for dist in hub_client_distributions() or []:
        for file in dist.files or []:
            top = file.parts[0]
            if top in found or top.endswith((".dist-info", ".egg-info", ".data")) or top in ("..", "__pycache__"):
                continue
            path = os.path.realpath(str(dist.locate_file(top)))
            if os.path.exists(path):
                found[top] = path
    return tuple((path, name) for name, path in sorted(found.items()))



@dataclass(frozen=True)
class HostLayout:
    """What of the host a sandbox needs: system dirs, the Python install, the runtime's packages."""

    #: Interpreter that runs the runtime (the base install's, not a venv's launcher).
    python: str
    #: Python install bound read-only at the same path (stdlib, libpython).
    python_prefix: str
    #: (host directory, package name) bound read-only at ``SANDBOX_LIB/<name>``.
    packages: tuple[tuple[str, str], ...]
    #: Host system dirs that are directories, bound read-only.
    system_dirs: tuple[str, ...] = ("/usr",)
    #: (link path, target) of system dirs that are symlinks (merged-/usr systems).
    system_links: tuple[tuple[str, str], ...] = ()
    #: True when running as root: the runtime is then switched to a per-sandbox uid.
    privileged: bool = True

    @classmethod
    def discover(cls) -> HostLayout:
        """Find the layout of this host for the running interpreter."""
        import msgpack

        from rayflow.sandbox.image import SHIPPED_FILES, SHIPPED_TREES, package_root

        prefix = os.path.realpath(sys.base_prefix)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        python = os.path.join(prefix, "bin", version)
        if not os.access(python, os.X_OK):
            python = os.path.realpath(sys.executable)
        # Of rayflow, exactly what the image ships: the guest, the wire, the package marker and the
        # errors, so a process sandbox sees the same code as a container would.
        root = package_root()
        shipped = tuple((str(root / name), f"rayflow/{name}") for name in (*SHIPPED_FILES, *SHIPPED_TREES))
        packages = (
            shipped
            + ((os.path.realpath(os.path.dirname(msgpack.__file__ or "")), "msgpack"),)
            + hub_client_packages()
        )
        dirs, links = [], []
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                links.append((path, os.readlink(path)))
            elif os.path.isdir(path):
                dirs.append(path)
        return cls(
            python=python,
            python_prefix=prefix,
            packages=packages,
            system_dirs=tuple(dirs),
            system_links=tuple(links),
            privileged=os.geteuid() == 0,
        )


# --- limits plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LimitsPlan:
    """Which mechanism enforces each limit of a sandbox (``None``: not enforced)."""

    memory: str | None
    pids: str | None
    cpu: str | None
    disk: str | None
    wall_time: str | None
    #: Options for ``prlimit`` inside the sandbox (the fallback when there is no cgroup).
    rlimits: tuple[str, ...] = ()
    #: ``RLIMIT_AS`` the runtime puts on each command it starts (fallback for the memory limit;
    #: on the runtime itself it could stop the runtime's own start-up).
    exec_memory_bytes: int | None = None

    def applied(self) -> dict[str, str]:
        """limit name -> mechanism, for the limits that are enforced."""
        items = {
            "memory": self.memory,
            "pids": self.pids,
            "cpu": self.cpu,
            "disk": self.disk,
            "wall_time": self.wall_time,
        }
        return {k: v for k, v in items.items() if v is not None}


def plan_limits(limits: Limits, cgroup_applied: Sequence[str] | None) -> LimitsPlan:
    """Decide how ``limits`` are enforced given what the cgroup accepted (``None``: no cgroup).

    Why rlimits only as a fallback: ``RLIMIT_AS`` bounds each process, not their sum, and counts
    address space rather than memory; ``RLIMIT_NPROC`` counts the uid's processes, which is
    per-sandbox here only because each sandbox has its own uid.
    """
    applied = set(cgroup_applied or ())
    rlimits: list[str] = []
    memory = pids = cpu = None
    exec_memory = None
    if limits.memory_bytes is not None:
        if "memory" in applied:
            memory = "cgroup" + ("+swap" if "swap" in applied else "")
        else:
            memory = "rlimit-as"
            exec_memory = limits.memory_bytes
    if limits.pids is not None:
        if "pids" in applied:
            pids = "cgroup"
        else:
            pids = "rlimit-nproc"
            rlimits.append(f"--nproc={limits.pids}")
    if limits.cpus is not None and "cpu" in applied:
        cpu = "cgroup"
    return LimitsPlan(
        memory=memory,
        pids=pids,
        cpu=cpu,
        disk="tmpfs-size" if limits.disk_bytes is not None else None,
        wall_time="timer" if limits.wall_time_s is not None else None,
        rlimits=tuple(rlimits),
        exec_memory_bytes=exec_memory,
    )


# --- argv -------------------------------------------------------------------------------------
def check_network(spec: SandboxSpec, netns: str | None = None) -> None:
    """Refuse a networked spec unless it starts in a prepared network namespace (``netns``)."""
    if spec.network.mode is not NetworkMode.NONE and netns is None:
        raise ConfigError(
            "without a network namespace of its own the local backend enforces only network mode "
            f"'none', not {spec.network.mode.value!r}"
        )


def sandbox_env(spec: SandboxSpec, layout: HostLayout, hub: tuple[str, int] | None = None) -> dict[str, str]:
    """The runtime's whole environment: a small fixed base, the hub as the sandbox reaches it, the spec's."""
    env = {
        "PATH": f"{layout.python_prefix}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": spec.workdir,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "USER": "sandbox",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if hub is not None:
        env["RAYFLOW_HUB_HOST"], env["RAYFLOW_HUB_PORT"] = hub[0], str(hub[1])
    env.update(spec.env)
    return env


def passwd_lines(uid: int, workdir: str) -> tuple[bytes, bytes]:
    """Minimal ``/etc/passwd`` and ``/etc/group`` naming the sandbox user (tools look it up)."""
    passwd = f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}::{workdir}:/bin/sh\n"
    group = f"root:x:0:\nsandbox:x:{uid}:\n"
    return passwd.encode(), group.encode()


@dataclass(frozen=True)
class ArgvFds:
    """File descriptors ``bwrap`` reads at start-up (numbers in the child, passed with ``pass_fds``)."""

    info: int
    block: int
    passwd: int
    group: int


def _parents(path: str) -> list[str]:
    """Ancestors of ``path`` from the top, without ``/`` (``/a/b/c`` -> ``/a``, ``/a/b``)."""
    parts = [p for p in path.split("/") if p][:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _covered(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def bwrap_argv(
    spec: SandboxSpec,
    layout: HostLayout,
    *,
    uid: int,
    fds: ArgvFds,
    plan: LimitsPlan,
    bwrap: str = "bwrap",
    command: Sequence[str] | None = None,
    netns: str | None = None,
    hub: tuple[str, int] | None = None,
) -> list[str]:
    """The full command line that starts the runtime of ``spec`` isolated by ``bwrap``.

    ``command`` replaces the runtime (used to probe the isolation with plain commands).
    ``netns`` is the path of a prepared network namespace for a networked spec: ``bwrap`` is
    started inside it (``nsenter``) and keeps it instead of unsharing an empty one; ``hub`` is
    the hub's address as seen from there, passed to the runtime's environment.

    Order matters: bwrap performs mount operations in argument order, so the tmpfs mounts come
    before the spec's mounts (which may target paths inside them).
    """
    check_network(spec, netns)
    argv = [] if netns is None else ["nsenter", f"--net={netns}"]
    argv += [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-uts"]
    if netns is None:
        argv.append("--unshare-net")
    argv += ["--unshare-cgroup-try", "--hostname", HOSTNAME, "--die-with-parent", "--new-session"]
    if layout.privileged:
        # Kept only so setpriv can switch to the sandbox uid; the switch clears them for good.
        argv += ["--cap-drop", "ALL"]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--cap-drop", "ALL"]
    made: set[str] = {"/"}

    def parents_of(target: str) -> list[str]:
        # bwrap makes missing parents of a mount point mode 0700 (root-only), which would lock the
        # sandbox user out of them; create each one first, traversable.
        out = []
        for parent in _parents(target):
            if parent not in made:
                made.add(parent)
                out += ["--perms", "0755", "--dir", parent]
        return out

    for path in layout.system_dirs:
        argv += ["--ro-bind", path, path]
        made.add(path)
    for link, target in layout.system_links:
        argv += ["--symlink", target, link]
        made.add(link)
    for path in ETC_FILES:
        argv += [*parents_of(path), "--ro-bind-try", path, path]
    if not _covered(layout.python_prefix, layout.system_dirs):
        argv += [*parents_of(layout.python_prefix), "--ro-bind", layout.python_prefix, layout.python_prefix]
    for host_dir, name in layout.packages:
        target = f"{SANDBOX_LIB}/{name}"
        argv += [*parents_of(target), "--ro-bind", host_dir, target]
    argv += ["--perms", "0644", "--ro-bind-data", str(fds.passwd), "/etc/passwd"]
    argv += ["--perms", "0644", "--ro-bind-data", str(fds.group), "/etc/group"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    made.update(("/proc", "/dev"))
    size = [] if spec.limits.disk_bytes is None else ["--size", str(spec.limits.disk_bytes)]
    argv += ["--perms", "1777", *size, "--tmpfs", "/tmp"]
    made.add("/tmp")
    if spec.workdir != "/tmp":
        argv += [*parents_of(spec.workdir), "--perms", "0777", *size, "--tmpfs", spec.workdir]
        made.add(spec.workdir)
    for mount in spec.mounts:
        if not mount.target.startswith("/"):
            raise ConfigError(f"mount target must be absolute, not {mount.target!r}")
        kind = "--ro-bind" if mount.read_only else "--bind"
        argv += [*parents_of(mount.target), kind, mount.source, mount.target]
    argv += ["--chdir", spec.workdir, "--clearenv"]
    for key, value in sandbox_env(spec, layout, hub).items():
        argv += ["--setenv", key, value]
    argv += ["--info-fd", str(fds.info), "--block-fd", str(fds.block), "--"]
    if layout.privileged:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    if plan.rlimits:
        argv += ["prlimit", *plan.rlimits, "--"]
    argv += list(command) if command is not None else runtime_command(layout, plan)
    return argv


def runtime_command(layout: HostLayout, plan: LimitsPlan) -> list[str]:
    """``python -m rayflow.guest serve``, started without ``site`` and with the packages on the path."""
    argv = [layout.python, "-I", "-S", "-c", BOOTSTRAP, "serve"]
    if plan.exec_memory_bytes is not None:
        argv.append(f"--exec-memory-bytes={plan.exec_memory_bytes}")
    return argv


# --- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """What another process needs to find and remove a sandbox: who owns it and what it holds."""

    id: str
    owner: str
    #: The outer bwrap process, our child.
    pid: int
    #: Its start time in clock ticks since boot, so a reused pid is not mistaken for it.
    start_ticks: int
    #: The sandbox's pid 1 (killing it kills the whole pid namespace).
    init_pid: int
    init_start_ticks: int
    uid: int
    cgroups: tuple[str, ...] = ()
    #: True when the sandbox has a network namespace, veth pair and rules (named after its id).
    network: bool = False

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["cgroups"] = list(self.cgroups)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        data["cgroups"] = tuple(data.get("cgroups", ()))
        return cls(**data)


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (field 22 of ``/proc/<pid>/stat``), or ``None`` when it is gone.

    A zombie counts as gone: it runs nothing and holds nothing but its exit status.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _alive(pid: int, start_ticks: int) -> bool:
    return pid > 0 and proc_start_ticks(pid) == start_ticks


def kill_processes(record: Record) -> None:
    """SIGKILL the sandbox's pid 1 (which takes its whole pid namespace along) and its bwrap."""
    for pid, ticks in ((record.init_pid, record.init_start_ticks), (record.pid, record.start_ticks)):
        if _alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_record(record: Record) -> None:
    """Kill everything of a sandbox from its record, then remove its groups and network."""
    kill_processes(record)
    remove_dirs(list(record.cgroups))
    if record.network:
        local_network.destroy(record.id)


def default_registry_dir() -> Path:
    """``/run/rayflow/local-sandboxes`` for root, else a per-user directory."""
    if os.geteuid() == 0:
        return Path("/run/rayflow/local-sandboxes")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/rayflow-{os.geteuid()}"
    return Path(runtime) / "rayflow" / "local-sandboxes"


class Registry:
    """One JSON file per live sandbox, so ``owned``/``reap`` work from any process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, record: Record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.directory / f".{record.id}.tmp"
        tmp.write_text(record.to_json())
        os.replace(tmp, self.directory / f"{record.id}.json")

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{sandbox_id}.json").unlink()

    def records(self) -> list[Record]:
        out = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                out.append(Record.from_json(path.read_text()))
        return out

    @staticmethod
    def present(record: Record) -> bool:
        """True while any process or group of the sandbox remains."""
        return (
            _alive(record.pid, record.start_ticks)
            or _alive(record.init_pid, record.init_start_ticks)
            or any(os.path.isdir(p) for p in record.cgroups)
            or (record.network and local_network.exists(record.id))
        )


# --- the sandbox ------------------------------------------------------------------------------
class LocalSandbox(CgroupJudgedSandbox):
    """A :class:`Sandbox` backed by a bwrap process tree; the channel does the talking.

    Adds what only the outside can see: which limits applied, the cgroup's usage, and whether a
    command died of the memory limit (the kernel's OOM counter) or hit the pids limit.
    """

    def __init__(
        self,
        channel: Sandbox,
        cgroup: Cgroup | None,
        plan: LimitsPlan,
        uid: int,
        link: local_network.Link | None = None,
    ) -> None:
        super().__init__(channel)
        self._cgroup = cgroup
        self.plan = plan
        self.uid = uid
        self._link = link

    @property
    def network_gateway(self) -> str | None:
        """The host end's address, where the sandbox reaches loopback endpoints (``None``: no network)."""
        return self._link.host_address if self._link else None

    @property
    def network_address(self) -> str | None:
        """The sandbox's own address on its veth pair (``None``: no network)."""
        return self._link.sandbox_address if self._link else None

    @property
    def limits_applied(self) -> dict[str, str]:
        """limit name -> mechanism ("cgroup", "cgroup+swap", "rlimit-as", "tmpfs-size", "timer")."""
        return self.plan.applied()

    def kill_counters(self) -> KillCounters | None:
        return self._cgroup


def cgroup_stats(cgroup: Cgroup | None) -> SandboxStats:
    """Usage from the sandbox's group (all ``None`` without one)."""
    if cgroup is None:
        return SandboxStats()
    return SandboxStats(
        cpu_seconds=cgroup.cpu_seconds(),
        memory_bytes=cgroup.memory_bytes(),
        memory_peak_bytes=cgroup.memory_peak_bytes(),
        pids=cgroup.pid_count(),
    )


# --- the backend ------------------------------------------------------------------------------
def _read_info(fd: int, limit: int = 64 * 1024) -> dict[str, Any]:
    """Read bwrap's info JSON (its child's pid) from ``fd``; it ends with a closing brace line."""
    data = b""
    while len(data) < limit:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return json.loads(data)
    raise RayflowError("bwrap exited before reporting its sandbox", output=data.decode(errors="replace"))


def _pipe_with(data: bytes) -> int:
    """A pipe's read end already holding ``data`` (small: fits the pipe buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


@dataclass
class _Live:
    """Host-side state of one sandbox, torn down once."""

    record: Record
    process: subprocess.Popen[bytes]
    cgroup: Cgroup | None
    registry: Registry
    plan: LimitsPlan
    link: local_network.Link | None = None
    timer: threading.Timer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False

    def teardown(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        if self.timer is not None and self.timer is not threading.current_thread():
            self.timer.cancel()
        kill_processes(self.record)
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        # The namespace's pid 1 is bwrap's child: wait (bounded) until the kernel has ended it.
        deadline = time.monotonic() + 5.0
        while _alive(self.record.init_pid, self.record.init_start_ticks) and time.monotonic() < deadline:
            time.sleep(0.01)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        remove_dirs(list(self.record.cgroups))
        if self.record.network:
            local_network.destroy(self.record.id)
        self.registry.remove(self.record.id)


ChannelFactory = Callable[..., Sandbox]


def warm_bytecode(layout: HostLayout) -> None:
    """Compile the runtime's modules on the host once.

    Why: the packages are read-only inside a sandbox, so a module without a cached ``.pyc`` would
    be compiled again at every sandbox start (~150 ms for the runtime). A package directory the
    host cannot write to is left as it is.
    """
    import compileall

    for host_path, _ in layout.packages:
        with contextlib.suppress(OSError):
            if os.path.isdir(host_path):
                compileall.compile_dir(host_path, quiet=2, workers=1)
            else:
                compileall.compile_file(host_path, quiet=2)


def _default_channel_factory() -> ChannelFactory:
    from rayflow.sandbox.channel_sandbox import ChannelSandbox

    return ChannelSandbox


class LocalBackend:
    """Makes bubblewrap sandboxes on this machine; see the module docstring for the isolation."""

    name = "local"
    isolated = True

    def __init__(
        self,
        *,
        registry_dir: Path | None = None,
        use_cgroups: bool = True,
        bwrap: str | None = None,
        layout: HostLayout | None = None,
        channel_factory: ChannelFactory | None = None,
        network_pool: str = local_network.DEFAULT_POOL,
    ) -> None:
        found = bwrap or shutil.which("bwrap")
        if not found:
            raise ConfigError("the local backend needs bubblewrap ('bwrap') on PATH")
        self.bwrap = found
        self.layout = layout or HostLayout.discover()
        self.registry = Registry(registry_dir or default_registry_dir())
        self.use_cgroups = use_cgroups
        self.network_pool = network_pool
        self._channel_factory = channel_factory
        warm_bytecode(self.layout)

    def describe(self) -> dict[str, Any]:
        """What this backend enforces on this machine, for logs and ``rayflow`` diagnostics."""
        return {
            "backend": self.name,
            "bwrap": self.bwrap,
            "uid": "per-sandbox host uid" if self.layout.privileged else "user namespace",
            "network_modes": [m.value for m in NetworkMode]
            if local_network.available() is None
            else [NetworkMode.NONE.value],
            "cgroups": self.use_cgroups,
            "python": self.layout.python,
            "registry": str(self.registry.directory),
        }

    def _new_uid(self) -> int:
        taken = {r.uid for r in self.registry.records()}
        for _ in range(64):
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in taken:
                return uid
        raise RayflowError("no free sandbox uid")

    def create(self, spec: SandboxSpec) -> LocalSandbox:
        live = self._launch(spec, None)
        labelled = {**spec.labels, OWNER_LABEL: spec.owner}
        factory = self._channel_factory or _default_channel_factory()
        cgroup = live.cgroup
        try:
            channel = factory(
                live.record.id,
                _with_labels(spec, labelled),
                live.process,
                live.teardown,
                stats=lambda: cgroup_stats(cgroup),
            )
        except BaseException:
            live.teardown()
            raise
        sandbox = LocalSandbox(channel, cgroup, live.plan, live.record.uid, live.link)
        if spec.limits.wall_time_s is not None:
            live.timer = threading.Timer(spec.limits.wall_time_s, sandbox.destroy)
            live.timer.daemon = True
            live.timer.start()
        return sandbox

    def run_once(
        self, spec: SandboxSpec, command: Sequence[str], *, stdin: bytes = b"", timeout_s: float | None = None
    ) -> ExecResult:
        """Run ``command`` as a one-off sandbox's only program (no runtime) and remove the sandbox.

        Same isolation and limits as :meth:`create`; for one-shot jobs, and to probe the isolation
        itself without the channel. Output is captured whole.
        """
        live = self._launch(spec, list(command))
        timeout = timeout_s if timeout_s is not None else spec.limits.wall_time_s
        started = time.monotonic()
        killed: KillReason | None = None
        try:
            try:
                out, err = live.process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = KillReason.TIMEOUT
                kill_processes(live.record)
                out, err = live.process.communicate()
            code = live.process.returncode
            if killed is None and code != 0 and live.cgroup is not None:
                if live.cgroup.oom_kills() > 0:
                    killed = KillReason.OOM
                elif live.cgroup.pids_refusals() > 0:
                    killed = KillReason.PIDS
        finally:
            live.teardown()
        return ExecResult(
            exit_code=code if code >= 0 else 128 - code,
            stdout=out,
            stderr=err,
            duration_s=time.monotonic() - started,
            killed=killed,
        )

    def _launch(self, spec: SandboxSpec, command: list[str] | None) -> _Live:
        """Start bwrap for ``spec`` with its processes in a fresh cgroup, and register it.

        ``command`` ``None`` starts the runtime with the channel on stdin/stdout; a command gets
        pipes for its stdin, stdout and stderr.
        """
        networked = spec.network.mode is not NetworkMode.NONE
        targets: list[netfilter.Target] = []
        if networked:
            why = local_network.available()
            if why is not None:
                raise ConfigError(why)
            targets = netfilter.resolve(spec.network)
        sandbox_id = f"rf-{secrets.token_hex(6)}"
        cgroup: Cgroup | None = None
        if self.use_cgroups:
            with contextlib.suppress(CgroupUnavailableError):
                cgroup = Cgroup.create(f"rayflow-{sandbox_id}", spec.limits)
        plan = plan_limits(spec.limits, cgroup.applied if cgroup else None)
        uid = self._new_uid()
        try:
            link: local_network.Link | None = None
            netns: str | None = None
            hub: tuple[str, int] | None = None
            if networked:
                # Registered before the namespace exists: a creator killed at any later point
                # leaves a record that ``reap`` follows to the namespace and the rules.
                cgroups = tuple(cgroup.paths) if cgroup else ()
                self.registry.add(Record(sandbox_id, spec.owner, 0, 0, 0, 0, uid, cgroups, network=True))
                link = local_network.create(sandbox_id, targets, self.network_pool)
                netns, hub = link.netns_path, local_network.hub_endpoint(spec.network, targets, link)
            live = self._spawn(spec, sandbox_id, uid, cgroup, plan, command, netns=netns, hub=hub)
            live.link = link
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if networked:
                local_network.destroy(sandbox_id)
                self.registry.remove(sandbox_id)
            raise
        return live

    def _spawn(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        uid: int,
        cgroup: Cgroup | None,
        plan: LimitsPlan,
        command: list[str] | None,
        *,
        netns: str | None = None,
        hub: tuple[str, int] | None = None,
    ) -> _Live:
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        passwd, group = passwd_lines(uid, spec.workdir)
        passwd_r, group_r = _pipe_with(passwd), _pipe_with(group)
        child_fds = ArgvFds(info=info_w, block=block_r, passwd=passwd_r, group=group_r)
        argv = bwrap_argv(
            spec,
            self.layout,
            uid=uid,
            fds=child_fds,
            plan=plan,
            bwrap=self.bwrap,
            command=command,
            netns=netns,
            hub=hub,
        )
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if command is not None else subprocess.DEVNULL,
                pass_fds=(info_w, block_r, passwd_r, group_r),
                close_fds=True,
                start_new_session=True,
            )
        finally:
            for fd in (info_w, block_r, passwd_r, group_r):
                os.close(fd)
        try:
            try:
                info = _read_info(info_r)
            finally:
                os.close(info_r)
            init_pid = int(info["child-pid"])
            if cgroup is not None:
                # Both bwrap processes wait on the block fd: nothing has forked yet, so every
                # later process of the sandbox is born inside the group.
                cgroup.add(process.pid)
                cgroup.add(init_pid)
            record = Record(
                id=sandbox_id,
                owner=spec.owner,
                pid=process.pid,
                start_ticks=proc_start_ticks(process.pid) or 0,
                init_pid=init_pid,
                init_start_ticks=proc_start_ticks(init_pid) or 0,
                uid=uid,
                cgroups=tuple(cgroup.paths) if cgroup else (),
                network=netns is not None,
            )
            self.registry.add(record)
        except BaseException:
            os.close(block_w)
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()
            raise
        os.write(block_w, b"1")
        os.close(block_w)
        return _Live(record=record, process=process, cgroup=cgroup, registry=self.registry, plan=plan)

    def owned(self) -> list[tuple[str, str]]:
        return [(r.id, r.owner) for r in self.registry.records() if Registry.present(r)]

    def reap(self, owner_alive: Callable[[str], bool]) -> list[str]:
        reaped = []
        for record in self.registry.records():
            if owner_alive(record.owner):
                continue
            kill_record(record)
            self.registry.remove(record.id)
            reaped.append(record.id)
        return reaped


def _with_labels(spec: SandboxSpec, labels: Mapping[str, str]) -> SandboxSpec:
    from dataclasses import replace

    return replace(spec, labels=dict(labels))
