"""``WarmPool``: sandboxes of one spec started ahead of time, handed out in milliseconds, never reused.

Why: starting a sandbox costs from ~0.1 s (bubblewrap) to seconds (a container on a loaded
machine), while its user wants one now. The pool keeps ``size`` started sandboxes in a queue and
refills it in the background; :meth:`WarmPool.acquire` pops one. When the queue is empty it
starts one synchronously (a *miss*, counted in :meth:`WarmPool.stats`) rather than wait for
the refill; with ``wait_for_refill`` it waits instead for a background start already under way
(a *wait*), and starts one itself only when none is.

Who uses it: a swarm worker of a job with ``isolation="subtask"``
(:class:`rayflow.swarm.worker_core.WorkerCore`) holds a pool of size 1, built from its create
function (:meth:`WarmPool.from_create`) with a ``prepare`` step that uploads the job's repository
and starts the agent host, so each subtask gets a sandbox nobody used while the next one is
prepared during the current subtask. The sandbox benchmark measures ``acquire`` on its own.

Prepared before ready: ``ready_check`` (by default: the runtime answers) and then ``prepare``
run on a background start before it is queued; ``prepare`` also runs on a miss before the
acquire gets the sandbox. A sandbox failing either is destroyed and counted, never handed out;
a miss's failure is raised to the acquire, a background one is retried with back-off.

Never reused: a sandbox handed out belongs to one tenant and one job (or one subtask).
:meth:`WarmPool.release` destroys it and lets the refill start a fresh one; nothing its holder
wrote, started or changed can reach the next holder, whoever's it is.

Age: a queued sandbox older than ``ttl_s`` is destroyed and replaced. Backends count a sandbox's
wall-time limit from its creation, so ``ttl_s`` must stay below ``limits.wall_time_s``: a job
then always gets at least ``wall_time_s - ttl_s`` of it.

Bounds: ``size`` is how many sandboxes wait ready; ``max_size`` bounds everything the pool
holds at once (ready, being started, handed out, being destroyed). At the bound, ``acquire``
waits up to its timeout for a release, then fails with :class:`~rayflow.errors.OverloadedError`.

Ownership and reaping: pooled sandboxes are created with the pool id as their owner. The default
pool id is this process's owner string (:func:`rayflow.sandbox.gc.current_process_owner`) with a
``/pool-<hex>`` suffix, so a sweep keeps them while the process holding the pool runs and reaps
them once it is gone, handed out or not. A caller naming the pool itself keeps that property by
passing such an owner string (a swarm worker passes its own owner with a ``/pool`` suffix). Who
holds a handed-out sandbox (tenant, job) is recorded by the pool (:meth:`WarmPool.leases`) and on
the handed-out object's labels; the backend's record keeps the pool id, since that is whose death
must free it.

Structure: :class:`PoolLedger` holds the bookkeeping and makes every decision (what to expire,
what to hand out, how many to start) without threads or I/O; :class:`WarmPool` is the shell
that calls the backend, outside its lock, from the caller's thread and ``refill_workers``
background threads. With ``refill_workers=0`` nothing runs in the background and
:meth:`WarmPool.maintain` does one refill pass in the caller's thread.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import ConfigError, InvalidInputError, OverloadedError, RayflowError
from rayflow.sandbox.backend import Sandbox, SandboxBackend
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.spec import SandboxSpec
from rayflow.sandbox.wrapper import SandboxWrapper

log = logging.getLogger("rayflow.sandbox.pool")

#: Label naming the pool a sandbox came from.
POOL_LABEL = "rayflow.pool"
#: Labels naming who holds a handed-out sandbox.
TENANT_LABEL = "rayflow.tenant"
JOB_LABEL = "rayflow.job"
#: Queue age limit when none is given and the spec has no wall-time limit.
DEFAULT_TTL_S = 600.0
#: Back-off after a failed background start: doubles from the first value up to the last.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
#: Longest a background worker sleeps without looking at the queue again.
MAX_IDLE_WAIT_S = 60.0
#: How an acquire got its sandbox (``PooledSandbox.source``): queued and taken at once, queued
#: after waiting for a background start, or started by the acquire itself.
SOURCE_READY = "ready"
SOURCE_REFILL = "refill"
SOURCE_MISS = "miss"


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool started, and its current occupancy."""

    #: Acquires served from the queue at once.
    hits: int
    #: Acquires that had to start a sandbox themselves.
    misses: int
    #: Acquires served from the queue after waiting for a background start (``wait_for_refill``).
    waits: int
    #: Sandboxes started (by the refill and by misses).
    created: int
    #: Sandboxes destroyed (released, expired, found dead, or at close).
    destroyed: int
    #: Queued sandboxes destroyed for age.
    expired: int
    #: Sandbox starts or destroys that failed.
    failures: int
    ready: int
    leased: int
    creating: int


@dataclass(frozen=True)
class Lease:
    """Who holds a handed-out sandbox, and since when (on the pool's clock)."""

    tenant: str
    job: str
    acquired_at: float


@dataclass
class _Entry:
    sandbox: Sandbox
    created_at: float


@dataclass
class _Held:
    sandbox: Sandbox
    lease: Lease


@dataclass
class PoolLedger:
    """The pool's state and decisions, pure: no threads, no clock reads, no backend calls.

    The shell calls each method under its lock with the current time and then does the I/O
    the answer asks for (starting, destroying) outside it.
    """

    size: int
    max_size: int
    ttl_s: float
    #: An acquire finding the queue empty waits for a background start under way instead of
    #: starting a sandbox itself (see :meth:`claim_refill`).
    wait_for_refill: bool = False
    ready: deque[_Entry] = field(default_factory=deque)
    leased: dict[str, _Held] = field(default_factory=dict)
    #: Starts in progress for the queue (background) and for misses (synchronous).
    refilling: int = 0
    starting_for_miss: int = 0
    destroying: int = 0
    #: Acquires waiting for one of the background starts under way (each counts on its own one).
    awaiting_refill: int = 0
    closed: bool = False
    hits: int = 0
    misses: int = 0
    waits: int = 0
    created: int = 0
    destroyed: int = 0
    expired: int = 0
    failures: int = 0

    def total(self) -> int:
        """Everything the pool holds or is about to hold; bounded by ``max_size``."""
        return len(self.ready) + self.refilling + self.starting_for_miss + len(self.leased) + self.destroying

    def take_expired(self, now: float) -> list[Sandbox]:
        """Remove queued sandboxes at least ``ttl_s`` old; the caller destroys them."""
        keep, old = deque(), []
        for entry in self.ready:
            (old if now - entry.created_at >= self.ttl_s else keep).append(entry)
        self.ready = keep
        self.expired += len(old)
        self.destroying += len(old)
        return [entry.sandbox for entry in old]

    def next_expiry(self) -> float | None:
        """When the oldest queued sandbox expires (pool clock), or ``None`` with an empty queue."""
        return min((e.created_at + self.ttl_s for e in self.ready), default=None)

    def take_ready(self) -> Sandbox | None:
        """The oldest queued sandbox (so none ages out while younger ones are used), if any."""
        return self.ready.popleft().sandbox if self.ready else None

    def refill_wanted(self) -> int:
        """How many more starts the queue needs, within ``max_size``."""
        if self.closed:
            return 0
        short = self.size - len(self.ready) - self.refilling
        return max(0, min(short, self.max_size - self.total()))

    def begin_refill(self) -> bool:
        """Reserve one background start if one is wanted."""
        if self.refill_wanted() <= 0:
            return False
        self.refilling += 1
        return True

    def end_refill(self, sandbox: Sandbox | None, now: float) -> bool:
        """Record a background start's outcome; False when the pool closed meanwhile (destroy it)."""
        self.refilling -= 1
        if sandbox is None:
            self.failures += 1
            return True
        self.created += 1
        if self.closed:
            self.destroying += 1
            return False
        self.ready.append(_Entry(sandbox, now))
        return True

    def started_unusable(self) -> None:
        """A background start made a sandbox that failed its readiness check; it is destroyed."""
        self.created += 1
        self.destroying += 1

    def claim_refill(self) -> bool:
        """Whether an acquire that found the queue empty should wait for a background start.

        Only with ``wait_for_refill``, and only while more starts are under way than acquires
        already wait for: each waiting acquire counts on a start of its own, so one start never
        holds two acquires while a second could have been started. A start that fails ends the
        wait (the acquire then starts a sandbox itself, and sees the error if it fails again).
        The caller calls :meth:`release_claim` when it wakes, then decides again.
        """
        if not self.wait_for_refill or self.closed or self.refilling <= self.awaiting_refill:
            return False
        self.awaiting_refill += 1
        return True

    def release_claim(self) -> None:
        self.awaiting_refill -= 1

    def begin_miss(self) -> bool:
        """Reserve a synchronous start for an acquire that found the queue empty, if within bounds."""
        if self.total() >= self.max_size:
            return False
        self.misses += 1
        self.starting_for_miss += 1
        return True

    def end_miss(self, sandbox: Sandbox | None, lease: Lease) -> bool:
        """Record a miss's start; False when it failed, or the pool closed meanwhile (destroy it)."""
        self.starting_for_miss -= 1
        if sandbox is None:
            self.failures += 1
            return False
        self.created += 1
        if self.closed:
            self.destroying += 1
            return False
        self.leased[sandbox.id] = _Held(sandbox, lease)
        return True

    def hand_out(self, sandbox: Sandbox, lease: Lease, *, waited: bool = False) -> None:
        """Lease a queued sandbox: a hit, or a wait when the acquire waited for a background start."""
        if waited:
            self.waits += 1
        else:
            self.hits += 1
        self.leased[sandbox.id] = _Held(sandbox, lease)

    def drop_ready(self) -> list[Sandbox]:
        """Empty the queue (not for age); the caller destroys what is returned."""
        doomed = [entry.sandbox for entry in self.ready]
        self.ready.clear()
        self.destroying += len(doomed)
        return doomed

    def discard(self, sandbox: Sandbox) -> None:
        """A queued sandbox found dead at hand-out: it is destroyed instead."""
        self.destroying += 1

    def give_back(self, sandbox_id: str) -> bool:
        """End a lease; False when there is none (already released, or not from this pool)."""
        if self.leased.pop(sandbox_id, None) is None:
            return False
        self.destroying += 1
        return True

    def destroyed_one(self, ok: bool) -> None:
        self.destroying -= 1
        self.destroyed += 1
        if not ok:
            self.failures += 1

    def leases(self) -> dict[str, Lease]:
        return {sandbox_id: held.lease for sandbox_id, held in self.leased.items()}

    def close(self) -> list[Sandbox]:
        """Mark closed and empty the queue and every lease; the caller destroys what is returned."""
        self.closed = True
        doomed = [entry.sandbox for entry in self.ready] + [held.sandbox for held in self.leased.values()]
        self.ready.clear()
        self.leased.clear()
        self.destroying += len(doomed)
        return doomed

    def stats(self) -> PoolStats:
        return PoolStats(
            hits=self.hits,
            misses=self.misses,
            waits=self.waits,
            created=self.created,
            destroyed=self.destroyed,
            expired=self.expired,
            failures=self.failures,
            ready=len(self.ready),
            leased=len(self.leased),
            creating=self.refilling + self.starting_for_miss,
        )


def _alive(sandbox: Sandbox) -> bool:
    """False when the sandbox says its channel is closed (backends without the notion: True)."""
    return bool(getattr(sandbox, "alive", True))


def runtime_answers(sandbox: Sandbox) -> None:
    """Readiness check of a queued sandbox: its runtime answers (a ping, else running ``true``).

    Why: some backends return from ``create`` as soon as the sandbox exists, while its runtime
    is still starting (~25 ms for bubblewrap); the pool waits for that in the background so a
    job's first call does not.
    """
    ping = getattr(sandbox, "ping", None)
    if callable(ping):
        ping()
        return
    result = sandbox.exec(["true"], timeout_s=60.0)
    if not result.ok:
        raise RayflowError("the sandbox could not run 'true'", sandbox=sandbox.id, exit_code=result.exit_code)


def default_ttl(spec: SandboxSpec) -> float:
    """A quarter of the spec's wall time, at most :data:`DEFAULT_TTL_S`."""
    wall = spec.limits.wall_time_s
    return DEFAULT_TTL_S if wall is None else min(DEFAULT_TTL_S, wall / 4)


class WarmPool:
    """Keeps ``size`` ready sandboxes of one spec; see the module docstring.

    Sandboxes come from ``backend.create``, or from ``create`` when the caller has only a create
    function (:meth:`from_create`). ``ready_check`` runs on each background start before it is
    queued; ``prepare`` runs on every sandbox before it counts as ready, in the background and on
    a miss alike, so no sandbox is handed out unprepared. A sandbox failing either is destroyed
    and counted in ``failures``; a miss's failure is raised to its acquire.
    """

    def __init__(
        self,
        backend: SandboxBackend | None,
        spec: SandboxSpec,
        *,
        size: int = 2,
        max_size: int | None = None,
        ttl_s: float | None = None,
        refill_workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        pool_id: str | None = None,
        ready_check: Callable[[Sandbox], None] | None = runtime_answers,
        prepare: Callable[[Sandbox], None] | None = None,
        create: Callable[[SandboxSpec], Sandbox] | None = None,
        wait_for_refill: bool = False,
    ) -> None:
        if (backend is None) == (create is None):
            raise ConfigError("a warm pool needs either a backend or a create function, not both")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"pool size must be a non-negative integer, not {size!r}")
        max_size = max(4, 2 * size) if max_size is None else max_size
        if max_size < max(size, 1):
            raise ConfigError(f"max_size ({max_size}) must be at least size ({size}) and 1")
        ttl = default_ttl(spec) if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ConfigError("ttl_s must be positive")
        wall = spec.limits.wall_time_s
        if wall is not None and ttl >= wall:
            raise ConfigError(
                f"ttl_s ({ttl}) must be below the spec's wall time ({wall}): a sandbox's wall time "
                "runs from its creation, so an older one could die as soon as it is handed out"
            )
        if refill_workers < 0:
            raise ConfigError("refill_workers must not be negative")
        self.backend = backend
        if create is None:
            assert backend is not None
            create = backend.create
        self._create: Callable[[SandboxSpec], Sandbox] = create
        self.pool_id = pool_id or current_process_owner(f"pool-{secrets.token_hex(4)}")
        self.spec = dataclasses.replace(
            spec, owner=self.pool_id, labels={**spec.labels, POOL_LABEL: self.pool_id}
        )
        self._clock = clock
        self._ready_check = ready_check
        self._prepare = prepare
        self._ledger = PoolLedger(size=size, max_size=max_size, ttl_s=ttl, wait_for_refill=wait_for_refill)
        self._cond = threading.Condition()
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_S
        # The first starts are reserved here, before any worker runs, so an acquire right after
        # construction sees them under way (and, with ``wait_for_refill``, waits instead of racing).
        with self._cond:
            reserved = [self._ledger.begin_refill() for _ in range(refill_workers)]
        self._workers = [
            threading.Thread(
                target=self._refill_loop, args=(first,), name=f"rayflow-pool-refill-{i}", daemon=True
            )
            for i, first in enumerate(reserved)
        ]
        for worker in self._workers:
            worker.start()

    @classmethod
    def from_create(
        cls, create: Callable[[SandboxSpec], Sandbox], spec: SandboxSpec, **options: Any
    ) -> WarmPool:
        """A pool whose sandboxes come from ``create(spec)`` (a backend's ``create``, or a caller's
        wrapper of it); ``options`` are those of the constructor."""
        return cls(None, spec, create=create, **options)

    # --- public ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._ledger.size

    @property
    def max_size(self) -> int:
        return self._ledger.max_size

    @property
    def ttl_s(self) -> float:
        return self._ledger.ttl_s

    def acquire(self, tenant: str, job: str, timeout_s: float | None = None) -> PooledSandbox:
        """A fresh sandbox for ``tenant``'s ``job``: from the queue, else started now.

        With ``wait_for_refill``, an empty queue with a background start under way is waited
        for instead (see :meth:`PoolLedger.claim_refill`). ``timeout_s`` bounds the wait when
        the pool is at ``max_size`` (``None``: wait for a release indefinitely); it bounds
        neither a synchronous start nor a background start waited for. The handed-out sandbox's
        ``source`` says which of the three it was.
        """
        for name, value in (("tenant", tenant), ("job", job)):
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"acquire needs a non-empty {name}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        dead: list[Sandbox] = []
        claimed = waited = False
        try:
            with self._cond:
                while True:
                    if claimed:
                        self._ledger.release_claim()
                        claimed = False
                    self._check_open()
                    now = self._clock()
                    dead += self._ledger.take_expired(now)
                    sandbox = self._ledger.take_ready()
                    if sandbox is not None and not _alive(sandbox):
                        self._ledger.discard(sandbox)
                        dead.append(sandbox)
                        continue
                    lease = Lease(tenant, job, now)
                    if sandbox is not None:
                        self._ledger.hand_out(sandbox, lease, waited=waited)
                        self._cond.notify_all()  # the queue is short now: wake the refill
                        source = SOURCE_REFILL if waited else SOURCE_READY
                        return PooledSandbox(self, sandbox, lease, source=source)
                    if self._ledger.claim_refill():
                        claimed = waited = True
                        self._cond.wait(MAX_IDLE_WAIT_S)
                        continue
                    if self._ledger.begin_miss():
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise OverloadedError(
                            f"warm pool is at its bound of {self.max_size} sandboxes",
                            pool=self.pool_id,
                        )
                    self._cond.wait(remaining)
        finally:
            if claimed:  # interrupted while waiting for a background start
                with self._cond:
                    self._ledger.release_claim()
            self._destroy_all(dead)
        return self._start_for_miss(lease)

    def release(self, sandbox: Sandbox) -> None:
        """Destroy a handed-out sandbox (it is never queued again); releasing twice does nothing."""
        inner = sandbox.sandbox if isinstance(sandbox, PooledSandbox) else sandbox
        with self._cond:
            if not self._ledger.give_back(inner.id):
                if isinstance(sandbox, PooledSandbox) and sandbox.pool is self:
                    return
                raise InvalidInputError("this sandbox was not handed out by this pool", sandbox=inner.id)
        self._destroy_all([inner])

    def maintain(self) -> int:
        """One refill pass in the caller's thread: expire old sandboxes, start missing ones.

        Each missing sandbox is attempted once (a failing backend does not hold the caller);
        returns how many were queued. The background workers do the same continuously; call
        this when ``refill_workers=0``.
        """
        with self._cond:
            expired = self._ledger.take_expired(self._clock())
            attempts = self._ledger.refill_wanted()
        self._destroy_all(expired)
        queued = 0
        for _ in range(attempts):
            with self._cond:
                if not self._ledger.begin_refill():
                    break
            queued += self._start_for_queue()
        return queued

    def wait_ready(self, count: int | None = None, timeout_s: float = 60.0) -> bool:
        """Wait until ``count`` (default: ``size``) sandboxes are queued; False on timeout or close."""
        wanted = self.size if count is None else count
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._ledger.ready) < wanted and not self._ledger.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return len(self._ledger.ready) >= wanted

    def discard_ready(self) -> int:
        """Destroy every queued sandbox (the refill starts fresh ones); how many were destroyed.

        For when what ``prepare`` puts into a sandbox has changed. A start under way when this is
        called still joins the queue: a caller that must not get one of those tells them apart
        itself (by what its ``prepare`` recorded).
        """
        with self._cond:
            doomed = self._ledger.drop_ready()
            self._cond.notify_all()
        self._destroy_all(doomed)
        return len(doomed)

    def leases(self) -> dict[str, Lease]:
        """Sandbox id -> who holds it, for every handed-out sandbox not yet released."""
        with self._cond:
            return self._ledger.leases()

    def stats(self) -> PoolStats:
        with self._cond:
            return self._ledger.stats()

    def close(self) -> None:
        """Stop refilling and destroy every sandbox of the pool, queued or handed out. Idempotent.

        Commands still running in handed-out sandboxes end with ``killed=SANDBOX_DESTROYED``.
        """
        with self._cond:
            if self._ledger.closed:
                return
            doomed = self._ledger.close()
            self._cond.notify_all()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
        self._destroy_all(doomed)

    def __enter__(self) -> WarmPool:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return f"WarmPool({self.pool_id!r}, ready={s.ready}, leased={s.leased}, creating={s.creating})"

    # --- internals --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._ledger.closed:
            raise InvalidInputError("the warm pool is closed", pool=self.pool_id)

    def _start_for_miss(self, lease: Lease) -> PooledSandbox:
        sandbox: Sandbox | None = None
        try:
            sandbox = self._create(self.spec)
            if self._prepare is not None:
                self._prepare(sandbox)
        except BaseException:
            if sandbox is not None:
                with self._cond:
                    self._ledger.started_unusable()
                self._destroy_all([sandbox])
                sandbox = None
            raise
        finally:
            with self._cond:
                kept = self._ledger.end_miss(sandbox, lease)
                self._cond.notify_all()
        if not kept:
            self._destroy_all([sandbox])
            raise InvalidInputError("the warm pool closed while starting a sandbox", pool=self.pool_id)
        log.info(
            "warm pool %s was empty: started %s synchronously for %s/%s",
            self.pool_id,
            sandbox.id,
            lease.tenant,
            lease.job,
        )
        return PooledSandbox(self, sandbox, lease, source=SOURCE_MISS)

    def _start_for_queue(self) -> int:
        """Start one sandbox for the queue (a refill slot is reserved); 1 if it was queued, else 0."""
        sandbox: Sandbox | None = None
        try:
            sandbox = self._create(self.spec)
            if self._ready_check is not None:
                self._ready_check(sandbox)
            if self._prepare is not None:
                self._prepare(sandbox)
        except Exception as exc:  # the pool must outlive a failing backend
            if isinstance(exc, RayflowError):
                log.warning("warm pool %s could not start a sandbox: %s", self.pool_id, exc)
            else:
                log.exception("warm pool %s could not start a sandbox", self.pool_id)
            if sandbox is not None:
                with self._cond:
                    self._ledger.started_unusable()
                self._destroy_all([sandbox])
                sandbox = None
        with self._cond:
            kept = self._ledger.end_refill(sandbox, self._clock())
            if sandbox is None:
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
            else:
                self._retry_delay = RETRY_FIRST_S
            self._cond.notify_all()
        if not kept:
            self._destroy_all([sandbox])
        return int(sandbox is not None and kept)

    def _destroy_all(self, sandboxes: Sequence[Sandbox | None]) -> None:
        for sandbox in sandboxes:
            if sandbox is None:
                continue
            ok = True
            try:
                sandbox.destroy()
            except Exception:
                ok = False
                log.exception("warm pool %s could not destroy sandbox %s", self.pool_id, sandbox.id)
            with self._cond:
                self._ledger.destroyed_one(ok)
                self._cond.notify_all()

    def _refill_loop(self, reserved: bool = False) -> None:
        """Background worker: expire, refill, back off after failures, sleep until there is work.

        ``reserved``: the constructor reserved this worker's first start.
        """
        if reserved:
            self._start_for_queue()
        while True:
            expired: list[Sandbox] = []
            with self._cond:
                while True:
                    if self._ledger.closed:
                        return
                    now = self._clock()
                    expired = self._ledger.take_expired(now)
                    if expired:
                        break
                    wait = self._retry_at - time.monotonic()
                    if wait <= 0 and self._ledger.begin_refill():
                        break
                    if wait <= 0:
                        expiry = self._ledger.next_expiry()
                        wait = MAX_IDLE_WAIT_S if expiry is None else expiry - now
                    self._cond.wait(min(max(wait, 0.001), MAX_IDLE_WAIT_S))
            if expired:
                self._destroy_all(expired)
            else:
                self._start_for_queue()


class PooledSandbox(SandboxWrapper):
    """A sandbox handed out by a :class:`WarmPool`: the backend's sandbox plus who holds it.

    ``destroy`` (and leaving a ``with`` block) releases it to the pool, which destroys it.
    Attributes a backend's sandbox adds (``plan``, ``uid``, ``ping``) are reached through it.
    ``source`` says how the acquire got it: :data:`SOURCE_READY` (queued, at once),
    :data:`SOURCE_REFILL` (queued after waiting for a background start) or :data:`SOURCE_MISS`
    (started by the acquire itself).
    """

    def __init__(self, pool: WarmPool, sandbox: Sandbox, lease: Lease, *, source: str = "ready") -> None:
        super().__init__(sandbox)
        self.pool = pool
        self.sandbox = sandbox
        self.lease = lease
        self.source = source
        self._spec = dataclasses.replace(
            sandbox.spec, labels={**sandbox.spec.labels, TENANT_LABEL: lease.tenant, JOB_LABEL: lease.job}
        )

    @property
    def spec(self) -> SandboxSpec:
        """The sandbox's spec, its labels naming the tenant and job holding it."""
        return self._spec

    @property
    def tenant(self) -> str:
        return self.lease.tenant

    @property
    def job(self) -> str:
        return self.lease.job

    def destroy(self) -> None:
        self.pool.release(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks; private names and a half-built object stop here.
        if name.startswith("_") or "sandbox" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.sandbox, name)

    def __repr__(self) -> str:
        return f"PooledSandbox({self.id!r}, tenant={self.tenant!r}, job={self.job!r})"
