"""One job from start to report: decompose, run on a fleet, collect, synthesize (patterns A and B).

Ray-free: the caller passes a fleet factory (Ray actors or threads), a hub session (how to reach
the hub and mint tokens) and, for pattern B, a way to create the coordinator's own sandbox. The
``Coordinator`` Ray actor is a thin shell around :class:`CoordinatorCore`.

Patterns: in A the coordinator's agent steps (decomposition, synthesis) run here on the host and
the coordinator reads the hub with a token of its own; in B they run in a sandbox of the
coordinator's, as python agents (:mod:`rayflow.guest.agents.coordinator_steps`), and reach memory only over QUIC
with that sandbox's token. Workers are sandboxed in both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rayflow.errors import HubUnreachableError, InvalidInputError, RayflowError
from rayflow.sandbox.backend import Sandbox
from rayflow.sandbox.spec import SandboxSpec
from rayflow.swarm.dispatch_loop import DispatchLoop, Fleet, RunStats
from rayflow.swarm.job import AgentRef, Job, decomposition_to_wire, iter_subtasks, iter_task_payloads
from rayflow.swarm.matts import MattsPlan
from rayflow.swarm.recovery import find_recorded_result
from rayflow.swarm.results_log import ResultsLog
from rayflow.swarm.worker_core import TokenMinter, WorkerCore, WorkerPlan
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.subtasks import Pattern, Phase, PhaseEvent, Subtask, SubtaskResult
from rayflow.wire.synthesis import synthesize_report

log = logging.getLogger("rayflow.swarm.coordinator_core")

#: CPUs of the coordinator's own sandbox at least (pattern B).
STEP_CPUS = 1.0

COORDINATOR = "coordinator"
DECOMPOSE_STEP = "rayflow.guest.agents.coordinator_steps:decompose"
SYNTHESIZE_STEP = "rayflow.guest.agents.coordinator_steps:synthesize"
#: Results handed to a sandboxed synthesis step travel in one frame: keep them compact.
SYNTHESIS_FIELDS = ("subtask_id", "index", "ok", "value", "error", "dispatches", "worker_id", "node_id",
                    "region", "started_at", "ended_at")


@dataclass(frozen=True)
class HubSession:
    """How the coordinator and its workers reach the hub, and how tokens for the job's tenant are minted."""

    endpoint: HubEndpoint
    mint: TokenMinter
    #: Seconds the coordinator's own hub client waits for a connection; ``None``: the client's default.
    connect_timeout_s: float | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What running a job produced: where its results are, its counters and its report."""

    job_id: str
    pattern: str
    results_path: str
    summary: dict[str, Any]
    report: str
    stats: RunStats


def step_plan_for(plan: WorkerPlan) -> WorkerPlan:
    """The plan of the coordinator's own sandbox: the job's sandbox profile with at least one CPU
    (decomposition and synthesis sit on the job's critical path), running the steps agent. It keeps
    one sandbox whatever the job's isolation: the steps are the job's own, not its agents' work."""
    limits = plan.spec.limits
    cpus = max(limits.cpus or STEP_CPUS, STEP_CPUS)
    spec = replace(plan.spec, limits=replace(limits, cpus=cpus))
    agent = AgentRef.python(DECOMPOSE_STEP, timeout_s=plan.agent.timeout_s)
    return replace(plan, spec=spec, agent=agent, isolation="worker")


def start_step_core(
    plan: WorkerPlan, create_sandbox: Callable[[SandboxSpec], Sandbox], hub: HubSession | None
) -> tuple[WorkerCore, list[PhaseEvent]]:
    """Start the coordinator's own sandbox for a pattern-B job of ``plan``'s profile."""
    core = WorkerCore(
        COORDINATOR,
        step_plan_for(plan),
        create_sandbox,
        hub=hub.endpoint if hub is not None else None,
        mint_token=hub.mint if hub is not None else None,
    )
    return core, core.start()


class CoordinatorCore:
    """Runs one :class:`Job`. ``run()`` once."""

    def __init__(
        self,
        job: Job,
        make_fleet: Callable[[WorkerPlan], Fleet],
        results_dir: str | Path,
        *,
        hub: HubSession | None = None,
        create_step_sandbox: Callable[[SandboxSpec], Sandbox] | None = None,
        step_core: WorkerCore | None = None,
        collect_garbage: Callable[[], list[str]] | None = None,
        on_progress: Callable[[RunStats], None] | None = None,
        clock: Callable[[], float] = time.time,
        image_check: Mapping[str, Any] | None = None,
    ) -> None:
        if job.pattern is Pattern.FULL_SANDBOX and create_step_sandbox is None and step_core is None:
            raise InvalidInputError("pattern B needs a sandbox for the coordinator's own steps")
        self.job = job
        self._make_fleet = make_fleet
        self._hub = hub if job.memory or hub is not None else None
        self._create_step_sandbox = create_step_sandbox
        self._collect_garbage = collect_garbage
        self._on_progress = on_progress
        self._clock = clock
        #: How the sandbox image was made present on the nodes before this job (plain data, see
        #: :func:`rayflow.sandbox.image_transfer.image_check_summary`): the summary's ``images``.
        self._image_check = dict(image_check) if image_check is not None else None
        self.results_path = Path(results_dir) / f"{job.name}.jsonl"
        self._client: Any = None
        #: The coordinator's own sandbox (pattern B); a started one may be handed in (warm), and it
        #: is destroyed with this job either way.
        self._step_core: WorkerCore | None = step_core
        self.coordinator: DispatchLoop | None = None

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> JobOutcome:
        job = self.job
        log_file = ResultsLog(self.results_path)
        log_file.set_meta(job_id=job.name, pattern=job.pattern.value, backend=job.backend, workers=job.workers,
                          memory=job.memory, started_at=self._clock())
        if self._image_check is not None:
            log_file.set_meta(images=self._image_check)
        matts = MattsPlan.for_job(job)
        # The coordinator's own steps keep the job's agent; workers get the MaTTS one (sequential).
        plan = WorkerPlan.for_job(job, self._hub.endpoint if self._hub is not None else None)
        worker_plan = WorkerPlan.for_job(matts.job, self._hub.endpoint if self._hub is not None else None)
        rollouts_log = ResultsLog(matts.rollouts_path(self.results_path)) if matts.parallel else None
        sink = matts.wrap_sink(
            log_file, rollouts_log, store_lesson=self._store_lesson if self._hub is not None else None
        )
        fleet: Fleet | None = None
        try:
            if job.pattern is Pattern.FULL_SANDBOX:
                # Lazy: the coordinator's sandbox starts and decomposes while the workers provision.
                subtasks: Iterator[Subtask] = self._decompose_in_sandbox(plan, log_file)
            else:
                subtasks = self._decompose(log_file)
            fleet = self._make_fleet(worker_plan)
            self.coordinator = DispatchLoop(
                fleet,
                sink,
                workers=job.workers,
                max_dispatches=job.max_dispatches,
                recover=self._recover if self._hub is not None else None,
                on_progress=self._on_progress,
                worker_prefix=f"{job.name}-w",
                close_fleet=False,
                # A hub no node can reach is a finding to report, not a crash: the job ends with
                # its subtasks failed unrun and a report that says why.
                abandon_on=(HubUnreachableError.code,) if worker_plan.memory else (),
            )
            stats = self.coordinator.run(matts.transform(subtasks, sink))
            sink.finish()
            stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            # Before the report: it says how many workers started, and where and why others did not.
            log_file.set_meta(coordinator=dataclasses.asdict(stats))
            report = self._synthesize(log_file)
            log_file.set_meta(finished_at=self._clock())
            # Cleanup after the report: workers remove their sandboxes (waited for, so nothing is
            # left once run() returns); a sweep for the sandboxes of workers that died, if any did.
            fleet.close()
            fleet = None
            if self._collect_garbage is not None and (stats.worker_failures or stats.launch_failures):
                self._sweep()
            return JobOutcome(job.name, job.pattern.value, str(self.results_path), log_file.summary(), report, stats)
        finally:
            if fleet is not None:
                fleet.close()
            self._close()
            log_file.close()
            if rollouts_log is not None:
                rollouts_log.close()

    def _sweep(self) -> None:
        """Remove sandboxes of workers that died; a failed sweep is logged, the job's results stand."""
        assert self._collect_garbage is not None
        try:
            reaped = self._collect_garbage()
        except Exception as exc:  # noqa: BLE001 - cleanup must not turn a finished job into a failure
            log.warning("garbage collection after the job failed: %s", exc)
            return
        if reaped:
            log.info("reaped %d sandboxes of lost workers", len(reaped))

    def cancel(self) -> None:
        if self.coordinator is not None:
            self.coordinator.cancel()

    # -- steps -------------------------------------------------------------------------------
    def _start_step_sandbox(self, plan: WorkerPlan, log_file: ResultsLog) -> None:
        if self._step_core is None:
            assert self._create_step_sandbox is not None
            self._step_core, events = start_step_core(plan, self._create_step_sandbox, self._hub)
            for event in events:
                log_file.append_event(event)

    def _run_step(self, target: str, task: dict[str, Any]) -> tuple[SubtaskResult, list[PhaseEvent]]:
        core = self._step_core
        assert core is not None
        core.plan = replace(core.plan, agent=AgentRef.python(target, timeout_s=core.plan.agent.timeout_s))
        result, events = core.run(Subtask(f"{self.job.name}-{target.rsplit(':', 1)[1]}", -1, task), record=False)
        if not result.ok:
            raise RayflowError(
                f"the coordinator's {target} step failed in its sandbox",
                error=json.dumps(result.error),
                output=result.output_tail[-500:],
            )
        return result, events

    def _decompose(self, log_file: ResultsLog) -> Iterator[Subtask]:
        """Pattern A: decompose here; the first subtask is taken now so the span covers listing the work."""
        job = self.job
        started = self._clock()
        subtasks = iter_subtasks(job.name, iter_task_payloads(job.decomposition, job.task))
        first = next(subtasks, None)
        log_file.append_event(PhaseEvent(Phase.DECOMPOSE, COORDINATOR, started, self._clock(), job.name))
        return iter(()) if first is None else itertools.chain([first], subtasks)

    def _decompose_in_sandbox(self, plan: WorkerPlan, log_file: ResultsLog) -> Iterator[Subtask]:
        """Pattern B: start the coordinator's sandbox and run the decompose step there, on first use."""
        job = self.job
        self._start_step_sandbox(plan, log_file)
        started = self._clock()
        task = {"decomposition": decomposition_to_wire(job.decomposition), "job_task": dict(job.task)}
        result, _ = self._run_step(DECOMPOSE_STEP, task)
        if not isinstance(result.value, list):
            raise RayflowError("the decompose step returned no list of tasks")
        log_file.append_event(PhaseEvent(Phase.DECOMPOSE, COORDINATOR, started, self._clock(), job.name))
        yield from iter_subtasks(job.name, result.value)

    def _synthesize(self, log_file: ResultsLog) -> str:
        started = self._clock()
        summary = log_file.summary()
        if self.job.pattern is Pattern.FULL_SANDBOX:
            task = {
                "summary": summary,
                "results": [{key: r.to_dict()[key] for key in SYNTHESIS_FIELDS} for r in log_file],
                "results_namespace": self.job.results_namespace,
                "job": self.job.name,
            }
            result, _ = self._run_step(SYNTHESIZE_STEP, task)
            report = str((result.value or {}).get("report", ""))
        else:
            report = synthesize_report(summary, log_file)
            if self._hub is not None:
                self._store_report(report)
        log_file.append_event(PhaseEvent(Phase.AGGREGATE, COORDINATOR, started, self._clock(), "report"))
        return report

    # -- the hub, from the coordinator's side ---------------------------------------------------
    def _hub_client(self) -> Any:
        if self._client is None:
            from rayflow.wire.hub_client import SyncHubClient

            assert self._hub is not None
            # The job's results and its shared memory (where MaTTS lessons go).
            token = self._hub.mint(f"{COORDINATOR}-{self.job.name}", self.job.token_namespaces(),
                                   self.job.token_ttl_s)
            options = {} if self._hub.connect_timeout_s is None else {"connect_timeout_s": self._hub.connect_timeout_s}
            self._client = SyncHubClient.for_endpoint(self._hub.endpoint, token=token, **options)
        return self._client

    def _recover(self, subtask: Subtask) -> SubtaskResult | None:
        try:
            return find_recorded_result(self._hub_client(), self.job.results_namespace, subtask)
        except RayflowError as exc:
            log.warning("hub lookup for %s failed: %s", subtask.id, exc)
            return None

    def _store_lesson(self, namespace: str, arguments: dict[str, Any]) -> None:
        """Store a MaTTS contrast lesson (what won against what failed) with the coordinator's token."""
        self._hub_client().store_pattern(namespace=namespace, **arguments)

    def _store_report(self, report: str) -> None:
        try:
            self._hub_client().store_pattern(
                namespace=self.job.results_namespace,
                title=f"report of {self.job.name}",
                content=report,
                domain="swarm-report",
                tags=["swarm-report"],
            )
        except RayflowError as exc:
            log.warning("storing the report in the hub failed: %s", exc)

    def _close(self) -> None:
        if self._step_core is not None:
            self._step_core.close()
            self._step_core = None
        if self._client is not None:
            try:
                self._client.close()
            except RayflowError:
                log.debug("closing the coordinator's hub client failed", exc_info=True)
            self._client = None
