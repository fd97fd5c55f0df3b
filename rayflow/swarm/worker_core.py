"""One worker's life: own a sandbox, run subtasks in it one at a time, record results, clean up.

This is the logic of the ``SandboxWorker`` Ray actor without Ray, so it runs (and is tested) in a
plain process too. A worker:

* provisions its sandbox (cold from a backend, or adopted as a warm worker), unpacks the job's
  repository into it and asks the runtime how it runs Python (so an agent starts exactly as the
  runtime does, whatever the backend). The repository comes from the plan's
  :class:`~rayflow.swarm.upload.UploadSource`, never from a path the worker is told about: on Ray
  the driver packed it once into the object store and the worker fetches the archive from there
  (it may run on a machine that never had the directory); a plain process may name a local
  directory, packed as it is at each upload;
* with the job's ``isolation="worker"`` (the default) keeps that one sandbox for its whole life;
  with ``isolation="subtask"`` runs every subtask in a sandbox nobody used before: it holds a
  :class:`~rayflow.sandbox.pool.WarmPool` of size 1 that creates *and prepares* (upload, identity,
  agent host: what provisioning does) the next sandbox in the background while the current
  subtask runs, destroys each sandbox right after its subtask, and takes the prepared one for the
  next subtask. It never has more than one sandbox in use, plus at most one being prepared. It
  fetches a packed repository once and keeps the bytes for every fresh sandbox it prepares;
* with memory on, checks once at start, from inside its sandbox, that the hub answers
  (:mod:`rayflow.swarm.hub_check`); a hub it cannot reach fails the start with a
  :class:`~rayflow.errors.HubUnreachableError` naming the node, the hub and the cause, so no work
  is placed where every memory call would fail;
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

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from rayflow.errors import ConfigError, InvalidInputError, RayflowError, SandboxError
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.gc import current_process_owner
from rayflow.sandbox.pool import SOURCE_READY, PooledSandbox, WarmPool
from rayflow.sandbox.spec import ExecResult, NetworkPolicy, SandboxSpec
from rayflow.swarm.hub_check import (
    HUB_CHECK_SPEC,
    HUB_CHECK_TIMEOUT_S,
    check_cause,
    dialled_address,
    hub_check_spec,
    hub_unreachable,
)
from rayflow.swarm.job import AgentRef, Job, subtask_result_namespace
from rayflow.swarm.upload import UploadSource
from rayflow.wire.guest_commands import AGENT_HOST_SOCKET, launcher_argv, runtime_argv
from rayflow.wire.hub_endpoint import CA_ENV, CONNECT_TIMEOUT_ENV, SERVER_NAME_ENV, TOKEN_ENV, HubEndpoint
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


class TokenMinter(Protocol):
    """Mints a hub token: ``(subject, namespaces, ttl_s) -> JWT`` for the job's tenant."""

    def __call__(self, sub: str, namespaces: list[str], ttl_s: int) -> str: ...


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker of a job needs to know, derived once from the job."""

    job_name: str
    agent: AgentRef
    spec: SandboxSpec
    #: What every sandbox starts with (``None``: nothing); see :class:`~rayflow.swarm.upload.UploadSource`.
    upload: UploadSource | None
    token_namespaces: tuple[str, ...]
    token_ttl_s: int
    memory: bool
    results_namespace: str
    #: ``"worker"``: one sandbox for the worker's life; ``"subtask"``: a fresh one per subtask.
    isolation: str = "worker"
    #: The job's tenant (names who holds a pooled sandbox).
    tenant: str = "default"

    @classmethod
    def for_job(cls, job: Job, hub: HubEndpoint | None) -> WorkerPlan:
        if hub is not None:
            network = NetworkPolicy.hub_and(hub.host, hub.port, *job.allow)
        elif job.allow:
            network = NetworkPolicy.allow_list(*job.allow)
        else:
            network = NetworkPolicy.none()
        # The hub's address as the sandbox reaches it (RAYFLOW_HUB_HOST/PORT) is the backend's to set.
        env = {CA_ENV: hub.ca_pem.decode(), SERVER_NAME_ENV: hub.server_name} if hub is not None else {}
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
            upload=upload_source(job.upload),
            token_namespaces=tuple(job.token_namespaces()),
            token_ttl_s=job.token_ttl_s,
            memory=job.memory and hub is not None,
            results_namespace=job.results_namespace,
            isolation=job.isolation,
            tenant=job.tenant,
        )


def upload_source(upload: str | UploadSource | None) -> UploadSource | None:
    """A job's ``upload`` as a source: a directory path becomes a directory source."""
    if upload is None or isinstance(upload, UploadSource):
        return upload
    return UploadSource.from_directory(upload)


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


@dataclass(frozen=True)
class _Prepared:
    """What preparing one pooled sandbox found, kept until the sandbox is taken."""

    #: The plan's generation it was prepared for (``adopt`` starts a new one).
    generation: int
    identity: dict[str, Any]
    agent_host: bool


class WorkerCore:
    """A worker and its sandbox: one for its whole life, or one per subtask (``plan.isolation``).

    Either way it has at most one sandbox in use at a time; with ``isolation="subtask"`` its pool
    prepares at most one more in the background, so at most two exist at once (one still being
    destroyed included). Not thread-safe: a worker runs one subtask at a time by design; only
    ``close`` may come from another thread (it ends a running subtask).
    """

    def __init__(
        self,
        worker_id: str,
        plan: WorkerPlan,
        create_sandbox: Callable[[SandboxSpec], Sandbox],
        *,
        hub: HubEndpoint | None = None,
        mint_token: TokenMinter | None = None,
        node_id: str = "",
        region: str = "",
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        hub_check_timeout_s: float = HUB_CHECK_TIMEOUT_S,
        hub_connect_timeout_s: float | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.plan = plan
        self.node_id = node_id
        #: The region of the worker's node (``""``: none named); every result carries it.
        self.region = region
        #: How long the start's hub check may take (memory on only).
        self._hub_check_timeout_s = hub_check_timeout_s
        #: Seconds hub clients (this worker's, and its agents') wait for a connection; ``None``: their default.
        self._hub_connect_timeout_s = hub_connect_timeout_s
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
        #: isolation="subtask": the pool preparing the next sandbox, and what preparing found.
        self._pool: WarmPool | None = None
        self._prepared: dict[str, _Prepared] = {}
        self._generation = 0
        #: Whether a subtask ran in the sandbox in use (subtask isolation never runs a second).
        self._used = False
        #: isolation="subtask": the upload loaded once (source, bytes), unpacked into every sandbox.
        self._kept_upload: tuple[UploadSource, bytes] | None = None
        self._upload_lock = threading.Lock()
        #: How many times this worker loaded (packed or fetched) an upload.
        self.upload_loads = 0

    # -- life ------------------------------------------------------------------------------
    @property
    def sandbox(self) -> Sandbox | None:
        """The sandbox in use; with subtask isolation ``None`` between subtasks."""
        return self._sandbox

    def start(self) -> list[PhaseEvent]:
        """Provision the sandbox (create, upload, identify); returns the provision span.

        With subtask isolation the sandbox comes from the worker's pool, which then starts
        preparing the next one at once.
        """
        started = self._clock()
        spec = replace(self.plan.spec, owner=self._owner)
        if self.plan.isolation == "subtask":
            try:
                self._pool = self._subtask_pool(spec)
                sandbox = self._take_fresh()
                self._check_hub(sandbox)
            except BaseException:
                self.close()
                raise
            return [PhaseEvent(Phase.PROVISION, self.worker_id, started, self._clock(), sandbox.id)]
        if self.plan.isolation != "worker":
            raise ConfigError(f"unknown isolation {self.plan.isolation!r}", worker=self.worker_id)
        sandbox = self._create(spec)
        self._sandbox = sandbox
        try:
            self._upload(sandbox, self.plan)
            self._identity = dict(sandbox.ping())
            self._start_agent_host(sandbox)
            self._check_hub(sandbox)
        except BaseException:
            self.close()
            raise
        return [PhaseEvent(Phase.PROVISION, self.worker_id, started, self._clock(), sandbox.id)]

    def _check_hub(self, sandbox: Sandbox) -> None:
        """With memory on: one ``health`` call from inside ``sandbox``, through the runner, as its
        agents will call the hub; raises :class:`~rayflow.errors.HubUnreachableError` (naming this
        node, the hub and the cause) when the hub does not answer."""
        if not self.plan.memory or self._hub is None:
            return
        timeout_s = self._hub_check_timeout_s
        spec_path = f"{SPEC_DIR}/{HUB_CHECK_SPEC}"
        sandbox.write_file(spec_path, json.dumps(hub_check_spec(timeout_s)).encode())
        launch = host_launcher_argv if self._agent_host else agent_launcher_argv
        outcome = sandbox.exec(
            launch(self._identity, "run", spec_path), env=self._check_env(), timeout_s=timeout_s + EXEC_GRACE_S
        )
        parsed = parse_runner_output(outcome.stdout)
        cause = check_cause(parsed)
        if cause is not None:
            raise hub_unreachable(self._hub, cause, node_id=self.node_id, region=self.region,
                                  worker_id=self.worker_id, dialled=dialled_address(parsed))

    def _check_env(self) -> dict[str, str]:
        """The check's token: the worker's, or the literal ``no-token`` when it mints none (the check
        asks whether the hub answers; a hub that refuses the token has answered)."""
        return {TOKEN_ENV: self.token() or "no-token"}

    def adopt(self, plan: WorkerPlan, worker_id: str) -> list[PhaseEvent]:
        """Give this started (warm) worker to a job: take its plan and id, upload its repository.

        A warm worker's sandbox was made for the same profile (image, limits, network, env); a plan
        for a different profile is refused, because its sandbox would not be what the job asked for.
        So is a plan of another isolation: a worker's isolation is fixed when it starts.

        With subtask isolation, adopting is handled, not refused: the sandbox in use has run no
        subtask (a warm worker runs none), so it gets the new repository as in worker isolation;
        the sandbox the pool prepared for the earlier plan is destroyed (the pool prepares one for
        ``plan``), and one still being prepared for it is destroyed when taken, never used.
        """
        sandbox = self._sandbox
        if self._closed or (sandbox is None and self._pool is None):
            raise SandboxError("this worker has no sandbox to adopt into", worker=self.worker_id)
        if sandbox_profile(plan.spec) != sandbox_profile(self.plan.spec):
            raise SandboxError("the job's sandbox profile differs from this warm worker's", worker=self.worker_id)
        if plan.isolation != self.plan.isolation:
            raise SandboxError(
                f"the job's isolation ({plan.isolation}) differs from this warm worker's",
                worker=self.worker_id,
                isolation=self.plan.isolation,
            )
        started = self._clock()
        with self._lock:
            self.plan = plan
            self._generation += 1
        self.worker_id = worker_id
        self._token = None
        client, self._hub_client = self._hub_client, None
        if client is not None:
            client.close()
        if self._pool is not None:
            self._pool.discard_ready()
            if sandbox is None or self._used:
                self._release_current()
                sandbox = self._take_fresh()
                return [PhaseEvent(Phase.PROVISION, worker_id, started, self._clock(), sandbox.id)]
        assert sandbox is not None
        self._upload(sandbox, plan)
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
        self._agent_host = self._launch_agent_host(sandbox, self._identity, self.plan.agent)

    def _launch_agent_host(self, sandbox: Sandbox, identity: Mapping[str, Any], agent: AgentRef) -> bool:
        """Start ``sandbox``'s agent host; whether it runs (a failure is logged, not fatal)."""
        try:
            outcome = sandbox.exec(agent_host_argv(identity, agent), timeout_s=AGENT_HOST_START_S)
        except RayflowError as exc:
            log.warning("worker %s: the agent host did not start: %s", self.worker_id, exc)
            return False
        if outcome.exit_code != 0:
            log.warning(
                "worker %s: the agent host did not start (exit %s): %s",
                self.worker_id, outcome.exit_code, _tail(outcome.stderr)[-400:],
            )
        return outcome.exit_code == 0

    # -- a fresh sandbox per subtask (isolation="subtask") -----------------------------------
    def _subtask_pool(self, spec: SandboxSpec) -> WarmPool:
        """The pool of size 1 that prepares this worker's next sandbox while a subtask runs.

        Its owner is this worker's owner with a ``/pool`` suffix, so a sweep reaps its sandboxes
        (in use or being prepared) once the worker's process is gone, as it reaps a worker's one
        sandbox. An acquire waits for the sandbox being prepared rather than start a second.
        """
        return WarmPool.from_create(
            self._create,
            spec,
            size=1,
            max_size=2,
            refill_workers=1,
            pool_id=f"{self._owner}/pool",
            ready_check=None,
            prepare=self._prepare,
            wait_for_refill=True,
        )

    def _prepare(self, sandbox: Sandbox) -> None:
        """Make a pooled sandbox what ``start`` makes the worker's one sandbox: the job's repository
        uploaded, the runtime's identity read, the agent host started (in the pool's thread, or the
        acquiring one). Raises :class:`ConfigError` or :class:`SandboxError`; the pool then destroys
        the sandbox and never hands it out."""
        with self._lock:
            plan, generation = self.plan, self._generation
        try:
            self._upload(sandbox, plan)
            self._check_open()
            identity = dict(sandbox.ping())
            self._check_open()
            agent_host = self._launch_agent_host(sandbox, identity, plan.agent)
        except (ConfigError, SandboxError):
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, RayflowError) else f"{type(exc).__name__}: {exc}"
            raise SandboxError(
                f"preparing sandbox {sandbox.id} failed: {message}", worker=self.worker_id
            ) from exc
        with self._lock:
            self._prepared[sandbox.id] = _Prepared(generation, identity, agent_host)

    # -- the job's upload --------------------------------------------------------------------
    def _upload(self, sandbox: Sandbox, plan: WorkerPlan) -> None:
        """Unpack ``plan``'s upload into ``sandbox``'s work directory (nothing when it has none)."""
        source = upload_source(plan.upload)
        if source is not None:
            sandbox.upload_archive(self._upload_bytes(source, keep=plan.isolation == "subtask"), ".")

    def _upload_bytes(self, source: UploadSource, *, keep: bool) -> bytes:
        """The packed upload. A directory is packed anew each time (a sandbox gets it as it is
        now); an archive or a fetch is loaded once and, with ``keep`` (subtask isolation: a fresh
        sandbox per subtask), kept for every later sandbox of the same source, so a large
        repository is fetched once per worker, never once per subtask."""
        if source.live:
            self.upload_loads += 1
            return source.load()
        with self._upload_lock:
            kept = self._kept_upload
            if kept is not None and kept[0] is source:
                return kept[1]
            self._kept_upload = None
            self.upload_loads += 1
            data = source.load()
            if keep:
                self._kept_upload = (source, data)
            return data

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the worker closed", worker=self.worker_id)

    def _take_fresh(self) -> PooledSandbox:
        """Take a prepared sandbox nobody used from the pool and make it the one in use."""
        assert self._pool is not None
        while True:
            self._check_open()
            try:
                sandbox = self._pool.acquire(self.plan.tenant, self.plan.job_name)
            except InvalidInputError:
                self._check_open()  # closed meanwhile (the pool with it): say so as the worker
                raise
            with self._lock:
                prepared = self._prepared.pop(sandbox.id, None)
                current = prepared is not None and prepared.generation == self._generation
            if prepared is None:
                self._pool.release(sandbox)
                raise SandboxError("the pool handed out a sandbox that was not prepared", sandbox=sandbox.id)
            if current:
                self._sandbox, self._identity = sandbox, prepared.identity
                self._agent_host = prepared.agent_host
                self._used = False
                return sandbox
            self._pool.release(sandbox)  # prepared for a plan this worker no longer has (adopt)

    def _renew(self) -> list[PhaseEvent]:
        """Before a subtask: take the prepared sandbox. Waiting for it is a provision span; a
        sandbox prepared in time costs no span."""
        self._release_current()
        started = self._clock()
        sandbox = self._take_fresh()
        if sandbox.source == SOURCE_READY:
            return []
        detail = f"{sandbox.id} ({sandbox.source})"
        return [PhaseEvent(Phase.PROVISION, self.worker_id, started, self._clock(), detail)]

    def _release_current(self) -> None:
        """Destroy the sandbox in use (subtask isolation, after its subtask)."""
        sandbox, self._sandbox = self._sandbox, None
        self._identity, self._agent_host = {}, False
        if sandbox is not None and self._pool is not None:
            self._pool.release(sandbox)

    def _agent_host_answers(self, sandbox: Sandbox) -> bool:
        try:
            outcome = sandbox.exec(host_launcher_argv(self._identity, "ping"), timeout_s=AGENT_HOST_PING_S)
        except RayflowError:
            return False
        return outcome.exit_code == 0

    def close(self) -> None:
        """Destroy the sandbox and drop the hub connection; safe to call more than once.

        With subtask isolation, closing the pool destroys the sandbox in use and the one prepared
        or being prepared (a preparation under way stops at its next step, then is destroyed).
        """
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
        if self._pool is not None:
            self._pool.close()
            with self._lock:
                self._prepared.clear()
        elif sandbox is not None:
            sandbox.destroy()
        self._kept_upload = None

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

        With subtask isolation it runs in a sandbox nobody used (the pool's prepared one, a
        provision span if it had to be waited for), destroyed as soon as the agent's run ends.
        ``record=False`` skips storing the result in the hub (the coordinator's own steps)."""
        if self._closed:
            raise SandboxError("this worker is closed", worker=self.worker_id)
        events: list[PhaseEvent] = []
        if self._pool is not None and (self._sandbox is None or self._used):
            events += self._renew()
        sandbox = self._sandbox
        if sandbox is None or self._closed:
            raise SandboxError("this worker has no sandbox (not started, or closed)", worker=self.worker_id)
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
            if self._hub_connect_timeout_s is not None:
                env[CONNECT_TIMEOUT_ENV] = str(self._hub_connect_timeout_s)
        started = self._clock()
        self._used = True
        try:
            sandbox.write_file(spec_path, json.dumps(runner_spec).encode())
            launch = host_launcher_argv if self._agent_host else agent_launcher_argv
            outcome = sandbox.exec(
                launch(self._identity, "run", spec_path),
                env=env,
                timeout_s=self.plan.agent.timeout_s + EXEC_GRACE_S,
            )
            ended = self._clock()
        finally:
            if self._pool is not None:
                # Nothing this subtask's agent left behind may outlive its run.
                self._release_current()
        result = result_from_run(
            subtask, outcome, started, ended,
            worker_id=self.worker_id, node_id=self.node_id, sandbox_id=sandbox.id, region=self.region,
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
            options = {} if self._hub_connect_timeout_s is None else {"connect_timeout_s": self._hub_connect_timeout_s}
            self._hub_client = SyncHubClient.for_endpoint(self._hub, token=token or "", **options)
        return self._hub_client

    def describe(self) -> dict[str, Any]:
        """Where the worker is and what it holds; ``pool``: its pool's counters (hits: sandboxes
        prepared in time, waits and misses: subtasks that waited for one), with subtask isolation."""
        sandbox = self._sandbox
        pool = self._pool
        return {
            "worker_id": self.worker_id,
            "node_id": self.node_id,
            "region": self.region,
            "sandbox_id": sandbox.id if sandbox is not None else None,
            "closed": self._closed,
            "isolation": self.plan.isolation,
            "pool": dataclasses.asdict(pool.stats()) if pool is not None else None,
            "upload_loads": self.upload_loads,
        }


def _file_name(subtask_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in subtask_id)[:100]


__all__ = [
    "TokenMinter",
    "WorkerCore",
    "WorkerPlan",
    "agent_host_argv",
    "agent_launcher_argv",
    "host_launcher_argv",
    "parse_runner_output",
    "result_from_run",
]
