"""What a user hands the swarm: a job = an agent, a decomposition into subtasks, and how to run them.

A job is plain data (it crosses into Ray actors and, in pattern B, into a sandbox), validated at
construction so a wrong setting fails before any worker or container exists. Three ways to
decompose, because that is how coding work arrives: an explicit list of tasks, one subtask per file
of a repository matching a glob, or a user function that returns the tasks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rayflow.config import DEFAULT_MAX_UPLOAD_BYTES
from rayflow.errors import ConfigError, InvalidInputError
from rayflow.ids import new_id
from rayflow.sandbox.spec import Limits
from rayflow.swarm.upload import ARCHIVE, UploadSource, pack_directory
from rayflow.wire.globbing import glob_files
from rayflow.wire.subtasks import Pattern, Subtask

#: Job names are path segments of the hub namespace ``swarm/<job>``.
JOB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
BACKENDS = ("auto", "docker", "local", "process")
#: How long a sandbox serves: a worker's whole life, or one subtask (see ``Job.isolation``).
Isolation = Literal["worker", "subtask"]
ISOLATIONS: tuple[Isolation, ...] = ("worker", "subtask")


@dataclass(frozen=True)
class AgentRef:
    """The agent every subtask of a job runs: a shell command or a ``module:function`` in the sandbox."""

    kind: str
    #: For ``shell``: the command (``/bin/sh -c``); the task arrives as JSON on stdin.
    command: str = ""
    #: For ``python``: ``"package.module:function"`` importable inside the sandbox.
    target: str = ""
    #: Wall-clock limit of one subtask's agent run.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.kind == "shell" and not self.command:
            raise ConfigError("a shell agent needs a command")
        if self.kind == "python" and ":" not in self.target:
            raise ConfigError("a python agent is named 'module:function'", target=self.target)
        if self.kind not in ("shell", "python"):
            raise ConfigError(f"agent kind must be 'shell' or 'python', not {self.kind!r}")
        if self.timeout_s <= 0:
            raise ConfigError("agent timeout_s must be positive")

    @classmethod
    def shell(cls, command: str, timeout_s: float = 600.0) -> AgentRef:
        return cls("shell", command=command, timeout_s=timeout_s)

    @classmethod
    def python(cls, target: str, timeout_s: float = 600.0) -> AgentRef:
        return cls("python", target=target, timeout_s=timeout_s)

    def to_spec(self) -> dict[str, Any]:
        """The ``agent`` field of the in-sandbox runner's subtask spec."""
        if self.kind == "shell":
            return {"kind": "shell", "command": self.command}
        return {"kind": "python", "target": self.target}


# --- decompositions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskList:
    """An explicit list of task payloads, one subtask each."""

    tasks: tuple[Mapping[str, Any], ...]

    def __init__(self, tasks: Iterable[Mapping[str, Any]]) -> None:
        object.__setattr__(self, "tasks", tuple(dict(t) for t in tasks))
        for task in self.tasks:
            if not isinstance(task, Mapping):
                raise ConfigError("every task of a TaskList is a mapping")


@dataclass(frozen=True)
class FileGlob:
    """One subtask per file of ``repo`` whose repository-relative path matches ``pattern``.

    The task is ``{"path": <relative path>, **extra}``. Files are listed in sorted order, so the same
    repository always gives the same subtask indexes (retries and reports rely on it).
    """

    repo: str
    pattern: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FunctionDecomposition:
    """A user function ``(task: Mapping) -> iterable of task payloads``, by reference or as an object.

    Pattern B runs decomposition inside a sandbox, so there the function must be named
    ``"module:function"`` and importable in the sandbox; pattern A also accepts a callable.
    """

    function: str | Callable[[Mapping[str, Any]], Iterable[Mapping[str, Any]]]

    @property
    def named(self) -> bool:
        return isinstance(self.function, str)


Decomposition = TaskList | FileGlob | FunctionDecomposition


def resolve_function(target: str) -> Callable[..., Any]:
    """The callable named ``"package.module:function"`` (the runner's lookup; a bad name is a config error)."""
    from rayflow.wire.targets import load_callable

    try:
        return load_callable(target)
    except (ImportError, InvalidInputError) as exc:
        raise ConfigError(f"cannot load {target!r}: {exc}") from None


def iter_task_payloads(
    decomposition: Decomposition, job_task: Mapping[str, Any]
) -> Iterator[Mapping[str, Any]]:
    """The task payloads a decomposition yields, lazily where it can (a 1000-file glob is a list of paths)."""
    if isinstance(decomposition, TaskList):
        yield from decomposition.tasks
    elif isinstance(decomposition, FileGlob):
        for path in glob_files(Path(decomposition.repo), decomposition.pattern):
            yield {"path": path, **dict(decomposition.extra)}
    else:
        function = decomposition.function
        if isinstance(function, str):
            function = resolve_function(function)
        for task in function(dict(job_task)):
            if not isinstance(task, Mapping):
                raise InvalidInputError("a decomposition function must yield mappings", got=type(task).__name__)
            yield task


def decomposition_to_wire(decomposition: Decomposition) -> dict[str, Any]:
    """The plain form of a decomposition that the pattern-B decompose step reads in a sandbox."""
    if isinstance(decomposition, TaskList):
        return {"kind": "list", "tasks": [dict(task) for task in decomposition.tasks]}
    if isinstance(decomposition, FileGlob):
        return {"kind": "glob", "pattern": decomposition.pattern, "extra": dict(decomposition.extra)}
    if not isinstance(decomposition.function, str):
        raise ConfigError("only a function named 'module:function' can be decomposed in a sandbox")
    return {"kind": "function", "target": decomposition.function}


def iter_subtasks(job_name: str, payloads: Iterable[Mapping[str, Any]]) -> Iterator[Subtask]:
    """Number payloads into subtasks with stable ids; a payload's own ``"id"`` is kept if it has one."""
    for index, payload in enumerate(payloads):
        subtask_id = str(payload.get("id") or f"{job_name}-{index:05d}")
        yield Subtask(subtask_id, index, dict(payload))


# --- the job ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MattsAgentProfile:
    """What MaTTS knows about the agent it scales: names only, so it pickles into Ray actors and
    round-trips through JSON (``MattsAgentProfile(**json.loads(json.dumps(asdict(profile))))``).

    The defaults know nothing and fit any agent: sequential refinement hands each attempt the
    previous value as feedback only, rollouts differ only by their ``seed``, and a contrast lesson
    says which rollout succeeded where others failed, tagged ``matts``, ``contrast`` and the
    error codes. An agent that reports the failure it worked on and the approaches it tried gets
    lessons naming the approach that fixed that failure and those that failed on it, tagged in
    the vocabulary its own memory lookup reads. A job names its agent's profile in ``Matts``.
    """

    #: Sequential: ``"module:function"`` in the sandbox that plans each next attempt's task from the
    #: previous values (the refinement agent's ``revise``); ``None``: feedback only.
    reviser: str | None = None
    #: Task field holding an ordered list of approaches; rollouts after the first start it rotated.
    order_field: str | None = None
    #: Value field listing the agent's tries: mappings naming an approach (``try_name_key``), saying
    #: whether it ``passed`` and what it changed (``try_edit_key``).
    tries_field: str | None = None
    try_name_key: str = "name"
    try_edit_key: str = "edit"
    #: Where a rollout's summary lists the distinct approaches it tried.
    tried_summary_field: str = "tried_names"
    #: Value field naming the approach a successful result used.
    chosen_field: str | None = None
    #: Value fields with the failure the agent worked on: its text and a stable digest of it.
    signature_field: str | None = None
    signature_id_field: str | None = None
    #: The approaches in lesson titles ("... where 2 other approaches failed").
    approaches_noun: str = "approaches"
    #: Lesson tag prefixes, empty for no such tag: the winning approach, the failure's digest, and
    #: each approach that failed on it.
    chosen_tag: str = ""
    signature_tag: str = ""
    failed_tag: str = ""
    #: Start of the lesson's content line carrying the winning change.
    edit_prefix: str = "Edit: "

    def __post_init__(self) -> None:
        if self.reviser is not None and ":" not in self.reviser:
            raise ConfigError("a reviser is named 'module:function'", reviser=self.reviser)
        tags = [tag for tag in (self.chosen_tag, self.signature_tag, self.failed_tag) if tag]
        for i, tag in enumerate(tags):
            # A failed approach read back as a suggestion would steer the agent to what failed.
            if any(other.startswith(tag) for j, other in enumerate(tags) if j != i):
                raise ConfigError("no lesson tag prefix may start another", tags=", ".join(tags))

    @property
    def repairs(self) -> bool:
        """Whether results name a failure and the approaches tried on it (lessons contrast approaches)."""
        return self.signature_field is not None and self.tries_field is not None


@dataclass(frozen=True)
class Matts:
    """Memory-aware test-time scaling of each subtask.

    ``parallel``: ``k`` rollouts of the subtask at once in ``k`` sandboxes, the best kept by the
    judge, memory distilled by contrasting them. ``sequential``: up to ``r`` refinements, stopping at
    the first success. ``profile``: what MaTTS may know about the job's agent (nothing by default).
    """

    mode: str = "parallel"
    k: int = 3
    r: int = 3
    profile: MattsAgentProfile = field(default_factory=MattsAgentProfile)

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "sequential"):
            raise ConfigError("matts mode is 'parallel' or 'sequential'")
        if self.k < 1 or self.r < 1:
            raise ConfigError("matts k and r are at least 1")


@dataclass(frozen=True)
class Job:
    """A task, its decomposition and how its subtasks run."""

    agent: AgentRef
    decomposition: Decomposition
    #: Unique name; also the hub namespace ``swarm/<name>`` of its results. Generated if empty.
    name: str = ""
    #: Free-form description handed to a decomposition function and to synthesis.
    task: Mapping[str, Any] = field(default_factory=dict)
    #: Tenant whose memory the job's agents read and write (from their tokens).
    tenant: str = "default"
    #: Extra namespaces (besides ``swarm/<name>``) the agents' tokens may use, e.g. shared lessons.
    memory_namespaces: tuple[str, ...] = ()
    #: Whether agents get a hub token at all (False: the memory-off control).
    memory: bool = True
    pattern: Pattern = Pattern.HYBRID
    backend: str = "auto"
    image: str = "rayflow-sandbox:latest"
    limits: Limits = field(default_factory=lambda: Limits(cpus=0.5, memory_bytes=512 * 1024 * 1024))
    #: How many workers (and so sandboxes) run at once.
    workers: int = 4
    #: How many workers a subtask may be given before it is reported failed (worker/container failures).
    max_dispatches: int = 3
    #: What every sandbox's work directory starts with: a host directory (defaults to a FileGlob's
    #: repo), or an :class:`~rayflow.swarm.upload.UploadSource` (a packed archive; ``Swarm.run``
    #: packs a directory into one, see :func:`packed_job`).
    upload: str | UploadSource | None = None
    #: Adopt workers started ahead by ``Swarm.prewarm`` (sandbox already provisioned) before
    #: starting any cold. (A job with ``isolation="subtask"`` uses a ``WarmPool`` per worker anyway.)
    warm_pool: bool = False
    #: ``"worker"``: each worker runs its subtasks one after the other in one sandbox, for its
    #: whole life. ``"subtask"``: every subtask runs in a sandbox nobody used before, so nothing a
    #: subtask's agent leaves behind (files outside the repository copy, background processes, a
    #: poisoned cache) reaches the next; each worker prepares its next sandbox while the current
    #: subtask runs, so a subtask rarely waits for one.
    isolation: Isolation = "worker"
    matts: Matts | None = None
    #: Lifetime of each sandbox's token; workers refresh it before it runs out.
    token_ttl_s: int = 900
    #: Further (host, port) endpoints the sandboxes may reach besides the hub (a model API...).
    allow: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        name = self.name or f"job-{new_id()[:12].lower()}"
        if not JOB_NAME_RE.match(name):
            raise ConfigError(f"job name {name!r} must match {JOB_NAME_RE.pattern}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "pattern", Pattern(self.pattern))
        object.__setattr__(self, "memory_namespaces", tuple(self.memory_namespaces))
        object.__setattr__(self, "allow", tuple((str(h), int(p)) for h, p in self.allow))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"isolation must be one of {', '.join(ISOLATIONS)}, not {self.isolation!r}")
        if self.workers < 1 or self.max_dispatches < 1:
            raise ConfigError("workers and max_dispatches are at least 1")
        if self.pattern is Pattern.FULL_SANDBOX and isinstance(self.decomposition, FunctionDecomposition):
            if not self.decomposition.named:
                raise ConfigError("pattern B decomposes inside a sandbox: name the function as 'module:function'")
        upload = self.upload
        if upload is None and isinstance(self.decomposition, FileGlob):
            upload = self.decomposition.repo
        if upload is not None and not isinstance(upload, UploadSource):
            upload = str(Path(upload).resolve())
            if not Path(upload).is_dir():
                raise ConfigError(f"upload directory {upload} does not exist")
        object.__setattr__(self, "upload", upload)

    @property
    def results_namespace(self) -> str:
        """Hub namespace where workers record each subtask's result."""
        return f"swarm/{self.name}"

    @property
    def results_scope(self) -> str:
        """Token namespace pattern covering the results namespace and everything below it."""
        return f"{self.results_namespace}/*"

    def token_namespaces(self) -> list[str]:
        """Namespace patterns of a worker's token: the job's results, plus the shared memory namespaces."""
        return [self.results_scope, *self.memory_namespaces]


def subtask_result_namespace(results_namespace: str, subtask_id: str) -> str:
    """The namespace holding exactly one subtask's result record (so it can be looked up alone)."""
    return f"{results_namespace}/results/{_segment(subtask_id)}"


def _segment(text: str) -> str:
    """``text`` as a namespace segment; ids that had to change get a hash so two never collide."""
    cleaned = re.sub(r"[^a-z0-9._-]", "-", text.lower()).lstrip("._-")[:48]
    if cleaned == text and cleaned:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{cleaned}-{digest}" if cleaned else digest


def packed_job(
    job: Job, keep: Callable[[bytes], UploadSource], *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> Job:
    """``job`` as it travels to machines that do not share this one's disk: it names no path here.

    Its upload directory is packed once, now (a :class:`ConfigError` above ``max_bytes``, saying
    how big it was), and ``keep`` stores the archive where workers can fetch it and returns the
    source naming it; archive bytes handed in are stored the same way. Pattern A's file glob is
    listed now into a task list, because the coordinator that would list it may run on another
    machine (pattern B lists it in the coordinator's sandbox, from the uploaded copy). An upload
    that is already a fetch is kept as it is.
    """
    upload = job.upload
    if isinstance(upload, str):
        upload = keep(pack_directory(Path(upload), max_bytes))
    elif isinstance(upload, UploadSource) and upload.kind == ARCHIVE:
        upload = keep(upload.load())
    decomposition = job.decomposition
    if job.pattern is Pattern.HYBRID and isinstance(decomposition, FileGlob):
        decomposition = TaskList(iter_task_payloads(decomposition, job.task))
    if upload is job.upload and decomposition is job.decomposition:
        return job
    return replace(job, upload=upload, decomposition=decomposition)


def subtasks_of(job: Job) -> Iterator[Subtask]:
    """The job's subtasks, decomposed on this host (pattern A)."""
    return iter_subtasks(job.name, iter_task_payloads(job.decomposition, job.task))
