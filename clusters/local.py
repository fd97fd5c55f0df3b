"""Starts, inspects and stops a multi-region Ray cluster whose nodes all run on this machine.

Why: rayflow places agents by region. Testing that placement, or demonstrating it, needs a
cluster whose nodes really are separate Ray nodes with region resources and labels, without
any cloud account. Every node here is a ``ray start --block`` process in its own process
session; its pid is recorded in a state file so that ``down`` stops exactly those processes
(never every Ray process on the machine, as ``ray stop`` would).

Usage (from the repository root)::

    .venv/bin/python -m clusters.local up     [--config clusters/local-regions.yaml] [--state-dir DIR]
    .venv/bin/python -m clusters.local status [--config ...] [--state-dir DIR]
    .venv/bin/python -m clusters.local down   [--config ...] [--state-dir DIR]
    .venv/bin/python -m clusters.local kill-node eu-central-0 [--config ...] [--state-dir DIR]

Each node carries the resource ``region:<name>`` (quantity 1) and the labels
``rayflow/region=<name>`` and ``rayflow/node=<name>-<index>``. Work is pinned to a region by
asking for a small fraction of the region resource, e.g. ``resources={"region:us-west": 0.01}``,
so that the resource marks the region without limiting how many tasks run there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (python clusters/local.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.placement import REGION_LABEL_KEY
from clusters import link_emulator, netns_fabric
from clusters.cluster_config import (
    ClusterSpec,
    RegionSpec,
    load_cluster_config,
)
from rayflow.errors import ConfigError, RayflowError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "clusters" / "local-regions.yaml"
DEFAULT_STATE_ROOT = REPO_ROOT / ".rayflow" / "clusters"
STATE_FILE_NAME = "state.json"
NODE_LABEL_KEY = "rayflow/node"

#: Environment for every Ray process started here: no usage reports leave the machine.
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}


AUTH_TOKEN_FILE = "ray-auth-token"


def cluster_auth_env(state_dir: Path) -> dict[str, str]:
    """Environment that makes Ray nodes and drivers use this cluster's auth token.

    Ray (2.5x) turns token authentication on by itself once ``~/.ray/auth_token`` exists, which
    makes nodes and drivers started with different settings refuse each other. A token already
    given in the environment (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) is used as is;
    otherwise the cluster gets its own (0600, in its state directory), named explicitly to every
    process that belongs to it.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {"RAY_AUTH_MODE": "token"}
    path = Path(state_dir) / AUTH_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@contextmanager
def driver_env(state_dir: Path) -> Iterator[None]:
    """This process's Ray driver environment for the cluster in ``state_dir``, restored afterwards.

    Ray caches the token it loaded per process, so a process should drive one cluster's token
    only; with a token in the environment nothing changes here.
    """
    wanted = cluster_auth_env(state_dir)
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class NodeRecord:
    """One started node: which region it serves and the pid of its ``ray start --block``."""

    region: str
    index: int
    is_head: bool
    pid: int
    log_path: str
    #: The node's own address (isolated clusters); empty when nodes share the host's.
    address: str = ""

    @property
    def node_label(self) -> str:
        """The value of the ``rayflow/node`` label that identifies this node in Ray."""
        return f"{self.region}-{self.index}"


@dataclass(frozen=True)
class ClusterState:
    """What ``up`` leaves behind for ``status`` and ``down``: address, Ray temp dir, nodes."""

    name: str
    address: str
    temp_dir: str
    nodes: tuple[NodeRecord, ...]
    #: ``none`` or ``netns`` (see :mod:`clusters.cluster_config`).
    isolation: str = "none"
    #: The dashboard (and job submission) URL, reachable from the host; empty when not started.
    dashboard_url: str = ""
    #: Ray Client address for drivers outside the cluster's nodes (isolated clusters).
    client_address: str = ""
    #: The link emulator's pid and control socket (isolated clusters).
    emulator_pid: int = 0
    emulator_control: str = ""
    #: The prefix of every namespace and interface of the cluster's network (isolated clusters).
    fabric_prefix: str = ""

    def save(self, state_dir: Path) -> None:
        """Write the state atomically, so a crash never leaves half a file."""
        state_dir.mkdir(parents=True, exist_ok=True)
        target = state_dir / STATE_FILE_NAME
        scratch = target.with_suffix(".tmp")
        scratch.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        scratch.replace(target)


@dataclass(frozen=True)
class NodeStatus:
    """How one recorded node is doing, seen from its process and from Ray."""

    record: NodeRecord
    process_running: bool
    ray_alive: bool
    cpus: float
    region_resource: float
    #: Ray's id of the node (isolated clusters report it; empty when unknown).
    node_id: str = ""


def load_state(state_dir: Path) -> ClusterState | None:
    """The recorded state in ``state_dir``, or None when no cluster was started from it."""
    path = Path(state_dir) / STATE_FILE_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data["nodes"] = tuple(NodeRecord(**node) for node in data["nodes"])
    return ClusterState(**data)


def default_state_dir(spec: ClusterSpec) -> Path:
    """Where a cluster's state and node logs go unless told otherwise (git-ignored)."""
    return DEFAULT_STATE_ROOT / spec.name


# --- up ---------------------------------------------------------------------------------------
def up(spec: ClusterSpec, state_dir: Path, timeout_s: float = 120.0) -> ClusterState:
    """Start the head, then every other node, and wait until Ray sees all of them alive.

    On any failure the nodes already started are stopped again before the error is raised.
    With ``isolation: netns`` every node runs in network and mount namespaces of its own (see
    :func:`_up_isolated`).
    """
    state_dir = Path(state_dir)
    previous = load_state(state_dir)
    if previous is not None:
        if any(_is_our_process(node.pid, previous.temp_dir) for node in previous.nodes):
            raise RayflowError(
                f"cluster {previous.name!r} from {state_dir} is still up at {previous.address}; "
                "run `down` first",
                state_dir=str(state_dir),
            )
        _stop_nodes(previous, grace_s=0.0)
        _forget(previous, state_dir)
    if spec.isolation == "netns":
        return _up_isolated(spec, state_dir, timeout_s)

    if not _port_is_free(spec.head_port):
        raise ConfigError(
            f"head_port {spec.head_port} is already in use on this machine; pick another in the config",
            key="head_port",
        )
    ray_cli = _ray_cli()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Ray puts unix sockets under its temp dir; a short path keeps them under the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    deadline = time.monotonic() + timeout_s

    placements = [(region, index) for region in spec.regions for index in range(region.nodes)]
    head_region, _ = placements[0]
    started: list[NodeRecord] = []
    address = ""
    try:
        head = _launch_node(
            ray_cli, spec, head_region, 0, log_dir, temp_dir, head_address=None, state_dir=state_dir
        )
        started.append(head)
        # Saved before waiting, so that `down` can stop a head whose start-up hangs.
        ClusterState(spec.name, address, temp_dir, tuple(started)).save(state_dir)
        address = _wait_for_head_address(head, temp_dir, deadline)
        for region, index in placements[1:]:
            started.append(
                _launch_node(
                    ray_cli, spec, region, index, log_dir, temp_dir, head_address=address, state_dir=state_dir
                )
            )
        state = ClusterState(spec.name, address, temp_dir, tuple(started))
        state.save(state_dir)
        with driver_env(state_dir):
            _wait_for_nodes(state, spec.node_count, deadline)
    except BaseException:
        partial = ClusterState(spec.name, address, temp_dir, tuple(started))
        _stop_nodes(partial)
        _forget(partial, state_dir)
        raise
    return state


def _launch_node(
    ray_cli: str,
    spec: ClusterSpec,
    region: RegionSpec,
    index: int,
    log_dir: Path,
    temp_dir: str,
    head_address: str | None,
    state_dir: Path,
) -> NodeRecord:
    is_head = head_address is None
    labels = f"{REGION_LABEL_KEY}={region.name},{NODE_LABEL_KEY}={region.name}-{index}"
    command = [
        ray_cli,
        "start",
        "--block",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={region.cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps({region.resource: 1})}",
        f"--labels={labels}",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
        # Ray's fixed default ports would collide between nodes on one machine.
        f"--dashboard-agent-listen-port={free_tcp_port()}",
    ]
    if is_head:
        command += [
            "--head",
            f"--port={spec.head_port}",
            "--include-dashboard=false",
            f"--dashboard-port={free_tcp_port()}",
            f"--ray-client-server-port={free_tcp_port()}",
        ]
    else:
        command.append(f"--address={head_address}")

    log_path = log_dir / f"{region.name}-{index}.log"
    env = {**os.environ, **_RAY_ENV, **cluster_auth_env(state_dir)}
    process = start_in_own_session(command, log_path, env, cwd=REPO_ROOT)
    return NodeRecord(
        region=region.name, index=index, is_head=is_head, pid=process.pid, log_path=str(log_path)
    )


# --- isolated nodes: network and mount namespaces of their own ----------------------------------
#: Where a node's private ``/tmp`` lives on the host (under the cluster's state directory), bound
#: over ``/tmp`` inside the node's mount namespace: Ray's session directory and rayflow's state go
#: there, invisible to every other node.
NODE_ROOTS = "nodes"
#: The dashboard and Ray Client ports of an isolated head (each node has its own addresses, so
#: Ray's usual ports cannot collide).
ISOLATED_DASHBOARD_PORT = 8265
ISOLATED_CLIENT_PORT = 10001
#: Ray's temp dir inside every isolated node (short: Ray's unix socket paths must stay < 108 bytes).
ISOLATED_TEMP_DIR = "/tmp/rf"


def _up_isolated(spec: ClusterSpec, state_dir: Path, timeout_s: float) -> ClusterState:
    """Network namespaces, bridges, the link emulator, then the nodes, each in its namespaces.

    Leftovers of a crashed run of the same cluster (namespaces, interfaces named with its prefix)
    are removed first. Needs root (namespaces, TUN devices, bind mounts).
    """
    if os.geteuid() != 0:
        raise ConfigError("an isolated cluster (isolation: netns) needs root", key="isolation")
    fabric = netns_fabric.plan_fabric(spec.name, [(r.name, r.nodes) for r in spec.regions], spec.subnet)
    netns_fabric.teardown(fabric.prefix)
    ray_cli = _ray_cli()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    temp_marker = f"{ISOLATED_TEMP_DIR}-{fabric.prefix}"
    deadline = time.monotonic() + timeout_s
    head_net = fabric.nodes[0]
    state = ClusterState(
        spec.name,
        f"{head_net.address}:{spec.head_port}",
        temp_marker,
        (),
        isolation="netns",
        dashboard_url=f"http://{head_net.address}:{ISOLATED_DASHBOARD_PORT}",
        client_address=f"ray://{head_net.address}:{ISOLATED_CLIENT_PORT}",
        emulator_control=str(state_dir / "link-emulator.sock"),
        fabric_prefix=fabric.prefix,
    )
    state.save(state_dir)
    try:
        netns_fabric.apply(fabric)
        (state_dir / "fabric.json").write_text(fabric.to_json(), encoding="utf-8")
        emulator_pid = _start_emulator(spec, fabric, state_dir, log_dir, deadline)
        state = dataclasses.replace(state, emulator_pid=emulator_pid)
        state.save(state_dir)
        started: list[NodeRecord] = []
        for node_net in fabric.nodes:
            region = next(r for r in spec.regions if r.name == node_net.region)
            record = _launch_isolated_node(ray_cli, spec, region, node_net, log_dir, state_dir, temp_marker,
                                           head=None if not started else head_net.address)  # fmt: skip
            started.append(record)
            state = dataclasses.replace(state, nodes=tuple(started))
            state.save(state_dir)
            if len(started) == 1:
                _wait_for_tcp(head_net.address, spec.head_port, record, temp_marker, deadline)
        _wait_for_dashboard_nodes(state, spec.node_count, deadline)
    except BaseException:
        _stop_nodes(state, grace_s=5.0)
        _forget(state, state_dir)
        raise
    return state


def _start_emulator(
    spec: ClusterSpec, fabric: netns_fabric.Fabric, state_dir: Path, log_dir: Path, deadline: float
) -> int:
    spec_path = state_dir / "link-emulator.json"
    spec_path.write_text(json.dumps(fabric.emulator_spec([link.to_emulator() for link in spec.links])))
    ready = state_dir / "link-emulator.ready"
    ready.unlink(missing_ok=True)
    command = [
        "ip", "netns", "exec", fabric.router_namespace, sys.executable, "-m", "clusters.link_emulator",
        "--spec", str(spec_path), "--control", str(state_dir / "link-emulator.sock"), "--ready-file", str(ready),
    ]  # fmt: skip
    process = start_in_own_session(command, log_dir / "link-emulator.log", dict(os.environ), cwd=REPO_ROOT)
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RayflowError(
                f"the link emulator did not start:\n{_tail(log_dir / 'link-emulator.log')}",
                log=str(log_dir / "link-emulator.log"),
            )
        time.sleep(0.05)
    return process.pid


def _launch_isolated_node(
    ray_cli: str,
    spec: ClusterSpec,
    region: RegionSpec,
    net: netns_fabric.NodeNet,
    log_dir: Path,
    state_dir: Path,
    temp_dir: str,
    head: str | None,
) -> NodeRecord:
    labels = f"{REGION_LABEL_KEY}={region.name},{NODE_LABEL_KEY}={region.name}-{net.index}"
    root = state_dir / NODE_ROOTS / f"{region.name}-{net.index}"
    private_tmp = root / "tmp"
    shutil.rmtree(root, ignore_errors=True)
    private_tmp.mkdir(parents=True, mode=0o1777)
    os.chmod(private_tmp, 0o1777)
    ray = [
        ray_cli, "start", "--block", "--disable-usage-stats", "--log-style=record", "--log-color=false",
        f"--temp-dir={temp_dir}", f"--node-ip-address={net.address}", f"--num-cpus={region.cpus}", "--num-gpus=0",
        f"--resources={json.dumps({region.resource: 1})}", f"--labels={labels}",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
    ]  # fmt: skip
    if head is None:
        ray += [
            "--head", f"--port={spec.head_port}", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
            f"--dashboard-port={ISOLATED_DASHBOARD_PORT}", f"--ray-client-server-port={ISOLATED_CLIENT_PORT}",
        ]  # fmt: skip
    else:
        ray.append(f"--address={head}:{spec.head_port}")
    # A mount namespace of the node's own in which its private directory is /tmp: Ray's session,
    # rayflow's state (RAYFLOW_STATE_DIR) and everything else a process puts in /tmp stay on it.
    command = [
        "ip", "netns", "exec", net.namespace, "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount --bind "$0" /tmp && exec "$@"', str(private_tmp), *ray,
    ]  # fmt: skip
    env = {
        **os.environ,
        **_RAY_ENV,
        **_token_by_value(cluster_auth_env(state_dir)),
        "RAYFLOW_STATE_DIR": "/tmp/rayflow-state",
        "TMPDIR": "/tmp",
        # A job's entrypoint (`python ...`) runs with the node's PATH: the environment the node
        # runs from comes first, as on a host built from one image.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    log_path = log_dir / f"{region.name}-{net.index}.log"
    process = start_in_own_session(command, log_path, env, cwd=REPO_ROOT)
    return NodeRecord(
        region=region.name, index=net.index, is_head=head is None, pid=process.pid,
        log_path=str(log_path), address=net.address,
    )  # fmt: skip


def _token_by_value(auth: Mapping[str, str]) -> dict[str, str]:
    """The auth settings with the token itself rather than its path: a node's private /tmp may
    hide the host path (a state directory under /tmp), as a real node would not have it either."""
    out = dict(auth)
    path = out.pop("RAY_AUTH_TOKEN_PATH", None)
    if path is not None:
        out["RAY_AUTH_TOKEN"] = Path(path).read_text(encoding="utf-8").strip()
    return out


def _wait_for_tcp(host: str, port: int, node: NodeRecord, temp_dir: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        # Refused or unreachable: the head is still starting (unless it died, checked next).
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        _require_running(node, temp_dir)
        time.sleep(0.2)
    raise RayflowError(f"the head node did not come up in time; see {node.log_path}", log=node.log_path)


def dashboard_nodes(dashboard_url: str, state_dir: Path) -> list[dict[str, Any]]:
    """Every node the cluster knows, from its dashboard (the host needs no Ray node of its own)."""
    with driver_env(state_dir):
        # Imported inside: Ray reads the auth settings when it is first imported.
        from ray.util.state import list_nodes

        nodes = list_nodes(address=dashboard_url, detail=True, timeout=10, raise_on_missing_output=False)
    return [
        {
            "node_id": node.node_id,
            "address": node.node_ip,
            "alive": node.state == "ALIVE",
            "labels": dict(node.labels or {}),
            "resources": dict(node.resources_total or {}),
            "is_head": bool(node.is_head_node),
        }
        for node in nodes
    ]


def _wait_for_dashboard_nodes(state: ClusterState, expected: int, deadline: float) -> None:
    state_dir = Path(state.emulator_control).parent
    last_error = ""
    while time.monotonic() < deadline:
        for node in state.nodes:
            _require_running(node, state.temp_dir)
        try:
            alive = [n for n in dashboard_nodes(state.dashboard_url, state_dir) if n["alive"]]
            if len({n["labels"].get(NODE_LABEL_KEY) for n in alive} - {None}) >= expected:
                return
        except Exception as exc:  # noqa: BLE001 - the dashboard answers only once it is up
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise RayflowError(
        f"not all {expected} nodes joined in time ({last_error or 'too few alive'}); logs in "
        f"{Path(state.nodes[0].log_path).parent if state.nodes else state_dir}",
    )


def set_link(state_dir: Path, op: str, a: str, b: str, **params: float) -> dict[str, Any]:
    """``partition``, ``heal`` or ``set`` the link between regions ``a`` and ``b`` of a running cluster."""
    state = load_state(Path(state_dir))
    if state is None or state.isolation != "netns":
        raise ConfigError(f"no isolated cluster is recorded in {state_dir}", state_dir=str(state_dir))
    try:
        answer = link_emulator.control_request(
            state.emulator_control, {"op": op, "between": [a, b], **params}
        )
    except OSError as exc:
        raise RayflowError(f"the link emulator does not answer: {exc}") from None
    if not answer.get("ok"):
        raise ConfigError(str(answer.get("error")), op=op)
    return answer


def _wait_for_head_address(head: NodeRecord, temp_dir: str, deadline: float) -> str:
    # `ray start` writes the cluster address into its temp dir once the head is up.
    address_file = Path(temp_dir) / "ray_current_cluster"
    while time.monotonic() < deadline:
        if address_file.exists():
            address = address_file.read_text(encoding="utf-8").strip()
            if address:
                return address
        _require_running(head, temp_dir)
        time.sleep(0.2)
    raise RayflowError(f"the head node did not come up in time; see {head.log_path}", log=head.log_path)


def _wait_for_nodes(state: ClusterState, expected: int, deadline: float) -> None:
    # Ray is imported only where a driver is needed: validating a config or stopping a
    # cluster should not pay for importing it.
    import ray

    ray.init(address=state.address, logging_level="WARNING", log_to_driver=False)
    try:
        while True:
            alive = {node_label for node_label, is_alive, _ in _ray_nodes(ray) if is_alive}
            if len(alive & {node.node_label for node in state.nodes}) >= expected:
                return
            for node in state.nodes:
                _require_running(node, state.temp_dir)
            if time.monotonic() >= deadline:
                raise RayflowError(
                    f"only {len(alive)} of {expected} nodes joined in time; logs in "
                    f"{Path(state.nodes[0].log_path).parent}",
                )
            time.sleep(0.5)
    finally:
        ray.shutdown()


def _require_running(node: NodeRecord, temp_dir: str) -> None:
    # A node this process started is judged by its exit status, not by /proc: while a launch
    # command execs its way to `ray start` (ip netns exec -> unshare -> sh -> ray), its command
    # line can read empty for a moment, which /proc-based checks would take for a stranger.
    launched = _LAUNCHED.get(node.pid)
    if launched is not None:
        status = launched.poll()
        if status is None:
            return
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        raise RayflowError(
            f"node {node.node_label} exited during start-up ({how}):\n{_tail(Path(node.log_path))}",
            log=node.log_path,
        )
    if not _is_our_process(node.pid, temp_dir):
        raise RayflowError(
            f"node {node.node_label} exited during start-up:\n{_tail(Path(node.log_path))}",
            log=node.log_path,
        )


# --- status -----------------------------------------------------------------------------------
def status(state_dir: Path) -> list[NodeStatus]:
    """Each recorded node's process state and, when the cluster answers, its Ray view.

    Raises :class:`ConfigError` when no cluster was started from ``state_dir``.
    """
    state = load_state(Path(state_dir))
    if state is None:
        raise ConfigError(f"no cluster is recorded in {state_dir}; run `up` first", state_dir=str(state_dir))
    running = {node.pid: _is_our_process(node.pid, state.temp_dir) for node in state.nodes}
    ray_view: dict[str, tuple[bool, dict[str, float]]] = {}
    node_ids: dict[str, str] = {}
    if any(running.values()) and state.isolation == "netns":
        try:
            for node in dashboard_nodes(state.dashboard_url, Path(state_dir)):
                label = node["labels"].get(NODE_LABEL_KEY)
                if label and (node["alive"] or label not in ray_view):
                    ray_view[label] = (node["alive"], node["resources"])
                    node_ids[label] = node["node_id"]
        except Exception:  # noqa: BLE001 - a cluster whose dashboard is down shows every node absent
            ray_view = {}
    elif any(running.values()) and state.address:
        with driver_env(state_dir):
            import ray

            ray.init(address=state.address, logging_level="WARNING", log_to_driver=False)
            try:
                ray_view = {label: (alive, resources) for label, alive, resources in _ray_nodes(ray)}
            finally:
                ray.shutdown()
    result = []
    for node in state.nodes:
        alive, resources = ray_view.get(node.node_label, (False, {}))
        result.append(
            NodeStatus(
                record=node,
                process_running=running[node.pid],
                ray_alive=alive,
                cpus=resources.get("CPU", 0.0),
                region_resource=resources.get(f"region:{node.region}", 0.0),
                node_id=node_ids.get(node.node_label, ""),
            )
        )
    return result


def _ray_nodes(ray: Any) -> list[tuple[str, bool, dict[str, float]]]:
    """(rayflow/node label, alive, resources) of every node Ray knows that we labelled."""
    out = []
    for node in ray.nodes():
        label = (node.get("Labels") or {}).get(NODE_LABEL_KEY)
        if label:
            out.append((label, bool(node.get("Alive")), dict(node.get("Resources") or {})))
    return out


# --- down -------------------------------------------------------------------------------------
def down(state_dir: Path, grace_s: float = 30.0) -> int:
    """Stop every node recorded in ``state_dir``; returns how many were still running.

    Stopping a cluster that is not up is not an error: it returns 0.
    """
    state = load_state(Path(state_dir))
    if state is None:
        return 0
    stopped = _stop_nodes(state, grace_s)
    _forget(state, Path(state_dir))
    return stopped


def kill_node(state_dir: Path, label: str) -> NodeRecord:
    """Kill the non-head node ``label`` (``<region>-<index>``) at once, as a machine that loses power.

    Every Ray process of the node gets SIGKILL (nothing shuts down cleanly, nothing is drained), so
    the rest of the cluster learns of the loss the way it would of a real one: by missed heartbeats.
    The node stays dead (``status`` shows it) until ``down``, which still cleans up after it. The
    head cannot be killed this way: the cluster would be gone, which ``down`` says better.
    """
    state = load_state(Path(state_dir))
    if state is None:
        raise ConfigError(f"no cluster is recorded in {state_dir}; run `up` first", state_dir=str(state_dir))
    labels = [node.node_label for node in state.nodes]
    node = next((n for n in state.nodes if n.node_label == label), None)
    if node is None:
        raise ConfigError(f"unknown node {label!r}; the cluster's nodes are {', '.join(labels)}", node=label)
    if node.is_head:
        raise ConfigError(f"node {label!r} is the head; stop the whole cluster with `down`", node=label)
    if not _is_our_process(node.pid, state.temp_dir):
        raise ConfigError(f"node {label!r} is not running", node=label)
    kill_process_group(node.pid)
    _reap(node.pid)
    return node


def _stop_nodes(state: ClusterState, grace_s: float = 30.0) -> int:
    # SIGTERM to `ray start --block` makes it shut its node down cleanly; whatever is left of a
    # node's process group after the grace period is killed, member by member.
    running = [node for node in state.nodes if _is_our_process(node.pid, state.temp_dir)]
    for node in running:
        _signal(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_process_running(node.pid) for node in running):
        time.sleep(0.2)
    for node in state.nodes:
        kill_process_group(node.pid)
    return len(running)


def _forget(state: ClusterState, state_dir: Path) -> None:
    """Remove what the cluster left on the host: temp dir, and for an isolated cluster its link
    emulator, namespaces, interfaces, routes and the nodes' private directories."""
    if state.isolation == "netns":
        if state.emulator_pid and _process_running(state.emulator_pid):
            _signal(state.emulator_pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while _process_running(state.emulator_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(state.emulator_pid, signal.SIGKILL)
        if state.fabric_prefix:
            netns_fabric.teardown(state.fabric_prefix)
        shutil.rmtree(state_dir / NODE_ROOTS, ignore_errors=True)
        for name in ("link-emulator.sock", "link-emulator.json", "link-emulator.ready", "fabric.json"):
            (state_dir / name).unlink(missing_ok=True)
    else:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    (state_dir / STATE_FILE_NAME).unlink(missing_ok=True)


# --- processes --------------------------------------------------------------------------------
def start_in_own_session(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` (a ``ray start --block``) with its output in ``log_path``, in a session of its own.

    Why a session: the node's processes form one process group that is stopped as a unit (see
    :func:`kill_process_group`), and a Ctrl-C in the terminal that started it does not reach them.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            cwd=None if cwd is None else str(cwd),
        )
    _LAUNCHED[process.pid] = process
    return process


#: The node processes this process started, by pid: their exit status is known for sure.
_LAUNCHED: dict[int, subprocess.Popen[bytes]] = {}


def kill_process_group(group_id: int) -> None:
    """SIGKILL every live Ray process of the process group ``group_id`` (a node's session leader pid)."""
    for pid in _process_group_members(group_id):
        _signal(pid, signal.SIGKILL)


def free_tcp_port() -> int:
    """A TCP port that was free a moment ago on this machine (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _ray_cli() -> str:
    # The `ray` next to this interpreter belongs to the same environment as the driver.
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise ConfigError("the `ray` command was not found; run scripts/bootstrap.sh first")
    return found


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def _process_running(pid: int) -> bool:
    fields = _proc_stat(pid)
    if fields is None:
        return False
    if fields[0] == "Z":
        _reap(pid)
        return False
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return


def _is_our_process(pid: int, temp_dir: str) -> bool:
    """True when ``pid`` runs and is a node we started (its command line names our temp dir)."""
    if not _process_running(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return temp_dir.encode() in cmdline


def _process_group_members(group_id: int) -> list[int]:
    """Live Ray processes whose process group is ``group_id`` (a node's session leader pid)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        # Field order after the command name: state, ppid, pgrp, ...
        if fields is None or fields[0] == "Z" or int(fields[2]) != group_id:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # Every process of a node names Ray in its command line (workers are "ray::...").
        if b"ray" in cmdline:
            members.append(int(entry.name))
    return members


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --- command line -----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m clusters.local``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m clusters.local", description="A multi-region Ray cluster on this machine."
    )
    parser.add_argument("command", choices=["up", "status", "down", "partition", "heal", "kill-node"])
    parser.add_argument(
        "regions",
        nargs="*",
        help="partition/heal: the two regions whose link is cut or healed; kill-node: the node (us-west-0)",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="cluster config (YAML)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where state and node logs go")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds `up` waits for all nodes")
    parser.add_argument("--json", action="store_true", help="status: print JSON (addresses, nodes, regions)")
    args = parser.parse_args(argv)
    if args.command in ("partition", "heal") and len(args.regions) != 2:
        parser.error(f"{args.command} takes two regions, e.g. `{args.command} us-west eu-central`")
    if args.command == "kill-node" and len(args.regions) != 1:
        parser.error("kill-node takes one node label, e.g. `kill-node eu-central-0` (see `status`)")
    if args.command not in ("partition", "heal", "kill-node") and args.regions:
        parser.error(f"{args.command} takes no regions")

    try:
        spec = load_cluster_config(args.config)
        state_dir = args.state_dir if args.state_dir is not None else default_state_dir(spec)
        if args.command == "up":
            state = up(spec, state_dir, timeout_s=args.timeout)
            print(f"cluster {state.name!r} is up with {len(state.nodes)} nodes at {state.address}")
            auth = cluster_auth_env(state_dir)
            exports = " ".join(f"{key}={value}" for key, value in auth.items())
            if state.isolation == "netns":
                print(f"  dashboard:    {state.dashboard_url}")
                print(
                    f"  submit with:  {exports} ray job submit --address {state.dashboard_url} -- <command>"
                )
                print(f"  ray client:   {state.client_address}")
                for node in state.nodes:
                    print(f"  node {node.node_label:<20} {node.address}")
            else:
                print(f"  connect with: {exports} and ray.init(address={state.address!r})")
            print(f"  node logs:    {state_dir / 'logs'}")
            return 0
        if args.command == "status":
            return _print_status_json(state_dir) if args.json else _print_status(state_dir)
        if args.command in ("partition", "heal"):
            answer = set_link(state_dir, args.command, *args.regions)
            print(
                f"{args.command}: {args.regions[0]} <-> {args.regions[1]}: {json.dumps(answer.get('link'))}"
            )
            return 0
        if args.command == "kill-node":
            killed = kill_node(state_dir, args.regions[0])
            print(f"killed node {killed.node_label} (pid {killed.pid}); it stays down until `down`")
            return 0
        stopped = down(state_dir)
        print(f"stopped {stopped} running node(s) of the cluster recorded in {state_dir}")
        return 0
    except RayflowError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _print_status_json(state_dir: Path) -> int:
    nodes = status(state_dir)
    state = load_state(state_dir)
    if state is None:
        raise ConfigError(f"the cluster recorded in {state_dir} went down while being inspected")
    print(
        json.dumps(
            {
                "name": state.name,
                "isolation": state.isolation,
                "address": state.address,
                "dashboard_url": state.dashboard_url,
                "client_address": state.client_address,
                "regions": sorted({node.record.region for node in nodes}),
                "nodes": [
                    {
                        "node_id": node.node_id,
                        "label": node.record.node_label,
                        "region": node.record.region,
                        "address": node.record.address,
                        "head": node.record.is_head,
                        "running": node.process_running,
                        "alive": node.ray_alive,
                        "cpus": node.cpus,
                    }
                    for node in nodes
                ],
            },
            indent=2,
        )
    )
    return 0 if all(node.process_running and node.ray_alive for node in nodes) else 1


def _print_status(state_dir: Path) -> int:
    nodes = status(state_dir)
    state = load_state(state_dir)
    if state is None:
        raise ConfigError(f"the cluster recorded in {state_dir} went down while being inspected")
    print(f"cluster {state.name!r} at {state.address or '(head not up)'}")
    print(f"{'REGION':<16}{'NODE':<22}{'ROLE':<8}{'PID':<9}{'PROCESS':<10}{'RAY':<7}{'CPUS':<6}")
    for node in nodes:
        record = node.record
        print(
            f"{record.region:<16}{record.node_label:<22}{'head' if record.is_head else 'worker':<8}"
            f"{record.pid:<9}{'running' if node.process_running else 'stopped':<10}"
            f"{'alive' if node.ray_alive else 'absent':<7}{node.cpus:<6g}"
        )
    healthy = all(node.process_running and node.ray_alive for node in nodes)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
