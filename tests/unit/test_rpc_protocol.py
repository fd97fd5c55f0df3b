"""The sans-IO RPC connection state: limits, expiry, early data, and the client's call matching."""

import struct

import pytest

from rayflow.errors import (
    InvalidInputError,
    ItemNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    TransportError,
)
from rayflow.wire.rpc_frames import (
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
)
from rayflow.wire.rpc_protocol import (
    CallAbandoned,
    CallCompleted,
    CallFailed,
    CallReceived,
    ProtocolFailure,
    RpcClientCalls,
    RpcServerConnection,
    StreamRefused,
)


def _server(**limits) -> RpcServerConnection:
    options = {
        "max_frame_bytes": 1000,
        "max_inflight_bytes": 4000,
        "max_concurrent_calls": 8,
        "stream_read_timeout_s": 10.0,
    }
    options.update(limits)
    return RpcServerConnection(**options)


def _request(request_id: int = 1, **args) -> bytes:
    return encode_request("echo", request_id, "tok", args)


def _failure_error(event):
    assert isinstance(event, ProtocolFailure)
    response = decode_response(event.frame[4:])
    assert type(response.error) is type(event.error)
    return event.error


# --- server: calls ----------------------------------------------------------------------------
def test_complete_request_with_end_of_stream_becomes_a_call():
    conn = _server()
    conn.handshake_completed()
    [event] = conn.receive_stream_data(0, _request(5, text="hi"), True, now=0.0)
    assert isinstance(event, CallReceived)
    assert event.stream_id == 0 and event.request.request_id == 5 and event.request.args == {"text": "hi"}
    assert event.early_data is False


def test_request_split_over_many_deliveries_becomes_one_call():
    conn = _server()
    frame = _request(blob=b"z" * 300)
    events = []
    for offset in range(0, len(frame), 7):
        events += conn.receive_stream_data(0, frame[offset : offset + 7], False, now=0.0)
    events += conn.receive_stream_data(0, b"", True, now=0.0)
    assert [type(e) for e in events] == [CallReceived]


def test_complete_frame_waits_for_the_end_of_the_stream():
    conn = _server()
    assert conn.receive_stream_data(0, _request(), False, now=0.0) == []
    [event] = conn.receive_stream_data(0, b"", True, now=0.0)
    assert isinstance(event, CallReceived)


def test_request_completed_before_the_handshake_is_early_data():
    conn = _server()
    [event] = conn.receive_stream_data(0, _request(), True, now=0.0)
    assert event.early_data is True


def test_server_or_unidirectional_stream_ids_are_refused():
    conn = _server()
    assert conn.receive_stream_data(2, b"abc", False, now=0.0) == [StreamRefused(2)]
    assert conn.tracked_streams == 0


# --- server: refusals -------------------------------------------------------------------------
def test_oversized_frame_is_refused_from_its_header_and_the_peer_asked_to_stop():
    conn = _server(max_frame_bytes=100, max_inflight_bytes=1000)
    [event] = conn.receive_stream_data(0, struct.pack(">I", 5000) + b"x" * 10, False, now=0.0)
    assert isinstance(_failure_error(event), PayloadTooLargeError)
    assert event.stop_receiving is True
    assert conn.inflight_bytes == len(event.frame)  # only the error answer is held


def test_bytes_after_a_refusal_are_dropped_and_the_stream_forgotten_once_done():
    conn = _server(max_frame_bytes=100, max_inflight_bytes=1000)
    conn.receive_stream_data(0, struct.pack(">I", 5000), False, now=0.0)
    assert conn.receive_stream_data(0, b"y" * 500, False, now=0.0) == []
    assert conn.receive_stream_data(0, b"", True, now=0.0) == []
    conn.response_delivered(0)
    assert conn.tracked_streams == 0 and conn.inflight_bytes == 0


def test_truncated_request_is_answered_with_invalid_input():
    conn = _server()
    [event] = conn.receive_stream_data(0, _request()[:-2], True, now=0.0)
    assert isinstance(_failure_error(event), InvalidInputError)
    assert event.stop_receiving is False


def test_empty_stream_is_answered_with_invalid_input():
    conn = _server()
    [event] = conn.receive_stream_data(0, b"", True, now=0.0)
    assert isinstance(_failure_error(event), InvalidInputError)


def test_trailing_bytes_after_the_request_are_refused_before_any_call_starts():
    conn = _server()
    assert conn.receive_stream_data(0, _request(), False, now=0.0) == []
    [event] = conn.receive_stream_data(0, b"\x00", True, now=0.0)
    assert isinstance(_failure_error(event), InvalidInputError)


def test_malformed_request_body_is_answered_with_invalid_input():
    conn = _server()
    [event] = conn.receive_stream_data(0, struct.pack(">I", 2) + b"\xc1\xc1", True, now=0.0)
    assert isinstance(_failure_error(event), InvalidInputError)


def test_new_stream_above_the_inflight_bound_is_refused_without_buffering():
    conn = _server(max_frame_bytes=1000, max_inflight_bytes=1500)
    # Stream 0 declares a 996-byte body: 1000 bytes are reserved although only the header arrived.
    assert conn.receive_stream_data(0, struct.pack(">I", 996), False, now=0.0) == []
    assert conn.inflight_bytes == 1000
    [event] = conn.receive_stream_data(4, struct.pack(">I", 600) + b"a" * 100, False, now=0.0)
    error = _failure_error(event)
    assert isinstance(error, OverloadedError) and error.retryable
    assert conn.inflight_bytes == 1000 + len(event.frame)


def test_stream_refused_for_inflight_bytes_does_not_disturb_the_admitted_one():
    conn = _server(max_frame_bytes=1000, max_inflight_bytes=1500)
    frame = _request(blob=b"q" * 900)
    conn.receive_stream_data(0, frame[:10], False, now=0.0)
    conn.receive_stream_data(4, struct.pack(">I", 600), False, now=0.0)
    [event] = conn.receive_stream_data(0, frame[10:], True, now=0.0)
    assert isinstance(event, CallReceived)


def test_new_stream_beyond_the_concurrency_bound_is_refused():
    conn = _server(max_concurrent_calls=2)
    conn.receive_stream_data(0, _request(1), True, now=0.0)
    conn.receive_stream_data(4, _request(2)[:3], False, now=0.0)
    [event] = conn.receive_stream_data(8, _request(3), True, now=0.0)
    assert isinstance(_failure_error(event), OverloadedError)
    assert conn.open_calls == 2


def test_answered_call_frees_its_concurrency_slot_once_delivered():
    conn = _server(max_concurrent_calls=1)
    conn.receive_stream_data(0, _request(1), True, now=0.0)
    assert conn.response_queued(0, 50) is True
    assert conn.inflight_bytes == 50
    conn.response_delivered(0)
    assert conn.open_calls == 0 and conn.inflight_bytes == 0
    [event] = conn.receive_stream_data(4, _request(2), True, now=0.0)
    assert isinstance(event, CallReceived)


def test_request_bytes_are_held_while_the_call_runs():
    conn = _server()
    frame = _request(blob=b"r" * 200)
    conn.receive_stream_data(0, frame, True, now=0.0)
    assert conn.inflight_bytes == len(frame)
    conn.response_queued(0, 10)
    assert conn.inflight_bytes == 10


# --- server: resets and expiry ----------------------------------------------------------------
def test_peer_reset_of_a_running_call_abandons_it():
    conn = _server()
    conn.receive_stream_data(0, _request(), True, now=0.0)
    assert conn.stream_reset(0) == [CallAbandoned(0)]
    assert conn.response_queued(0, 10) is False
    assert conn.tracked_streams == 0


def test_peer_reset_while_receiving_releases_the_reserved_bytes():
    conn = _server()
    conn.receive_stream_data(0, struct.pack(">I", 900), False, now=0.0)
    assert conn.stream_reset(0) == []
    assert conn.inflight_bytes == 0 and conn.tracked_streams == 0


def test_unfinished_stream_expires_after_the_read_timeout():
    conn = _server(stream_read_timeout_s=10.0)
    conn.receive_stream_data(0, _request()[:5], False, now=100.0)
    conn.receive_stream_data(4, _request()[:5], False, now=105.0)
    assert conn.next_expiry() == 110.0
    assert conn.expire(109.9) == []
    assert conn.expire(110.0) == [0]
    assert conn.next_expiry() == 115.0
    assert conn.expire(200.0) == [4]
    assert conn.tracked_streams == 0 and conn.inflight_bytes == 0


def test_running_calls_do_not_expire():
    conn = _server(stream_read_timeout_s=1.0)
    conn.receive_stream_data(0, _request(), True, now=0.0)
    assert conn.next_expiry() is None
    assert conn.expire(1000.0) == []
    assert conn.response_queued(0, 10) is True


def test_refused_stream_whose_peer_keeps_sending_is_forgotten_without_reset_at_expiry():
    conn = _server(max_frame_bytes=100, max_inflight_bytes=1000, stream_read_timeout_s=1.0)
    conn.receive_stream_data(0, struct.pack(">I", 5000), False, now=0.0)
    conn.response_delivered(0)
    assert conn.expire(5.0) == []
    assert conn.tracked_streams == 0


def test_connection_loss_reports_running_calls():
    conn = _server()
    conn.receive_stream_data(0, _request(1), True, now=0.0)
    conn.receive_stream_data(4, _request(2)[:4], False, now=0.0)
    assert conn.connection_lost() == [0]
    assert conn.tracked_streams == 0


def test_limits_that_cannot_admit_one_frame_are_rejected():
    with pytest.raises(ValueError):
        RpcServerConnection(max_frame_bytes=1000, max_inflight_bytes=500)


# --- client -----------------------------------------------------------------------------------
def test_client_matches_responses_to_calls_by_stream():
    calls = RpcClientCalls()
    first_id, _ = calls.start_call(0, "echo", {"a": 1}, token="t")
    second_id, _ = calls.start_call(4, "echo", {"a": 2}, token="t")
    assert first_id != second_id
    assert calls.receive_stream_data(4, encode_response(second_id, "two"), True) == [
        CallCompleted(4, second_id, "two")
    ]
    assert calls.receive_stream_data(0, encode_response(first_id, "one"), True) == [
        CallCompleted(0, first_id, "one")
    ]
    assert calls.pending == 0


def test_client_request_frame_carries_token_and_deadline():
    calls = RpcClientCalls()
    request_id, frame = calls.start_call(0, "search", {"q": "x"}, token="jwt", deadline_ms=250)
    request = decode_request(frame[4:])
    assert (request.request_id, request.token, request.deadline_ms) == (request_id, "jwt", 250)


def test_client_rebuilds_the_servers_typed_error():
    calls = RpcClientCalls()
    request_id, _ = calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, encode_error(request_id, ItemNotFoundError("gone")), True)
    assert isinstance(event, CallFailed) and isinstance(event.error, ItemNotFoundError)


def test_client_accepts_a_refusal_answered_before_the_request_was_read():
    calls = RpcClientCalls()
    calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, encode_error(0, PayloadTooLargeError("big")), True)
    assert isinstance(event.error, PayloadTooLargeError)


def test_truncated_response_is_a_transport_error():
    calls = RpcClientCalls()
    request_id, _ = calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, encode_response(request_id, "x")[:-1], True)
    assert isinstance(event.error, TransportError)


def test_garbled_response_is_a_transport_error():
    calls = RpcClientCalls()
    calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, struct.pack(">I", 3) + b"\xc1\xc1\xc1", True)
    assert isinstance(event.error, TransportError)


def test_response_for_another_request_id_is_a_transport_error():
    calls = RpcClientCalls()
    request_id, _ = calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, encode_response(request_id + 1, "x"), True)
    assert isinstance(event.error, TransportError)


def test_oversized_response_is_a_transport_error_from_its_header():
    calls = RpcClientCalls(max_response_bytes=100)
    calls.start_call(0, "get", {}, token="t")
    [event] = calls.receive_stream_data(0, struct.pack(">I", 10_000), False)
    assert isinstance(event.error, TransportError)
    assert calls.pending == 0


def test_server_reset_fails_the_call_and_data_for_cancelled_calls_is_ignored():
    calls = RpcClientCalls()
    calls.start_call(0, "get", {}, token="t")
    request_id, _ = calls.start_call(4, "get", {}, token="t")
    [event] = calls.stream_reset(0)
    assert isinstance(event.error, TransportError)
    calls.cancel(4)
    assert calls.receive_stream_data(4, encode_response(request_id, "late"), True) == []


def test_connection_loss_fails_every_pending_call():
    calls = RpcClientCalls()
    calls.start_call(0, "a", {}, token="t")
    calls.start_call(4, "b", {}, token="t")
    failed = calls.connection_lost("idle timeout")
    assert sorted(e.stream_id for e in failed) == [0, 4]
    assert all(isinstance(e.error, TransportError) for e in failed)


def test_late_bytes_on_an_expired_stream_do_not_open_a_new_call():
    conn = _server(stream_read_timeout_s=1.0)
    frame = _request()
    conn.receive_stream_data(0, frame[:5], False, now=0.0)
    assert conn.expire(2.0) == [0]
    assert conn.receive_stream_data(0, frame[5:], True, now=2.0) == []
    assert conn.tracked_streams == 0


def test_late_bytes_on_a_reset_stream_are_dropped_even_when_streams_arrive_out_of_order():
    conn = _server()
    conn.receive_stream_data(8, _request(3), True, now=0.0)
    conn.receive_stream_data(0, _request(1)[:5], False, now=0.0)
    conn.stream_reset(0)
    assert conn.receive_stream_data(0, b"more", True, now=0.0) == []
    [event] = conn.receive_stream_data(4, _request(2), True, now=0.0)
    assert isinstance(event, CallReceived)
