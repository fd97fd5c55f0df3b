"""Memory health and worker starts, counted: the runner's counts, the dispatch loop's counters, the
hub check's verdicts, the live progress warnings and the demo's refusal of a run that had no memory.

What a memory error is (:mod:`rayflow.wire.memory_use`): any call through ``context.memory`` that
raised, building the client included, whether or not the agent caught it.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rayflow.errors import ConfigError, HubUnreachableError, TransportError
from rayflow.guest import runner
from rayflow.guest.runner import AgentContext, attach_memory_use, run_spec
from rayflow.swarm.dispatch_loop import DispatchLoop, RunStats, SwarmError
from rayflow.swarm.hub_check import check_cause, hub_check_spec, hub_unreachable
from rayflow.swarm.ledger import DispatchLedger
from rayflow.views.progress import (
    NotebookDisplay,
    ProgressCounts,
    RunProgress,
    progress_html,
    progress_warnings,
)
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.memory_use import MemoryUse, describe_error, memory_use_of
from rayflow.wire.subtasks import Subtask, SubtaskResult

CA = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
NO_HANDSHAKE = "no handshake with 10.0.0.9:4433 within 10.0 s"


# --- the record ---------------------------------------------------------------------------------
def test_memory_use_counts_calls_errors_and_search_hits() -> None:
    use = MemoryUse()
    use.succeeded("search", [{"item": 1}, {"item": 2}])
    use.succeeded("store_pattern", {"id": "x"})
    use.failed(TransportError(NO_HANDSHAKE))
    assert (use.calls, use.ok, use.errors, use.hits) == (3, 2, 1, 2)
    assert use.used and use.reached and use.error_kind == "TransportError"
    assert use.last_error == f"TransportError: {NO_HANDSHAKE}"
    assert MemoryUse.from_dict(use.to_dict()) == use


def test_an_agents_own_memory_field_is_not_taken_for_counts() -> None:
    assert memory_use_of({"memory": {"mb": 512}}) is None
    assert memory_use_of({"memory": True}) is None
    assert memory_use_of(["not", "a", "mapping"]) is None
    assert MemoryUse.from_dict({"calls": True, "ok": 0, "errors": 0, "hits": 0}) is None


def test_an_error_is_written_down_bounded_with_its_class() -> None:
    assert describe_error(ValueError("a\n  b")) == "ValueError: a b"
    assert len(describe_error(TransportError("x" * 1000))) == 300


def test_rollouts_memory_is_summed() -> None:
    total = MemoryUse(2, 2, 0, 5).merged(MemoryUse(1, 0, 1, 0, "TransportError: gone"))
    assert total == MemoryUse(3, 2, 1, 5, "TransportError: gone")


# --- the runner counts every python agent's memory calls ---------------------------------------
class FakeClient:
    """A hub client whose calls fail once ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.closed = False

    def search(self, query: str, **_: Any) -> list[dict[str, Any]]:
        if self.down:
            raise TransportError(NO_HANDSHAKE)
        return [{"item": {"content": query}}]

    def close(self) -> None:
        self.closed = True


def test_the_context_counts_each_call_through_memory_and_passes_answers_and_errors_through(tmp_path) -> None:
    client = FakeClient()
    context = AgentContext({}, tmp_path)
    context._memory = runner.CountedMemory(client, context.memory_use)
    assert context.memory.search("q") == [{"item": {"content": "q"}}]
    client.down = True
    with pytest.raises(TransportError):
        context.memory.search("q")
    context.close()
    assert client.closed
    assert context.memory_use.to_dict() == {
        "calls": 2,
        "ok": 1,
        "errors": 1,
        "hits": 1,
        "last_error": f"TransportError: {NO_HANDSHAKE}",
    }


def test_a_sandbox_without_a_hub_counts_each_try_to_use_memory_as_an_error(tmp_path) -> None:
    context = AgentContext({}, tmp_path, env={})
    for _ in range(2):
        with pytest.raises(ConfigError):
            context.memory.search("q")
    assert (context.memory_use.errors, context.memory_use.error_kind) == (2, "ConfigError")


AGENTS = """
def swallows(context):
    try:
        context.memory.search("q")
    except Exception:
        pass
    return {"passed": True}


def raises(context):
    context.memory.search("q")


def listed(context):
    try:
        context.memory.search("q")
    except Exception:
        pass
    return ["a", "b"]


def no_memory(context):
    return {"passed": True}
"""


@pytest.fixture
def agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    (tmp_path / "memory_agents.py").write_text(AGENTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    client = FakeClient()
    client.down = True
    monkeypatch.setattr(runner, "connect_memory", lambda env: client)
    return client


def run_agent(name: str, tmp_path: Path) -> dict[str, Any]:
    return run_spec(
        {"agent": {"kind": "python", "target": f"memory_agents:{name}"}, "task": {}, "workdir": str(tmp_path)}
    )


def test_a_pass_that_swallowed_memory_errors_carries_them_in_its_value(agents, tmp_path) -> None:
    result = run_agent("swallows", tmp_path)
    assert result["ok"] and result["value"]["passed"]
    assert result["value"]["memory"]["errors"] == 1 and result["value"]["memory"]["ok"] == 0


def test_a_failed_run_still_carries_its_memory_counts(agents, tmp_path) -> None:
    result = run_agent("raises", tmp_path)
    assert not result["ok"] and result["error"]["code"] == "transport_error"
    assert result["value"] == {
        "memory": {
            "calls": 1,
            "ok": 0,
            "errors": 1,
            "hits": 0,
            "last_error": f"TransportError: {NO_HANDSHAKE}",
        }
    }


def test_values_of_agents_that_never_used_memory_or_return_no_mapping_are_left_alone(
    agents, tmp_path
) -> None:
    assert run_agent("no_memory", tmp_path)["value"] == {"passed": True}
    assert run_agent("listed", tmp_path)["value"] == ["a", "b"]
    assert attach_memory_use({"memory": "mine"}, MemoryUse(1, 1, 0, 0)) == {"memory": "mine"}


# --- the hub check's verdicts -----------------------------------------------------------------
def test_the_hub_check_is_the_guest_check_agent_bounded_by_its_timeout() -> None:
    spec = hub_check_spec(2.0)
    assert spec["agent"] == {"kind": "python", "target": "rayflow.guest.agents.hub_check:check_hub"}
    assert spec["task"] == {"timeout_s": 2.0}


@pytest.mark.parametrize(
    ("parsed", "cause"),
    [
        ({"ok": True, "value": {"reachable": True}}, None),
        (
            {"ok": True, "value": {"reachable": False, "cause": f"TransportError: {NO_HANDSHAKE}"}},
            f"TransportError: {NO_HANDSHAKE}",
        ),
        (
            {"ok": False, "error": {"code": "agent_failed", "message": "ImportError: x"}},
            "the hub check failed to run: agent_failed: ImportError: x",
        ),
        ({"ok": True, "value": "yes"}, "the hub check gave no verdict"),
        (None, "the hub check gave no result"),
    ],
)
def test_only_a_reachable_verdict_passes_the_hub_check(parsed, cause) -> None:
    assert check_cause(parsed) == cause


def test_the_start_error_names_the_hub_where_it_was_dialled_the_node_and_the_cause() -> None:
    error = hub_unreachable(
        HubEndpoint("10.0.0.9", 4433, CA),
        "TransportError: gone",
        node_id="n-7",
        region="eu",
        worker_id="w1",
        dialled="172.17.0.1:4433",
    )
    assert isinstance(error, HubUnreachableError) and error.code == "hub_unreachable"
    assert error.message == (
        "the hub at 10.0.0.9:4433 (dialled as 172.17.0.1:4433 from the sandbox) could not "
        "be reached from node n-7 (region eu): TransportError: gone"
    )
    assert error.details == {
        "hub": "10.0.0.9:4433",
        "node": "n-7",
        "region": "eu",
        "worker": "w1",
        "cause": "TransportError: gone",
    }


# --- the dispatch loop counts failed starts and memory health -----------------------------------
class FailingFleet:
    """Every start fails with ``error`` (at once)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.launched = 0

    def launch(self, worker_id: str) -> cf.Future:
        self.launched += 1
        future: cf.Future = cf.Future()
        future.set_exception(self.error)
        return future

    def close(self) -> None:
        return None


class ListSink:
    def __init__(self) -> None:
        self.results: list[SubtaskResult] = []

    def append(self, result: SubtaskResult) -> None:
        self.results.append(result)

    def append_event(self, event: Any) -> None:
        return None


def unreachable() -> HubUnreachableError:
    return hub_unreachable(
        HubEndpoint("10.0.0.9", 4433, CA), "TransportError: gone", node_id="n-2", region="us"
    )


def test_starts_that_cannot_reach_the_hub_end_the_job_with_every_subtask_failed_unrun() -> None:
    sink = ListSink()
    loop = DispatchLoop(
        FailingFleet(unreachable()), sink, workers=2, launch_check_s=0.01, abandon_on=("hub_unreachable",)
    )
    stats = loop.run([Subtask(f"s{i}", i) for i in range(3)])
    assert (stats.workers_asked, stats.workers_ready, stats.launch_failures, stats.abandoned) == (2, 0, 6, 3)
    assert stats.start_failure_codes == {"hub_unreachable": 6}
    assert {f["worker"] for f in stats.start_failures} == {f"w00{i}" for i in range(1, 7)}
    assert {k: v for k, v in stats.start_failures[0].items() if k != "worker"} == {
        "node": "n-2",
        "region": "us",
        "code": "hub_unreachable",
        "message": unreachable().message,
    }
    assert [r.index for r in sink.results] == [0, 1, 2]
    assert all(r.error["code"] == "hub_unreachable" and r.dispatches == 0 for r in sink.results)
    assert sink.results[0].error["message"].startswith("not run: no worker could be started (6 tries)")


def test_other_start_failures_still_raise_unless_named() -> None:
    loop = DispatchLoop(
        FailingFleet(ConfigError("no image")),
        ListSink(),
        workers=1,
        launch_check_s=0.01,
        abandon_on=("hub_unreachable",),
    )
    with pytest.raises(SwarmError, match="no image"):
        loop.run([Subtask("a", 0)])
    assert loop.stats.start_failure_codes == {"config_error": 3}


def test_the_kept_start_failures_are_bounded_and_counted_by_code() -> None:
    stats = RunStats()
    for i in range(30):
        stats.start_failed(f"w{i}", unreachable() if i % 2 else None, "did not start within 600 s")
    assert stats.launch_failures == 30 and len(stats.start_failures) == 20
    assert stats.start_failure_codes == {"start_timeout": 15, "hub_unreachable": 15}


def test_results_feed_the_live_memory_counters_and_a_snapshot_is_its_own() -> None:
    stats = RunStats()
    broken = {"memory": MemoryUse(2, 0, 2, 0, f"TransportError: {NO_HANDSHAKE}").to_dict()}
    stats.result_recorded(SubtaskResult("a", 0, True, value={"memory": MemoryUse(1, 1, 0, 3).to_dict()}))
    stats.result_recorded(SubtaskResult("b", 1, True, value=broken))
    stats.result_recorded(SubtaskResult("c", 2, False))
    assert (
        stats.done,
        stats.ok,
        stats.memory_used,
        stats.memory_reached,
        stats.memory_errors,
        stats.memory_hits,
    ) == (3, 2, 2, 1, 1, 3)
    assert stats.memory_last_error.startswith("TransportError")
    copy = stats.snapshot()
    stats.start_failed("w9", unreachable())
    assert copy.start_failures == [] and copy.start_failure_codes == {} and copy.launch_failures == 0


def test_the_ledger_gives_up_waiting_retries_and_the_rest_of_the_decomposition() -> None:
    ledger = DispatchLedger([Subtask(f"s{i}", i) for i in range(4)], max_dispatches=3)
    first = ledger.assign("w1")
    assert first is not None
    ledger.worker_failed("w1", {"code": "worker_lost", "message": "gone"})
    given_up = list(ledger.abandon({"code": "hub_unreachable", "message": "not run"}))
    assert [(r.index, r.dispatches) for r in given_up] == [(0, 1), (1, 0), (2, 0), (3, 0)]
    assert ledger.finished and ledger.done == 4


# --- live progress warnings -------------------------------------------------------------------
STATS = {
    "workers_asked": 4,
    "workers_ready": 3,
    "launch_failures": 1,
    "start_failure_codes": {"hub_unreachable": 1},
    "start_failures": [
        {"worker": "w4", "node": "n-2", "region": "us", "code": "hub_unreachable", "message": "m"}
    ],
    "memory_used": 5,
    "memory_reached": 2,
    "memory_errors": 3,
    "memory_last_error": f"TransportError: {NO_HANDSHAKE}",
}


def test_progress_warns_of_failed_starts_and_memory_errors_and_nothing_for_an_old_coordinator() -> None:
    assert progress_warnings(STATS) == [
        (
            "start",
            "1 worker start(s) failed (3 of 4 asked started): the hub could not be reached x1 (node n-2, region us)",
        ),
        (
            "memory",
            (
                f"memory errors in 3 of 5 subtasks that used memory so far (2 reached the hub); "
                f"last: TransportError: {NO_HANDSHAKE}"
            ),
        ),
    ]
    assert progress_warnings({"done": 3, "ok": 3, "workers_ready": 2}) == []


def test_a_silent_progress_still_logs_each_kind_of_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rayflow.views.progress")
    console = Console(file=io.StringIO(), force_terminal=False)
    with RunProgress(4, 10, "quiet", console=console) as progress:
        progress.observe(STATS)
        progress.observe(STATS)
        progress.observe({**STATS, "memory_errors": 4})
    assert progress.mode == "silent" and console.file.getvalue() == ""  # type: ignore[attr-defined]
    messages = [record.getMessage() for record in caplog.records]
    assert (
        len(messages) == 2 and "worker start(s) failed" in messages[0] and "memory errors in 3" in messages[1]
    )
    assert progress.warnings["memory"].startswith("memory errors in 4 of 5")


def test_a_terminal_prints_a_red_warning_line_and_the_final_one_at_the_end() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    with RunProgress(4, 10, "bars", console=console) as progress:
        progress.observe(STATS)
        progress.observe({**STATS, "memory_errors": 4})
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "⚠ 1 worker start(s) failed" in text
    assert "memory errors in 3 of 5" in text and "memory errors in 4 of 5" in text


def test_the_notebook_block_shows_warnings_under_the_bars() -> None:
    shown: list[str] = []

    class Block:
        def __init__(self, markup: str) -> None:
            shown.append(markup)

        def update(self, markup: str) -> None:
            shown.append(markup)

    display = NotebookDisplay("nb", show=Block)
    display.start(ProgressCounts(4, 10))
    display.warn("memory", "memory <errors>", True)
    assert "⚠ memory &lt;errors&gt;" in shown[-1] and "color:#b00020" in shown[-1]
    assert "⚠" not in progress_html(ProgressCounts(1, 1), "t")


# --- where a worker is ------------------------------------------------------------------------------
def test_a_nodes_region_comes_from_its_label_else_its_one_region_resource() -> None:
    from actors.placement import region_of

    assert region_of({"rayflow/region": "eu-central"}, {"region:us-west": 1.0}) == "eu-central"
    assert region_of({}, {"CPU": 2.0, "region:us-west": 1.0}) == "us-west"
    assert region_of(None, {"region:a": 1.0, "region:b": 1.0}) == ""
    assert region_of(None) == ""
