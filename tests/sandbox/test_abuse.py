"""Hostile commands in sandboxes of the ``docker`` and ``local`` backends: each is contained and reported.

Each test plays one abuse (escaping the filesystem, reading host secrets, reaching other sandboxes
or host ports, exhausting processes, memory, CPU, disk, wall time or output) and checks two
things: the host and other sandboxes are untouched, and the exec result says what happened.
Network probes go only to 127.0.0.1, to servers on a bridge gateway or veth host end a sandbox of
this module owns, or to a sandbox of this module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import TransportError
from rayflow.sandbox.spec import MIB, KillReason, Limits, Mount, NetworkPolicy, SandboxSpec
from tests.net_support import DETACHED_LISTENER, TCP_PROBE, HostServer

pytestmark = [pytest.mark.integration]

OWNER = f"test-abuse-{secrets.token_hex(4)}"
LIMITS = Limits(cpus=1.0, memory_bytes=96 * MIB, pids=48, disk_bytes=8 * MIB, wall_time_s=120.0)

#: Forks sleeping children until the kernel refuses; prints how many it got, exits 3.
FORK_BOMB = """
import os, signal, sys, time
children = []
try:
    for _ in range(100_000):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except OSError as exc:
    print(len(children), type(exc).__name__)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
sys.exit(3)
"""
#: Allocates and touches 16 MiB blocks forever.
MEMORY_BOMB = """
blocks = []
while True:
    blocks.append(bytearray(16 * 1024 * 1024))
"""
#: Spins for 2 s of wall time; prints the CPU seconds it got per wall second.
CPU_HOG = """
import os, time
start, cpu = time.monotonic(), os.times()
while time.monotonic() - start < 2.0:
    pass
now = os.times()
print((now.user + now.system - cpu.user - cpu.system) / (time.monotonic() - start))
"""


def _docker_backend(request: pytest.FixtureRequest) -> Any:
    from rayflow.sandbox.docker_backend import DockerBackend

    client = request.getfixturevalue("docker_client")
    backend = DockerBackend(client)
    backend.ensure_image(SandboxSpec(owner=OWNER).image)
    return backend


def _local_backend(request: pytest.FixtureRequest) -> Any:
    if shutil.which("bwrap") is None or os.geteuid() != 0:
        pytest.skip("the local backend test needs bwrap and root")
    from rayflow.sandbox.local_backend import LocalBackend

    return LocalBackend(registry_dir=request.getfixturevalue("tmp_path_factory").mktemp("registry"))


@pytest.fixture(scope="module", params=[pytest.param("docker", marks=pytest.mark.docker), "local"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    make = _docker_backend if request.param == "docker" else _local_backend
    backend = make(request)
    yield backend
    backend.reap(lambda owner: owner != OWNER)


@pytest.fixture
def sandbox_factory(backend: Any) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        fields: dict[str, Any] = {"owner": OWNER, "limits": LIMITS, **overrides}
        sandbox = backend.create(SandboxSpec(**fields))
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.destroy()


def python(sandbox: Any, script: str, *args: str, timeout_s: float = 60.0) -> Any:
    return sandbox.exec(["python3", "-c", script, *args], timeout_s=timeout_s)


def _limit_applied(sandbox: Any, limit: str) -> bool:
    """False only for a local sandbox whose cgroup did not accept ``limit``."""
    applied = getattr(sandbox, "limits_applied", None)
    return applied is None or str(applied.get(limit, "")).startswith("cgroup")


# --- filesystem -----------------------------------------------------------------------------------
def test_writes_outside_the_scratch_space_fail(sandbox_factory: Callable[..., Any], tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "input.txt").write_text("given")
    sandbox = sandbox_factory(mounts=(Mount(str(shared), "/data"),))
    for target in ("/etc/rayflow-probe", "/usr/rayflow-probe", "/rayflow-probe", "/data/rayflow-probe"):
        result = sandbox.exec(["sh", "-c", f"echo x > {target}"])
        assert result.exit_code != 0, target
    assert sandbox.read_file("/data/input.txt") == b"given"
    assert sandbox.exec("echo ok > /workspace/f && cat /workspace/f").stdout == b"ok\n"
    assert not (shared / "rayflow-probe").exists() and not Path("/usr/rayflow-probe").exists()


def test_a_host_secret_outside_the_mounts_is_unreadable(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    secret = tmp_path / "secret.txt"
    token = secrets.token_hex(16)
    secret.write_text(token)
    secret.chmod(0o644)
    sandbox = sandbox_factory(mounts=(Mount(str(shared), "/data"),))
    attempts = f"cat {secret}; cat /data/../secret.txt; cat /proc/1/root{secret}; grep -rs {token} /data /tmp"
    result = sandbox.exec(["sh", "-c", attempts])
    assert token.encode() not in result.stdout + result.stderr
    with pytest.raises(Exception) as caught:
        sandbox.read_file(str(secret))
    assert token not in str(caught.value)


# --- network --------------------------------------------------------------------------------------
def test_another_sandbox_on_loopback_is_unreachable(sandbox_factory: Callable[..., Any]) -> None:
    first, second = sandbox_factory(), sandbox_factory()
    port = str(20000 + secrets.randbelow(20000))
    assert python(first, DETACHED_LISTENER, "127.0.0.1", port, "here").stdout == b"listening\n"
    assert python(first, TCP_PROBE, "127.0.0.1", port).stdout == b"here\n"
    assert python(second, TCP_PROBE, "127.0.0.1", port).stdout == b"ConnectionRefusedError\n"


def test_another_sandbox_on_its_bridge_is_unreachable(
    backend: Any, sandbox_factory: Callable[..., Any], docker_client_if_docker: Any
) -> None:
    policy = NetworkPolicy.hub_only("127.0.0.1", 9)
    first, second = sandbox_factory(network=policy), sandbox_factory(network=policy)
    if backend.name == "docker":
        networks = docker_client_if_docker.api.inspect_container(first.container_id)["NetworkSettings"][
            "Networks"
        ]
        first_ip = next(n["IPAddress"] for n in networks.values())
        # Both bridges route through the host: the packet is dropped there.
        blocked = {b"TimeoutError\n"}
    else:
        first_ip = first.network_address
        # A local sandbox has no route off its /30 but to allowed endpoints: refused or dropped.
        blocked = {b"TimeoutError\n", b"OSError\n"}
    assert python(first, DETACHED_LISTENER, "0.0.0.0", "7001", "here").stdout == b"listening\n"
    assert python(first, TCP_PROBE, first_ip, "7001").stdout == b"here\n"
    assert python(second, TCP_PROBE, first_ip, "7001").stdout in blocked


def test_host_ports_other_than_the_hub_are_unreachable(
    backend: Any, sandbox_factory: Callable[..., Any]
) -> None:
    hub, other = hub_server("127.0.0.1"), hub_server("127.0.0.1")
    try:
        policy = NetworkPolicy.hub_only("127.0.0.1", hub.port)
        sandbox = sandbox_factory(network=policy)
        gateway = sandbox.network_gateway
        assert python(sandbox, TCP_PROBE, gateway, str(hub.port)).stdout == b"hub\n"
        assert python(sandbox, TCP_PROBE, gateway, str(other.port)).stdout == b"TimeoutError\n"
        # Even a port the host opens on the sandbox's own bridge address stays closed to it.
        on_bridge = hub_server(gateway)
        try:
            assert python(sandbox, TCP_PROBE, gateway, str(on_bridge.port)).stdout == b"TimeoutError\n"
        finally:
            on_bridge.close()
    finally:
        hub.close()
        other.close()


# --- resources ------------------------------------------------------------------------------------
def test_a_fork_bomb_hits_the_pids_limit_and_is_reported(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory()
    if not _limit_applied(sandbox, "pids"):
        pytest.skip("no pids cgroup for this sandbox")
    result = python(sandbox, FORK_BOMB)
    forked = int(result.stdout.split()[0])
    assert result.exit_code == 3 and result.killed is KillReason.PIDS
    assert forked < LIMITS.pids  # type: ignore[operator]
    assert sandbox.exec("echo alive").stdout == b"alive\n"


def test_a_memory_bomb_is_killed_and_reported_as_oom(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory()
    result = python(sandbox, MEMORY_BOMB)
    assert result.killed is KillReason.OOM and result.exit_code != 0
    assert sandbox.exec("echo alive").stdout == b"alive\n"


def test_a_cpu_hog_gets_about_its_cpu_share(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory(limits=Limits(cpus=0.5, memory_bytes=96 * MIB, pids=48, wall_time_s=120.0))
    if not _limit_applied(sandbox, "cpu"):
        pytest.skip("no cpu cgroup for this sandbox")
    ratio = float(python(sandbox, CPU_HOG).stdout)
    print(f"cpu share under a 0.5 CPU limit: {ratio:.3f}")
    # Generous: the point is the ceiling; a busy two-core machine may give it less.
    assert 0.05 < ratio < 0.75


def test_filling_the_disk_ends_in_enospc_and_the_sandbox_stays_usable(
    sandbox_factory: Callable[..., Any],
) -> None:
    sandbox = sandbox_factory()
    full = sandbox.exec("dd if=/dev/zero of=/workspace/fill bs=1M count=64")
    assert full.exit_code != 0 and b"No space left on device" in full.stderr
    assert (
        sandbox.exec("rm /workspace/fill && echo freed > /workspace/f && cat /workspace/f").stdout
        == b"freed\n"
    )


def test_running_past_the_wall_time_destroys_the_sandbox(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory(limits=Limits(memory_bytes=96 * MIB, pids=48, wall_time_s=2.0))
    result = sandbox.exec(["sleep", "60"], timeout_s=90)
    assert result.killed in (KillReason.SANDBOX_DESTROYED, KillReason.TIMEOUT)
    with pytest.raises(TransportError):
        sandbox.exec(["true"])


def test_huge_output_is_capped_and_flagged_truncated(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory()
    result = sandbox.exec(["yes"], timeout_s=60)
    assert result.truncated and result.killed is KillReason.OUTPUT_LIMIT
    assert 0 < len(result.stdout) <= 32 * MIB
    assert sandbox.exec("echo alive").stdout == b"alive\n"


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def docker_client_if_docker(backend: Any) -> Any:
    return getattr(backend, "client", None)


def hub_server(host: str) -> HostServer:
    """A TCP server on the host answering "hub" (only the test connects to it)."""
    return HostServer(host, socket.SOCK_STREAM, b"hub")
