"""``WarmPool`` scheduling against an in-memory backend: hits, misses, waits, refill, prepare, age, bounds,
no reuse."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator

import pytest

from rayflow.errors import ConfigError, InvalidInputError, OverloadedError, RayflowError
from rayflow.sandbox.gc import parse_owner
from rayflow.sandbox.pool import (
    JOB_LABEL,
    POOL_LABEL,
    SOURCE_MISS,
    SOURCE_READY,
    SOURCE_REFILL,
    TENANT_LABEL,
    Lease,
    PooledSandbox,
    PoolLedger,
    WarmPool,
)
from rayflow.sandbox.spec import ExecResult, Limits, SandboxSpec, SandboxStats

SPEC = SandboxSpec(owner="caller", limits=Limits(wall_time_s=3600.0))


class FakeSandbox:
    """Records what happened to it; ``alive`` can be switched off to play a runtime that died."""

    def __init__(self, sandbox_id: str, spec: SandboxSpec) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.destroyed = False
        self.alive = True

    def exec(self, command: object, **_: object) -> ExecResult:
        assert not self.destroyed, "exec on a destroyed sandbox"
        return ExecResult(0, repr(command).encode(), b"", 0.0)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def read_file(self, path: str) -> bytes:
        return b""

    def upload(self, local_dir: object, remote_dir: str) -> None: ...

    def download(self, remote_dir: str, local_dir: object) -> None: ...

    def stats(self) -> SandboxStats:
        return SandboxStats()

    def destroy(self) -> None:
        self.destroyed = True

    def __enter__(self) -> FakeSandbox:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


class FakeBackend:
    name = "fake"
    isolated = True

    def __init__(self) -> None:
        self.made: list[FakeSandbox] = []
        self.fail_next = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def create(self, spec: SandboxSpec) -> FakeSandbox:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise RayflowError("engine said no")
            sandbox = FakeSandbox(f"fake-{next(self._ids)}", spec)
            self.made.append(sandbox)
            return sandbox

    def live(self) -> list[FakeSandbox]:
        return [s for s in self.made if not s.destroyed]

    def owned(self) -> list[tuple[str, str]]:
        return [(s.id, s.spec.owner) for s in self.live()]

    def reap(self, owner_alive: object) -> list[str]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(backend: FakeBackend, clock: Clock) -> Iterator[WarmPool]:
    """A pool without background workers: the test drives refills with ``maintain``."""
    made = WarmPool(backend, SPEC, size=2, max_size=4, ttl_s=60.0, refill_workers=0, clock=clock)
    yield made
    made.close()


def test_maintain_fills_the_queue_to_size(pool: WarmPool, backend: FakeBackend) -> None:
    assert pool.maintain() == 2
    assert pool.stats().ready == 2 and len(backend.made) == 2
    assert pool.maintain() == 0


def test_acquire_from_a_filled_queue_is_a_hit(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    sandbox = pool.acquire("tenant-a", "job-1")
    stats = pool.stats()
    assert sandbox.sandbox is backend.made[0]
    assert (stats.hits, stats.misses, stats.ready, stats.leased) == (1, 0, 1, 1)


def test_acquire_from_an_empty_queue_starts_one_and_counts_a_miss(
    pool: WarmPool, backend: FakeBackend
) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    stats = pool.stats()
    assert sandbox.sandbox is backend.made[0]
    assert (stats.hits, stats.misses, stats.created) == (0, 1, 1)


def test_handed_out_sandbox_runs_commands(pool: WarmPool) -> None:
    pool.maintain()
    assert pool.acquire("tenant-a", "job-1").exec(["true"]).ok


def test_background_worker_refills_after_an_acquire(backend: FakeBackend) -> None:
    with WarmPool(backend, SPEC, size=2, max_size=4, ttl_s=60.0) as pool:
        assert pool.wait_ready(timeout_s=30)
        pool.acquire("tenant-a", "job-1")
        assert pool.wait_ready(2, timeout_s=30)
        assert len(backend.made) == 3


def test_release_destroys_the_sandbox(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    sandbox = pool.acquire("tenant-a", "job-1")
    pool.release(sandbox)
    assert sandbox.sandbox.destroyed
    assert pool.stats().destroyed == 1 and pool.leases() == {}


def test_released_sandbox_is_never_handed_out_again(pool: WarmPool) -> None:
    seen: set[str] = set()
    for n in range(6):
        pool.maintain()
        sandbox = pool.acquire(f"tenant-{n % 2}", f"job-{n}")
        assert sandbox.id not in seen
        seen.add(sandbox.id)
        pool.release(sandbox)


def test_release_twice_does_nothing(pool: WarmPool) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    sandbox.destroy()
    sandbox.destroy()
    assert pool.stats().destroyed == 1


def test_release_of_a_sandbox_from_elsewhere_is_refused(pool: WarmPool, backend: FakeBackend) -> None:
    stranger = backend.create(SPEC)
    with pytest.raises(InvalidInputError):
        pool.release(stranger)
    assert not stranger.destroyed


def test_queued_sandbox_past_ttl_is_destroyed_and_replaced(
    pool: WarmPool, backend: FakeBackend, clock: Clock
) -> None:
    pool.maintain()
    old = list(backend.made)
    clock.now += 60.0
    assert pool.maintain() == 2
    assert all(s.destroyed for s in old)
    assert pool.stats().expired == 2 and pool.stats().ready == 2


def test_expired_sandbox_is_not_handed_out(pool: WarmPool, backend: FakeBackend, clock: Clock) -> None:
    pool.maintain()
    old = {s.id for s in backend.made}
    clock.now += 61.0
    sandbox = pool.acquire("tenant-a", "job-1")
    assert sandbox.id not in old
    assert pool.stats().misses == 1


def test_oldest_queued_sandbox_is_handed_out_first(
    pool: WarmPool, backend: FakeBackend, clock: Clock
) -> None:
    pool.maintain()
    first = backend.made[0]
    assert pool.acquire("tenant-a", "job-1").sandbox is first


def test_dead_queued_sandbox_is_destroyed_instead_of_handed_out(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    backend.made[0].alive = False
    sandbox = pool.acquire("tenant-a", "job-1")
    assert sandbox.sandbox is backend.made[1]
    assert backend.made[0].destroyed


def test_pool_never_holds_more_than_max_size(pool: WarmPool) -> None:
    held = [pool.acquire("tenant-a", f"job-{n}") for n in range(4)]
    pool.maintain()
    assert pool.stats().ready == 0 and len(held) == 4
    with pytest.raises(OverloadedError):
        pool.acquire("tenant-a", "job-5", timeout_s=0)


def test_refill_stops_at_max_size(backend: FakeBackend, clock: Clock) -> None:
    pool = WarmPool(backend, SPEC, size=3, max_size=4, ttl_s=60.0, refill_workers=0, clock=clock)
    pool.acquire("tenant-a", "job-1")
    pool.acquire("tenant-a", "job-2")
    assert pool.maintain() == 2
    pool.close()


def test_release_unblocks_an_acquire_waiting_at_the_bound(pool: WarmPool) -> None:
    held = [pool.acquire("tenant-a", f"job-{n}") for n in range(4)]
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("tenant-b", "job-9", timeout_s=60).id))
    waiter.start()
    pool.release(held[0])
    waiter.join(60)
    assert len(got) == 1 and got[0] not in {h.id for h in held}


def test_handed_out_sandbox_records_tenant_and_job(pool: WarmPool) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    lease = pool.leases()[sandbox.id]
    assert (lease.tenant, lease.job) == ("tenant-a", "job-1")
    assert sandbox.spec.labels[TENANT_LABEL] == "tenant-a" and sandbox.spec.labels[JOB_LABEL] == "job-1"


def test_acquire_needs_tenant_and_job(pool: WarmPool) -> None:
    with pytest.raises(InvalidInputError):
        pool.acquire("", "job-1")


def test_pooled_sandboxes_are_owned_by_the_pool_naming_this_process(
    pool: WarmPool, backend: FakeBackend
) -> None:
    pool.maintain()
    owner = backend.made[0].spec.owner
    parsed = parse_owner(owner)
    assert owner == pool.pool_id and backend.made[0].spec.labels[POOL_LABEL] == owner
    assert parsed is not None and parsed.pid == os.getpid() and parsed.suffix.startswith("pool-")


def test_close_destroys_queued_and_handed_out_sandboxes(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    pool.acquire("tenant-a", "job-1")
    pool.close()
    assert backend.live() == []
    assert pool.stats().ready == 0 and pool.leases() == {}


def test_close_is_idempotent(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    pool.close()
    pool.close()
    assert pool.stats().destroyed == 2


def test_release_after_close_does_nothing(pool: WarmPool) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    pool.close()
    sandbox.destroy()
    assert pool.stats().destroyed == 1


def test_acquire_after_close_is_refused(pool: WarmPool) -> None:
    pool.close()
    with pytest.raises(InvalidInputError):
        pool.acquire("tenant-a", "job-1")


def test_close_stops_background_workers(backend: FakeBackend) -> None:
    pool = WarmPool(backend, SPEC, size=2, max_size=4, ttl_s=60.0, refill_workers=2)
    pool.wait_ready(timeout_s=30)
    pool.close()
    assert all(not worker.is_alive() for worker in pool._workers)
    assert backend.live() == []


def test_failed_background_start_is_counted_and_the_pool_keeps_working(backend: FakeBackend) -> None:
    backend.fail_next = 1
    with WarmPool(backend, SPEC, size=1, max_size=2, ttl_s=60.0) as pool:
        assert pool.wait_ready(timeout_s=30)
        assert pool.stats().failures == 1


def test_sandbox_failing_its_readiness_check_is_destroyed_not_queued(backend: FakeBackend) -> None:
    def refuse(sandbox: object) -> None:
        raise RayflowError("runtime silent")

    pool = WarmPool(backend, SPEC, size=1, ttl_s=60.0, refill_workers=0, ready_check=refuse)
    pool.maintain()
    stats = pool.stats()
    assert (stats.ready, stats.failures, stats.destroyed) == (0, 1, 1)
    assert backend.made[0].destroyed
    pool.close()


def test_default_readiness_check_passes_a_working_sandbox(pool: WarmPool, backend: FakeBackend) -> None:
    pool.maintain()
    assert pool.stats().ready == 2 and pool.stats().failures == 0


def test_failed_synchronous_start_raises_and_frees_its_slot(pool: WarmPool, backend: FakeBackend) -> None:
    backend.fail_next = 1
    with pytest.raises(RayflowError):
        pool.acquire("tenant-a", "job-1")
    stats = pool.stats()
    assert (stats.failures, stats.creating) == (1, 0)


def test_ttl_not_below_wall_time_is_refused(backend: FakeBackend) -> None:
    spec = SandboxSpec(owner="caller", limits=Limits(wall_time_s=30.0))
    with pytest.raises(ConfigError):
        WarmPool(backend, spec, ttl_s=30.0, refill_workers=0)


def test_default_ttl_is_a_quarter_of_wall_time(backend: FakeBackend) -> None:
    spec = SandboxSpec(owner="caller", limits=Limits(wall_time_s=100.0))
    assert WarmPool(backend, spec, refill_workers=0).ttl_s == 25.0


def test_max_size_below_size_is_refused(backend: FakeBackend) -> None:
    with pytest.raises(ConfigError):
        WarmPool(backend, SPEC, size=3, max_size=2, refill_workers=0)


def test_ledger_counts_everything_held_against_the_bound() -> None:
    ledger = PoolLedger(size=2, max_size=3, ttl_s=10.0)
    ledger.starting_for_miss = 1
    ledger.destroying = 1
    assert ledger.refill_wanted() == 1


# --- waiting for a background start, prepare, create functions --------------------------------------
def test_ledger_lets_an_acquire_wait_only_for_a_start_under_way_nobody_else_waits_for() -> None:
    ledger = PoolLedger(size=1, max_size=2, ttl_s=10.0, wait_for_refill=True)
    assert not ledger.claim_refill()  # nothing under way: the acquire starts one itself
    assert ledger.begin_refill()
    assert ledger.claim_refill()
    assert not ledger.claim_refill()  # the one start is someone else's already
    ledger.release_claim()
    assert ledger.awaiting_refill == 0 and ledger.claim_refill()


def test_ledger_without_wait_for_refill_never_lets_an_acquire_wait() -> None:
    ledger = PoolLedger(size=1, max_size=2, ttl_s=10.0)
    assert ledger.begin_refill()
    assert not ledger.claim_refill()


def test_ledger_stops_waits_once_closed() -> None:
    ledger = PoolLedger(size=1, max_size=2, ttl_s=10.0, wait_for_refill=True)
    ledger.begin_refill()
    ledger.close()
    assert not ledger.claim_refill()


def test_ledger_counts_a_waited_hand_out_apart_from_hits() -> None:
    ledger = PoolLedger(size=2, max_size=4, ttl_s=10.0)
    spec = SandboxSpec(owner="x")
    for n in (1, 2):
        ledger.begin_refill()
        ledger.end_refill(FakeSandbox(f"s-{n}", spec), 0.0)
    lease = Lease("t", "j", 0.0)
    ledger.hand_out(ledger.take_ready(), lease)
    ledger.hand_out(ledger.take_ready(), lease, waited=True)
    stats = ledger.stats()
    assert (stats.hits, stats.waits, stats.misses, stats.leased) == (1, 1, 0, 2)


def test_ledger_drop_ready_empties_the_queue_into_destroying() -> None:
    ledger = PoolLedger(size=2, max_size=4, ttl_s=10.0)
    for n in (1, 2):
        ledger.begin_refill()
        ledger.end_refill(FakeSandbox(f"s-{n}", SandboxSpec(owner="x")), 0.0)
    doomed = ledger.drop_ready()
    assert [s.id for s in doomed] == ["s-1", "s-2"]
    assert (len(ledger.ready), ledger.destroying, ledger.total()) == (0, 2, 2)
    assert ledger.refill_wanted() == 2


class GatedBackend(FakeBackend):
    """Each ``create`` waits until the test opens the gate, so a start can be caught under way."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def create(self, spec: SandboxSpec) -> FakeSandbox:
        self.entered.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().create(spec)


def test_acquire_with_wait_for_refill_waits_for_the_start_under_way_instead_of_a_second() -> None:
    backend = GatedBackend()
    with WarmPool(backend, SPEC, size=1, max_size=2, ttl_s=60.0, wait_for_refill=True) as pool:
        assert backend.entered.acquire(timeout=30)  # the background start is under way
        got: list[PooledSandbox] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire("tenant-a", "job-1")))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # waiting for it, not starting one of its own
        assert pool.stats().misses == 0
        backend.gate.set()
        waiter.join(30)
        assert got and got[0].source == SOURCE_REFILL and got[0].sandbox is backend.made[0]
        stats = pool.stats()
        assert (stats.hits, stats.waits, stats.misses) == (0, 1, 0)


def test_acquire_without_wait_for_refill_starts_its_own_while_a_start_is_under_way() -> None:
    backend = GatedBackend()
    with WarmPool(backend, SPEC, size=1, max_size=2, ttl_s=60.0) as pool:
        assert backend.entered.acquire(timeout=30)  # the background start is under way
        got: list[PooledSandbox] = []
        taker = threading.Thread(target=lambda: got.append(pool.acquire("tenant-a", "job-1")))
        taker.start()
        assert backend.entered.acquire(timeout=30)  # ... and the acquire started a second one
        backend.gate.set()
        taker.join(30)
        assert got and got[0].source == SOURCE_MISS and pool.stats().misses == 1


def test_a_failing_background_start_ends_the_wait_and_the_acquire_sees_the_error() -> None:
    backend = FakeBackend()
    backend.fail_next = 2  # the background start and the acquire's own start both fail
    with WarmPool(backend, SPEC, size=1, max_size=2, ttl_s=60.0, wait_for_refill=True) as pool:
        with pytest.raises(RayflowError, match="engine said no"):
            pool.acquire("tenant-a", "job-1")
        stats = pool.stats()
        assert stats.failures == 2 and stats.misses == 1 and pool.leases() == {}


def test_prepare_runs_before_a_sandbox_is_queued(backend: FakeBackend) -> None:
    prepared: list[str] = []
    pool = WarmPool(
        backend, SPEC, size=1, ttl_s=60.0, refill_workers=0, prepare=lambda s: prepared.append(s.id)
    )
    pool.maintain()
    assert prepared == [backend.made[0].id] and pool.stats().ready == 1
    assert pool.acquire("tenant-a", "job-1").source == SOURCE_READY
    pool.close()


def test_prepare_runs_on_a_miss_before_the_acquire_gets_the_sandbox(backend: FakeBackend) -> None:
    prepared: list[str] = []
    pool = WarmPool(
        backend, SPEC, size=1, ttl_s=60.0, refill_workers=0, prepare=lambda s: prepared.append(s.id)
    )
    sandbox = pool.acquire("tenant-a", "job-1")
    assert sandbox.source == SOURCE_MISS and prepared == [sandbox.id]
    pool.close()


def test_a_sandbox_failing_prepare_in_the_background_is_destroyed_and_counted(backend: FakeBackend) -> None:
    def refuse(sandbox: object) -> None:
        raise RayflowError("upload refused")

    pool = WarmPool(backend, SPEC, size=1, ttl_s=60.0, refill_workers=0, prepare=refuse)
    assert pool.maintain() == 0
    stats = pool.stats()
    assert (stats.ready, stats.created, stats.failures, stats.destroyed) == (0, 1, 1, 1)
    assert backend.live() == []
    pool.close()


def test_a_sandbox_failing_prepare_on_a_miss_is_destroyed_and_the_error_raised(backend: FakeBackend) -> None:
    def refuse(sandbox: object) -> None:
        raise RayflowError("upload refused")

    pool = WarmPool(backend, SPEC, size=1, max_size=1, ttl_s=60.0, refill_workers=0, prepare=refuse)
    with pytest.raises(RayflowError, match="upload refused"):
        pool.acquire("tenant-a", "job-1")
    stats = pool.stats()
    assert (stats.failures, stats.creating, stats.leased, stats.destroyed) == (1, 0, 0, 1)
    assert backend.live() == []
    # The slot is free again: a later acquire (here failing the same way) is not refused for the bound.
    with pytest.raises(RayflowError, match="upload refused"):
        pool.acquire("tenant-a", "job-2", timeout_s=0)
    pool.close()


def test_a_pool_from_a_create_function(backend: FakeBackend) -> None:
    specs: list[SandboxSpec] = []

    def create(spec: SandboxSpec) -> FakeSandbox:
        specs.append(spec)
        return backend.create(spec)

    owner = "proc:h:1:2:3/w-1/pool"
    pool = WarmPool.from_create(create, SPEC, size=1, ttl_s=60.0, refill_workers=0, pool_id=owner)
    pool.maintain()
    sandbox = pool.acquire("tenant-a", "job-1")
    assert sandbox.sandbox is backend.made[0] and pool.backend is None
    assert specs[0].owner == owner and specs[0].labels[POOL_LABEL] == owner
    pool.close()
    assert backend.live() == []


def test_a_pool_needs_a_backend_or_a_create_function_not_both(backend: FakeBackend) -> None:
    with pytest.raises(ConfigError):
        WarmPool(None, SPEC, refill_workers=0)
    with pytest.raises(ConfigError):
        WarmPool(backend, SPEC, refill_workers=0, create=backend.create)


def test_discard_ready_destroys_the_queue_and_the_refill_starts_fresh_ones(
    pool: WarmPool, backend: FakeBackend
) -> None:
    pool.maintain()
    old = list(backend.made)
    assert pool.discard_ready() == 2
    assert all(s.destroyed for s in old) and pool.stats().ready == 0
    assert pool.maintain() == 2
    assert {s.id for s in backend.live()}.isdisjoint({s.id for s in old})
