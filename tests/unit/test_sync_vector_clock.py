"""Vector clocks form a join semilattice under merge, compare agrees with domination, and hostile wire
input only ever raises InvalidInputError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow.errors import InvalidInputError
from rayflow.sync.vector_clock import MAX_COUNTER, MAX_REPLICAS, Order, VectorClock

PROPERTY = settings(max_examples=200, deadline=None)

# A small alphabet and small counters make equal, ordered and concurrent pairs all common.
replicas = st.sampled_from(["a", "b", "c", "d", "e"])
counters = st.integers(min_value=0, max_value=4) | st.integers(min_value=0, max_value=MAX_COUNTER - 1)
clocks = st.dictionaries(replicas, counters, max_size=5).map(VectorClock.of)


# --- the lattice laws ------------------------------------------------------------------------------
@PROPERTY
@given(clocks, clocks)
def test_merge_is_commutative(a: VectorClock, b: VectorClock) -> None:
    assert a.merge(b) == b.merge(a)


@PROPERTY
@given(clocks, clocks, clocks)
def test_merge_is_associative(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@PROPERTY
@given(clocks)
def test_merge_is_idempotent(a: VectorClock) -> None:
    assert a.merge(a) == a


@PROPERTY
@given(clocks, clocks)
def test_merge_dominates_both_operands(a: VectorClock, b: VectorClock) -> None:
    merged = a.merge(b)
    assert merged.dominates(a) and merged.dominates(b)


@PROPERTY
@given(clocks, clocks, clocks)
def test_merge_is_the_least_upper_bound(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    upper = c.merge(a).merge(b)  # an arbitrary clock dominating both
    assert upper.dominates(a.merge(b))
    if c.dominates(a) and c.dominates(b):
        assert c.dominates(a.merge(b))


@PROPERTY
@given(clocks)
def test_the_empty_clock_is_the_bottom(a: VectorClock) -> None:
    assert VectorClock() <= a
    assert a.merge(VectorClock()) == a


# --- compare and domination ------------------------------------------------------------------------
@PROPERTY
@given(clocks, clocks)
def test_compare_agrees_with_domination(a: VectorClock, b: VectorClock) -> None:
    order = a.compare(b)
    assert (order is Order.EQUAL) == (a == b)
    assert (order is Order.BEFORE) == (a <= b and a != b)
    assert (order is Order.AFTER) == (b <= a and a != b)
    assert (order is Order.CONCURRENT) == (not a.dominates(b) and not b.dominates(a))


@PROPERTY
@given(clocks, clocks)
def test_compare_is_antisymmetric(a: VectorClock, b: VectorClock) -> None:
    mirrored = {Order.BEFORE: Order.AFTER, Order.AFTER: Order.BEFORE}
    order = a.compare(b)
    assert b.compare(a) is mirrored.get(order, order)
    if a.dominates(b) and b.dominates(a):
        assert a == b


@PROPERTY
@given(clocks, clocks)
def test_strictly_before_means_dominated_and_different(a: VectorClock, b: VectorClock) -> None:
    assert (a < b) == (a.compare(b) is Order.BEFORE)


@PROPERTY
@given(clocks, replicas, counters)
def test_advance_never_lowers_and_reaches_the_seq(a: VectorClock, replica: str, seq: int) -> None:
    advanced = a.advance(replica, seq)
    assert advanced.dominates(a)
    assert advanced.get(replica) == max(a.get(replica), seq)


# --- normal form and wire --------------------------------------------------------------------------
@PROPERTY
@given(clocks)
def test_wire_round_trip_gives_an_equal_clock(a: VectorClock) -> None:
    back = VectorClock.from_wire(a.to_wire())
    assert back == a and hash(back) == hash(a)


def test_zero_entries_are_dropped_so_equal_clocks_are_equal_and_hash_equal() -> None:
    padded = VectorClock.of({"b": 2, "a": 0, "c": 0})
    assert padded == VectorClock.of({"b": 2}) and hash(padded) == hash(VectorClock.of({"b": 2}))
    assert len(padded) == 1 and padded.to_wire() == {"b": 2}
    assert VectorClock.of({"a": 0}) == VectorClock()


def test_missing_replicas_read_as_zero() -> None:
    assert VectorClock().get("anyone") == 0


def test_items_are_sorted_by_replica() -> None:
    assert VectorClock.of({"b": 1, "a": 2}).items() == (("a", 2), ("b", 1))


def test_clocks_built_from_entries_are_validated_too() -> None:
    assert VectorClock((("a", 1), ("b", 0))) == VectorClock.of({"a": 1})
    with pytest.raises(InvalidInputError):
        VectorClock((("a", -1),))
    with pytest.raises(InvalidInputError):
        VectorClock((("a", 1), ("a", 2)))


# --- hostile input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        [["a", 1]],
        "a=1",
        7,
        {"a": True},
        {"a": False},
        {"a": -1},
        {"a": 1.0},
        {"a": "1"},
        {"a": None},
        {"a": [1]},
        {"a": {"b": 1}},
        {"a": MAX_COUNTER},
        {"": 1},
        {"x" * 129: 1},
        {1: 1},
        {b"a": 1},
        {None: 1},
    ],
)
def test_malformed_wire_clocks_are_refused(obj: object) -> None:
    with pytest.raises(InvalidInputError):
        VectorClock.from_wire(obj)


def test_a_clock_naming_too_many_replicas_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        VectorClock.from_wire({f"r{i}": 1 for i in range(MAX_REPLICAS + 1)})
    assert len(VectorClock.from_wire({f"r{i}": 1 for i in range(MAX_REPLICAS)})) == MAX_REPLICAS


def test_merging_past_the_replica_bound_is_refused() -> None:
    left = VectorClock.of({f"l{i}": 1 for i in range(MAX_REPLICAS)})
    right = VectorClock.of({f"r{i}": 1 for i in range(MAX_REPLICAS)})
    with pytest.raises(InvalidInputError):
        left.merge(right)
    with pytest.raises(InvalidInputError):
        left.advance("new", 1)


@pytest.mark.parametrize(
    "replica, seq", [("", 1), (7, 1), ("a", -1), ("a", True), ("a", 1.5), ("a", MAX_COUNTER)]
)
def test_advance_refuses_malformed_arguments(replica: object, seq: object) -> None:
    with pytest.raises(InvalidInputError):
        VectorClock().advance(replica, seq)  # type: ignore[arg-type]


def test_of_refuses_a_non_mapping() -> None:
    with pytest.raises(InvalidInputError):
        VectorClock.of([("a", 1)])  # type: ignore[arg-type]


wire_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=3)
    ),
    max_leaves=8,
)


@PROPERTY
@given(wire_junk)
def test_arbitrary_wire_values_yield_a_clock_or_invalid_input(obj: object) -> None:
    try:
        clock = VectorClock.from_wire(obj)
    except InvalidInputError:
        return
    assert VectorClock.from_wire(clock.to_wire()) == clock
