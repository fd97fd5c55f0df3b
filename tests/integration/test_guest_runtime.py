"""The in-sandbox runtime over real pipes: ``python -m rayflow.guest serve`` driven by ``ChannelSandbox``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayflow.errors import InvalidInputError, NotFoundError, TransportError
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.channel_sandbox import ChannelSandbox
from rayflow.sandbox.spec import KillReason, SandboxSpec
from rayflow.wire.channel import FrameDecoder, encode_frame, parse_event, request
from rayflow.wire.procfs import session_members
from tests.process_support import GONE_WITHIN_S, wait_gone

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Generous bound on waiting for a killed process to disappear (an upper bound, not a measurement).


def start_runtime(workdir: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "FROM_RUNTIME": "yes"}
    return subprocess.Popen(
        [sys.executable, "-m", "rayflow.guest", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=workdir,
        env=env,
        start_new_session=True,
    )


def kill_session(process: subprocess.Popen[bytes]) -> None:
    for pid in session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()
    process.wait()


class Teardown:
    """Counts its calls, so tests can check that destroy runs it exactly once."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        kill_session(self.process)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def runtime(workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_runtime(workdir)
    yield process
    kill_session(process)


@pytest.fixture
def sandbox(runtime: subprocess.Popen[bytes]) -> Iterator[ChannelSandbox]:
    box = ChannelSandbox(
        "test-box", SandboxSpec(owner="tests", exec_timeout_s=60), runtime, Teardown(runtime)
    )
    yield box
    box.destroy()


def is_gone_or_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


class RawChannel:
    """Frames written to and read from a runtime directly, for what ChannelSandbox would not send."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.decoder = FrameDecoder()
        self.events: list = []

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def next_event(self):
        while not self.events:
            data = self.process.stdout.read1(1 << 16)
            assert data, "the runtime closed its channel"
            self.events += [parse_event(message) for message in self.decoder.feed(data)]
        return self.events.pop(0)


# --- exec -------------------------------------------------------------------------------------
def test_the_channel_sandbox_implements_the_sandbox_protocol(sandbox: ChannelSandbox) -> None:
    assert isinstance(sandbox, Sandbox)


def test_an_argv_command_runs_and_its_output_returns(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec(["echo", "hello world"])
    assert result.ok
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""


def test_a_shell_command_runs_under_sh(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("echo out; echo err >&2; printf '%s' $((6 * 7))")
    assert result.stdout == b"out\n42"
    assert result.stderr == b"err\n"


def test_stdin_reaches_the_command(sandbox: ChannelSandbox) -> None:
    data = bytes(range(256)) * 4096
    result = sandbox.exec(["cat"], stdin=data)
    assert result.stdout == data


def test_env_is_laid_over_the_runtime_environment(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("echo $FROM_RUNTIME $EXTRA", env={"EXTRA": "given"})
    assert result.stdout == b"yes given\n"


def test_cwd_is_taken_relative_to_the_workdir(sandbox: ChannelSandbox, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    result = sandbox.exec(["pwd"], cwd="sub")
    assert result.stdout.decode().strip() == str((workdir / "sub").resolve())


def test_a_missing_cwd_is_not_found(sandbox: ChannelSandbox) -> None:
    with pytest.raises(NotFoundError):
        sandbox.exec(["true"], cwd="no-such-dir")


def test_a_non_zero_exit_is_reported_not_raised(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("exit 3")
    assert result.exit_code == 3
    assert result.killed is None
    assert not result.ok


def test_a_missing_program_exits_127(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec(["/no/such/program"])
    assert result.exit_code == 127
    assert b"cannot run" in result.stderr


def test_a_timeout_kills_the_command_and_its_children(sandbox: ChannelSandbox) -> None:
    child: list[int] = []
    result = sandbox.exec(
        "sleep 300 & echo $!; wait",
        timeout_s=0.5,
        on_stdout=lambda chunk: child.append(int(chunk.split()[0])) if not child else None,
    )
    assert result.killed is KillReason.TIMEOUT
    assert result.exit_code == 137
    assert wait_gone(child[0])


def test_a_command_that_closed_its_output_is_still_timed_out(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("exec >&- 2>&-; sleep 300", timeout_s=0.5)
    assert result.killed is KillReason.TIMEOUT


def test_a_background_child_holding_the_pipes_does_not_hold_the_exec(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("sleep 300 & echo started", timeout_s=120)
    assert result.ok
    assert result.stdout == b"started\n"


def test_output_beyond_the_cap_is_dropped_and_the_command_killed(runtime: subprocess.Popen[bytes]) -> None:
    box = ChannelSandbox(
        "capped", SandboxSpec(owner="tests"), runtime, Teardown(runtime), max_output_bytes=1000
    )
    try:
        result = box.exec(["yes"])
    finally:
        box.destroy()
    assert result.truncated
    assert result.killed is KillReason.OUTPUT_LIMIT
    assert result.stdout == b"y\n" * 500


def test_a_sigkill_the_runtime_did_not_send_is_reported_as_oom(sandbox: ChannelSandbox) -> None:
    result = sandbox.exec("kill -9 $$")
    assert result.killed is KillReason.OOM
    assert result.exit_code == 137


def test_output_callbacks_receive_every_chunk_in_order(sandbox: ChannelSandbox) -> None:
    chunks: list[bytes] = []
    result = sandbox.exec("seq 1 20000", on_stdout=chunks.append)
    expected = "".join(f"{n}\n" for n in range(1, 20001)).encode()
    assert b"".join(chunks) == expected
    assert result.stdout == expected


def test_output_is_streamed_while_the_command_still_runs(sandbox: ChannelSandbox, workdir: Path) -> None:
    # The command only ends once the callback has seen its first line and created the file.
    def on_stdout(chunk: bytes) -> None:
        if b"ready" in chunk:
            (workdir / "go").touch()

    result = sandbox.exec(
        "echo ready; while [ ! -e go ]; do sleep 0.01; done; echo done", timeout_s=30, on_stdout=on_stdout
    )
    assert result.ok
    assert result.stdout == b"ready\ndone\n"


def test_twenty_commands_run_at_once(sandbox: ChannelSandbox, workdir: Path) -> None:
    # Each command waits until all twenty have started: they can only finish if they overlap.
    count = 20
    results: dict[int, object] = {}

    def run(index: int) -> None:
        results[index] = sandbox.exec(
            f"touch started-{index}; while [ $(ls | grep -c '^started-') -lt {count} ]; do sleep 0.01; done;"
            f" echo {index}",
            timeout_s=60,
        )

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {index: result.stdout for index, result in results.items()} == {
        index: f"{index}\n".encode() for index in range(count)
    }
    assert all(result.killed is None for result in results.values())


# --- files ------------------------------------------------------------------------------------
def test_a_written_file_reads_back_with_its_mode(sandbox: ChannelSandbox, workdir: Path) -> None:
    sandbox.write_file("deep/dir/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755)
    assert sandbox.read_file("deep/dir/run.sh") == b"#!/bin/sh\necho ran\n"
    assert (workdir / "deep" / "dir" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert sandbox.exec(["./deep/dir/run.sh"]).stdout == b"ran\n"


def test_reading_a_missing_file_is_not_found(sandbox: ChannelSandbox) -> None:
    with pytest.raises(NotFoundError):
        sandbox.read_file("missing.txt")


def test_a_tree_uploads_and_downloads(sandbox: ChannelSandbox, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("X = 1\n")
    (source / "README").write_text("hi\n")
    sandbox.upload(source, "project")
    assert sandbox.exec("cat project/pkg/mod.py project/README").stdout == b"X = 1\nhi\n"
    sandbox.exec("echo new > project/pkg/made.txt")
    back = tmp_path / "back"
    sandbox.download("project", back)
    assert (back / "pkg" / "made.txt").read_text() == "new\n"
    assert (back / "README").read_text() == "hi\n"


def test_a_download_holding_an_escaping_symlink_is_refused(sandbox: ChannelSandbox, tmp_path: Path) -> None:
    sandbox.exec("mkdir tree && ln -s /etc tree/etc")
    with pytest.raises(InvalidInputError):
        sandbox.download("tree", tmp_path / "back")
    assert not (tmp_path / "back" / "etc").exists()


def test_stats_report_processes_and_cpu(sandbox: ChannelSandbox) -> None:
    stats = sandbox.stats()
    assert stats.pids is not None and stats.pids >= 1
    assert stats.cpu_seconds is not None and stats.cpu_seconds > 0
    assert stats.memory_bytes is not None and stats.memory_bytes > 0


# --- failures ---------------------------------------------------------------------------------
def test_a_bad_request_is_answered_and_serving_goes_on(runtime: subprocess.Popen[bytes]) -> None:
    channel = RawChannel(runtime)
    channel.send(encode_frame({"id": 7, "kind": "exec", "shell": 42}))
    event = channel.next_event()
    assert (event.id, event.kind, event.error.code) == (7, "error", "invalid_input")
    channel.send(encode_frame(request(8, "ping")))
    assert channel.next_event().kind == "result"


def test_garbage_on_the_channel_is_answered_then_the_runtime_exits(runtime: subprocess.Popen[bytes]) -> None:
    channel = RawChannel(runtime)
    channel.send(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    event = channel.next_event()
    assert (event.id, event.kind) == (0, "error")
    assert runtime.wait() == 2


def test_when_the_runtime_breaks_the_channel_later_calls_raise(sandbox: ChannelSandbox) -> None:
    sandbox._process.stdin.write(b"\xff\xff\xff\xff")  # a header declaring a 4 GiB frame
    sandbox._process.stdin.flush()
    with pytest.raises(TransportError):
        for _ in range(1000):  # bounded: the runtime exits on the oversized header
            sandbox.exec(["true"])
    assert not sandbox.alive


def test_a_pending_exec_fails_when_the_runtime_dies(
    sandbox: ChannelSandbox, runtime: subprocess.Popen[bytes]
) -> None:
    outcome: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        try:
            sandbox.exec("echo started; sleep 300", on_stdout=lambda chunk: started.set())
        except TransportError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(GONE_WITHIN_S)
    runtime.kill()
    thread.join()
    assert len(outcome) == 1
    with pytest.raises(TransportError):
        sandbox.exec(["true"])


def test_a_pending_exec_ends_as_destroyed_when_the_sandbox_is(runtime: subprocess.Popen[bytes]) -> None:
    box = ChannelSandbox("doomed", SandboxSpec(owner="tests"), runtime, Teardown(runtime))
    results = []
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: results.append(box.exec("echo started; sleep 300", on_stdout=lambda c: started.set()))
    )
    thread.start()
    assert started.wait(GONE_WITHIN_S)
    box.destroy()
    thread.join()
    assert results[0].killed is KillReason.SANDBOX_DESTROYED
    assert results[0].stdout == b"started\n"


def test_destroy_runs_the_teardown_exactly_once(runtime: subprocess.Popen[bytes]) -> None:
    teardown = Teardown(runtime)
    box = ChannelSandbox("once", SandboxSpec(owner="tests"), runtime, teardown)
    threads = [threading.Thread(target=box.destroy) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    box.destroy()
    assert teardown.calls == 1
    with pytest.raises(TransportError):
        box.exec(["true"])


def test_a_shutdown_request_kills_commands_and_ends_the_runtime(runtime: subprocess.Popen[bytes]) -> None:
    channel = RawChannel(runtime)
    channel.send(encode_frame({"id": 1, "kind": "exec", "shell": "echo $$; exec sleep 300"}))
    pid = int(channel.next_event().data)
    channel.send(encode_frame(request(2, "shutdown")))
    events = [channel.next_event(), channel.next_event()]
    assert [(event.id, event.kind) for event in events] == [(1, "exit"), (2, "result")]
    assert events[0].exit.killed == "sandbox-destroyed"
    assert runtime.wait() == 0
    assert is_gone_or_zombie(pid)


def test_end_of_input_stops_the_runtime_and_its_commands(runtime: subprocess.Popen[bytes]) -> None:
    channel = RawChannel(runtime)
    channel.send(encode_frame({"id": 1, "kind": "exec", "shell": "echo $$; exec sleep 300"}))
    pid = int(channel.next_event().data)
    runtime.stdin.close()
    assert runtime.wait() == 0
    assert wait_gone(pid)


def test_sigterm_stops_the_runtime_and_its_commands(runtime: subprocess.Popen[bytes]) -> None:
    channel = RawChannel(runtime)
    channel.send(encode_frame({"id": 1, "kind": "exec", "shell": "echo $$; exec sleep 300"}))
    pid = int(channel.next_event().data)
    runtime.send_signal(signal.SIGTERM)
    assert runtime.wait() == 128 + signal.SIGTERM
    assert wait_gone(pid)


# --- command line and runner ------------------------------------------------------------------
def _agent(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rayflow.guest", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_runtime_reports_its_version(tmp_path: Path) -> None:
    completed = _agent("--version", cwd=tmp_path)
    assert completed.returncode == 0
    assert "protocol 1" in completed.stdout


def test_the_runtime_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys, rayflow.guest.runtime, rayflow.guest.runner, rayflow.guest.__main__\n"
        "heavy = {'numpy', 'ray', 'aioquic', 'hnswlib', 'rich', 'typer', 'cryptography', 'apsw'}\n"
        "cores = [m for m in sys.modules if m.startswith(('rayflow.hub', 'rayflow.memory'))]\n"
        "print(sorted(heavy & set(sys.modules)) + sorted(cores))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.stdout.strip() == "[]", completed.stderr


def test_a_shell_agent_gets_the_task_and_reports_its_exit(tmp_path: Path) -> None:
    spec = {
        "agent": {"kind": "shell", "command": 'cat; echo; cat "$RAYFLOW_TASK_FILE"'},
        "task": {"goal": "fix"},
        "workdir": str(tmp_path),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    completed = _agent("run", "spec.json", cwd=tmp_path)
    result = json.loads(completed.stdout)
    assert completed.returncode == 0
    assert result["ok"] and result["exit_code"] == 0
    assert result["stdout"] == '{"goal": "fix"}\n{"goal": "fix"}'


AGENT_MODULE = (
    "def solve(ctx):\n"
    "    ctx.write_file('note.txt', ctx.task['word'])\n"
    "    out = ctx.run('cat note.txt').stdout.decode()\n"
    "    return {'echo': out, 'read': ctx.read_file('note.txt').decode()}\n"
    "def needs_memory(ctx):\n"
    "    return ctx.memory\n"
)


def _run_python_agent(tmp_path: Path, target: str) -> tuple[int, dict]:
    (tmp_path / "my_agent.py").write_text(AGENT_MODULE)
    spec = {"agent": {"kind": "python", "target": target}, "task": {"word": "hi"}, "workdir": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    completed = _agent("run", "spec.json", cwd=tmp_path, env={"PYTHONPATH": f"{REPO_ROOT}:{tmp_path}"})
    return completed.returncode, json.loads(completed.stdout)


def test_a_python_agent_uses_its_context_and_returns_a_value(tmp_path: Path) -> None:
    status, result = _run_python_agent(tmp_path, "my_agent:solve")
    assert status == 0
    assert result["value"] == {"echo": "hi", "read": "hi"}


def test_memory_without_a_configured_hub_is_a_config_error(tmp_path: Path) -> None:
    status, result = _run_python_agent(tmp_path, "my_agent:needs_memory")
    assert status == 1
    assert result["error"]["code"] == "config_error"
