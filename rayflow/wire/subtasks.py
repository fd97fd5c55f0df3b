"""The records a swarm run is made of: subtasks, their results and the timeline of phases.

Plain frozen dataclasses that convert to and from JSON-able dicts, because they cross process
boundaries (Ray object store, the sandbox channel, a results file on disk) and must stay
readable by a notebook without any of rayflow's heavy parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Mapping

from rayflow.wire.memory_use import MemoryUse, memory_use_of


class Pattern(str, Enum):
    """Where the coordinator's own agent steps run (the design's patterns A and B)."""

    #: Hybrid: the coordinator's decomposition and synthesis run on the host; workers are sandboxed.
    HYBRID = "A"
    #: Full sandbox: decomposition and synthesis also run in a sandbox; memory only over QUIC.
    FULL_SANDBOX = "B"


class Phase(str, Enum):
    """The phases of a run a timeline shows (the design's Diagram 9)."""

    DECOMPOSE = "decompose"
    PROVISION = "provision"
    EXECUTE = "execute"
    MEMORY_SYNC = "memory_sync"
    AGGREGATE = "aggregate"


@dataclass(frozen=True)
class Subtask:
    """One unit of work handed to one worker: a JSON-able task for the job's agent."""

    #: Stable id within the job (``<job>-<index>`` unless the decomposition names it).
    id: str
    #: Position in the decomposition; results are reported in this order.
    index: int
    #: Free-form JSON-able payload given to the agent as its task.
    task: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, "task": dict(self.task)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Subtask:
        return cls(str(data["id"]), int(data["index"]), dict(data.get("task") or {}))


@dataclass(frozen=True)
class SubtaskResult:
    """How one subtask ended (exactly one per subtask in a job's result)."""

    subtask_id: str
    index: int
    ok: bool
    #: What the agent returned (python agent) or ``None`` (shell agent).
    value: Any = None
    #: ``{"code", "message"}`` when the agent or its sandbox failed.
    error: Mapping[str, str] | None = None
    exit_code: int | None = None
    #: Tail of the agent's output, kept short so a 1000-subtask report stays small.
    output_tail: str = ""
    #: How many workers were given this subtask (more than 1 after a worker or container failure).
    dispatches: int = 1
    worker_id: str = ""
    node_id: str = ""
    sandbox_id: str = ""
    #: The region of the worker's node (``""`` when its node names none).
    region: str = ""
    #: Wall-clock (epoch seconds) start and end of the run that produced this result.
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    @property
    def attempts(self) -> int:
        """The agent's own attempts (fix tries), when its value reports them; else 1."""
        if isinstance(self.value, Mapping) and isinstance(self.value.get("attempts"), int):
            return int(self.value["attempts"])
        return 1

    @property
    def memory_hits(self) -> int:
        """Memories the agent used, when its value reports them (``memory_hits``); else the items
        its searches returned (the runner's count, ``value["memory"]["hits"]``); else 0."""
        if isinstance(self.value, Mapping) and isinstance(self.value.get("memory_hits"), int):
            return int(self.value["memory_hits"])
        use = self.memory
        return use.hits if use is not None else 0

    @property
    def memory(self) -> MemoryUse | None:
        """How the agent used memory (calls, errors, hits), when it used it at all (see
        :mod:`rayflow.wire.memory_use`); ``None`` for an agent that never touched memory."""
        return memory_use_of(self.value)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error"] = dict(self.error) if self.error is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubtaskResult:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class PhaseEvent:
    """One span of a timeline: a phase, on a worker (or the coordinator), from start to end."""

    phase: Phase
    #: ``"coordinator"`` or a worker id.
    actor: str
    #: Wall-clock epoch seconds.
    start: float
    end: float
    #: What the span was about (a subtask id, "sandbox", "search"...).
    label: str = ""
    ok: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "actor": self.actor,
            "start": self.start,
            "end": self.end,
            "label": self.label,
            "ok": self.ok,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseEvent:
        return cls(
            Phase(data["phase"]),
            str(data["actor"]),
            float(data["start"]),
            float(data["end"]),
            str(data.get("label", "")),
            bool(data.get("ok", True)),
        )
