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

"The host" is the network namespace of the creating process: the machine's own, or a Ray node's
namespace in an isolated cluster. Any other endpoint (a hub bound to its node's address, on this
node or on another) is reached at its real address: delivered locally when it is one of the
namespace's own addresses, otherwise forwarded and masqueraded behind the namespace's address (a
tagged ``nat POSTROUTING`` rule, so the far side needs no route back to the sandbox's /30). The
forwarding this needs is switched on here, in the current namespace, for exactly the interfaces
involved, never assumed from the machine: ``forwarding`` on the sandbox's host end (it goes with
the interface) and on each interface the replies come in on (``eth0`` of a node). The latter is
shared, so the sandboxes that needed it are counted in a small ledger per namespace
(:data:`FORWARDING_DIR`); the last one's :func:`destroy` switches off what this module switched
on. An interface that already forwarded is left alone, before and after.

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
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
#: Ledgers of the interfaces whose IPv4 forwarding this module switched on, one per namespace.
FORWARDING_DIR = Path("/run/rayflow/local-forwarding")
#: ``SO_NETNS_COOKIE`` (Linux 5.14+): a namespace's identity, never reused while the system runs.
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)

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
    """(family, option, value) set on the host end before it comes up.

    ``forwarding`` when an endpoint is not on loopback: what the sandbox sends to a remote one
    comes in on the host end and must be routed on (the reply's interface is handled apart, see
    :func:`reply_interfaces`).
    """
    out = [("ipv6", "disable_ipv6", "1")]
    if any(t.loopback for t in targets):
        out.append(("ipv4", "route_localnet", "1"))
    if not netfilter.internal(targets):
        out.append(("ipv4", "forwarding", "1"))
    return out


def reply_interfaces(answers: Iterable[Sequence[Mapping[str, object]]]) -> list[str]:
    """Interfaces through which remote endpoints are reached, from ``ip -j route get`` answers.

    The replies come back on them, and are routed on to the sandbox only if they forward. An
    address of this namespace's own (answered ``local``, via ``lo``) is delivered, not forwarded.
    """
    out: list[str] = []
    for answer in answers:
        for route in answer:
            dev = str(route.get("dev", ""))
            if route.get("type") == "local" or dev in ("", "lo") or dev in out:
                continue
            out.append(dev)
    return out


#: interface -> ids of the sandboxes that need its forwarding on (this module switched it on).
Ledger = dict[str, list[str]]


def claim_forwarding(
    ledger: Mapping[str, Sequence[str]],
    sandbox_id: str,
    interfaces: Iterable[str],
    forwarding: Mapping[str, bool],
) -> tuple[Ledger, list[str]]:
    """The ledger with ``sandbox_id`` holding ``interfaces``, and which to switch on now.

    ``forwarding`` tells whether each interface forwards already. One that does and is not in the
    ledger belongs to someone else (the machine's router setup): left out, never switched off later.
    """
    out: Ledger = {dev: list(ids) for dev, ids in ledger.items()}
    switch_on = []
    for dev in interfaces:
        if dev not in out:
            if forwarding.get(dev, False):
                continue
            out[dev] = []
            switch_on.append(dev)
        if sandbox_id not in out[dev]:
            out[dev].append(sandbox_id)
    return out, switch_on


def release_forwarding(
    ledger: Mapping[str, Sequence[str]], sandbox_id: str, alive: Callable[[str], bool]
) -> tuple[Ledger, list[str]]:
    """The ledger without ``sandbox_id`` (nor sandboxes gone meanwhile), and which to switch off now."""
    out: Ledger = {}
    switch_off = []
    for dev, ids in ledger.items():
        left = [i for i in ids if i != sandbox_id and alive(i)]
        if left:
            out[dev] = left
        else:
            switch_off.append(dev)
    return out, switch_off


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


def _netns_key() -> str:
    """Names the current network namespace for its forwarding ledger."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        (cookie,) = struct.unpack("=Q", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        return f"cookie-{cookie}"
    # Older kernels: the namespace's inode (reusable once the namespace is gone, so second best).
    st = os.stat("/proc/self/ns/net")
    return f"inode-{st.st_dev}-{st.st_ino}"


def _ledger_path() -> Path:
    return FORWARDING_DIR / f"{_netns_key()}.json"


def _read_ledger(path: Path) -> Ledger:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): [str(i) for i in v] for k, v in data.items()} if isinstance(data, dict) else {}


def _write_ledger(path: Path, ledger: Ledger) -> None:
    if not ledger:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger))
    os.replace(tmp, path)


def _forwards(dev: str) -> bool:
    with contextlib.suppress(OSError):
        return Path(netfilter.interface_option_path(dev, "forwarding")).read_text().strip() == "1"
    return False


def _enable_reply_forwarding(sandbox_id: str, targets: Sequence[Target]) -> None:
    """Switch on forwarding on the interfaces remote ``targets`` answer through (caller holds the lock)."""
    remote = sorted({t.address for t in targets if not t.loopback})
    devices = reply_interfaces(_ip_json("route", "get", address) for address in remote)
    path = _ledger_path()
    forwarding = {dev: _forwards(dev) for dev in devices}
    ledger, switch_on = claim_forwarding(_read_ledger(path), sandbox_id, devices, forwarding)
    # The ledger first: a crash in between leaves a record that the last destroy follows.
    _write_ledger(path, ledger)
    for dev in switch_on:
        netfilter.set_interface_option(dev, "forwarding", "1")


def _release_reply_forwarding(sandbox_id: str) -> None:
    """Drop ``sandbox_id`` from the ledger; switch off what nobody needs any more (caller holds the lock)."""
    path = _ledger_path()
    if not path.exists():
        return
    ledger, switch_off = release_forwarding(_read_ledger(path), sandbox_id, exists)
    for dev in switch_off:
        # A vanished interface has nothing to switch off (its /proc/sys/net entry went with it).
        with contextlib.suppress(OSError, ConfigError):
            netfilter.set_interface_option(dev, "forwarding", "0")
    _write_ledger(path, ledger)


def create(sandbox_id: str, targets: Sequence[Target], pool: str = DEFAULT_POOL) -> Link:
    """Build the namespace, veth pair and fence of ``sandbox_id``; on any failure, remove them again.

    Everything is made in the caller's network namespace: run it inside a Ray node's namespace
    and the sandbox hangs off that node (its forwarding and masquerading included).
    """
    remote = not netfilter.internal(targets)
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
        if remote:
            with _locked():
                _enable_reply_forwarding(sandbox_id, targets)
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

    The rules go first, so nothing is ever left reachable without its fence; forwarding that
    only this sandbox needed is switched off last. Run it in the namespace :func:`create` ran in
    (the rules, the host end and the ledger are that namespace's).
    """
    netfilter.remove([sandbox_id], TAG_PREFIX)
    host_if = host_interface(sandbox_id)
    if Path(f"/sys/class/net/{host_if}").exists():
        _run(["ip", "link", "del", host_if])
    if (NETNS_DIR / netns_name(sandbox_id)).exists():
        _run(["ip", "netns", "del", netns_name(sandbox_id)])
    with _locked():
        _release_reply_forwarding(sandbox_id)


def exists(sandbox_id: str) -> bool:
    """True while the namespace of ``sandbox_id`` is still mounted."""
    return (NETNS_DIR / netns_name(sandbox_id)).exists()


def leftover_ids() -> set[str]:
    """Ids of local sandboxes that still have a namespace or tagged rules on this host."""
    names = set()
    with contextlib.suppress(OSError):
        names = {sandbox_id_of(p.name) for p in NETNS_DIR.iterdir()}
    return {i for i in names if i} | netfilter.listed_ids(TAG_PREFIX)
