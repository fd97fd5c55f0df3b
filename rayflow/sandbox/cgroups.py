"""Control groups for one sandbox: memory, swap, process count and CPU limits, usage, kill-all.

Why cgroups: rlimits are per process (``RLIMIT_AS``) or per user (``RLIMIT_NPROC``), so they
cannot bound the sum of what a sandbox's processes use; a cgroup can, and it also tells when the
kernel killed something for memory (the OOM counter) or refused a fork (the pids counter).

Both layouts are supported: cgroup v1 (one hierarchy per controller, as on this machine) and the
unified v2 hierarchy. A sandbox's group is created *below the calling process's own group* in
each hierarchy, so any limit already placed on the caller (a container, a job) still applies.

The plan (which file gets which value) is pure and tested without a kernel; :class:`Cgroup` is
the thin shell that writes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from rayflow.sandbox.spec import Limits

#: CFS period used for CPU quotas, in microseconds (the kernel's default).
CPU_PERIOD_US = 100_000
#: v1 controllers a sandbox joins; cpuacct gives CPU time, freezer is not needed (pid ns kills all).
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
#: Largest number of passes over ``cgroup.procs`` when killing; each pass kills what it sees.
KILL_PASSES = 50
#: How long removing a group waits for killed processes to be reaped by the kernel, in seconds.
REMOVE_WAIT_S = 5.0


class CgroupUnavailableError(OSError):
    """No writable cgroup hierarchy for this process (not root, no delegation, no controller)."""


@dataclass(frozen=True)
class Hierarchy:
    """Where one cgroup hierarchy is mounted and where the calling process sits in it."""

    #: Controllers of this hierarchy (empty tuple for v2, whose controllers are listed in a file).
    controllers: tuple[str, ...]
    mount_point: str
    #: The calling process's group, relative to the mount point ("" for the mount's root).
    own_path: str
    version: int

    @property
    def own_dir(self) -> str:
        return os.path.join(self.mount_point, self.own_path.strip("/")).rstrip("/")


def parse_mountinfo(text: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount in ``mountinfo``."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((fields[3], fields[4], tail[0], tuple(tail[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map each controller (``""`` for v2) to the process's group path, from ``/proc/<pid>/cgroup``."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _relative(path: str, mount_root: str) -> str:
    """The group path as seen below a mount whose root is ``mount_root`` (containers mount a sub-tree)."""
    if mount_root in ("", "/"):
        return path
    if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root.rstrip("/")) :] or "/"
    return path


def find_hierarchies(mountinfo: str, proc_cgroup: str) -> list[Hierarchy]:
    """The hierarchies a sandbox group should be made in: v1 ones with our controllers, else v2.

    A hybrid machine (v1 controllers plus an empty v2 tree) uses v1, because that is where the
    controllers are. A pure v2 machine uses the unified tree.
    """
    own = parse_proc_cgroup(proc_cgroup)
    v1: list[Hierarchy] = []
    v2: Hierarchy | None = None
    for root, point, fstype, options in parse_mountinfo(mountinfo):
        if fstype == "cgroup":
            wanted = tuple(c for c in V1_CONTROLLERS if c in options)
            if wanted and wanted[0] in own and all(h.mount_point != point for h in v1):
                if any(set(wanted) & set(h.controllers) for h in v1):
                    continue
                v1.append(Hierarchy(wanted, point, _relative(own[wanted[0]], root), 1))
        elif fstype == "cgroup2" and "" in own and v2 is None:
            v2 = Hierarchy((), point, _relative(own[""], root), 2)
    if v1:
        return v1
    return [v2] if v2 is not None else []


def plan_v1(limits: Limits) -> dict[str, list[tuple[str, str]]]:
    """Controller -> ordered (file, value) writes that enforce ``limits`` on cgroup v1.

    Memory is written before memory+swap because the kernel refuses a memsw limit below the memory
    limit; setting both to the same value means the sandbox cannot spill into swap.
    """
    plan: dict[str, list[tuple[str, str]]] = {"memory": [], "pids": [], "cpu": [], "cpuacct": []}
    if limits.memory_bytes is not None:
        plan["memory"] += [
            ("memory.limit_in_bytes", str(limits.memory_bytes)),
            ("memory.memsw.limit_in_bytes", str(limits.memory_bytes)),
        ]
    if limits.pids is not None:
        plan["pids"].append(("pids.max", str(limits.pids)))
    if limits.cpus is not None:
        plan["cpu"] += [
            ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu.cfs_quota_us", str(max(1000, round(limits.cpus * CPU_PERIOD_US)))),
        ]
    return plan


def plan_v2(limits: Limits) -> list[tuple[str, str]]:
    """Ordered (file, value) writes that enforce ``limits`` in a v2 group."""
    plan: list[tuple[str, str]] = []
    if limits.memory_bytes is not None:
        plan += [("memory.max", str(limits.memory_bytes)), ("memory.swap.max", "0")]
    if limits.pids is not None:
        plan.append(("pids.max", str(limits.pids)))
    if limits.cpus is not None:
        plan.append(("cpu.max", f"{max(1000, round(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"))
    return plan


#: Which limit each written file enforces, for :attr:`Cgroup.applied`.
_LIMIT_OF_FILE = {
    "memory.limit_in_bytes": "memory",
    "memory.memsw.limit_in_bytes": "swap",
    "memory.max": "memory",
    "memory.swap.max": "swap",
    "pids.max": "pids",
    "cpu.cfs_quota_us": "cpu",
    "cpu.max": "cpu",
}


def counter(text: str, key: str) -> int:
    """The value of ``key`` in a flat "key value" file (``memory.events``, ``pids.events``)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    """One sandbox's group, made in every relevant hierarchy, with its limits written."""

    def __init__(self, dirs: dict[str, str], version: int, applied: tuple[str, ...]) -> None:
        #: controller (or "" for v2) -> directory of the group
        self.dirs = dirs
        self.version = version
        #: Limits the kernel accepted: some of "memory", "swap", "pids", "cpu".
        self.applied = applied

    @classmethod
    def create(cls, name: str, limits: Limits, hierarchies: list[Hierarchy] | None = None) -> Cgroup:
        """Make group ``name`` below the caller's own group and write ``limits`` into it.

        Raises :class:`CgroupUnavailableError` when no hierarchy accepts a new group; a limit the
        kernel rejects (no swap accounting, controller not delegated) is left out of ``applied``.
        """
        if hierarchies is None:
            hierarchies = find_hierarchies(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
        if not hierarchies:
            raise CgroupUnavailableError("no cgroup hierarchy is mounted")
        dirs: dict[str, str] = {}
        applied: list[str] = []
        try:
            for h in hierarchies:
                path = os.path.join(h.own_dir, name)
                os.mkdir(path, 0o755)
                for controller in h.controllers or ("",):
                    dirs[controller] = path
            version = hierarchies[0].version
            writes = (
                [(dirs[c], f, v) for c, steps in plan_v1(limits).items() if c in dirs for f, v in steps]
                if version == 1
                else [(dirs[""], f, v) for f, v in plan_v2(limits)]
            )
        except OSError as exc:
            cls(dirs, hierarchies[0].version, ()).remove()
            raise CgroupUnavailableError(f"cannot create cgroup {name}: {exc}") from exc
        for directory, file, value in writes:
            try:
                _write(os.path.join(directory, file), value)
            except OSError:
                continue
            limit = _LIMIT_OF_FILE.get(file)
            if limit and limit not in applied:
                applied.append(limit)
        return cls(dirs, version, tuple(applied))

    @property
    def paths(self) -> list[str]:
        """Distinct group directories (what :func:`remove_dirs` needs after a restart)."""
        return sorted(set(self.dirs.values()))

    def add(self, pid: int) -> None:
        """Move ``pid`` into the group in every hierarchy."""
        for path in self.paths:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> set[int]:
        return procs_of(self.paths)

    def _file(self, controller: str, v1_name: str, v2_name: str) -> str:
        if self.version == 1:
            return _read(os.path.join(self.dirs.get(controller, "/nonexistent"), v1_name))
        return _read(os.path.join(self.dirs[""], v2_name))

    def oom_kills(self) -> int:
        """How many processes the kernel has killed in this group for lack of memory."""
        return counter(self._file("memory", "memory.oom_control", "memory.events"), "oom_kill")

    def pids_refusals(self) -> int:
        """How many forks the pids limit has refused."""
        return counter(self._file("pids", "pids.events", "pids.events"), "max")

    def memory_bytes(self) -> int | None:
        text = self._file("memory", "memory.usage_in_bytes", "memory.current").strip()
        return int(text) if text.isdigit() else None

    def memory_peak_bytes(self) -> int | None:
        text = self._file("memory", "memory.max_usage_in_bytes", "memory.peak").strip()
        return int(text) if text.isdigit() else None

    def cpu_seconds(self) -> float | None:
        if self.version == 1:
            text = self._file("cpuacct", "cpuacct.usage", "").strip()
            return int(text) / 1e9 if text.isdigit() else None
        usec = counter(self._file("cpu", "", "cpu.stat"), "usage_usec")
        return usec / 1e6

    def pid_count(self) -> int | None:
        text = self._file("pids", "pids.current", "pids.current").strip()
        return int(text) if text.isdigit() else None

    def kill(self) -> None:
        kill_all(self.paths)

    def remove(self) -> None:
        """Kill what is left and delete the group; calling it again does nothing."""
        remove_dirs(self.paths)


def procs_of(paths: list[str]) -> set[int]:
    """Every pid in the groups ``paths`` (missing groups count as empty)."""
    pids: set[int] = set()
    for path in paths:
        pids.update(int(p) for p in _read(os.path.join(path, "cgroup.procs")).split() if p.isdigit())
    return pids


def kill_all(paths: list[str]) -> None:
    """SIGKILL every process in the groups, pass after pass, until none is left or passes run out.

    Why passes: a process may fork between reading the list and the kill; v2 has ``cgroup.kill``
    which does this atomically and is used when present.
    """
    for path in paths:
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
    for _ in range(KILL_PASSES):
        pids = procs_of(paths)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def remove_dirs(paths: list[str]) -> None:
    """Kill the groups' processes and remove the group directories that still exist."""
    existing = [p for p in paths if os.path.isdir(p)]
    if not existing:
        return
    kill_all(existing)
    deadline = time.monotonic() + REMOVE_WAIT_S
    for path in existing:
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                # Killed processes leave the group only once they are fully gone.
                if time.monotonic() > deadline:
                    raise
                kill_all([path])
                time.sleep(0.002)
