"""Benchmark of the sandbox layer: cold starts against raw baselines, warm acquire, exec, destroy.

Run from the repository root: ``python benchmarks/sandbox.py [--quick] [--out FILE]``.

Everything is real: containers of the ``rayflow-sandbox:latest`` image on the local Docker engine,
bubblewrap namespaces, processes. Baselines are measured in the same run, on the same image and
host directories, interleaved sample by sample with what they are compared to, because the
machine is noisy.

* ``raw_docker_run_p50_ms``: ``docker run --rm --network none <image> true`` through the CLI,
  from the call until the container has exited and been removed. ``raw_docker_sdk_p50_ms`` is the
  same through the engine API (create, start, wait, remove) without the CLI's own start-up.
* ``docker_cold_p50_ms``: ``DockerBackend.create`` until the first exec of ``true`` has answered
  (the container runs the runtime, so this includes its Python start-up). ``*_create_only_*``
  is ``create`` alone: Docker's returns after a ping, the local backend's before its runtime has
  started.
* ``raw_bwrap_p50_ms``: ``bwrap`` running ``true`` with ``/usr`` bound read-only, the host's
  ``/bin``/``/lib*`` links, ``/proc``, ``/dev`` and new ipc/pid/net/uts/cgroup namespaces.
* ``local_cold_p50_ms``: ``LocalBackend.create`` until the first exec of ``true`` has answered.
* ``warm_acquire_p50_ms``: ``WarmPool.acquire`` over the local backend with a ready sandbox
  queued; the pool refills (``wait_ready``) between samples, untimed. A miss (a synchronous
  start) fails the run rather than pass for a warm sample. ``warm_acquire_docker_p50_ms``: the
  same over the Docker backend.
* ``exec_rtt_p50_ms``: an exec of ``true`` in a live Docker sandbox, after a few warm-up calls;
  ``exec_rtt_local_p50_ms`` and ``exec_rtt_process_p50_ms`` in the other backends.
* ``parallel10_provision_s``: 10 ``DockerBackend.create`` calls from 10 threads, until all have
  answered their first exec (median over rounds).
* ``destroy_p50_ms``: ``DockerSandbox.destroy`` as the caller waits for it (the sandbox's
  processes are killed and its channel closed; the engine's removal of the container, network and
  rules continues in the backend's reaper thread). ``destroy_complete_p50_ms``: from the same call
  until ``DockerBackend.flush`` returns, i.e. until the engine has removed everything; the next
  sample starts only then, so background removals never overlap a measurement.
  ``destroy_local_p50_ms`` for the local backend.

Every sandbox is destroyed on the way out, error or not, and anything left carrying this run's
owner (containers, bubblewrap sandboxes) is swept at the end.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, percentile_ms, write_result

from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.docker_backend import DockerBackend
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.image import DEFAULT_TAG, build_sandbox_image
from rayflow.sandbox.local_backend import HostLayout, LocalBackend
from rayflow.sandbox.pool import WarmPool
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.sandbox.spec import SandboxSpec

#: Label on the baseline containers, so the final sweep finds them if a removal failed.
BENCH_LABEL = "rayflow.benchmark"
PARALLEL = 10
#: Exec calls discarded before the round-trip samples (first-call allocations, page faults).
EXEC_WARMUP = 5


def progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )


class Live:
    """Every sandbox the benchmark holds, so all of them are destroyed whatever happens."""

    def __init__(self) -> None:
        self._sandboxes: dict[int, Sandbox] = {}
        self._lock = threading.Lock()

    def add(self, sandbox: Sandbox) -> Sandbox:
        with self._lock:
            self._sandboxes[id(sandbox)] = sandbox
        return sandbox

    def destroy(self, sandbox: Sandbox) -> float:
        """Destroy ``sandbox``; the seconds the caller waited."""
        t0 = time.perf_counter()
        sandbox.destroy()
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._sandboxes.pop(id(sandbox), None)
        return elapsed

    def destroy_all(self) -> None:
        with self._lock:
            doomed = list(self._sandboxes.values())
            self._sandboxes.clear()
        for sandbox in doomed:
            try:
                sandbox.destroy()
            except Exception as exc:  # noqa: BLE001 - keep destroying the others
                print(f"could not destroy sandbox {sandbox.id}: {exc}", file=sys.stderr)


def check_true(sandbox: Sandbox) -> None:
    result = sandbox.exec(["true"], timeout_s=60.0)
    if not result.ok:
        raise RuntimeError(
            f"'true' failed in {sandbox.id}: exit {result.exit_code}, {result.stderr[-500:]!r}"
        )


def cold_start(create: Callable[[], Sandbox], live: Live) -> tuple[Sandbox, float, float]:
    """Create a sandbox and run ``true`` in it: the sandbox, the seconds until it answered, and
    the seconds ``create`` alone took (backends differ in how much start-up happens inside it)."""
    t0 = time.perf_counter()
    sandbox = live.add(create())
    created = time.perf_counter() - t0
    check_true(sandbox)
    return sandbox, time.perf_counter() - t0, created


@contextmanager
def phase(console: Console, description: str, total: int) -> Iterator[Callable[[], None]]:
    with progress(console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


# --- baselines ------------------------------------------------------------------------------------
def raw_docker_cli(owner: str) -> float:
    argv = [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--label",
        f"{BENCH_LABEL}={owner}",
        DEFAULT_TAG,
        "true",
    ]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def raw_docker_sdk(client: Any, owner: str) -> float:
    api = client.api
    t0 = time.perf_counter()
    container = api.create_container(
        DEFAULT_TAG,
        ["true"],
        labels={BENCH_LABEL: owner},
        host_config=api.create_host_config(network_mode="none"),
    )
    try:
        api.start(container["Id"])
        status = api.wait(container["Id"], timeout=60)
    finally:
        api.remove_container(container["Id"], force=True)
    elapsed = time.perf_counter() - t0
    if status.get("StatusCode") != 0:
        raise RuntimeError(f"raw container exited with {status}")
    return elapsed


def raw_bwrap_argv(layout: HostLayout) -> list[str]:
    argv = ["bwrap"]
    for path in layout.system_dirs:
        argv += ["--ro-bind", path, path]
    for link, target in layout.system_links:
        argv += ["--symlink", target, link]
    argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--die-with-parent", "true"]
    return argv


def raw_bwrap(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


# --- measurements ---------------------------------------------------------------------------------
@dataclass
class ColdSamples:
    """Seconds per sample: cold start, ``create`` alone, destroy (the caller's part, and until the
    backend's background removal finished), and each baseline by name."""

    cold: list[float] = field(default_factory=list)
    create_only: list[float] = field(default_factory=list)
    destroy: list[float] = field(default_factory=list)
    destroy_complete: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)


def measure_cold(
    console: Console,
    name: str,
    create: Callable[[], Sandbox],
    n: int,
    live: Live,
    baselines: dict[str, Callable[[], float]],
    flush: Callable[[], object] = lambda: None,
) -> ColdSamples:
    """``n`` sandboxes one at a time, each sample preceded by one run of every baseline.

    ``flush`` waits for the backend's background removals after each destroy (timed as the
    destroy's completion).

    Why interleaved: the machine's speed drifts over a run (other work, the engine's own
    housekeeping); alternating puts the same drift into the baseline and the measurement, so
    their ratio means something even with few samples.
    """
    out = ColdSamples(baselines={label: [] for label in baselines})
    with phase(console, f"{name}: {', '.join(baselines)} / create + first exec / destroy", n) as advance:
        for _ in range(n):
            for label, run in baselines.items():
                out.baselines[label].append(run())
            sandbox, elapsed, created = cold_start(create, live)
            out.cold.append(elapsed)
            out.create_only.append(created)
            t0 = time.perf_counter()
            out.destroy.append(live.destroy(sandbox))
            flush()
            out.destroy_complete.append(time.perf_counter() - t0)
            advance()
    return out


def measure_exec(
    console: Console, name: str, create: Callable[[], Sandbox], n: int, live: Live
) -> list[float]:
    sandbox, _, _ = cold_start(create, live)
    try:
        for _ in range(EXEC_WARMUP):
            check_true(sandbox)
        samples = []
        with phase(console, f"{name}: exec 'true' round trip", n) as advance:
            for _ in range(n):
                t0 = time.perf_counter()
                result = sandbox.exec(["true"])
                samples.append(time.perf_counter() - t0)
                if not result.ok:
                    raise RuntimeError(f"'true' failed in {sandbox.id}: exit {result.exit_code}")
                advance()
        return samples
    finally:
        live.destroy(sandbox)


def measure_warm_acquire(console: Console, backend: Any, spec: SandboxSpec, n: int, name: str) -> list[float]:
    samples = []
    with WarmPool(backend, spec, size=1, refill_workers=1) as pool:
        with phase(console, f"{name}: warm pool acquire (refill between)", n) as advance:
            for i in range(n):
                if not pool.wait_ready(timeout_s=120.0):
                    raise RuntimeError(f"the warm pool did not refill: {pool.stats()}")
                t0 = time.perf_counter()
                sandbox = pool.acquire("bench", f"job-{i}")
                samples.append(time.perf_counter() - t0)
                try:
                    check_true(sandbox)
                finally:
                    pool.release(sandbox)
                advance()
        stats = pool.stats()
    if stats.misses:
        raise RuntimeError(f"{stats.misses} warm acquires missed the queue; the samples are not warm")
    return samples


def parallel_round(backend: DockerBackend, spec: SandboxSpec, live: Live) -> float:
    """Seconds until ``PARALLEL`` sandboxes created from as many threads have all answered."""
    errors: list[BaseException] = []
    made: list[Sandbox] = []
    lock = threading.Lock()
    barrier = threading.Barrier(PARALLEL + 1)

    def one() -> None:
        barrier.wait()
        try:
            sandbox, _, _ = cold_start(lambda: backend.create(spec), live)
            with lock:
                made.append(sandbox)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one, name=f"bench-parallel-{i}") for i in range(PARALLEL)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    destroyers = [threading.Thread(target=live.destroy, args=(s,)) for s in made]
    for thread in destroyers:
        thread.start()
    for thread in destroyers:
        thread.join()
    backend.flush()
    if errors:
        raise RuntimeError(f"{len(errors)} of {PARALLEL} parallel creates failed: {errors[0]!r}")
    return elapsed


def sweep_leftovers(client: Any, backends: list[Any], owner: str) -> int:
    """Remove anything of this run still present; how many things were found."""

    def not_mine(other: str) -> bool:
        return other != owner and not other.startswith(owner + "/")

    found = 0
    for backend in backends:
        try:
            found += len(backend.reap(not_mine))
        except Exception as exc:  # noqa: BLE001 - report, go on with the others
            print(f"sweep of the {backend.name} backend failed: {exc}", file=sys.stderr)
    if client is not None:
        for container in client.api.containers(all=True, filters={"label": f"{BENCH_LABEL}={owner}"}):
            client.api.remove_container(container["Id"], force=True)
            found += 1
    return found


def main() -> None:
    args = parse_args("sandbox", __doc__.splitlines()[0])
    console = Console()
    # The process backend warns at every create that it isolates nothing; known here.
    logging.getLogger("rayflow.sandbox.process_backend").setLevel(logging.ERROR)
    n = 10 if args.quick else 30
    n_exec = 50 if args.quick else 200
    n_parallel = 3 if args.quick else 7
    owner = current_process_owner()
    spec = SandboxSpec(owner=f"{owner}/bench")
    metrics: dict[str, float | int | bool] = {}

    info = build_sandbox_image()
    console.print(f"sandbox image {info.tag}: cached={info.cached}")
    docker_backend = DockerBackend(build_image=False)
    local_backend = LocalBackend()
    process_backend = ProcessBackend()
    live = Live()
    started = time.perf_counter()
    try:
        # Warm the engine's image cache, the runtime's bytecode and the CLI once, untimed.
        raw_docker_cli(owner)
        docker_backend.client.api.ping()
        for create in (lambda: docker_backend.create(spec), lambda: local_backend.create(spec)):
            sandbox, _, _ = cold_start(create, live)
            live.destroy(sandbox)
        docker_backend.flush()

        client = docker_backend.client
        docker = measure_cold(
            console,
            "docker",
            lambda: docker_backend.create(spec),
            n,
            live,
            {"docker run": lambda: raw_docker_cli(owner), "API run": lambda: raw_docker_sdk(client, owner)},
            flush=docker_backend.flush,
        )
        bwrap_argv = raw_bwrap_argv(local_backend.layout)
        local = measure_cold(
            console,
            "local",
            lambda: local_backend.create(spec),
            n,
            live,
            {"bwrap": lambda: raw_bwrap(bwrap_argv)},
        )
        warm = measure_warm_acquire(console, local_backend, spec, n, "local")
        warm_docker = measure_warm_acquire(console, docker_backend, spec, max(5, n // 3), "docker")
        docker_backend.flush()
        exec_docker = measure_exec(console, "docker", lambda: docker_backend.create(spec), n_exec, live)
        docker_backend.flush()
        exec_local = measure_exec(console, "local", lambda: local_backend.create(spec), n_exec, live)
        exec_process = measure_exec(console, "process", lambda: process_backend.create(spec), n_exec, live)
        with phase(console, f"docker: {PARALLEL} creates in parallel", n_parallel) as advance:
            rounds = []
            for _ in range(n_parallel):
                rounds.append(parallel_round(docker_backend, spec, live))
                advance()
    finally:
        live.destroy_all()
        leftovers = sweep_leftovers(
            docker_backend.client, [docker_backend, local_backend, process_backend], owner
        )
        if leftovers:
            console.print(f"[yellow]swept {leftovers} leftover sandbox(es)/container(s) of this run[/yellow]")
        docker_backend.close()

    metrics["samples"] = n
    metrics["raw_docker_run_p50_ms"] = round(percentile_ms(docker.baselines["docker run"], 50), 2)
    metrics["raw_docker_sdk_p50_ms"] = round(percentile_ms(docker.baselines["API run"], 50), 2)
    metrics["docker_cold_p50_ms"] = round(percentile_ms(docker.cold, 50), 2)
    metrics["docker_cold_p90_ms"] = round(percentile_ms(docker.cold, 90), 2)
    metrics["docker_create_only_p50_ms"] = round(percentile_ms(docker.create_only, 50), 2)
    metrics["docker_cold_ratio"] = round(metrics["docker_cold_p50_ms"] / metrics["raw_docker_run_p50_ms"], 3)
    metrics["docker_cold_ratio_vs_sdk"] = round(
        metrics["docker_cold_p50_ms"] / metrics["raw_docker_sdk_p50_ms"], 3
    )
    metrics["raw_bwrap_p50_ms"] = round(percentile_ms(local.baselines["bwrap"], 50), 2)
    metrics["local_cold_p50_ms"] = round(percentile_ms(local.cold, 50), 2)
    metrics["local_cold_p90_ms"] = round(percentile_ms(local.cold, 90), 2)
    metrics["local_create_only_p50_ms"] = round(percentile_ms(local.create_only, 50), 2)
    metrics["local_cold_ratio_vs_bwrap"] = round(
        metrics["local_cold_p50_ms"] / metrics["raw_bwrap_p50_ms"], 2
    )
    metrics["warm_acquire_p50_ms"] = round(percentile_ms(warm, 50), 4)
    metrics["warm_acquire_p99_ms"] = round(percentile_ms(warm, 99), 4)
    metrics["warm_acquire_docker_p50_ms"] = round(percentile_ms(warm_docker, 50), 4)
    metrics["exec_rtt_p50_ms"] = round(percentile_ms(exec_docker, 50), 3)
    metrics["exec_rtt_p99_ms"] = round(percentile_ms(exec_docker, 99), 3)
    metrics["exec_rtt_local_p50_ms"] = round(percentile_ms(exec_local, 50), 3)
    metrics["exec_rtt_process_p50_ms"] = round(percentile_ms(exec_process, 50), 3)
    metrics["parallel10_provision_s"] = round(statistics.median(rounds), 3)
    metrics["parallel10_provision_max_s"] = round(max(rounds), 3)
    metrics["destroy_p50_ms"] = round(percentile_ms(docker.destroy, 50), 2)
    metrics["destroy_p90_ms"] = round(percentile_ms(docker.destroy, 90), 2)
    metrics["destroy_complete_p50_ms"] = round(percentile_ms(docker.destroy_complete, 50), 2)
    metrics["destroy_local_p50_ms"] = round(percentile_ms(local.destroy, 50), 2)
    metrics["leftovers_swept"] = leftovers
    metrics["meets_warm_acquire_target"] = metrics["warm_acquire_p50_ms"] <= 5.0
    metrics["meets_docker_cold_target"] = metrics["docker_cold_ratio"] <= 1.1
    metrics["meets_local_cold_target"] = metrics["local_cold_p50_ms"] <= 30.0
    metrics["meets_destroy_target"] = metrics["destroy_p50_ms"] <= 10.0
    metrics["meets_exec_rtt_target"] = metrics["exec_rtt_p50_ms"] <= 5.0
    metrics["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_result("sandbox", args.quick, metrics, args.out, console)


if __name__ == "__main__":
    main()
