"""Progress of a swarm run (sandboxes provisioned, subtasks done) shown where the person is.

Three displays behind one API, chosen once at start: rich progress bars in a terminal, an HTML
block updated in place in a Jupyter notebook, and, where nobody watches (a pipe, a CI log), nothing
or one log line every N percent when asked. Why the notebook gets its own display: rich's live
bars in a notebook need ipywidgets, which a plain kernel does not have; an updated HTML output works
in every frontend and in a saved notebook.

Why updates are cheap: a 1000-subtask run calls :meth:`RunProgress.subtask_done` 1000 times from
the coordinator's hot path. Each call only bumps counters; the terminal bars redraw on rich's own
timer, the notebook block at most every ``min_interval_s``, the log only when a threshold is crossed.

Why warnings: a run that goes on degraded (workers that fail to start, agents whose memory calls
fail) must say so while it runs, not only in its report. :meth:`RunProgress.observe` reads them
from the coordinator's progress counters and each display shows them: a red line above the bars,
a red block under the notebook's bars, a logged warning (even where the display is silent).
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rayflow.errors import ConfigError
from rayflow.wire.synthesis import start_causes

Mode = Literal["auto", "terminal", "notebook", "log", "silent"]
logger = logging.getLogger("rayflow.views.progress")
_WARNING_SIGN = "⚠"


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


def progress_warnings(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, text)`` warnings in a coordinator's progress counters (:class:`~rayflow.swarm.dispatch_loop.RunStats`
    as a dict; fields it lacks, from an older coordinator, warn of nothing): workers that failed to
    start, where and why, and subtasks whose memory calls failed."""
    warnings: list[tuple[str, str]] = []
    failed = int(stats.get("launch_failures") or 0)
    if failed:
        asked, started = int(stats.get("workers_asked") or 0), int(stats.get("workers_ready") or 0)
        of = f" ({started} of {asked} asked started)" if asked else ""
        warnings.append(("start", f"{failed} worker start(s) failed{of}: {start_causes(stats)}"))
    errors = int(stats.get("memory_errors") or 0)
    if errors:
        used, reached = int(stats.get("memory_used") or 0), int(stats.get("memory_reached") or 0)
        last = str(stats.get("memory_last_error") or "")[:160]
        text = f"memory errors in {errors} of {used} subtasks that used memory so far ({reached} reached the hub)"
        warnings.append(("memory", f"{text}; last: {last}" if last else text))
    return warnings


class _Display(Protocol):
    def start(self, counts: ProgressCounts) -> None: ...
    def update(self, counts: ProgressCounts) -> None: ...
    def warn(self, key: str, text: str, new: bool) -> None: ...
    def stop(self, counts: ProgressCounts) -> None: ...


class SilentDisplay:
    """Shows nothing: output that nobody watches stays clean. A warning is still logged (once per
    kind), because a degraded run must never be silent."""

    def __init__(self, log: logging.Logger = logger) -> None:
        self.log = log

    def start(self, counts: ProgressCounts) -> None:
        return None

    def update(self, counts: ProgressCounts) -> None:
        return None

    def warn(self, key: str, text: str, new: bool) -> None:
        if new:
            self.log.warning("%s", text)

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
        self._warnings: dict[str, str] = {}

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

    def warn(self, key: str, text: str, new: bool) -> None:
        """The first warning of each kind is logged at once, the final one when the run stops."""
        if new:
            self.log.warning("%s: %s", self.title, text)
        self._warnings[key] = text

    def stop(self, counts: ProgressCounts) -> None:
        if counts != self._last_logged:
            self._emit(counts)
        for text in self._warnings.values():
            self.log.warning("%s: %s", self.title, text)
        self._warnings.clear()

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
        #: Warnings by kind; ``True`` once the latest text of that kind was printed.
        self._warnings: dict[str, tuple[str, bool]] = {}

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

    def warn(self, key: str, text: str, new: bool) -> None:
        """A red line above the bars for the first warning of each kind; the final one at the end."""
        if new:
            self._print_warning(text)
        self._warnings[key] = (text, new)

    def _print_warning(self, text: str) -> None:
        from rich.text import Text

        self.progress.console.print(Text(f"{_WARNING_SIGN} {text}", style="bold red"))

    def stop(self, counts: ProgressCounts) -> None:
        self.update(counts)
        self.progress.stop()
        for text, printed in self._warnings.values():
            if not printed:
                self._print_warning(text)


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
        self._warnings: dict[str, str] = {}
        self._counts: ProgressCounts | None = None

    def start(self, counts: ProgressCounts) -> None:
        self._counts = counts
        self._block = self._show(progress_html(counts, self.title, list(self._warnings.values())))
        self._last = self.clock()
        self.redraws = 1

    def warn(self, key: str, text: str, new: bool) -> None:
        """Shown under the bars in red; a new kind of warning redraws at once."""
        self._warnings[key] = text
        if new and self._counts is not None:
            self._redraw(self._counts, self.clock())

    def update(self, counts: ProgressCounts) -> None:
        now = self.clock()
        if now - self._last >= self.min_interval_s:
            self._redraw(counts, now)

    def stop(self, counts: ProgressCounts) -> None:
        self._redraw(counts, self.clock())

    def _redraw(self, counts: ProgressCounts, now: float) -> None:
        self._counts = counts
        if self._block is not None:
            self._block.update(progress_html(counts, self.title, list(self._warnings.values())))
        self._last = now
        self.redraws += 1


def progress_html(counts: ProgressCounts, title: str, warnings: list[str] | None = None) -> str:
    """The notebook block: a title, two <progress> bars, the ok/failed/retried counts and warnings."""

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
        f"<span style='color:#b00020'>{counts.failed} failed</span> · {counts.retried} retried"
        + "".join(
            f"<div style='color:#b00020'><b>{_WARNING_SIGN} {html.escape(text)}</b></div>" for text in warnings or ()
        )
        + "</div>"
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
        #: The warnings shown, by kind (``"start"``, ``"memory"``), latest text.
        self.warnings: dict[str, str] = {}

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

    def warn(self, key: str, text: str) -> None:
        """Show a warning of kind ``key`` (one line per kind, replaced by later texts of that kind)."""
        with self._lock:
            if self.warnings.get(key) == text:
                return
            new = key not in self.warnings
            self.warnings[key] = text
            self.display.warn(key, text, new)

    def observe(self, stats: Mapping[str, Any]) -> None:
        """Show the warnings in a coordinator's progress counters (see :func:`progress_warnings`)."""
        for key, text in progress_warnings(stats):
            self.warn(key, text)

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
