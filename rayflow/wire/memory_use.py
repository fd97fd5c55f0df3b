"""How one subtask's agent used the shared memory: calls made, calls that failed, hits, last error.

Why a record of its own: agents treat memory as advice (a failed hub call must not fail their
work), so a hub nobody can reach shows up nowhere unless the calls are counted. The runner counts
every call an agent makes through ``context.memory`` and attaches the counts to the agent's value
as ``value["memory"]``; the results log, the report, the job result and the live progress read
them back with :func:`memory_use_of`.

What counts as a *memory error*: any call through ``context.memory`` that raised, building the
client included (a sandbox with no hub configured raises ``ConfigError`` there), whatever the
agent did with the exception afterwards. A subtask *reached the hub* when at least one of its
calls succeeded. Standard library only: the runner inside a sandbox and the host share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The key of an agent's value the runner puts the counts under.
MEMORY_FIELD = "memory"
#: Longest error text kept (a result stays small; the kind is what a report counts).
MAX_ERROR_CHARS = 300
#: The hub op whose answers are hits (a list of retrieved items).
SEARCH_OP = "search"


def describe_error(exc: BaseException) -> str:
    """``"<ErrorClass>: <message>"``, bounded: how a memory error is written down."""
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {' '.join(str(message).split())}"[:MAX_ERROR_CHARS]


@dataclass
class MemoryUse:
    """Counts of one subtask's memory calls (``calls == ok + errors``)."""

    calls: int = 0
    ok: int = 0
    errors: int = 0
    #: Items the agent's searches returned.
    hits: int = 0
    #: ``"<ErrorClass>: <message>"`` of the last call that failed, or ``""``.
    last_error: str = ""

    @property
    def used(self) -> bool:
        """The agent made at least one memory call."""
        return self.calls > 0

    @property
    def reached(self) -> bool:
        """At least one memory call succeeded: the hub was reachable from this subtask."""
        return self.ok > 0

    @property
    def error_kind(self) -> str:
        """The class of the last error (``TransportError``, ``ConfigError``...), or ``""``."""
        return self.last_error.split(":", 1)[0].strip() if self.last_error else ""

    def succeeded(self, op: str, answer: Any) -> None:
        """Count a call that returned ``answer``."""
        self.calls += 1
        self.ok += 1
        if op == SEARCH_OP and isinstance(answer, (list, tuple)):
            self.hits += len(answer)

    def failed(self, exc: BaseException) -> None:
        """Count a call that raised ``exc``."""
        self.calls += 1
        self.errors += 1
        self.last_error = describe_error(exc)

    def merged(self, other: MemoryUse) -> MemoryUse:
        """The counts of both (the other's last error wins when it has one)."""
        return MemoryUse(
            self.calls + other.calls,
            self.ok + other.ok,
            self.errors + other.errors,
            self.hits + other.hits,
            other.last_error or self.last_error,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "errors": self.errors,
            "hits": self.hits,
            "last_error": self.last_error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryUse | None:
        """The counts ``data`` holds, or ``None`` when it is not such a record (an agent's own field)."""
        counts = [data.get(name) for name in ("calls", "ok", "errors", "hits")]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
            return None
        calls, ok, errors, hits = (int(n) for n in counts)  # type: ignore[arg-type]
        return cls(calls, ok, errors, hits, str(data.get("last_error") or "")[:MAX_ERROR_CHARS])


def memory_use_of(value: Any) -> MemoryUse | None:
    """The memory use recorded in an agent's value (``value["memory"]``), or ``None`` if it has none."""
    if not isinstance(value, Mapping):
        return None
    recorded = value.get(MEMORY_FIELD)
    return MemoryUse.from_dict(recorded) if isinstance(recorded, Mapping) else None
