"""The swarm demo job: a swarm fixes a broken codebase three times and learns to do it faster.

``python -m rayflow.jobs.demo`` (or ``rayflow demo``) generates a codebase of small Python modules,
each with one real defect and real unittest tests (:mod:`rayflow.jobs.demo_codebase`), and runs
three jobs of the fixing agent (:func:`rayflow.guest.agents.fixer.fix_module`) over it on a Ray
cluster, each subtask in its own sandbox and each job on a fresh copy of the same broken code:

1. ``memory-off``: the control; agents get no hub token and try repairs in their default order;
2. ``run-1``: agents search the shared lessons namespace before trying anything and store what
   fixed each failure;
3. ``run-2``: the same work again; now the lessons of run 1 are there.

Why three runs and not two: the control is measured in the same session, on the same machine and
codebase, so the reduction in attempts (``1 - run2 / memory_off``) is a ratio of two numbers that
share their noise. Why a fresh lessons namespace per session: a hub that outlives one demo (a
long-lived cluster) must not hand run 1 the lessons of an earlier demo.

With ``--matts parallel`` (or ``sequential``) every run scales each module's fix with MaTTS,
told about the fixing agent by :data:`rayflow.jobs.fixer_profile.FIXER_PROFILE`; the memory-off
control then stores no contrast lessons either.

Inside ``ray job submit`` the cluster's address comes from ``RAY_ADDRESS``; otherwise a local
Ray instance is started for the demo.

A run meant to use memory in which no subtask could (every memory call failed: the hub was not
reachable from the sandboxes) makes the demo exit with status 3 and says so: its comparison would
only measure the control twice.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayflow.errors import ConfigError
from rayflow.jobs.fixer_profile import FIXER, fixer_matts
from rayflow.swarm.job import BACKENDS, AgentRef, Job, Matts, TaskList
from rayflow.wire.subtasks import Phase

DEFAULT_OUT = Path("rayflow-demo-out")
DEFAULT_MODULES = 24
DEFAULT_WORKERS = 2
#: Most repairs the agent may try on one module; the hardest default order needs far fewer.
MAX_ATTEMPTS = 40
#: Wall-clock limit of one module's fix (a test run takes well under a second).
AGENT_TIMEOUT_S = 300.0
SUMMARY_FORMAT = "rayflow.demo/1"
#: Exit status when a run meant to use memory could not use it at all.
EXIT_MEMORY_UNUSABLE = 3
#: Phases in the order a run goes through them (the timeline's names).
PHASE_ORDER = tuple(phase.value for phase in Phase)


@dataclass(frozen=True)
class RunPlan:
    """One of the demo's three jobs: its label and whether its agents use memory."""

    label: str
    memory: bool
    description: str


RUNS: tuple[RunPlan, ...] = (
    RunPlan("memory-off", False, "control: no memory"),
    RunPlan("run-1", True, "memory on, empty lessons namespace"),
    RunPlan("run-2", True, "memory on, lessons of run 1"),
)


@dataclass(frozen=True)
class DemoSettings:
    """What ``python -m rayflow.jobs.demo`` was asked to do."""

    modules: int = DEFAULT_MODULES
    workers: int = DEFAULT_WORKERS
    backend: str = "auto"
    seed: int = 0
    out: Path = DEFAULT_OUT
    address: str | None = None
    #: Also draw timelines and the comparison plot (off for callers that draw their own).
    plots: bool = True
    #: Show live progress bars while a job runs.
    progress: bool = True
    #: Run every module with MaTTS: ``"parallel"`` (``matts_k`` rollouts) or ``"sequential"``
    #: (up to ``matts_r`` refinements); ``None`` runs each module once.
    matts: str | None = None
    matts_k: int = 3
    matts_r: int = 3

    def __post_init__(self) -> None:
        if self.modules < 1:
            raise ConfigError("the demo needs at least one module", modules=self.modules)
        if self.workers < 1:
            raise ConfigError("the demo needs at least one worker", workers=self.workers)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        demo_matts(self)


@dataclass
class RunOutcome:
    """What one of the three jobs did, in plain numbers (JSON-able)."""

    label: str
    job_id: str
    memory: bool
    subtasks: int
    passed: int
    attempts: int
    memory_hits: int
    subtasks_with_memory_hits: int
    wall_s: float
    phase_wall_s: dict[str, float] = field(default_factory=dict)
    phase_busy_s: dict[str, float] = field(default_factory=dict)
    #: The agent's attempts per module, in module order.
    attempts_by_module: list[int] = field(default_factory=list)
    #: How many subtask results came back for each index (exactly once means all ones).
    results_per_index: list[int] = field(default_factory=list)
    #: Subtasks whose agent made memory calls; of them, those that reached the hub and those
    #: with memory errors (:mod:`rayflow.wire.memory_use`); the last memory error seen.
    memory_used: int = 0
    memory_reached: int = 0
    memory_errors: int = 0
    memory_last_error: str = ""
    #: The job result's warnings (degraded memory, workers that failed to start).
    warnings: list[str] = field(default_factory=list)

    @property
    def memory_unusable(self) -> bool:
        """Memory was meant to be on and no subtask could use it (no memory call succeeded)."""
        return self.memory and self.subtasks > 0 and self.memory_reached == 0


# --- pure parts ---------------------------------------------------------------------------------
def session_names(session: str) -> tuple[dict[str, str], str]:
    """Job names per run label and the lessons namespace of one demo session."""
    jobs = {plan.label: f"demo-{session}-{plan.label}" for plan in RUNS}
    return jobs, f"demo/{session}/fixes"


def fix_tasks(tasks: Sequence[Mapping[str, str]], *, memory: bool, namespace: str) -> list[dict[str, Any]]:
    """The fixing agent's task per module: the module, its test, and how to use memory."""
    return [
        {**dict(task), "memory": memory, "namespace": namespace, "max_attempts": MAX_ATTEMPTS}
        for task in tasks
    ]


def demo_matts(settings: DemoSettings) -> Matts | None:
    """The demo's MaTTS settings: the fixing agent's profile, when the demo was asked to scale."""
    if settings.matts is None:
        return None
    return fixer_matts(settings.matts, k=settings.matts_k, r=settings.matts_r)


def demo_job(
    plan: RunPlan,
    name: str,
    tasks: Sequence[Mapping[str, str]],
    codebase: Path,
    namespace: str,
    *,
    workers: int,
    backend: str,
    matts: Matts | None = None,
) -> Job:
    """The job of one run: every module fixed by the fixing agent on a fresh upload of ``codebase``."""
    return Job(
        AgentRef.python(FIXER, timeout_s=AGENT_TIMEOUT_S),
        TaskList(fix_tasks(tasks, memory=plan.memory, namespace=namespace)),
        name=name,
        task={"goal": "make every module's tests pass", "run": plan.label},
        memory=plan.memory,
        memory_namespaces=(namespace,) if plan.memory else (),
        backend=backend,
        workers=workers,
        upload=str(codebase),
        matts=matts,
    )


def memory_unusable_message(outcomes: Mapping[str, RunOutcome]) -> str | None:
    """Why the demo's comparison means nothing, when a run meant to use memory could not use it."""
    broken = [o for o in outcomes.values() if o.memory_unusable]
    if not broken:
        return None
    parts = []
    for outcome in broken:
        cause = f"; last error: {outcome.memory_last_error}" if outcome.memory_last_error else ""
        parts.append(
            f"{outcome.label}: memory was on but none of its {outcome.subtasks} subtasks could use it "
            f"({outcome.memory_errors} with memory errors){cause}"
        )
    return "; ".join(parts) + ". Is the hub reachable from every node's sandboxes?"


def reduction(baseline: float, improved: float) -> float:
    """``1 - improved / baseline``: the fraction of the baseline's work saved (0.0 for no baseline)."""
    return 1.0 - improved / baseline if baseline > 0 else 0.0


def comparison(outcomes: Mapping[str, RunOutcome]) -> dict[str, Any]:
    """The headline numbers of a finished demo: attempts per run and the reduction by memory."""
    off, first, second = (outcomes[plan.label] for plan in RUNS)
    return {
        "attempts_memory_off": off.attempts,
        "attempts_run1": first.attempts,
        "attempts_run2": second.attempts,
        "reduction": round(reduction(off.attempts, second.attempts), 4),
        "reduction_run1": round(reduction(off.attempts, first.attempts), 4),
        "memory_hits_run1": first.memory_hits,
        "memory_hits_run2": second.memory_hits,
        "memory_errors_run1": first.memory_errors,
        "memory_errors_run2": second.memory_errors,
        "memory_unusable": [o.label for o in outcomes.values() if o.memory_unusable],
        "all_passed": all(o.passed == o.subtasks for o in outcomes.values()),
        "exactly_once": all(set(o.results_per_index) == {1} for o in outcomes.values()),
        "wall_s_memory_off": round(off.wall_s, 3),
        "wall_s_run2": round(second.wall_s, 3),
    }


def results_per_index(indexes: Sequence[int], expected: int) -> list[int]:
    """How many results arrived for each index ``0..expected-1`` (an unexpected index is an error)."""
    counts = [0] * expected
    for index in indexes:
        if not 0 <= index < expected:
            raise ConfigError("a result came back for a subtask the job does not have", index=index)
        counts[index] += 1
    return counts


def run_table(outcome: RunOutcome, description: str) -> Table:
    """One run at a glance: subtasks, passes, attempts, memory hits and time per phase."""
    table = Table(
        title=f"{outcome.label}: {description}",
        title_justify="left",
        caption=f"{outcome.job_id} · phase rows: window s | busy s summed over workers",
    )
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    table.add_column("busy s", justify="right")
    per = outcome.attempts / outcome.subtasks if outcome.subtasks else 0.0
    style = "green" if outcome.passed == outcome.subtasks else "bold red"
    table.add_row("subtasks", str(outcome.subtasks), "")
    table.add_row("passed", f"[{style}]{outcome.passed}[/]", "")
    table.add_row("attempts", f"{outcome.attempts} ({per:.2f} per module)", "")
    table.add_row(
        "memory hits", f"{outcome.memory_hits} (in {outcome.subtasks_with_memory_hits} modules)", ""
    )
    if outcome.memory or outcome.memory_used:
        errors = f"[bold red]{outcome.memory_errors}[/]" if outcome.memory_errors else "0"
        table.add_row("memory errors", f"{errors} of {outcome.memory_used} modules that used memory", "")
        reached_style = "bold red" if outcome.memory_unusable else "green"
        table.add_row("reached the hub", f"[{reached_style}]{outcome.memory_reached}[/] modules", "")
    table.add_row("wall s", f"{outcome.wall_s:.2f}", "")
    table.add_section()
    for phase in PHASE_ORDER:
        if phase in outcome.phase_wall_s:
            table.add_row(
                f"{phase} s",
                f"{outcome.phase_wall_s[phase]:.2f}",
                f"{outcome.phase_busy_s.get(phase, 0.0):.2f}",
            )
    return table


def comparison_table(outcomes: Mapping[str, RunOutcome], numbers: Mapping[str, Any]) -> Table:
    """The three runs side by side and the reduction memory brought."""
    table = Table(title="memory off vs. memory on: attempts to fix the same codebase", title_justify="left")
    for column in ("run", "memory", "passed", "attempts", "vs memory off", "memory hits", "memory errors", "wall s"):
        table.add_column(column, justify="left" if column in ("run", "memory") else "right")
    baseline = outcomes[RUNS[0].label].attempts
    for plan in RUNS:
        outcome = outcomes[plan.label]
        change = (
            "-" if plan is RUNS[0] else f"{-reduction(baseline, outcome.attempts):+.0%}".replace("-0%", "+0%")
        )
        table.add_row(
            plan.label,
            "on" if plan.memory else "off",
            f"{outcome.passed}/{outcome.subtasks}",
            str(outcome.attempts),
            change,
            str(outcome.memory_hits),
            f"[bold red]{outcome.memory_errors}[/]" if outcome.memory_errors else "0",
            f"{outcome.wall_s:.1f}",
        )
    table.caption = f"reduction in attempts (1 - run-2 / memory-off): {numbers['reduction']:.0%}"
    return table


# --- plots --------------------------------------------------------------------------------------
def plot_comparison(outcomes: Mapping[str, RunOutcome], path: Path) -> Path:
    """A bar plot of attempts per run (memory hits written on each bar) as a PNG."""
    labels = [plan.label for plan in RUNS]
    attempts = [outcomes[label].attempts for label in labels]
    colors = ["#9e9e9e", "#64b5f6", "#1e88e5"]
    with saved_plot(path, (6.4, 4.0)) as ax:
        bars = ax.bar(labels, attempts, color=colors)
        for bar, label in zip(bars, labels):
            outcome = outcomes[label]
            ax.annotate(
                f"{outcome.attempts} attempts\n{outcome.memory_hits} memory hits",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        modules = outcomes[labels[0]].subtasks
        ax.axhline(
            modules, color="#555555", linestyle=":", linewidth=1, label=f"one attempt per module ({modules})"
        )
        ax.legend(loc="upper right", fontsize=7, frameon=False)
        ax.set_ylabel("fix attempts (summed over modules)")
        ax.set_ylim(0, max(attempts + [modules]) * 1.25)
        ax.set_title(
            f"attempts to fix {modules} modules: {1 - attempts[2] / max(attempts[0], 1):.0%} fewer with memory"
        )
    return path


@contextmanager
def saved_plot(path: Path, size: tuple[float, float]) -> Iterator[Any]:
    """Axes of a new figure of ``size`` inches; once the block has drawn, the PNG is written to ``path``.

    One look for the demo's plots and the learning benchmark's: no top or right spine, 110 dpi,
    cropped to what was drawn. The figure is closed even when drawing fails, so a long session
    that plots many times does not keep figures alive.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        yield ax
        ax.spines[["top", "right"]].set_visible(False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files only (the Agg backend)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the demo's plots need matplotlib: pip install 'rayflow[plots]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# --- I/O ----------------------------------------------------------------------------------------
def connect(address: str | None) -> None:
    """Connect to Ray: ``address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else a new local instance."""
    import rayflow

    target = address or os.environ.get("RAY_ADDRESS") or "local"
    rayflow.init(target, log_to_driver=False, logging_level="WARNING")


def resolve_backend(backend: str, console: Console) -> str:
    """The backend to ask workers for; builds (or reuses) the sandbox image when Docker will be used.

    ``auto`` becomes ``docker`` when an engine answers here, after making sure the image is
    current (the image ships rayflow's runtime files, so an edit to them makes it stale, and a
    stale image would silently send ``auto`` to a weaker backend). Without an engine ``auto``
    stays ``auto``: each worker then picks the strongest isolation its own node offers.
    """
    if backend not in ("auto", "docker"):
        return backend
    from rayflow.sandbox.select import probe_engine

    engine = probe_engine()
    if not engine.ok:
        if backend == "docker":
            raise ConfigError(f"the docker backend needs a Docker engine: {engine.reason}")
        console.print(f"[yellow]no Docker engine ({engine.reason}); workers pick their own backend[/]")
        return backend
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from rayflow.sandbox.image import DEFAULT_TAG, build_sandbox_image

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"sandbox image {DEFAULT_TAG}", total=1.0)
        info = build_sandbox_image(
            DEFAULT_TAG,
            progress=lambda message, fraction: bar.update(task, description=message[:70], completed=fraction),
        )
    state = "current" if info.cached else f"built in {info.built_seconds:.0f} s"
    console.print(f"sandbox image {DEFAULT_TAG}: {state}")
    return "docker"


def outcome_of(label: str, memory: bool, result: Any, expected: int) -> RunOutcome:
    """The plain numbers of one finished job (``result`` is a :class:`~rayflow.views.job_result.JobResult`)."""
    rows = list(result.results())
    summary = result.summary
    uses = [use for use in (r.memory for r in rows) if use is not None and use.used]
    failed = [use for use in uses if use.errors]
    return RunOutcome(
        label=label,
        job_id=result.job_id,
        memory=memory,
        subtasks=len(rows),
        passed=sum(r.ok for r in rows),
        attempts=sum(r.attempts for r in rows),
        memory_hits=sum(r.memory_hits for r in rows),
        subtasks_with_memory_hits=sum(r.memory_hits > 0 for r in rows),
        wall_s=float(summary.get("wall_s") or 0.0),
        phase_wall_s={k: float(v) for k, v in (summary.get("phase_wall_s") or {}).items()},
        phase_busy_s={k: float(v) for k, v in (summary.get("phase_busy_s") or {}).items()},
        attempts_by_module=[r.attempts for r in sorted(rows, key=lambda r: r.index)],
        results_per_index=results_per_index([r.index for r in rows], expected),
        memory_used=len(uses),
        memory_reached=sum(use.reached for use in uses),
        memory_errors=len(failed),
        memory_last_error=failed[-1].last_error if failed else "",
        warnings=list(result.warnings),
    )


@dataclass
class DemoResult:
    """A finished demo: each run's numbers, the comparison, the last report and the files written."""

    outcomes: dict[str, RunOutcome]
    numbers: dict[str, Any]
    report: str
    files: dict[str, str]
    backend: str


def run_demo(settings: DemoSettings, console: Console | None = None) -> DemoResult:
    """Generate the codebase, run the three jobs, print their tables and write the artifacts."""
    from rayflow.api import Swarm
    from rayflow.jobs.demo_codebase import decompose_codebase, generate_codebase

    console = console or Console()
    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    session = secrets.token_hex(4)
    job_names, namespace = session_names(session)
    with tempfile.TemporaryDirectory(prefix="rayflow-demo-") as scratch:
        codebase = Path(scratch) / "codebase"
        modules = generate_codebase(codebase, settings.modules, seed=settings.seed)
        tasks = decompose_codebase(codebase)
        families = len({m.family for m in modules})
        console.print(
            f"[bold]rayflow swarm demo[/]: {len(tasks)} broken modules ({families} kinds of defect, seed "
            f"{settings.seed}), {settings.workers} workers, lessons in [cyan]{namespace}[/]"
        )
        backend = resolve_backend(settings.backend, console)
        connect(settings.address)
        # The hub's memory and the results logs outlive the run: the lessons can be looked at.
        swarm = Swarm(state_dir=out / "state")
        outcomes: dict[str, RunOutcome] = {}
        files: dict[str, str] = {}
        report = ""
        for plan in RUNS:
            job = demo_job(
                plan,
                job_names[plan.label],
                tasks,
                codebase,
                namespace,
                workers=settings.workers,
                backend=backend,
                matts=demo_matts(settings),
            )
            console.rule(f"{plan.label}: {plan.description}")
            result = swarm.run(job, progress=settings.progress)
            outcome = outcome_of(plan.label, plan.memory, result, len(tasks))
            outcomes[plan.label] = outcome
            console.print(run_table(outcome, plan.description))
            for warning in outcome.warnings:
                console.print(f"[bold red]warning[/] {escape(warning)}")
            report = result.report
            if settings.plots:
                timeline = result.timeline()
                files[f"timeline_{plan.label}_png"] = str(timeline.plot(out / f"timeline-{plan.label}.png"))
                files[f"timeline_{plan.label}_html"] = str(
                    timeline.to_html(out / f"timeline-{plan.label}.html")
                )
            (out / f"result-{plan.label}.json").write_text(result.to_json())
            files[f"result_{plan.label}_json"] = str(out / f"result-{plan.label}.json")
    numbers = comparison(outcomes)
    console.rule("report of run-2")
    console.print(report, markup=False, highlight=False)
    console.print(comparison_table(outcomes, numbers))
    if settings.plots:
        files["comparison_png"] = str(plot_comparison(outcomes, out / "comparison.png"))
    summary_path = out / "summary.json"
    files["summary_json"] = str(summary_path)
    document = {
        "format": SUMMARY_FORMAT,
        "created_at": time.time(),
        "settings": {
            "modules": settings.modules,
            "workers": settings.workers,
            "backend": settings.backend,
            "backend_used": backend,
            "seed": settings.seed,
        },
        "namespace": namespace,
        "comparison": numbers,
        "runs": {label: outcome.__dict__ for label, outcome in outcomes.items()},
        "files": files,
    }
    summary_path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {len(files)} files to {out}")
    return DemoResult(outcomes, numbers, report, files, backend)


def parse_settings(argv: Sequence[str] | None = None) -> DemoSettings:
    """The demo's settings from command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m rayflow.jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=DEFAULT_MODULES, help="broken modules to generate")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="sandboxed workers at once")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="sandbox backend")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated codebase")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where plots and JSON go")
    parser.add_argument(
        "--address", default=None, help="Ray address (default: $RAY_ADDRESS or a local instance)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress bars")
    parser.add_argument(
        "--matts", choices=("parallel", "sequential"), default=None, help="scale each module's fix with MaTTS"
    )
    parser.add_argument("--matts-k", type=int, default=3, help="parallel MaTTS: rollouts per module")
    parser.add_argument("--matts-r", type=int, default=3, help="sequential MaTTS: refinements per module")
    args = parser.parse_args(argv)
    return DemoSettings(
        modules=args.modules,
        workers=args.workers,
        backend=args.backend,
        seed=args.seed,
        out=args.out,
        address=args.address,
        progress=not args.no_progress,
        matts=args.matts,
        matts_k=args.matts_k,
        matts_r=args.matts_r,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rayflow.jobs.demo``; exit status 0 when every module was fixed, 3
    (:data:`EXIT_MEMORY_UNUSABLE`) when a run meant to use memory could not use it at all."""
    from rayflow.errors import RayflowError

    console = Console()
    try:
        result = run_demo(parse_settings(argv), console)
    except RayflowError as exc:
        console.print(f"[red]error[/] {escape(f'[{exc.code}]')} {escape(exc.message)}")
        return 2
    unusable = memory_unusable_message(result.outcomes)
    if unusable is not None:
        console.print(f"[bold red]error[/] {escape('[memory_unusable]')} {escape(unusable)}")
        return EXIT_MEMORY_UNUSABLE
    return 0 if result.numbers["all_passed"] and result.numbers["exactly_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
