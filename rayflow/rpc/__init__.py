"""RPC over QUIC: msgpack frames on one stream per call, TLS 1.3 with a pinned CA, 0-RTT resumption.

``frames`` is the wire format, ``protocol`` the sans-IO per-connection state, ``dispatch`` maps
requests onto handlers, ``tls`` makes the certificates, ``server`` and ``client`` are the asyncio
shells around them.
"""

from rayflow.rpc.dispatch import CallContext, Dispatcher
from rayflow.rpc.quic_server import RpcServer
from rayflow.rpc.tls import ServerTlsFiles, ensure_server_tls
from rayflow.wire.op_schema import Arg, optional
from rayflow.wire.rpc_client import HandshakeInfo, RpcClient, SyncRpcClient
from rayflow.wire.rpc_protocol import DEFAULT_ALPN

__all__ = [
    "DEFAULT_ALPN",
    "Arg",
    "CallContext",
    "Dispatcher",
    "HandshakeInfo",
    "RpcClient",
    "RpcServer",
    "ServerTlsFiles",
    "SyncRpcClient",
    "ensure_server_tls",
    "optional",
]
