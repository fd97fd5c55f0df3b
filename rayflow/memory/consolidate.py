"""Consolidation of a tenant's memory: merge duplicates, link contradictions, prune stale items.

The planner only reads; it returns the mutations that the bank then commits in one transaction
through the store's single mutation path, so a consolidation replicates like any other write.

* Duplicates (same namespace and outcome, cosine at or above ``duplicate_threshold``): the newer
  item becomes a tombstone with a ``duplicate_of`` link to the older one, and its use counts move
  to the survivor under origins derived from the duplicate's id. Keying the moved counts that way
  keeps them grow-only per origin, so two replicas that run the same merge agree instead of
  counting twice.
* Contradictions (opposite outcomes, cosine at or above ``contradiction_threshold``): a strategy
  that worked and a lesson that says the same approach failed are linked ``contradicts``, and
  both are kept: which one holds depends on context that the judge of a later task will see.
* Pruning: items whose reliability fell below ``prune_below_reliability`` and that nobody used for
  ``stale_after_days`` are deleted (tombstones keep the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import apsw
import numpy as np

from rayflow.config import MemoryConfig
from rayflow.memory.index import TenantIndex
from rayflow.memory.scoring import SECONDS_PER_DAY
from rayflow.memory.store import Mutation
from rayflow.wire.memory_records import LinkKind, beta_reliability

#: Nearest neighbours examined per item.
NEIGHBOURS = 10


@dataclass
class ConsolidationPlan:
    """Mutations to commit, and what they amount to."""

    mutations: list[Mutation] = field(default_factory=list)
    examined: int = 0
    merged_pairs: list[tuple[str, str]] = field(default_factory=list)
    contradictions: int = 0
    pruned: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    label: int
    id: str
    namespace: str
    outcome: str
    prior: float
    created_at: float
    last_used_at: float
    successes: int
    failures: int


def plan_consolidation(
    cfg: MemoryConfig, conn: apsw.Connection, tenant: str, index: TenantIndex, *, full: bool, now: float
) -> ConsolidationPlan:
    """Work out one consolidation of ``tenant`` without changing anything.

    Takes the memory settings and a read connection, not the bank: planning needs nothing else,
    and the bank (which commits the plan) is then the only one of the two that knows the other.
    """
    plan = ConsolidationPlan(
        params={
            "full": full,
            "duplicate_threshold": cfg.duplicate_threshold,
            "contradiction_threshold": cfg.contradiction_threshold,
            "prune_below_reliability": cfg.prune_below_reliability,
            "stale_after_days": cfg.stale_after_days,
        }
    )
    (last_run,) = conn.execute(
        "SELECT max(started_at) FROM consolidation_runs WHERE tenant = ?", (tenant,)
    ).fetchone()
    rows = [
        _Row(*r)
        for r in conn.execute(
            "SELECT i.rowid, i.id, i.namespace, i.outcome, i.prior_confidence, i.created_at, "
            "coalesce(i.last_used_at, 0), "
            "(SELECT coalesce(sum(successes), 0) FROM item_counters c WHERE c.item_id = i.id), "
            "(SELECT coalesce(sum(failures), 0) FROM item_counters c WHERE c.item_id = i.id) "
            "FROM items i WHERE i.tenant = ? AND i.deleted = 0 ORDER BY i.created_at, i.id",
            (tenant,),
        )
    ]
    by_label = {row.label: row for row in rows}
    contradicting = {
        frozenset(pair)
        for pair in conn.execute(
            "SELECT src_id, dst_id FROM links WHERE tenant = ? AND kind = 'contradicts'", (tenant,)
        )
    }
    removed: set[str] = set()
    to_examine = rows if full or last_run is None else [r for r in rows if r.created_at >= last_run]
    for row in to_examine:
        if row.id in removed:
            continue
        plan.examined += 1
        vector = index.vectors(np.array([row.label], dtype=np.int64))[0]
        labels, sims = index.query(vector, NEIGHBOURS + 1)
        for label, sim in zip(labels.tolist(), sims.tolist()):
            other = by_label.get(label)
            if other is None or other.id == row.id or other.id in removed:
                continue
            if (
                sim >= cfg.duplicate_threshold
                and other.outcome == row.outcome
                and other.namespace == row.namespace
            ):
                survivor, duplicate = sorted((row, other), key=lambda r: (r.created_at, r.id))
                plan.mutations.extend(_merge(conn, survivor, duplicate, sim, now))
                plan.merged_pairs.append((duplicate.id, survivor.id))
                removed.add(duplicate.id)
                if duplicate.id == row.id:
                    break
            elif sim >= cfg.contradiction_threshold and other.outcome != row.outcome:
                pair = frozenset((row.id, other.id))
                if pair in contradicting:
                    continue
                contradicting.add(pair)
                src, dst = sorted(pair)
                plan.mutations.append(
                    Mutation(
                        "link.put",
                        f"{src}>{dst}",
                        {
                            "src_id": src,
                            "dst_id": dst,
                            "kind": LinkKind.CONTRADICTS.value,
                            "created_at": now,
                            "note": f"cosine {sim:.3f}",
                        },
                    )
                )
                plan.contradictions += 1
    stale_seconds = cfg.stale_after_days * SECONDS_PER_DAY
    for row in rows:
        if row.id in removed:
            continue
        reliability = beta_reliability(row.prior, row.successes, row.failures, cfg.prior_strength)
        idle = now - max(row.created_at, row.last_used_at)
        if reliability < cfg.prune_below_reliability and idle > stale_seconds:
            reason = f"pruned: reliability {reliability:.2f}, idle {idle / SECONDS_PER_DAY:.0f} days"
            plan.mutations.append(Mutation("item.delete", row.id, {"reason": reason}))
            removed.add(row.id)
            plan.pruned += 1
    return plan


def _merge(conn: Any, survivor: _Row, duplicate: _Row, sim: float, now: float) -> list[Mutation]:
    mutations = [
        Mutation(
            "link.put",
            f"{duplicate.id}>{survivor.id}",
            {
                "src_id": duplicate.id,
                "dst_id": survivor.id,
                "kind": LinkKind.DUPLICATE_OF.value,
                "created_at": now,
                "note": f"cosine {sim:.3f}",
            },
        ),
        Mutation("item.delete", duplicate.id, {"reason": f"duplicate_of {survivor.id}"}),
    ]
    for origin, uses, successes, failures in conn.execute(
        "SELECT origin, uses, successes, failures FROM item_counters WHERE item_id = ?", (duplicate.id,)
    ):
        mutations.append(
            Mutation(
                "counter.set",
                survivor.id,
                {
                    "origin": f"{origin}<{duplicate.id}",
                    "uses": uses,
                    "successes": successes,
                    "failures": failures,
                },
            )
        )
    return mutations
