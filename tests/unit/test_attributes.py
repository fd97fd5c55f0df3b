import numpy as np

from rayflow.memory.attributes import FilterKey, TenantAttributes


def make():
    attrs = TenantAttributes(capacity=2)
    attrs.set(1, namespace="swarm/a", domain="backend", outcome="success", live=True, prior=0.7, successes=2)
    attrs.set(2, namespace="swarm/ab", domain="backend", outcome="failure", live=True)
    attrs.set(3, namespace="swarm/a/x", domain="infra", outcome="success", live=True)
    attrs.set(4, namespace="swarm/a", domain="backend", outcome="success", live=False)
    return attrs


def test_unfiltered_queries_need_no_mask():
    assert make().mask(FilterKey()) is None


def test_namespace_prefix_mask_matches_whole_segments_and_skips_deleted():
    mask = make().mask(FilterKey(namespace_prefix="swarm/a"))
    assert np.flatnonzero(mask).tolist() == [1, 3]


def test_domain_and_outcome_masks_combine():
    attrs = make()
    assert np.flatnonzero(attrs.mask(FilterKey(domain="backend"))).tolist() == [1, 2]
    assert np.flatnonzero(attrs.mask(FilterKey(domain="backend", outcome="failure"))).tolist() == [2]
    assert not attrs.mask(FilterKey(domain="unknown")).any()


def test_masks_follow_changes():
    attrs = make()
    before = attrs.mask(FilterKey(outcome="failure"))
    attrs.set(3, namespace="swarm/a/x", domain="infra", outcome="failure", live=True)
    after = attrs.mask(FilterKey(outcome="failure"))
    assert np.flatnonzero(before).tolist() == [2]
    assert np.flatnonzero(after).tolist() == [2, 3]


def test_ranking_inputs_are_aligned_with_the_labels_asked_for():
    inputs = make().ranking_inputs(np.array([2, 1]))
    assert inputs.prior.tolist() == [0.5, 0.7]
    assert inputs.successes.tolist() == [0.0, 2.0]


def test_capacity_grows_for_large_labels():
    attrs = TenantAttributes(capacity=1)
    attrs.set(5000, namespace="n", domain="", outcome="success", live=True)
    assert len(attrs) == 1
