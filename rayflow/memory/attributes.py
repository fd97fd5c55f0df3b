"""Per-tenant item attributes by index label: filter masks and ranking inputs without SQL.

Each tenant has its own HNSW index, which already isolates tenants. Inside a tenant a query may
narrow to a namespace prefix, a domain or an outcome, and every candidate must be scored by
recency and reliability. Both need a few small attributes per item, kept here as numpy arrays
indexed by label (the item's local rowid):

* a filter becomes one vectorised boolean mask that the index consults while it searches
  (masks are cached per filter until the tenant changes);
* scoring a few dozen candidates is one fancy-indexing step instead of a SQL round trip.

These arrays are derived state: the bank fills them from SQLite on open and on every catch-up,
so they can never disagree with the database for longer than one commit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from rayflow.namespace import ROOT, namespace_within

_OUTCOME_CODES = {"success": 1, "failure": 2}


@dataclass(frozen=True)
class FilterKey:
    """What a retrieval narrows to inside its tenant (``None`` = no constraint)."""

    namespace_prefix: str = ROOT
    domain: str | None = None
    outcome: str | None = None

    @property
    def is_unfiltered(self) -> bool:
        return self.namespace_prefix == ROOT and self.domain is None and self.outcome is None


@dataclass(frozen=True)
class RankingInputs:
    """Per-candidate inputs of the score, aligned with the labels asked for."""

    prior: np.ndarray
    successes: np.ndarray
    failures: np.ndarray
    last_active: np.ndarray


class TenantAttributes:
    """Namespace, domain, outcome, liveness and ranking inputs of one tenant's items, by label."""

    _FIELDS = {
        "_namespace": (np.int32, -1),
        "_domain": (np.int32, -1),
        "_outcome": (np.int8, 0),
        "_live": (bool, False),
        "_prior": (np.float64, 0.5),
        "_successes": (np.float64, 0.0),
        "_failures": (np.float64, 0.0),
        "_last_active": (np.float64, 0.0),
    }

    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._namespace_codes: dict[str, int] = {}
        self._domain_codes: dict[str, int] = {}
        for name, (dtype, fill) in self._FIELDS.items():
            setattr(self, name, np.full(capacity, fill, dtype=dtype))
        self._masks: dict[FilterKey, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._live.sum())

    def set(
        self,
        label: int,
        *,
        namespace: str,
        domain: str,
        outcome: str,
        live: bool,
        prior: float = 0.5,
        successes: float = 0.0,
        failures: float = 0.0,
        last_active: float = 0.0,
    ) -> None:
        """Record (or overwrite) one item's attributes."""
        with self._lock:
            self._ensure_capacity(label + 1)
            namespace_code = self._namespace_codes.setdefault(namespace, len(self._namespace_codes))
            domain_code = self._domain_codes.setdefault(domain, len(self._domain_codes))
            outcome_code = _OUTCOME_CODES[outcome]
            filters_changed = (
                self._namespace[label] != namespace_code
                or self._domain[label] != domain_code
                or self._outcome[label] != outcome_code
                or self._live[label] != live
            )
            self._namespace[label] = namespace_code
            self._domain[label] = domain_code
            self._outcome[label] = outcome_code
            self._live[label] = live
            self._prior[label] = prior
            self._successes[label] = successes
            self._failures[label] = failures
            self._last_active[label] = last_active
            if filters_changed:
                self._masks.clear()

    def ranking_inputs(self, labels: np.ndarray) -> RankingInputs:
        """Ranking inputs of ``labels`` (copies, safe to use after the lock is released)."""
        with self._lock:
            return RankingInputs(
                self._prior[labels],
                self._successes[labels],
                self._failures[labels],
                self._last_active[labels],
            )

    def mask(self, key: FilterKey) -> np.ndarray | None:
        """Boolean mask of labels passing ``key``; ``None`` when nothing is filtered."""
        if key.is_unfiltered:
            return None
        with self._lock:
            cached = self._masks.get(key)
            if cached is not None:
                return cached
            allowed = self._live.copy()
            if key.namespace_prefix != ROOT:
                codes = [
                    code
                    for name, code in self._namespace_codes.items()
                    if namespace_within(name, key.namespace_prefix)
                ]
                allowed &= np.isin(self._namespace, np.asarray(codes, dtype=np.int32))
            if key.domain is not None:
                allowed &= self._domain == self._domain_codes.get(key.domain, -2)
            if key.outcome is not None:
                allowed &= self._outcome == _OUTCOME_CODES[key.outcome]
            allowed.setflags(write=False)
            self._masks[key] = allowed
            return allowed

    def _ensure_capacity(self, size: int) -> None:
        current = len(self._live)
        if size <= current:
            return
        grow = max(size, 2 * current) - current
        for name, (dtype, fill) in self._FIELDS.items():
            setattr(self, name, np.concatenate([getattr(self, name), np.full(grow, fill, dtype=dtype)]))
