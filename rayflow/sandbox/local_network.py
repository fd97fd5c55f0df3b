"""Network of ``hub-only`` and ``allow-list`` local sandboxes: a namespace, a veth pair and a fence.

Why a named network namespace per sandbox: bubblewrap can only give a sandbox no network at all
(``--unshare-net``) or the host's. So the backend makes the namespace itself, wires it to the
host with one veth pair on a private /30, and starts ``bwrap`` inside it (``nsenter --net``):
the sandbox sees loopback and one interface whose only neighbour is the host end. The host end
is fenced by the tagged rules of :mod:`rayflow.sandbox.netfilter` (``INPUT``, ``FORWARD``,
``nat``): only the allowed endpoints pass, an endpoint on the host's loopback (a hub bound to
``127.0.0.1``) is reached at the host end's address and rewritten to loopback, and nothing else
of the host, of other sandboxes or of the world is reachable. There is no DNS: endpoints are
resolved on the host. IPv6 is switched off in the namespace and on the host end.

The /30 comes from a pool (default :data:`DEFAULT_POOL`), starting at a slot derived from the
sandbox id and skipping every network already routed or addressed on the host (other
sandboxes, Docker bridges, VPNs); a lock file serialises the choice between processes.

Everything is named after the sandbox id (namespace ``rayflow-<id>``, host interface
``rfl<id>``, rule tag ``rayflow-local=<id>``), so :func:`destroy` needs only the id, from any
process. The plans are pure functions; :func:`create` and :func:`destroy` are the shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox import netfilter
from rayflow.sandbox.netfilter import Rule, Target
from rayflow.sandbox.spec import NetworkPolicy

#: Where ``ip netns`` keeps named namespaces.
NETNS_DIR = Path("/run/netns")
#: Name prefix of a sandbox's namespace; the sandbox id follows.
NETNS_PREFIX = "rayflow-"
#: Host-side interface name prefix; the sandbox id's letters and digits follow.
HOST_IF_PREFIX = "rfl"
#: The interface's name inside the namespace.
SANDBOX_IF = "eth0"
#: Rule tag prefix of local sandboxes (Docker's sweep looks only for its own prefix).
TAG_PREFIX = "rayflow-local="
#: Addresses the /30s are cut from: shared address space (RFC 6598), rarely routed on a host.
DEFAULT_POOL = "100.87.0.0/16"
#: Serialises address choice and interface creation between processes.
LOCK_FILE = Path("/run/rayflow/local-network.lock")

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Link:
    """One sandbox's wiring: its namespace, the veth pair's two ends and their addresses."""

    sandbox_id: str
    netns: str
    host_if: str
    host_address: str
    sandbox_address: str
    network: str

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


def netns_name(sandbox_id: str) -> str:
    _check_id(sandbox_id)
    return NETNS_PREFIX + sandbox_id


def host_interface(sandbox_id: str) -> str:
    """``rfl`` and the id's letters and digits, cut to the 15 characters an interface name allows.

    Ids are ``rf-`` and 12 hex digits, so nothing is cut in practice; a longer id would keep
    its end, the random part.
    """
    _check_id(sandbox_id)
    letters = re.sub(r"[^A-Za-z0-9]", "", sandbox_id.removeprefix("rf-"))
    return HOST_IF_PREFIX + letters[-(netfilter.MAX_IFNAME - len(HOST_IF_PREFIX)) :]


def sandbox_id_of(netns: str) -> str | None:
    """The sandbox id a namespace name belongs to, or ``None`` for another program's namespace."""
    if not netns.startswith(NETNS_PREFIX):
        return None
    sandbox_id = netns[len(NETNS_PREFIX) :]
    return sandbox_id if _ID_RE.match(sandbox_id) else None


def _check_id(sandbox_id: str) -> None:
    if not _ID_RE.match(sandbox_id):
        raise ConfigError(f"invalid sandbox id {sandbox_id!r}")


# --- address choice -----------------------------------------------------------------------------
def taken_networks(
    routes: Sequence[dict[str, object]], addresses: Sequence[dict[str, object]]
) -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes or holds an address in, from ``ip -j`` output.

    ``routes`` is ``ip -j -4 route show table all``, ``addresses`` is ``ip -j -4 addr``. The
    default route is left out: it overlaps everything and collides with nothing.
    """
    out: list[ipaddress.IPv4Network] = []
    for route in routes:
        dst = str(route.get("dst", ""))
        if not dst or dst == "default":
            continue
        with contextlib.suppress(ValueError):
            out.append(ipaddress.IPv4Network(dst, strict=False))
    for link in addresses:
        for info in link.get("addr_info", ()) or ():  # type: ignore[attr-defined]
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network)
    return out


def pick_network(
    sandbox_id: str, taken: Iterable[ipaddress.IPv4Network], pool: str = DEFAULT_POOL
) -> ipaddress.IPv4Network:
    """A /30 of ``pool`` overlapping nothing in ``taken``: the id's own slot or the next free one.

    Why start from the id's hash: two creators rarely try the same slot first, and a sandbox's
    network can be predicted in tests and logs.
    """
    space = ipaddress.IPv4Network(pool)
    if space.prefixlen > 30:
        raise ConfigError(f"network pool {pool} is smaller than a /30")
    slots = 1 << (30 - space.prefixlen)
    busy = [n for n in taken if n.overlaps(space)]
    start = int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:8], "big") % slots
    base = int(space.network_address)
    for step in range(slots):
        candidate = ipaddress.IPv4Network((base + 4 * ((start + step) % slots), 30))
        if not any(candidate.overlaps(n) for n in busy):
            return candidate
    raise RayflowError(f"no free /30 left in the local sandbox network pool {pool}")


def plan_link(sandbox_id: str, network: ipaddress.IPv4Network) -> Link:
    """The wiring of ``sandbox_id`` on ``network``: host end first usable address, sandbox the second."""
    host, inner = list(network.hosts())[:2]
    return Link(
        sandbox_id=sandbox_id,
        netns=netns_name(sandbox_id),
        host_if=host_interface(sandbox_id),
        host_address=str(host),
        sandbox_address=str(inner),
        network=str(network),
    )


# --- plans ----------------------------------------------------------------------------------------
def rules(link: Link, targets: Sequence[Target]) -> list[Rule]:
    """The fence of ``link``: forwarded traffic judged in ``FORWARD``, remote traffic masqueraded."""
    return netfilter.fence(
        link.sandbox_id,
        link.host_if,
        link.host_address,
        targets,
        forward_chain="FORWARD",
        prefix=TAG_PREFIX,
        masquerade_source=link.sandbox_address,
    )


def hub_endpoint(policy: NetworkPolicy, targets: Sequence[Target], link: Link) -> tuple[str, int] | None:
    """The hub as the sandbox reaches it (for ``RAYFLOW_HUB_HOST``/``PORT``); ``None`` if the policy names none."""
    if policy.hub is None:
        return None
    return netfilter.sandbox_address(targets[0], link.host_address), targets[0].port


#: Run inside the namespace before the veth exists: interfaces made there get no IPv6.
NO_IPV6 = (
    "[ -d /proc/sys/net/ipv6 ] || exit 0; "
    "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && "
    "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"
)


def setup_commands(link: Link, remote: bool) -> list[list[str]]:
    """The commands that build ``link``, in order (``remote``: the sandbox needs a default route)."""
    ns = link.netns
    prefix = ipaddress.IPv4Network(link.network).prefixlen
    out = [
        ["ip", "netns", "add", ns],
        ["nsenter", f"--net={link.netns_path}", "sh", "-c", NO_IPV6],
        ["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", SANDBOX_IF, "netns", ns],
        ["ip", "addr", "add", f"{link.host_address}/{prefix}", "dev", link.host_if],
        ["ip", "-n", ns, "addr", "add", f"{link.sandbox_address}/{prefix}", "dev", SANDBOX_IF],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "link", "set", SANDBOX_IF, "up"],
    ]
    if remote:
        out.append(["ip", "-n", ns, "route", "add", "default", "via", link.host_address])
    return out


def host_interface_options(link: Link, targets: Sequence[Target]) -> list[tuple[str, str, str]]:
    """(family, option, value) set on the host end before it comes up."""
    out = [("ipv6", "disable_ipv6", "1")]
    if any(t.loopback for t in targets):
        out.append(("ipv4", "route_localnet", "1"))
    return out


# --- the shell ------------------------------------------------------------------------------------
def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def _ip_json(*args: str) -> list[dict[str, object]]:
    done = _run(["ip", "-j", *args])
    if done.returncode != 0:
        raise RayflowError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout or "[]")


def available() -> str | None:
    """Why networked local sandboxes cannot be made here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "hub-only and allow-list local sandboxes need root (network namespaces, iptables)"
    for tool in ("ip", "nsenter", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            return f"hub-only and allow-list local sandboxes need {tool!r} on PATH"
    return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _forwarding_on() -> bool:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    return False


def create(sandbox_id: str, targets: Sequence[Target], pool: str = DEFAULT_POOL) -> Link:
    """Build the namespace, veth pair and fence of ``sandbox_id``; on any failure, remove them again."""
    remote = not netfilter.internal(targets)
    if remote and not _forwarding_on():
        raise ConfigError(
            "allow-list endpoints off this host need IPv4 forwarding (sysctl net.ipv4.ip_forward=1)"
        )
    try:
        with _locked():
            taken = taken_networks(_ip_json("-4", "route", "show", "table", "all"), _ip_json("-4", "addr"))
            link = plan_link(sandbox_id, pick_network(sandbox_id, taken, pool))
            for argv in setup_commands(link, remote):
                done = _run(argv)
                if done.returncode != 0:
                    raise RayflowError(
                        f"could not wire the sandbox's network ({argv[0]} {argv[1]} ...): "
                        f"{done.stderr.strip()}",
                        sandbox=sandbox_id,
                    )
        for family, option, value in host_interface_options(link, targets):
            if family == "ipv4" or os.path.isdir("/proc/sys/net/ipv6"):
                netfilter.set_interface_option(link.host_if, option, value, family)
        netfilter.apply(rules(link, targets))
        done = _run(["ip", "link", "set", link.host_if, "up"])
        if done.returncode != 0:
            raise RayflowError(
                f"could not bring up {link.host_if}: {done.stderr.strip()}", sandbox=sandbox_id
            )
    except BaseException:
        destroy(sandbox_id)
        raise
    return link


def destroy(sandbox_id: str) -> None:
    """Remove the fence, the veth pair and the namespace of ``sandbox_id``; missing parts are fine.

    The rules go first, so nothing is ever left reachable without its fence.
    """
    netfilter.remove([sandbox_id], TAG_PREFIX)
    host_if = host_interface(sandbox_id)
    if Path(f"/sys/class/net/{host_if}").exists():
        _run(["ip", "link", "del", host_if])
    if (NETNS_DIR / netns_name(sandbox_id)).exists():
        _run(["ip", "netns", "del", netns_name(sandbox_id)])


def exists(sandbox_id: str) -> bool:
    """True while the namespace of ``sandbox_id`` is still mounted."""
    return (NETNS_DIR / netns_name(sandbox_id)).exists()


def leftover_ids() -> set[str]:
    """Ids of local sandboxes that still have a namespace or tagged rules on this host."""
    names = set()
    with contextlib.suppress(OSError):
        names = {sandbox_id_of(p.name) for p in NETNS_DIR.iterdir()}
    return {i for i in names if i} | netfilter.listed_ids(TAG_PREFIX)
