"""Benchmark of the design's Diagram 9 on this machine: native vs pattern A (warm, cold) vs pattern B.

Ten agents whose work is one model call of 2 s (a local stand-in for the Anthropic Messages API
that answers after a fixed delay, as an LLM API would), each also reading and writing memory over
QUIC, run through the real swarm on a local Ray cluster:

* ``native``: workers on the process backend (no isolation), started before the job as a native
  swarm keeps its agents running: the baseline of the same run;
* ``a_warm``: pattern A, sandboxed workers started before the job (``Swarm.prewarm``) and adopted;
* ``a_cold``: pattern A, every sandbox created when the job asks for it;
* ``b``: pattern B, workers warm and the coordinator's decomposition and synthesis in a sandbox
  of its own (memory only over QUIC).

A variant's time is the job's wall time inside the coordinator, from the job's start to its
report (``*_s``); the time seen by the caller, which adds the hand-over to the coordinator actor,
is reported too (``*_e2e_s``). Overheads are fractions over native: 0.03 = +3%. Variants run
interleaved, ``repeats`` times each, and the median counts.

Scale: one job of many trivial subtasks (1000 in the full run) with a handful of sandboxes at a
time reports the throughput (subtasks per minute) and the coordinator's peak memory.

Run from the repository root: ``.venv/bin/python benchmarks/patterns.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import parse_args, write_result  # noqa: E402

AGENTS = 10
MODEL_DELAY_S = 2.0
CPUS_PER_SANDBOX = 0.2


def sandbox_backend() -> str:
    """Docker when an engine answers (it builds the image if missing), else the local backend."""
    from rayflow.sandbox.select import choose_backend

    return choose_backend("auto", build_image=True).backend.name


def model_job(name: str, *, backend: str, port: int, pattern: str = "A", warm: bool = False) -> Any:
    from rayflow.sandbox.spec import Limits
    from rayflow.swarm.job import AgentRef, Job, TaskList

    tasks = [
        {"prompt": f"agent {i}: summarize module {i} and propose one refactoring", "model_port": port,
         "memory": True, "namespace": "bench/answers"}
        for i in range(AGENTS)
    ]
    return Job(
        AgentRef.python("rayflow.guest.agents.model_call:answer", timeout_s=120),
        TaskList(tasks),
        name=name,
        backend=backend,
        pattern=pattern,
        workers=AGENTS,
        warm_pool=warm,
        limits=Limits(cpus=CPUS_PER_SANDBOX, memory_bytes=256 * 1024 * 1024),
        memory_namespaces=("bench/*",),
        allow=(("127.0.0.1", port),),
    )


def timed_run(swarm: Any, job: Any) -> tuple[float, float, Any]:
    started = time.monotonic()
    result = swarm.run(job, progress=False, timeout_s=600)
    e2e = time.monotonic() - started
    meta = result.summary
    inside = float(meta["finished_at"]) - float(meta["started_at"])
    failed = [r.error for r in result.results() if not r.ok]
    if failed:
        raise RuntimeError(f"{job.name}: {len(failed)} subtasks failed: {failed[:2]}")
    return inside, e2e, result


def scale_run(swarm: Any, backend: str, count: int, console: Console) -> dict[str, float]:
    from rayflow.sandbox.spec import Limits
    from rayflow.swarm.job import AgentRef, Job, TaskList

    job = Job(
        AgentRef.shell("true", timeout_s=60),
        TaskList({"n": i} for i in range(count)),
        backend=backend,
        workers=4,
        limits=Limits(cpus=0.5, memory_bytes=256 * 1024 * 1024),
    )
    console.print(f"scale: {count} subtasks on 4 {backend} sandboxes")
    started = time.monotonic()
    result = swarm.run(job, progress=True, timeout_s=3600)
    elapsed = time.monotonic() - started
    rows = sum(1 for _ in result.results())
    if rows != count or result.summary["failed"]:
        raise RuntimeError(f"scale job gave {rows} results, {result.summary['failed']} failed")
    return {
        "scale_subtasks": count,
        "scale_s": round(elapsed, 2),
        "scale_subtasks_per_min": round(count / elapsed * 60.0, 1),
        "coordinator_peak_rss_mb": round(result.summary["coordinator"]["peak_rss_bytes"] / 2**20, 1),
    }


def main() -> int:
    args = parse_args("patterns", __doc__.splitlines()[0])
    console = Console()
    repeats = 1 if args.quick else 3
    scale_count = 200 if args.quick else 1000

    import rayflow
    from rayflow.api import Swarm
    from rayflow.testing.model_standin import ModelStandin

    backend = sandbox_backend()
    console.print(f"sandboxes: {backend}; {AGENTS} agents, model delay {MODEL_DELAY_S} s, {repeats} repeats")
    rayflow.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    times: dict[str, list[tuple[float, float]]] = {"native": [], "a_warm": [], "a_cold": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="rayflow-bench-") as state, ModelStandin(MODEL_DELAY_S) as model:
        port = model.address[1]
        with Swarm(hub_region="bench", state_dir=state) as swarm:
            # One untimed run per kind warms Ray's worker processes and the image cache.
            swarm.run(model_job("bench-warmup", backend=backend, port=port), progress=False, timeout_s=600)
            for round_index in range(repeats):
                plans = {
                    "native": model_job(f"native-{round_index}", backend="process", port=port, warm=True),
                    "a_warm": model_job(f"a-warm-{round_index}", backend=backend, port=port, warm=True),
                    "a_cold": model_job(f"a-cold-{round_index}", backend=backend, port=port),
                    "b": model_job(f"b-{round_index}", backend=backend, port=port, pattern="B", warm=True),
                }
                for key, job in plans.items():
                    if job.warm_pool:
                        swarm.prewarm(job, AGENTS)
                    inside, e2e, result = timed_run(swarm, job)
                    times[key].append((inside, e2e))
                    console.print(f"round {round_index + 1}/{repeats} {key:7s} {inside:6.2f} s (caller {e2e:.2f} s)")
                    if key == "b" and round_index == repeats - 1:
                        out_dir = Path(args.out).parent
                        out_dir.mkdir(parents=True, exist_ok=True)
                        result.timeline().plot(out_dir / "patterns_timeline_b.png")
            scale = scale_run(swarm, backend, scale_count, console)

    median = {key: statistics.median(t[0] for t in samples) for key, samples in times.items()}
    median_e2e = {key: statistics.median(t[1] for t in samples) for key, samples in times.items()}
    native = median["native"]
    metrics: dict[str, Any] = {
        "backend": backend,
        "agents": AGENTS,
        "model_delay_s": MODEL_DELAY_S,
        "native_s": round(native, 3),
        "a_warm_s": round(median["a_warm"], 3),
        "a_cold_s": round(median["a_cold"], 3),
        "b_s": round(median["b"], 3),
        "overhead_a_warm": round(median["a_warm"] / native - 1.0, 4),
        "overhead_a_cold": round(median["a_cold"] / native - 1.0, 4),
        "overhead_b": round(median["b"] / native - 1.0, 4),
        **{f"{key}_e2e_s": round(value, 3) for key, value in median_e2e.items()},
        **scale,
    }
    metrics["meets_a_warm_target"] = metrics["overhead_a_warm"] <= 0.03
    metrics["meets_b_target"] = metrics["overhead_b"] <= 0.08
    table = Table(title="Diagram 9 on this machine (median job wall time)")
    for column in ("variant", "seconds", "overhead", "design claimed"):
        table.add_column(column, justify="right")
    claims = {"native": "-", "a_warm": "+9%", "a_cold": "-", "b": "+26%"}
    for key in ("native", "a_warm", "a_cold", "b"):
        overhead = "-" if key == "native" else f"{median[key] / native - 1.0:+.1%}"
        table.add_row(key, f"{median[key]:.2f}", overhead, claims[key])
    console.print(table)
    write_result("patterns", args.quick, metrics, args.out, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
