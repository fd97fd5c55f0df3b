"""Finds and removes sandboxes whose owner is gone; defines how a local process names itself as owner.

Why: a worker that crashes (SIGKILL, OOM, a lost node) cannot destroy its sandboxes. Containers
outlive it for good; bubblewrap sandboxes die with their creator but leave cgroups and registry
records behind. Every sandbox carries its owner (``SandboxSpec.owner``, the ``rayflow.owner``
label), so a later sweep can judge each owner and reap what belongs to the dead.

Owner convention for local processes::

    proc:<hostname>:<boot id>:<pid>:<start ticks>[/<suffix>]

The pid alone is not enough: pids are reused. The pid with the process's start time (clock ticks
since boot, ``/proc/<pid>/stat`` field 22) names one process for good within one boot; the boot
id tells a process of an earlier boot (whose pid and ticks may repeat) from a live one; the
hostname keeps owners of another machine (sharing a Docker engine) from being judged against
this machine's processes. The optional ``/<suffix>`` names a part of the process (a warm pool,
a job) without changing whose life decides.

Judgement (:func:`owner_alive_by_pid`) is conservative: an owner string of any other form, or
of another host, counts as alive, because a sandbox that cannot be judged must not be killed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from rayflow.errors import ConfigError
from rayflow.sandbox.backend import SandboxBackend
from rayflow.wire.procfs import start_time

log = logging.getLogger("rayflow.sandbox.gc")

OWNER_PREFIX = "proc"
#: Characters of the boot id kept in an owner string (48 random bits tell boots apart).
BOOT_ID_CHARS = 12
_OWNER_RE = re.compile(
    r"^proc:(?P<host>[^:/]+):(?P<boot>[0-9a-f]+):(?P<pid>[1-9][0-9]*):(?P<ticks>[0-9]+)(?:/(?P<suffix>.+))?$"
)


@dataclass(frozen=True)
class ProcessOwner:
    """A parsed owner string: which process on which machine and boot, and an optional sub-part."""

    host: str
    boot: str
    pid: int
    start_ticks: int
    suffix: str = ""

    def __str__(self) -> str:
        text = f"{OWNER_PREFIX}:{self.host}:{self.boot}:{self.pid}:{self.start_ticks}"
        return f"{text}/{self.suffix}" if self.suffix else text


def parse_owner(owner: str) -> ProcessOwner | None:
    """The process an owner string names, or ``None`` when it follows another convention."""
    match = _OWNER_RE.match(owner)
    if match is None:
        return None
    return ProcessOwner(
        host=match["host"],
        boot=match["boot"],
        pid=int(match["pid"]),
        start_ticks=int(match["ticks"]),
        suffix=match["suffix"] or "",
    )


@lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot's id (random per boot, from the kernel), shortened; ``"0"`` where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            raw = handle.read().strip().replace("-", "").lower()
    except OSError:
        return "0"
    return raw[:BOOT_ID_CHARS] or "0"


def host_name() -> str:
    """This machine's name as it appears in owner strings (no ``:`` or ``/``)."""
    return re.sub(r"[:/\s]", "-", socket.gethostname()) or "localhost"


def process_owner(pid: int, suffix: str = "") -> str:
    """The owner string of the live process ``pid``; :class:`ConfigError` if it does not run."""
    ticks = start_time(pid)
    if ticks is None:
        raise ConfigError(f"no running process {pid} to name as owner")
    if "\n" in suffix or "\0" in suffix:
        raise ConfigError("an owner suffix must be a single line")
    return str(ProcessOwner(host_name(), boot_id(), pid, int(ticks), suffix))


def current_process_owner(suffix: str = "") -> str:
    """The owner string of this process, with an optional ``/<suffix>`` naming a part of it."""
    return process_owner(os.getpid(), suffix)


def owner_alive_by_pid(
    owner: str,
    *,
    host: str | None = None,
    boot: str | None = None,
    ticks_of: Callable[[int], str | None] = start_time,
) -> bool:
    """Whether the process named by ``owner`` still runs; unjudgeable owners count as alive.

    ``host``, ``boot`` and ``ticks_of`` default to this machine's; they are parameters so the
    judgement can be tested on its own.
    """
    parsed = parse_owner(owner)
    if parsed is None:
        return True
    if parsed.host != (host if host is not None else host_name()):
        return True
    if parsed.boot != (boot if boot is not None else boot_id()):
        return False
    ticks = ticks_of(parsed.pid)
    return ticks is not None and int(ticks) == parsed.start_ticks


def why_gone(owner: str) -> str:
    """Why a reaped sandbox's owner was judged gone, for people reading the sweep's report."""
    parsed = parse_owner(owner)
    if parsed is None or parsed.host != host_name():
        return "owner judged gone"
    if parsed.boot != boot_id():
        return "owner ran before the last reboot"
    return f"owner process {parsed.pid} exited"


@dataclass(frozen=True)
class Removed:
    """One sandbox a sweep removed."""

    backend: str
    sandbox_id: str
    owner: str
    why: str


@dataclass(frozen=True)
class SweepResult:
    """What a sweep removed, how many sandboxes it kept, and which backends failed."""

    removed: tuple[Removed, ...]
    kept: int
    #: (backend name, error message) of each backend whose sweep failed.
    errors: tuple[tuple[str, str], ...]


def sweep(backends: Iterable[SandboxBackend], owner_alive: Callable[[str], bool]) -> SweepResult:
    """Reap every backend with ``owner_alive``; one failing backend does not stop the others."""
    removed: list[Removed] = []
    errors: list[tuple[str, str]] = []
    kept = 0
    for backend in backends:
        try:
            owners = dict(backend.owned())
            for sandbox_id in backend.reap(owner_alive):
                owner = owners.get(sandbox_id, "")
                removed.append(Removed(backend.name, sandbox_id, owner, why_gone(owner) if owner else "gone"))
            kept += len(backend.owned())
        except Exception as exc:  # noqa: BLE001 - engines raise their own types; report, go on
            log.error("sandbox sweep of the %s backend failed: %s", backend.name, exc)
            errors.append((backend.name, str(exc)))
    return SweepResult(tuple(removed), kept, tuple(errors))


def collect_garbage(backends: Iterable[SandboxBackend], owner_alive: Callable[[str], bool]) -> list[str]:
    """Destroy, across ``backends``, every sandbox whose owner ``owner_alive`` judges gone; their ids."""
    result = sweep(backends, owner_alive)
    for item in result.removed:
        log.info("reaped %s sandbox %s (%s)", item.backend, item.sandbox_id, item.why)
    return [item.sandbox_id for item in result.removed]


def reap_on_startup(backend: SandboxBackend) -> list[str]:
    """Remove what crashed processes of this machine left in ``backend``; call once when starting.

    Pooled sandboxes are owned by the process holding the pool (the pool id is that process's
    owner string with a suffix: ``/pool-...`` by default, ``/<worker id>/pool`` for a swarm
    worker's), so they are reaped once that process is gone and never while it runs.
    """
    reaped = collect_garbage([backend], owner_alive_by_pid)
    if reaped:
        log.warning("removed %d %s sandbox(es) left by dead owners: %s", len(reaped), backend.name, reaped)
    return reaped
