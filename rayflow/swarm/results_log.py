"""An append-only JSONL file of a swarm run's results and phase events, with a running summary.

Why a file: a 1000+ subtask job must not hold every result in the coordinator's memory, and a
coordinator that crashes must keep what had finished. Each record is one JSON line, flushed as it
arrives (``durable=True`` also fsyncs, to survive a power loss, at the cost of a disk sync each).

Why an offset index: results arrive out of order (fast subtasks first) but are read in index order.
The log keeps ``index -> byte offset`` of each result line in memory (a few dozen bytes a subtask,
about 100 MB for a million) and seeks to each in turn when iterating, so reading never loads the
whole file and never sorts it.

Why a running summary: the counters a report needs (ok/failed, attempts, memory hits,
re-dispatches, time per phase, subtasks per worker) are updated on every append, so
:meth:`ResultsLog.summary` costs nothing and never re-reads the file.

A line torn by a crash mid-write has no trailing newline: it is skipped on read, and cut off
before the first new append so the next record starts on a line of its own.

Why chunks: the log is written on the coordinator's machine, which need not be the one that asked
for the job. :func:`read_log_chunk` gives its whole lines from a byte offset, a bounded chunk at a
time, and :func:`copy_log` writes them to a file of the asking machine in the same format, so
moving a log never holds more than one chunk in memory on either side.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rayflow.errors import InvalidInputError, StorageError
from rayflow.wire.result_counts import ResultCounts
from rayflow.wire.subtasks import PhaseEvent, SubtaskResult

RESULT_KIND = "result"
EVENT_KIND = "event"
META_KIND = "meta"


class RunSummary(ResultCounts):
    """Counters over a run's results and events, updated one record at a time (no I/O).

    The result totals are :class:`~rayflow.wire.result_counts.ResultCounts`, the same the synthesis
    report counts with; this adds who ran what, why subtasks failed and time per phase.
    """

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, Any] = {}
        #: Per worker: subtasks, ok, failed (counts) and its node and region (as its results say).
        self.workers: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, int] = {}
        self.regions: dict[str, int] = {}
        self.error_codes: dict[str, int] = {}
        self.phase_busy_s: dict[str, float] = {}
        self.phase_spans: dict[str, int] = {}
        self._phase_window: dict[str, tuple[float, float]] = {}
        self._first_start: float | None = None
        self._last_end: float | None = None

    def add_result(self, result: SubtaskResult, sign: int = 1) -> None:
        """Count ``result`` in (``sign=1``) or out again (``sign=-1``, when a later one replaces it)."""
        self.add(result, sign)
        worker = self.workers.setdefault(result.worker_id or "-", {"subtasks": 0, "ok": 0, "failed": 0})
        worker["subtasks"] += sign
        worker["ok" if result.ok else "failed"] += sign
        if sign > 0:
            worker["node"], worker["region"] = result.node_id, result.region
        if result.node_id:
            self.nodes[result.node_id] = self.nodes.get(result.node_id, 0) + sign
        if result.region:
            self.regions[result.region] = self.regions.get(result.region, 0) + sign
        if not result.ok:
            code = str((result.error or {}).get("code", "failed"))
            self.error_codes[code] = self.error_codes.get(code, 0) + sign
        if sign > 0 and result.ended_at > 0:
            self._widen(result.started_at, result.ended_at)

    def add_event(self, event: PhaseEvent) -> None:
        phase = event.phase.value
        self.phase_busy_s[phase] = self.phase_busy_s.get(phase, 0.0) + max(0.0, event.end - event.start)
        self.phase_spans[phase] = self.phase_spans.get(phase, 0) + 1
        low, high = self._phase_window.get(phase, (event.start, event.end))
        self._phase_window[phase] = (min(low, event.start), max(high, event.end))
        self._widen(event.start, event.end)

    def _widen(self, start: float, end: float) -> None:
        self._first_start = start if self._first_start is None else min(self._first_start, start)
        self._last_end = end if self._last_end is None else max(self._last_end, end)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary a :class:`~rayflow.views.job_result.JobResult` and a report read."""
        wall = (self._last_end - self._first_start) if self._first_start is not None else 0.0
        return {
            **self.meta,
            "subtasks": self.subtasks,
            "ok": self.ok,
            "failed": self.failed,
            "attempts": self.attempts,
            "memory_hits": self.memory_hits,
            "subtasks_with_memory_hits": self.with_memory_hits,
            "dispatches": self.dispatches,
            "redispatched": self.redispatched,
            "busy_s": round(self.busy_s, 6),
            "started_at": self._first_start,
            "ended_at": self._last_end,
            "wall_s": round(max(0.0, wall), 6),
            "phase_busy_s": {k: round(v, 6) for k, v in self.phase_busy_s.items()},
            "phase_wall_s": {k: round(hi - lo, 6) for k, (lo, hi) in self._phase_window.items()},
            "phase_spans": dict(self.phase_spans),
            "workers": {k: dict(v) for k, v in self.workers.items() if v["subtasks"] > 0},
            "nodes": {k: v for k, v in self.nodes.items() if v > 0},
            "regions": {k: v for k, v in self.regions.items() if v > 0},
            **self.memory_summary(),
            "error_codes": {k: v for k, v in self.error_codes.items() if v > 0},
        }


class ResultsLog:
    """A run's results and events in one append-only JSONL file, read back in index order.

    Opening an existing file resumes it: its records are scanned once to rebuild the offset
    index and the summary. ``readonly=True`` opens a finished (or crashed) run's file for
    reading without ever writing to it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, readonly: bool = False, durable: bool = False
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.durable = durable
        #: Lines that could not be read (a torn last line, or a corrupt one): skipped, never fatal.
        self.skipped_lines = 0
        self._offsets: dict[int, int] = {}
        self._failed: set[int] = set()
        self._summary = RunSummary()
        self._lock = threading.Lock()
        self._writer: IO[bytes] | None = None
        if readonly and not self.path.exists():
            raise InvalidInputError("no results log at this path", path=str(self.path))
        end_of_good_lines = self._scan() if self.path.exists() else 0
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = open(self.path, "ab")  # noqa: SIM115 - held open for appends until close()
            if self._writer.tell() > end_of_good_lines:
                self._writer.truncate(end_of_good_lines)
                self._writer.seek(end_of_good_lines)

    # --- writing ------------------------------------------------------------------------------
    def append(self, result: SubtaskResult) -> None:
        """Record one subtask's result; a later result for the same index replaces the earlier one."""
        with self._lock:
            offset = self._write({"kind": RESULT_KIND, **result.to_dict()})
            self._index_result(result, offset)

    def append_event(self, event: PhaseEvent) -> None:
        """Record one span of the timeline."""
        with self._lock:
            self._write({"kind": EVENT_KIND, **event.to_dict()})
            self._summary.add_event(event)

    def set_meta(self, **fields: Any) -> None:
        """Record facts about the run (``job_id``, ``pattern``...); later values win."""
        with self._lock:
            self._write({"kind": META_KIND, **fields})
            self._summary.meta.update(fields)

    def _write(self, record: Mapping[str, Any]) -> int:
        if self._writer is None:
            raise InvalidInputError("this results log is read-only or closed", path=str(self.path))
        # Values an agent returned that JSON cannot hold are kept as their repr, not lost with the run.
        line = json.dumps(record, separators=(",", ":"), default=repr).encode() + b"\n"
        offset = self._writer.tell()
        try:
            self._writer.write(line)
            self._writer.flush()
            if self.durable:
                os.fsync(self._writer.fileno())
        except OSError as exc:
            raise StorageError(f"could not append to the results log: {exc}", path=str(self.path)) from exc
        return offset

    # --- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, index: object) -> bool:
        return index in self._offsets

    def __iter__(self) -> Iterator[SubtaskResult]:
        """Every result in index order, read one line at a time."""
        return self._read_indices(sorted(self._offsets))

    def failed(self) -> Iterator[SubtaskResult]:
        """The failed results in index order."""
        return self._read_indices(sorted(self._failed))

    def get(self, index: int) -> SubtaskResult | None:
        """The result of subtask ``index``, or ``None`` if it has not arrived."""
        offset = self._offsets.get(index)
        return None if offset is None else self._read_at(offset)

    def events(self) -> Iterator[PhaseEvent]:
        """Every phase event in the order they were appended, streamed from the file."""
        for _, record in self._records():
            if record.get("kind") == EVENT_KIND:
                yield PhaseEvent.from_dict(record)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._summary.meta)

    def summary(self) -> dict[str, Any]:
        """The run's counters so far (see :class:`RunSummary`); computed without reading the file."""
        with self._lock:
            return self._summary.to_dict()

    def _read_indices(self, indices: list[int]) -> Iterator[SubtaskResult]:
        self._flush()
        with open(self.path, "rb") as reader:
            for index in indices:
                reader.seek(self._offsets[index])
                yield SubtaskResult.from_dict(_result_fields(json.loads(reader.readline())))

    # --- opening ------------------------------------------------------------------------------
    def _scan(self) -> int:
        """Rebuild the index and summary from the file; returns where its last whole line ends."""
        end_of_whole_lines = 0
        for offset, line in _lines(self.path):
            if not line.endswith(b"\n"):
                self.skipped_lines += 1  # torn by a crash mid-write: always the last line
                break
            end_of_whole_lines = offset + len(line)
            record = _parse(line)
            try:
                kind = record.get("kind") if record is not None else None
                if kind == RESULT_KIND:
                    self._index_result(SubtaskResult.from_dict(_result_fields(record)), offset)
                elif kind == EVENT_KIND:
                    self._summary.add_event(PhaseEvent.from_dict(record))
                elif kind == META_KIND:
                    self._summary.meta.update(_result_fields(record))
                else:
                    self.skipped_lines += 1
            except (KeyError, TypeError, ValueError):
                self.skipped_lines += 1
        return end_of_whole_lines

    def _records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(offset, record)`` of each whole, readable line; torn or corrupt lines are passed over."""
        self._flush()
        for offset, line in _lines(self.path):
            record = _parse(line) if line.endswith(b"\n") else None
            if record is not None:
                yield offset, record

    def _index_result(self, result: SubtaskResult, offset: int) -> None:
        previous = self._offsets.get(result.index)
        if previous is not None:
            self._summary.add_result(self._read_at(previous), sign=-1)
        self._offsets[result.index] = offset
        self._summary.add_result(result)
        if result.ok:
            self._failed.discard(result.index)
        else:
            self._failed.add(result.index)

    def _read_at(self, offset: int) -> SubtaskResult:
        self._flush()
        with open(self.path, "rb") as reader:
            reader.seek(offset)
            return SubtaskResult.from_dict(_result_fields(json.loads(reader.readline())))

    def _flush(self) -> None:
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop appending; reading still works."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def __enter__(self) -> ResultsLog:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Bytes of whole lines one chunk of a results log carries at most (a longer line goes alone).
LOG_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class LogChunk:
    """Whole lines of a results log from one byte offset: how a log moves between machines."""

    data: bytes
    #: Where the next chunk starts.
    next_offset: int
    #: True when no whole line follows (a torn last line, left by a crash, is never sent).
    end: bool

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "next_offset": self.next_offset, "end": self.end}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogChunk:
        return cls(bytes(data["data"]), int(data["next_offset"]), bool(data["end"]))


def read_log_chunk(
    path: str | os.PathLike[str], offset: int = 0, max_bytes: int = LOG_CHUNK_BYTES
) -> LogChunk:
    """The whole lines of the log at ``path`` from byte ``offset``, about ``max_bytes`` of them
    (at least one line, however long), read without loading the rest of the file."""
    if offset < 0 or max_bytes <= 0:
        raise InvalidInputError("a log chunk needs offset >= 0 and max_bytes > 0", offset=offset)
    with open(path, "rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        reader.seek(offset)
        data = reader.read(max_bytes)
        cut = data.rfind(b"\n") + 1
        if cut == 0 and data:
            # No line ends within max_bytes: one long line, sent whole if it is whole.
            data += reader.readline()
            cut = len(data) if data.endswith(b"\n") else 0
    # The end once this read reached the end of the file: what it left is a torn line, never sent.
    return LogChunk(data[:cut], offset + cut, cut == 0 or offset + len(data) >= size)


def copy_log(read: Callable[[int], LogChunk], dest: str | os.PathLike[str]) -> Path:
    """Write the log that ``read(offset)`` returns chunk by chunk to ``dest``, replacing it.

    One chunk is in memory at a time; ``dest`` appears whole or not at all (written beside it, then
    renamed), so a reader never sees half a log.
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    try:
        with open(partial, "wb") as out:
            offset = 0
            while True:
                chunk = read(offset)
                if chunk.next_offset < offset or (not chunk.data and not chunk.end):
                    raise InvalidInputError("a results log chunk went backwards or stalled", offset=offset)
                out.write(chunk.data)
                offset = chunk.next_offset
                if chunk.end:
                    break
        os.replace(partial, target)
    except OSError as exc:
        raise StorageError(f"could not write the results log: {exc}", path=str(target)) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(offset, raw line)`` of each line of ``path``, newline kept so a torn tail can be told apart."""
    with open(path, "rb") as reader:
        offset = 0
        for line in reader:
            yield offset, line
            offset += len(line)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _result_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "kind"}
