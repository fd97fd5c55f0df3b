"""Packet filter rules that fence a networked sandbox's interface: built as data, applied with iptables.

Shared by the backends that give a sandbox an interface of its own on the host (a Docker bridge,
a veth pair into a network namespace). The fence is the same for both:

* ``INPUT``: from the interface, only allowed endpoints that live on the host; anything else
  addressed to the host (any of its addresses, other sandboxes' gateways included) is dropped;
* the forward chain: from the interface, only allowed remote endpoints; into it, only replies.
  Other sandboxes are thus unreachable both ways;
* ``nat PREROUTING``: an endpoint on the host's loopback (a hub bound to ``127.0.0.1``) is reached
  by the sandbox at its gateway address and rewritten to loopback (the interface's
  ``route_localnet`` setting lets the kernel route such packets);
* IPv6 from or to the interface is dropped whole.

An endpoint at any other address is reached at that very address, with no rewriting: a hub bound
to its node's address (``100.90.1.10``), on this host or on another node. Its accept rule goes
into ``INPUT`` *and* the forward chain: each matches only where such packets go (to one of the
host's own addresses, or through the host), so whether the endpoint lives on this host needs no
deciding at creation and the rule stays right if it moves.

Each endpoint is allowed for TCP and UDP alike (the hub speaks QUIC over UDP). Every rule carries
a comment tag naming the sandbox, so removal needs no state and works from any process: a later
sweep reads ``iptables-save`` and deletes what it finds. Each backend tags with its own prefix,
so one backend's sweep never takes another's rules.

The rule sets are pure functions (tested without a kernel); the functions after them run
``iptables-save``/``iptables-restore``, in the caller's network namespace or, given ``netns`` (the
path of a namespace file), in that one through ``nsenter`` (Docker's bridges live in the engine's
namespace, which a Ray node running in a namespace of its own is not in).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox.spec import NetworkPolicy

#: Default prefix of the comment on every rule; the sandbox id follows it.
TAG_PREFIX = "rayflow-sandbox="
PROTOCOLS = ("tcp", "udp")
#: Longest a network interface name may be (IFNAMSIZ - 1).
MAX_IFNAME = 15


@dataclass(frozen=True)
class Target:
    """An allowed endpoint as the packet filter sees it."""

    #: IPv4 address the rule matches on the host side (after address rewriting).
    address: str
    port: int
    #: True when the endpoint is on the host's loopback, reached through the gateway address.
    loopback: bool


@dataclass(frozen=True)
class Rule:
    """One packet filter rule: ``iptables -t table -I chain 1 *args`` (v6: ``ip6tables``)."""

    table: str
    chain: str
    args: tuple[str, ...]
    ipv6: bool = False


def tag(sandbox_id: str, prefix: str = TAG_PREFIX) -> str:
    return f"{prefix}{sandbox_id}"


def resolve(policy: NetworkPolicy) -> list[Target]:
    """Turn the policy's endpoints into IPv4 targets, resolving host names now (on the host).

    Why resolve at creation: the rules match addresses, and a name resolved later inside the
    sandbox (which has no DNS server it may reach) could not be followed anyway.
    """
    targets: list[Target] = []
    for endpoint in policy.allow:
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET)
        except OSError as exc:
            raise ConfigError(f"cannot resolve allowed host {endpoint.host!r}: {exc}") from exc
        for address in sorted({str(info[4][0]) for info in infos}):
            ip = ipaddress.IPv4Address(address)
            targets.append(Target(address, endpoint.port, ip.is_loopback))
    if not targets:
        raise ConfigError("the network policy allows no reachable address")
    return targets


def internal(targets: Sequence[Target]) -> bool:
    """True when no target needs a route out of the host (then nothing is forwarded)."""
    return all(t.loopback for t in targets)


def sandbox_address(target: Target, gateway: str) -> str:
    """Where the sandbox sends packets for ``target``: the gateway for loopback endpoints."""
    return gateway if target.loopback else target.address


def fence(
    sandbox_id: str,
    interface: str,
    gateway: str,
    targets: Sequence[Target],
    *,
    forward_chain: str,
    prefix: str = TAG_PREFIX,
    masquerade_source: str | None = None,
) -> list[Rule]:
    """Every rule of one sandbox's fence, each inserted at the top of its chain in list order.

    ``forward_chain`` is where forwarded traffic is judged (``DOCKER-USER`` under Docker, else
    ``FORWARD``). ``masquerade_source``, when given, is the sandbox's address, rewritten to the
    host's on the way to a remote endpoint (Docker's engine does that for its bridges itself).

    Because each rule is inserted at position 1, a later rule ends up *above* an earlier one:
    the list therefore starts with the catch-all drops and ends with the specific accepts.
    """
    if not interface or len(interface) > MAX_IFNAME:
        raise ConfigError(f"invalid interface name {interface!r}")
    comment = ("-m", "comment", "--comment", tag(sandbox_id, prefix))
    out: list[Rule] = [
        Rule("filter", "INPUT", ("-i", interface, *comment, "-j", "DROP")),
        Rule("filter", forward_chain, ("-o", interface, *comment, "-j", "DROP")),
        Rule("filter", forward_chain, ("-i", interface, *comment, "-j", "DROP")),
        Rule("filter", "INPUT", ("-i", interface, *comment, "-j", "DROP"), ipv6=True),
        Rule("filter", "FORWARD", ("-i", interface, *comment, "-j", "DROP"), ipv6=True),
        Rule("filter", "FORWARD", ("-o", interface, *comment, "-j", "DROP"), ipv6=True),
    ]
    if not internal(targets):
        replies = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
        out.append(Rule("filter", forward_chain, ("-o", interface, *replies, *comment, "-j", "ACCEPT")))
        if masquerade_source is not None:
            source = ("-s", f"{masquerade_source}/32", "!", "-o", interface)
            out.append(Rule("nat", "POSTROUTING", (*source, *comment, "-j", "MASQUERADE")))
    for target in targets:
        for proto in PROTOCOLS:
            match = ("-p", proto, "-d", target.address, "--dport", str(target.port))
            if target.loopback:
                dnat = ("-p", proto, "-d", gateway, "--dport", str(target.port))
                to = f"{target.address}:{target.port}"
                out.append(
                    Rule(
                        "nat",
                        "PREROUTING",
                        ("-i", interface, *dnat, *comment, "-j", "DNAT", "--to-destination", to),
                    )
                )
                out.append(Rule("filter", "INPUT", ("-i", interface, *match, *comment, "-j", "ACCEPT")))
            else:
                # At its real address: delivered here (INPUT) when it is one of the host's own
                # addresses, forwarded otherwise; each rule matches only its own case.
                out.append(Rule("filter", "INPUT", ("-i", interface, *match, *comment, "-j", "ACCEPT")))
                out.append(Rule("filter", forward_chain, ("-i", interface, *match, *comment, "-j", "ACCEPT")))
    return out


def _tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(r'--comment "?' + re.escape(prefix) + r'([A-Za-z0-9_.-]+)"?(?:\s|$)')


def tagged_deletions(
    dump: str, wanted: Iterable[str] | None = None, prefix: str = TAG_PREFIX
) -> list[tuple[str, str, str]]:
    """(sandbox id, table, ``-D`` line) for each rule tagged with ``prefix`` in an ``iptables-save`` dump.

    ``wanted`` limits the result to those sandbox ids; ``None`` means every tagged rule. A saved
    ``-A`` line with ``-A`` turned into ``-D`` deletes exactly that rule when restored.
    """
    keep = None if wanted is None else set(wanted)
    pattern = _tag_pattern(prefix)
    out = []
    table = ""
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A ") or not table:
            continue
        found = pattern.search(line)
        if found is None:
            continue
        sandbox_id = found.group(1)
        if keep is None or sandbox_id in keep:
            out.append((sandbox_id, table, "-D " + line[3:]))
    return out


def restore_script(lines: Iterable[tuple[str, str]]) -> str:
    """An ``iptables-restore --noflush`` input applying (table, rule line) pairs, one commit per table."""
    tables: dict[str, list[str]] = {}
    for table, line in lines:
        tables.setdefault(table, []).append(line)
    return "".join(
        f"*{table}\n" + "".join(f"{line}\n" for line in body) + "COMMIT\n" for table, body in tables.items()
    )


_PLAIN_ARG = re.compile(r"^[A-Za-z0-9_.,:/=@%+!-]+$")


def restore_quote(arg: str) -> str:
    """``arg`` as ``iptables-restore`` reads it: bare, or in double quotes (it knows no single quotes).

    Why not :func:`shlex.quote`: it quotes ``!`` (the negation of ``! -o``) in single quotes,
    which ``iptables-restore`` takes literally and refuses.
    """
    if _PLAIN_ARG.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def insert_line(rule: Rule) -> str:
    return " ".join(restore_quote(a) for a in ("-I", rule.chain, "1", *rule.args))


# --- the shell: running iptables ----------------------------------------------------------------
def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run in the network namespace file ``netns`` (``nsenter``), or as is for ``None``."""
    return list(argv) if netns is None else ["nsenter", f"--net={netns}", *argv]


def _tool(ipv6: bool, action: str) -> str | None:
    """Path of ``iptables-save``/``iptables-restore`` (``ip6tables-*`` for IPv6), if installed."""
    return shutil.which(f"{'ip6tables' if ipv6 else 'iptables'}-{action}")


def _restore(ipv6: bool, script: str, netns: str | None = None) -> subprocess.CompletedProcess[str] | None:
    tool = _tool(ipv6, "restore")
    if tool is None or not script:
        return None
    return subprocess.run(
        in_netns(netns, [tool, "-w", "--noflush"]),
        input=script, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def apply(rule_list: Sequence[Rule], netns: str | None = None) -> None:
    """Insert ``rule_list``, one atomic commit per table; IPv6 rules only where ip6tables works.

    Why ``iptables-restore``: one process for all of a sandbox's rules instead of one per rule
    (each costs ~10 ms), and a table's rules land together or not at all.
    """
    if _tool(False, "restore") is None:
        raise ConfigError("hub-only and allow-list sandboxes need iptables-restore on PATH")
    for ipv6 in (False, True):
        script = restore_script((r.table, insert_line(r)) for r in rule_list if r.ipv6 is ipv6)
        done = _restore(ipv6, script, netns)
        if done is not None and done.returncode != 0 and not ipv6:
            raise RayflowError(f"iptables refused the sandbox's rules: {done.stderr.strip()}")


def _dump(ipv6: bool, netns: str | None = None) -> str:
    tool = _tool(ipv6, "save")
    if tool is None:
        return ""
    done = subprocess.run(in_netns(netns, [tool]), capture_output=True, text=True, timeout=30, check=False)
    return done.stdout if done.returncode == 0 else ""


def listed_ids(prefix: str = TAG_PREFIX, netns: str | None = None) -> set[str]:
    """Ids of every sandbox that still has rules tagged with ``prefix``."""
    return {
        sandbox_id
        for ipv6 in (False, True)
        for sandbox_id, _, _ in tagged_deletions(_dump(ipv6, netns), prefix=prefix)
    }


def remove(sandbox_ids: Iterable[str], prefix: str = TAG_PREFIX, netns: str | None = None) -> int:
    """Delete every rule tagged with one of ``sandbox_ids``; returns how many were deleted."""
    wanted = set(sandbox_ids)
    deleted = 0
    for ipv6 in (False, True) if wanted else ():
        found = tagged_deletions(_dump(ipv6, netns), wanted, prefix)
        done = _restore(ipv6, restore_script((table, line) for _, table, line in found), netns)
        if done is None or done.returncode == 0:
            deleted += len(found)
            continue
        # One rule vanished meanwhile (another process removing the same sandbox) and the
        # table's commit failed whole: delete the rest one by one.
        binary = shutil.which("ip6tables" if ipv6 else "iptables")
        for _, table, line in found if binary else ():
            one = subprocess.run(
                in_netns(netns, [binary, "-w", "-t", table, *shlex.split(line)]),
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            deleted += one.returncode == 0
    return deleted


def allow_loopback_routing(interface: str, netns: str | None = None) -> None:
    """Let packets rewritten to a loopback address be routed when they arrive on ``interface``."""
    set_interface_option(interface, "route_localnet", "1", netns=netns)


def interface_option_path(interface: str, option: str, family: str = "ipv4") -> str:
    """``/proc/sys/net/<family>/conf/<interface>/<option>``, after checking both names."""
    for part in (interface, option):
        if not part or "/" in part or part.startswith("."):
            raise ConfigError(f"invalid interface setting {interface!r}/{option!r}")
    return f"/proc/sys/net/{family}/conf/{interface}/{option}"


def set_interface_option(
    interface: str, option: str, value: str, family: str = "ipv4", netns: str | None = None
) -> None:
    """Write an interface's ``/proc/sys/net`` setting in the caller's network namespace, or in ``netns``."""
    path = interface_option_path(interface, option, family)
    if netns is None:
        with open(path, "w") as f:
            f.write(value)
        return
    # /proc/sys/net shows the namespace of whoever opens it: open it from inside ``netns``.
    done = subprocess.run(
        in_netns(netns, ["sh", "-c", 'printf %s "$1" > "$0"', path, value]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RayflowError(f"could not set {path} in {netns}: {done.stderr.strip()}")
