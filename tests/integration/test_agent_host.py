"""The agent host as a real process: forked runs, killed clients, timeouts, bad requests, fallback, sandboxes."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rayflow.guest.agent_host import ready_line
from rayflow.guest.host_launcher import HEADER, encode, split_frames
from rayflow.sandbox.process_backend import ProcessBackend
from rayflow.swarm.job import AgentRef, Job, TaskList
from rayflow.swarm.worker_core import WorkerCore, WorkerPlan, host_launcher_argv
from rayflow.wire.framing import frame
from rayflow.wire.guest_commands import launcher_argv
from rayflow.wire.subtasks import Subtask

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The import path a runtime started by this interpreter would report (rayflow and its packages).
RUNTIME_PATH = [entry for entry in sys.path if entry]
#: Bound on every wait for a process (they take milliseconds; a hang fails instead of blocking).
WAIT_S = 60.0

PROBE_AGENT = """
import os, socket, sys, time

def identify(ctx):
    print("agent says hi")
    print("agent warns", file=sys.stderr)
    return {"pid": os.getpid(), "ppid": os.getppid(), "marker": os.environ.get("MARKER"), "cwd": os.getcwd()}

def report_and_wait(ctx):
    # Tells the test its pid over a unix socket, then runs until killed.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(ctx.task["report_to"])
        sock.sendall(str(os.getpid()).encode())
    time.sleep(600)
"""


@dataclass
class RunningHost:
    process: subprocess.Popen[bytes]
    socket_path: str
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def launch(
        self, spec: dict[str, Any] | str, env: dict[str, str] | None = None, name: str = "spec"
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(spec, name),
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
            capture_output=True,
            timeout=WAIT_S,
            check=False,
        )

    def argv(self, spec: dict[str, Any] | str, name: str = "spec") -> list[str]:
        if isinstance(spec, dict):
            path = self.workdir / f"{name}.json"
            path.write_text(json.dumps(spec))
            spec = path.name
        return launcher_argv(sys.executable, RUNTIME_PATH, self.socket_path, "run", spec)


def python_spec(target: str, task: dict[str, Any] | None = None, timeout_s: float = 60) -> dict[str, Any]:
    return {
        "agent": {"kind": "python", "target": f"probe_agent:{target}"},
        "task": task or {},
        "timeout_s": timeout_s,
    }


def last_json(stdout: bytes) -> dict[str, Any]:
    return json.loads(stdout.decode().strip().splitlines()[-1])


@contextmanager
def report_server(workdir: Path, timeout_s: float = 60) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
    """A listening unix socket in ``workdir`` and a spec of ``report_and_wait`` telling its pid there."""
    report = workdir / "report.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(report))
        server.listen(1)
        server.settimeout(WAIT_S)
        yield server, python_spec("report_and_wait", {"report_to": str(report)}, timeout_s=timeout_s)


def run_without_host(workdir: Path, socket_path: str) -> subprocess.CompletedProcess[bytes]:
    """The launcher run of an ``identify`` spec in ``workdir`` with ``socket_path`` naming no live host."""
    (workdir / "spec.json").write_text(json.dumps(python_spec("identify")))
    argv = launcher_argv(sys.executable, RUNTIME_PATH + [str(workdir)], socket_path, "run", "spec.json")
    outcome = subprocess.run(argv, cwd=workdir, capture_output=True, timeout=WAIT_S, check=False)
    assert outcome.returncode == 0, outcome.stderr
    return outcome


def wait_exited(pid: int) -> bool:
    """True once ``pid`` (any process, not only a child of this one) has exited, within WAIT_S."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], WAIT_S)
        return bool(readable)
    finally:
        os.close(pidfd)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "probe_agent.py").write_text(PROBE_AGENT)
    return tmp_path


@pytest.fixture
def host(workdir: Path) -> Iterator[RunningHost]:
    socket_path = ".rayflow/host.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "rayflow.guest", "host", "--socket", socket_path, "--preload", "probe_agent"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        assert line == ready_line(socket_path, process.pid)
        yield RunningHost(process, str(workdir / socket_path), workdir)
    finally:
        process.terminate()
        process.wait(WAIT_S)


def raw_exchange(socket_path: str, data: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(socket_path)
        sock.sendall(data)
        buffer = bytearray()
        while chunk := sock.recv(1 << 16):
            buffer += chunk
    return split_frames(buffer)


def ping(socket_path: str) -> dict[str, Any]:
    (pong,) = raw_exchange(socket_path, frame(b'{"kind": "ping"}'))
    return pong


# --- the host process ------------------------------------------------------------------------------
def test_a_run_is_a_forked_child_of_the_host_with_the_launchers_environment(host: RunningHost) -> None:
    outcome = host.launch(python_spec("identify"), env={"MARKER": "m-1"})
    assert outcome.returncode == 0, outcome.stderr
    value = last_json(outcome.stdout)["value"]
    assert value["ppid"] == host.pid and value["pid"] != host.pid
    assert value["marker"] == "m-1"
    assert value["cwd"] == str(host.workdir)


def test_the_agents_own_output_reaches_the_launchers_streams(host: RunningHost) -> None:
    outcome = host.launch(python_spec("identify"))
    lines = outcome.stdout.decode().splitlines()
    assert lines[0] == "agent says hi" and json.loads(lines[-1])["ok"] is True
    assert b"agent warns" in outcome.stderr


def test_a_shell_agent_runs_through_the_host_as_through_the_runner(host: RunningHost) -> None:
    spec = {"agent": {"kind": "shell", "command": "cat; exit 3"}, "task": {"n": 7}, "timeout_s": 30}
    outcome = host.launch(spec)
    result = last_json(outcome.stdout)
    assert outcome.returncode == 1
    assert (result["ok"], result["exit_code"], json.loads(result["stdout"])) == (False, 3, {"n": 7})


def test_many_concurrent_runs_each_get_their_own_result(host: RunningHost) -> None:
    runs = 12
    for index in range(runs):
        (host.workdir / f"spec-{index}.json").write_text(json.dumps(python_spec("identify")))

    def run(index: int) -> dict[str, Any]:
        argv = launcher_argv(sys.executable, RUNTIME_PATH, host.socket_path, "run", f"spec-{index}.json")
        outcome = subprocess.run(
            argv,
            cwd=host.workdir,
            env={**os.environ, "MARKER": str(index)},
            capture_output=True,
            timeout=WAIT_S,
            check=False,
        )
        assert outcome.returncode == 0, outcome.stderr
        return last_json(outcome.stdout)["value"]

    with cf.ThreadPoolExecutor(runs) as pool:
        values = list(pool.map(run, range(runs)))
    assert [value["marker"] for value in values] == [str(index) for index in range(runs)]
    assert {value["ppid"] for value in values} == {host.pid}
    assert len({value["pid"] for value in values}) == runs
    assert ping(host.socket_path)["children"] == 0


def test_a_killed_client_gets_its_child_killed(host: RunningHost) -> None:
    with report_server(host.workdir) as (server, spec):
        client = subprocess.Popen(
            host.argv(spec),
            cwd=host.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        conn, _ = server.accept()
        with conn:
            child = int(conn.recv(64))
    client.kill()
    client.wait(WAIT_S)
    assert wait_exited(child)
    assert ping(host.socket_path)["children"] == 0


def test_a_run_past_its_timeout_is_killed_and_reported_as_a_deadline(host: RunningHost) -> None:
    with report_server(host.workdir, timeout_s=0.1) as (_, spec):
        outcome = host.launch(spec)
    assert outcome.returncode == 1
    assert last_json(outcome.stdout)["error"]["code"] == "deadline_exceeded"


def test_an_unreadable_spec_is_a_failed_result_as_the_runner_gives(host: RunningHost) -> None:
    outcome = host.launch("missing.json")
    assert outcome.returncode == 1
    assert last_json(outcome.stdout)["error"]["code"] == "invalid_input"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(b"this is no json"), "invalid_input"),
        (frame(b'{"kind": "reboot"}'), "invalid_input"),
        (HEADER.pack(1 << 30), "payload_too_large"),
        (encode({"kind": "run", "spec": "s.json", "cwd": "/", "env": {}}), "invalid_input"),  # no streams
    ],
    ids=["garbage", "unknown-kind", "oversized", "run-without-streams"],
)
def test_a_malformed_request_gets_a_typed_error_and_the_host_goes_on(
    host: RunningHost, data: bytes, code: str
) -> None:
    (reply,) = raw_exchange(host.socket_path, data)
    assert reply["kind"] == "error" and reply["error"]["code"] == code
    assert ping(host.socket_path)["pid"] == host.pid
    assert host.launch(python_spec("identify")).returncode == 0


def test_the_host_reports_what_it_preloaded(host: RunningHost) -> None:
    assert ping(host.socket_path)["preloaded"] == ["rayflow.guest.runner", "probe_agent"]


def test_a_second_host_on_the_same_socket_leaves_the_first_serving(host: RunningHost) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "rayflow.guest", "host", "--socket", host.socket_path],
        cwd=host.workdir,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        timeout=WAIT_S,
        check=False,
    )
    assert second.returncode == 0 and b"already answers" in second.stdout
    assert ping(host.socket_path)["pid"] == host.pid


# --- the fallback ------------------------------------------------------------------------------------
def test_without_a_host_the_launcher_runs_the_spec_itself(workdir: Path) -> None:
    outcome = run_without_host(workdir, str(workdir / "none.sock"))
    assert last_json(outcome.stdout)["ok"] is True
    assert b"running the subtask without the agent host" in outcome.stderr


def test_after_the_host_died_the_launcher_runs_the_spec_itself(host: RunningHost) -> None:
    host.process.kill()
    host.process.wait(WAIT_S)
    outcome = run_without_host(host.workdir, host.socket_path)
    assert last_json(outcome.stdout)["value"]["ppid"] != host.pid
    assert b"without the agent host" in outcome.stderr


# --- through a worker's sandbox ----------------------------------------------------------------------
def probe_plan(tmp_path: Path, **job_fields: Any) -> WorkerPlan:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe_agent.py").write_text(PROBE_AGENT)
    job = Job(
        AgentRef.python("probe_agent:identify", timeout_s=60),
        TaskList([{}]),
        name="hosted",
        workers=1,
        upload=str(repo),
        **job_fields,
    )
    return WorkerPlan.for_job(job, None)


def started_process_core(tmp_path: Path) -> WorkerCore:
    """A started worker core of the probe job whose sandbox comes from the process backend."""
    backend = ProcessBackend(registry_dir=tmp_path / "registry")
    core = WorkerCore("w-1", probe_plan(tmp_path, backend="process"), backend.create, owner="test-agent-host")
    core.start()
    return core


def host_pid(core: WorkerCore) -> int:
    assert core.sandbox is not None
    outcome = core.sandbox.exec(host_launcher_argv(core.sandbox.ping(), "ping"))  # type: ignore[attr-defined]
    assert outcome.exit_code == 0, outcome.stderr
    return int(json.loads(outcome.stdout)["pid"])


def test_a_worker_runs_subtasks_through_its_process_sandboxes_agent_host(tmp_path: Path) -> None:
    core = started_process_core(tmp_path)
    try:
        assert core.agent_host_running
        pid = host_pid(core)
        results = [core.run(Subtask(f"s-{index}", index, {}))[0] for index in range(3)]
        assert all(result.ok for result in results)
        assert {result.value["ppid"] for result in results} == {pid}
        # The host gone, the next subtask still runs: its launcher runs the spec itself.
        os.kill(pid, signal.SIGKILL)
        assert wait_exited(pid)
        after = core.run(Subtask("s-after", 3, {}))[0]
        assert after.ok and after.value["ppid"] != pid
    finally:
        core.close()


def test_the_agent_host_dies_with_its_process_sandbox(tmp_path: Path) -> None:
    core = started_process_core(tmp_path)
    try:
        pid = host_pid(core)
    finally:
        core.close()
    assert wait_exited(pid)


@pytest.mark.docker
@pytest.mark.slow
def test_a_worker_runs_subtasks_through_its_docker_sandboxes_agent_host(
    tmp_path: Path, docker_client: Any
) -> None:
    from rayflow.sandbox.docker_backend import DockerBackend

    backend = DockerBackend(docker_client)
    plan = probe_plan(tmp_path, backend="docker")
    backend.ensure_image(plan.spec.image)
    core = WorkerCore("w-1", plan, backend.create, owner="test-agent-host")
    try:
        core.start()
        assert core.agent_host_running
        pid = host_pid(core)
        results = [core.run(Subtask(f"s-{index}", index, {}))[0] for index in range(2)]
        assert all(result.ok for result in results), [result.error for result in results]
        assert {result.value["ppid"] for result in results} == {pid}
    finally:
        core.close()
        backend.close()
