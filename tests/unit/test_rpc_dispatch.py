"""The dispatcher: op lookup, argument checks, early-data refusal, auth hook, deadlines, error hiding."""

import asyncio
import logging

import pytest

from rayflow.errors import (
    AuthError,
    DeadlineExceededError,
    InvalidInputError,
    ItemNotFoundError,
    RayflowError,
    TooEarlyError,
    UnknownOperationError,
)
from rayflow.rpc.dispatch import CallContext, Dispatcher
from rayflow.wire.op_schema import Arg, optional
from rayflow.wire.rpc_frames import Request, decode_response


def _request(op: str = "echo", args=None, deadline_ms=None, request_id: int = 1) -> Request:
    return Request(op=op, request_id=request_id, token="tok", args=args or {}, deadline_ms=deadline_ms)


def _run(coroutine):
    return asyncio.run(coroutine)


async def _echo(ctx: CallContext, text: str, count: int = 1, blob: bytes | None = None):
    return {"text": text * count, "blob": blob, "early": ctx.early_data, "principal": ctx.principal}


@pytest.fixture
def dispatcher() -> Dispatcher:
    d = Dispatcher()
    d.register(
        "echo",
        _echo,
        args={"text": str, "count": optional(int), "blob": Arg((bytes, type(None)), required=False)},
        idempotent=True,
    )

    async def write(ctx, value: float):
        return value

    d.register("write", write, args={"value": float})
    return d


def test_registered_op_runs_with_its_arguments(dispatcher):
    result = _run(dispatcher.dispatch(_request(args={"text": "ab", "count": 2, "blob": b"\x00"})))
    assert result == {"text": "abab", "blob": b"\x00", "early": False, "principal": None}


def test_optional_arguments_may_be_left_out(dispatcher):
    assert _run(dispatcher.dispatch(_request(args={"text": "x"})))["text"] == "x"


def test_unknown_op_is_refused(dispatcher):
    with pytest.raises(UnknownOperationError):
        _run(dispatcher.dispatch(_request(op="drop_tables")))


def test_missing_required_argument_is_invalid_input(dispatcher):
    with pytest.raises(InvalidInputError, match="missing argument 'text'"):
        _run(dispatcher.dispatch(_request(args={"count": 2})))


def test_extra_argument_is_invalid_input(dispatcher):
    with pytest.raises(InvalidInputError, match="unknown arguments"):
        _run(dispatcher.dispatch(_request(args={"text": "x", "tenant": "other"})))


@pytest.mark.parametrize(
    "args",
    [{"text": 5}, {"text": "x", "count": "2"}, {"text": "x", "count": True}, {"text": "x", "blob": [1, 2]}],
)
def test_wrong_argument_type_is_invalid_input(dispatcher, args):
    with pytest.raises(InvalidInputError):
        _run(dispatcher.dispatch(_request(args=args)))


def test_int_is_accepted_where_float_is_expected_but_bool_is_not(dispatcher):
    assert _run(dispatcher.dispatch(_request(op="write", args={"value": 3}))) == 3
    with pytest.raises(InvalidInputError):
        _run(dispatcher.dispatch(_request(op="write", args={"value": False})))


def test_non_idempotent_op_from_early_data_is_refused_as_retryable(dispatcher):
    with pytest.raises(TooEarlyError) as caught:
        _run(dispatcher.dispatch(_request(op="write", args={"value": 1.0}), early_data=True))
    assert caught.value.retryable


def test_idempotent_op_runs_from_early_data_and_knows_it(dispatcher):
    result = _run(dispatcher.dispatch(_request(args={"text": "x"}), early_data=True))
    assert result["early"] is True


def test_authenticate_hook_result_reaches_the_handler(dispatcher):
    seen = []

    async def authenticate(ctx: CallContext) -> object:
        seen.append(ctx.token)
        return {"sub": "sandbox-1"}

    result = _run(dispatcher.dispatch(_request(args={"text": "x"}), authenticate=authenticate))
    assert result["principal"] == {"sub": "sandbox-1"} and seen == ["tok"]


def test_authenticate_hook_refusal_stops_the_call_before_the_handler(dispatcher):
    ran = []

    async def handler(ctx):
        ran.append(True)

    dispatcher.register("guarded", handler)

    async def authenticate(ctx: CallContext) -> object:
        raise AuthError("token expired")

    with pytest.raises(AuthError, match="token expired"):
        _run(dispatcher.dispatch(_request(op="guarded"), authenticate=authenticate))
    assert ran == []


def test_handler_exceeding_the_request_deadline_is_cancelled():
    d = Dispatcher()
    cancelled = []

    async def stuck(ctx):
        assert ctx.deadline is not None
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.append(True)

    d.register("stuck", stuck)
    with pytest.raises(DeadlineExceededError):
        _run(d.dispatch(_request(op="stuck", deadline_ms=20)))
    assert cancelled == [True]


def test_handler_rayflow_error_keeps_its_code(dispatcher):
    async def missing(ctx):
        raise ItemNotFoundError("no such item", item_id="m1")

    dispatcher.register("missing", missing)
    frame = _run(dispatcher.answer(_request(op="missing", request_id=9)))
    response = decode_response(frame[4:])
    assert response.request_id == 9 and isinstance(response.error, ItemNotFoundError)
    assert response.error.details == {"item_id": "m1"}


def test_unexpected_exception_is_logged_and_hidden_from_the_caller(dispatcher, caplog):
    async def broken(ctx):
        raise KeyError("secret_table_name")

    dispatcher.register("broken", broken)
    with caplog.at_level(logging.ERROR, logger="rayflow.rpc.dispatch"):
        frame = _run(dispatcher.answer(_request(op="broken")))
    response = decode_response(frame[4:])
    assert type(response.error) is RayflowError and response.error.code == "internal"
    assert "secret_table_name" not in response.error.message
    assert "secret_table_name" in caplog.text  # the traceback stays on the server


def test_unencodable_result_becomes_an_internal_error(dispatcher):
    async def odd(ctx):
        return object()

    dispatcher.register("odd", odd)
    response = decode_response(_run(dispatcher.answer(_request(op="odd")))[4:])
    assert response.error is not None and response.error.code == "internal"


def test_result_above_the_response_limit_is_payload_too_large(dispatcher):
    frame = _run(dispatcher.answer(_request(args={"text": "x" * 500}), max_frame_bytes=100))
    response = decode_response(frame[4:])
    assert response.error is not None and response.error.code == "payload_too_large"


def test_registration_refuses_sync_handlers_duplicates_and_unusable_names(dispatcher):
    with pytest.raises(TypeError):
        dispatcher.register("sync", lambda ctx: None)
    with pytest.raises(ValueError):
        dispatcher.register("echo", _echo)
    with pytest.raises(ValueError):
        dispatcher.register("bad", _echo, args={"not an identifier": str})
