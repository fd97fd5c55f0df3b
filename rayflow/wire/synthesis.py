"""The plain-text report a swarm's synthesis step writes about a finished run.

Why standard library only: in pattern A the synthesis runs on the host, in pattern B inside a
sandbox that has rayflow's source but not its heavy dependencies (rich, numpy, Ray). This module
imports nothing beyond the standard library, :mod:`rayflow.wire.subtasks` and :mod:`rayflow.wire.result_counts`
(themselves standard library only), so both places run the same function and produce the same text.

Why it streams: ``results`` may be a 1000+ subtask log read from disk; the report keeps only
counters and a bounded list of failures, never the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rayflow.wire.result_counts import ResultCounts
from rayflow.wire.subtasks import Pattern, Phase, SubtaskResult

#: Failures listed by name in the report; the rest are counted.
MAX_LISTED_FAILURES = 20
#: Longest error message shown for one failure.
MAX_MESSAGE_CHARS = 100

_PATTERN_NAMES = {Pattern.HYBRID.value: "hybrid", Pattern.FULL_SANDBOX.value: "full sandbox"}


def synthesize_report(
    summary: Mapping[str, Any], results: Iterable[SubtaskResult | Mapping[str, Any]]
) -> str:
    """Write the report of one run: subtasks, passes, attempts, memory hits and time per phase.

    ``summary`` is a results log's summary (:meth:`rayflow.swarm.results_log.ResultsLog.summary`);
    its counters are used for phase times and identity, while subtask counts come from ``results``
    themselves so the report is right even for a summary of an unfinished log. ``results`` may be
    :class:`SubtaskResult` records or their dict form (as they arrive over a sandbox channel).
    """
    counts = ResultCounts()
    failures: list[SubtaskResult] = []
    for item in results:
        result = item if isinstance(item, SubtaskResult) else SubtaskResult.from_dict(item)
        counts.add(result)
        if not result.ok and len(failures) < MAX_LISTED_FAILURES:
            failures.append(result)
    lines: list[str] = []
    lines.extend(_heading(summary))
    lines.extend(_counts(counts, summary))
    lines.extend(_phases(summary))
    lines.extend(_workers(summary))
    lines.extend(_failures(counts.failed, failures))
    return "\n".join(lines).rstrip() + "\n"


def _heading(summary: Mapping[str, Any]) -> list[str]:
    job_id = str(summary.get("job_id") or "swarm job")
    pattern = summary.get("pattern")
    pattern_text = ""
    if pattern:
        value = pattern.value if isinstance(pattern, Pattern) else str(pattern)
        pattern_text = f" (pattern {value}: {_PATTERN_NAMES.get(value, 'unknown')})"
    title = f"Report of {job_id}{pattern_text}"
    return [title, "=" * len(title), ""]


def _counts(tally: ResultCounts, summary: Mapping[str, Any]) -> list[str]:
    n = tally.subtasks
    per = (tally.attempts / n) if n else 0.0
    rows = [
        ("Subtasks", f"{n}"),
        ("Passed", f"{tally.ok}  ({_percent(tally.ok, n)})"),
        ("Failed", f"{tally.failed}"),
        ("Attempts", f"{tally.attempts}  ({per:.2f} per subtask; {tally.retried} needed more than one)"),
        ("Memory hits", f"{tally.memory_hits}  (in {tally.with_memory_hits} subtasks)"),
        ("Dispatches", f"{tally.dispatches}  ({_plural(tally.redispatched, 'subtask')} re-dispatched)"),
        ("Agent time", f"{tally.busy_s:.2f} s summed over subtasks"),
    ]
    wall = summary.get("wall_s")
    if isinstance(wall, (int, float)) and wall > 0:
        rows.append(("Wall time", f"{float(wall):.2f} s from first to last span"))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows] + [""]


def _phases(summary: Mapping[str, Any]) -> list[str]:
    wall = summary.get("phase_wall_s") or {}
    busy = summary.get("phase_busy_s") or {}
    spans = summary.get("phase_spans") or {}
    if not (wall or busy):
        return ["Time per phase: no phase events recorded", ""]
    lines = ["Time per phase      window s    busy s   spans"]
    for phase in Phase:
        name = phase.value
        if name not in wall and name not in busy:
            continue
        lines.append(
            f"  {name:<16}{float(wall.get(name, 0.0)):>10.2f}{float(busy.get(name, 0.0)):>10.2f}"
            f"{int(spans.get(name, 0)):>8}"
        )
    lines.append("  (window: first start to last end of the phase anywhere; busy: summed over actors)")
    return lines + [""]


def _workers(summary: Mapping[str, Any]) -> list[str]:
    workers = summary.get("workers") or {}
    if not workers:
        return []
    counts = sorted(int(w.get("subtasks", 0)) for w in workers.values())
    nodes = summary.get("nodes") or {}
    node_text = f" on {len(nodes)} node(s)" if nodes else ""
    spread = f"min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}"
    return [f"Workers: {len(workers)}{node_text}; subtasks per worker {spread}", ""]


def _failures(failed: int, listed: list[SubtaskResult]) -> list[str]:
    if not failed:
        return ["All subtasks passed."]
    shown = len(listed)
    more = f"; first {shown} listed" if failed > shown else ""
    lines = [f"Failures ({failed}{more})"]
    for result in listed:
        error = result.error or {}
        code = str(error.get("code", "failed"))
        message = " ".join(str(error.get("message", "")).split())[:MAX_MESSAGE_CHARS]
        where = f"worker {result.worker_id}" if result.worker_id else "no worker"
        lines.append(
            f"  #{result.index} {result.subtask_id}: {code}"
            f"{': ' + message if message else ''} ({where}, {_plural(result.attempts, 'attempt')})"
        )
    return lines


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
