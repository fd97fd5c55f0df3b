"""A hub served from a background thread: for scripts, notebooks and tests that block on other work.

``HubServer`` is asyncio; a notebook cell, a benchmark loop or a test that waits on sandboxes is
not. ``BackgroundHub`` runs the server on an event loop of its own thread and offers the few
blocking calls such callers need: the address, the CA, tokens, and running a coroutine on the
hub's loop (where the bank's own reads and writes happen).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rayflow.hub.server import HubServer
from rayflow.wire.hub_endpoint import TOKEN_ENV, HubEndpoint

T = TypeVar("T")
READ_WRITE = ("reasoningbank:read", "reasoningbank:write")


class BackgroundHub:
    """``with BackgroundHub(state_dir) as hub: hub.address, hub.issue_token(...)``."""

    def __init__(self, state_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, region: str = "local",
                 timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rayflow-hub", daemon=True)
        self._thread.start()
        try:
            self.server: HubServer = self.call(self._open(Path(state_dir), host, port, region))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _open(state_dir: Path, host: str, port: int, region: str) -> HubServer:
        server = HubServer(state_dir, host=host, port=port, region=region)
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the hub's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=self.timeout_s)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def ca_pem(self) -> bytes:
        return self.server.ca_pem

    @property
    def endpoint(self) -> HubEndpoint:
        return self.server.endpoint

    def issue_token(self, sub: str, tenant: str, namespaces: Sequence[str],
                    scopes: Sequence[str] = READ_WRITE, ttl_s: int | None = None) -> str:
        return self.server.issue_token(sub, tenant, list(namespaces), list(scopes), ttl_s)

    def sandbox_env(self, token: str) -> dict[str, str]:
        """The ``RAYFLOW_HUB_*`` variables an agent needs to reach this hub from the host's network."""
        return {**self.endpoint.to_env(), TOKEN_ENV: token}

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> BackgroundHub:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
