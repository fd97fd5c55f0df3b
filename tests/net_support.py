"""Servers on the host and probe scripts run in sandboxes, shared by the network isolation tests.

Why shared: the Docker backend, the local backend and the abuse tests all ask the same question
(can this sandbox reach that address?) and answer it the same way: a server this suite starts
answers a known word, a probe inside the sandbox prints what it got back or the name of the error
that stopped it. The servers bind only to addresses a test names (127.0.0.1, or the host end of a
sandbox's own network), so no probe ever leaves the machine.
"""

from __future__ import annotations

import socket
import threading

#: Connects to argv[1]:argv[2] over TCP; prints what the server sent, or the error's name.
TCP_PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
        print(s.recv(64).decode())
except OSError as exc:
    print(type(exc).__name__)
"""
#: Sends a datagram to argv[1]:argv[2]; prints the answer, or the error's name.
UDP_PROBE = """
import socket, sys
try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
        print(s.recv(64).decode())
except OSError as exc:
    print(type(exc).__name__)
"""
#: Listens on argv[1]:argv[2] (TCP) in a detached child for 30 s, answering argv[3] to every
#: connection; prints "listening" once the socket is bound, so the caller knows it can connect.
DETACHED_LISTENER = """
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
answer = sys.argv[3].encode()
if os.fork() == 0:
    os.setsid()
    os.closerange(0, 3)
    s.settimeout(0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.sendall(answer)
        c.close()
    os._exit(0)
print("listening")
"""


class HostServer:
    """A TCP or UDP server on the host answering ``reply`` to every connection or datagram."""

    def __init__(self, host: str, kind: int, reply: bytes, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port: int = self.sock.getsockname()[1]
        self.reply = reply
        if kind == socket.SOCK_STREAM:
            self.sock.listen()
        self.thread = threading.Thread(target=self._serve, args=(kind,), daemon=True)
        self.thread.start()

    def _serve(self, kind: int) -> None:
        while True:
            try:
                if kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    with conn:
                        conn.sendall(self.reply)
                else:
                    _, peer = self.sock.recvfrom(64)
                    if peer is None:  # the socket was closed under the receive
                        return
                    self.sock.sendto(self.reply, peer)
            except OSError:
                return

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept/recvfrom; a UDP socket refuses it, harmlessly
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class DualServer:
    """A TCP and a UDP :class:`HostServer` on one port of ``host``, both answering ``reply``."""

    def __init__(self, host: str, reply: bytes) -> None:
        self.tcp = HostServer(host, socket.SOCK_STREAM, reply)
        self.port = self.tcp.port
        self.udp = HostServer(host, socket.SOCK_DGRAM, reply, self.port)

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()
