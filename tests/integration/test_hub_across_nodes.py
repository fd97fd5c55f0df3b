"""A hub on one node of an isolated cluster, reached at its real address from sandboxes of another node.

The network is a real :mod:`clusters.netns_fabric` (one region, three node namespaces, a router),
on a /16 of the shared address space that only this module uses. A ``HubServer`` runs inside
node 0's namespace, bound to node 0's address; a Local sandbox (made by a process inside node 1's
namespace, so its veth, fence, forwarding and masquerading are node 1's) and a Docker sandbox
(made from node 1's namespace too, as a Ray worker there would; its container lives on the host's
Docker bridges, which route the cluster subnet through the router) each show from inside that:

* ``health`` over QUIC with a token succeeds, at the hub's own address, with the certificate
  checked against that address (a wrong CA or another address as the name fails);
* TCP and UDP to another port of the hub's node, to their own node and to the third node get
  nowhere, while the same servers answer the creating node itself (so the fence, not the network,
  stops them).

Node 1's forwarding is switched off before the Local sandbox is made: the backend switches on
what it needs in that namespace and switches it off again on destroy. Everything this module
makes (namespaces, containers, networks, rules) is removed, and checked for, at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusters import netns_fabric
from rayflow.rpc.tls import certificate_names, ensure_server_tls
from rayflow.sandbox import local_network

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or local_network.available() is not None,
        reason="needs root, ip, nsenter and iptables (network namespaces)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
SUBNET = "100.96.0.0/16"
REGION = "r1"
RUN = secrets.token_hex(3)
CLUSTER = f"rayflow-hub-nodes-{RUN}"
OWNER = f"test-hub-nodes-{RUN}"
#: What a probe prints when the fence stopped it: dropped (timeout), unreachable, refused.
STOPPED = {"TimeoutError", "OSError", "ConnectionRefusedError"}

#: A hub on argv[2] (UDP, a free port) with its state in argv[1]; prints its endpoint and a
#: read token, then serves until its stdin closes.
HUB = textwrap.dedent(
    """
    import asyncio, json, sys
    from rayflow.hub.server import HubServer

    async def main():
        async with HubServer(sys.argv[1], host=sys.argv[2], port=0, region="r1") as hub:
            token = hub.issue_token("sandbox", "acme", ["*"], ["reasoningbank:read"])
            print(json.dumps({"endpoint": hub.endpoint.to_dict(), "token": token}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)
#: A TCP and a UDP server on one free port of every address, answering argv[1]; prints the port.
SERVER = textwrap.dedent(
    """
    import sys
    from tests.net_support import DualServer
    server = DualServer("0.0.0.0", sys.argv[1].encode())
    print(server.port, flush=True)
    sys.stdin.read()
    """
)
#: Inside a sandbox: the hub as the RAYFLOW_HUB_* variables name it, a health call, and the same
#: call with another CA (argv[1]) and with another address as the certificate name (argv[2]).
CLIENT = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    sys.path.insert(0, "/opt/rayflow/lib")
    from rayflow.wire.hub_client import SyncHubClient
    from rayflow.wire.hub_endpoint import TOKEN_ENV, HubEndpoint

    endpoint = HubEndpoint.from_env(os.environ)

    def health(ep):
        try:
            with SyncHubClient.for_endpoint(ep, token=os.environ[TOKEN_ENV], connect_timeout_s=5.0) as hub:
                return hub.health()
        except Exception as exc:
            return type(exc).__name__

    print(json.dumps({
        "host": endpoint.host, "port": endpoint.port, "server_name": endpoint.server_name,
        "health": health(endpoint),
        "other_ca": health(dataclasses.replace(endpoint, ca_pem=sys.argv[1].encode())),
        "other_name": health(dataclasses.replace(endpoint, server_name=sys.argv[2])),
    }))
    """
)
#: Run inside node 1's namespace: makes one sandbox (``backend`` local or docker) with a hub-only
#: policy, runs the client and the probes in it, destroys it, and reports what is left.
CREATOR = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from rayflow.sandbox import docker_network, local_network, netfilter
    from rayflow.sandbox.spec import MIB, Limits, NetworkPolicy, SandboxSpec
    from rayflow.wire.hub_endpoint import CA_ENV, SERVER_NAME_ENV, TOKEN_ENV
    from tests.net_support import TCP_PROBE, UDP_PROBE

    job = json.loads(sys.stdin.read())
    ep = job["endpoint"]
    spec = SandboxSpec(
        owner=job["owner"],
        limits=Limits(memory_bytes=256 * MIB, pids=64, disk_bytes=16 * MIB, wall_time_s=300.0),
        network=NetworkPolicy.hub_only(ep["host"], ep["port"]),
        env={CA_ENV: ep["ca_pem"], SERVER_NAME_ENV: ep["server_name"], TOKEN_ENV: job["token"]},
        exec_timeout_s=120.0,
    )

    def forwarding():
        return Path("/proc/sys/net/ipv4/conf/eth0/forwarding").read_text().strip()

    out = {"forwarding_before": forwarding()}
    if job["backend"] == "local":
        from rayflow.sandbox.local_backend import LocalBackend
        backend = LocalBackend(registry_dir=Path(job["registry"]))
    else:
        import docker
        from rayflow.sandbox.docker_backend import DockerBackend
        client = docker.from_env(timeout=60)
        # The image as it is: a node has no way out to rebuild it, and the hub client in it is enough.
        backend = DockerBackend(client, build_image=False)
        out["engine_netns"] = docker_network.engine_netns()
    sandbox = backend.create(spec)
    out["id"] = sandbox.id
    try:
        out["forwarding_during"] = forwarding()
        env = sandbox.exec("echo $RAYFLOW_HUB_HOST $RAYFLOW_HUB_PORT").stdout.decode().split()
        out["env"] = env
        done = sandbox.exec(["python3", "-c", job["client"], job["other_ca"], job["other_name"]], timeout_s=120)
        out["client"] = json.loads(done.stdout.decode() or "null") if done.exit_code == 0 else done.stderr.decode()
        out["probes"] = {}
        for name, host, port in job["probes"]:
            for proto, script in (("tcp", TCP_PROBE), ("udp", UDP_PROBE)):
                got = sandbox.exec(["python3", "-c", script, host, str(port)], timeout_s=30)
                out["probes"][f"{name}/{proto}"] = got.stdout.decode().strip()
    finally:
        if job["backend"] == "local":
            sandbox.destroy()
        else:
            sandbox.destroy(wait=True)
            backend.close()
    sid = out["id"]
    if job["backend"] == "local":
        out["left"] = [
            what for what, there in (
                ("netns", local_network.exists(sid)),
                ("veth", Path("/sys/class/net/" + local_network.host_interface(sid)).exists()),
                ("rules", sid in netfilter.listed_ids(local_network.TAG_PREFIX)),
            ) if there
        ]
    else:
        label = {"label": ["rayflow.sandbox=" + sid]}
        out["left"] = [
            what for what, there in (
                ("container", client.api.containers(all=True, filters=label)),
                ("network", client.api.networks(filters=label)),
                ("rules", sid in docker_network.listed_ids()),
            ) if there
        ]
    out["forwarding_after"] = forwarding()
    print(json.dumps(out))
    """
)


@dataclass
class Cluster:
    fabric: netns_fabric.Fabric
    hub_node: netns_fabric.NodeNet
    creator: netns_fabric.NodeNet
    third: netns_fabric.NodeNet
    endpoint: dict[str, Any]
    token: str
    state_dir: Path
    #: (name, address, port) of each server the sandboxes must not reach.
    decoys: list[tuple[str, str, int]]
    registry: Path


def _in(node: netns_fabric.NodeNet, *argv: str) -> list[str]:
    return netns_fabric.run_in_node(node, argv)


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``argv`` with piped stdin/stdout; returns it and its first line of output."""
    proc = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"{argv[-3:]} did not start: {proc.communicate(timeout=30)[1][-3000:]}")
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    fabric = netns_fabric.plan_fabric(CLUSTER, [(REGION, 3)], SUBNET)
    hub_node, creator, third = (fabric.node(REGION, i) for i in range(3))
    registry = tmp_path_factory.mktemp("registry")
    procs: list[subprocess.Popen[str]] = []
    netns_fabric.apply(fabric)
    try:
        # Whatever the machine forwards, node 1 starts without: the Local backend must do its own.
        subprocess.run(_in(creator, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"), check=True)
        state_dir = tmp_path_factory.mktemp("hub") / "state"
        hub, line = _start(_in(hub_node, sys.executable, "-c", HUB, str(state_dir), hub_node.address))
        procs.append(hub)
        started = json.loads(line)
        decoys = []
        for name, node in (("hub-node", hub_node), ("own-node", creator), ("third-node", third)):
            server, port = _start(_in(node, sys.executable, "-c", SERVER, name))
            procs.append(server)
            decoys.append((name, node.address, int(port)))
        yield Cluster(
            fabric, hub_node, creator, third, **started, state_dir=state_dir, decoys=decoys, registry=registry
        )
    finally:
        for proc in procs:
            _stop(proc)
        # A creator that died half-way leaves its sandboxes registered: reap them where they were made.
        reap = "from pathlib import Path; from rayflow.sandbox.local_backend import LocalBackend; "
        reap += f"LocalBackend(registry_dir=Path({str(registry)!r})).reap(lambda owner: False)"
        if netns_fabric.leftover_namespaces(fabric.prefix):
            subprocess.run(_in(creator, sys.executable, "-c", reap), cwd=REPO, timeout=120, check=False)
        _reap_containers()
        netns_fabric.teardown(fabric.prefix)
        assert netns_fabric.leftover_namespaces(fabric.prefix) == []


def _reap_containers() -> None:
    """Remove this module's containers (and their networks and rules) if a creator left any."""
    import docker

    try:
        client = docker.from_env(timeout=60)
    except docker.errors.DockerException:
        return
    try:
        if client.api.containers(all=True, filters={"label": [f"rayflow.owner={OWNER}"]}):
            from rayflow.sandbox.docker_backend import DockerBackend

            backend = DockerBackend(client, build_image=False)
            backend.reap(lambda owner: owner != OWNER)
            backend.close()
    finally:
        client.close()


def _create_in_node(
    cluster: Cluster, backend: str, tmp_path: Path, node: netns_fabric.NodeNet | None = None
) -> dict[str, Any]:
    """Run :data:`CREATOR` inside ``node``'s namespace (the creating node's); returns its report."""
    job = {
        "backend": backend,
        "endpoint": cluster.endpoint,
        "token": cluster.token,
        "owner": OWNER,
        "registry": str(cluster.registry),
        "client": CLIENT,
        "other_ca": ensure_server_tls(tmp_path / "other-ca").ca_pem.decode(),
        "other_name": cluster.third.address,
        "probes": cluster.decoys,
    }
    proc = subprocess.run(
        _in(node or cluster.creator, sys.executable, "-c", CREATOR),
        cwd=REPO, input=json.dumps(job), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_from_node(cluster: Cluster, host: str, port: int, proto: str) -> str:
    from tests.net_support import TCP_PROBE, UDP_PROBE

    script = TCP_PROBE if proto == "tcp" else UDP_PROBE
    argv = _in(cluster.creator, sys.executable, "-c", script, host, str(port))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def _assert_reached_the_hub_and_nothing_else(cluster: Cluster, report: dict[str, Any]) -> None:
    hub = cluster.endpoint
    assert report["env"] == [hub["host"], str(hub["port"])]  # the real address, no gateway rewrite
    client = report["client"]
    assert isinstance(client, dict), client
    assert (client["host"], client["server_name"]) == (cluster.hub_node.address, cluster.hub_node.address)
    assert client["health"]["ok"] is True and client["health"]["region"] == REGION
    # The certificate is checked: against the pinned CA, and for the hub's own address.
    assert client["other_ca"] == "TransportError"
    assert client["other_name"] == "TransportError"
    assert set(report["probes"]) == {f"{name}/{p}" for name, _, _ in cluster.decoys for p in ("tcp", "udp")}
    for probe, got in report["probes"].items():
        assert got in STOPPED, (probe, got)


def test_the_hub_listens_on_its_node_address_and_its_certificate_names_it(cluster: Cluster) -> None:
    assert cluster.endpoint["host"] == cluster.hub_node.address
    assert cluster.endpoint["server_name"] == cluster.hub_node.address
    _, ips = certificate_names((cluster.state_dir / "tls" / "server.pem").read_bytes())
    assert cluster.hub_node.address in ips and "127.0.0.1" in ips


def test_the_decoys_answer_the_creating_node_itself(cluster: Cluster) -> None:
    # The control for the probes below: the network carries them; only a sandbox's fence stops them.
    for name, host, port in cluster.decoys:
        for proto in ("tcp", "udp"):
            assert _probe_from_node(cluster, host, port, proto) == name


def test_a_local_sandbox_on_another_node_reaches_the_hub_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("the local backend needs bubblewrap")
    report = _create_in_node(cluster, "local", tmp_path)
    _assert_reached_the_hub_and_nothing_else(cluster, report)
    # Forwarding was switched on in node 1 for the sandbox, and off again with it.
    assert (report["forwarding_before"], report["forwarding_during"], report["forwarding_after"]) == (
        "0",
        "1",
        "0",
    )
    assert report["left"] == []


def test_a_local_sandbox_on_the_hub_node_reaches_the_hub_at_the_node_address_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The hub's address is the creating namespace's own: delivered there (INPUT), not forwarded.
    if shutil.which("bwrap") is None:
        pytest.skip("the local backend needs bubblewrap")
    report = _create_in_node(cluster, "local", tmp_path, cluster.hub_node)
    _assert_reached_the_hub_and_nothing_else(cluster, report)
    assert report["forwarding_before"] == report["forwarding_during"] == report["forwarding_after"]
    assert report["left"] == []


@pytest.mark.docker
def test_a_docker_sandbox_made_on_another_node_reaches_the_hub_and_nothing_else(
    cluster: Cluster, tmp_path: Path, docker_client: Any
) -> None:
    from rayflow.sandbox.spec import SandboxSpec

    image = SandboxSpec(owner=OWNER).image
    if not docker_client.images.list(name=image):
        pytest.fail(f"the sandbox image {image} is missing: build it with `rayflow sandbox build-image`")
    report = _create_in_node(cluster, "docker", tmp_path)
    # The creator runs in node 1's namespace; the fence went to the engine's.
    assert report["engine_netns"] is not None
    _assert_reached_the_hub_and_nothing_else(cluster, report)
    assert report["forwarding_during"] == "0"  # the container's traffic never passes node 1
    assert report["left"] == []
    assert not docker_client.api.containers(all=True, filters={"label": [f"rayflow.owner={OWNER}"]})
