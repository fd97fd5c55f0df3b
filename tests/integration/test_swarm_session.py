"""A whole job without Ray: JobRunner over thread workers, process sandboxes and a real hub.

The Ray shells only move these calls between processes; what a job promises (patterns A and B,
results recorded in the hub, a lost answer recovered from the hub instead of rerun) is decided
here and tested against real sandboxes, real QUIC and real SQLite.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayflow.errors import WorkerLostError
from rayflow.hub.background import BackgroundHub
from rayflow.hub.client import SyncHubClient
from rayflow.sandbox.process import ProcessBackend
from rayflow.swarm.coordinator import ThreadFleet, ThreadWorker
from rayflow.swarm.job import AgentRef, FileGlob, Job, TaskList
from rayflow.swarm.model import Subtask
from rayflow.swarm.session import HubSession, JobRunner
from rayflow.swarm.worker import HubAccess, WorkerCore, WorkerPlan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[BackgroundHub]:
    with BackgroundHub(tmp_path_factory.mktemp("hub")) as running:
        yield running


@pytest.fixture(scope="module")
def session(hub) -> HubSession:
    host, port = hub.address

    def mint(sub: str, namespaces: list[str], ttl_s: int) -> str:
        return hub.issue_token(sub, "acme", namespaces, ttl_s=ttl_s)

    return HubSession(HubAccess(host, port, hub.ca_pem), mint)


def thread_fleet(session: HubSession, backend: ProcessBackend, workers: int = 2):
    def make(plan: WorkerPlan) -> ThreadFleet:
        return ThreadFleet(
            lambda worker_id: WorkerCore(worker_id, plan, backend.create, hub=session.access,
                                         mint_token=session.mint),
            workers,
        )

    return make


def read_namespace(hub: BackgroundHub, namespace: str, query: str) -> list[dict]:
    host, port = hub.address
    token = hub.issue_token("reader", "acme", [f"{namespace}/*"], ["reasoningbank:read"])
    with SyncHubClient(host, port, ca_pem=hub.ca_pem, token=token) as client:
        return [hit["item"] for hit in client.search(query, k=20, namespace=namespace)]


def test_pattern_a_runs_every_subtask_and_stores_results_and_report_in_the_hub(hub, session, tmp_path):
    job = Job(AgentRef.shell("cat"), TaskList([{"n": i} for i in range(5)]), name="pa", tenant="acme",
              backend="process", workers=2)
    outcome = JobRunner(job, thread_fleet(session, ProcessBackend()), tmp_path, hub=session).run()
    assert outcome.summary["subtasks"] == 5 and outcome.summary["ok"] == 5
    assert "Passed       5" in outcome.report
    titles = {item["title"] for item in read_namespace(hub, "swarm/pa", "result report")}
    assert {f"result of pa-{i:05d}" for i in range(5)} <= titles
    assert "report of pa" in titles


def test_pattern_b_decomposes_and_synthesizes_inside_a_sandbox(hub, session, tmp_path):
    repo = tmp_path / "repo"
    for name in ("x.py", "y.py", "z.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    job = Job(AgentRef.shell("cat"), FileGlob(str(repo), "*.py"), name="pb", tenant="acme",
              backend="process", workers=2, pattern="B")
    backend = ProcessBackend()
    outcome = JobRunner(job, thread_fleet(session, backend), tmp_path / "out", hub=session,
                        create_step_sandbox=backend.create).run()
    assert outcome.summary["subtasks"] == 2 and outcome.summary["ok"] == 2
    assert outcome.summary["phase_spans"]["decompose"] == 1
    # Synthesis ran in the coordinator's sandbox and stored the report with that sandbox's token.
    assert any(item["title"] == "report of pb" for item in read_namespace(hub, "swarm/pb", "report"))
    assert backend.owned() == []


class AnswerLostWorker(ThreadWorker):
    """Runs the subtask for real, then loses the answer, as a worker whose node dies right after."""

    def run(self, subtask: Subtask) -> cf.Future:
        def run_then_vanish():
            self.core.run(subtask)
            raise WorkerLostError("the worker's node went away after it recorded the result")

        return self._pool.submit(run_then_vanish)


def test_an_answer_lost_after_recording_is_recovered_from_the_hub_not_rerun(hub, session, tmp_path):
    runs = tmp_path / "runs.log"
    job = Job(AgentRef.shell(f"cat >> {runs}; echo >> {runs}"), TaskList([{"n": 0}]), name="rec",
              tenant="acme", backend="process", workers=1)
    backend = ProcessBackend()

    class LosingFleet(ThreadFleet):
        def launch(self, worker_id):
            future = super().launch(worker_id)
            return _map(future, lambda started: (AnswerLostWorker(started[0].core, self._pool), started[1]))

    def make(plan):
        return LosingFleet(lambda worker_id: WorkerCore(worker_id, plan, backend.create, hub=session.access,
                                                          mint_token=session.mint), 1)

    outcome = JobRunner(job, make, tmp_path / "out", hub=session).run()
    assert outcome.summary["subtasks"] == 1 and outcome.summary["ok"] == 1
    assert outcome.stats.recovered_from_hub == 1 and outcome.stats.worker_failures == 1
    assert len(Path(runs).read_text().splitlines()) == 1


def _map(future: cf.Future, convert) -> cf.Future:
    out: cf.Future = cf.Future()
    future.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() else
                             out.set_result(convert(f.result())))
    return out
