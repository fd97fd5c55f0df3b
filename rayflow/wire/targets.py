"""``"package.module:function"`` names: the one lookup for agents, decompositions and coordinator steps.

A job names its Python agent, its decomposition function and (pattern B) the coordinator's steps
this way; the name crosses the wall in a subtask's spec and is resolved on whichever side runs
the code (the runner in a sandbox, the coordinator on the host for pattern A's decomposition).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rayflow.errors import InvalidInputError


def load_callable(target: str) -> Callable[..., Any]:
    """The function named by ``"package.module:function"``."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise InvalidInputError("a python agent is named 'module:function'", target=target)
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise InvalidInputError(f"{target!r} is not a callable", target=target)
    return function
