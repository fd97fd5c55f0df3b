"""The results log: append-only JSONL on disk, read back in index order, summary kept as it goes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rayflow.errors import InvalidInputError
from rayflow.swarm.results_log import LogChunk, ResultsLog, RunSummary, copy_log, read_log_chunk
from rayflow.wire.subtasks import Phase, PhaseEvent, SubtaskResult
from tests.swarm_records import T0, subtask_result


def shuffled_results(count: int, seed: int = 3) -> list[SubtaskResult]:
    results = [
        subtask_result(i, ok=i % 50 != 7, attempts=1 + i % 3, memory_hits=i % 4, dispatches=1 + (i % 100 == 0))
        for i in range(count)
    ]
    random.Random(seed).shuffle(results)
    return results


def test_results_come_back_in_index_order_after_out_of_order_arrival(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "run.jsonl") as log:
        for result in shuffled_results(1000):
            log.append(result)
        assert [r.index for r in log] == list(range(1000))
        assert len(log) == 1000


def test_a_result_reads_back_equal_to_what_was_appended(tmp_path: Path) -> None:
    original = subtask_result(5, ok=False, attempts=3, memory_hits=2)
    with ResultsLog(tmp_path / "run.jsonl") as log:
        log.append(original)
        assert log.get(5) == original
        assert log.get(6) is None


def test_summary_counts_ok_failed_attempts_memory_hits_and_redispatches(tmp_path: Path) -> None:
    results = shuffled_results(1000)
    with ResultsLog(tmp_path / "run.jsonl") as log:
        for result in results:
            log.append(result)
        summary = log.summary()
    assert summary["subtasks"] == 1000
    assert summary["failed"] == sum(not r.ok for r in results) == 20
    assert summary["ok"] == 980
    assert summary["attempts"] == sum(r.attempts for r in results)
    assert summary["memory_hits"] == sum(r.memory_hits for r in results)
    assert summary["redispatched"] == 10
    assert summary["error_codes"] == {"tests_failed": 20}
    assert sum(w["subtasks"] for w in summary["workers"].values()) == 1000
    assert set(summary["nodes"]) == {"node-0", "node-1"}


def test_summary_does_not_read_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsLog(path) as log:
        for result in shuffled_results(50):
            log.append(result)
        path.write_bytes(b"")  # if summary() read the file it would now find nothing
        assert log.summary()["subtasks"] == 50


def test_summary_adds_time_per_phase_from_events(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "run.jsonl") as log:
        log.append_event(PhaseEvent(Phase.PROVISION, "w-0", T0, T0 + 2.0))
        log.append_event(PhaseEvent(Phase.PROVISION, "w-1", T0 + 1.0, T0 + 3.0))
        log.append_event(PhaseEvent(Phase.EXECUTE, "w-0", T0 + 3.0, T0 + 8.0))
        summary = log.summary()
    assert summary["phase_busy_s"] == {"provision": 4.0, "execute": 5.0}
    assert summary["phase_wall_s"] == {"provision": 3.0, "execute": 5.0}
    assert summary["phase_spans"] == {"provision": 2, "execute": 1}
    assert summary["wall_s"] == 8.0


def test_a_torn_last_line_is_skipped_on_read(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsLog(path) as log:
        for result in shuffled_results(1000):
            log.append(result)
    with open(path, "ab") as file:
        file.write(b'{"kind":"result","subtask_id":"job-1000","index":1000,"ok":tr')
    reopened = ResultsLog(path, readonly=True)
    assert len(reopened) == 1000
    assert reopened.skipped_lines == 1
    assert [r.index for r in reopened][-1] == 999


def test_resuming_after_a_torn_line_appends_on_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsLog(path) as log:
        log.append(subtask_result(0))
    with open(path, "ab") as file:
        file.write(b'{"kind":"result","subt')
    with ResultsLog(path) as resumed:
        resumed.append(subtask_result(1))
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]


def test_reopening_rebuilds_the_same_summary(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsLog(path) as log:
        log.set_meta(job_id="demo", pattern="A")
        for result in shuffled_results(200):
            log.append(result)
        log.append_event(PhaseEvent(Phase.DECOMPOSE, "coordinator", T0 - 1.0, T0))
        expected = log.summary()
    assert ResultsLog(path, readonly=True).summary() == expected
    assert expected["job_id"] == "demo"


def test_a_later_result_for_the_same_index_replaces_the_earlier_one(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "run.jsonl") as log:
        log.append(subtask_result(3, ok=False, attempts=4))
        log.append(subtask_result(3, ok=True, attempts=1, dispatches=2))
        assert len(log) == 1
        assert log.get(3).ok  # type: ignore[union-attr]
        assert list(log.failed()) == []
        summary = log.summary()
    assert (summary["ok"], summary["failed"], summary["attempts"], summary["redispatched"]) == (1, 0, 1, 1)


def test_failed_lists_only_failures_in_index_order(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "run.jsonl") as log:
        for result in shuffled_results(300):
            log.append(result)
        assert [r.index for r in log.failed()] == [7, 57, 107, 157, 207, 257]


def test_events_stream_back_in_append_order(tmp_path: Path) -> None:
    events = [PhaseEvent(Phase.EXECUTE, f"w-{i}", T0 + i, T0 + i + 1, f"job-{i}") for i in range(5)]
    with ResultsLog(tmp_path / "run.jsonl") as log:
        for i, event in enumerate(events):
            log.append_event(event)
            log.append(subtask_result(i))
        assert list(log.events()) == events


def test_values_json_cannot_hold_are_kept_as_text(tmp_path: Path) -> None:
    result = SubtaskResult("job-0", 0, True, value={"when": object()})
    with ResultsLog(tmp_path / "run.jsonl") as log:
        log.append(result)
        assert log.get(0).value["when"].startswith("<object object")  # type: ignore[union-attr]


def test_a_readonly_log_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    ResultsLog(path).close()
    with pytest.raises(InvalidInputError):
        ResultsLog(path, readonly=True).append(subtask_result(0))


def test_opening_a_missing_file_readonly_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        ResultsLog(tmp_path / "absent.jsonl", readonly=True)


def test_run_summary_counts_a_replaced_result_out_again() -> None:
    summary = RunSummary()
    failed = subtask_result(1, ok=False, attempts=3, memory_hits=2)
    summary.add_result(failed)
    summary.add_result(failed, sign=-1)
    summary.add_result(subtask_result(1))
    data = summary.to_dict()
    assert (data["subtasks"], data["failed"], data["attempts"], data["memory_hits"]) == (1, 0, 1, 0)
    assert data["error_codes"] == {}


def test_a_log_moves_in_bounded_chunks_of_whole_lines_and_reads_back_the_same(tmp_path: Path) -> None:
    source = tmp_path / "coordinator" / "run.jsonl"
    with ResultsLog(source) as log:
        log.set_meta(job_id="run", pattern="A")
        for result in shuffled_results(200):
            log.append(result)
        # One line longer than a chunk travels whole, alone.
        log.append(SubtaskResult("long", 500, True, value={"text": "x" * 5000}))
    sizes: list[int] = []

    def read(offset: int) -> LogChunk:
        chunk = LogChunk.from_dict(read_log_chunk(source, offset, 2048).to_dict())
        assert chunk.data.endswith(b"\n") or chunk.data == b""
        sizes.append(len(chunk.data))
        return chunk

    copied = copy_log(read, tmp_path / "driver" / "run.jsonl")
    assert copied.read_bytes() == source.read_bytes()
    assert len(sizes) > 10 and max(sizes) > 5000 and sorted(sizes)[-2] <= 2048
    reread = ResultsLog(copied, readonly=True)
    assert [r.index for r in reread] == [*range(200), 500]
    assert reread.summary() == ResultsLog(source, readonly=True).summary()
    assert not list((tmp_path / "driver").glob(".*.part"))


def test_a_torn_last_line_is_never_sent(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsLog(path) as log:
        log.append(subtask_result(0))
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(b'{"kind":"result","ind')
    first = read_log_chunk(path, 0, 1 << 20)
    assert (first.data, first.end) == (whole, True)
    assert read_log_chunk(path, first.next_offset) == LogChunk(b"", first.next_offset, True)
    copied = copy_log(lambda offset: read_log_chunk(path, offset), tmp_path / "copy.jsonl")
    assert copied.read_bytes() == whole
