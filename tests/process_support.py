"""Waiting for a process to end in tests: woken by its pidfd, bounded, never polling."""

from __future__ import annotations

import os
import select

#: Longest a test waits for a killed process to be gone.
GONE_WITHIN_S = 30.0


def wait_gone(pid: int) -> bool:
    """Wait (bounded) until ``pid`` has exited, woken by its pidfd rather than by polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], GONE_WITHIN_S)
        return bool(readable)
    finally:
        os.close(fd)
