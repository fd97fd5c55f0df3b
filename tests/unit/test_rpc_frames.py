"""The RPC wire format: incremental frame decoding and strict request/response shapes."""

import struct

import msgpack
import pytest

from rayflow.errors import (
    InvalidInputError,
    ItemNotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RayflowError,
)
from rayflow.wire.rpc_frames import (
    FrameDecoder,
    decode_request,
    decode_response,
    encode_error,
    encode_frame,
    encode_request,
    encode_response,
)


def _body(frame: bytes) -> bytes:
    return frame[4:]


def _request_body(**overrides):
    body = {"v": 1, "op": "search", "id": 7, "token": "t", "args": {"q": "x"}, "deadline_ms": None}
    body.update(overrides)
    return msgpack.packb(body, use_bin_type=True)


def test_request_round_trips_with_binary_args_as_bytes():
    embedding = bytes(range(256)) * 6
    frame = encode_request("search", 3, "tok", {"embedding": embedding, "k": 5}, 1500)
    request = decode_request(_body(frame))
    assert request.op == "search" and request.request_id == 3 and request.token == "tok"
    assert request.args == {"embedding": embedding, "k": 5}
    assert isinstance(request.args["embedding"], bytes)
    assert request.deadline_ms == 1500


def test_frame_split_at_every_byte_boundary_decodes_to_the_same_frame():
    frame = encode_request("op", 1, "tok", {"blob": b"\x00\xff" * 40, "text": "héllo"})
    for cut in range(len(frame) + 1):
        decoder = FrameDecoder(1024)
        bodies = decoder.feed(frame[:cut]) + decoder.feed(frame[cut:])
        decoder.end()
        assert bodies == [_body(frame)], cut


def test_frame_fed_one_byte_at_a_time_completes_on_its_last_byte():
    frame = encode_response(9, {"ok": [1, 2, 3]})
    decoder = FrameDecoder(1024)
    produced = [decoder.feed(frame[i : i + 1]) for i in range(len(frame))]
    assert all(not bodies for bodies in produced[:-1])
    assert produced[-1] == [_body(frame)]


def test_oversized_frame_is_refused_from_its_header_before_the_body_is_buffered():
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(PayloadTooLargeError) as caught:
        decoder.feed(struct.pack(">I", 101))
    assert caught.value.details["size"] == 101
    assert decoder.buffered_bytes == 0


def test_frame_of_exactly_the_limit_is_accepted():
    body = b"\xc4\x60" + b"x" * 96  # msgpack bin8 of 96 bytes: 98 bytes of body
    decoder = FrameDecoder(max_frame_bytes=len(body))
    assert decoder.feed(struct.pack(">I", len(body)) + body) == [body]


def test_stream_ending_inside_the_header_is_truncated():
    decoder = FrameDecoder(1024)
    decoder.feed(b"\x00\x00")
    with pytest.raises(InvalidInputError, match="truncated"):
        decoder.end()


def test_stream_ending_inside_the_body_is_truncated():
    frame = encode_request("op", 1, "", {})
    decoder = FrameDecoder(1024)
    decoder.feed(frame[:-1])
    with pytest.raises(InvalidInputError, match="truncated"):
        decoder.end()


def test_bytes_after_the_single_frame_are_refused():
    frame = encode_request("op", 1, "", {})
    decoder = FrameDecoder(1024)
    with pytest.raises(InvalidInputError, match="after the frame"):
        decoder.feed(frame + b"\x00")


def test_bytes_arriving_after_a_completed_frame_are_refused():
    frame = encode_request("op", 1, "", {})
    decoder = FrameDecoder(1024)
    assert decoder.feed(frame)
    with pytest.raises(InvalidInputError, match="after the frame"):
        decoder.feed(b"\x01")


def test_decoder_without_frame_limit_yields_consecutive_frames():
    frames = [encode_response(i, i * 2) for i in range(1, 4)]
    decoder = FrameDecoder(1024, max_frames=None)
    assert decoder.feed(b"".join(frames)) == [_body(f) for f in frames]


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\xa5ab"])
def test_garbage_msgpack_is_invalid_input(garbage):
    with pytest.raises(InvalidInputError):
        decode_request(garbage)


def test_two_msgpack_values_in_one_body_are_invalid_input():
    with pytest.raises(InvalidInputError):
        decode_request(_request_body() + b"\x01")


def test_msgpack_extension_types_are_invalid_input():
    body = msgpack.packb(
        {
            "v": 1,
            "op": "x",
            "id": 1,
            "token": "",
            "args": {"a": msgpack.ExtType(5, b"z")},
            "deadline_ms": None,
        }
    )
    with pytest.raises(InvalidInputError):
        decode_request(body)


@pytest.mark.parametrize(
    "overrides",
    [
        {"v": 2},
        {"v": True},
        {"v": "1"},
        {"op": 5},
        {"op": ""},
        {"id": "7"},
        {"id": True},
        {"id": -1},
        {"token": None},
        {"args": [1, 2]},
        {"args": {1: "x"}},
        {"deadline_ms": "soon"},
        {"deadline_ms": -5},
        {"deadline_ms": 1.5},
        {"extra": 1},
    ],
)
def test_request_with_wrong_field_types_is_invalid_input(overrides):
    with pytest.raises(InvalidInputError):
        decode_request(_request_body(**overrides))


def test_request_missing_a_field_is_invalid_input():
    body = msgpack.packb({"v": 1, "op": "x", "id": 1, "token": "", "args": {}})
    with pytest.raises(InvalidInputError, match="wrong fields"):
        decode_request(body)


def test_request_that_is_not_a_map_is_invalid_input():
    with pytest.raises(InvalidInputError):
        decode_request(msgpack.packb([1, "op"]))


def test_encoding_a_malformed_request_fails_at_the_caller():
    with pytest.raises(InvalidInputError):
        encode_request("op", 1, "tok", {5: "not a str key"})


def test_encoding_above_the_limit_raises_payload_too_large():
    with pytest.raises(PayloadTooLargeError):
        encode_frame({"blob": b"x" * 200}, max_frame_bytes=100)


def test_error_response_rebuilds_the_typed_error_with_details():
    response = decode_response(_body(encode_error(4, PermissionDeniedError("no write scope", scope="write"))))
    assert not response.ok and response.request_id == 4
    assert isinstance(response.error, PermissionDeniedError)
    assert response.error.message == "no write scope"
    assert response.error.details == {"scope": "write"}


def test_error_details_named_like_constructor_parameters_survive():
    error = ItemNotFoundError("gone")
    error.details = {"message": "inner", "code": "x"}
    response = decode_response(_body(encode_error(1, error)))
    assert isinstance(response.error, ItemNotFoundError)
    assert response.error.details == {"message": "inner", "code": "x"}


def test_error_with_unserializable_details_still_carries_code_and_message():
    response = decode_response(_body(encode_error(1, ItemNotFoundError("gone", thing=object()))))
    assert isinstance(response.error, ItemNotFoundError) and response.error.message == "gone"
    assert response.error.details == {}


def test_unknown_error_code_from_the_wire_keeps_its_code():
    body = msgpack.packb(
        {"v": 1, "id": 1, "ok": False, "error": {"code": "brand_new", "message": "m", "details": {}}}
    )
    response = decode_response(body)
    assert type(response.error) is RayflowError and response.error.code == "brand_new"


@pytest.mark.parametrize(
    "body",
    [
        {"v": 1, "id": 1, "ok": 1, "result": None},
        {"v": 1, "id": 1, "ok": True},
        {"v": 1, "id": 1, "ok": True, "result": 1, "error": None},
        {"v": 1, "id": "1", "ok": True, "result": 1},
        {"v": 1, "id": 1, "ok": False, "error": "boom"},
        {"v": 1, "id": 1, "ok": False, "error": {"code": 1, "message": "m", "details": {}}},
        {"v": 1, "id": 1, "ok": False, "error": {"code": "x", "message": "m", "details": []}},
        {"v": 1, "id": 1, "ok": False, "error": {"code": "x", "message": "m"}},
        {"v": 9, "id": 1, "ok": True, "result": 1},
    ],
)
def test_malformed_response_is_invalid_input(body):
    with pytest.raises(InvalidInputError):
        decode_response(msgpack.packb(body))


def test_arguments_msgpack_cannot_carry_are_invalid_input_at_the_caller():
    with pytest.raises(InvalidInputError, match="cannot be sent"):
        encode_request("op", 1, "tok", {"value": object()})
