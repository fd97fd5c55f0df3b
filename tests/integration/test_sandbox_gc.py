"""Garbage collection of sandboxes whose owner process died, on real backends and real processes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayflow.errors import ConfigError
from rayflow.sandbox.backend import SandboxBackend
from rayflow.sandbox.gc import (
    collect_garbage,
    current_process_owner,
    owner_alive_by_pid,
    parse_owner,
    process_owner,
    reap_on_startup,
)
from rayflow.sandbox.spec import MIB, Limits, SandboxSpec
from rayflow.views.sandbox_console import gc_command
from rayflow.wire.procfs import start_time

pytestmark = pytest.mark.integration

LIMITS = Limits(memory_bytes=256 * MIB, disk_bytes=16 * MIB, wall_time_s=600.0)
GONE_WITHIN_S = 30.0

#: Creates one sandbox owned by itself, prints its id, then forks a holder that keeps every pipe
#: of the sandbox open (as a forked worker child would), so the sandbox outlives its owner
#: unless the backend ties it to the owner's life.
CREATOR = """
import json, os, sys
from pathlib import Path
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.spec import MIB, Limits, SandboxSpec
from rayflow.views.sandbox_console import gc_command
kind, registry = sys.argv[1], Path(sys.argv[2])
if kind == "process":
    from rayflow.sandbox.process_backend import ProcessBackend
    backend = ProcessBackend(registry_dir=registry)
elif kind == "local":
    from rayflow.sandbox.local_backend import LocalBackend
    backend = LocalBackend(registry_dir=registry)
else:
    from rayflow.sandbox.docker_backend import DockerBackend
    backend = DockerBackend(build_image=False)
limits = Limits(memory_bytes=256 * MIB, disk_bytes=16 * MIB, wall_time_s=600.0)
sandbox = backend.create(SandboxSpec(owner=current_process_owner(), limits=limits))
holder = os.fork()
if holder == 0:
    os.read(0, 1)
    os._exit(0)
print(json.dumps({"id": sandbox.id, "owner": sandbox.spec.owner, "holder": holder}), flush=True)
os.read(0, 1)
"""


@dataclass
class Orphan:
    """A sandbox whose creating process was killed."""

    id: str
    owner: str
    holder: int
    stdin: object


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_WITHIN_S
    while start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def orphan_of(tmp_path: Path) -> Iterator:
    """Run the creator for a backend kind, kill it with SIGKILL, return what it left."""
    made: list[Orphan] = []

    def make(kind: str) -> Orphan:
        creator = subprocess.Popen(
            [sys.executable, "-c", CREATOR, kind, str(tmp_path / "registry")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert creator.stdout is not None
        line = creator.stdout.readline()
        assert line, "the creator exited before creating its sandbox"
        info = json.loads(line)
        creator.send_signal(signal.SIGKILL)
        creator.wait()
        orphan = Orphan(info["id"], info["owner"], info["holder"], creator.stdin)
        made.append(orphan)
        return orphan

    yield make
    for orphan in made:
        orphan.stdin.close()  # type: ignore[attr-defined]
        wait_gone(orphan.holder)


def process_backend(tmp_path: Path) -> SandboxBackend:
    from rayflow.sandbox.process_backend import ProcessBackend

    return ProcessBackend(registry_dir=tmp_path / "registry")


def local_backend(tmp_path: Path) -> SandboxBackend:
    if shutil.which("bwrap") is None or os.geteuid() != 0:
        pytest.skip("needs bwrap and root")
    from rayflow.sandbox.local_backend import LocalBackend

    return LocalBackend(registry_dir=tmp_path / "registry")


# --- owner strings, judged against real processes --------------------------------------------
def test_current_process_owner_names_this_process() -> None:
    parsed = parse_owner(current_process_owner("pool-1"))
    assert parsed is not None
    assert (parsed.pid, parsed.suffix, str(parsed.start_ticks)) == (
        os.getpid(),
        "pool-1",
        start_time(os.getpid()),
    )


def test_owner_of_a_running_process_is_alive() -> None:
    assert owner_alive_by_pid(current_process_owner())


def test_owner_of_an_exited_process_is_gone() -> None:
    child = subprocess.Popen(["sleep", "60"])
    owner = process_owner(child.pid)
    child.kill()
    child.wait()
    assert not owner_alive_by_pid(owner)


def test_owner_whose_pid_now_names_another_process_is_gone() -> None:
    parsed = parse_owner(current_process_owner())
    assert parsed is not None
    reused = current_process_owner().replace(f":{parsed.start_ticks}", f":{parsed.start_ticks + 1}")
    assert not owner_alive_by_pid(reused)


def test_owner_from_an_earlier_boot_is_gone() -> None:
    assert not owner_alive_by_pid(current_process_owner(), boot="000000000000")


def test_owner_on_another_host_counts_as_alive() -> None:
    child = subprocess.Popen(["sleep", "60"])
    owner = process_owner(child.pid)
    child.kill()
    child.wait()
    assert owner_alive_by_pid(owner, host="some-other-machine")


def test_owner_of_another_convention_counts_as_alive() -> None:
    assert owner_alive_by_pid("worker-7")


def test_naming_a_process_that_does_not_run_is_refused() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(ConfigError):
        process_owner(child.pid)


# --- collection on real backends -------------------------------------------------------------
def test_gc_removes_a_process_sandbox_whose_owner_was_killed(tmp_path: Path, orphan_of) -> None:
    backend = process_backend(tmp_path)
    orphan = orphan_of("process")
    assert orphan.id in dict(backend.owned())
    assert collect_garbage([backend], owner_alive_by_pid) == [orphan.id]
    assert orphan.id not in dict(backend.owned())


def test_gc_removes_a_local_sandbox_whose_owner_was_killed(tmp_path: Path, orphan_of) -> None:
    backend = local_backend(tmp_path)
    orphan = orphan_of("local")
    records = {r.id: r for r in backend.registry.records()}
    cgroups = records[orphan.id].cgroups
    assert collect_garbage([backend], owner_alive_by_pid) == [orphan.id]
    assert backend.registry.records() == []
    assert not any(os.path.isdir(path) for path in cgroups)


def test_gc_keeps_a_sandbox_whose_owner_is_alive(tmp_path: Path, orphan_of) -> None:
    backend = process_backend(tmp_path)
    orphan = orphan_of("process")
    mine = backend.create(SandboxSpec(owner=current_process_owner(), limits=LIMITS))
    try:
        assert collect_garbage([backend], owner_alive_by_pid) == [orphan.id]
        assert mine.id in dict(backend.owned())
        assert mine.exec(["true"]).ok
    finally:
        mine.destroy()


def test_reap_on_startup_removes_only_dead_owners_sandboxes(tmp_path: Path, orphan_of) -> None:
    backend = process_backend(tmp_path)
    orphan = orphan_of("process")
    mine = backend.create(SandboxSpec(owner=current_process_owner(), limits=LIMITS))
    try:
        assert reap_on_startup(backend) == [orphan.id]
        assert set(dict(backend.owned())) == {mine.id}
    finally:
        mine.destroy()


def test_gc_command_prints_what_it_removed(
    tmp_path: Path, orphan_of, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rayflow.sandbox import process_backend as process

    monkeypatch.setattr(process, "default_registry_dir", lambda: tmp_path / "registry")
    orphan = orphan_of("process")
    code = gc_command(["process"])
    out = capsys.readouterr().out
    assert code == 0
    assert orphan.id in out and "1 removed" in out


def test_gc_command_fails_on_an_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert gc_command(["firecracker"]) == 1


@pytest.mark.docker
@pytest.mark.skipif(importlib.util.find_spec("rayflow.sandbox.docker_backend") is None, reason="no docker backend")
def test_gc_removes_a_container_whose_owner_was_killed(orphan_of) -> None:
    from rayflow.sandbox.select import choose_backend

    try:
        backend = choose_backend("docker").backend
    except ConfigError as exc:
        pytest.skip(f"docker backend unavailable: {exc.message}")
    orphan = orphan_of("docker")
    try:
        assert orphan.id in collect_garbage([backend], owner_alive_by_pid)
        assert orphan.id not in dict(backend.owned())
    finally:
        backend.reap(lambda owner: owner != orphan.owner)
