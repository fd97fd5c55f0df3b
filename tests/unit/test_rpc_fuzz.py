"""Property: random bytes and random frames thrown at the server's RPC state only yield typed errors."""

import asyncio
import contextlib
import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayflow.errors import RayflowError
from rayflow.rpc.dispatch import Dispatcher
from rayflow.wire.op_schema import Arg, optional
from rayflow.wire.rpc_frames import FrameDecoder, decode_request, decode_response
from rayflow.wire.rpc_protocol import CallReceived, ProtocolFailure, RpcServerConnection, StreamRefused

MAX_FRAME = 2048

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

request_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 1, 2, True, "1"]),
        "op": st.sampled_from(["echo", "write", "", "nope"]) | st.integers(-5, 5),
        "id": st.integers(min_value=-3, max_value=2**64 - 1) | st.text(max_size=3),
        "token": st.text(max_size=5) | st.none(),
        "args": st.dictionaries(st.sampled_from(["text", "count", "blob", "x"]), msgpack_values, max_size=4)
        | msgpack_values,
        "deadline_ms": st.none() | st.integers(min_value=-5, max_value=10_000) | st.floats(),
        "extra": msgpack_values,
    },
)

#: Well-formed envelopes with random arguments: these reach the dispatcher and the handlers.
call_like = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "op": st.sampled_from(["echo", "write", "nope"]),
        "id": st.integers(min_value=0, max_value=2**32),
        "token": st.text(max_size=5),
        "args": st.dictionaries(
            st.sampled_from(["text", "count", "blob", "value", "x"]), msgpack_values, max_size=4
        ),
        "deadline_ms": st.none() | st.integers(min_value=1, max_value=10_000),
    }
)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _bodies_from(draw_kind, data):
    if draw_kind == "raw":
        return data.draw(st.binary(max_size=300))
    if draw_kind == "value":
        return _frame(msgpack.packb(data.draw(msgpack_values), use_bin_type=True))
    if draw_kind == "call":
        return _frame(msgpack.packb(data.draw(call_like), use_bin_type=True))
    return _frame(msgpack.packb(data.draw(request_like), use_bin_type=True))


def _dispatcher() -> Dispatcher:
    d = Dispatcher()

    async def echo(ctx, text, count=1, blob=None):
        return [text, count, blob]

    async def write(ctx, value):
        return value

    d.register(
        "echo",
        echo,
        args={"text": str, "count": optional(int), "blob": Arg((bytes, type(None)), False)},
        idempotent=True,
    )
    d.register("write", write, args={"value": float})
    return d


DISPATCHER = _dispatcher()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["raw", "value", "request", "call"]))
def test_decoders_only_raise_typed_errors(data, kind):
    payload = _bodies_from(kind, data)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    decoder = FrameDecoder(MAX_FRAME)
    try:
        bodies = []
        start = 0
        for cut in [*cuts, len(payload)]:
            bodies += decoder.feed(payload[start:cut])
            start = cut
        decoder.end()
        for body in bodies:
            with contextlib.suppress(RayflowError):
                decode_request(body)
            decode_response(body)
    except RayflowError:
        return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    streams=st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from(["raw", "value", "request", "call"]), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    handshake_at=st.integers(0, 8),
)
def test_server_connection_and_dispatcher_only_produce_typed_errors(data, streams, handshake_at):
    conn = RpcServerConnection(
        max_frame_bytes=MAX_FRAME,
        max_inflight_bytes=4 * MAX_FRAME,
        max_concurrent_calls=3,
        stream_read_timeout_s=5.0,
    )

    async def serve_all() -> None:
        for index, (stream_index, kind, end) in enumerate(streams):
            if index == handshake_at:
                conn.handshake_completed()
            events = conn.receive_stream_data(
                stream_index * 2, _bodies_from(kind, data), end, now=float(index)
            )
            for event in events:
                assert isinstance(event, (CallReceived, ProtocolFailure, StreamRefused))
                if isinstance(event, ProtocolFailure):
                    assert isinstance(event.error, RayflowError)
                    decode_response(event.frame[4:])
                    continue
                if isinstance(event, CallReceived):
                    with contextlib.suppress(RayflowError):
                        await DISPATCHER.dispatch(event.request, early_data=event.early_data)
                    frame = await DISPATCHER.answer(event.request, early_data=event.early_data)
                    decode_response(frame[4:])
                    conn.response_queued(event.stream_id, len(frame))
        conn.expire(1000.0)
        assert conn.inflight_bytes <= conn.max_inflight_bytes + 64 * len(streams)

    asyncio.run(serve_all())
