"""Can this sandbox reach the hub? One cheap ``health`` call, from the sandbox's own network.

``check_hub(context)`` is a python agent for :mod:`rayflow.guest.runner` that a worker runs once
when it starts with memory on, before it takes any subtask: a hub the node (or the sandbox's
network policy) cannot reach is then found in one bounded call instead of costing every memory
call of every subtask a connection timeout. Its task::

    {"timeout_s": 5.0}      # bounds the connection; the whole call gets twice that

It never raises for an unreachable hub; it returns ``{"reachable": bool, "address", "code",
"cause", "seconds"}`` and the worker decides (:mod:`rayflow.swarm.hub_check`). A hub that answers
with an error of its own (an expired or foreign token) was reached: that is the agents' problem to
report, not the network's. Standard library only (plus the hub client, imported as agents import
it): this runs inside a sandbox.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rayflow.errors import RayflowError, TransportError
from rayflow.guest.runner import connect_memory
from rayflow.wire.hub_endpoint import HOST_ENV, PORT_ENV
from rayflow.wire.memory_use import describe_error

#: Seconds the check may take when its task names none.
DEFAULT_TIMEOUT_S = 5.0


def check_hub(context: Any) -> dict[str, Any]:
    """One ``health`` call to the configured hub; see the module docstring for the value."""
    timeout_s = float(context.task.get("timeout_s") or DEFAULT_TIMEOUT_S)
    env = os.environ
    address = f"{env.get(HOST_ENV, '?')}:{env.get(PORT_ENV, '?')}"
    started = time.monotonic()
    verdict: dict[str, Any] = {"reachable": True, "address": address, "code": "", "cause": ""}
    try:
        # The call outlasts the handshake's limit, so an unreachable hub reads as what it is (no
        # handshake), not as a slow call.
        client = connect_memory(env, timeout_s=2 * timeout_s, connect_timeout_s=timeout_s)
        try:
            client.health()
        finally:
            client.close()
    except TransportError as exc:
        verdict.update(reachable=False, code=exc.code, cause=describe_error(exc))
    except RayflowError as exc:
        # Reached, and refused (a token problem) or no client at all (a ConfigError: no hub
        # configured, no hub client in the image): only the latter keeps memory from working.
        if exc.code == "config_error":
            verdict.update(reachable=False, code=exc.code, cause=describe_error(exc))
    except Exception as exc:  # noqa: BLE001 - whatever kept the call from being made is the cause
        verdict.update(reachable=False, code="transport_error", cause=describe_error(exc))
    verdict["seconds"] = round(time.monotonic() - started, 3)
    return verdict
