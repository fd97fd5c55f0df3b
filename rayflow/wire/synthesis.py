"""The plain-text report a swarm's synthesis step writes about a finished run.

Why standard library only: in pattern A the synthesis runs on the host, in pattern B inside a
sandbox that has rayflow's source but not its heavy dependencies (rich, numpy, Ray). This module
imports nothing beyond the standard library, :mod:`rayflow.wire.subtasks` and :mod:`rayflow.wire.result_counts`
(themselves standard library only), so both places run the same function and produce the same text.

Why it streams: ``results`` may be a 1000+ subtask log read from disk; the report keeps only
counters, one entry per worker and bounded lists of failures, never the whole run.

Why it leads with warnings: a run that passed while its agents could not reach the memory, or with
fewer workers than asked for, must not read as a clean pass. :func:`health_lines` (shared with the
job result's views) says where the work ran and whether it was degraded, before any number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from rayflow.wire.result_counts import ResultCounts
from rayflow.wire.subtasks import Pattern, Phase, SubtaskResult

#: Failures listed by name in the report; the rest are counted.
MAX_LISTED_FAILURES = 20
#: Workers listed by name (with node and region) in the report; the rest are counted.
MAX_LISTED_WORKERS = 20
#: Failed worker starts listed with their cause; the rest are counted by cause.
MAX_LISTED_START_FAILURES = 10
#: Longest error message shown for one failure.
MAX_MESSAGE_CHARS = 100
#: What marks a line of the report that says the run was degraded (never silent).
WARNING_MARK = "WARNING: "

_PATTERN_NAMES = {Pattern.HYBRID.value: "hybrid", Pattern.FULL_SANDBOX.value: "full sandbox"}
#: How a report names the usual causes of a failed worker start.
_START_CAUSES = {
    "hub_unreachable": "the hub could not be reached",
    "start_timeout": "did not start in time",
    "sandbox_failed": "sandbox failed",
    "worker_lost": "worker died",
    "config_error": "configuration error",
}


def synthesize_report(
    summary: Mapping[str, Any], results: Iterable[SubtaskResult | Mapping[str, Any]]
) -> str:
    """Write the report of one run: where it ran, its health, subtasks, passes, attempts, memory and
    time per phase.

    ``summary`` is a results log's summary (:meth:`rayflow.swarm.results_log.ResultsLog.summary`);
    its counters are used for phase times, identity and the coordinator's start counts (its
    ``coordinator`` entry), while subtask, memory and worker counts come from ``results``
    themselves so the report is right even for a summary of an unfinished log. ``results`` may be
    :class:`SubtaskResult` records or their dict form (as they arrive over a sandbox channel).
    The lines :func:`health_lines` gives lead the report; a degraded run's are marked
    :data:`WARNING_MARK`.
    """
    counts = ResultCounts()
    failures: list[SubtaskResult] = []
    workers: dict[str, dict[str, Any]] = {}
    for item in results:
        result = item if isinstance(item, SubtaskResult) else SubtaskResult.from_dict(item)
        counts.add(result)
        _count_worker(workers, result)
        if not result.ok and len(failures) < MAX_LISTED_FAILURES:
            failures.append(result)
    seen = {
        **summary,
        **counts.memory_summary(),
        "subtasks": counts.subtasks,
        "ok": counts.ok,
        "memory_hits": counts.memory_hits,
        "workers": workers,
    }
    health = health_lines(seen)
    lines: list[str] = []
    lines.extend(_heading(summary))
    lines.extend(f"{WARNING_MARK if warning else ''}{text}" for text, warning in health)
    lines.append("")
    lines.extend(_counts(counts, summary))
    lines.extend(_phases(summary))
    lines.extend(_workers(workers))
    lines.extend(_start_failures(summary.get("coordinator")))
    lines.extend(_memory_errors(counts))
    lines.extend(_failures(counts.failed, failures, any(warning for _, warning in health)))
    return "\n".join(lines).rstrip() + "\n"


def _count_worker(workers: dict[str, dict[str, Any]], result: SubtaskResult) -> None:
    if not result.worker_id:
        return  # never ran (no worker could be started): no worker to count it for
    worker = workers.setdefault(result.worker_id, {"subtasks": 0, "ok": 0, "failed": 0})
    worker["subtasks"] += 1
    worker["ok" if result.ok else "failed"] += 1
    worker["node"], worker["region"] = result.node_id, result.region


# --- the lines a report and a job result lead with ----------------------------------------------
def health_lines(summary: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Where the work ran and whether the run was degraded, as ``(text, is_warning)`` lines.

    ``summary`` is a run's summary (:class:`~rayflow.swarm.results_log.RunSummary`'s dict, with
    the coordinator's counters under ``coordinator`` once the run ended): its ``workers`` (each
    with ``subtasks``, ``node``, ``region``), the sandbox image check under ``images``, the memory
    counters of :meth:`~rayflow.wire.result_counts.ResultCounts.memory_summary` and ``memory_hits``. Keys
    missing from an older summary leave their line out. Lines, in order:

    * ``Workers: W on N node(s) in R region(s)``: the workers that ran subtasks;
    * the sandbox image (its ``images`` entry, :func:`image_line`): what making it present on every
      node took (current, built, loaded, shared, with times and bytes moved), or that an earlier
      job's check covered the same nodes;
    * workers asked, started and failed to start (where and why): a warning when any failed;
    * subtasks given up unrun because no worker could start: a warning;
    * memory: how many subtasks that used memory reached the hub, the hits, and the errors by kind
      (a warning when any memory call failed; a plain line when memory was on and no agent used it).
    """
    lines: list[tuple[str, bool]] = []
    workers = ran_on(summary.get("workers"))
    if workers or int(summary.get("subtasks") or 0):
        lines.append((workers_line(workers), False))
    image = image_line(summary.get("images"))
    if image is not None:
        lines.append((image, False))
    stats = summary.get("coordinator")
    abandoned = 0
    if isinstance(stats, Mapping):
        line = _starts_line(stats)
        if line is not None:
            lines.append(line)
        abandoned = int(stats.get("abandoned") or 0)
        if abandoned:
            lines.append((f"{_plural(abandoned, 'subtask')} not run: no worker could be started", True))
    line = _memory_line(summary, abandoned)
    if line is not None:
        lines.append(line)
    return lines


def ran_on(workers: Any) -> dict[str, Mapping[str, Any]]:
    """The workers of a summary that ran subtasks (a summary counts results no worker ran under ``-``)."""
    if not isinstance(workers, Mapping):
        return {}
    return {str(k): v for k, v in workers.items() if k not in ("", "-") and isinstance(v, Mapping)}


def workers_line(workers: Mapping[str, Mapping[str, Any]]) -> str:
    """``Workers: W on N node(s) in R region(s)`` (an unnamed node or region counts as one)."""
    nodes = {str(w.get("node") or "-") for w in workers.values()}
    regions = {str(w.get("region") or "-") for w in workers.values()}
    return f"Workers: {len(workers)} on {len(nodes)} node(s) in {len(regions)} region(s)"


def image_line(check: Any) -> str | None:
    """``Sandbox image T: ...``: how the image was made present on every node before the run.

    ``check`` is a summary's ``images`` entry (:func:`rayflow.sandbox.image_transfer.image_check_summary`):
    ``image``, ``seconds``, ``checked_at``, ``earlier`` and one record per node (``node_id``,
    ``engine_id``, ``action``: current / built / loaded / shared, ``seconds``, ``bytes_moved``).
    ``None`` when there is none (no check applied, or an older summary).
    """
    if not isinstance(check, Mapping) or not isinstance(check.get("nodes"), list):
        return None
    nodes = [node for node in check["nodes"] if isinstance(node, Mapping)]
    parts = _image_parts(nodes) or ["no node checked"]
    tag = str(check.get("image") or "?")
    seconds = float(check.get("seconds") or 0.0)
    if check.get("earlier"):
        when = _utc(check.get("checked_at"))
        return (f"Sandbox image {tag}: checked for an earlier job on the same nodes{when} "
                f"({', '.join(parts)}, in {seconds:.1f} s)")
    return f"Sandbox image {tag}: {', '.join(parts)}, checked in {seconds:.1f} s"


def _image_parts(nodes: list[Mapping[str, Any]]) -> list[str]:
    by_action: dict[str, list[Mapping[str, Any]]] = {}
    for node in nodes:
        by_action.setdefault(str(node.get("action") or "?"), []).append(node)
    parts = []
    for node in by_action.pop("built", []):
        parts.append(f"built on node {_short(node.get('node_id'))} in {float(node.get('seconds') or 0.0):.1f} s")
    current = by_action.pop("current", [])
    if current:
        engines = {str(n.get("engine_id") or n.get("node_id")) for n in current}
        parts.append(f"current on {len(current)} node(s) ({_plural(len(engines), 'engine')})")
    loaded = by_action.pop("loaded", [])
    if loaded:
        slowest = max(float(n.get("seconds") or 0.0) for n in loaded)
        megabytes = sum(int(n.get("bytes_moved") or 0) for n in loaded) / 1e6
        parts.append(f"loaded on {len(loaded)} node(s) in {slowest:.1f} s ({megabytes:.0f} MB)")
    shared = by_action.pop("shared", [])
    if shared:
        parts.append(f"shared by {len(shared)} more node(s) on the same engine(s)")
    parts.extend(f"{action} on {len(rest)} node(s)" for action, rest in sorted(by_action.items()))
    return parts


def _short(node_id: Any) -> str:
    text = str(node_id or "-")
    return text if len(text) <= 8 else text[:8]


def _utc(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or epoch <= 0:
        return ""
    return " at " + datetime.fromtimestamp(float(epoch), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _starts_line(stats: Mapping[str, Any]) -> tuple[str, bool] | None:
    asked = int(stats.get("workers_asked") or 0)
    started = int(stats.get("workers_ready") or 0)
    failed = int(stats.get("launch_failures") or 0)
    if not (asked or started or failed):
        return None
    text = f"Workers asked {asked}, started {started}, failed to start {failed}"
    if not failed:
        return text, False
    return f"{text} ({start_causes(stats)})", True


def start_causes(stats: Mapping[str, Any]) -> str:
    """Why and where workers failed to start, most common cause first: ``"the hub could not be
    reached x3 (node n1, region eu)"``."""
    codes = stats.get("start_failure_codes") or {}
    listed = [f for f in stats.get("start_failures") or [] if isinstance(f, Mapping)]
    if not isinstance(codes, Mapping) or not codes:
        codes = {}
        for failure in listed:
            code = str(failure.get("code", "failed"))
            codes[code] = codes.get(code, 0) + 1
    parts = []
    for code, count in sorted(codes.items(), key=lambda item: (-int(item[1]), str(item[0]))):
        where = sorted({_where(f) for f in listed if f.get("code") == code})
        place = f" ({'; '.join(where[:3])}{'; ...' if len(where) > 3 else ''})" if where else ""
        parts.append(f"{_START_CAUSES.get(str(code), str(code))} x{count}{place}")
    return ", ".join(parts) if parts else "causes not recorded"


def _where(failure: Mapping[str, Any]) -> str:
    node = str(failure.get("node") or "")
    region = str(failure.get("region") or "")
    place = f"node {node}" if node else "no node id"
    return f"{place}, region {region}" if region else place


def _memory_line(summary: Mapping[str, Any], abandoned: int = 0) -> tuple[str, bool] | None:
    used = summary.get("subtasks_using_memory")
    if not isinstance(used, int):
        return None
    reached = int(summary.get("subtasks_reaching_hub") or 0)
    errors = int(summary.get("subtasks_with_memory_errors") or 0)
    hits = int(summary.get("memory_hits") or 0)
    ran = int(summary.get("subtasks") or 0) - abandoned
    if not used:
        if summary.get("memory") is True and ran > 0:
            return f"Memory: on, but none of the {_plural(ran, 'subtask')} run made a memory call", False
        return None
    if not errors:
        return f"Memory: {reached} of {used} subtasks that used it reached the hub; {hits} hits", False
    kinds = summary.get("memory_error_kinds") or {}
    named = ", ".join(
        f"{kind} x{count}" for kind, count in sorted(kinds.items(), key=lambda item: (-int(item[1]), item[0]))
    )
    text = f"Memory: {reached} of {used} subtasks could reach the hub ({errors} with errors: {named or 'unknown'})"
    return f"{text}; {hits} hits", True


# --- the report's sections ---------------------------------------------------------------------
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
        *_memory_row(tally),
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


def _memory_row(tally: ResultCounts) -> list[tuple[str, str]]:
    if not tally.memory_used:
        return []
    used = _plural(tally.memory_used, "subtask")
    text = f"{used} made memory calls: {tally.memory_reached} reached the hub, {tally.memory_failed} had errors"
    return [("Memory use", text)]


def _workers(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every worker that ran subtasks, with its node and region (the first :data:`MAX_LISTED_WORKERS`)."""
    if not workers:
        return []
    counts = sorted(int(w.get("subtasks", 0)) for w in workers.values())
    spread = f"min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}"
    lines = [f"Workers ({len(workers)}; subtasks per worker {spread})"]
    for worker_id in sorted(workers, key=natural_key)[:MAX_LISTED_WORKERS]:
        worker = workers[worker_id]
        lines.append(
            f"  {worker_id}  node {worker.get('node') or '-'}  region {worker.get('region') or '-'}"
            f"  {_plural(int(worker.get('subtasks', 0)), 'subtask')} ({int(worker.get('ok', 0))} passed)"
        )
    if len(workers) > MAX_LISTED_WORKERS:
        lines.append(f"  ... and {len(workers) - MAX_LISTED_WORKERS} more workers")
    return lines + [""]


def _start_failures(stats: Any) -> list[str]:
    """The workers that failed to start, each with where and why (bounded)."""
    if not isinstance(stats, Mapping) or not int(stats.get("launch_failures") or 0):
        return []
    failed = int(stats["launch_failures"])
    listed = [f for f in stats.get("start_failures") or [] if isinstance(f, Mapping)][:MAX_LISTED_START_FAILURES]
    more = f"; first {len(listed)} listed" if failed > len(listed) else ""
    lines = [f"Failed worker starts ({failed}{more}): {start_causes(stats)}"]
    for failure in listed:
        message = " ".join(str(failure.get("message", "")).split())[: 2 * MAX_MESSAGE_CHARS]
        lines.append(f"  {failure.get('worker') or '-'} ({_where(failure)}): {failure.get('code', 'failed')}: {message}")
    return lines + [""]


def _memory_errors(tally: ResultCounts) -> list[str]:
    """How memory calls failed, when any did: the kinds and one example."""
    if not tally.memory_failed:
        return []
    kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(tally.memory_error_kinds.items()) if n > 0)
    example = " ".join(tally.memory_error_example.split())[: 2 * MAX_MESSAGE_CHARS]
    return [
        f"Memory errors in {_plural(tally.memory_failed, 'subtask')} of {tally.memory_used} that used memory: {kinds}",
        f"  e.g. {example}" if example else "",
        "",
    ]


def _failures(failed: int, listed: list[SubtaskResult], warned: bool = False) -> list[str]:
    if not failed:
        return ["All subtasks passed, but the run was degraded: see the warnings above." if warned
                else "All subtasks passed."]
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


def natural_key(text: str) -> list[Any]:
    """Sorts ``w2`` before ``w10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
