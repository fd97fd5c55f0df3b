"""``WarmPool`` over real backends: process sandboxes and bubblewrap sandboxes."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rayflow.sandbox.backend import SandboxBackend
from rayflow.sandbox.pool import WarmPool
from rayflow.sandbox.spec import MIB, Limits, SandboxSpec

pytestmark = pytest.mark.integration

SPEC = SandboxSpec(
    owner="pool-test", limits=Limits(memory_bytes=256 * MIB, disk_bytes=16 * MIB, wall_time_s=600.0)
)
READY_WITHIN_S = 120.0


def process_backend(root: Path) -> SandboxBackend:
    from rayflow.sandbox.process_backend import ProcessBackend

    return ProcessBackend(registry_dir=root / "registry")


def local_backend(root: Path) -> SandboxBackend:
    if shutil.which("bwrap") is None or os.geteuid() != 0:
        pytest.skip("needs bwrap and root")
    from rayflow.sandbox.local_backend import LocalBackend

    return LocalBackend(registry_dir=root / "registry")


@pytest.fixture(params=[process_backend, local_backend], ids=["process", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SandboxBackend]:
    make: Callable[[Path], SandboxBackend] = request.param
    made = make(tmp_path)
    yield made
    made.reap(lambda owner: False)


@pytest.fixture
def pool(backend: SandboxBackend) -> Iterator[WarmPool]:
    made = WarmPool(backend, SPEC, size=2, max_size=4, ttl_s=300.0)
    assert made.wait_ready(timeout_s=READY_WITHIN_S)
    yield made
    made.close()


def live_ids(backend: SandboxBackend) -> set[str]:
    return {sandbox_id for sandbox_id, _ in backend.owned()}


def test_acquired_sandbox_runs_a_command(pool: WarmPool) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    result = sandbox.exec(["/bin/sh", "-c", "echo hello"])
    assert result.ok and result.stdout == b"hello\n"
    assert pool.stats().hits == 1


def test_released_sandbox_is_destroyed(pool: WarmPool, backend: SandboxBackend) -> None:
    sandbox = pool.acquire("tenant-a", "job-1")
    assert sandbox.id in live_ids(backend)
    pool.release(sandbox)
    assert sandbox.id not in live_ids(backend)


def test_pool_refills_after_an_acquire(pool: WarmPool) -> None:
    taken = pool.acquire("tenant-a", "job-1")
    assert pool.wait_ready(2, timeout_s=READY_WITHIN_S)
    assert list(pool.leases()) == [taken.id]
    assert pool.stats().created == 3


def test_next_job_does_not_see_what_the_previous_job_wrote(pool: WarmPool) -> None:
    first = pool.acquire("tenant-a", "job-1")
    first.write_file(f"{SPEC.workdir}/secret.txt", b"tenant-a only")
    pool.release(first)
    second = pool.acquire("tenant-b", "job-2")
    assert second.id != first.id
    assert second.exec(["/bin/sh", "-c", "ls -A"]).stdout == b""


def test_pooled_sandboxes_are_owned_by_the_pool(pool: WarmPool, backend: SandboxBackend) -> None:
    owners = {owner for _, owner in backend.owned()}
    assert owners == {pool.pool_id}


def test_close_leaves_no_sandbox(backend: SandboxBackend) -> None:
    pool = WarmPool(backend, SPEC, size=2, max_size=4, ttl_s=300.0)
    assert pool.wait_ready(timeout_s=READY_WITHIN_S)
    pool.acquire("tenant-a", "job-1")
    pool.close()
    assert backend.owned() == []


def test_warm_acquire_is_served_from_the_queue(backend: SandboxBackend, record_property: Callable) -> None:
    """Acquire after the queue is full, release, repeat; every acquire is a hit. Records the p50."""
    durations = []
    with WarmPool(backend, SPEC, size=1, max_size=3, ttl_s=300.0) as pool:
        for n in range(10):
            assert pool.wait_ready(timeout_s=READY_WITHIN_S)
            started = time.perf_counter()
            sandbox = pool.acquire("tenant-a", f"job-{n}")
            durations.append(time.perf_counter() - started)
            pool.release(sandbox)
        assert pool.stats().hits == 10 and pool.stats().misses == 0
    record_property("warm_acquire_p50_ms", round(statistics.median(durations) * 1000, 3))
