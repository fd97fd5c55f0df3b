"""Runs one subtask inside a sandbox with the agent its spec names, and reports a JSON result.

``python -m rayflow.guest run SPEC_JSON_FILE`` reads a spec::

    {"agent": {"kind": "shell", "command": "make test"}            # or
     "agent": {"kind": "python", "target": "my_agents.fix:solve"},
     "task": {...free-form, handed to the agent...},
     "workdir": "/workspace",          # optional, default: the current directory
     "timeout_s": 600}                 # optional, for the shell agent's command

and prints one JSON object: ``{"ok", "agent", "value", "exit_code", "stdout", "stderr", "error",
"duration_s"}``. Two kinds of agent, because a swarm runs both existing command-line agents and
Python ones:

* a *shell* agent is a command run by ``/bin/sh -c`` in the work directory; it gets the task as
  JSON on stdin and in the file named by ``RAYFLOW_TASK_FILE``; it succeeds when it exits 0;
* a *python* agent is a callable ``module:function`` taking an :class:`AgentContext`; what it
  returns (JSON-serializable) is the result's ``value``.

The context gives an agent commands (``run``), files and the shared memory. ``context.memory``
is a blocking hub client (:class:`rayflow.wire.hub_client.SyncHubClient`: ``search``,
``store_pattern``, ``record_trajectory``, ``report_outcome``...), built on first use. What the
sandbox needs for it:

* the environment variables ``RAYFLOW_HUB_HOST`` and ``RAYFLOW_HUB_PORT`` (the hub as the
  sandbox reaches it; the Docker backend sets both itself for a ``hub-only`` network policy),
  ``RAYFLOW_HUB_CA`` (the hub's CA certificate: PEM text, or the path of a PEM file inside the
  sandbox) and ``RAYFLOW_HUB_TOKEN`` (a token the hub issued for this agent's tenant and
  namespaces). ``RAYFLOW_HUB_SERVER_NAME`` optionally names the certificate name to check
  (default ``localhost``, which every hub certificate covers, whatever address the sandbox dials)
  and ``RAYFLOW_HUB_CONNECT_TIMEOUT_S`` how long a call waits for a connection (default 10 s);
* a network path to the hub over UDP (QUIC): a ``hub-only`` policy gives exactly that;
* the hub client's modules and packages (aioquic and its dependencies) in the image; the default
  sandbox image carries them. They are imported only when memory is first used, so a runner
  without memory stays standard-library-and-msgpack only.

Without those variables ``context.memory`` raises :class:`~rayflow.errors.ConfigError`, which
becomes the agent's error result (code ``config_error``) like any other agent failure.

Every call through ``context.memory`` is counted (:class:`~rayflow.wire.memory_use.MemoryUse`:
calls, failed calls, search hits, the last error), whether or not the agent catches the failure;
when the agent used memory at all, the runner attaches the counts to its value as
``value["memory"]`` (a mapping value, or a failed run's, whose value is then just that), so a hub
that could not be reached is counted by the report instead of vanishing into the agent's value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError, InvalidInputError, RayflowError
from rayflow.wire.hub_endpoint import CONNECT_TIMEOUT_ENV, REQUIRED_ENV, TOKEN_ENV, HubEndpoint
from rayflow.wire.memory_use import MEMORY_FIELD, MemoryUse
from rayflow.wire.procfs import own_group_options
from rayflow.wire.targets import load_callable

#: Bytes of an agent's own stdout/stderr kept in the result.
RESULT_OUTPUT_BYTES = 1024 * 1024
#: The variables memory needs (``RAYFLOW_HUB_SERVER_NAME`` is optional).
HUB_ENV = (*REQUIRED_ENV, TOKEN_ENV)


@dataclass(frozen=True)
class CommandOutcome:
    """How a command run through :meth:`AgentContext.run` ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def run_command(
    command: str | list[str],
    *,
    cwd: Path,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> CommandOutcome:
    """Run ``command`` (a string goes to ``/bin/sh -c``) in its own process group; on timeout the
    whole group is killed, so helpers it started do not outlive it."""
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **own_group_options(),
    )
    try:
        out, err = process.communicate(stdin, timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = process.communicate()
        timed_out = True
    code = process.returncode
    return CommandOutcome(code if code >= 0 else 128 - code, out, err, timed_out)


class AgentContext:
    """What an agent may use: the task, its work directory, commands, files and shared memory."""

    def __init__(self, task: Mapping[str, Any], workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.task = dict(task)
        self.workdir = workdir
        self._env = os.environ if env is None else env
        self._memory: Any = None
        #: How this agent used memory so far (every call through :attr:`memory`).
        self.memory_use = MemoryUse()

    def path(self, path: str | Path) -> Path:
        """``path`` taken relative to the work directory unless absolute."""
        return self.workdir / path

    def run(
        self, command: str | list[str], *, stdin: bytes | None = None, timeout_s: float | None = None
    ) -> CommandOutcome:
        return run_command(command, cwd=self.workdir, stdin=stdin, timeout_s=timeout_s)

    def read_file(self, path: str | Path) -> bytes:
        return self.path(path).read_bytes()

    def write_file(self, path: str | Path, data: bytes | str) -> None:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)

    @property
    def memory(self) -> Any:
        """A blocking hub client (``SyncHubClient``), built on first use from ``RAYFLOW_HUB_*``.

        Its calls are counted in :attr:`memory_use`; so is a failure to build it (a sandbox with
        no hub configured), once per attempt to use it.
        """
        if self._memory is None:
            try:
                client = connect_memory(self._env)
            except Exception as exc:
                self.memory_use.failed(exc)
                raise
            self._memory = CountedMemory(client, self.memory_use)
        return self._memory

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None


class CountedMemory:
    """A hub client whose op calls are counted in a :class:`MemoryUse` (results and errors pass
    through unchanged); everything else (``close``, attributes) is the client's own."""

    _UNCOUNTED = frozenset({"close"})

    def __init__(self, client: Any, use: MemoryUse) -> None:
        self._client = client
        self._use = use

    @property
    def client(self) -> Any:
        return self._client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name.startswith("_") or name in self._UNCOUNTED or not callable(attribute):
            return attribute
        use = self._use

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                answer = attribute(*args, **kwargs)
            except Exception as exc:
                use.failed(exc)
                raise
            use.succeeded(name, answer)
            return answer

        return counted

    def close(self) -> None:
        self._client.close()


def attach_memory_use(value: Any, use: MemoryUse) -> Any:
    """``value`` with ``use`` under ``"memory"`` when the agent used memory: added to a mapping
    (unless the agent set that key itself), or the whole value of a run that returned none."""
    if not use.used:
        return value
    if value is None:
        return {MEMORY_FIELD: use.to_dict()}
    if isinstance(value, dict) and MEMORY_FIELD not in value:
        return {**value, MEMORY_FIELD: use.to_dict()}
    return value


@dataclass(frozen=True)
class HubSettings:
    """Where the hub is and how this sandbox proves itself to it, read from ``RAYFLOW_HUB_*``."""

    endpoint: HubEndpoint
    token: str
    #: Seconds to wait for a connection (``RAYFLOW_HUB_CONNECT_TIMEOUT_S``); ``None``: the client's default.
    connect_timeout_s: float | None = None


def hub_settings(env: Mapping[str, str]) -> HubSettings:
    """The hub settings from the ``RAYFLOW_HUB_*`` variables; ConfigError if incomplete or unusable.

    The endpoint is :meth:`HubEndpoint.from_env`'s (``RAYFLOW_HUB_CA`` is PEM text when it holds a
    ``-----BEGIN`` marker, otherwise the path of a PEM file); the token is ``RAYFLOW_HUB_TOKEN``.
    Every missing variable, the token's included, is named in one error.
    """
    missing = [name for name in HUB_ENV if not env.get(name, "").strip()]
    if missing:
        names = ", ".join(missing)
        raise ConfigError(f"this sandbox has no hub configured (missing {names})", missing=names)
    return HubSettings(HubEndpoint.from_env(env), env[TOKEN_ENV].strip(), _connect_timeout(env))


def _connect_timeout(env: Mapping[str, str]) -> float | None:
    text = env.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV} must be a number of seconds", value=text[:20]) from None
    if not seconds > 0:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV} must be positive", value=text[:20])
    return seconds


def connect_memory(env: Mapping[str, str], **options: Any) -> Any:
    """A ``SyncHubClient`` for the configured hub; the client (and aioquic) is imported only now.

    The connection itself opens on the first call, so an unreachable hub shows up as that
    call's :class:`~rayflow.errors.TransportError` or deadline error. ``options`` go to the
    client (``timeout_s``, ``connect_timeout_s``).
    """
    settings = hub_settings(env)
    try:
        from rayflow.wire.hub_client import SyncHubClient
    except ImportError as exc:
        raise ConfigError(
            f"this sandbox image has no hub client ({exc.name or exc} is missing); "
            "build it with the hub client to use memory"
        ) from None
    if settings.connect_timeout_s is not None:
        options.setdefault("connect_timeout_s", settings.connect_timeout_s)
    return SyncHubClient.for_endpoint(settings.endpoint, token=settings.token, **options)


def run_shell_agent(
    command: str, task: Mapping[str, Any], workdir: Path, timeout_s: float | None
) -> CommandOutcome:
    """Run a shell agent: ``command`` in ``workdir`` with the task as JSON on its stdin and in the
    file named by ``RAYFLOW_TASK_FILE`` (the one way every shell agent is started)."""
    task_json = json.dumps(task).encode()
    with tempfile.NamedTemporaryFile(prefix="rayflow-task-", suffix=".json") as task_file:
        task_file.write(task_json)
        task_file.flush()
        return run_command(
            command, cwd=workdir, stdin=task_json, env={"RAYFLOW_TASK_FILE": task_file.name}, timeout_s=timeout_s
        )


# --- running a spec ---------------------------------------------------------------------------
def _text(data: bytes) -> str:
    return data[:RESULT_OUTPUT_BYTES].decode("utf-8", "replace")


def _error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RayflowError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "agent_failed", "message": f"{type(exc).__name__}: {exc}"}


def run_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run the subtask ``spec`` describes and return the result object (never raises for agent errors)."""
    started = time.monotonic()
    agent = spec.get("agent")
    task = spec.get("task") or {}
    if not isinstance(agent, dict) or agent.get("kind") not in ("shell", "python"):
        raise InvalidInputError("spec field 'agent' must be {'kind': 'shell' | 'python', ...}")
    if not isinstance(task, dict):
        raise InvalidInputError("spec field 'task' must be an object")
    workdir = Path(spec.get("workdir") or os.getcwd())
    result: dict[str, Any] = {
        "ok": False,
        "agent": agent["kind"],
        "value": None,
        "exit_code": None,
        "stdout": "",
        "stderr": "",
        "error": None,
    }
    if agent["kind"] == "shell":
        command = agent.get("command")
        if not isinstance(command, str) or not command:
            raise InvalidInputError("a shell agent needs a 'command' string")
        outcome = run_shell_agent(command, task, workdir, spec.get("timeout_s"))
        result.update(
            ok=outcome.ok,
            exit_code=outcome.exit_code,
            stdout=_text(outcome.stdout),
            stderr=_text(outcome.stderr),
        )
        if outcome.timed_out:
            result["error"] = {"code": "deadline_exceeded", "message": "the agent's command timed out"}
    else:
        context = AgentContext(task, workdir)
        try:
            value = load_callable(str(agent.get("target", "")))(context)
            json.dumps(value)  # the value must travel as JSON: fail here, inside the agent's result
            result.update(ok=True, value=value)
        except Exception as exc:  # noqa: BLE001 - an agent's failure is its result, not the runner's
            result["error"] = _error(exc)
        finally:
            context.close()
        result["value"] = attach_memory_use(result["value"], context.memory_use)
    result["duration_s"] = time.monotonic() - started
    return result


def run_spec_file(path: str) -> int:
    """Entry point of ``python -m rayflow.guest run``: prints the result; 0 when the agent succeeded."""
    try:
        spec = json.loads(Path(path).read_text())
        if not isinstance(spec, dict):
            raise InvalidInputError("a subtask spec is a JSON object")
        result = run_spec(spec)
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": {"code": "invalid_input", "message": str(exc)}}
    except RayflowError as exc:
        result = {"ok": False, "error": _error(exc)}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["ok"] else 1
