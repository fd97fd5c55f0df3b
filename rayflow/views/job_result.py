"""What ``swarm.run(job)`` returns: a job's results, summary, report and timeline, with views.

A :class:`JobResult` reads its results either from a list (small jobs, a JSON round trip) or
straight from the run's :class:`~rayflow.swarm.results_log.ResultsLog`, so a 1000+ subtask job is
never held in memory just to be shown. Every view is bounded: the table shows the first and last
subtasks and the failures, never every row of a big job.

Every view leads with the same lines as the report (:func:`~rayflow.wire.synthesis.health_lines`):
where the work ran (workers, nodes, regions), how many workers were asked for and started, and how
the agents' memory calls went; a degraded run's lines are red and marked, never left out.
"""

from __future__ import annotations

import html
import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from rayflow.errors import InvalidInputError
from rayflow.swarm.results_log import ResultsLog
from rayflow.views.timeline import Timeline
from rayflow.wire.subtasks import Pattern, PhaseEvent, SubtaskResult
from rayflow.wire.synthesis import MAX_LISTED_WORKERS, health_lines, natural_key, ran_on, synthesize_report

__all__ = ["JobResult", "RowSelection", "select_rows", "synthesize_report"]

COLUMNS = (
    "#", "id", "ok", "attempts", "memory hits", "memory errors", "dispatches", "worker", "node", "region",
    "duration s",
)
WORKER_COLUMNS = ("worker", "node", "region", "subtasks", "ok", "failed")
JSON_FORMAT = "rayflow.job_result/1"
#: What marks a warning line in the views (the plain-text report writes ``WARNING:``).
WARNING_SIGN = "⚠"


@dataclass
class RowSelection:
    """The rows a bounded table shows, chosen in one pass over a job's results."""

    head: list[SubtaskResult] = field(default_factory=list)
    #: Failures between head and tail (at most the table's budget; ``hidden_failures`` counts the rest).
    failures: list[SubtaskResult] = field(default_factory=list)
    tail: list[SubtaskResult] = field(default_factory=list)
    #: Rows left out (neither head, failure nor tail).
    hidden: int = 0
    hidden_failures: int = 0
    total: int = 0
    ok: int = 0
    attempts: int = 0
    memory_hits: int = 0
    #: Subtasks with at least one failed memory call.
    memory_errors: int = 0
    dispatches: int = 0
    duration_s: float = 0.0
    workers: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    regions: set[str] = field(default_factory=set)

    @property
    def shown(self) -> int:
        return len(self.head) + len(self.failures) + len(self.tail)


def select_rows(results: Iterable[SubtaskResult], max_rows: int = 50) -> RowSelection:
    """Pick at most ``max_rows`` results to show (all of them if they fit) and total every column.

    A big job shows its first quarter of the budget, its last quarter, and failures in between
    for the rest, because those are the rows a person looks for. One pass, bounded memory.
    """
    if max_rows < 4:
        raise InvalidInputError("a table shows at least 4 rows", max_rows=max_rows)
    head_n = tail_n = max_rows // 4
    failure_budget = max_rows - head_n - tail_n
    selection = RowSelection()
    first: list[SubtaskResult] = []
    window: deque[SubtaskResult] = deque(maxlen=tail_n)
    for result in results:
        _count(selection, result)
        if len(first) < max_rows:
            first.append(result)
        if selection.total <= head_n:
            continue
        # What leaves the tail window lies between head and tail: keep it if it is a failure.
        if len(window) == tail_n:
            leaving = window[0]
            if not leaving.ok and len(selection.failures) < failure_budget:
                selection.failures.append(leaving)
        window.append(result)
    if selection.total <= max_rows:
        selection.head, selection.failures = first, []
        return selection
    selection.head = first[:head_n]
    selection.tail = list(window)
    shown_failures = sum(not r.ok for r in (*selection.head, *selection.failures, *selection.tail))
    selection.hidden_failures = (selection.total - selection.ok) - shown_failures
    selection.hidden = selection.total - selection.shown
    return selection


def _count(selection: RowSelection, result: SubtaskResult) -> None:
    selection.total += 1
    selection.ok += result.ok
    selection.attempts += result.attempts
    selection.memory_hits += result.memory_hits
    use = result.memory
    selection.memory_errors += int(use is not None and use.errors > 0)
    selection.dispatches += result.dispatches
    selection.duration_s += result.duration_s
    if result.worker_id:
        selection.workers.add(result.worker_id)
    if result.node_id:
        selection.nodes.add(result.node_id)
    if result.region:
        selection.regions.add(result.region)


def _cells(result: SubtaskResult) -> list[str]:
    code = str((result.error or {}).get("code", "failed"))
    use = result.memory
    return [
        str(result.index),
        result.subtask_id,
        "yes" if result.ok else f"no: {code}",
        str(result.attempts),
        str(result.memory_hits),
        "-" if use is None else str(use.errors),
        str(result.dispatches),
        result.worker_id or "-",
        result.node_id or "-",
        result.region or "-",
        f"{result.duration_s:.2f}",
    ]


#: Where the memory-errors cell is in a row (it turns red when not zero).
_MEMORY_ERRORS_CELL = COLUMNS.index("memory errors")


def _total_cells(selection: RowSelection) -> list[str]:
    return [
        "total",
        f"{selection.total} subtasks",
        f"{selection.ok}/{selection.total}",
        str(selection.attempts),
        str(selection.memory_hits),
        f"{selection.memory_errors} subtasks",
        str(selection.dispatches),
        f"{len(selection.workers)} workers",
        f"{len(selection.nodes)} nodes",
        f"{len(selection.regions)} regions",
        f"{selection.duration_s:.2f}",
    ]


def _caption(selection: RowSelection) -> str | None:
    """What a bounded table left out, so nobody mistakes it for the whole job."""
    if not selection.hidden:
        return None
    parts = [f"first {len(selection.head)}"]
    if selection.failures:
        parts.append(f"{len(selection.failures)} failures between")
    parts.append(f"last {len(selection.tail)}")
    text = f"showing {selection.shown} of {selection.total} subtasks ({', '.join(parts)})"
    if selection.hidden_failures:
        text += f"; {selection.hidden_failures} more failures not shown (JobResult.failed() lists all)"
    return text


class JobResult:
    """A finished (or crashed and reopened) swarm job: its results, summary, report and events."""

    def __init__(
        self,
        job_id: str,
        pattern: Pattern | str,
        summary: Mapping[str, Any],
        report: str = "",
        results: ResultsLog | Iterable[SubtaskResult] = (),
        events: Iterable[PhaseEvent] | None = None,
    ) -> None:
        self.job_id = job_id
        self.pattern = Pattern(pattern)
        self.summary: dict[str, Any] = dict(summary)
        self.report = report
        self._log: ResultsLog | None = None
        self._results: list[SubtaskResult] = []
        if isinstance(results, ResultsLog):
            self._log = results
        else:
            self._results = sorted(results, key=lambda r: r.index)
        self._events: list[PhaseEvent] | None = list(events) if events is not None else None

    @classmethod
    def from_log(cls, log: ResultsLog, report: str = "") -> JobResult:
        """The result of the run recorded in ``log`` (its meta gives job id and pattern)."""
        meta = log.meta
        return cls(
            str(meta.get("job_id", log.path.stem)),
            meta.get("pattern", Pattern.HYBRID.value),
            log.summary(),
            report,
            log,
        )

    # --- access -------------------------------------------------------------------------------
    def results(self) -> Iterator[SubtaskResult]:
        """Every subtask's result in index order (streamed from disk for a logged job)."""
        return iter(self._log) if self._log is not None else iter(self._results)

    def __len__(self) -> int:
        return len(self._log) if self._log is not None else len(self._results)

    def failed(self) -> list[SubtaskResult]:
        """The failed subtasks' results in index order."""
        if self._log is not None:
            return list(self._log.failed())
        return [r for r in self._results if not r.ok]

    @property
    def ok(self) -> bool:
        """True when every subtask passed."""
        return not self.failed()

    @property
    def events(self) -> list[PhaseEvent]:
        if self._events is None:
            self._events = list(self._log.events()) if self._log is not None else []
        return self._events

    def timeline(self) -> Timeline:
        return Timeline(self.events, title=self.job_id)

    # --- views --------------------------------------------------------------------------------
    def table(self, max_rows: int = 50) -> Table:
        """One row per subtask (bounded to about ``max_rows``) and a totals line."""
        selection = select_rows(self.results(), max_rows)
        table = Table(
            title=f"{self.job_id}: {selection.ok}/{selection.total} subtasks passed",
            caption=_caption(selection),
        )
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("id", "ok", "worker", "node", "region") else "right")
        gap = [Text("⋮", style="dim")] * len(COLUMNS)
        for result in selection.head:
            self._add_row(table, result)
        if selection.failures:
            table.add_row(*gap)
            for result in selection.failures:
                self._add_row(table, result)
        if selection.tail:
            table.add_row(*gap)
            for result in selection.tail:
                self._add_row(table, result)
        table.add_section()
        table.add_row(*_total_cells(selection), style="bold")
        return table

    @staticmethod
    def _add_row(table: Table, result: SubtaskResult) -> None:
        cells: list[RenderableType] = list(_cells(result))
        cells[2] = Text(str(cells[2]), style="green" if result.ok else "bold red")
        if cells[_MEMORY_ERRORS_CELL] not in ("-", "0"):
            cells[_MEMORY_ERRORS_CELL] = Text(str(cells[_MEMORY_ERRORS_CELL]), style="bold red")
        table.add_row(*cells)

    def workers(self) -> list[dict[str, Any]]:
        """Every worker that ran subtasks: ``worker``, ``node``, ``region``, ``subtasks``, ``ok``,
        ``failed``, in worker order (from the summary: no result is read)."""
        workers = ran_on(self.summary.get("workers"))
        return [
            {
                "worker": worker_id,
                "node": str(info.get("node") or "-"),
                "region": str(info.get("region") or "-"),
                "subtasks": int(info.get("subtasks", 0)),
                "ok": int(info.get("ok", 0)),
                "failed": int(info.get("failed", 0)),
            }
            for worker_id, info in sorted(workers.items(), key=lambda item: natural_key(item[0]))
        ]

    def workers_table(self, max_rows: int = MAX_LISTED_WORKERS) -> Table:
        """Where the work ran: one row per worker (the first ``max_rows``) with its node and region."""
        workers = self.workers()
        hidden = len(workers) - max_rows
        table = Table(
            title=f"{self.job_id}: where the work ran",
            caption=f"showing {max_rows} of {len(workers)} workers" if hidden > 0 else None,
        )
        for column in WORKER_COLUMNS:
            table.add_column(column, justify="left" if column in ("worker", "node", "region") else "right")
        for worker in workers[:max_rows]:
            table.add_row(*(str(worker[column]) for column in WORKER_COLUMNS))
        return table

    def health(self) -> list[tuple[str, bool]]:
        """The lines the report leads with, as ``(text, is_warning)``: workers, nodes and regions;
        workers asked, started and failed to start (where and why); memory health."""
        return health_lines(self.summary)

    @property
    def warnings(self) -> list[str]:
        """The health lines that say the run was degraded (empty for a clean run)."""
        return [text for text, warning in self.health() if warning]

    def __rich__(self) -> RenderableType:
        lines: list[RenderableType] = [Text(self._headline(), style="bold")]
        for text, warning in self.health():
            lines.append(Text(f"{WARNING_SIGN} {text}", style="bold red") if warning else Text(text))
        parts: list[RenderableType] = [*lines, self.table()]
        if self.workers():
            parts.append(self.workers_table())
        return Group(*parts)

    def _headline(self) -> str:
        s = self.summary
        return (
            f"{self.job_id} (pattern {self.pattern.value}): {s.get('ok', 0)}/{s.get('subtasks', len(self))} passed, "
            f"{s.get('attempts', 0)} attempts, {s.get('memory_hits', 0)} memory hits, "
            f"wall {float(s.get('wall_s', 0.0)):.2f} s"
        )

    def headline(self) -> str:
        """The headline and the health lines, as plain text (warnings marked)."""
        lines = [self._headline()]
        lines += [f"{WARNING_SIGN} {text}" if warning else text for text, warning in self.health()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter's view: the headline, the summary's numbers, the bounded table and the report."""
        selection = select_rows(self.results(), 50)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body: list[str] = [self._html_row(r) for r in selection.head]
        span = len(COLUMNS)
        if selection.failures:
            body.append(f'<tr><td colspan="{span}"><i>⋮ failures among the rows not shown:</i></td></tr>')
            body.extend(self._html_row(r) for r in selection.failures)
        if selection.tail:
            body.append(f'<tr><td colspan="{span}"><i>⋮</i></td></tr>')
            body.extend(self._html_row(r) for r in selection.tail)
        totals = "".join(f"<td><b>{html.escape(c)}</b></td>" for c in _total_cells(selection))
        numbers = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>"
            f"{html.escape(_short(v))}</td></tr>"
            for k, v in self.summary.items()
        )
        caption = _caption(selection)
        caption_html = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        report = f"<pre>{html.escape(self.report)}</pre>" if self.report else ""
        health = "".join(
            f"<p style='color:#b00020'><b>{WARNING_SIGN} {html.escape(text)}</b></p>" if warning
            else f"<p>{html.escape(text)}</p>"
            for text, warning in self.health()
        )
        return (
            f"<div><p><b>{html.escape(self._headline())}</b></p>{health}"
            f"<details><summary>summary</summary><table>{numbers}</table></details>"
            f"<table>{caption_html}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"<tfoot><tr>{totals}</tr></tfoot></table>{self._workers_html()}{report}</div>"
        )

    def _workers_html(self, max_rows: int = MAX_LISTED_WORKERS) -> str:
        workers = self.workers()
        if not workers:
            return ""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in WORKER_COLUMNS)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(w[c]))}</td>" for c in WORKER_COLUMNS) + "</tr>"
            for w in workers[:max_rows]
        )
        more = f" (showing {max_rows} of {len(workers)})" if len(workers) > max_rows else ""
        return (
            f"<details><summary>where the work ran: {len(workers)} workers{more}</summary>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></details>"
        )

    @staticmethod
    def _html_row(result: SubtaskResult) -> str:
        color = "" if result.ok else ' style="color:#b00020"'
        cells = [html.escape(c) for c in _cells(result)]
        if cells[_MEMORY_ERRORS_CELL] not in ("-", "0"):
            cells[_MEMORY_ERRORS_CELL] = f"<b style='color:#b00020'>{cells[_MEMORY_ERRORS_CELL]}</b>"
        return f"<tr{color}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    # --- JSON ---------------------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        """Everything, results and events included, as one JSON document."""
        return json.dumps(
            {
                "format": JSON_FORMAT,
                "job_id": self.job_id,
                "pattern": self.pattern.value,
                "summary": self.summary,
                "report": self.report,
                "results": [r.to_dict() for r in self.results()],
                "events": [e.to_dict() for e in self.events],
            },
            indent=indent,
            default=repr,
        )

    @classmethod
    def from_json(cls, text: str) -> JobResult:
        try:
            data = json.loads(text)
            if data.get("format") != JSON_FORMAT:
                raise InvalidInputError("not a rayflow job result", format=data.get("format"))
            return cls(
                data["job_id"],
                data["pattern"],
                data["summary"],
                data.get("report", ""),
                [SubtaskResult.from_dict(r) for r in data["results"]],
                [PhaseEvent.from_dict(e) for e in data.get("events", [])],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"not a readable job result: {exc}") from exc

    def __repr__(self) -> str:
        return f"JobResult(job_id={self.job_id!r}, pattern={self.pattern.value!r}, subtasks={len(self)})"


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 1] + "…"
