"""A whole job without Ray: CoordinatorCore over thread workers, process sandboxes and a real hub.

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
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.swarm.coordinator_core import CoordinatorCore, HubSession
from rayflow.swarm.dispatch_loop import ThreadFleet, ThreadWorker
from rayflow.swarm.job import AgentRef, FileGlob, Job, TaskList
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan
from rayflow.wire.hub_client import SyncHubClient
from rayflow.wire.subtasks import Subtask

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[BackgroundHub]:
    with BackgroundHub(tmp_path_factory.mktemp("hub")) as running:
        yield running


@pytest.fixture(scope="module")
def session(hub) -> HubSession:
    def mint(sub: str, namespaces: list[str], ttl_s: int) -> str:
        return hub.issue_token(sub, "acme", namespaces, ttl_s=ttl_s)

    return HubSession(hub.endpoint, mint)


def thread_fleet(session: HubSession, backend, workers: int = 2):
    def make(plan: WorkerPlan) -> ThreadFleet:
        return ThreadFleet(
            lambda worker_id: WorkerCore(worker_id, plan, backend.create, hub=session.endpoint,
                                         mint_token=session.mint),
            workers,
        )

    return make


def read_namespace(hub: BackgroundHub, namespace: str, query: str) -> list[dict]:
    token = hub.issue_token("reader", "acme", [f"{namespace}/*"], ["reasoningbank:read"])
    with SyncHubClient.for_endpoint(hub.endpoint, token=token) as client:
        return [hit["item"] for hit in client.search(query, k=20, namespace=namespace)]


def test_a_python_agent_in_bubblewrap_sandboxes_reaches_the_hub_from_its_network_namespace(hub, session, tmp_path):
    from rayflow.jobs.demo_codebase import decompose_codebase, generate_codebase
    from rayflow.sandbox.local_backend import LocalBackend

    generate_codebase(tmp_path / "code", 2, seed=1)
    tasks = [{**task, "memory": True, "namespace": "lessons/local"} for task in decompose_codebase(tmp_path / "code")]
    job = Job(AgentRef.python("rayflow.guest.agents.fixer:fix_module"), TaskList(tasks), name="loc", tenant="acme",
              backend="local", workers=2, upload=str(tmp_path / "code"), memory_namespaces=("lessons/local/*",))
    backend = LocalBackend()
    outcome = CoordinatorCore(job, thread_fleet(session, backend), tmp_path / "out", hub=session).run()
    assert outcome.summary["ok"] == 2, outcome.report
    assert read_namespace(hub, "lessons/local", "fix")
    assert backend.owned() == []


def test_pattern_a_runs_every_subtask_and_stores_results_and_report_in_the_hub(hub, session, tmp_path):
    job = Job(AgentRef.shell("cat"), TaskList([{"n": i} for i in range(5)]), name="pa", tenant="acme",
              backend="process", workers=2)
    outcome = CoordinatorCore(job, thread_fleet(session, ProcessBackend()), tmp_path, hub=session).run()
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
    outcome = CoordinatorCore(job, thread_fleet(session, backend), tmp_path / "out", hub=session,
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
        return LosingFleet(lambda worker_id: WorkerCore(worker_id, plan, backend.create, hub=session.endpoint,
                                                          mint_token=session.mint), 1)

    outcome = CoordinatorCore(job, make, tmp_path / "out", hub=session).run()
    assert outcome.summary["subtasks"] == 1 and outcome.summary["ok"] == 1
    assert outcome.stats.recovered_from_hub == 1 and outcome.stats.worker_failures == 1
    assert len(Path(runs).read_text().splitlines()) == 1


def _map(future: cf.Future, convert) -> cf.Future:
    out: cf.Future = cf.Future()
    future.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() else
                             out.set_result(convert(f.result())))
    return out


def fixing_tasks(root: Path, namespace: str) -> list[dict]:
    from rayflow.jobs.demo_codebase import decompose_codebase, generate_codebase

    generate_codebase(root, 3, seed=5)
    return [{**task, "memory": True, "namespace": namespace} for task in decompose_codebase(root)]


def test_parallel_matts_keeps_every_rollout_and_stores_a_contrast_lesson(hub, session, tmp_path):
    from rayflow.jobs.fixer_profile import fixer_matts
    from rayflow.swarm.results_log import ResultsLog

    tasks = fixing_tasks(tmp_path / "code", "lessons/mp")
    job = Job(AgentRef.python("rayflow.guest.agents.fixer:fix_module"), TaskList(tasks), name="mp", tenant="acme",
              backend="process", workers=2, upload=str(tmp_path / "code"), memory_namespaces=("lessons/mp/*",),
              matts=fixer_matts("parallel", k=2))
    runner = CoordinatorCore(job, thread_fleet(session, ProcessBackend()), tmp_path / "out", hub=session)
    outcome = runner.run()
    assert outcome.summary["subtasks"] == 3 and outcome.summary["ok"] == 3
    results = list(ResultsLog(outcome.results_path, readonly=True))
    assert all(len(r.value["rollouts"]) == 2 for r in results)
    rollouts = list(ResultsLog(Path(outcome.results_path).with_name("mp.rollouts.jsonl"), readonly=True))
    assert len(rollouts) == 6
    assert read_namespace(hub, "lessons/mp", "fix strategy")


def test_sequential_matts_refines_inside_one_sandbox_until_success(hub, session, tmp_path):
    from rayflow.jobs.fixer_profile import fixer_matts

    tasks = [{**task, "max_attempts": 4} for task in fixing_tasks(tmp_path / "code", "lessons/ms")]
    job = Job(AgentRef.python("rayflow.guest.agents.fixer:fix_module"), TaskList(tasks), name="ms", tenant="acme",
              backend="process", workers=2, upload=str(tmp_path / "code"), memory_namespaces=("lessons/ms/*",),
              matts=fixer_matts("sequential", r=10))
    outcome = CoordinatorCore(job, thread_fleet(session, ProcessBackend()), tmp_path / "out", hub=session).run()
    assert outcome.summary["ok"] == 3
    from rayflow.swarm.results_log import ResultsLog

    for result in ResultsLog(outcome.results_path, readonly=True):
        refinements = result.value["refinements"]
        assert result.value["passed"] and 1 <= len(refinements) <= 10
        # It stopped at the first success: only the last refinement passed.
        assert [bool(step.get("succeeded")) for step in refinements] == [False] * (len(refinements) - 1) + [True]
