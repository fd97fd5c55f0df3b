"""A bare aioquic echo server and client: the transport baseline for ``benchmarks/rpc.py``.

No framing, no msgpack, no auth, no dispatch: the server writes back exactly the bytes a stream
brought, and ends the stream. Same TLS material, ALPN and loopback as the hub, so the difference
between this and a hub search is what rayflow adds on top of QUIC.

Run as a server: ``python benchmarks/quic_echo.py TLS_DIR`` prints its port and serves until killed.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

ALPN = "rayflow-echo/1"


class _EchoServer(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            buffer = self._buffers.setdefault(event.stream_id, bytearray())
            buffer += event.data
            if event.end_stream:
                self._quic.send_stream_data(event.stream_id, bytes(self._buffers.pop(event.stream_id)), True)
                self.transmit()


class EchoClient(QuicConnectionProtocol):
    """Sends one stream per echo and waits for the whole answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}

    async def echo(self, payload: bytes) -> bytes:
        stream_id = self._quic.get_next_available_stream_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[stream_id] = (future, bytearray())
        self._quic.send_stream_data(stream_id, payload, True)
        self.transmit()
        return await future

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id in self._waiting:
            future, buffer = self._waiting[event.stream_id]
            buffer += event.data
            if event.end_stream:
                del self._waiting[event.stream_id]
                future.set_result(bytes(buffer))


async def _serve(tls_dir: Path) -> None:
    from rayflow.rpc.tls import ensure_server_tls

    files = ensure_server_tls(tls_dir)
    configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    configuration.load_cert_chain(files.server_cert_path, files.server_key_path)
    server = await serve("127.0.0.1", 0, configuration=configuration, create_protocol=_EchoServer)
    print(server._transport.get_extra_info("sockname")[1], flush=True)
    await asyncio.Event().wait()


def client_connection(port: int, ca_pem: bytes):  # noqa: ANN201 - an async context manager
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    configuration.verify_mode = ssl.CERT_REQUIRED
    configuration.load_verify_locations(cadata=ca_pem)
    return connect("127.0.0.1", port, configuration=configuration, create_protocol=EchoClient)


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1])))
