"""The local (bubblewrap) backend against real namespaces, cgroups and processes."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayflow.sandbox.local_backend import LocalBackend, Registry, proc_start_ticks
from rayflow.sandbox.spec import MIB, KillReason, Limits, NetworkPolicy, SandboxSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs bwrap and root"),
]

SMALL = Limits(memory_bytes=64 * MIB, pids=32, disk_bytes=8 * MIB, wall_time_s=60.0)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(registry_dir=tmp_path / "registry")
    yield backend
    backend.reap(lambda owner: False)


def spec(**overrides: object) -> SandboxSpec:
    return SandboxSpec(**{"owner": "test-worker", "limits": SMALL, **overrides})  # type: ignore[arg-type]


def sh(backend: LocalBackend, script: str, **spec_overrides: object) -> tuple[int, str, str]:
    result = backend.run_once(spec(**spec_overrides), ["/bin/sh", "-c", script], timeout_s=60)
    return result.exit_code, result.stdout.decode(), result.stderr.decode()


# --- isolation, probed with plain commands ---------------------------------------------------
def test_command_runs_as_an_unprivileged_sandbox_user(backend: LocalBackend) -> None:
    code, out, _ = sh(backend, "id -u; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status")
    uid, caps, nnp = out.split("\n")[:3]
    assert code == 0
    assert int(uid) >= 1_700_000_000
    assert caps.split()[1] == "0000000000000000"
    assert nnp.split()[1] == "1"


def test_host_filesystem_is_read_only(backend: LocalBackend) -> None:
    code, _, err = sh(backend, "touch /usr/rayflow-probe")
    assert code != 0 and ("Read-only" in err or "Permission denied" in err)
    assert not Path("/usr/rayflow-probe").exists()


def test_tmp_and_workdir_are_writable_and_private(backend: LocalBackend) -> None:
    code, out, _ = sh(backend, "echo a > /tmp/f && echo b > /workspace/g && cat /tmp/f /workspace/g && pwd")
    assert code == 0 and out.split() == ["a", "b", "/workspace"]
    assert not Path("/workspace/g").exists()


def test_scratch_space_is_size_limited(backend: LocalBackend) -> None:
    code, _, err = sh(backend, "head -c 16777216 /dev/zero > /workspace/big")
    assert code != 0 and "No space left" in err


def test_secret_under_root_is_not_visible(backend: LocalBackend) -> None:
    secret = Path("/root") / f"rayflow-secret-{os.getpid()}"
    secret.write_text("s3cret")
    try:
        _, out, _ = sh(backend, f"cat {secret} 2>/dev/null || echo unreadable; ls -a /root")
    finally:
        secret.unlink()
    lines = out.split()
    assert lines[0] == "unreadable"
    assert secret.name not in lines[1:]


def test_secret_under_a_host_temp_dir_is_not_visible(backend: LocalBackend, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    code, out, _ = sh(backend, f"cat {secret} 2>&1")
    assert code != 0 and "s3cret" not in out


def test_shadow_and_the_repository_are_not_mounted(backend: LocalBackend) -> None:
    repo = Path(__file__).resolve().parents[2]
    _, out, _ = sh(backend, f"ls /etc/shadow {repo} 2>&1; true")
    assert out.count("No such file") == 2


def test_only_loopback_network(backend: LocalBackend) -> None:
    code, out, _ = sh(backend, "ls /sys/class/net 2>/dev/null || cat /proc/net/dev")
    names = {line.split(":")[0].strip() for line in out.splitlines() if ":" in line}
    assert code == 0 and names == {"lo"}


def test_pid_namespace_shows_only_sandbox_processes(backend: LocalBackend) -> None:
    code, out, _ = sh(backend, "ps -e -o pid=,comm=")
    commands = [line.split()[1] for line in out.strip().splitlines()]
    assert code == 0
    assert commands == ["bwrap", "sh", "ps"]


def test_environment_is_cleared_to_the_spec(backend: LocalBackend) -> None:
    os.environ["RAYFLOW_HOST_ONLY"] = "leak"
    try:
        _, out, _ = sh(backend, "env", env={"TASK": "t1"})
    finally:
        del os.environ["RAYFLOW_HOST_ONLY"]
    assert "TASK=t1" in out and "RAYFLOW_HOST_ONLY" not in out


def test_memory_bomb_is_killed_and_reported_as_oom(backend: LocalBackend) -> None:
    result = backend.run_once(
        spec(), ["python3", "-c", "b = bytearray(512 * 1024 * 1024); print(len(b))"], timeout_s=60
    )
    assert result.killed is KillReason.OOM
    assert result.stdout == b""


def test_fork_bomb_is_contained_by_the_pids_limit(backend: LocalBackend) -> None:
    result = backend.run_once(spec(), ["/bin/sh", "-c", "for i in $(seq 100); do sleep 30 & done; wait"])
    assert result.killed is KillReason.PIDS
    assert b"fork" in result.stderr.lower()


def test_timeout_kills_the_whole_sandbox(backend: LocalBackend) -> None:
    result = backend.run_once(spec(), ["/bin/sh", "-c", "sleep 60 & sleep 60"], timeout_s=0.3)
    assert result.killed is KillReason.TIMEOUT
    assert backend.owned() == []


def test_a_hub_only_one_off_sandbox_sees_one_interface_and_is_gone_after(backend: LocalBackend) -> None:
    policy = NetworkPolicy.hub_only("127.0.0.1", 7000)
    result = backend.run_once(spec(network=policy), ["cat", "/proc/net/dev"])
    names = {line.split(":")[0].strip() for line in result.stdout.decode().splitlines() if ":" in line}
    assert result.exit_code == 0 and names == {"lo", "eth0"}
    assert backend.owned() == []


def test_finished_sandbox_leaves_no_cgroup_and_no_record(backend: LocalBackend) -> None:
    before = _rayflow_cgroups()
    sh(backend, "true")
    assert _rayflow_cgroups() == before
    assert backend.registry.records() == []


def _rayflow_cgroups() -> set[str]:
    found = set()
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        found.update(os.path.join(root, d) for d in dirs if d.startswith("rayflow-rf-"))
    return found


# --- the runtime over the channel ----------------------------------------------------------
def test_create_exec_destroy(backend: LocalBackend) -> None:
    sandbox = backend.create(spec())
    try:
        result = sandbox.exec(["echo", "hello"])
    finally:
        sandbox.destroy()
    assert result.ok and result.stdout == b"hello\n"


def test_destroy_leaves_no_process_no_cgroup_and_is_idempotent(backend: LocalBackend) -> None:
    before = _rayflow_cgroups()
    sandbox = backend.create(spec())
    sandbox.exec(["/bin/sh", "-c", "sleep 60 >/dev/null 2>&1 &"])
    (record,) = backend.registry.records()
    assert _rayflow_cgroups() != before
    sandbox.destroy()
    sandbox.destroy()
    assert proc_start_ticks(record.pid) is None
    assert proc_start_ticks(record.init_pid) is None
    assert _rayflow_cgroups() == before
    assert backend.owned() == []


def test_exec_reports_oom_from_the_cgroup(backend: LocalBackend) -> None:
    with backend.create(spec(limits=Limits(memory_bytes=96 * MIB, pids=32))) as sandbox:
        result = sandbox.exec(["python3", "-c", "b = bytearray(512 * 1024 * 1024)"])
        assert result.killed is KillReason.OOM
        assert sandbox.exec(["true"]).ok


def test_owned_and_reap_find_sandboxes_of_dead_owners(backend: LocalBackend) -> None:
    alive = backend.create(spec())
    gone = backend.create(SandboxSpec(owner="dead-worker", limits=SMALL))
    try:
        assert sorted(o for _, o in backend.owned()) == ["dead-worker", "test-worker"]
        reaped = backend.reap(lambda owner: owner != "dead-worker")
        assert reaped == [gone.id]
        assert [i for i, _ in backend.owned()] == [alive.id]
    finally:
        alive.destroy()
        gone.destroy()


def test_registry_survives_a_new_backend_object(backend: LocalBackend) -> None:
    sandbox = backend.create(spec())
    try:
        other = LocalBackend(registry_dir=backend.registry.directory)
        assert other.owned() == [(sandbox.id, "test-worker")]
        assert other.reap(lambda owner: False) == [sandbox.id]
        assert not any(Registry.present(r) for r in backend.registry.records())
    finally:
        sandbox.destroy()


def test_limits_applied_names_the_mechanisms(backend: LocalBackend) -> None:
    with backend.create(spec()) as sandbox:
        applied = sandbox.limits_applied
    assert applied["disk"] == "tmpfs-size" and applied["wall_time"] == "timer"
    assert applied["memory"] in ("cgroup", "cgroup+swap", "rlimit-as")


def test_create_to_first_exec_latency(backend: LocalBackend) -> None:
    """Records the cold create-to-first-exec median (printed with -s); asserts only that it ran."""
    samples = []
    for _ in range(10):
        started = time.perf_counter()
        sandbox = backend.create(spec())
        try:
            assert sandbox.exec(["true"]).ok
            samples.append(time.perf_counter() - started)
        finally:
            sandbox.destroy()
    print(f"local create-to-first-exec p50 {statistics.median(samples) * 1000:.1f} ms")
    assert len(samples) == 10
