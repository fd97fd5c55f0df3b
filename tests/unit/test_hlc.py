import pytest

from rayflow.hlc import ClockDriftError, HLCTimestamp, HybridLogicalClock


class FakeWall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_timestamps_strictly_increase_while_wall_clock_stands_still():
    clock = HybridLogicalClock(FakeWall(1000))
    stamps = [clock.now() for _ in range(5)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 5
    assert stamps[-1] == HLCTimestamp(1000, 4)


def test_clock_never_goes_backwards_when_wall_clock_does():
    wall = FakeWall(5000)
    clock = HybridLogicalClock(wall)
    before = clock.now()
    wall.ms = 1000
    assert clock.now() > before


def test_observing_a_remote_timestamp_orders_later_local_events_after_it():
    clock = HybridLogicalClock(FakeWall(1000))
    remote = HLCTimestamp(1500, 7)
    merged = clock.observe(remote)
    assert merged > remote
    assert clock.now() > merged


def test_far_future_remote_timestamp_is_refused():
    clock = HybridLogicalClock(FakeWall(1000), max_drift_ms=100)
    with pytest.raises(ClockDriftError):
        clock.observe(HLCTimestamp(10_000, 0))


def test_pack_round_trips_and_preserves_order():
    a, b = HLCTimestamp(123456789, 3), HLCTimestamp(123456789, 4)
    assert HLCTimestamp.unpack(a.pack()) == a
    assert a.pack() < b.pack()


def test_clock_resumes_after_the_last_persisted_timestamp():
    last = HLCTimestamp(9000, 2).pack()
    clock = HybridLogicalClock(FakeWall(1000), last=last)
    assert clock.now() > HLCTimestamp(9000, 2)
