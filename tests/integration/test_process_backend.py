"""``ProcessBackend``: real runtime processes, their working directories, registry and reaping."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayflow.errors import TransportError
from rayflow.sandbox.backend import SandboxBackend
from rayflow.sandbox.channel_sandbox import ChannelSandbox
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.sandbox.spec import MIB, OWNER_LABEL, Limits, SandboxSpec
from tests.process_support import wait_gone

pytestmark = pytest.mark.integration



@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProcessBackend]:
    made = ProcessBackend(registry_dir=tmp_path / "registry")
    yield made
    made.reap(lambda owner: False)


def spec(owner: str = "worker-1", **fields: object) -> SandboxSpec:
    return SandboxSpec(owner=owner, **fields)  # type: ignore[arg-type]


def workdir_of(sandbox: ChannelSandbox) -> Path:
    return Path(sandbox.exec('printf %s "$RAYFLOW_WORKDIR"').stdout.decode())


def test_the_backend_implements_the_backend_protocol(backend: ProcessBackend) -> None:
    assert isinstance(backend, SandboxBackend)
    assert (backend.name, backend.isolated) == ("process", False)


def test_create_exec_destroy_and_destroy_again(backend: ProcessBackend) -> None:
    sandbox = backend.create(spec())
    workdir = workdir_of(sandbox)
    assert sandbox.exec(["echo", "hi"]).stdout == b"hi\n"
    sandbox.destroy()
    sandbox.destroy()
    assert not workdir.exists()
    assert backend.owned() == []
    with pytest.raises(TransportError):
        sandbox.exec(["true"])


def test_the_sandbox_spec_carries_the_owner_label(backend: ProcessBackend) -> None:
    with backend.create(spec("job-7", labels={"team": "a"})) as sandbox:
        assert sandbox.spec.labels == {"team": "a", OWNER_LABEL: "job-7"}


def test_every_create_warns_that_there_is_no_isolation(
    backend: ProcessBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rayflow.sandbox.process_backend"), backend.create(spec()):
        pass
    assert any("NO isolation" in record.getMessage() for record in caplog.records)


def test_the_environment_is_the_spec_and_a_minimal_path(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_SECRET", "do-not-leak")
    with backend.create(spec(env={"TASK": "t1"})) as sandbox:
        result = sandbox.exec("echo $TASK:$HOST_SECRET:$PATH")
    assert result.stdout == b"t1::/usr/local/bin:/usr/bin:/bin\n"


def test_paths_under_the_spec_workdir_map_onto_the_sandbox_directory(backend: ProcessBackend) -> None:
    with backend.create(spec(workdir="/workspace")) as sandbox:
        sandbox.write_file("/workspace/src/main.py", b"print('hi')\n")
        assert sandbox.exec(["cat", "main.py"], cwd="/workspace/src").stdout == b"print('hi')\n"
        assert (workdir_of(sandbox) / "src" / "main.py").exists()


def test_the_memory_limit_bounds_a_command_address_space(backend: ProcessBackend) -> None:
    with backend.create(spec(limits=Limits(memory_bytes=256 * MIB))) as sandbox:
        result = sandbox.exec("ulimit -v")
        big = sandbox.exec(["python3", "-c", "bytearray(512 * 1024 * 1024)"])
    assert result.stdout == f"{256 * 1024}\n".encode()
    assert big.exit_code != 0
    assert b"MemoryError" in big.stderr


def test_destroy_kills_what_commands_left_running(backend: ProcessBackend) -> None:
    sandbox = backend.create(spec())
    pid = int(sandbox.exec("sleep 300 >/dev/null 2>&1 & echo $!").stdout)
    sandbox.destroy()
    assert wait_gone(pid)


def test_owned_lists_live_sandboxes_with_their_owner(backend: ProcessBackend) -> None:
    with backend.create(spec("job-a")) as first, backend.create(spec("job-b")) as second:
        assert sorted(backend.owned()) == sorted([(first.id, "job-a"), (second.id, "job-b")])


def test_reap_destroys_sandboxes_whose_owner_is_gone(backend: ProcessBackend) -> None:
    orphan = backend.create(spec("gone-worker"))
    keeper = backend.create(spec("live-worker"))
    try:
        orphan_dir = workdir_of(orphan)
        orphan_pid = orphan.ping()["pid"]
        reaped = backend.reap(lambda owner: owner == "live-worker")
        assert reaped == [orphan.id]
        assert backend.owned() == [(keeper.id, "live-worker")]
        assert wait_gone(orphan_pid)
        assert not orphan_dir.exists()
        assert keeper.exec(["true"]).ok
    finally:
        orphan.destroy()
        keeper.destroy()


def test_reap_finds_sandboxes_of_another_backend_instance(backend: ProcessBackend) -> None:
    # A restarted worker has a new backend object: the registry directory is what it shares.
    sandbox = backend.create(spec("crashed-worker"))
    try:
        fresh = ProcessBackend(registry_dir=backend.registry_dir)
        assert fresh.reap(lambda owner: False) == [sandbox.id]
        assert fresh.owned() == []
    finally:
        sandbox.destroy()
