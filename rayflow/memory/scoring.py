"""Ranking of retrieved memory: similarity + recency + reliability, then MMR for diversity.

Pure functions over numpy arrays, so ranking is tested without storage or an index.
"""

from __future__ import annotations

import math

import numpy as np

SECONDS_PER_DAY = 86_400.0


def beta_reliability_array(
    prior: np.ndarray, successes: np.ndarray, failures: np.ndarray, strength: float = 2.0
) -> np.ndarray:
    """Vectorised :func:`rayflow.wire.memory_records.beta_reliability`."""
    alpha = prior * strength + successes
    beta = (1.0 - prior) * strength + failures
    return alpha / (alpha + beta)


def recency(last_active: np.ndarray, now: float, half_life_days: float) -> np.ndarray:
    """Exponential decay in [0, 1]: 1 for just now, 0.5 after one half-life (future times count as now)."""
    age_days = np.maximum(now - last_active, 0.0) / SECONDS_PER_DAY
    return np.exp(-math.log(2.0) * age_days / half_life_days)


def combined_score(
    similarity: np.ndarray,
    recency_value: np.ndarray,
    reliability: np.ndarray,
    *,
    weight_similarity: float,
    weight_recency: float,
    weight_reliability: float,
) -> np.ndarray:
    """Weighted sum of the three components; weights are used as given (they need not sum to 1)."""
    return (
        weight_similarity * similarity + weight_recency * recency_value + weight_reliability * reliability
    )


def mmr_order(scores: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance: pick ``k`` indices, trading relevance against redundancy.

    At each step the pick maximises ``lam * relevance - (1 - lam) * max_similarity_to_picked``,
    where relevance is the score rescaled to [0, 1] over the candidates (so both terms share a
    scale and ``lam`` means what it says): ``lam = 1`` returns the candidates in score order,
    ``lam = 0`` ignores the score after the first pick and spreads the picks as far apart as
    possible. ``vectors`` must be L2-normalised rows.
    """
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return []
    span = float(scores.max() - scores.min())
    relevance = (scores - scores.min()) / span if span > 0 else np.ones(n)
    if lam >= 1.0:
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
    # One matrix-vector product per pick (a Gram matrix of the transposed view takes a slow BLAS
    # path on some builds, and most of it would go unused).
    picked = [int(np.argmax(scores))]
    redundancy = vectors @ vectors[picked[0]]
    gain = np.empty(n)
    available = np.ones(n, dtype=bool)
    available[picked[0]] = False
    while len(picked) < k:
        np.multiply(relevance, lam, out=gain)
        gain -= (1.0 - lam) * redundancy
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        np.maximum(redundancy, vectors @ vectors[best], out=redundancy)
    return picked
