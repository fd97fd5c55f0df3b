"""A fresh sandbox per subtask (``Job.isolation="subtask"``) against real sandboxes, without Ray.

The job runs as in ``test_coordinator_core.py``: :class:`CoordinatorCore` over thread workers. Its
probe agent first lists what earlier subtasks left where it can look (marker files outside the
uploaded repository, ``sleep`` processes tagged with a subtask's index), then leaves both itself.
With subtask isolation no subtask sees anything of another one that ran before it on its worker;
with worker isolation the later subtasks of a worker see exactly what the earlier ones left, which
shows the probe can tell the difference. Either way every subtask passes once and no sandbox
outlives the job.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import ConfigError, SandboxError
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.sandbox.spec import MIB, Limits, SandboxSpec
from rayflow.sandbox.wrapper import SandboxWrapper
from rayflow.swarm.coordinator_core import CoordinatorCore, JobOutcome
from rayflow.swarm.dispatch_loop import SwarmError, ThreadFleet
from rayflow.swarm.job import AgentRef, Job, TaskList
from rayflow.swarm.results_log import ResultsLog
from rayflow.swarm.upload import UploadSource, pack_directory
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan
from rayflow.wire.subtasks import Subtask, SubtaskResult

pytestmark = pytest.mark.integration

#: The probe: reads its task from stdin, prints one ``PROBE {...}`` line, leaves its traces.
PROBE = r'''
import json, os, subprocess, sys

task = json.load(sys.stdin)
index, tag = task["index"], str(task["tag"])
dirs = [os.path.expanduser(d) for d in task["mark_dirs"]]
marks = sorted({int(name) for d in dirs if os.path.isdir(d) for name in os.listdir(d)})
sleeps = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        continue
    if len(argv) >= 2 and argv[0].endswith(b"sleep") and argv[1].startswith(tag.encode()):
        sleeps.append(int(argv[1][len(tag):]))
repo = sorted(os.listdir("."))
for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, str(index)), "w") as handle:
        handle.write("left by subtask %d\n" % index)
# A helper that outlives the agent: not waited for, its own output closed.
subprocess.Popen(["sleep", "%s%03d" % (tag, index)], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("PROBE " + json.dumps({"index": index, "marks": marks, "sleeps": sorted(set(sleeps)), "repo": repo}))
'''
REPO_FILES = ["probe.py", "readme.txt"]
#: Where a process sandbox's probe leaves marks: its ``HOME``, a directory of its own next to the
#: repository copy (the process backend separates nothing else: its ``/tmp`` is the host's). A
#: container's probe uses ``/tmp``, outside its ``/workspace``.
PROCESS_MARKS = ("~/.probe-marks",)
DOCKER_MARKS = ("/tmp/probe-marks",)


def probe_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "probe.py").write_text(PROBE)
    (root / "readme.txt").write_text("the repository every sandbox gets\n")
    return root


def probe_job(
    repo: Path, *, isolation: str, backend: str, subtasks: int = 6, workers: int = 2,
    mark_dirs: tuple[str, ...] = PROCESS_MARKS, **fields: Any,
) -> Job:
    # The sleep's duration is a 9-digit number starting with this job's own tag.
    tag = f"9{secrets.randbelow(10**5):05d}"
    tasks = [{"index": i, "tag": tag, "mark_dirs": list(mark_dirs)} for i in range(subtasks)]
    return Job(
        AgentRef.shell("python3 probe.py", timeout_s=60),
        TaskList(tasks),
        name=f"iso-{isolation}-{secrets.token_hex(3)}",
        backend=backend,
        workers=workers,
        upload=str(repo),
        isolation=isolation,
        memory=False,
        **fields,
    )


def thread_fleet(create: Callable[[SandboxSpec], Sandbox], workers: int, cores: list[WorkerCore]):
    """A fleet factory of thread workers; the cores it makes are kept in ``cores`` for inspection."""

    def make_core(plan: WorkerPlan) -> Callable[[str], WorkerCore]:
        def make(worker_id: str) -> WorkerCore:
            core = WorkerCore(worker_id, plan, create)
            cores.append(core)
            return core

        return make

    return lambda plan: ThreadFleet(make_core(plan), workers)


def run_probe_job(
    job: Job, create: Callable[[SandboxSpec], Sandbox], out: Path
) -> tuple[JobOutcome, list[WorkerCore]]:
    cores: list[WorkerCore] = []
    outcome = CoordinatorCore(job, thread_fleet(create, job.workers, cores), out).run()
    return outcome, cores


def probes(outcome: JobOutcome) -> list[tuple[SubtaskResult, dict[str, Any]]]:
    """Each result with what its probe saw, every subtask exactly once, in index order."""
    results = sorted(ResultsLog(outcome.results_path, readonly=True), key=lambda r: r.index)
    assert [r.index for r in results] == list(range(outcome.summary["subtasks"]))
    seen = []
    for result in results:
        assert result.ok, (result.error, result.output_tail)
        line = next(line for line in result.output_tail.splitlines() if line.startswith("PROBE "))
        seen.append((result, json.loads(line[len("PROBE "):])))
    return seen


def earlier_on_same_worker(seen: list[tuple[SubtaskResult, dict[str, Any]]]) -> dict[int, list[int]]:
    """Subtask index -> indexes of the subtasks its worker ran before it."""
    by_worker: dict[str, list[SubtaskResult]] = {}
    for result, _ in seen:
        by_worker.setdefault(result.worker_id, []).append(result)
    earlier: dict[int, list[int]] = {}
    for results in by_worker.values():
        results.sort(key=lambda r: r.started_at)
        for n, result in enumerate(results):
            earlier[result.index] = sorted(r.index for r in results[:n])
    return earlier


def check_isolated(outcome: JobOutcome, job: Job) -> None:
    seen = probes(outcome)
    assert outcome.summary["ok"] == len(job.decomposition.tasks)
    earlier = earlier_on_same_worker(seen)
    assert any(earlier.values()), "no worker ran two subtasks: the test proves nothing"
    for result, probe in seen:
        assert probe["marks"] == [], (result.index, probe)
        assert not set(probe["sleeps"]) & set(earlier[result.index]), (result.index, probe)
        assert probe["repo"] == REPO_FILES or probe["repo"] == [".rayflow", *REPO_FILES], probe
    # Every subtask had a sandbox of its own.
    assert len({result.sandbox_id for result, _ in seen}) == len(seen)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return probe_repo(tmp_path / "repo")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProcessBackend]:
    made = ProcessBackend(registry_dir=tmp_path / "registry")
    yield made
    made.reap(lambda owner: False)


# --- the process backend ---------------------------------------------------------------------------
def test_with_subtask_isolation_no_subtask_sees_what_an_earlier_one_left(repo, backend, tmp_path):
    job = probe_job(repo, isolation="subtask", backend="process")
    outcome, cores = run_probe_job(job, backend.create, tmp_path / "out")
    check_isolated(outcome, job)
    assert backend.owned() == []
    # Each worker provisioned once at start; its pool prepared every later sandbox.
    assert outcome.summary["phase_spans"]["provision"] >= job.workers
    pools = [core.describe()["pool"] for core in cores]
    assert all(pool is not None for pool in pools)
    acquires = sum(p["hits"] + p["waits"] + p["misses"] for p in pools)
    # One at each worker's start (its first subtask runs there), one for each later subtask.
    assert acquires == len(job.decomposition.tasks)
    assert all(p["ready"] == 0 and p["leased"] == 0 for p in pools)


def check_shared(outcome: JobOutcome) -> None:
    """Worker isolation: each subtask sees exactly what the earlier ones of its worker left."""
    seen = probes(outcome)
    earlier = earlier_on_same_worker(seen)
    assert any(earlier.values()), "no worker ran two subtasks: the test proves nothing"
    for result, probe in seen:
        assert probe["marks"] == earlier[result.index], (result.index, probe)
        assert set(earlier[result.index]) <= set(probe["sleeps"]), (result.index, probe)
    assert len({result.sandbox_id for result, _ in seen}) == len({result.worker_id for result, _ in seen})


def test_with_worker_isolation_later_subtasks_see_what_earlier_ones_left(repo, backend, tmp_path):
    job = probe_job(repo, isolation="worker", backend="process")
    outcome, cores = run_probe_job(job, backend.create, tmp_path / "out")
    check_shared(outcome)
    assert all(core.describe()["pool"] is None for core in cores)
    assert backend.owned() == []


def started_core(job: Job, backend: ProcessBackend, worker_id: str = "w-1") -> WorkerCore:
    core = WorkerCore(worker_id, WorkerPlan.for_job(job, None), backend.create)
    core.start()
    return core


def wait_prepared(core: WorkerCore, timeout_s: float = 60.0) -> None:
    """Until the worker's pool holds its next sandbox ready."""
    deadline = time.monotonic() + timeout_s
    while core.describe()["pool"]["ready"] < 1:
        assert time.monotonic() < deadline, core.describe()
        time.sleep(0.02)


def test_close_destroys_the_sandbox_in_use_and_the_one_prepared(repo, backend):
    job = probe_job(repo, isolation="subtask", backend="process", subtasks=1)
    core = started_core(job, backend)
    wait_prepared(core)
    assert len(backend.owned()) == 2
    owners = {owner for _, owner in backend.owned()}
    # Owned by this process (a sweep reaps them once it is gone), as a worker's one sandbox is.
    assert len(owners) == 1 and owners.pop().endswith("/w-1/pool")
    core.close()
    assert backend.owned() == []


def test_close_while_the_next_sandbox_is_being_prepared_leaves_nothing(repo, backend):
    job = probe_job(repo, isolation="subtask", backend="process", subtasks=1)
    core = started_core(job, backend)
    core.close()  # the pool is still preparing the second sandbox: it stops and destroys it
    assert backend.owned() == []


def test_a_missing_upload_directory_fails_the_start_with_a_config_error_not_a_hang(repo, backend):
    job = probe_job(repo, isolation="subtask", backend="process")
    shutil.rmtree(repo)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="does not exist"):
        started_core(job, backend)
    assert time.monotonic() - started < 30
    assert backend.owned() == []


def test_a_job_whose_sandboxes_cannot_be_prepared_fails_with_the_reason(repo, backend, tmp_path):
    job = probe_job(repo, isolation="subtask", backend="process", workers=1)
    shutil.rmtree(repo)
    started = time.monotonic()
    with pytest.raises(SwarmError, match="does not exist"):
        run_probe_job(job, backend.create, tmp_path / "out")
    assert time.monotonic() - started < 60
    assert backend.owned() == []


def test_a_next_sandbox_that_cannot_be_prepared_fails_that_subtask_run(repo, backend):
    job = probe_job(repo, isolation="subtask", backend="process", subtasks=3)
    core = started_core(job, backend)
    try:
        first, _ = core.run(Subtask("s-0", 0, job.decomposition.tasks[0]))
        wait_prepared(core)
        shutil.rmtree(repo)  # the next preparations cannot upload it any more
        second, _ = core.run(Subtask("s-1", 1, job.decomposition.tasks[1]))  # prepared before
        assert first.ok and second.ok
        started = time.monotonic()
        with pytest.raises(ConfigError, match="does not exist"):
            core.run(Subtask("s-2", 2, job.decomposition.tasks[2]))
        assert time.monotonic() - started < 60
        assert core.describe()["pool"]["failures"] >= 1
    finally:
        core.close()
    assert backend.owned() == []


def test_a_failing_create_is_a_sandbox_error_of_the_start(repo, backend):
    plan = WorkerPlan.for_job(probe_job(repo, isolation="subtask", backend="process"), None)

    def refuse(spec: SandboxSpec) -> Sandbox:
        raise SandboxError("the engine refused the sandbox", image=spec.image)

    with pytest.raises(SandboxError, match="refused"):
        WorkerCore("w-1", plan, refuse).start()
    assert backend.owned() == []


def test_adopting_a_warm_subtask_worker_gives_the_new_job_its_repository_in_every_sandbox(
    repo, backend, tmp_path
):
    warm = started_core(probe_job(repo, isolation="subtask", backend="process"), backend, "warm-1")
    try:
        wait_prepared(warm)  # prepared for the warm-up job's repository
        other = probe_repo(tmp_path / "other")
        (other / "other.txt").write_text("the adopting job's own file\n")
        job = probe_job(other, isolation="subtask", backend="process", subtasks=3)
        events = warm.adopt(WorkerPlan.for_job(job, None), "w-7")
        assert [event.phase.value for event in events] == ["provision"]
        results = [warm.run(Subtask(f"s-{i}", i, task))[0] for i, task in enumerate(job.decomposition.tasks)]
        for result in results:
            probe = json.loads(result.output_tail.split("PROBE ", 1)[1].splitlines()[0])
            assert "other.txt" in probe["repo"] and probe["marks"] == [], probe
        assert len({result.sandbox_id for result in results}) == 3
    finally:
        warm.close()
    assert backend.owned() == []


def test_a_warm_worker_of_one_isolation_is_not_adopted_by_a_job_of_the_other(repo, backend):
    warm = started_core(probe_job(repo, isolation="worker", backend="process"), backend, "warm-1")
    try:
        plan = WorkerPlan.for_job(probe_job(repo, isolation="subtask", backend="process"), None)
        with pytest.raises(SandboxError, match="isolation"):
            warm.adopt(plan, "w-1")
    finally:
        warm.close()
    assert backend.owned() == []


# --- a packed upload --------------------------------------------------------------------------------
class RecordingSandbox(SandboxWrapper):
    """A backend's sandbox that notes every archive unpacked into it."""

    def __init__(self, inner: Sandbox, unpacked: list[bytes]) -> None:
        super().__init__(inner)
        self._unpacked = unpacked

    def upload_archive(self, data: bytes, remote_dir: str) -> None:
        self._unpacked.append(data)
        super().upload_archive(data, remote_dir)


def test_a_subtask_worker_fetches_a_packed_upload_once_for_every_fresh_sandbox(repo, backend):
    archive = pack_directory(repo)
    fetches: list[int] = []

    def fetch() -> bytes:
        fetches.append(1)
        return archive

    job = dataclasses.replace(
        probe_job(repo, isolation="subtask", backend="process", subtasks=3),
        upload=UploadSource.from_fetch(fetch, size=len(archive)),
    )
    shutil.rmtree(repo)  # the worker has only the bytes, as one on another machine would
    unpacked: list[bytes] = []
    plan = WorkerPlan.for_job(job, None)
    core = WorkerCore("w-1", plan, lambda spec: RecordingSandbox(backend.create(spec), unpacked))
    try:
        core.start()
        results = [core.run(Subtask(f"s-{i}", i, task))[0] for i, task in enumerate(job.decomposition.tasks)]
        wait_prepared(core)
    finally:
        core.close()
    for result in results:
        assert result.ok, (result.error, result.output_tail)
        probe = json.loads(result.output_tail.split("PROBE ", 1)[1].splitlines()[0])
        assert set(REPO_FILES) <= set(probe["repo"]) and probe["marks"] == [], probe
    assert len({result.sandbox_id for result in results}) == 3
    # Every sandbox (three used, one more prepared) got the very bytes fetched once.
    assert len(fetches) == 1 and core.upload_loads == 1
    assert len(unpacked) >= 4 and all(data is archive for data in unpacked)
    assert backend.owned() == []


def test_a_worker_isolation_worker_loads_its_upload_once_and_keeps_nothing(repo, backend):
    data = pack_directory(repo)
    job = dataclasses.replace(
        probe_job(repo, isolation="worker", backend="process", subtasks=2),
        upload=UploadSource.from_archive(data),
    )
    core = WorkerCore("w-1", WorkerPlan.for_job(job, None), backend.create)
    try:
        core.start()
        results = [core.run(Subtask(f"s-{i}", i, task))[0] for i, task in enumerate(job.decomposition.tasks)]
    finally:
        core.close()
    assert all(result.ok for result in results)
    assert core.upload_loads == 1 and core._kept_upload is None
    assert backend.owned() == []


# --- Docker ----------------------------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["subtask", "worker"])
def test_in_docker_only_worker_isolation_lets_a_subtask_see_what_an_earlier_one_left(
    isolation, docker_client, tmp_path
):
    from rayflow.sandbox.docker_backend import DockerBackend
    from rayflow.sandbox.image import build_sandbox_image
    from rayflow.sandbox.spec import OWNER_LABEL

    build_sandbox_image()
    backend = DockerBackend(docker_client)
    repo = probe_repo(tmp_path / "repo")
    job = probe_job(
        repo, isolation=isolation, backend="docker", subtasks=4, mark_dirs=DOCKER_MARKS,
        limits=Limits(cpus=0.5, memory_bytes=256 * MIB),
    )
    try:
        outcome, _ = run_probe_job(job, backend.create, tmp_path / "out")
        if isolation == "subtask":
            check_isolated(outcome, job)
        else:
            check_shared(outcome)
        assert backend.flush(120.0)
        left = [
            container.name
            for container in docker_client.containers.list(all=True, filters={"label": OWNER_LABEL})
            if container.labels.get("rayflow.job") == job.name
        ]
        assert left == []
    finally:
        # Only this job's workers' sandboxes, should any be left after a failure.
        backend.reap(lambda owner: f"/{job.name}-w" not in owner)
        backend.close()
