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

Each node carries the resource ``region:<name>`` (quantity 1) and the labels
``rayflow/region=<name>`` and ``rayflow/node=<name>-<index>``. Work is pinned to a region by
asking for a small fraction of the region resource, e.g. ``resources={"region:us-west": 0.01}``,
so that the resource marks the region without limiting how many tasks run there.
"""

from __future__ import annotations

import argparse
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


def load_state(state_dir: Path) -> ClusterState | None:
    """The recorded state in ``state_dir``, or None when no cluster was started from it."""
    path = Path(state_dir) / STATE_FILE_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    nodes = tuple(NodeRecord(**node) for node in data["nodes"])
    return ClusterState(name=data["name"], address=data["address"], temp_dir=data["temp_dir"], nodes=nodes)


def default_state_dir(spec: ClusterSpec) -> Path:
    """Where a cluster's state and node logs go unless told otherwise (git-ignored)."""
    return DEFAULT_STATE_ROOT / spec.name


# --- up ---------------------------------------------------------------------------------------
def up(spec: ClusterSpec, state_dir: Path, timeout_s: float = 120.0) -> ClusterState:
    """Start the head, then every other node, and wait until Ray sees all of them alive.

    On any failure the nodes already started are stopped again before the error is raised.
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
        _forget(previous, state_dir)

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
    if any(running.values()) and state.address:
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
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            cwd=None if cwd is None else str(cwd),
        )


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
    parser.add_argument("command", choices=["up", "status", "down"])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="cluster config (YAML)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where state and node logs go")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds `up` waits for all nodes")
    args = parser.parse_args(argv)

    try:
        spec = load_cluster_config(args.config)
        state_dir = args.state_dir if args.state_dir is not None else default_state_dir(spec)
        if args.command == "up":
            state = up(spec, state_dir, timeout_s=args.timeout)
            print(f"cluster {state.name!r} is up with {len(state.nodes)} nodes at {state.address}")
            auth = cluster_auth_env(state_dir)
            exports = " ".join(f"{key}={value}" for key, value in auth.items())
            print(f"  connect with: {exports} and ray.init(address={state.address!r})")
            print(f"  node logs:    {state_dir / 'logs'}")
            return 0
        if args.command == "status":
            return _print_status(state_dir)
        stopped = down(state_dir)
        print(f"stopped {stopped} running node(s) of the cluster recorded in {state_dir}")
        return 0
    except RayflowError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


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
