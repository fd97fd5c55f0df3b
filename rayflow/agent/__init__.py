"""The in-sandbox runtime: the channel to the host, the command server and the agent runner.

Everything here runs inside a sandbox image, so it imports only the standard library and msgpack:
the image stays small and needs no scientific stack. Reaching the ReasoningBank from an agent
(``AgentContext.memory``) additionally needs the hub client's packages (aioquic and its dependencies; the default image carries them) in the
image; they are imported only when memory is first used.
"""

from __future__ import annotations

from rayflow.agent.channel import PROTOCOL_VERSION


def runtime_version() -> str:
    """``"<package version> (protocol N)"``; the package version is unknown when not installed."""
    from importlib import metadata

    try:
        package = metadata.version("rayflow")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return f"{package} (protocol {PROTOCOL_VERSION})"


__all__ = ["PROTOCOL_VERSION", "runtime_version"]
