"""The processes of a sandbox: a command's own group, and finding a session's members in ``/proc``.

Why sessions: the runtime leads (or shares) one session, and the commands it starts stay in it
while each gets a process group of its own (so a timeout can kill one command's whole tree), so
"every process of this sandbox" is "every process of the session" on backends without cgroups.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def own_group_options() -> dict[str, Any]:
    """``subprocess.Popen`` options that start a command as leader of a new process group.

    Not a new session (``start_new_session``): the command must stay in the runtime's session,
    where destroying the sandbox finds it.
    """
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or ``None`` if there is no such process.

    The name is skipped by its last ``)``: it may itself hold spaces and parentheses. Index 0 is
    the state, 1 the parent, 2 the process group, 3 the session, 19 the start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot); with the pid it names one process for good."""
    fields = stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 and fields[0] != "Z" else None


def session_members(sid: int) -> list[int]:
    """Pids of every live process of session ``sid`` (zombies left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields and len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            members.append(int(entry))
    return members


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else ``None``."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None
