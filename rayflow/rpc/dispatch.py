"""Maps a decoded request onto a registered handler, with argument checks, auth hook and deadline.

The dispatcher is the only place that turns "some bytes named an op" into running our code, so it
enforces, in this order: the op exists; a call that arrived as 0-RTT early data is for an
idempotent op (early data can be replayed by an attacker, so a state-changing op must wait for the
handshake; the client is told to retry with :class:`~rayflow.errors.TooEarlyError`); the caller
authenticates (a hook supplied by the hub; no token logic here); the arguments match the op's spec
(names and types, no extras); the handler finishes within the request's deadline.

Errors reach the caller by code: a :class:`~rayflow.errors.RayflowError` keeps its own; any other
exception is logged here with its traceback and the caller gets a generic ``internal`` error whose
message reveals nothing about the server's internals.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rayflow.errors import (
    DeadlineExceededError,
    InvalidInputError,
    RayflowError,
    TooEarlyError,
    UnknownOperationError,
)
from rayflow.wire.op_schema import Arg
from rayflow.wire.rpc_frames import Request, encode_error, encode_response

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal server error"


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about its call besides the arguments."""

    op: str
    request_id: int
    token: str
    #: Absolute event-loop time (``loop.time()``) by which the call must finish, or None.
    deadline: float | None
    #: The peer's network address as the transport reports it.
    peer: Any
    #: True when the request arrived as 0-RTT early data (replayable; only idempotent ops run).
    early_data: bool
    #: What the ``authenticate`` hook returned (for the hub: the verified claims), else None.
    principal: object = None


Handler = Callable[..., Awaitable[Any]]
Authenticate = Callable[[CallContext], Awaitable[object]]


@dataclass(frozen=True)
class Operation:
    """A registered op: its handler, argument spec and replay safety."""

    name: str
    handler: Handler
    args: Mapping[str, Arg] = field(default_factory=dict)
    idempotent: bool = False


class Dispatcher:
    """The table of ops a server serves."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    @property
    def ops(self) -> Mapping[str, Operation]:
        return dict(self._ops)

    def register(
        self,
        op: str,
        handler: Handler,
        *,
        args: Mapping[str, Arg | type | tuple[type, ...]] | None = None,
        idempotent: bool = False,
    ) -> None:
        """Serve ``op`` with ``async handler(ctx, **args)``.

        ``args`` maps each argument name to an :class:`Arg`, or to a type (or tuple of types) for
        a required argument. Mark ``idempotent`` only an op whose replay is harmless: only those
        may run from 0-RTT early data.
        """
        if not op or not isinstance(op, str):
            raise ValueError("op must be a non-empty string")
        if op in self._ops:
            raise ValueError(f"op {op!r} is already registered")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler of {op!r} must be an async function")
        spec: dict[str, Arg] = {}
        for name, kind in (args or {}).items():
            if not name.isidentifier() or name == "ctx":
                raise ValueError(f"argument name {name!r} of {op!r} is not usable as a keyword")
            spec[name] = kind if isinstance(kind, Arg) else Arg(kind)
        self._ops[op] = Operation(op, handler, spec, idempotent)

    async def dispatch(
        self,
        request: Request,
        *,
        peer: Any = None,
        early_data: bool = False,
        authenticate: Authenticate | None = None,
    ) -> Any:
        """Run the call; return its result or raise a :class:`RayflowError` (and nothing else).

        ``asyncio.CancelledError`` still propagates: it means the caller went away.
        """
        loop = asyncio.get_running_loop()
        deadline = None if request.deadline_ms is None else loop.time() + request.deadline_ms / 1000
        ctx = CallContext(
            op=request.op,
            request_id=request.request_id,
            token=request.token,
            deadline=deadline,
            peer=peer,
            early_data=early_data,
        )
        operation = self._ops.get(request.op)
        if operation is None:
            raise UnknownOperationError(f"unknown op {request.op[:100]!r}")
        if early_data and not operation.idempotent:
            raise TooEarlyError(f"op {operation.name!r} is not idempotent; resend it after the handshake")
        if request.deadline_ms is None:
            return await self._run(operation, ctx, request.args, authenticate)
        try:
            return await asyncio.wait_for(
                self._run(operation, ctx, request.args, authenticate), timeout=request.deadline_ms / 1000
            )
        except asyncio.TimeoutError:
            raise DeadlineExceededError(
                f"op {operation.name!r} did not finish within {request.deadline_ms} ms",
                deadline_ms=request.deadline_ms,
            ) from None

    async def answer(
        self,
        request: Request,
        *,
        peer: Any = None,
        early_data: bool = False,
        authenticate: Authenticate | None = None,
        max_frame_bytes: int | None = None,
    ) -> bytes:
        """Run the call and return the response frame to send (a result or an error frame)."""
        try:
            result = await self.dispatch(request, peer=peer, early_data=early_data, authenticate=authenticate)
            return encode_response(request.request_id, result, max_frame_bytes=max_frame_bytes)
        except RayflowError as error:
            return encode_error(request.request_id, error)
        except (TypeError, ValueError, OverflowError):
            logger.exception("result of op %r could not be encoded", request.op)
            return encode_error(request.request_id, RayflowError(INTERNAL_ERROR_MESSAGE))

    async def _run(
        self,
        operation: Operation,
        ctx: CallContext,
        args: dict[str, Any],
        authenticate: Authenticate | None,
    ) -> Any:
        try:
            if authenticate is not None:
                ctx = replace(ctx, principal=await authenticate(ctx))
            _check_args(operation, args)
            return await operation.handler(ctx, **args)
        except (RayflowError, asyncio.CancelledError):
            raise
        except Exception:
            logger.exception("op %r (request %d) failed", operation.name, ctx.request_id)
            raise RayflowError(INTERNAL_ERROR_MESSAGE) from None


def _check_args(operation: Operation, args: dict[str, Any]) -> None:
    """Refuse unknown, missing or mistyped arguments, naming the argument (never echoing values)."""
    extra = sorted(name for name in args if name not in operation.args)
    if extra:
        raise InvalidInputError(
            f"op {operation.name!r} got unknown arguments", unknown=[name[:64] for name in extra[:10]]
        )
    for name, spec in operation.args.items():
        if name not in args:
            if spec.required:
                raise InvalidInputError(f"op {operation.name!r} is missing argument {name!r}", argument=name)
            continue
        if not spec.accepts(args[name]):
            raise InvalidInputError(
                f"argument {name!r} of op {operation.name!r} must be {spec.describe()},"
                f" not {type(args[name]).__name__}",
                argument=name,
            )
