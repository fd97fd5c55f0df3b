import numpy as np

from rayflow.memory.scoring import combined_score, mmr_order, recency
from rayflow.wire.memory_records import beta_reliability


def test_reliability_starts_at_the_prior_and_learns_from_outcomes():
    assert beta_reliability(0.5, 0, 0) == 0.5
    assert beta_reliability(0.5, 8, 0) > 0.85
    assert beta_reliability(0.5, 0, 8) < 0.15
    assert beta_reliability(0.9, 0, 1) < 0.9


def test_many_outcomes_outweigh_the_prior():
    assert abs(beta_reliability(0.9, 10, 90) - 0.1) < 0.02


def test_recency_halves_after_one_half_life():
    now = 1_000_000.0
    values = recency(np.array([now, now - 30 * 86400, now + 50]), now, 30.0)
    assert np.allclose(values, [1.0, 0.5, 1.0])


def test_combined_score_uses_weights_as_given():
    s = combined_score(np.array([1.0]), np.array([0.0]), np.array([1.0]),
                       weight_similarity=0.5, weight_recency=0.3, weight_reliability=0.2)
    assert np.allclose(s, [0.7])


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_mmr_with_lambda_one_is_plain_score_order():
    scores = np.array([0.2, 0.9, 0.5, 0.7])
    vectors = np.array([_unit([1, 0]), _unit([1, 0.01]), _unit([0, 1]), _unit([1, 0.02])])
    assert mmr_order(scores, vectors, 4, 1.0) == [1, 3, 2, 0]


def test_mmr_lower_lambda_prefers_a_different_item_over_a_near_duplicate():
    scores = np.array([0.90, 0.89, 0.60])
    vectors = np.array([_unit([1, 0]), _unit([1, 0.001]), _unit([0, 1])])
    assert mmr_order(scores, vectors, 2, 1.0) == [0, 1]
    assert mmr_order(scores, vectors, 2, 0.5) == [0, 2]


def test_mmr_never_returns_more_than_it_has():
    assert mmr_order(np.array([0.3]), np.array([_unit([1, 0])]), 5, 0.5) == [0]
    assert mmr_order(np.zeros(0), np.zeros((0, 2)), 3, 0.5) == []
