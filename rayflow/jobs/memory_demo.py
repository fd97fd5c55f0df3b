"""The ReasoningBank demo job: agents learn from finished tasks and from the outcomes of reuse.

It runs the embedded bank end to end on real files: trajectories are judged and distilled into
memory, a new task retrieves what applies (with every score component shown), reported outcomes
move reliability, consolidation merges duplicates, secrets never reach the disk in clear text, and
a reopened bank serves everything again.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table

from rayflow.config import load_config
from rayflow.jobs.synthetic_tasks import trajectory
from rayflow.memory.bank import ReasoningBank
from rayflow.views.retrieval_table import retrieval_table
from rayflow.wire.memory_records import Step, Trajectory

TENANT = "acme"
NAMESPACE = "swarm/demo"


def run_memory_demo(
    console: Console, *, state_dir: Path | None = None, plot_path: Path | None = None
) -> dict:
    """Run the demo, print what happens, and return the headline figures."""
    with tempfile.TemporaryDirectory(prefix="rayflow-demo-") as tmp:
        root = Path(state_dir) if state_dir is not None else Path(tmp)
        config = load_config({"state_dir": root})
        console.print(Panel.fit(f"ReasoningBank demo · state in {root}", style="bold"))
        with ReasoningBank(root, config=config) as bank:
            bank.create_tenant(TENANT)
            recorded = _learn_from_trajectories(console, bank)
            query = "pytest fails with ModuleNotFoundError: No module named 'yaml' in the config loader"
            results = _show_retrieval(console, bank, query)
            history = _learn_from_outcomes(console, bank, [r.item.id for r in results[:3]])
            secret_kept_out = _show_scrubbing(console, bank)
            report = bank.consolidate(TENANT)
            console.print(
                f"consolidation: examined {report.examined}, merged {report.merged} duplicate(s), "
                f"linked {report.contradictions} contradiction(s), pruned {report.pruned}"
            )
            before = bank.stats(TENANT)
        with ReasoningBank(root, config=config) as reopened:
            after = reopened.stats(TENANT)
            again = reopened.retrieve(TENANT, query, k=3, namespace=NAMESPACE)
        console.print(
            f"reopened from disk: {after['items']} items (before close: {before['items']}); "
            f"top result unchanged: {again[0].item.id == results[0].item.id if again and results else False}"
        )
        if plot_path is not None:
            _plot(history, plot_path, console)
        return {
            "trajectories": recorded,
            "items": after["items"],
            "merged": report.merged,
            "secret_on_disk": not secret_kept_out,
        }


def _learn_from_trajectories(console: Console, bank: ReasoningBank) -> int:
    rng = random.Random(2026)
    count = 24
    table = Table(title="Judged and distilled trajectories (first 8)")
    for column in ("task", "verdict", "judge confidence", "lessons"):
        table.add_column(column)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("recording trajectories", total=count)
        for i in range(count):
            t = trajectory(rng, task_id=f"task-{i:03d}", success=rng.random() < 0.6, namespace=NAMESPACE)
            record = bank.record_trajectory(TENANT, t)
            if i < 8:
                table.add_row(
                    t.task_id,
                    record.verdict.outcome.value,
                    f"{record.verdict.confidence:.2f}",
                    str(len(record.item_ids)),
                )
            progress.advance(bar)
    console.print(table)
    return count


def _show_retrieval(console: Console, bank: ReasoningBank, query: str):  # noqa: ANN202
    results = bank.retrieve(TENANT, query, k=5, namespace=NAMESPACE)
    console.print(retrieval_table(results, f"retrieve: {query}"))
    return results


def _learn_from_outcomes(
    console: Console, bank: ReasoningBank, item_ids: list[str]
) -> dict[str, list[float]]:
    """Agents reuse three items; one keeps helping, one keeps failing, one is mixed."""
    rng = random.Random(11)
    success_rate = dict(zip(item_ids, (0.9, 0.15, 0.5)))
    history = {item_id: [bank.get(TENANT, item_id).reliability] for item_id in item_ids}
    rounds = 30
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("agents reuse memory and report outcomes", total=rounds)
        for _ in range(rounds):
            for item_id, rate in success_rate.items():
                bank.report_outcome(TENANT, [item_id], success=rng.random() < rate)
                history[item_id].append(bank.get(TENANT, item_id).reliability)
            progress.advance(bar)
    table = Table(title=f"confidence that learns ({rounds} reported uses each)")
    for column in ("item", "true success rate", "reliability before", "after"):
        table.add_column(column)
    for item_id, rate in success_rate.items():
        table.add_row(item_id, f"{rate:.2f}", f"{history[item_id][0]:.3f}", f"{history[item_id][-1]:.3f}")
    console.print(table)
    return history


def _show_scrubbing(console: Console, bank: ReasoningBank) -> bool:
    """Record a trajectory that leaked a token; show that neither the bank nor the disk keeps it."""
    leaked = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    t = Trajectory(
        task_id="task-secret",
        query="deploy the s3 uploader",
        steps=(Step(f"export GITHUB_TOKEN={leaked}", "ok"), Step("run pytest -q", "12 passed in 0.4s")),
        namespace=NAMESPACE,
        exit_code=0,
        tests_passed=12,
        tests_failed=0,
        final_output=f"done, used token {leaked} and mailed ops@example.com",
    )
    record = bank.record_trajectory(TENANT, t)
    texts = [bank.get(TENANT, item_id).content for item_id in record.item_ids]
    on_disk = b"".join(p.read_bytes() for p in bank.state_dir.rglob("*") if p.is_file())
    clean = all(leaked not in text for text in texts) and leaked.encode() not in on_disk
    console.print(
        f"scrubbing: token present in stored items: {not all(leaked not in x for x in texts)}, "
        f"on disk: {leaked.encode() in on_disk}"
    )
    return clean


def _plot(history: dict[str, list[float]], path: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed; skipping the plot (pip install 'rayflow[plots]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (item_id, values), label in zip(history.items(), ("helps 90%", "helps 15%", "helps 50%")):
        ax.plot(range(len(values)), values, label=f"{label} ({item_id[-6:]})")
    ax.set_xlabel("reported uses")
    ax.set_ylabel("reliability (Beta posterior mean)")
    ax.set_ylim(0, 1)
    ax.set_title("ReasoningBank confidence learns from outcomes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"plot saved to {path}")
