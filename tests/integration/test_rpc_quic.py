"""RPC over real QUIC on 127.0.0.1: round trips, limits, cancellation, 0-RTT resumption, CA pinning."""

import asyncio
import datetime
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from rayflow.errors import (
    DeadlineExceededError,
    ItemNotFoundError,
    PayloadTooLargeError,
    TooEarlyError,
    TransportError,
)
from rayflow.rpc import CallContext, Dispatcher, RpcClient, RpcServer, SyncRpcClient, optional
from rayflow.rpc.tls import certificate_names, ensure_server_tls

pytestmark = pytest.mark.integration

#: Bound on any single wait in these tests; reaching it means the behaviour is broken.
WAIT_S = 10.0


class Probe:
    """Events the test handlers set, so a test waits on what the server did instead of sleeping."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()


def _dispatcher(probe: Probe) -> Dispatcher:
    dispatcher = Dispatcher()

    async def echo(ctx: CallContext, value=None):
        return {"value": value, "early": ctx.early_data, "peer": list(ctx.peer or ())}

    async def record(ctx: CallContext, value=None):
        return {"value": value, "early": ctx.early_data}

    async def missing(ctx: CallContext, item_id: str):
        raise ItemNotFoundError(f"no item {item_id}", item_id=item_id)

    async def hang(ctx: CallContext):
        probe.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            probe.cancelled.set()

    dispatcher.register("echo", echo, args={"value": optional(object)}, idempotent=True)
    dispatcher.register("record", record, args={"value": optional(object)}, idempotent=False)
    dispatcher.register("missing", missing, args={"item_id": str}, idempotent=True)
    dispatcher.register("hang", hang)
    return dispatcher


def run_with_server(
    tmp_path: Path,
    scenario: Callable[[RpcServer, Probe], Awaitable[None]],
    **server_options,
) -> None:
    async def main() -> None:
        probe = Probe()
        server = RpcServer(
            _dispatcher(probe), host="127.0.0.1", port=0, tls_dir=str(tmp_path / "tls"), **server_options
        )
        await server.start()
        try:
            await asyncio.wait_for(scenario(server, probe), timeout=60)
        finally:
            await server.close()

    asyncio.run(main())


def _client(server: RpcServer, **options) -> RpcClient:
    host, port = server.address
    return RpcClient(host, port, ca_pem=server.ca_pem, **options)


# --- calls ------------------------------------------------------------------------------------
def test_echo_round_trip_carries_binary_values_as_bytes(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            embedding = bytes(range(256)) * 6
            result = await client.call("echo", {"value": {"embedding": embedding, "k": 3}}, token="t")
        assert result["value"] == {"embedding": embedding, "k": 3}
        assert isinstance(result["value"]["embedding"], bytes)

    run_with_server(tmp_path, scenario)


def test_first_call_connects_on_demand(tmp_path):
    async def scenario(server, probe):
        client = _client(server)
        try:
            assert not client.connected
            assert (await client.call("echo", {"value": 1}))["value"] == 1
            assert client.connected
        finally:
            await client.close()

    run_with_server(tmp_path, scenario)


def test_fifty_concurrent_calls_share_one_connection(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            results = await asyncio.gather(*(client.call("echo", {"value": i}) for i in range(50)))
        assert [r["value"] for r in results] == list(range(50))
        assert len({tuple(r["peer"]) for r in results}) == 1

    run_with_server(tmp_path, scenario)


def test_typed_error_travels_to_the_caller(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            with pytest.raises(ItemNotFoundError) as caught:
                await client.call("missing", {"item_id": "m-1"})
        assert caught.value.details == {"item_id": "m-1"}
        assert caught.value.message == "no item m-1"

    run_with_server(tmp_path, scenario)


def test_deadline_exceeded_fails_the_call_and_cancels_the_handler(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            with pytest.raises(DeadlineExceededError):
                await client.call("hang", timeout_s=0.2)
            await asyncio.wait_for(probe.cancelled.wait(), WAIT_S)
            assert (await client.call("echo", {"value": "still"}))["value"] == "still"

    run_with_server(tmp_path, scenario)


def test_cancelling_the_caller_resets_the_stream_and_cancels_the_handler(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            call = asyncio.ensure_future(client.call("hang"))
            await asyncio.wait_for(probe.started.wait(), WAIT_S)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(probe.cancelled.wait(), WAIT_S)
            assert (await client.call("echo", {"value": "next"}))["value"] == "next"

    run_with_server(tmp_path, scenario)


def test_idle_connection_is_replaced_on_the_next_call(tmp_path):
    async def scenario(server, probe):
        client = _client(server, idle_timeout_s=0.3)
        try:
            await client.connect()
            for _ in range(200):  # bounded wait for the idle timer to end the connection
                if not client.connected:
                    break
                await asyncio.sleep(0.05)
            assert not client.connected
            assert (await client.call("echo", {"value": "again"}))["value"] == "again"
        finally:
            await client.close()

    run_with_server(tmp_path, scenario)


def test_server_shutdown_fails_running_calls_with_transport_error(tmp_path):
    async def scenario(server, probe):
        client = _client(server)
        try:
            call = asyncio.ensure_future(client.call("hang"))
            await asyncio.wait_for(probe.started.wait(), WAIT_S)
            await server.close()
            with pytest.raises(TransportError):
                await asyncio.wait_for(call, WAIT_S)
        finally:
            await client.close()

    run_with_server(tmp_path, scenario)


def test_sync_client_calls_from_plain_code(tmp_path):
    async def scenario(server, probe):
        host, port = server.address

        def blocking() -> object:
            with SyncRpcClient(host, port, ca_pem=server.ca_pem) as client:
                client.connect()
                return client.call("echo", {"value": b"sync"})

        result = await asyncio.get_running_loop().run_in_executor(None, blocking)
        assert result["value"] == b"sync"

    run_with_server(tmp_path, scenario)


# --- one bad client ---------------------------------------------------------------------------
def test_unfinished_streams_are_reset_and_do_not_stop_another_client(tmp_path):
    async def scenario(server, probe):
        resets: list[int] = []
        all_reset = asyncio.Event()

        class StallingClient(QuicConnectionProtocol):
            def quic_event_received(self, event: events.QuicEvent) -> None:
                if isinstance(event, events.StreamReset):
                    resets.append(event.stream_id)
                    if len(resets) == 3:
                        all_reset.set()

        configuration = QuicConfiguration(
            alpn_protocols=["rayflow/1"], is_client=True, server_name="localhost"
        )
        configuration.load_verify_locations(cadata=server.ca_pem)
        async with connect(
            *server.address, configuration=configuration, create_protocol=StallingClient
        ) as bad:
            # Streams are driven on the QUIC connection itself: aioquic's stream writers end
            # their stream when garbage-collected, and these streams must never end.
            opened = []
            for _ in range(3):
                stream_id = bad._quic.get_next_available_stream_id()
                bad._quic.send_stream_data(stream_id, b"\x00\x00\x01")  # half a frame header
                opened.append(stream_id)
            bad.transmit()
            async with _client(server) as good:
                assert (await good.call("echo", {"value": "served"}))["value"] == "served"
            await asyncio.wait_for(all_reset.wait(), WAIT_S)
        assert sorted(resets) == opened

    run_with_server(tmp_path, scenario, stream_read_timeout_s=0.3)


def test_oversized_frame_is_refused_while_the_server_keeps_serving(tmp_path):
    async def scenario(server, probe):
        async with _client(server) as client:
            with pytest.raises(PayloadTooLargeError):
                await client.call("echo", {"value": b"x" * 200_000})
            assert (await client.call("echo", {"value": "small"}))["value"] == "small"

    run_with_server(tmp_path, scenario, max_frame_bytes=64 * 1024, max_inflight_bytes=256 * 1024)


# --- 0-RTT ------------------------------------------------------------------------------------
def test_reconnect_resumes_the_session_and_serves_an_idempotent_call_from_early_data(tmp_path):
    async def scenario(server, probe):
        client = _client(server)
        try:
            first = await client.connect()
            assert not first.session_resumed
            await client.call("echo", {"value": 0})
            assert client.session_ticket is not None
            await client.reconnect()
            result = await client.call("echo", {"value": 1}, idempotent=True)
            handshake = await client.handshake()
        finally:
            await client.close()
        assert handshake.session_resumed and handshake.early_data_accepted
        assert result == {"value": 1, "early": True, "peer": result["peer"]}

    run_with_server(tmp_path, scenario)


def test_non_idempotent_call_after_reconnect_waits_for_the_handshake(tmp_path):
    async def scenario(server, probe):
        client = _client(server)
        try:
            await client.call("echo", {"value": 0})
            await client.reconnect()
            result = await client.call("record", {"value": 1})
            handshake = await client.handshake()
        finally:
            await client.close()
        assert handshake.session_resumed
        assert result == {"value": 1, "early": False}

    run_with_server(tmp_path, scenario)


def test_call_wrongly_marked_idempotent_is_refused_as_early_data_then_resent(tmp_path):
    async def scenario(server, probe):
        client = _client(server)
        try:
            await client.call("echo", {"value": 0})
            await client.reconnect()
            # The server refuses "record" from early data (TooEarlyError); the client resends it
            # after the handshake, so the caller sees the result, computed from 1-RTT data.
            result = await client.call("record", {"value": 2}, idempotent=True)
        finally:
            await client.close()
        assert result == {"value": 2, "early": False}

    run_with_server(tmp_path, scenario)
    assert TooEarlyError.retryable


def test_ticket_unknown_to_a_restarted_server_falls_back_to_a_full_handshake(tmp_path):
    async def main() -> None:
        probe = Probe()
        tls_dir = str(tmp_path / "tls")
        first = RpcServer(_dispatcher(probe), tls_dir=tls_dir)
        await first.start()
        client = RpcClient(*first.address, ca_pem=first.ca_pem)
        try:
            await client.call("echo", {"value": 0})
            await first.close()
            second = RpcServer(_dispatcher(probe), tls_dir=tls_dir, port=first.address[1])
            await second.start()
            try:
                await client.reconnect()
                result = await client.call("echo", {"value": 1}, idempotent=True)
                handshake = await client.handshake()
            finally:
                await second.close()
        finally:
            await client.close()
        assert not handshake.session_resumed and not handshake.early_data_accepted
        assert result["value"] == 1 and result["early"] is False

    asyncio.run(asyncio.wait_for(main(), 60))


# --- TLS --------------------------------------------------------------------------------------
def test_client_pinning_another_ca_fails_to_connect_with_transport_error(tmp_path):
    other_ca = ensure_server_tls(tmp_path / "other").ca_pem

    async def scenario(server, probe):
        client = _client(server)
        client.ca_pem = other_ca
        try:
            with pytest.raises(TransportError, match="handshake failed"):
                await client.connect()
        finally:
            await client.close()

    run_with_server(tmp_path, scenario)


def test_client_refuses_a_server_name_outside_the_certificate(tmp_path):
    async def scenario(server, probe):
        client = _client(server, server_name="evil.example")
        try:
            with pytest.raises(TransportError):
                await client.connect()
        finally:
            await client.close()

    run_with_server(tmp_path, scenario)


def test_tls_material_is_created_private_and_reused(tmp_path):
    first = ensure_server_tls(tmp_path / "tls")
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / "tls" / name).stat().st_mode) == 0o600
    server_pem = first.server_cert_path.read_bytes()
    second = ensure_server_tls(tmp_path / "tls")
    assert second.ca_pem == first.ca_pem
    assert second.server_cert_path.read_bytes() == server_pem
    dns_names, ips = certificate_names(server_pem)
    assert "localhost" in dns_names and {"127.0.0.1", "::1"} <= set(ips)


def test_new_server_names_reissue_the_server_certificate_under_the_same_ca(tmp_path):
    first = ensure_server_tls(tmp_path / "tls")
    second = ensure_server_tls(tmp_path / "tls", ["hub.internal", "10.1.2.3"])
    assert second.ca_pem == first.ca_pem
    dns_names, ips = certificate_names(second.server_cert_path.read_bytes())
    assert "hub.internal" in dns_names and "10.1.2.3" in ips
    ca = x509.load_pem_x509_certificate(second.ca_pem)
    x509.load_pem_x509_certificate(second.server_cert_path.read_bytes()).verify_directly_issued_by(ca)


def test_server_certificate_near_expiry_is_reissued(tmp_path):
    first = ensure_server_tls(tmp_path / "tls")
    old_pem = first.server_cert_path.read_bytes()
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=350)
    again = ensure_server_tls(tmp_path / "tls", now=later)
    assert again.server_cert_path.read_bytes() != old_pem
    assert again.ca_pem == first.ca_pem


def test_lost_ca_key_regenerates_the_ca(tmp_path):
    first = ensure_server_tls(tmp_path / "tls")
    (tmp_path / "tls" / "ca.key").unlink()
    again = ensure_server_tls(tmp_path / "tls")
    assert again.ca_pem != first.ca_pem
    ca = x509.load_pem_x509_certificate(again.ca_pem)
    x509.load_pem_x509_certificate(again.server_cert_path.read_bytes()).verify_directly_issued_by(ca)
