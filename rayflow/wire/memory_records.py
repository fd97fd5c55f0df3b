"""Plain data records of the ReasoningBank: memory items, trajectories, verdicts, scored results.

They are frozen dataclasses with no behaviour beyond small derived values, so they can cross
thread, process and (later) network boundaries as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Outcome(str, Enum):
    """Whether a memory item was learned from a success or from a failure."""

    SUCCESS = "success"
    FAILURE = "failure"


class LinkKind(str, Enum):
    """How two memory items relate."""

    DUPLICATE_OF = "duplicate_of"
    CONTRADICTS = "contradicts"
    REFINES = "refines"


@dataclass(frozen=True)
class ItemVersion:
    """Another version of an item, made concurrently with the one shown (in another region,
    before either had seen the other): kept until an edit that has seen both reconciles them."""

    replica: str
    title: str
    description: str
    content: str
    tags: tuple[str, ...] = ()
    domain: str = ""
    outcome: Outcome = Outcome.SUCCESS


@dataclass(frozen=True)
class MemoryItem:
    """One distilled piece of reasoning: a strategy that worked, or a lesson from a failure."""

    id: str
    tenant: str
    namespace: str
    title: str
    description: str
    content: str
    tags: tuple[str, ...] = ()
    domain: str = ""
    outcome: Outcome = Outcome.SUCCESS
    #: Prior confidence given at store time (0..1); the live value is :attr:`reliability`.
    prior_confidence: float = 0.5
    uses: int = 0
    successes: int = 0
    failures: int = 0
    created_at: float = 0.0
    last_used_at: float | None = None
    source_task: str = ""
    source_agent: str = ""
    embedding_model: str = ""
    dim: int = 0
    #: Pseudo-observations the prior is worth, as configured in the bank that read this item
    #: (``memory.prior_strength``), so the reliability shown is the one that ranks.
    prior_strength: float = 2.0
    #: Concurrent versions not reconciled yet (empty when the item's edits are ordered).
    siblings: tuple[ItemVersion, ...] = ()

    @property
    def reliability(self) -> float:
        """Posterior mean of a Beta prior seeded by ``prior_confidence``, updated by outcomes."""
        return beta_reliability(self.prior_confidence, self.successes, self.failures, self.prior_strength)


def beta_reliability(prior: float, successes: float, failures: float, strength: float = 2.0) -> float:
    """Posterior mean of a Beta belief that using an item leads to success.

    The stored confidence ``prior`` acts as ``strength`` pseudo-observations
    (``alpha0 = prior * strength``, ``beta0 = (1 - prior) * strength``); every reported outcome
    then moves the estimate, and many outcomes outweigh the prior. Plain Python (the records cross
    into sandboxes, which carry no numpy); :func:`rayflow.memory.scoring.beta_reliability_array` is
    the vectorised twin the ranking uses.
    """
    alpha = prior * strength + successes
    beta = (1.0 - prior) * strength + failures
    return alpha / (alpha + beta)


@dataclass(frozen=True)
class Step:
    """One action of an agent and what it observed."""

    action: str
    observation: str = ""


@dataclass(frozen=True)
class Trajectory:
    """What an agent did for one task, with the signals a judge can read."""

    task_id: str
    query: str
    steps: tuple[Step, ...] = ()
    namespace: str = "default"
    domain: str = ""
    agent_id: str = ""
    exit_code: int | None = None
    tests_passed: int | None = None
    tests_failed: int | None = None
    reward: float | None = None
    final_output: str = ""
    #: Ids of memory items that were retrieved and used while doing this task.
    used_item_ids: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on a trajectory."""

    outcome: Outcome
    #: How sure the judge is, 0..1.
    confidence: float
    reason: str
    judge: str


@dataclass(frozen=True)
class Lesson:
    """A memory item to be stored, as produced by distillation (no id or counters yet)."""

    title: str
    description: str
    content: str
    outcome: Outcome
    tags: tuple[str, ...] = ()
    confidence: float = 0.5


@dataclass(frozen=True)
class ScoredItem:
    """A retrieved item with each component of its score, so a person can see why it ranked."""

    item: MemoryItem
    similarity: float
    recency: float
    reliability: float
    score: float
    #: Rank after MMR re-ranking (0 = first).
    rank: int
