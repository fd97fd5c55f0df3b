"""A job's upload as a source of packed bytes: a local directory, an archive, or a fetch; bounded in size;
and a job made ready for machines that do not share the driver's disk (``packed_job``)."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest

from rayflow.config import DEFAULT_MAX_UPLOAD_BYTES, load_config
from rayflow.errors import ConfigError
from rayflow.swarm.job import AgentRef, FileGlob, Job, Matts, TaskList, iter_task_payloads, packed_job
from rayflow.swarm.matts import MattsPlan
from rayflow.swarm.upload import UploadSource, pack_directory
from rayflow.swarm.worker_core import WorkerPlan
from rayflow.wire.archive import unpack_tree


def make_repo(root: Path) -> Path:
    for name in ("a.py", "pkg/b.py", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    return root


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_directory_source_is_packed_anew_on_every_load(tmp_path):
    repo = make_repo(tmp_path / "repo")
    source = UploadSource.from_directory(repo)
    assert source.live
    unpack_tree(source.load(), tmp_path / "first")
    (repo / "late.txt").write_text("added after the first load\n")
    unpack_tree(source.load(), tmp_path / "second")
    assert "late.txt" not in tree(tmp_path / "first")
    assert tree(tmp_path / "second") == tree(repo) and "late.txt" in tree(tmp_path / "second")


def test_a_missing_directory_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as caught:
        UploadSource.from_directory(tmp_path / "gone").load()
    assert str(tmp_path / "gone") in caught.value.message


def test_archive_and_fetch_sources_give_the_same_bytes_as_the_directory_packed_once(tmp_path):
    repo = make_repo(tmp_path / "repo")
    data = pack_directory(repo)
    calls = []

    def fetch() -> bytes:
        calls.append(1)
        return data

    archive = UploadSource.from_archive(data)
    fetched = UploadSource.from_fetch(fetch, size=len(data))
    assert not archive.live and not fetched.live
    assert archive.load() == data
    assert fetched.load() == data and len(calls) == 1  # the source itself keeps nothing
    shutil.rmtree(repo)
    unpack_tree(fetched.load(), tmp_path / "out")
    assert set(tree(tmp_path / "out")) == {"a.py", "pkg/b.py", "notes.txt"}


def test_an_upload_above_the_limit_is_refused_saying_how_big_it_was(tmp_path):
    repo = tmp_path / "big"
    repo.mkdir()
    (repo / "blob.bin").write_bytes(b"x" * 5000)
    with pytest.raises(ConfigError, match="5000 bytes") as caught:
        pack_directory(repo, max_bytes=4096)
    assert caught.value.details == {"size": 5000, "limit": 4096}
    # Small files, but their headers pack above the limit: refused after packing, with the packed size.
    many = tmp_path / "many"
    many.mkdir()
    for i in range(20):
        (many / f"f{i}").write_text("")
    with pytest.raises(ConfigError, match="packed") as packed:
        pack_directory(many, max_bytes=4096)
    assert packed.value.details["size"] > 4096
    with pytest.raises(ConfigError, match="over the upload limit"):
        UploadSource.from_archive(b"y" * 100, max_bytes=10)
    with pytest.raises(ConfigError, match="over the upload limit"):
        UploadSource.from_fetch(lambda: b"z" * 100, max_bytes=10).load()


def test_the_limit_defaults_to_512_mib_and_is_configurable():
    assert DEFAULT_MAX_UPLOAD_BYTES == 512 * 1024 * 1024
    assert load_config(env={}).max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    assert load_config(env={"RAYFLOW_MAX_UPLOAD_BYTES": "1024"}).max_upload_bytes == 1024
    with pytest.raises(ConfigError):
        load_config(env={"RAYFLOW_MAX_UPLOAD_BYTES": "0"})


def test_a_fetch_that_returns_something_else_than_bytes_is_a_config_error():
    with pytest.raises(ConfigError, match="not bytes"):
        UploadSource.from_fetch(lambda: "text").load()  # type: ignore[arg-type, return-value]


class CountingFetch:
    """A fetch that pickles (as one handed to Ray actors must) and counts its calls per copy."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


def test_a_plan_carries_the_source_and_a_directory_path_becomes_a_directory_source(tmp_path):
    repo = make_repo(tmp_path / "repo")
    plain = Job(AgentRef.shell("true"), TaskList([{}]), upload=str(repo))
    plan = WorkerPlan.for_job(plain, None)
    assert plan.upload == UploadSource.from_directory(str(repo.resolve()))
    source = UploadSource.from_fetch(CountingFetch(b"data"), size=4)
    plan = WorkerPlan.for_job(dataclasses.replace(plain, upload=source), None)
    assert plan.upload is source
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.upload.kind == "fetch" and copy.upload.fetch.calls == 0


def test_packed_job_packs_the_directory_once_and_lists_a_pattern_a_glob(tmp_path):
    repo = make_repo(tmp_path / "repo")
    kept: list[bytes] = []

    def keep(data: bytes) -> UploadSource:
        kept.append(data)
        return UploadSource.from_fetch(CountingFetch(data), size=len(data))

    job = Job(AgentRef.shell("cat"), FileGlob(str(repo), "**/*.py"), task={"x": 1})
    expected = list(iter_task_payloads(job.decomposition, job.task))
    packed = packed_job(job, keep)
    assert len(kept) == 1 and packed.upload.kind == "fetch" and packed.upload.size == len(kept[0])
    assert isinstance(packed.decomposition, TaskList)
    assert (
        [dict(t) for t in packed.decomposition.tasks] == expected == [{"path": "a.py"}, {"path": "pkg/b.py"}]
    )
    assert packed.name == job.name
    # Nothing in it names the directory any more: it may go, and the job still rebuilds (MaTTS
    # replaces its agent on the coordinator, which validates the job again).
    shutil.rmtree(repo)
    sequential = MattsPlan.for_job(dataclasses.replace(packed, matts=Matts("sequential", r=2)))
    assert sequential.job.upload is packed.upload
    unpack_tree(packed.upload.load(), tmp_path / "out")
    assert set(tree(tmp_path / "out")) == {"a.py", "pkg/b.py", "notes.txt"}
    # Packed once: packing again keeps it.
    assert packed_job(packed, keep) is packed and len(kept) == 1


def test_packed_job_keeps_a_pattern_b_glob_for_the_sandbox_and_stores_archive_bytes(tmp_path):
    repo = make_repo(tmp_path / "repo")
    kept: list[bytes] = []

    def keep(data: bytes) -> UploadSource:
        kept.append(data)
        return UploadSource.from_fetch(CountingFetch(data), size=len(data))

    job_b = Job(AgentRef.shell("cat"), FileGlob(str(repo), "*.py"), pattern="B")
    packed = packed_job(job_b, keep)
    assert isinstance(packed.decomposition, FileGlob) and packed.upload.kind == "fetch"
    data = pack_directory(repo)
    in_memory = Job(AgentRef.shell("cat"), TaskList([{}]), upload=UploadSource.from_archive(data))
    assert packed_job(in_memory, keep).upload.kind == "fetch" and kept[-1] == data
    nothing = Job(AgentRef.shell("cat"), TaskList([{}]))
    assert packed_job(nothing, keep) is nothing


def test_packed_job_refuses_a_repository_above_the_limit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "blob.bin").write_bytes(b"x" * 3000)
    job = Job(AgentRef.shell("true"), TaskList([{}]), upload=str(repo))
    with pytest.raises(ConfigError, match="3000 bytes"):
        packed_job(job, lambda data: pytest.fail("nothing may be stored"), max_bytes=1000)
