"""Everything that runs inside a sandbox: the runtime, the agent host, the runner and the agents.

The folder is the sandbox side of the wall, shipped whole into every sandbox image. Its rule
(an import contract, checked with the tests): it imports only :mod:`rayflow.wire`,
:mod:`rayflow.errors`, the standard library, msgpack and aioquic, never the host's packages nor
ray, numpy, hnswlib or apsw, so the image stays small and the host never runs guest code by
accident (the host names guest programs through :mod:`rayflow.wire.guest_commands`). Reaching the
ReasoningBank from an agent (``AgentContext.memory``) needs aioquic in the image (the default
image carries it); it is imported only when memory is first used.

* ``__main__``: ``python -m rayflow.guest serve | run SPEC | host``;
* ``runtime``: the command server on the channel (stdin/stdout) to the host;
* ``agent_host`` and ``host_launcher``: a pre-imported process forking one child per subtask,
  and the launcher the worker execs to reach it;
* ``runner``: runs one subtask's agent and reports its JSON result;
* ``agents/``: the agents themselves (the demo's fixer, MaTTS refinement, pattern B's coordinator
  steps, a model-calling agent).
"""

from __future__ import annotations

from rayflow.wire.channel import PROTOCOL_VERSION


def runtime_version() -> str:
    """``"<package version> (protocol N)"``; the package version is unknown when not installed."""
    from importlib import metadata

    try:
        package = metadata.version("rayflow")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return f"{package} (protocol {PROTOCOL_VERSION})"


__all__ = ["PROTOCOL_VERSION", "runtime_version"]
