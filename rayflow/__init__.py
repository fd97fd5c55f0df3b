"""rayflow: swarms of coding agents in isolated sandboxes on Ray, with a shared, learning ReasoningBank.

``rayflow.init()`` and ``rayflow.Swarm`` are loaded on first use, so importing the package (as
the in-sandbox runtime does) pulls in nothing heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Swarm", "init"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rayflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'rayflow' has no attribute {name!r}")
