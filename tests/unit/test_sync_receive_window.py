"""Causal delivery: whatever order deltas arrive in, a receive window hands each out exactly once, after
everything it depends on, with bounded memory; and deltas from the wire are validated strictly."""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow.errors import InvalidInputError, PayloadTooLargeError
from rayflow.sync.delta import MAX_DELTA_BYTES, Delta, DeltaBatch
from rayflow.sync.receive_window import ReceiveWindow
from rayflow.sync.vector_clock import MAX_REPLICAS, VectorClock

PROPERTY = settings(max_examples=200, deadline=None)


def delta(origin: str, seq: int, tenant: str = "t", body: bytes = b"", **context: int) -> Delta:
    """A delta whose context is its origin's predecessor plus the other replicas named."""
    return Delta(origin, seq, tenant, VectorClock.of({**context, origin: seq - 1}), body)


# --- causal histories ------------------------------------------------------------------------------
@dataclass(frozen=True)
class History:
    """Deltas made by several replicas that now and then receive each other's state."""

    deltas: tuple[Delta, ...]

    @property
    def final(self) -> VectorClock:
        clock = VectorClock()
        for d in self.deltas:
            clock = clock.advance(d.origin, d.seq)
        return clock


@st.composite
def histories(draw: st.DrawFn, max_steps: int = 30) -> History:
    names = ["r1", "r2", "r3", "r4"][: draw(st.integers(min_value=1, max_value=4))]
    vectors = {name: VectorClock() for name in names}
    deltas: list[Delta] = []
    steps = draw(
        st.lists(st.tuples(st.booleans(), st.sampled_from(names), st.sampled_from(names)), max_size=max_steps)
    )
    for receives, maker, source in steps:
        if receives:
            # The maker catches up with everything the source has seen (a sync round).
            vectors[maker] = vectors[maker].merge(vectors[source])
            continue
        context = vectors[maker]
        seq = context.get(maker) + 1
        deltas.append(Delta(maker, seq, "t", context, f"{maker}:{seq}".encode()))
        vectors[maker] = context.advance(maker, seq)
    return History(tuple(deltas))


def assert_causal(delivered: list[Delta], start: VectorClock | None = None) -> VectorClock:
    """Each delta comes right after its origin's previous one and after everything its context names."""
    applied = start or VectorClock()
    for d in delivered:
        assert d.seq == applied.get(d.origin) + 1
        assert d.context <= applied
        applied = applied.advance(d.origin, d.seq)
    return applied


def missing_seqs(window: ReceiveWindow) -> set[tuple[str, int]]:
    return {
        (origin, seq)
        for origin, ranges in window.gaps().items()
        for lo, hi in ranges
        for seq in range(lo, hi + 1)
    }


# --- properties over random interleavings ----------------------------------------------------------
@PROPERTY
@given(st.data())
def test_every_delta_is_delivered_exactly_once_in_causal_order(data: st.DataObject) -> None:
    history = data.draw(histories())
    extra = data.draw(st.lists(st.sampled_from(history.deltas), max_size=10)) if history.deltas else []
    offers = data.draw(st.permutations([*history.deltas, *extra]))
    window = ReceiveWindow(VectorClock())
    delivered: list[Delta] = []
    for d in offers:
        delivered.extend(window.offer(d))
    assert sorted(d.key for d in delivered) == sorted(d.key for d in history.deltas)
    assert assert_causal(delivered) == history.final == window.applied == window.wants()
    assert window.gaps() == {}
    stats = window.stats
    assert (stats.buffered, stats.buffered_bytes, stats.dropped, stats.rejected) == (0, 0, 0, 0)
    assert stats.delivered == len(history.deltas) and stats.duplicates == len(extra)


@PROPERTY
@given(st.data())
def test_with_a_tiny_buffer_pulling_again_delivers_everything_exactly_once(data: st.DataObject) -> None:
    history = data.draw(histories())
    window = ReceiveWindow(
        VectorClock(),
        max_buffered=data.draw(st.integers(min_value=0, max_value=3)),
        max_buffered_bytes=data.draw(st.integers(min_value=0, max_value=200)),
    )
    delivered: list[Delta] = []
    for d in data.draw(st.permutations(history.deltas)):
        delivered.extend(window.offer(d))
    shuffle = data.draw(st.randoms(use_true_random=False))
    rounds = 0
    while window.applied != history.final:
        # A pull: the peer sends everything above what the window wants, in whatever order.
        wants = window.wants()
        answer = [d for d in history.deltas if d.seq > wants.get(d.origin)]
        shuffle.shuffle(answer)
        before = len(delivered)
        for d in answer:
            delivered.extend(window.offer(d))
        assert len(delivered) > before, "a pull round must make progress"
        rounds += 1
        assert rounds <= len(history.deltas)
    assert sorted(d.key for d in delivered) == sorted(d.key for d in history.deltas)
    assert_causal(delivered)
    assert window.stats.buffered == 0 and window.gaps() == {}


@PROPERTY
@given(st.data())
def test_gaps_are_exactly_the_known_seqs_neither_applied_nor_buffered(data: st.DataObject) -> None:
    history = data.draw(histories())
    window = ReceiveWindow(VectorClock())
    offered: set[tuple[str, int]] = set()
    delivered: set[tuple[str, int]] = set()
    known = VectorClock()
    for d in data.draw(st.permutations(history.deltas)):
        offered.add(d.key)
        delivered.update(x.key for x in window.offer(d))
        known = known.merge(d.context).advance(d.origin, d.seq)
        applied = window.applied
        below_known = {
            (origin, seq)
            for origin, high in known.items()
            for seq in range(applied.get(origin) + 1, high + 1)
        }
        buffered = offered - delivered
        assert window.stats.buffered == len(buffered)
        assert missing_seqs(window) == below_known - buffered
        assert (window.gaps() == {}) == (not buffered and known <= applied)


@PROPERTY
@given(st.data())
def test_after_a_snapshot_only_uncovered_deltas_are_delivered(data: st.DataObject) -> None:
    history = data.draw(histories())
    window = ReceiveWindow(VectorClock())
    early = data.draw(st.lists(st.sampled_from(history.deltas), max_size=8)) if history.deltas else []
    delivered_early = {out.key for d in early for out in window.offer(d)}
    # A snapshot holds a causally closed prefix: the state some delta's maker had, plus that delta.
    cut = data.draw(st.sampled_from(history.deltas)) if history.deltas else None
    snapshot = VectorClock() if cut is None else cut.context.advance(cut.origin, cut.seq)
    delivered = window.reset_to(snapshot)
    # The snapshot replaces the state, even where it is older than what the window had delivered.
    still_buffered = {d.key for d in early if d.seq > snapshot.get(d.origin)} - delivered_early
    assert window.stats.buffered == len(still_buffered) - len(delivered)
    for d in data.draw(st.permutations(history.deltas)):
        delivered.extend(window.offer(d))
    uncovered = sorted(d.key for d in history.deltas if d.seq > snapshot.get(d.origin))
    assert sorted(d.key for d in delivered) == uncovered
    assert assert_causal(delivered, snapshot) == history.final == window.applied
    assert window.gaps() == {} and window.stats.buffered_bytes == 0


# --- single behaviours -----------------------------------------------------------------------------
def test_deltas_in_order_are_delivered_at_once() -> None:
    window = ReceiveWindow(VectorClock())
    assert window.offer(delta("a", 1)) == [delta("a", 1)]
    assert window.offer(delta("a", 2)) == [delta("a", 2)]
    assert window.applied == VectorClock.of({"a": 2})


def test_an_early_delta_waits_for_its_predecessor_then_both_come_out_in_order() -> None:
    window = ReceiveWindow(VectorClock())
    assert window.offer(delta("a", 2)) == []
    assert window.gaps() == {"a": [(1, 1)]}
    assert window.offer(delta("a", 1)) == [delta("a", 1), delta("a", 2)]
    assert window.gaps() == {}


def test_a_delta_waits_for_the_changes_of_other_origins_its_context_names() -> None:
    window = ReceiveWindow(VectorClock())
    dependent = delta("b", 1, c=2)  # b made its change after seeing c's first two
    assert window.offer(dependent) == []
    assert window.gaps() == {"c": [(1, 2)]}
    assert window.offer(delta("c", 1)) == [delta("c", 1)]
    assert window.gaps() == {"c": [(2, 2)]}
    assert window.offer(delta("c", 2)) == [delta("c", 2), dependent]


def test_a_delta_already_applied_is_a_counted_duplicate() -> None:
    window = ReceiveWindow(VectorClock.of({"a": 3}))
    assert window.offer(delta("a", 2)) == []
    assert window.stats.duplicates == 1 and window.stats.delivered == 0


def test_offering_a_buffered_delta_again_is_a_counted_duplicate() -> None:
    window = ReceiveWindow(VectorClock())
    window.offer(delta("a", 2))
    window.offer(delta("a", 2))
    assert window.stats.buffered == 1 and window.stats.duplicates == 1


def test_a_full_buffer_drops_the_delta_and_the_gaps_report_it() -> None:
    window = ReceiveWindow(VectorClock(), max_buffered=1)
    window.offer(delta("a", 2))
    assert window.offer(delta("a", 3)) == []
    assert window.stats.dropped == 1 and window.stats.buffered == 1
    assert window.gaps() == {"a": [(1, 1), (3, 3)]}
    assert window.offer(delta("a", 1)) == [delta("a", 1), delta("a", 2)]
    assert window.offer(delta("a", 3)) == [delta("a", 3)]


def test_the_byte_bound_drops_a_delta_too_big_to_hold() -> None:
    window = ReceiveWindow(VectorClock(), max_buffered_bytes=100)
    assert window.offer(delta("a", 2, body=b"x" * 200)) == []
    assert window.stats.dropped == 1 and window.stats.buffered_bytes == 0


def test_a_deliverable_delta_is_never_dropped_even_with_no_buffer() -> None:
    window = ReceiveWindow(VectorClock(), max_buffered=0, max_buffered_bytes=0)
    assert window.offer(delta("a", 1, body=b"x" * 1000)) == [delta("a", 1, body=b"x" * 1000)]


def test_deltas_whose_contexts_wait_on_each_other_are_rejected_not_held_forever() -> None:
    window = ReceiveWindow(VectorClock())
    window.offer(delta("x", 1, y=1))
    window.offer(delta("y", 1, x=1))
    assert window.stats.rejected == 2 and window.stats.buffered == 0
    assert window.gaps() == {"x": [(1, 1)], "y": [(1, 1)]}
    assert window.offer(delta("x", 1)) == [delta("x", 1)]


def test_reset_discards_covered_deltas_and_delivers_newly_deliverable_ones() -> None:
    window = ReceiveWindow(VectorClock())
    window.offer(delta("a", 2))
    window.offer(delta("a", 4))
    assert window.reset_to(VectorClock.of({"a": 3})) == [delta("a", 4)]
    assert window.stats.buffered == 0 and window.applied == VectorClock.of({"a": 4})


def test_a_window_refuses_to_track_more_replicas_than_a_clock_may_name() -> None:
    window = ReceiveWindow(VectorClock.of({f"r{i}": 1 for i in range(MAX_REPLICAS)}))
    with pytest.raises(InvalidInputError):
        window.offer(delta("newcomer", 1))
    assert window.stats.delivered == 0


@pytest.mark.parametrize(
    "kwargs", [{"max_buffered": -1}, {"max_buffered_bytes": True}, {"max_buffered": 1.5}]
)
def test_a_window_refuses_malformed_bounds(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        ReceiveWindow(VectorClock(), **kwargs)  # type: ignore[arg-type]


def test_a_window_is_offered_deltas_only() -> None:
    with pytest.raises(InvalidInputError):
        ReceiveWindow(VectorClock()).offer(["a", 1, "t", {}, b""])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        ReceiveWindow({"a": 1})  # type: ignore[arg-type]


# --- deltas on the wire ----------------------------------------------------------------------------
def test_a_delta_survives_the_wire() -> None:
    original = delta("a", 3, tenant="acme", body=b"\x00\xff", b=7)
    assert Delta.decode(original.encode()) == original
    assert Delta.from_wire(original.to_wire()) == original


GOOD = ["a", 2, "t", {"a": 1, "b": 4}, b"body"]


def with_field(index: int, value: object) -> list[object]:
    wire = list(GOOD)
    wire[index] = value
    return wire


@pytest.mark.parametrize(
    "obj",
    [
        None,
        "delta",
        {"origin": "a"},
        GOOD[:4],
        [*GOOD, "extra"],
        with_field(0, ""),
        with_field(0, 5),
        with_field(0, None),
        with_field(0, "a" * 129),
        with_field(1, 0),
        with_field(1, -2),
        with_field(1, True),
        with_field(1, 2.0),
        with_field(1, "2"),
        with_field(1, 2**63),
        with_field(2, ""),
        with_field(2, None),
        with_field(2, "t" * 129),
        with_field(2, ["t"]),
        with_field(3, None),
        with_field(3, [["a", 1]]),
        with_field(3, {"a": True}),
        with_field(3, {"a": 1, "b": -1}),
        with_field(3, {"a": 1, "b": {"c": 1}}),
        with_field(3, {"a": 1, 7: 1}),
        with_field(3, {"a": 0}),  # context must name seq - 1 of the origin
        with_field(3, {"a": 2}),
        with_field(3, {"b": 4}),
        with_field(4, "body"),
        with_field(4, None),
        with_field(4, [1, 2]),
        with_field(4, bytearray(b"body")),
        with_field(4, b"x" * (MAX_DELTA_BYTES + 1)),
        ["a", 1, "t", {}, [[[[[]]]]]],
    ],
)
def test_malformed_wire_deltas_are_refused(obj: object) -> None:
    with pytest.raises(InvalidInputError):
        Delta.from_wire(obj)


def test_an_oversized_body_is_refused_as_too_large() -> None:
    with pytest.raises(PayloadTooLargeError):
        Delta.from_wire(with_field(4, b"x" * (MAX_DELTA_BYTES + 1)))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x95",  # array header with nothing after it
        msgpack.packb(GOOD, use_bin_type=True)[:-1],
        msgpack.packb(GOOD, use_bin_type=True) + b"\x00",
        msgpack.packb([*GOOD, 1], use_bin_type=True),
        msgpack.packb(["a", 1, "t", {}, msgpack.ExtType(1, b"x")], use_bin_type=True),
        msgpack.packb(["\udcff", 1, "t", {}, b""], use_bin_type=True, unicode_errors="surrogatepass"),
        msgpack.packb({"a": 1}),
        b"\x91" * 100_000,  # nested arrays, deep enough to blow a naive recursion
        b"\xdd\xff\xff\xff\xff",  # array declaring 4 billion items
        b"\xc6\xff\xff\xff\xff",  # bin declaring 4 GiB
        b"\xdf\xff\xff\xff\xff",  # map declaring 4 billion pairs
        b"\x00" * (MAX_DELTA_BYTES * 2),
    ],
)
def test_malformed_encoded_deltas_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInputError):
        Delta.decode(data)


def test_decode_refuses_what_is_not_bytes() -> None:
    with pytest.raises(InvalidInputError):
        Delta.decode("not bytes")  # type: ignore[arg-type]


@PROPERTY
@given(st.binary(max_size=64))
def test_random_bytes_decode_to_a_delta_or_invalid_input(data: bytes) -> None:
    try:
        Delta.decode(data)
    except InvalidInputError:
        pass


@PROPERTY
@given(st.data())
def test_corrupted_encodings_decode_to_a_valid_delta_or_invalid_input(data: st.DataObject) -> None:
    encoded = bytearray(delta("origin", 3, tenant="acme", body=b"payload", peer=9).encode())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        encoded[data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))] = data.draw(
            st.integers(min_value=0, max_value=255)
        )
    try:
        decoded = Delta.decode(bytes(encoded))
    except InvalidInputError:
        return
    assert decoded.context.get(decoded.origin) == decoded.seq - 1


# --- batches ---------------------------------------------------------------------------------------
def test_a_batch_takes_the_longest_prefix_within_its_bound() -> None:
    deltas = [delta("a", seq, body=b"x" * 100) for seq in range(1, 21)]
    batch = DeltaBatch.take(deltas, max_bytes=1000)
    assert 0 < len(batch.deltas) < 20 and list(batch.deltas) == deltas[: len(batch.deltas)]
    encoded = batch.encode(max_bytes=1000)
    assert len(encoded) <= 1000
    assert len(DeltaBatch.take(deltas, max_bytes=1000 + 200).deltas) > len(batch.deltas)
    assert DeltaBatch.decode(encoded, max_bytes=1000) == batch


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=40), st.integers(400, 5000))
def test_a_taken_batch_always_encodes_within_its_bound(sizes: list[int], bound: int) -> None:
    deltas = [delta("a", seq, body=b"x" * size) for seq, size in enumerate(sizes, start=1)]
    batch = DeltaBatch.take(deltas, max_bytes=bound)
    assert len(batch.encode(max_bytes=bound)) <= bound
    if len(batch.deltas) < len(deltas):
        with pytest.raises(PayloadTooLargeError):
            DeltaBatch(tuple(deltas[: len(batch.deltas) + 1])).encode(max_bytes=bound)


def test_a_batch_whose_first_delta_does_not_fit_is_refused() -> None:
    with pytest.raises(PayloadTooLargeError):
        DeltaBatch.take([delta("a", 1, body=b"x" * 500)], max_bytes=100)
    assert DeltaBatch.take([]).deltas == ()


@pytest.mark.parametrize(
    "data", [msgpack.packb({"a": 1}), msgpack.packb([GOOD, "junk"], use_bin_type=True), b"\x00" * 2000]
)
def test_malformed_batches_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInputError):
        DeltaBatch.decode(data, max_bytes=1000)


def test_a_random_order_of_a_real_batch_still_delivers_causally() -> None:
    rng = random.Random(7)
    deltas = [delta("a", 1), delta("b", 1, a=1), delta("a", 2, b=1), delta("c", 1, a=2, b=1)]
    encoded = DeltaBatch.take(rng.sample(deltas, len(deltas))).encode()
    window = ReceiveWindow(VectorClock())
    delivered = [out for d in DeltaBatch.decode(encoded).deltas for out in window.offer(d)]
    assert assert_causal(delivered) == VectorClock.of({"a": 2, "b": 1, "c": 1})
