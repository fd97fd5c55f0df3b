"""A hub the sandboxes cannot reach is found, counted and reported: never a silent pass.

Ray-free: CoordinatorCore over thread workers whose sandboxes come from the process backend, with
real QUIC. Three ways memory degrades: no node reaches the hub (every worker's start fails its hub
check, the job ends with a report that says so), one node does not (its worker never gets work),
and the hub dies mid-job (the subtasks after it count their failed memory calls, and the report's
headline says how many could not reach the hub).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import HubUnreachableError
from rayflow.hub.background import BackgroundHub
from rayflow.rpc.tls import ensure_server_tls
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.sandbox.spec import SandboxSpec
from rayflow.swarm.coordinator_core import CoordinatorCore, HubSession
from rayflow.swarm.dispatch_loop import RunStats, ThreadFleet
from rayflow.swarm.job import AgentRef, Job, TaskList
from rayflow.swarm.results_log import ResultsLog
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan
from rayflow.views.job_result import JobResult
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.subtasks import PhaseEvent

pytestmark = pytest.mark.integration

#: Seconds a hub client waits for a connection here (the default, 10 s, would make each test slow).
FAST_S = 0.5

#: An agent that treats memory as advice: it searches, and passes whatever happens.
ADVICE_AGENT = """
def search(context):
    try:
        hits = context.memory.search("lesson", k=3, namespace=context.task["namespace"])
    except Exception:
        return {"passed": True, "found": None}
    return {"passed": True, "found": len(hits)}
"""


def free_udp_port() -> int:
    """A loopback UDP port nothing listens on (bound, read and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nobody_endpoint(tmp_path: Path) -> HubEndpoint:
    """A hub endpoint with a real CA and a port nothing answers on."""
    return HubEndpoint("127.0.0.1", free_udp_port(), ensure_server_tls(tmp_path / "tls").ca_pem)


def hub_session(endpoint: HubEndpoint, mint: Callable[[str, list[str], int], str]) -> HubSession:
    return HubSession(endpoint, mint, connect_timeout_s=FAST_S)


def fleet(backend: ProcessBackend, workers: int, core: Callable[[str, WorkerPlan], WorkerCore]):
    def make(plan: WorkerPlan) -> ThreadFleet:
        return ThreadFleet(lambda worker_id: core(worker_id, plan), workers)

    return make


def fast_core(
    backend: ProcessBackend, session: HubSession, **where: str
) -> Callable[[str, WorkerPlan], WorkerCore]:
    def core(worker_id: str, plan: WorkerPlan) -> WorkerCore:
        return WorkerCore(
            worker_id,
            plan,
            backend.create,
            hub=session.endpoint,
            mint_token=session.mint,
            hub_check_timeout_s=FAST_S,
            hub_connect_timeout_s=FAST_S,
            **where,
        )

    return core


def advice_job(tmp_path: Path, name: str, subtasks: int, workers: int) -> Job:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "advice_agent.py").write_text(ADVICE_AGENT)
    tasks = [{"n": i, "namespace": f"lessons/{name}"} for i in range(subtasks)]
    return Job(
        AgentRef.python("advice_agent:search", timeout_s=60),
        TaskList(tasks),
        name=name,
        tenant="acme",
        backend="process",
        workers=workers,
        upload=str(repo),
        memory_namespaces=(f"lessons/{name}/*",),
    )


class Signalling(WorkerCore):
    """A worker core that sets ``failed`` when its start fails."""

    def __init__(self, failed: threading.Event, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failed = failed

    def start(self) -> list[PhaseEvent]:
        try:
            return super().start()
        except BaseException:
            self._failed.set()
            raise


@pytest.fixture
def backend(tmp_path: Path) -> ProcessBackend:
    return ProcessBackend(registry_dir=tmp_path / "registry")


def test_a_hub_no_sandbox_reaches_fails_every_start_and_the_job_ends_with_a_report_saying_so(
    tmp_path, backend
):
    endpoint = nobody_endpoint(tmp_path)
    session = hub_session(endpoint, lambda sub, namespaces, ttl_s: "a-token-nobody-will-check")
    job = advice_job(tmp_path, "nohub", subtasks=4, workers=1)
    outcome = CoordinatorCore(
        job, fleet(backend, 1, fast_core(backend, session)), tmp_path / "out", hub=session
    ).run()

    stats = outcome.stats
    assert stats.workers_ready == 0 and stats.launch_failures == 3  # 3 tries per worker asked
    assert stats.start_failure_codes == {"hub_unreachable": 3}
    assert f"127.0.0.1:{endpoint.port}" in stats.start_failures[0]["message"]
    assert "TransportError" in stats.start_failures[0]["message"]
    # No subtask ran, so none passed (with memory or without): each says why it did not run.
    results = list(ResultsLog(outcome.results_path, readonly=True))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert all(not r.ok and r.error["code"] == "hub_unreachable" for r in results)
    assert all("not run: no worker could be started" in r.error["message"] for r in results)

    report = outcome.report
    head = report.split("\n\n")[1]  # the lines under the title
    assert "WARNING: Workers asked 1, started 0, failed to start 3 (the hub could not be reached x3" in head
    assert "WARNING: 4 subtasks not run: no worker could be started" in head
    assert f"the hub at 127.0.0.1:{endpoint.port} could not be reached from this host" in report
    assert "All subtasks passed" not in report
    job_result = JobResult.from_log(ResultsLog(outcome.results_path, readonly=True), report)
    assert any("the hub could not be reached" in warning for warning in job_result.warnings)
    assert backend.owned() == []


def test_a_worker_whose_node_cannot_reach_the_hub_gets_no_work_and_the_report_names_its_node(
    tmp_path, backend
):
    with BackgroundHub(tmp_path / "hub") as hub:
        session = hub_session(
            hub.endpoint, lambda sub, ns, ttl_s: hub.issue_token(sub, "acme", ns, ttl_s=ttl_s)
        )
        job = advice_job(tmp_path, "split", subtasks=3, workers=2)
        # Node b's sandboxes reach the hub at an address nothing answers on, as if a firewall
        # stood between that node and the hub. Node a's workers start once node b's has failed,
        # so the job cannot end before the coordinator has seen that failure.
        node_b_failed = threading.Event()

        def after_node_b(spec: SandboxSpec) -> Sandbox:
            node_b_failed.wait(60)
            return backend.create(spec)

        nobody = nobody_endpoint(tmp_path)

        def core(worker_id: str, plan: WorkerPlan) -> WorkerCore:
            # The first worker lands on node b, the others on node a.
            if worker_id.endswith("w001"):
                return Signalling(
                    node_b_failed,
                    worker_id,
                    WorkerPlan.for_job(job, nobody),
                    backend.create,
                    hub=nobody,
                    mint_token=session.mint,
                    node_id="node-b",
                    region="us-east",
                    hub_check_timeout_s=FAST_S,
                    hub_connect_timeout_s=FAST_S,
                )
            return WorkerCore(
                worker_id,
                plan,
                after_node_b,
                hub=session.endpoint,
                mint_token=session.mint,
                node_id="node-a",
                region="eu-west",
                hub_check_timeout_s=FAST_S,
                hub_connect_timeout_s=FAST_S,
            )

        outcome = CoordinatorCore(job, fleet(backend, 2, core), tmp_path / "out", hub=session).run()

    assert outcome.summary["ok"] == 3
    assert {r.node_id for r in ResultsLog(outcome.results_path, readonly=True)} == {"node-a"}
    assert outcome.stats.start_failures[0]["node"] == "node-b"
    assert outcome.stats.start_failures[0]["region"] == "us-east"
    head = outcome.report.split("\n\n")[1]
    assert "Workers: 1 on 1 node(s) in 1 region(s)" in head
    assert (
        "WARNING: Workers asked 2, started 1, failed to start 1 "
        "(the hub could not be reached x1 (node node-b, region us-east))"
    ) in head
    assert "Memory: 3 of 3 subtasks that used it reached the hub" in head
    assert "node node-a  region eu-west" in outcome.report
    assert backend.owned() == []


def test_a_hub_that_dies_mid_job_shows_in_each_later_subtask_and_in_the_headline(tmp_path, backend):
    hub = BackgroundHub(tmp_path / "hub")
    stopped: list[int] = []

    def stop_after_two(stats: RunStats) -> None:
        if stats.done >= 2 and not stopped:
            stopped.append(stats.done)
            hub.close()

    try:
        session = hub_session(
            hub.endpoint, lambda sub, ns, ttl_s: hub.issue_token(sub, "acme", ns, ttl_s=ttl_s)
        )
        job = advice_job(tmp_path, "dies", subtasks=4, workers=1)
        outcome = CoordinatorCore(
            job,
            fleet(backend, 1, fast_core(backend, session)),
            tmp_path / "out",
            hub=session,
            on_progress=stop_after_two,
        ).run()
    finally:
        if not stopped:
            hub.close()

    assert stopped == [2]
    results = sorted(ResultsLog(outcome.results_path, readonly=True), key=lambda r: r.index)
    # Every subtask "passed" (its agent takes memory as advice), but its value counts what failed.
    assert all(r.ok for r in results)
    uses = [r.memory for r in results]
    assert all(use is not None and use.calls == 1 for use in uses)
    assert [use.errors for use in uses] == [0, 0, 1, 1]  # type: ignore[union-attr]
    assert uses[3].error_kind == "TransportError"  # type: ignore[union-attr]
    summary = outcome.summary
    assert (
        summary["subtasks_using_memory"],
        summary["subtasks_reaching_hub"],
        summary["subtasks_with_memory_errors"],
    ) == (4, 2, 2)
    assert summary["memory_error_kinds"] == {"TransportError": 2}
    assert outcome.stats.memory_errors == 2 and outcome.stats.memory_reached == 2

    head = outcome.report.split("\n\n")[1]
    assert "WARNING: Memory: 2 of 4 subtasks could reach the hub (2 with errors: TransportError x2)" in head
    assert outcome.report.rstrip().endswith(
        "All subtasks passed, but the run was degraded: see the warnings above."
    )
    job_result = JobResult.from_log(ResultsLog(outcome.results_path, readonly=True), outcome.report)
    assert "⚠ Memory: 2 of 4 subtasks could reach the hub" in job_result.headline()
    assert backend.owned() == []


def test_the_start_error_names_the_node_the_hub_and_the_cause(tmp_path, backend):
    endpoint = nobody_endpoint(tmp_path)
    session = hub_session(endpoint, lambda sub, namespaces, ttl_s: "token")
    plan = WorkerPlan.for_job(advice_job(tmp_path, "one", subtasks=1, workers=1), endpoint)
    core = fast_core(backend, session, node_id="node-z", region="ap-south")("w-1", plan)
    with pytest.raises(HubUnreachableError) as caught:
        core.start()
    error = caught.value
    assert error.details["node"] == "node-z" and error.details["hub"] == f"127.0.0.1:{endpoint.port}"
    assert "could not be reached from node node-z (region ap-south): TransportError" in error.message
    assert backend.owned() == []
