"""Whether a starting worker may take work: the hub check of a worker with memory on.

A node that cannot reach the hub (a firewall, a partition between regions, a sandbox network
that does not route to it) used to be found one memory call at a time: every call of every
subtask on that node waited for a connection timeout, and each agent, treating memory as advice,
carried on and passed. So a worker with memory on checks the hub once when it starts, from where
its agents will call it: inside its sandbox, through the runner, with one ``health`` call
(:mod:`rayflow.guest.agents.hub_check`). If the hub does not answer, the start fails with a
:class:`~rayflow.errors.HubUnreachableError` naming the node, the hub's address and the cause,
which the coordinator counts as a failed start and the report shows.

The decisions are here, Ray-free and pure: what the check runs, how its result is read, and the
error that names the failure. :class:`~rayflow.swarm.worker_core.WorkerCore` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rayflow.errors import HubUnreachableError
from rayflow.wire.hub_endpoint import HubEndpoint

#: The guest's check, named (the host never imports the guest).
HUB_CHECK_AGENT = "rayflow.guest.agents.hub_check:check_hub"
#: Seconds the check may take (connection and call) unless the worker is told otherwise.
HUB_CHECK_TIMEOUT_S = 5.0
#: Where the check's spec is written, under the worker's spec directory.
HUB_CHECK_SPEC = "hub-check.json"
#: Longest cause kept in the error's message.
MAX_CAUSE_CHARS = 300


def hub_check_spec(timeout_s: float = HUB_CHECK_TIMEOUT_S) -> dict[str, Any]:
    """The runner's spec of the check: the guest's check agent, bounded by ``timeout_s``."""
    return {
        "agent": {"kind": "python", "target": HUB_CHECK_AGENT},
        "task": {"timeout_s": timeout_s},
        "timeout_s": timeout_s,
    }


def check_cause(parsed: Mapping[str, Any] | None) -> str | None:
    """``None`` when the runner's result of the check says the hub answered; otherwise why not.

    Anything short of a ``reachable: true`` verdict is a cause: no result at all, a check that
    failed to run (an image without the check), a verdict that the hub could not be reached.
    """
    if parsed is None:
        return "the hub check gave no result"
    if not parsed.get("ok"):
        error = parsed.get("error") or {}
        code = str(error.get("code", "failed")) if isinstance(error, Mapping) else "failed"
        message = str(error.get("message", "")) if isinstance(error, Mapping) else str(error)
        return f"the hub check failed to run: {code}: {message}"[:MAX_CAUSE_CHARS]
    value = parsed.get("value")
    if not isinstance(value, Mapping):
        return "the hub check gave no verdict"
    if value.get("reachable") is True:
        return None
    return str(value.get("cause") or value.get("code") or "the hub did not answer")[:MAX_CAUSE_CHARS]


def dialled_address(parsed: Mapping[str, Any] | None) -> str:
    """The address the sandbox dialled (its ``RAYFLOW_HUB_HOST``/``PORT``), when the check says."""
    value = parsed.get("value") if isinstance(parsed, Mapping) else None
    return str(value.get("address") or "") if isinstance(value, Mapping) else ""


def hub_unreachable(
    endpoint: HubEndpoint,
    cause: str,
    *,
    node_id: str = "",
    region: str = "",
    worker_id: str = "",
    dialled: str = "",
) -> HubUnreachableError:
    """The error a worker's start fails with: which hub, from where, and why."""
    hub = f"{endpoint.host}:{endpoint.port}"
    where = f"node {node_id}" if node_id else "this host"
    if region:
        where += f" (region {region})"
    via = f" (dialled as {dialled} from the sandbox)" if dialled and dialled != hub else ""
    return HubUnreachableError(
        f"the hub at {hub}{via} could not be reached from {where}: {cause}",
        hub=hub,
        node=node_id,
        region=region,
        worker=worker_id,
        cause=cause,
    )
