"""The sandbox commands' terminal faces: ``rayflow sandbox build-image`` and ``rayflow sandbox gc``.

The work is the sandbox package's (:func:`rayflow.sandbox.image.build_sandbox_image`,
:func:`rayflow.sandbox.gc.sweep`); this module only shows it: a live progress bar while the image
builds, a table of what a sweep removed.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rayflow.errors import ConfigError
from rayflow.sandbox.backend import SandboxBackend
from rayflow.sandbox.gc import owner_alive_by_pid, sweep
from rayflow.sandbox.image import ImageInfo, build_sandbox_image
from rayflow.sandbox.select import BACKEND_NAMES, construct_backend, probe_engine


def build_image_command(tag: str, method: str, with_hub_client: bool, force: bool) -> ImageInfo:
    """Build the image with a live progress bar on the terminal; what ``rayflow sandbox build-image`` runs."""
    console = Console()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"building {tag}", total=1.0)

        def update(message: str, fraction: float) -> None:
            bar.update(task, description=message[:80], completed=fraction)

        info = build_sandbox_image(
            tag, method=method, with_hub_client=with_hub_client, force=force, progress=update
        )
    size = info.size_bytes / (1024 * 1024)
    how = "up to date" if info.cached else f"built in {info.built_seconds:.1f} s"
    console.print(f"{info.tag} ({info.id[7:19]}): {how}, {size:.0f} MiB, Python {info.python_version}")
    return info


def gc_command(backend_names: Sequence[str]) -> int:
    """Sweep the named backends (all available ones when empty), print a table; the exit code.

    What ``rayflow sandbox gc`` runs. A backend named explicitly that cannot be opened is an
    error (exit code 1); when no name is given, unavailable backends are skipped with a note.
    """
    console = Console()
    explicit = bool(backend_names)
    names = list(backend_names) if explicit else list(BACKEND_NAMES)
    backends: list[SandboxBackend] = []
    failed = False
    for name in names:
        try:
            if name == "docker" and not explicit:
                engine = probe_engine()
                if not engine.ok:
                    raise ConfigError(engine.reason)
            backends.append(construct_backend(name))
        except ConfigError as exc:
            if explicit:
                console.print(f"[red]{name}: {exc.message}[/red]")
                failed = True
            else:
                console.print(f"[dim]{name}: skipped ({exc.message})[/dim]")
    try:
        result = sweep(backends, owner_alive_by_pid)
    finally:
        for backend in backends:
            close = getattr(backend, "close", None)
            if callable(close):
                close()
    table = Table(title="removed sandboxes")
    for column in ("backend", "sandbox", "owner", "why"):
        table.add_column(column)
    for item in result.removed:
        table.add_row(item.backend, item.sandbox_id, item.owner or "?", item.why)
    if result.removed:
        console.print(table)
    else:
        console.print("no sandbox of a dead owner found")
    console.print(f"{len(result.removed)} removed, {result.kept} kept (owner alive or not judgeable)")
    for name, message in result.errors:
        console.print(f"[red]{name}: sweep failed: {message}[/red]")
    return 1 if failed or result.errors else 0
