"""The network of an isolated local cluster: a namespace per node, a bridge per region, a router between.

Why: real Ray nodes share neither loopback nor disk, and code that quietly relies on either
works on one machine and fails on a real cluster. In the isolated mode every node of the local
cluster runs in a network namespace of its own, with its own address, so nothing can reach
another node through 127.0.0.1; regions are joined only through the link emulator
(:mod:`clusters.link_emulator`), so every packet between regions feels the configured delay,
jitter, loss or partition.

The shape (``N`` = the cluster's /16, region ``r`` gets ``N.r.0/24``)::

    host (root namespace) -- veth N.255.1/30 --+
                                               |  <cluster>-rt (router namespace)
    node ns  eth0 N.1.10 --- veth ---+-- bridge b1 N.1.1 --+-- tun t1 --+
    node ns  eth0 N.1.11 --- veth ---+                     |            |  link emulator
    node ns  eth0 N.2.10 --- veth ---+-- bridge b2 N.2.1 --+-- tun t2 --+  (reads t*, writes t*)

Inside a region, nodes talk over their bridge directly (a LAN). A packet from region 1 to
region 2 reaches the router on bridge 1, where a policy rule sends everything coming in on that
bridge for another region into TUN device 1; the emulator reads it there, holds it, and writes
it to TUN device 2; the kernel then delivers it to bridge 2 like any received packet. The host
reaches every node through its own veth into the router, without emulated delay (an operator's
laptop, not a region), so ``ray job submit`` from the host works; so do sandbox containers on
the host's Docker engine, whose traffic the engine masquerades behind the host's address.

Everything here is named ``<prefix>-...`` with a prefix derived from the cluster name, so
``teardown`` finds and removes leftovers of a crashed run without touching anything else.
Building the plan is pure (:func:`plan_fabric`); :func:`apply` and :func:`teardown` run it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from clusters.cluster_config import DEFAULT_SUBNET
from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox.local_network import taken_networks

#: Third octet of the host link (a /30 at ``N.255.0``).
HOST_LINK_OCTET = 255
#: First host number of a region's nodes (``N.r.10``, ``N.r.11``, ...); ``.1`` is the router.
FIRST_NODE_HOST = 10
#: Policy-routing tables and rule priorities start here (one per region).
TABLE_BASE = 100


@dataclass(frozen=True)
class NodeNet:
    """One node's place in the fabric."""

    region: str
    index: int
    namespace: str
    address: str
    gateway: str
    #: The veth end on the router's bridge (the node's end is renamed ``eth0`` in its namespace).
    router_veth: str


@dataclass(frozen=True)
class RegionNet:
    region: str
    number: int
    network: str
    gateway: str
    bridge: str
    tun: str


@dataclass(frozen=True)
class Fabric:
    """Every name and address of one isolated cluster's network."""

    prefix: str
    subnet: str
    router_namespace: str
    host_veth: str
    router_host_veth: str
    host_address: str
    router_host_address: str
    regions: tuple[RegionNet, ...]
    nodes: tuple[NodeNet, ...] = field(default=())

    def node(self, region: str, index: int) -> NodeNet:
        for node in self.nodes:
            if node.region == region and node.index == index:
                return node
        raise KeyError(f"{region}-{index}")

    def emulator_spec(self, links: Sequence[dict[str, object]]) -> dict[str, object]:
        """What the link emulator needs: each region's network and TUN device, the links."""
        return {
            "regions": {r.region: r.network for r in self.regions},
            "devices": {r.region: r.tun for r in self.regions},
            "links": [dict(link) for link in links],
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Fabric:
        data = json.loads(text)
        data["regions"] = tuple(RegionNet(**r) for r in data["regions"])
        data["nodes"] = tuple(NodeNet(**n) for n in data["nodes"])
        return cls(**data)


def fabric_prefix(cluster_name: str) -> str:
    """A short, stable prefix for the cluster's interfaces and namespaces (interface names <= 15)."""
    return "rf" + hashlib.blake2b(cluster_name.encode(), digest_size=3).hexdigest()


def plan_fabric(
    cluster_name: str, regions: Sequence[tuple[str, int]], subnet: str = DEFAULT_SUBNET
) -> Fabric:
    """Names and addresses for ``regions`` (``(name, node count)``, in order) inside ``subnet`` (a /16)."""
    network = ipaddress.IPv4Network(subnet)
    if network.prefixlen != 16:
        raise ConfigError(f"an isolated cluster's subnet must be a /16, not {subnet}", key="subnet")
    if not 1 <= len(regions) < HOST_LINK_OCTET:
        raise ConfigError("an isolated cluster has between 1 and 254 regions", key="regions")
    base = network.network_address.packed[:2]
    prefix = fabric_prefix(cluster_name)

    def address(octet3: int, octet4: int) -> str:
        return str(ipaddress.IPv4Address(base + bytes([octet3, octet4])))

    region_nets, nodes = [], []
    for number, (name, count) in enumerate(regions, start=1):
        if not 1 <= count <= 255 - FIRST_NODE_HOST:
            raise ConfigError(f"region {name} must have between 1 and {255 - FIRST_NODE_HOST} nodes")
        region_nets.append(
            RegionNet(
                region=name,
                number=number,
                network=f"{address(number, 0)}/24",
                gateway=address(number, 1),
                bridge=f"{prefix}b{number}",
                tun=f"{prefix}t{number}",
            )
        )
        for index in range(count):
            nodes.append(
                NodeNet(
                    region=name,
                    index=index,
                    namespace=f"{prefix}-{name}-{index}",
                    address=address(number, FIRST_NODE_HOST + index),
                    gateway=address(number, 1),
                    router_veth=f"{prefix}p{number}x{index}",
                )
            )
    return Fabric(
        prefix=prefix,
        subnet=str(network),
        router_namespace=f"{prefix}-router",
        host_veth=f"{prefix}h",
        router_host_veth=f"{prefix}r",
        host_address=address(HOST_LINK_OCTET, 1),
        router_host_address=address(HOST_LINK_OCTET, 2),
        regions=tuple(region_nets),
        nodes=tuple(nodes),
    )


# --- the commands (pure) -----------------------------------------------------------------------
def setup_commands(fabric: Fabric) -> list[list[str]]:
    """Every command that builds the fabric, in order (run as root)."""
    rt = fabric.router_namespace

    def in_router(*argv: str) -> list[str]:
        return ["ip", "netns", "exec", rt, *argv]

    host_link = f"{fabric.host_address.rsplit('.', 1)[0]}.0/30"
    cmds: list[list[str]] = [
        ["ip", "netns", "add", rt],
        in_router("ip", "link", "set", "lo", "up"),
        in_router("sysctl", "-qw", "net.ipv4.ip_forward=1"),
        in_router("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"),
        in_router("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"),
        in_router("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"),
        # The host's way in.
        ["ip", "link", "add", fabric.host_veth, "type", "veth", "peer", "name", fabric.router_host_veth],
        ["ip", "link", "set", fabric.router_host_veth, "netns", rt],
        ["ip", "addr", "add", f"{fabric.host_address}/30", "dev", fabric.host_veth],
        ["ip", "link", "set", fabric.host_veth, "up"],
        in_router("ip", "addr", "add", f"{fabric.router_host_address}/30", "dev", fabric.router_host_veth),
        in_router("ip", "link", "set", fabric.router_host_veth, "up"),
        ["ip", "route", "add", fabric.subnet, "via", fabric.router_host_address, "dev", fabric.host_veth],
        # Traffic for the host link never goes through the emulator.
        in_router("ip", "rule", "add", "to", host_link, "lookup", "main", "priority", str(TABLE_BASE - 1)),
    ]
    for region in fabric.regions:
        table = str(TABLE_BASE + region.number)
        cmds += [
            in_router("ip", "link", "add", region.bridge, "type", "bridge"),
            in_router("ip", "addr", "add", f"{region.gateway}/24", "dev", region.bridge),
            in_router("ip", "link", "set", region.bridge, "up"),
            in_router("ip", "tuntap", "add", "dev", region.tun, "mode", "tun"),
            in_router("ip", "link", "set", region.tun, "up"),
            in_router("sysctl", "-qw", f"net.ipv4.conf.{region.tun}.rp_filter=0"),
            in_router("sysctl", "-qw", f"net.ipv4.conf.{region.bridge}.rp_filter=0"),
            # Everything that comes in on this region's bridge for another region goes to the emulator.
            in_router("ip", "route", "add", fabric.subnet, "dev", region.tun, "table", table),
            in_router(
                "ip",
                "rule",
                "add",
                "iif",
                region.bridge,
                "to",
                fabric.subnet,
                "lookup",
                table,
                "priority",
                table,
            ),  # fmt: skip
        ]
    for node in fabric.nodes:
        region = next(r for r in fabric.regions if r.region == node.region)
        peer = f"{node.router_veth}n"
        cmds += [
            ["ip", "netns", "add", node.namespace],
            [
                "ip",
                "link",
                "add",
                node.router_veth,
                "netns",
                rt,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                node.namespace,
            ],  # fmt: skip
            in_router("ip", "link", "set", node.router_veth, "master", region.bridge),
            in_router("ip", "link", "set", node.router_veth, "up"),
            ["ip", "netns", "exec", node.namespace, "ip", "link", "set", peer, "name", "eth0"],
            ["ip", "netns", "exec", node.namespace, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", node.namespace, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
            ["ip", "netns", "exec", node.namespace, "ip", "link", "set", "eth0", "up"],
            ["ip", "netns", "exec", node.namespace, "ip", "route", "add", "default", "via", node.gateway],
            ["ip", "netns", "exec", node.namespace, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        ]
    return cmds


# --- running it ---------------------------------------------------------------------------------
def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise RayflowError(
            f"setting up the cluster network failed: {' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}",
            command=" ".join(argv),
        )
    return proc


def check_subnet_is_free(subnet: str) -> None:
    """Refuse a subnet that overlaps an address or route this machine already has."""
    wanted = ipaddress.IPv4Network(subnet)
    routes = _run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout
    addrs = _run(["ip", "-j", "-4", "addr", "show"], check=False).stdout
    for network in taken_networks(json.loads(routes or "[]"), json.loads(addrs or "[]")):
        if network.prefixlen > 0 and network.overlaps(wanted) and not network.is_loopback:
            raise ConfigError(
                f"the cluster subnet {subnet} overlaps {network}, already used on this machine; "
                "set another `subnet` in the cluster config",
                key="subnet",
            )


def apply(fabric: Fabric) -> None:
    """Build the fabric; on failure, remove whatever was built and raise."""
    check_subnet_is_free(fabric.subnet)
    try:
        for argv in setup_commands(fabric):
            _run(argv)
    except BaseException:
        teardown(fabric.prefix)
        raise


def leftover_namespaces(prefix: str) -> list[str]:
    """Network namespaces named with ``prefix`` (this cluster's, possibly from a crashed run)."""
    proc = _run(["ip", "-j", "netns", "list"], check=False)
    try:
        entries = json.loads(proc.stdout or "[]")
    except ValueError:
        entries = []
    return [e["name"] for e in entries if str(e.get("name", "")).startswith(f"{prefix}-")]


def teardown(prefix: str) -> list[str]:
    """Remove every namespace and host interface named with ``prefix``; returns what was removed.

    Deleting a namespace deletes the interfaces inside it (bridges, TUN devices, veth ends), and
    a veth pair goes when either end goes, so the host side needs only its own veth and route.
    """
    removed = []
    for name in leftover_namespaces(prefix):
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    if _run(["ip", "link", "show", f"{prefix}h"], check=False).returncode == 0:
        _run(["ip", "link", "del", f"{prefix}h"], check=False)
        removed.append(f"{prefix}h")
    return removed


def run_in_node(node: NodeNet, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` inside ``node``'s network namespace."""
    return ["ip", "netns", "exec", node.namespace, *argv]
