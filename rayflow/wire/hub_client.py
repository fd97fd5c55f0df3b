"""Clients of a ReasoningBank hub: ``HubClient`` (async) and ``SyncHubClient`` (blocking).

Both share one description of the ops (:class:`_HubOps`): one method per op of the op table
(:mod:`rayflow.wire.hub_ops`), whose keyword arguments are the op's argument names; each method only
builds the op's arguments and hands them to the transport's ``call``. The async client's transport is
:class:`~rayflow.wire.rpc_client.RpcClient`, whose ``call`` is a coroutine, so its methods are awaited;
the sync client's is :class:`~rayflow.wire.rpc_client.SyncRpcClient`, which runs that same async client
on a private loop, so its methods return results. There is no second protocol implementation.

The client runs inside sandbox images, so it imports only what talking to a hub needs: aioquic
(through :mod:`rayflow.wire.rpc_client`), msgpack and rayflow's light modules (the op table, the wire
conversions, the plain records). Embeddings travel as little-endian float32 bytes; a caller may
pass bytes, a sequence of floats, or anything with ``tobytes()`` (a numpy array is converted to
float32 first, using numpy only when the caller already has it loaded).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from rayflow.errors import InvalidInputError, UnknownOperationError
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.hub_ops import OPS
from rayflow.wire.hub_records import trajectory_to_wire
from rayflow.wire.memory_records import Trajectory
from rayflow.wire.rpc_client import RpcClient, SyncRpcClient


class SupportsToBytes(Protocol):
    """A vector that can give its raw float32 bytes (numpy arrays, ``array.array("f")``)."""

    def tobytes(self) -> bytes: ...


#: What an embedding argument may be.
Vector = bytes | bytearray | memoryview | Sequence[float] | SupportsToBytes


class _HubOps:
    """The hub's ops as methods; ``_transport.call`` decides whether they block or are awaited."""

    _transport: Any
    token: str
    timeout_s: float | None

    def _call(self, op: str, **args: Any) -> Any:
        """Send ``op`` with the arguments that are not None; an op not in the table is never sent."""
        info = OPS.get(op)
        if info is None:
            raise UnknownOperationError(f"op {op[:100]!r} is not in the hub's op table")
        clean = {name: value for name, value in args.items() if value is not None}
        return self._transport.call(
            op, clean, token=self.token, timeout_s=self.timeout_s, idempotent=info.idempotent
        )

    def health(self) -> Any:
        return self._call("health")

    def stats(self) -> Any:
        return self._call("stats")

    def search(
        self,
        query: str | Vector | None = None,
        *,
        embedding: Vector | None = None,
        k: int = 5,
        namespace: str = "",
        domain: str | None = None,
        outcome: str | None = None,
        min_confidence: float | None = None,
        mmr_lambda: float | None = None,
    ) -> Any:
        """Retrieve the ``k`` best items for text or an embedding (sent as float32 bytes): give one.

        ``query`` may itself be an embedding (anything but a string is taken as one).
        """
        if query is not None and not isinstance(query, str):
            if embedding is not None:
                raise InvalidInputError("give exactly one of query or embedding")
            query, embedding = None, query
        return self._call(
            "search",
            query=query,
            embedding=None if embedding is None else _as_bytes(embedding),
            k=k,
            namespace=namespace,
            domain=domain,
            outcome=outcome,
            min_confidence=min_confidence,
            mmr_lambda=mmr_lambda,
        )

    def get(self, id: str) -> Any:  # "id" is the op's argument name
        return self._call("get", id=id)

    def store_pattern(
        self,
        *,
        namespace: str,
        title: str,
        content: str,
        description: str | None = None,
        tags: list[str] | None = None,
        domain: str | None = None,
        outcome: str | None = None,
        confidence: float | None = None,
        source_task: str | None = None,
        embedding: Vector | None = None,
    ) -> Any:
        return self._call(
            "store_pattern",
            namespace=namespace,
            title=title,
            content=content,
            description=description,
            tags=tags,
            domain=domain,
            outcome=outcome,
            confidence=confidence,
            source_task=source_task,
            embedding=None if embedding is None else _as_bytes(embedding),
        )

    def edit_item(
        self,
        id: str,  # the op's argument name
        *,
        title: str | None = None,
        description: str | None = None,
        content: str | None = None,
        tags: list[str] | None = None,
    ) -> Any:
        return self._call("edit_item", id=id, title=title, description=description, content=content, tags=tags)

    def record_trajectory(self, trajectory: Trajectory) -> Any:
        return self._call("record_trajectory", trajectory=trajectory_to_wire(trajectory))

    def report_outcome(self, item_ids: list[str], *, success: bool) -> Any:
        return self._call("report_outcome", item_ids=list(item_ids), success=success)

    def consolidate(self, *, full: bool = False) -> Any:
        return self._call("consolidate", full=full)

    def revoke(self, jti: str, *, expires_at: float, reason: str | None = None) -> Any:
        return self._call("revoke", jti=jti, expires_at=expires_at, reason=reason)

    def issue_token(
        self, sub: str, *, namespaces: list[str], scopes: list[str], ttl_s: int | None = None
    ) -> Any:
        return self._call("issue_token", sub=sub, namespaces=namespaces, scopes=scopes, ttl_s=ttl_s)


class HubClient(_HubOps):
    """Async client: ``await client.search("...")``. One QUIC connection, reused."""

    def __init__(
        self, host: str, port: int, *, ca_pem: bytes, token: str, timeout_s: float | None = 30.0, **options: Any
    ) -> None:
        self._transport = RpcClient(host, port, ca_pem=ca_pem, **options)
        self.token = token
        self.timeout_s = timeout_s

    @classmethod
    def for_endpoint(cls, endpoint: HubEndpoint, *, token: str, **options: Any) -> HubClient:
        """A client of the hub at ``endpoint``: its address, the CA to pin, the name to check."""
        return cls(*endpoint.address, ca_pem=endpoint.ca_pem, server_name=endpoint.server_name, token=token,
                   **options)

    @property
    def rpc(self) -> RpcClient:
        return self._transport

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> HubClient:  # noqa: PYI034 - not meant to be subclassed
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class SyncHubClient(_HubOps):
    """Blocking client for scripts and notebooks: ``client.search("...")``."""

    def __init__(
        self, host: str, port: int, *, ca_pem: bytes, token: str, timeout_s: float | None = 30.0, **options: Any
    ) -> None:
        self._transport = SyncRpcClient(host, port, ca_pem=ca_pem, **options)
        self.token = token
        self.timeout_s = timeout_s

    @classmethod
    def for_endpoint(cls, endpoint: HubEndpoint, *, token: str, **options: Any) -> SyncHubClient:
        """A client of the hub at ``endpoint``: its address, the CA to pin, the name to check."""
        return cls(*endpoint.address, ca_pem=endpoint.ca_pem, server_name=endpoint.server_name, token=token,
                   **options)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> SyncHubClient:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_bytes(vector: Vector) -> bytes:
    """``vector`` as little-endian float32 bytes, the hub's wire form of an embedding."""
    if isinstance(vector, (bytes, bytearray, memoryview)):
        return bytes(vector)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(vector, numpy.ndarray):
        return bytes(numpy.asarray(vector, dtype="<f4").tobytes())
    if getattr(vector, "typecode", "f") == "f" and hasattr(vector, "tobytes"):
        return bytes(vector.tobytes())
    values = [float(x) for x in vector]  # type: ignore[union-attr]
    return struct.pack(f"<{len(values)}f", *values)
