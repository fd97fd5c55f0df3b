"""Hub-only and allow-list local sandboxes against real namespaces, veth pairs, iptables and servers.

Every server is one this module starts on 127.0.0.1 or on a sandbox's host-end address; every
probe comes from a sandbox this module made.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.sandbox import local_network, netfilter
from rayflow.sandbox.gc import owner_alive_by_pid
from rayflow.sandbox.local_backend import LocalBackend, LocalSandbox
from rayflow.sandbox.spec import MIB, Limits, NetworkPolicy, SandboxSpec
from tests.net_support import DETACHED_LISTENER, TCP_PROBE, UDP_PROBE, DualServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or local_network.available() is not None,
        reason="needs bwrap, root, ip, nsenter and iptables",
    ),
]

#: What a probe prints when it got nowhere: dropped (timeout) or no route (unreachable).
UNREACHABLE = ("TimeoutError", "OSError")
LIMITS = Limits(memory_bytes=96 * MIB, pids=48, disk_bytes=8 * MIB, wall_time_s=120.0)


@pytest.fixture
def servers() -> Iterator[Any]:
    made: list[DualServer] = []

    def make(host: str = "127.0.0.1", answer: bytes = b"hub") -> DualServer:
        made.append(DualServer(host, answer))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(registry_dir=tmp_path / "registry")
    yield backend
    backend.reap(lambda owner: False)


@pytest.fixture
def make(backend: LocalBackend) -> Iterator[Any]:
    made: list[LocalSandbox] = []

    def create(policy: NetworkPolicy) -> LocalSandbox:
        made.append(backend.create(SandboxSpec(owner="test-net", limits=LIMITS, network=policy)))
        return made[-1]

    yield create
    for sandbox in made:
        sandbox.destroy()


def probe(sandbox: LocalSandbox, host: str, port: int, proto: str) -> str:
    script = TCP_PROBE if proto == "tcp" else UDP_PROBE
    result = sandbox.exec(["python3", "-c", script, host, str(port)], timeout_s=30)
    return result.stdout.decode().strip()


def leftovers(sandbox_id: str) -> list[str]:
    """What of ``sandbox_id``'s network is still on the host."""
    found = []
    if local_network.exists(sandbox_id):
        found.append("netns")
    if Path(f"/sys/class/net/{local_network.host_interface(sandbox_id)}").exists():
        found.append("veth")
    if sandbox_id in netfilter.listed_ids(local_network.TAG_PREFIX):
        found.append("rules")
    return found


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_hub_only_reaches_the_hub_on_loopback(make: Any, servers: Any, proto: str) -> None:
    hub = servers()
    sandbox = make(NetworkPolicy.hub_only("127.0.0.1", hub.port))
    env = sandbox.exec("echo $RAYFLOW_HUB_HOST:$RAYFLOW_HUB_PORT").stdout.decode().strip()
    assert env == f"{sandbox.network_gateway}:{hub.port}"
    assert probe(sandbox, sandbox.network_gateway, hub.port, proto) == "hub"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_hub_only_does_not_reach_another_loopback_port(make: Any, servers: Any, proto: str) -> None:
    hub, other = servers(), servers(answer=b"other")
    sandbox = make(NetworkPolicy.hub_only("127.0.0.1", hub.port))
    assert probe(sandbox, sandbox.network_gateway, other.port, proto) == "TimeoutError"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_hub_only_does_not_reach_a_port_on_the_host_end_address(make: Any, servers: Any, proto: str) -> None:
    hub = servers()
    sandbox = make(NetworkPolicy.hub_only("127.0.0.1", hub.port))
    on_host_end = servers(sandbox.network_gateway, b"host")
    assert probe(sandbox, sandbox.network_gateway, on_host_end.port, proto) == "TimeoutError"


def test_hub_only_has_no_ipv6_and_one_interface(make: Any, servers: Any) -> None:
    sandbox = make(NetworkPolicy.hub_only("127.0.0.1", servers().port))
    out = sandbox.exec("cat /proc/net/dev; cat /proc/net/if_inet6 2>/dev/null; true").stdout.decode()
    names = {line.split(":")[0].strip() for line in out.splitlines() if ":" in line and "|" not in line}
    assert names == {"lo", "eth0"} and "fe80" not in out


def test_one_sandbox_does_not_reach_another(make: Any, servers: Any) -> None:
    policy = NetworkPolicy.hub_only("127.0.0.1", servers().port)
    first, second = make(policy), make(policy)
    assert first.exec(["python3", "-c", DETACHED_LISTENER, "0.0.0.0", "7001", "here"]).stdout == b"listening\n"
    assert probe(first, first.network_address, 7001, "tcp") == "here"
    # No route at all to another sandbox's /30 (OSError: unreachable), and no way through the host.
    assert probe(second, first.network_address, 7001, "tcp") in UNREACHABLE
    assert probe(second, first.network_gateway, 7001, "tcp") in UNREACHABLE


def test_allow_list_reaches_each_listed_endpoint_and_nothing_else(make: Any, servers: Any) -> None:
    one, two, other = servers(answer=b"one"), servers(answer=b"two"), servers(answer=b"other")
    sandbox = make(NetworkPolicy.allow_list(("127.0.0.1", one.port), ("localhost", two.port)))
    gateway = sandbox.network_gateway
    assert sandbox.exec("echo ${RAYFLOW_HUB_HOST:-none}").stdout == b"none\n"
    assert [probe(sandbox, gateway, s.port, "udp") for s in (one, two)] == ["one", "two"]
    assert [probe(sandbox, gateway, s.port, "tcp") for s in (one, two)] == ["one", "two"]
    assert probe(sandbox, gateway, other.port, "tcp") == "TimeoutError"


def test_destroy_leaves_no_namespace_veth_or_rules(make: Any, servers: Any) -> None:
    sandbox = make(NetworkPolicy.hub_only("127.0.0.1", servers().port))
    assert leftovers(sandbox.id) == ["netns", "veth", "rules"]
    sandbox.destroy()
    assert leftovers(sandbox.id) == []


#: A creator that makes a hub-only sandbox, prints its id and waits to be killed.
CREATOR = """
import sys, time
from pathlib import Path
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.local_backend import LocalBackend
from rayflow.sandbox.spec import NetworkPolicy, SandboxSpec
backend = LocalBackend(registry_dir=Path(sys.argv[1]))
spec = SandboxSpec(owner=current_process_owner(), network=NetworkPolicy.hub_only("127.0.0.1", 9))
sandbox = backend.create(spec)
print(sandbox.id, flush=True)
sys.stdin.read()
"""


def test_reap_removes_the_network_of_a_killed_creator(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    creator = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CREATOR), str(registry)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert creator.stdout is not None
        sandbox_id = creator.stdout.readline().decode().strip()
        assert leftovers(sandbox_id) == ["netns", "veth", "rules"]
    finally:
        os.kill(creator.pid, signal.SIGKILL)
        creator.wait()
    backend = LocalBackend(registry_dir=registry)
    assert [i for i, _ in backend.owned()] == [sandbox_id]
    assert backend.reap(owner_alive_by_pid) == [sandbox_id]
    assert leftovers(sandbox_id) == [] and backend.owned() == []
