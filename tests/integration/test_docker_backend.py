"""The docker backend against a real engine: containers, attach streams, bridges and packet filter rules.

Every network probe goes only to servers this module starts on 127.0.0.1 or on the gateway
address of a bridge a sandbox of this module owns, or to a container this module created.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import TransportError
from rayflow.sandbox import docker_network
from rayflow.sandbox.docker_backend import BACKEND_LABEL, SANDBOX_LABEL, DockerBackend, DockerSandbox
from rayflow.sandbox.reaper import Reaper
from rayflow.sandbox.spec import MIB, OWNER_LABEL, Limits, NetworkPolicy, SandboxSpec
from tests.net_support import DETACHED_LISTENER, TCP_PROBE, UDP_PROBE, HostServer

pytestmark = [pytest.mark.integration, pytest.mark.docker]

LIMITS = Limits(cpus=0.5, memory_bytes=96 * MIB, pids=48, disk_bytes=16 * MIB, wall_time_s=300.0)
#: Owner of this module's sandboxes; unique per run so the final check sees only ours.
OWNER = f"test-docker-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def backend(docker_client: Any) -> Iterator[DockerBackend]:
    backend = DockerBackend(docker_client)
    backend.ensure_image(SandboxSpec(owner=OWNER).image)
    yield backend
    backend.reap(lambda owner: owner != OWNER)
    backend.close()


@pytest.fixture
def servers() -> Iterator[list[HostServer]]:
    started: list[HostServer] = []
    yield started
    for server in started:
        server.close()


def serve(servers: list[HostServer], host: str, kind: int = socket.SOCK_STREAM, reply: bytes = b"hub") -> int:
    server = HostServer(host, kind, reply)
    servers.append(server)
    return server.port


def make(backend: DockerBackend, **overrides: Any) -> DockerSandbox:
    fields: dict[str, Any] = {"owner": OWNER, "limits": LIMITS, **overrides}
    return backend.create(SandboxSpec(**fields))


def probe(sandbox: DockerSandbox, script: str, host: str, port: int) -> str:
    result = sandbox.exec(["python3", "-c", script, host, str(port)], timeout_s=30)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode().strip()


def container_ip(client: Any, sandbox: DockerSandbox) -> str:
    networks = client.api.inspect_container(sandbox.container_id)["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in networks.values() if n.get("IPAddress"))


# --- life cycle ---------------------------------------------------------------------------------
def test_create_exec_destroy(backend: DockerBackend, docker_client: Any) -> None:
    sandbox = make(backend)
    result = sandbox.exec("echo hello; id -u; pwd")
    container_id = sandbox.container_id
    sandbox.destroy()
    with pytest.raises(TransportError):
        sandbox.exec(["true"])
    assert backend.flush(timeout_s=120)
    assert result.ok and result.stdout.decode().split() == ["hello", "10001", "/workspace"]
    assert not docker_client.api.containers(all=True, filters={"id": container_id})


def test_destroy_twice_is_harmless(backend: DockerBackend) -> None:
    sandbox = make(backend, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    sandbox.destroy()
    sandbox.destroy(wait=True)
    assert sandbox.id not in docker_network.listed_ids()


def test_exec_streams_stdin_env_and_exit_code(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        result = sandbox.exec("cat; echo $GREETING >&2; exit 3", stdin=b"in", env={"GREETING": "hi"})
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"in", b"hi\n")


def test_owned_lists_live_sandboxes_with_their_owner(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        assert (sandbox.id, OWNER) in backend.owned()
    assert (sandbox.id, OWNER) not in backend.owned()


# --- files -----------------------------------------------------------------------------------------
def test_write_and_read_file(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        sandbox.write_file("/workspace/a/b.txt", b"data\x00\xff", mode=0o600)
        listed = sandbox.exec("stat -c '%a %U' /workspace/a/b.txt").stdout.decode().strip()
        assert sandbox.read_file("/workspace/a/b.txt") == b"data\x00\xff"
    assert listed == "600 agent"


def test_upload_then_download_round_trips_a_tree(backend: DockerBackend, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("x = 1\n")
    (source / "top.bin").write_bytes(bytes(range(256)) * 64)
    with make(backend) as sandbox:
        sandbox.upload(source, "/workspace/project")
        listing = sandbox.exec("cd /workspace/project && find . -type f | sort").stdout.decode().split()
        sandbox.download("/workspace/project", tmp_path / "back")
    assert listing == ["./pkg/mod.py", "./top.bin"]
    assert (tmp_path / "back" / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert (tmp_path / "back" / "top.bin").read_bytes() == bytes(range(256)) * 64


# --- limits and lock-down ----------------------------------------------------------------------
def test_limits_are_in_the_container_cgroup(backend: DockerBackend) -> None:
    script = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes "
        "/sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us"
    )
    with make(backend) as sandbox:
        result = sandbox.exec(script)
        stats = sandbox.stats()
    if result.exit_code != 0:
        pytest.skip(f"cgroup v1 files not visible in the container: {result.stderr!r}")
    memory, memsw, pids, quota, period = (int(v) for v in result.stdout.split())
    assert memory == memsw == LIMITS.memory_bytes
    assert pids == LIMITS.pids
    assert quota / period == pytest.approx(LIMITS.cpus)
    assert stats.pids is not None and 1 <= stats.pids <= LIMITS.pids
    assert stats.memory_bytes is not None and 0 < stats.memory_bytes <= LIMITS.memory_bytes


def test_tmpfs_mounts_are_sized_owned_and_executable(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        mounts = sandbox.exec("grep -E ' (/tmp|/workspace) ' /proc/mounts").stdout.decode()
        runs = sandbox.exec("printf '#!/bin/sh\\necho ran\\n' > /workspace/x && chmod +x /workspace/x && ./x")
    for target in ("/tmp", "/workspace"):
        line = next(line for line in mounts.splitlines() if f" {target} " in line)
        assert f"size={LIMITS.disk_bytes // 1024}k" in line and "uid=10001" in line and "noexec" not in line
    assert runs.stdout == b"ran\n"


def test_root_is_read_only_and_the_runtime_is_unprivileged(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        write = sandbox.exec("touch /usr/probe")
        status = sandbox.exec("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status").stdout.decode()
        init = sandbox.exec("cat /proc/1/cmdline").stdout
    assert write.exit_code != 0 and b"Read-only file system" in write.stderr
    fields = dict(line.split(":\t") for line in status.strip().splitlines())
    assert fields == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    assert init.startswith(b"/sbin/docker-init")


# --- network -------------------------------------------------------------------------------------
def test_network_none_has_only_loopback(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        devices = sandbox.exec("tail -n +3 /proc/net/dev | cut -d: -f1").stdout.decode().split()
    assert devices == ["lo"]
    assert sandbox.network_gateway is None


def test_hub_only_reaches_the_hub_over_tcp_and_not_another_host_port(
    backend: DockerBackend, servers: list[HostServer]
) -> None:
    hub = serve(servers, "127.0.0.1")
    other_loopback = serve(servers, "127.0.0.1", reply=b"other")
    with make(backend, network=NetworkPolicy.hub_only("127.0.0.1", hub)) as sandbox:
        gateway = sandbox.network_gateway
        assert gateway is not None
        on_gateway = serve(servers, gateway, reply=b"gateway")
        env = sandbox.exec("echo $RAYFLOW_HUB_HOST:$RAYFLOW_HUB_PORT").stdout.decode().strip()
        assert env == f"{gateway}:{hub}"
        assert probe(sandbox, TCP_PROBE, gateway, hub) == "hub"
        assert probe(sandbox, TCP_PROBE, gateway, other_loopback) in (
            "TimeoutError",
            "ConnectionRefusedError",
        )
        assert probe(sandbox, TCP_PROBE, gateway, on_gateway) == "TimeoutError"


def test_hub_only_reaches_the_hub_over_udp(backend: DockerBackend, servers: list[HostServer]) -> None:
    hub = serve(servers, "127.0.0.1", socket.SOCK_DGRAM, reply=b"pong")
    with make(backend, network=NetworkPolicy.hub_only("127.0.0.1", hub)) as sandbox:
        gateway = sandbox.network_gateway
        assert gateway is not None
        other = serve(servers, gateway, socket.SOCK_DGRAM, reply=b"other")
        assert probe(sandbox, UDP_PROBE, gateway, hub) == "pong"
        assert probe(sandbox, UDP_PROBE, gateway, other) == "TimeoutError"


def test_allow_list_reaches_every_listed_endpoint(backend: DockerBackend, servers: list[HostServer]) -> None:
    first = serve(servers, "127.0.0.1", reply=b"first")
    second = serve(servers, "127.0.0.1", reply=b"second")
    policy = NetworkPolicy.allow_list(("127.0.0.1", first), ("localhost", second))
    with make(backend, network=policy) as sandbox:
        gateway = sandbox.network_gateway
        assert gateway is not None
        answers = [probe(sandbox, TCP_PROBE, gateway, port) for port in (first, second)]
    assert answers == ["first", "second"]


def test_two_sandboxes_cannot_reach_each_other(
    backend: DockerBackend, docker_client: Any, servers: list[HostServer]
) -> None:
    hub = serve(servers, "127.0.0.1")
    policy = NetworkPolicy.hub_only("127.0.0.1", hub)
    with make(backend, network=policy) as a, make(backend, network=policy) as b:
        a_ip = container_ip(docker_client, a)
        started = a.exec(["python3", "-c", DETACHED_LISTENER, "0.0.0.0", "7000", "sandbox"])
        assert started.stdout == b"listening\n", started.stderr
        assert probe(a, TCP_PROBE, a_ip, 7000) == "sandbox"
        assert probe(b, TCP_PROBE, a_ip, 7000) == "TimeoutError"
        assert probe(b, TCP_PROBE, a.network_gateway or "", 7000) == "TimeoutError"
        assert probe(b, TCP_PROBE, b.network_gateway or "", hub) == "hub"


def test_network_rules_are_removed_with_the_sandbox(backend: DockerBackend, docker_client: Any) -> None:
    sandbox = make(backend, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    assert sandbox.id in docker_network.listed_ids()
    sandbox.destroy(wait=True)
    assert sandbox.id not in docker_network.listed_ids()
    assert not docker_client.api.networks(filters={"label": f"{SANDBOX_LABEL}={sandbox.id}"})


# --- destroy in two parts ------------------------------------------------------------------------------
@pytest.fixture
def held_reaper() -> Iterator[tuple[Reaper, threading.Event]]:
    """A reaper whose only worker is busy until the event is set: removals queue up behind it."""
    reaper = Reaper("test-held-reaper")
    gate = threading.Event()

    def hold() -> None:
        gate.wait(120)

    reaper.submit("gate", hold)
    yield reaper, gate
    gate.set()
    reaper.close()


def container_pids(client: Any, sandbox: DockerSandbox) -> list[int]:
    """Host pids of every process in the sandbox's container, as the engine lists them."""
    top = client.api.top(sandbox.container_id, ps_args="-o pid")
    return [int(row[0]) for row in top["Processes"]]


def wait_exited(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (or is gone), waiting on a pidfd; False after ``timeout_s``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def test_destroy_kills_every_process_without_waiting_for_the_engine(
    docker_client: Any, held_reaper: tuple[Reaper, threading.Event]
) -> None:
    reaper, gate = held_reaper
    backend = DockerBackend(docker_client, reaper=reaper)
    sandbox = make(backend)
    # A process that left the runtime's process group, as a hostile command would.
    assert sandbox.exec("setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo started").ok
    pids = container_pids(docker_client, sandbox)
    assert len(pids) >= 3  # init, runtime, the escaped sleep
    sandbox.destroy()
    with pytest.raises(TransportError):
        sandbox.exec(["true"])
    assert all(wait_exited(pid, timeout_s=60) for pid in pids)
    # The engine's part is still queued: the container is there, labelled for any reaper.
    left = docker_client.api.containers(all=True, filters={"id": sandbox.container_id})
    assert [c["Labels"][OWNER_LABEL] for c in left] == [OWNER]
    gate.set()
    assert backend.flush(timeout_s=120)
    assert not docker_client.api.containers(all=True, filters={"id": sandbox.container_id})


def test_a_destroyed_sandbox_whose_removal_is_pending_is_found_by_reap(
    docker_client: Any, held_reaper: tuple[Reaper, threading.Event]
) -> None:
    reaper, gate = held_reaper
    owner = f"{OWNER}-pending"
    backend = DockerBackend(docker_client, reaper=reaper)
    sandbox = backend.create(
        SandboxSpec(owner=owner, limits=LIMITS, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    )
    sandbox.destroy()
    # As after a crash of the process that destroyed it: another process sweeps the engine.
    assert DockerBackend(docker_client).reap(lambda o: o != owner) == [sandbox.id]
    assert not docker_client.api.networks(filters={"label": f"{SANDBOX_LABEL}={sandbox.id}"})
    assert sandbox.id not in docker_network.listed_ids()
    gate.set()
    assert backend.flush(timeout_s=120)  # the queued removal finds nothing left, and is content


def test_destroy_with_wait_returns_once_everything_is_removed(
    docker_client: Any, held_reaper: tuple[Reaper, threading.Event]
) -> None:
    reaper, gate = held_reaper
    backend = DockerBackend(docker_client, reaper=reaper)
    sandbox = make(backend, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    gate.set()
    sandbox.destroy(wait=True)
    assert not docker_client.api.containers(all=True, filters={"id": sandbox.container_id})
    assert not docker_client.api.networks(filters={"label": f"{SANDBOX_LABEL}={sandbox.id}"})
    assert sandbox.id not in docker_network.listed_ids()


def test_close_finishes_the_pending_removals(docker_client: Any) -> None:
    backend = DockerBackend(docker_client)
    sandbox = make(backend, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    sandbox.destroy()
    backend.close()
    assert not docker_client.api.containers(all=True, filters={"id": sandbox.container_id})
    assert not docker_client.api.networks(filters={"label": f"{SANDBOX_LABEL}={sandbox.id}"})
    assert sandbox.id not in docker_network.listed_ids()


def test_interpreter_exit_finishes_the_pending_removals(docker_client: Any) -> None:
    script = (
        "from rayflow.sandbox.docker_backend import DockerBackend\n"
        "from rayflow.sandbox.spec import SandboxSpec\n"
        "backend = DockerBackend(build_image=False)\n"
        f"sandbox = backend.create(SandboxSpec(owner={OWNER!r}))\n"
        "sandbox.destroy()\n"
        "print(sandbox.container_id, flush=True)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    container_id = completed.stdout.strip()
    assert container_id
    assert not docker_client.api.containers(all=True, filters={"id": container_id})


# --- leftovers -------------------------------------------------------------------------------------
def test_reap_removes_an_orphan_and_everything_it_held(docker_client: Any) -> None:
    orphan_owner = f"{OWNER}-orphan"
    creator = DockerBackend(docker_client)
    forever = Limits(memory_bytes=LIMITS.memory_bytes, pids=LIMITS.pids, wall_time_s=None)
    orphan = creator.create(
        SandboxSpec(owner=orphan_owner, limits=forever, network=NetworkPolicy.hub_only("127.0.0.1", 9))
    )
    # The creator is gone without destroying it: only the engine and the kernel remember it.
    del creator
    reaper = DockerBackend(docker_client)
    reaped = reaper.reap(lambda owner: owner != orphan_owner)
    assert reaped == [orphan.id]
    assert (orphan.id, orphan_owner) not in reaper.owned()
    assert not docker_client.api.networks(filters={"label": f"{SANDBOX_LABEL}={orphan.id}"})
    assert orphan.id not in docker_network.listed_ids()


def test_reap_spares_sandboxes_of_live_owners(backend: DockerBackend) -> None:
    with make(backend) as sandbox:
        assert sandbox.id not in backend.reap(lambda owner: owner == OWNER)
        assert sandbox.exec(["true"]).ok


def test_nothing_of_this_module_is_left_behind(docker_client: Any, backend: DockerBackend) -> None:
    """Runs last: every sandbox above was destroyed or reaped, with its network and rules."""
    assert backend.flush(timeout_s=120)
    ours = {"label": [f"{OWNER_LABEL}={OWNER}", f"{BACKEND_LABEL}=docker"]}
    assert docker_client.api.containers(all=True, filters=ours) == []
    assert docker_client.api.networks(filters=ours) == []
    live = {
        c["Labels"][SANDBOX_LABEL]
        for c in docker_client.api.containers(all=True, filters={"label": SANDBOX_LABEL})
    }
    assert docker_network.listed_ids() - live == set()


DNS_PROBE = """
import socket, struct, sys
name = sys.argv[1]
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("127.0.0.11", 53))
try:
    s.send(query)
    s.recv(512)
    print("answered")
except Exception as exc:
    print(type(exc).__name__)
"""


def test_hub_only_sandbox_cannot_use_the_engines_embedded_dns(
    backend: DockerBackend, servers: list[HostServer]
) -> None:
    hub = serve(servers, "127.0.0.1")
    with make(backend, network=NetworkPolicy.hub_only("127.0.0.1", hub)) as sandbox:
        # The sandbox's own container name: the embedded server would answer it without asking
        # any upstream resolver, so this probe never sends traffic off the machine.
        result = sandbox.exec(["python3", "-c", DNS_PROBE, f"rayflow-{sandbox.id}"])
    # A REJECT rule in the sending namespace fails the send itself with EPERM.
    assert result.stdout.decode().strip() in ("PermissionError", "ConnectionRefusedError", "TimeoutError"), (
        result
    )
