"""The coordinator's own agent steps, run inside a sandbox in pattern B: decompose and synthesize.

In pattern B nothing of the job's reasoning runs on the host: the coordinator hands these two
steps to a sandbox of its own like any subtask, and they reach memory only over QUIC with the
sandbox's token. Standard library plus rayflow's light modules only (the image carries no more).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rayflow.errors import InvalidInputError
from rayflow.guest.runner import HUB_ENV
from rayflow.wire.globbing import glob_files
from rayflow.wire.synthesis import synthesize_report
from rayflow.wire.targets import load_callable

#: Most task payloads one decomposition may return through the channel (a result is one frame).
MAX_DECOMPOSED = 100_000


def decompose(context: Any) -> list[dict[str, Any]]:
    """Task payloads of the job: ``task["decomposition"]`` is the wire form of a decomposition."""
    spec = context.task.get("decomposition")
    if not isinstance(spec, Mapping):
        raise InvalidInputError("the decompose step needs a 'decomposition' object")
    kind = spec.get("kind")
    if kind == "list":
        payloads = [dict(task) for task in spec.get("tasks") or []]
    elif kind == "glob":
        extra = dict(spec.get("extra") or {})
        payloads = [{"path": path, **extra} for path in glob_files(Path(context.workdir), str(spec["pattern"]))]
    elif kind == "function":
        function = load_callable(str(spec.get("target", "")))
        payloads = [dict(task) for task in function(dict(context.task.get("job_task") or {}))]
    else:
        raise InvalidInputError(f"unknown decomposition kind {kind!r}")
    if len(payloads) > MAX_DECOMPOSED:
        raise InvalidInputError("the decomposition is too large for one step", count=len(payloads))
    return payloads


def synthesize(context: Any) -> dict[str, Any]:
    """The job's report from its summary and results; stored in the hub when the sandbox has memory."""
    summary = dict(context.task.get("summary") or {})
    results = list(context.task.get("results") or [])
    report = synthesize_report(summary, results)
    stored = None
    namespace = context.task.get("results_namespace")
    if namespace and all(os.environ.get(name) for name in HUB_ENV):
        item = context.memory.store_pattern(
            namespace=str(namespace),
            title=f"report of {summary.get('job_id') or context.task.get('job', 'job')}",
            content=report,
            domain="swarm-report",
            tags=["swarm-report"],
        )
        stored = item.get("id") if isinstance(item, Mapping) else None
    return {"report": report, "stored": stored}
