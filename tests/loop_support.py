"""An asyncio event loop on a thread of its own, driven from a synchronous test, and a poll helper.

Why: a hub replica (its RPC server, its federation node) lives on its own event loop, as each
Ray actor has its own; a test that runs several replicas gives each a loop thread and calls into
them, while its own thread plays the clients.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any


class LoopThread:
    """An event loop running on a daemon thread until :meth:`stop_loop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        """Run ``coroutine`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout_s)

    def run(self, function: Callable[[], Any]) -> Any:
        """Call ``function`` on the loop's thread (objects that belong to the loop need it)."""

        async def inside() -> Any:
            return function()

        return self.call(inside())

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def eventually(condition: Callable[[], bool], timeout_s: float = 60.0, every_s: float = 0.1) -> bool:
    """Whether ``condition`` holds within ``timeout_s`` (polled: it waits on other threads or
    processes, never stands in for work)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()
