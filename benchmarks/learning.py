"""Benchmark of learning: how many fewer repair attempts a swarm needs once memory holds lessons.

Run from the repository root: ``python benchmarks/learning.py [--quick] [--out FILE] [--backend B]``.

The same three jobs as the demo (:mod:`rayflow.jobs.demo`), through the real swarm: a Ray
instance started by this script, a ReasoningBank hub actor serving memory over QUIC, and every
module fixed by :func:`rayflow.guest.agents.fixer.fix_module` in its own sandbox of the chosen backend
(default ``auto``: Docker when an engine answers, the image being built if stale). Each job works
on a fresh upload of the same generated codebase (one real defect per module, checked by running
its unittest tests):

* ``attempts_memory_off``: the baseline, measured in the same run; agents get no memory;
* ``attempts_run1``: memory on, starting from an empty lessons namespace (it can only learn from
  modules fixed earlier in the same run);
* ``attempts_run2``: memory on, with the lessons run 1 stored;
* ``reduction``: ``1 - attempts_run2 / attempts_memory_off``. The goal is at least
  :data:`GOAL_REDUCTION`; it is reported as met or not, never asserted.

An attempt is one repair applied at one site followed by a test run, so attempts count real work
(a run of the module's tests each). Also written: a PNG next to the JSON with the cumulative
attempts over the modules for each run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, write_result

from rayflow.jobs.demo import RUNS, DemoSettings, RunOutcome, run_demo, saved_plot
from rayflow.swarm.job import BACKENDS

NAME = "learning"
GOAL_REDUCTION = 0.30
#: (modules, workers) of a quick and of a full run.
QUICK_SIZE = (24, 2)
FULL_SIZE = (80, 2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (under 3 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON result file")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="sandbox backend of the workers")
    parser.add_argument("--modules", type=int, default=None, help="override the number of modules")
    parser.add_argument("--workers", type=int, default=None, help="override the number of workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated codebase")
    return parser.parse_args()


def metrics_of(
    outcomes: Mapping[str, RunOutcome], numbers: Mapping[str, Any], backend: str
) -> dict[str, Any]:
    """The contract's keys first, then what explains them."""
    off, first, second = (outcomes[plan.label] for plan in RUNS)
    return {
        "attempts_memory_off": numbers["attempts_memory_off"],
        "attempts_run1": numbers["attempts_run1"],
        "attempts_run2": numbers["attempts_run2"],
        "reduction": numbers["reduction"],
        "reduction_run1": numbers["reduction_run1"],
        "goal_reduction": GOAL_REDUCTION,
        "goal_met": numbers["reduction"] >= GOAL_REDUCTION,
        "modules": off.subtasks,
        "attempts_per_module_memory_off": round(off.attempts / max(off.subtasks, 1), 3),
        "attempts_per_module_run2": round(second.attempts / max(second.subtasks, 1), 3),
        "memory_hits_run1": first.memory_hits,
        "memory_hits_run2": second.memory_hits,
        "modules_with_memory_hits_run2": second.subtasks_with_memory_hits,
        "all_passed": numbers["all_passed"],
        "exactly_once": numbers["exactly_once"],
        "wall_s_memory_off": round(off.wall_s, 3),
        "wall_s_run1": round(first.wall_s, 3),
        "wall_s_run2": round(second.wall_s, 3),
        "execute_busy_s_memory_off": round(off.phase_busy_s.get("execute", 0.0), 3),
        "execute_busy_s_run2": round(second.phase_busy_s.get("execute", 0.0), 3),
        "backend": backend,
    }


def plot_cumulative(outcomes: Mapping[str, RunOutcome], path: Path) -> Path:
    """Cumulative attempts over the modules (in module order) for each run, as a PNG."""
    styles = {"memory-off": ("#757575", "--"), "run-1": ("#64b5f6", "-"), "run-2": ("#1565c0", "-")}
    with saved_plot(path, (7.5, 4.2)) as ax:
        for plan in RUNS:
            outcome = outcomes[plan.label]
            totals = list(accumulate(outcome.attempts_by_module))
            color, line = styles.get(plan.label, ("#000000", "-"))
            ax.plot(
                range(1, len(totals) + 1),
                totals,
                color=color,
                linestyle=line,
                linewidth=2,
                label=f"{plan.label}: {outcome.attempts} attempts, {outcome.memory_hits} memory hits",
            )
        modules = outcomes[RUNS[0].label].subtasks
        ax.plot(
            [1, modules], [1, modules], color="#bdbdbd", linestyle=":", linewidth=1, label="one per module"
        )
        ax.set_xlabel("modules fixed (in order)")
        ax.set_ylabel("cumulative fix attempts")
        ax.set_title("attempts to fix the same codebase: memory off, then memory on twice")
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    return path


def main() -> None:
    args = parse_args()
    console = Console()
    modules, workers = QUICK_SIZE if args.quick else FULL_SIZE
    modules = args.modules or modules
    workers = args.workers or workers
    with tempfile.TemporaryDirectory(prefix="rayflow-bench-learning-") as scratch:
        settings = DemoSettings(
            modules=modules,
            workers=workers,
            backend=args.backend,
            seed=args.seed,
            out=Path(scratch),
            plots=False,
        )
        try:
            result = run_demo(settings, console)
        finally:
            # The hub keeps its state in ``scratch``: stop the Ray instance before that goes.
            import ray

            ray.shutdown()
    metrics = metrics_of(result.outcomes, result.numbers, result.backend)
    write_result(NAME, args.quick, metrics, args.out, console)
    plot = plot_cumulative(result.outcomes, args.out.with_suffix(".png"))
    console.print(f"wrote {plot}")
    verdict = "[green]met[/]" if metrics["goal_met"] else "[bold red]NOT met[/]"
    console.print(
        f"goal: reduction >= {GOAL_REDUCTION:.2f}: {verdict} (reduction {metrics['reduction']:.3f}: "
        f"{metrics['attempts_run2']} attempts with lessons vs {metrics['attempts_memory_off']} without)"
    )


if __name__ == "__main__":
    main()
