"""Network policy of Docker sandboxes: a private bridge per sandbox and packet filter rules on it.

Why a bridge of its own: Docker's ``internal`` networks and the disabled inter-container
traffic option only keep a sandbox from the world and from its own network's members; the
host itself stays reachable on every port at the bridge's gateway address, since that traffic
goes to the host's ``INPUT`` chain, which Docker leaves alone. So each ``hub-only`` or
``allow-list`` sandbox gets a bridge that carries only its own container, and rules tagged with
the sandbox id decide what may leave it:

* ``INPUT``: from the bridge, only the allowed endpoints that live on the host; everything else
  addressed to the host (any of its addresses, other bridges' gateways included) is dropped;
* ``DOCKER-USER`` (the start of ``FORWARD``): from the bridge, only the allowed remote endpoints;
  into the bridge, only replies. Other sandboxes' bridges are thus unreachable both ways;
* ``nat PREROUTING``: an endpoint on the host's loopback (a hub bound to ``127.0.0.1``) is
  reached by the sandbox at its bridge's gateway address and rewritten to loopback; the bridge's
  ``route_localnet`` setting lets the kernel route such packets;
* IPv6 is dropped on the bridge whole (the container's IPv6 is also switched off).

Any other endpoint (a hub bound to its Ray node's address) is reached at its real address, with
no rewriting: accepted in ``INPUT`` when that address is the host's own, forwarded otherwise
(through the host's routes, e.g. into an isolated cluster's node namespaces).

The rules go where the engine's bridges are: the engine's network namespace
(:func:`engine_netns`), which is not the caller's when the caller is a Ray node of an isolated
cluster running in a namespace of its own. A hub on *that* caller's loopback is out of the
containers' reach, and such a policy is refused (:func:`check_targets`).

Each endpoint is allowed for TCP and UDP alike (the hub speaks QUIC over UDP). When every
endpoint is on loopback the bridge is also made ``internal``: the engine then drops whatever it
would forward off the bridge, a second fence behind these rules.

The rule sets and the iptables shell are shared with the local backend
(:mod:`rayflow.sandbox.netfilter`); this module adds what only Docker needs: the ``DOCKER-USER``
chain and the engine's embedded DNS. Rules are found again by their comment tag, so removal
needs no state and works from any process (``reap``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox import netfilter
from rayflow.sandbox.netfilter import (
    MAX_IFNAME,
    PROTOCOLS,
    TAG_PREFIX,
    Rule,
    Target,
    fence,
    insert_line,
    internal,
    resolve,
    restore_script,
    sandbox_address,
    tag,
    tagged_deletions,
)

__all__ = [
    "EMBEDDED_DNS",
    "MAX_IFNAME",
    "PROTOCOLS",
    "TAG_PREFIX",
    "Rule",
    "Target",
    "allow_loopback_routing",
    "apply",
    "block_embedded_dns",
    "check_targets",
    "engine_netns",
    "insert_line",
    "internal",
    "listed_ids",
    "remove",
    "resolve",
    "restore_script",
    "rules",
    "sandbox_address",
    "tag",
    "tagged_deletions",
]


#: Where a local Docker engine records its pid (dockerd's default, and the ``/var/run`` alias).
ENGINE_PIDFILES = ("/run/docker.pid", "/var/run/docker.pid")


def engine_netns() -> str | None:
    """The local engine's network namespace file when it is not this process's own, else ``None``.

    ``None`` also when no running ``dockerd`` is found through its pid file (a remote engine: no
    rule placed anywhere here would fence its bridges, as before).
    """
    for pidfile in ENGINE_PIDFILES:
        try:
            pid = int(Path(pidfile).read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() != "dockerd":
                continue
            theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
        except (OSError, ValueError):
            continue
        same = (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
        return None if same else f"/proc/{pid}/ns/net"
    return None


def check_targets(targets: Sequence[Target], netns: str | None) -> None:
    """Refuse loopback endpoints when the engine's namespace (``netns``) is not the caller's.

    The rewrite to loopback would land on the engine's loopback, not on the caller's where such a
    hub listens: the sandbox would silently reach nothing (or whatever else listens there).
    """
    if netns is not None and any(t.loopback for t in targets):
        raise ConfigError(
            "a Docker sandbox cannot reach an endpoint on the loopback of a process outside the Docker "
            "engine's network namespace (a Ray node of an isolated cluster); bind the hub to the "
            "node's address instead"
        )


def apply(rule_list: Sequence[Rule]) -> None:
    """Insert a sandbox's rules in the engine's network namespace."""
    netfilter.apply(rule_list, engine_netns())


def remove(sandbox_ids: Iterable[str], prefix: str = TAG_PREFIX) -> int:
    """Delete the rules tagged with ``sandbox_ids`` from the engine's network namespace."""
    return netfilter.remove(sandbox_ids, prefix, engine_netns())


def listed_ids(prefix: str = TAG_PREFIX) -> set[str]:
    """Ids of the sandboxes that still have rules in the engine's network namespace."""
    return netfilter.listed_ids(prefix, engine_netns())


def allow_loopback_routing(bridge: str) -> None:
    """Let packets rewritten to loopback be routed from ``bridge`` (in the engine's namespace)."""
    netfilter.allow_loopback_routing(bridge, engine_netns())


def rules(sandbox_id: str, bridge: str, gateway: str, targets: Sequence[Target]) -> list[Rule]:
    """Every rule of one sandbox's bridge; forwarded traffic is judged in ``DOCKER-USER``.

    Docker's engine masquerades its bridges itself, so the fence adds no address rewriting.
    """
    return fence(sandbox_id, bridge, gateway, targets, forward_chain="DOCKER-USER")


#: Docker's embedded DNS server inside containers on user-defined networks.
EMBEDDED_DNS = "127.0.0.11"


def block_embedded_dns(container_pid: int) -> None:
    """Refuse the embedded DNS server from inside the container's own network namespace.

    Why: on a user-defined network every container can query ``127.0.0.11``, and dockerd
    forwards names it does not know to the host's resolvers from the host side, outside the
    bridge rules: a channel out of a hub-only sandbox. Sandboxes reach their hub by address, so
    they need no DNS at all. The rule lives in the container's namespace and disappears with it.
    """
    command = [
        "nsenter", f"--target={container_pid}", "--net", "iptables", "-w", "-I", "OUTPUT",
        "-d", EMBEDDED_DNS, "-j", "REJECT",
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RayflowError(f"could not block the embedded DNS server of the sandbox: {exc}") from exc
