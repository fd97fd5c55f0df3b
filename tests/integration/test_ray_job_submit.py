"""The demo job submitted with the real ``ray job submit`` CLI to a real ``ray start --head`` node.

This is how a user runs rayflow on a cluster they already have: the repository travels as the
job's working directory, the job finds the cluster through ``RAY_ADDRESS`` (set by Ray's job
supervisor), and its output is read back with ``ray job logs``. The node is started in its own
process session with its own temp dir and free ports, and stopped by its own process group, so
other Ray clusters on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusters.local import free_tcp_port, kill_process_group, start_in_own_session

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
#: What the working-dir upload leaves out (big, or irrelevant to the job).
EXCLUDES = [
    ".venv",
    ".git",
    "benchmarks/results",
    "**/__pycache__",
    "*.egg-info",
    "rayflow-demo-out",
    "notebooks",
]
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 280.0


@dataclass
class HeadNode:
    """A ``ray start --head --block`` process and where to reach its dashboard."""

    process: subprocess.Popen
    temp_dir: Path
    dashboard_url: str
    log_path: Path


def _stop(node: HeadNode) -> None:
    """Stop only this node: SIGTERM to its ``ray start``, then SIGKILL whatever of its group is left."""
    group = node.process.pid
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    kill_process_group(group)
    if node.process.poll() is None:
        node.process.wait(timeout=30)


def _dashboard_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse a request without a token
    except OSError:
        return False


@pytest.fixture(scope="module")
def head_node() -> Iterator[HeadNode]:
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rf-rjs-", dir="/tmp"))
    dashboard_port = free_tcp_port()
    log_path = temp_dir / "head.log"
    command = [
        RAY_CLI,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--port={free_tcp_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={128 * 1024 * 1024}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_tcp_port()}",
        f"--ray-client-server-port={free_tcp_port()}",
    ]
    process = start_in_own_session(command, log_path, {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    node = HeadNode(process, temp_dir, f"http://127.0.0.1:{dashboard_port}", log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _dashboard_answers(node.dashboard_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the head node did not come up:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield node
    finally:
        _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(
    node: HeadNode, command: str, *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``ray job <command> --address <this node's dashboard> <args>``."""
    return subprocess.run(
        [RAY_CLI, "job", command, "--address", node.dashboard_url, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ.copy(),
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def submitted_demo(head_node, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("submitted-demo-out")
    submission_id = f"rayflow-demo-{os.getpid()}-{time.time_ns() % 10**9}"
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES}
    entrypoint = (
        f"{sys.executable} -m rayflow.jobs.demo --modules 6 --workers 2 --backend process "
        f"--no-progress --out {out}"
    )
    submit = _ray_job(
        head_node,
        "submit",
        "--submission-id",
        submission_id,
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *entrypoint.split(),
        timeout_s=JOB_TIMEOUT_S,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    return submission_id, out


def test_submitted_demo_job_succeeds(head_node, submitted_demo):
    submission_id, _ = submitted_demo
    status = _ray_job(head_node, "status", submission_id)
    output = status.stdout + status.stderr
    assert status.returncode == 0 and f"job '{submission_id}' succeeded" in output.lower(), output


def test_submitted_demo_job_logs_show_the_comparison_table(head_node, submitted_demo):
    submission_id, _ = submitted_demo
    logs = _ray_job(head_node, "logs", submission_id)
    assert logs.returncode == 0, logs.stderr
    assert "memory off vs. memory on" in logs.stdout
    assert "reduction in attempts" in logs.stdout


def test_submitted_demo_job_writes_its_outputs_where_asked(submitted_demo):
    _, out = submitted_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparison"]["all_passed"] and summary["comparison"]["exactly_once"]
    assert (out / "comparison.png").stat().st_size > 0
