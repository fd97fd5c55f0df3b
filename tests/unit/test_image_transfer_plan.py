"""Which engines need the sandbox image and how it gets there (``plan_image_transfers``), and the
``images`` entry a check leaves in a run's summary and report (no Ray, no Docker)."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

from rayflow.sandbox.image_transfer import (
    BUILT,
    CURRENT,
    LOADED,
    SHARED,
    ImageProbe,
    NodeImageRecord,
    TransferPlan,
    image_check_summary,
    plan_image_transfers,
)
from rayflow.swarm.coordinator_core import CoordinatorCore
from rayflow.swarm.job import AgentRef, Job, TaskList
from rayflow.wire.subtasks import Subtask, SubtaskResult


def probe(node: str, engine: str, current: bool, region: str = "") -> ImageProbe:
    return ImageProbe(node, region, engine, present=current, current=current, seconds=0.1)


def test_every_engine_current_moves_nothing_and_every_node_is_current() -> None:
    plan = plan_image_transfers([probe("n2", "E1", True), probe("n1", "E1", True), probe("n3", "E2", True)])
    assert plan == TransferPlan(None, None, (), {"n1": CURRENT, "n2": CURRENT, "n3": CURRENT})
    assert not plan.moves


def test_an_engine_with_the_image_exports_it_once_and_one_node_per_lacking_engine_loads_it() -> None:
    probes = [
        probe("n1", "E1", True),
        probe("n2", "E2", False),
        probe("n3", "E2", False),  # shares E2 with n2: made current through n2
        probe("n4", "E3", False),
        probe("n5", "E4", True),
    ]
    plan = plan_image_transfers(probes)
    assert plan.build_on is None
    assert plan.export_from == "n1"
    assert plan.load_on == ("n2", "n4")
    assert plan.actions == {"n1": CURRENT, "n2": LOADED, "n3": SHARED, "n4": LOADED, "n5": CURRENT}


def test_when_no_engine_has_it_one_node_builds_and_the_other_engines_load_from_it() -> None:
    plan = plan_image_transfers([probe("n3", "E2", False), probe("n1", "E1", False), probe("n2", "E1", False)])
    assert (plan.build_on, plan.export_from, plan.load_on) == ("n1", "n1", ("n3",))
    assert plan.actions == {"n1": BUILT, "n2": SHARED, "n3": LOADED}


def test_one_engine_lacking_the_image_is_built_once_and_nothing_is_exported() -> None:
    plan = plan_image_transfers([probe("n2", "E1", False), probe("n1", "E1", False)])
    assert (plan.build_on, plan.export_from, plan.load_on) == ("n1", None, ())
    assert plan.actions == {"n1": BUILT, "n2": SHARED}


def test_an_engine_is_current_only_when_every_node_on_it_says_so() -> None:
    # n2 expects another hash than n1 (other rayflow files): E1 is not taken as a source, and the
    # load on it is what then says why (the check after loading).
    plan = plan_image_transfers([probe("n1", "E1", True), probe("n2", "E1", False), probe("n3", "E2", True)])
    assert (plan.build_on, plan.export_from, plan.load_on) == (None, "n3", ("n1",))
    assert plan.actions == {"n1": LOADED, "n2": SHARED, "n3": CURRENT}


def test_nodes_whose_engine_gives_no_id_are_never_taken_for_one_engine() -> None:
    plan = plan_image_transfers([probe("n1", "E1", True), probe("n2", "", False), probe("n3", "", False)])
    assert plan.load_on == ("n2", "n3")
    assert plan.actions == {"n1": CURRENT, "n2": LOADED, "n3": LOADED}


# --- the summary's ``images`` entry, through a whole (Ray-free) job --------------------------------
class _Worker:
    worker_id = "w"
    node_id = "n1"

    def run(self, subtask: Subtask) -> cf.Future[tuple[SubtaskResult, list]]:
        done: cf.Future = cf.Future()
        done.set_result((SubtaskResult(subtask.id, subtask.index, True, worker_id="w", node_id="n1"), []))
        return done

    def stop(self) -> None:
        pass


class _Fleet:
    def launch(self, worker_id: str) -> cf.Future:
        started: cf.Future = cf.Future()
        started.set_result((_Worker(), []))
        return started

    def close(self) -> None:
        pass


def test_a_job_given_an_image_check_has_it_in_its_summary_and_its_report(tmp_path: Path) -> None:
    records = [
        NodeImageRecord("a" * 56, "us-west", "E1", BUILT, 61.04, 138_000_000),
        NodeImageRecord("b" * 56, "eu-central", "E2", LOADED, 8.21, 138_000_000),
    ]
    check = image_check_summary("rayflow-sandbox:latest", records, checked_at=1_700_000_000.0, seconds=70.3)
    job = Job(AgentRef.shell("true"), TaskList([{"n": 1}, {"n": 2}]), name="img", backend="process",
              workers=1, memory=False)
    outcome = CoordinatorCore(job, lambda plan: _Fleet(), tmp_path, image_check=check).run()
    assert outcome.summary["images"] == check
    assert outcome.summary["images"]["nodes"][1] == {
        "node_id": "b" * 56, "region": "eu-central", "engine_id": "E2", "action": "loaded",
        "seconds": 8.21, "bytes_moved": 138_000_000,
    }
    head = outcome.report.split("\n\n")[1].splitlines()
    assert head[:2] == [
        "Workers: 1 on 1 node(s) in 1 region(s)",
        (
            "Sandbox image rayflow-sandbox:latest: built on node aaaaaaaa in 61.0 s, "
            "loaded on 1 node(s) in 8.2 s (138 MB), checked in 70.3 s"
        ),
    ]


def test_a_job_without_an_image_check_has_no_images_entry(tmp_path: Path) -> None:
    job = Job(AgentRef.shell("true"), TaskList([{"n": 1}]), name="noimg", backend="process", workers=1,
              memory=False)
    outcome = CoordinatorCore(job, lambda plan: _Fleet(), tmp_path).run()
    assert "images" not in outcome.summary
    assert "Sandbox image" not in outcome.report
