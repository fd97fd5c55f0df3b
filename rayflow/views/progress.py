"""Progress of a swarm run (sandboxes provisioned, subtasks done) shown where the person is.

Three displays behind one API, chosen once at start: rich progress bars in a terminal, an HTML
block updated in place in a Jupyter notebook, and, where nobody watches (a pipe, a CI log), nothing
or one log line every N percent when asked. Why the notebook gets its own display: rich's live
bars in a notebook need ipywidgets, which a plain kernel does not have; an updated HTML output works
in every frontend and in a saved notebook.

Why updates are cheap: a 1000-subtask run calls :meth:`RunProgress.subtask_done` 1000 times from
the coordinator's hot path. Each call only bumps counters; the terminal bars redraw on rich's own
timer, the notebook block at most every ``min_interval_s``, the log only when a threshold is crossed.
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rayflow.errors import ConfigError

Mode = Literal["auto", "terminal", "notebook", "log", "silent"]
logger = logging.getLogger("rayflow.views.progress")


@dataclass
class ProgressCounts:
    """What a run has done so far."""

    total_workers: int
    total_subtasks: int
    workers_ready: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0

    @property
    def subtask_percent(self) -> float:
        return 100.0 * self.done / self.total_subtasks if self.total_subtasks else 100.0

    def line(self, title: str) -> str:
        """One line a log or a plain display shows."""
        return (
            f"{title}: sandboxes {self.workers_ready}/{self.total_workers}, subtasks {self.done}/"
            f"{self.total_subtasks} ({self.subtask_percent:.0f}%), ok {self.ok}, failed {self.failed}, "
            f"retried {self.retried}"
        )


class _Display(Protocol):
    def start(self, counts: ProgressCounts) -> None: ...
    def update(self, counts: ProgressCounts) -> None: ...
    def stop(self, counts: ProgressCounts) -> None: ...


class SilentDisplay:
    """Shows nothing: output that nobody watches stays clean."""

    def start(self, counts: ProgressCounts) -> None:
        return None

    def update(self, counts: ProgressCounts) -> None:
        return None

    def stop(self, counts: ProgressCounts) -> None:
        return None


class LogDisplay:
    """One log line each time the subtasks cross another ``every_pct`` percent, and when all sandboxes are up."""

    def __init__(self, title: str, every_pct: float, log: logging.Logger = logger) -> None:
        if not 0 < every_pct <= 100:
            raise ConfigError("log_every_pct is a percentage in (0, 100]", every_pct=every_pct)
        self.title = title
        self.every_pct = every_pct
        self.log = log
        self._next_pct = every_pct
        self._workers_logged = False
        self._last_logged: ProgressCounts | None = None

    def start(self, counts: ProgressCounts) -> None:
        self._emit(counts)

    def update(self, counts: ProgressCounts) -> None:
        if not self._workers_logged and counts.total_workers and counts.workers_ready >= counts.total_workers:
            self._workers_logged = True
            self.log.info("%s: all %d sandboxes ready", self.title, counts.total_workers)
        if counts.done and counts.subtask_percent + 1e-9 >= self._next_pct:
            self._emit(counts)
            while self._next_pct <= counts.subtask_percent + 1e-9:
                self._next_pct += self.every_pct

    def stop(self, counts: ProgressCounts) -> None:
        if counts != self._last_logged:
            self._emit(counts)

    def _emit(self, counts: ProgressCounts) -> None:
        self.log.info("%s", counts.line(self.title))
        self._last_logged = ProgressCounts(**vars(counts))


class TerminalDisplay:
    """Two rich progress bars: sandboxes provisioned and subtasks done (with ok/failed/retried)."""

    def __init__(self, title: str, console: Any = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
        )
        self.title = title
        self._workers = self.progress.add_task("sandboxes", total=None, detail="", start=False)
        self._subtasks = self.progress.add_task("subtasks", total=None, detail="", start=False)

    def start(self, counts: ProgressCounts) -> None:
        self.progress.console.print(f"[bold]{self.title}[/]")
        self.progress.update(self._workers, total=counts.total_workers)
        self.progress.update(self._subtasks, total=counts.total_subtasks)
        self.progress.start_task(self._workers)
        self.progress.start_task(self._subtasks)
        self.progress.start()

    def update(self, counts: ProgressCounts) -> None:
        self.progress.update(self._workers, completed=counts.workers_ready)
        self.progress.update(
            self._subtasks,
            completed=counts.done,
            detail=f"[green]{counts.ok} ok[/] [red]{counts.failed} failed[/] {counts.retried} retried",
        )

    def stop(self, counts: ProgressCounts) -> None:
        self.update(counts)
        self.progress.stop()


class _Block(Protocol):
    def update(self, markup: str) -> None: ...


class NotebookDisplay:
    """An HTML block in the notebook's output, replaced in place at most every ``min_interval_s``."""

    def __init__(
        self,
        title: str,
        min_interval_s: float = 0.25,
        show: Callable[[str], _Block] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title = title
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._show = show or _IPythonBlock
        self._block: _Block | None = None
        self._last = -float("inf")
        #: How many times the block was redrawn (throttling keeps this small).
        self.redraws = 0

    def start(self, counts: ProgressCounts) -> None:
        self._block = self._show(progress_html(counts, self.title))
        self._last = self.clock()
        self.redraws = 1

    def update(self, counts: ProgressCounts) -> None:
        now = self.clock()
        if now - self._last >= self.min_interval_s:
            self._redraw(counts, now)

    def stop(self, counts: ProgressCounts) -> None:
        self._redraw(counts, self.clock())

    def _redraw(self, counts: ProgressCounts, now: float) -> None:
        if self._block is not None:
            self._block.update(progress_html(counts, self.title))
        self._last = now
        self.redraws += 1


def progress_html(counts: ProgressCounts, title: str) -> str:
    """The notebook block: a title, two <progress> bars and the ok/failed/retried counts."""

    def bar(name: str, value: int, total: int) -> str:
        return (
            f"<tr><td style='padding-right:8px'>{name}</td>"
            f"<td><progress value='{value}' max='{max(total, 1)}' style='width:320px'></progress></td>"
            f"<td style='padding-left:8px'>{value}/{total}</td></tr>"
        )

    return (
        f"<div><b>{html.escape(title)}</b><table>"
        f"{bar('sandboxes', counts.workers_ready, counts.total_workers)}"
        f"{bar('subtasks', counts.done, counts.total_subtasks)}</table>"
        f"<span style='color:#007a3d'>{counts.ok} ok</span> · "
        f"<span style='color:#b00020'>{counts.failed} failed</span> · {counts.retried} retried</div>"
    )


class RunProgress:
    """Progress of one swarm run: ``worker_ready()``, ``subtask_done(ok)``, ``subtask_retried()``.

    ``mode="auto"`` picks the notebook display inside a Jupyter kernel, bars on a terminal, and
    otherwise stays silent, unless ``log_every_pct`` asks for log lines. Use as a context manager.
    """

    def __init__(
        self,
        total_workers: int,
        total_subtasks: int,
        title: str = "swarm run",
        *,
        mode: Mode = "auto",
        log_every_pct: float | None = None,
        console: Any = None,
    ) -> None:
        if total_workers < 0 or total_subtasks < 0:
            raise ConfigError("progress totals cannot be negative")
        self.counts = ProgressCounts(total_workers, total_subtasks)
        self.title = title
        self.mode = resolve_mode(mode, console, log_every_pct)
        self.display: _Display = _make_display(self.mode, title, console, log_every_pct)
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> RunProgress:
        with self._lock:
            if not self._running:
                self._running = True
                self.display.start(self.counts)
        return self

    def worker_ready(self) -> None:
        """A worker's sandbox is provisioned and it can take subtasks."""
        with self._lock:
            self.counts.workers_ready += 1
            self._update()

    def subtask_done(self, ok: bool = True) -> None:
        """A subtask finished for good (passed, or failed with no retry left)."""
        with self._lock:
            self.counts.done += 1
            if ok:
                self.counts.ok += 1
            else:
                self.counts.failed += 1
            self._update()

    def subtask_retried(self) -> None:
        """A subtask is being dispatched again after its worker or sandbox failed."""
        with self._lock:
            self.counts.retried += 1
            self._update()

    def _update(self) -> None:
        if self._running:
            self.display.update(self.counts)

    def stop(self) -> None:
        with self._lock:
            if self._running:
                self._running = False
                self.display.stop(self.counts)

    def __enter__(self) -> RunProgress:  # noqa: PYI034 - not meant to be subclassed
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_mode(mode: Mode, console: Any = None, log_every_pct: float | None = None) -> Mode:
    """The display ``auto`` stands for here: notebook, terminal, log (when asked) or silent."""
    if mode not in ("auto", "terminal", "notebook", "log", "silent"):
        raise ConfigError(f"unknown progress mode {mode!r}")
    if mode != "auto":
        return mode
    if in_notebook():
        return "notebook"
    if console is not None:
        is_terminal = bool(console.is_terminal)
    else:
        is_terminal = sys.stderr.isatty() or sys.stdout.isatty()
    if is_terminal:
        return "terminal"
    return "log" if log_every_pct else "silent"


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is only looked at if something already imported it)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _make_display(mode: Mode, title: str, console: Any, log_every_pct: float | None) -> _Display:
    if mode == "terminal":
        return TerminalDisplay(title, console)
    if mode == "notebook":
        return NotebookDisplay(title)
    if mode == "log":
        return LogDisplay(title, log_every_pct or 10.0)
    return SilentDisplay()


class _IPythonBlock:
    """An HTML output of the running notebook cell that can be replaced in place."""

    def __init__(self, markup: str) -> None:
        from IPython.display import HTML, display

        self._html = HTML
        self._handle = display(HTML(markup), display_id=True)

    def update(self, markup: str) -> None:
        self._handle.update(self._html(markup))
