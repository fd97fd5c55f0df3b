"""An isolated cluster for a test module, driven as a person would: ``python -m clusters.local`` and
``ray job submit`` from the host. Shared by the isolated-cluster test modules.

Why drive from the host: an isolated cluster's nodes are in namespaces of their own, so the test
process is not one of its nodes and cannot be a Ray driver; jobs reach it through the dashboard,
as they would reach a remote cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters import netns_fabric

REPO_ROOT = Path(__file__).resolve().parents[1]


def cluster_config(name: str, subnet: str, head_port: int, cpus: int) -> str:
    """The issue's two-region config (40 ms between the regions) with this module's name and subnet."""
    return f"""
name: {name}
isolation: netns
subnet: {subnet}
head_port: {head_port}
object_store_mb: 100
regions:
  - {{name: us-west, nodes: 1, cpus: {cpus}}}
  - {{name: eu-central, nodes: 1, cpus: {cpus}}}
links:
  - {{between: [us-west, eu-central], rtt_ms: 40, loss: 0.0}}
"""


def launcher(
    *args: str, state_dir: Path, config: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m clusters.local <args>`` for the cluster of ``config`` and ``state_dir``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clusters.local",
            *args,
            "--config",
            str(config),
            "--state-dir",
            str(state_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def isolated_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, subnet: str, head_port: int, cpus: int = 1
) -> Iterator[dict[str, Any]]:
    """Body of a module fixture: ``up`` (after planting a leftover that ``up`` must clear), yield
    what a test needs, then ``down`` and check that nothing of the cluster is left."""
    work = tmp_path_factory.mktemp("apart")
    config = work / "apart.yaml"
    config.write_text(cluster_config(name, subnet, head_port, cpus), encoding="utf-8")
    state_dir = work / "state"
    prefix = netns_fabric.fabric_prefix(name)
    subprocess.run(["ip", "netns", "add", f"{prefix}-stray"], capture_output=True, check=False)
    assert f"{prefix}-stray" in netns_fabric.leftover_namespaces(prefix)
    up = launcher("up", state_dir=state_dir, config=config)
    assert up.returncode == 0, up.stdout + up.stderr
    status = launcher("status", "--json", state_dir=state_dir, config=config, timeout=60)
    try:
        yield {
            "config": config,
            "state_dir": state_dir,
            "prefix": prefix,
            "up": up.stdout,
            "status_rc": status.returncode,
            "status": json.loads(status.stdout),
        }
    finally:
        down = launcher("down", state_dir=state_dir, config=config, timeout=120)
        left = netns_fabric.leftover_namespaces(prefix)
        netns_fabric.teardown(prefix)
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == [], f"`down` left namespaces behind: {left}"
        stray = subprocess.run(["pgrep", "-f", f"rf-{prefix}|clusters.link_emulator.*{state_dir}"],
                               capture_output=True, text=True, check=False).stdout.split()  # fmt: skip
        assert stray == [], f"`down` left processes behind: {stray}"


def node_of(cluster: dict[str, Any], region: str) -> dict[str, Any]:
    """The ``status --json`` entry of the (first) node of ``region``."""
    return next(node for node in cluster["status"]["nodes"] if node["region"] == region)


def submit(
    cluster: dict[str, Any],
    entrypoint: list[str],
    *,
    timeout: float,
    working_dir: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """``ray job submit`` of ``entrypoint`` from the host into the cluster; returns (exit code, output).

    ``on_line`` sees every line of the job's output as it streams (a test reacts to what the job
    prints, e.g. kills a node when the job says its workers are placed).
    """
    token = cluster["state_dir"] / "ray-auth-token"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    argv = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
            cluster["status"]["dashboard_url"]]  # fmt: skip
    if working_dir is not None:
        argv += ["--working-dir", str(working_dir)]
    process = subprocess.Popen(
        [*argv, "--", *entrypoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    lines: list[str] = []
    # The output is read to its end; past the deadline the submission is killed, which ends it.
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, "".join(lines)


def scenario(output: str) -> dict[str, Any]:
    """The ``SCENARIO {json}`` a job of :mod:`tests.isolated_jobs` printed."""
    found = [line for line in output.splitlines() if line.startswith("SCENARIO ")]
    assert found, output[-4000:]
    return json.loads(found[-1][len("SCENARIO ") :])
