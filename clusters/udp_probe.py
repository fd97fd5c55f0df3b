"""A UDP echo server and a round-trip prober, run inside node namespaces to measure and check links.

``python -m clusters.udp_probe serve PORT`` echoes every datagram (prints ``ready`` once bound);
``python -m clusters.udp_probe ping HOST PORT COUNT [INTERVAL_S] [TIMEOUT_S]`` sends ``COUNT``
tagged datagrams one at a time and prints each round trip in seconds, or ``lost`` when none came
back within the timeout. The link emulator's benchmark and the isolated cluster's tests use it;
standard library only, so it runs with any interpreter in any namespace.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence

PAYLOAD = b"x" * 200


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def ping(host: str, port: int, count: int, interval_s: float = 0.0, timeout_s: float = 1.0) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout_s)
    for index in range(count):
        tag = b"%08d" % index
        started = time.perf_counter()
        sock.sendto(tag + PAYLOAD, (host, port))
        took = 0.0
        try:
            while sock.recvfrom(2048)[0][:8] != tag:
                pass
            took = time.perf_counter() - started
            print(took, flush=True)
        except socket.timeout:
            print("lost", flush=True)
        time.sleep(max(interval_s - took, 0.0))


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if 4 <= len(argv) <= 6 and argv[0] == "ping":
        ping(argv[1], int(argv[2]), int(argv[3]), *(float(x) for x in argv[4:]))
        return 0
    print("usage: python -m clusters.udp_probe serve PORT | ping HOST PORT COUNT [INTERVAL_S] [TIMEOUT_S]",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
