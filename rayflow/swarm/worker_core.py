"""One worker's life: own one sandbox, run subtasks in it one at a time, record results, clean up.

This is the logic of the ``SandboxWorker`` Ray actor without Ray, so it runs (and is tested) in a
plain process too. A worker:

* provisions its sandbox once (cold from a backend, or from a warm pool), uploads the job's
  repository into it and asks the runtime how it runs Python (so an agent starts exactly as the
  runtime does, whatever the backend);
* holds a short-lived hub token scoped to the job's tenant and namespaces, minted by the hub and
  refreshed before it runs out; the token is handed to each agent run in its environment, never
  baked into the sandbox, so a refreshed token reaches the next subtask;
* starts the sandbox's agent host (:mod:`rayflow.guest.agent_host`) once the sandbox is provisioned:
  a process that imports the runner and the hub client ahead of time and forks one child per
  subtask, so an agent does not pay an interpreter's start and imports (a few hundred CPU
  milliseconds, seconds of wall time under a fraction of a CPU) in every run;
* runs a subtask by writing the runner's spec into the sandbox and executing the host's launcher
  (:mod:`rayflow.guest.host_launcher`), which prints what ``python -m rayflow.guest run`` prints
  and runs the spec itself when the host is gone; the agent's failure is a result, a dead sandbox
  is an error (:class:`~rayflow.errors.SandboxError`) the coordinator answers by retrying elsewhere;
* records every result in the hub under ``swarm/<job>/results/<subtask>`` (the memory-sync phase),
  so a coordinator that lost the worker mid-answer finds the result there instead of rerunning it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from rayflow.errors import RayflowError, SandboxError
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.spec import ExecResult, NetworkPolicy, SandboxSpec
from rayflow.swarm.job import AgentRef, Job, subtask_result_namespace
from rayflow.wire.guest_commands import AGENT_HOST_SOCKET, launcher_argv, runtime_argv
from rayflow.wire.subtasks import Phase, PhaseEvent, Subtask, SubtaskResult

log = logging.getLogger("rayflow.swarm.worker_core")

#: Where the runner's spec of each subtask is written, relative to the sandbox's work directory.
SPEC_DIR = ".rayflow"
#: Characters of agent output kept in a result (the rest stays in the sandbox's logs).
OUTPUT_TAIL_CHARS = 2000
#: Refresh a token when less than this fraction of its lifetime is left.
TOKEN_REFRESH_FRACTION = 0.3
#: Extra seconds a subtask's exec may take beyond the agent's own timeout (start-up, reporting).
EXEC_GRACE_S = 30.0
#: How long starting the agent host (its imports, under the sandbox's CPU limit) may take.
AGENT_HOST_START_S = 120.0
#: How long asking whether the agent host still answers may take.
AGENT_HOST_PING_S = 30.0
#: Python agents whose module the host imports ahead of time: the runtime's own (an uploaded
#: repository's modules are left to each run, so a warm sandbox never runs a stale copy).
PRELOADABLE_PREFIX = "rayflow."


@dataclass(frozen=True)
class HubAccess:
    """How a sandbox reaches the hub: its QUIC address and the CA certificate to pin."""

    host: str
    port: int
    ca_pem: bytes


class TokenMinter(Protocol):
    """Mints a hub token: ``(subject, namespaces, ttl_s) -> JWT`` for the job's tenant."""

    def __call__(self, sub: str, namespaces: list[str], ttl_s: int) -> str: ...


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker of a job needs to know, derived once from the job."""

    job_name: str
    agent: AgentRef
    spec: SandboxSpec
    upload: str | None
    token_namespaces: tuple[str, ...]
    token_ttl_s: int
    memory: bool
    results_namespace: str

    @classmethod
    def for_job(cls, job: Job, hub: HubAccess | None) -> WorkerPlan:
        if hub is not None:
            network = NetworkPolicy.hub_and(hub.host, hub.port, *job.allow)
        elif job.allow:
            network = NetworkPolicy.allow_list(*job.allow)
        else:
            network = NetworkPolicy.none()
        env = {"RAYFLOW_HUB_CA": hub.ca_pem.decode()} if hub is not None else {}
        spec = SandboxSpec(
            image=job.image,
            limits=job.limits,
            network=network,
            env=env,
            labels={"rayflow.job": job.name},
            owner=f"job:{job.name}",
            exec_timeout_s=job.agent.timeout_s + EXEC_GRACE_S,
        )
        return cls(
            job_name=job.name,
            agent=job.agent,
            spec=spec,
            upload=job.upload,
            token_namespaces=tuple(job.token_namespaces()),
            token_ttl_s=job.token_ttl_s,
            memory=job.memory and hub is not None,
            results_namespace=job.results_namespace,
        )


def sandbox_profile(spec: SandboxSpec) -> tuple[object, ...]:
    """What makes two sandboxes interchangeable for a warm worker: image, limits, network, env, mounts."""
    return (spec.image, spec.limits, spec.network, tuple(sorted(spec.env.items())), spec.mounts, spec.workdir)


def _interpreter(identity: Mapping[str, Any]) -> tuple[str, list[str]]:
    return str(identity.get("python") or "python3"), [str(entry) for entry in identity.get("path") or []]


def agent_launcher_argv(identity: Mapping[str, Any], *args: str) -> list[str]:
    """argv that starts ``rayflow.guest`` in the sandbox with the runtime's own interpreter and path."""
    python, path = _interpreter(identity)
    return runtime_argv(python, path, *args)


def host_launcher_argv(identity: Mapping[str, Any], *args: str) -> list[str]:
    """argv of the agent host's launcher (``run SPEC`` or ``ping``) with the runtime's interpreter."""
    python, path = _interpreter(identity)
    return launcher_argv(python, path, AGENT_HOST_SOCKET, *args)


def agent_host_argv(identity: Mapping[str, Any], agent: AgentRef) -> list[str]:
    """argv that starts the sandbox's agent host in the background, returning once it listens."""
    argv = agent_launcher_argv(identity, "host", "--socket", AGENT_HOST_SOCKET, "--detach")
    module = agent.target.partition(":")[0] if agent.kind == "python" else ""
    if module.startswith(PRELOADABLE_PREFIX):
        argv += ["--preload", module]
    return argv


def parse_runner_output(stdout: bytes) -> dict[str, Any] | None:
    """The runner's JSON result: the last line of its stdout that parses as an object."""
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def result_from_run(
    subtask: Subtask, outcome: ExecResult, started_at: float, ended_at: float, **where: str
) -> SubtaskResult:
    """A :class:`SubtaskResult` from the runner's exec; raises SandboxError if the sandbox itself failed."""
    parsed = parse_runner_output(outcome.stdout)
    if outcome.killed is not None and parsed is None:
        # The runner (not just the agent) was killed: by the sandbox's limits or its destruction.
        error = {"code": f"killed_{outcome.killed.value}", "message": f"the subtask was killed: {outcome.killed.value}"}
        return SubtaskResult(
            subtask.id, subtask.index, False, error=error, exit_code=outcome.exit_code,
            output_tail=_tail(outcome.stderr), started_at=started_at, ended_at=ended_at, **where,
        )
    if parsed is None:
        raise SandboxError(
            "the agent runner gave no result",
            exit_code=outcome.exit_code,
            stderr=_tail(outcome.stderr)[-400:],
        )
    output = str(parsed.get("stdout") or "") + str(parsed.get("stderr") or "")
    return SubtaskResult(
        subtask_id=subtask.id,
        index=subtask.index,
        ok=bool(parsed.get("ok")),
        value=parsed.get("value"),
        error=parsed.get("error"),
        exit_code=parsed.get("exit_code"),
        output_tail=output[-OUTPUT_TAIL_CHARS:],
        started_at=started_at,
        ended_at=ended_at,
        **where,
    )


def _tail(data: bytes) -> str:
    return data.decode("utf-8", "replace")[-OUTPUT_TAIL_CHARS:]


def result_record(result: SubtaskResult) -> dict[str, Any]:
    """The compact form of a result stored in the hub (value cut short; the hub stores text)."""
    data = result.to_dict()
    value = json.dumps(data.get("value"), default=str)
    data["value"] = json.loads(value) if len(value) <= 4000 else {"truncated": value[:4000]}
    data["output_tail"] = data["output_tail"][-500:]
    return data


class WorkerCore:
    """A worker and its one sandbox. Not thread-safe: a worker runs one subtask at a time by design."""

    def __init__(
        self,
        worker_id: str,
        plan: WorkerPlan,
        create_sandbox: Callable[[SandboxSpec], Sandbox],
        *,
        hub: HubAccess | None = None,
        mint_token: TokenMinter | None = None,
        node_id: str = "",
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker_id = worker_id
        self.plan = plan
        self.node_id = node_id
        self._create = create_sandbox
        self._hub = hub if plan.memory or plan.results_namespace else None
        self._mint = mint_token
        self._owner = owner if owner is not None else current_process_owner(worker_id)
        self._clock = clock
        self._sandbox: Sandbox | None = None
        self._identity: dict[str, Any] = {}
        self._token: str | None = None
        self._token_expires = 0.0
        self._hub_client: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._agent_host = False

    # -- life ------------------------------------------------------------------------------
    @property
    def sandbox(self) -> Sandbox | None:
        return self._sandbox

    def start(self) -> list[PhaseEvent]:
        """Provision the sandbox (create, upload, identify); returns the provision span."""
        started = self._clock()
        spec = replace(self.plan.spec, owner=self._owner)
        sandbox = self._create(spec)
        self._sandbox = sandbox
        try:
            if self.plan.upload:
                sandbox.upload(Path(self.plan.upload), ".")
            self._identity = dict(sandbox.ping())
            self._start_agent_host(sandbox)
        except BaseException:
            self.close()
            raise
        return [PhaseEvent(Phase.PROVISION, self.worker_id, started, self._clock(), sandbox.id)]

    def adopt(self, plan: WorkerPlan, worker_id: str) -> list[PhaseEvent]:
        """Give this started (warm) worker to a job: take its plan and id, upload its repository.

        A warm worker's sandbox was made for the same profile (image, limits, network, env); a plan
        for a different profile is refused, because its sandbox would not be what the job asked for.
        """
        sandbox = self._sandbox
        if sandbox is None or self._closed:
            raise SandboxError("this worker has no sandbox to adopt into", worker=self.worker_id)
        if sandbox_profile(plan.spec) != sandbox_profile(self.plan.spec):
            raise SandboxError("the job's sandbox profile differs from this warm worker's", worker=self.worker_id)
        started = self._clock()
        self.plan = plan
        self.worker_id = worker_id
        self._token = None
        client, self._hub_client = self._hub_client, None
        if client is not None:
            client.close()
        if plan.upload:
            sandbox.upload(Path(plan.upload), ".")
        self._agent_host = self._agent_host_answers(sandbox)
        if not self._agent_host:
            self._start_agent_host(sandbox)
        return [PhaseEvent(Phase.PROVISION, worker_id, started, self._clock(), f"{sandbox.id} (warm)")]

    @property
    def agent_host_running(self) -> bool:
        """Whether subtasks run through the sandbox's agent host (else each starts a fresh runner)."""
        return self._agent_host

    def _start_agent_host(self, sandbox: Sandbox) -> None:
        """Start the agent host; when it fails, subtasks start fresh runners (logged, not fatal)."""
        try:
            outcome = sandbox.exec(agent_host_argv(self._identity, self.plan.agent), timeout_s=AGENT_HOST_START_S)
        except RayflowError as exc:
            log.warning("worker %s: the agent host did not start: %s", self.worker_id, exc)
            self._agent_host = False
            return
        self._agent_host = outcome.exit_code == 0
        if not self._agent_host:
            log.warning(
                "worker %s: the agent host did not start (exit %s): %s",
                self.worker_id, outcome.exit_code, _tail(outcome.stderr)[-400:],
            )

    def _agent_host_answers(self, sandbox: Sandbox) -> bool:
        try:
            outcome = sandbox.exec(host_launcher_argv(self._identity, "ping"), timeout_s=AGENT_HOST_PING_S)
        except RayflowError:
            return False
        return outcome.exit_code == 0

    def close(self) -> None:
        """Destroy the sandbox and drop the hub connection; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        client, self._hub_client = self._hub_client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a connection must not stop the sandbox's removal
                log.debug("closing the hub client failed", exc_info=True)
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.destroy()

    # -- tokens ----------------------------------------------------------------------------
    def token(self) -> str | None:
        """A valid token for this worker's sandbox, minted or refreshed as needed."""
        if self._mint is None or self._hub is None:
            return None
        now = self._clock()
        ttl = self.plan.token_ttl_s
        if self._token is None or now >= self._token_expires - ttl * TOKEN_REFRESH_FRACTION:
            self._token = self._mint(self.worker_id, list(self.plan.token_namespaces), ttl)
            self._token_expires = now + ttl
            client, self._hub_client = self._hub_client, None
            if client is not None:
                client.close()
        return self._token

    # -- work ------------------------------------------------------------------------------
    def run(self, subtask: Subtask, *, record: bool = True) -> tuple[SubtaskResult, list[PhaseEvent]]:
        """Run ``subtask`` in the sandbox; returns its result and the spans it took.

        ``record=False`` skips storing the result in the hub (the coordinator's own steps)."""
        sandbox = self._sandbox
        if sandbox is None or self._closed:
            raise SandboxError("this worker has no sandbox (not started, or closed)", worker=self.worker_id)
        events: list[PhaseEvent] = []
        token = self.token()
        spec_path = f"{SPEC_DIR}/{_file_name(subtask.id)}.json"
        runner_spec = {
            "agent": self.plan.agent.to_spec(),
            "task": {**dict(subtask.task), "subtask_id": subtask.id, "job": self.plan.job_name},
            "timeout_s": self.plan.agent.timeout_s,
        }
        env = {"RAYFLOW_SUBTASK_ID": subtask.id, "RAYFLOW_JOB": self.plan.job_name, "RAYFLOW_WORKER": self.worker_id}
        if token is not None and self.plan.memory:
            env["RAYFLOW_HUB_TOKEN"] = token
        started = self._clock()
        sandbox.write_file(spec_path, json.dumps(runner_spec).encode())
        launch = host_launcher_argv if self._agent_host else agent_launcher_argv
        outcome = sandbox.exec(
            launch(self._identity, "run", spec_path),
            env=env,
            timeout_s=self.plan.agent.timeout_s + EXEC_GRACE_S,
        )
        ended = self._clock()
        result = result_from_run(
            subtask, outcome, started, ended,
            worker_id=self.worker_id, node_id=self.node_id, sandbox_id=sandbox.id,
        )
        events.append(PhaseEvent(Phase.EXECUTE, self.worker_id, started, ended, subtask.id, result.ok))
        if record and self._hub is not None and self._mint is not None:
            synced = self._clock()
            ok = self._record(result)
            events.append(PhaseEvent(Phase.MEMORY_SYNC, self.worker_id, synced, self._clock(), subtask.id, ok))
        return result, events

    def _record(self, result: SubtaskResult) -> bool:
        """Store the result in the hub; a failure here is logged, never fatal to the subtask."""
        try:
            client = self._client()
            client.store_pattern(
                namespace=subtask_result_namespace(self.plan.results_namespace, result.subtask_id),
                title=f"result of {result.subtask_id}",
                content=json.dumps(result_record(result), default=str),
                tags=["swarm-result", "ok" if result.ok else "failed"],
                domain="swarm-result",
                outcome="success" if result.ok else "failure",
                source_task=result.subtask_id,
            )
            return True
        except RayflowError as exc:
            log.warning("recording result of %s in the hub failed: %s", result.subtask_id, exc)
            return False

    def _client(self) -> Any:
        if self._hub_client is None:
            from rayflow.wire.hub_client import SyncHubClient

            assert self._hub is not None
            token = self.token()
            self._hub_client = SyncHubClient(
                self._hub.host, self._hub.port, ca_pem=self._hub.ca_pem, token=token or ""
            )
        return self._hub_client

    def describe(self) -> dict[str, Any]:
        sandbox = self._sandbox
        return {
            "worker_id": self.worker_id,
            "node_id": self.node_id,
            "sandbox_id": sandbox.id if sandbox is not None else None,
            "closed": self._closed,
        }


def _file_name(subtask_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in subtask_id)[:100]


__all__ = [
    "HubAccess",
    "TokenMinter",
    "WorkerCore",
    "WorkerPlan",
    "agent_host_argv",
    "agent_launcher_argv",
    "host_launcher_argv",
    "parse_runner_output",
    "result_from_run",
]
