"""Per-tenant filter masks over index labels, so scoped retrieval never scans rows in Python.

Each tenant has its own HNSW index, which already isolates tenants. Inside a tenant, a query may
narrow to a namespace prefix, a domain or an outcome. Those attributes are kept here as small
numpy arrays indexed by label (the item's local rowid); a filter becomes one vectorised boolean
mask that the index consults while it searches. Masks are cached per filter and dropped when the
tenant changes.
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


class TenantAttributes:
    """Namespace, domain, outcome and liveness of every item of one tenant, by label."""

    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._namespace_codes: dict[str, int] = {}
        self._domain_codes: dict[str, int] = {}
        self._namespace = np.full(capacity, -1, dtype=np.int32)
        self._domain = np.full(capacity, -1, dtype=np.int32)
        self._outcome = np.zeros(capacity, dtype=np.int8)
        self._live = np.zeros(capacity, dtype=bool)
        self._masks: dict[FilterKey, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._live.sum())

    def set(self, label: int, *, namespace: str, domain: str, outcome: str, live: bool) -> None:
        """Record (or overwrite) one item's attributes."""
        with self._lock:
            self._ensure_capacity(label + 1)
            self._namespace[label] = self._namespace_codes.setdefault(namespace, len(self._namespace_codes))
            self._domain[label] = self._domain_codes.setdefault(domain, len(self._domain_codes))
            self._outcome[label] = _OUTCOME_CODES[outcome]
            self._live[label] = live
            self._masks.clear()

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
                code = self._domain_codes.get(key.domain, -2)
                allowed &= self._domain == code
            if key.outcome is not None:
                allowed &= self._outcome == _OUTCOME_CODES[key.outcome]
            allowed.setflags(write=False)
            self._masks[key] = allowed
            return allowed

    def _ensure_capacity(self, size: int) -> None:
        if size <= len(self._live):
            return
        new_size = max(size, 2 * len(self._live))
        grow = new_size - len(self._live)
        self._namespace = np.concatenate([self._namespace, np.full(grow, -1, dtype=np.int32)])
        self._domain = np.concatenate([self._domain, np.full(grow, -1, dtype=np.int32)])
        self._outcome = np.concatenate([self._outcome, np.zeros(grow, dtype=np.int8)])
        self._live = np.concatenate([self._live, np.zeros(grow, dtype=bool)])
