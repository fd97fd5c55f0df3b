"""A userspace link emulator between regions: delay, jitter, loss and partitions for every IP packet.

Why: this kernel has no ``netem``, yet a multi-region cluster on one machine must feel its
distances (a 40 ms link between two regions is what federation and failover are measured
against) and must be cut apart on command. So every packet from one region to another passes
through this process: it reads the packet from the source region's TUN device, holds it for the
link's one-way delay (half its round-trip time, plus jitter), drops it with the link's loss
probability or while the link is partitioned, and writes it to the destination region's TUN
device, where the kernel routes it on. TCP and UDP alike (it works on IP packets, not sockets).

Structure, as elsewhere in rayflow: :class:`LinkEmulator` is the sans-IO core (packets and times
in, release decisions out; tested without devices), :func:`serve` is the thin shell around it
(TUN devices, a selector loop, a control socket), run by the cluster launcher inside the
cluster's router network namespace.

Ordering: a link never reorders its packets (a release time is never earlier than the one
before it on the same link), because TCP reads reordering as loss and would measure a worse
link than asked for. Queues are bounded per link (tail drop, counted), so a stalled peer cannot
grow this process without limit.

Control: one JSON object per line on a unix socket: ``{"op": "set", "between": [a, b], "rtt_ms",
"jitter_ms", "loss"}``, ``{"op": "partition", "between": [a, b]}``, ``{"op": "heal", "between":
[a, b]}``, ``{"op": "stats"}``; each is answered with one JSON line (``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``). A malformed request gets an error answer; the emulator goes on.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import ipaddress
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: Most bytes one link may hold in flight before it drops new packets (tail drop).
DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024
#: Largest packet read from a TUN device (the devices' MTU is far below).
MAX_PACKET = 65535
#: Largest control request accepted.
MAX_CONTROL_LINE = 4096

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


class LinkConfigError(ValueError):
    """A link setting or request that cannot be applied (unknown region, out-of-range value)."""


@dataclass(frozen=True)
class LinkParams:
    """How one link between two regions behaves, in both directions."""

    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    partitioned: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.rtt_ms <= 60_000.0:
            raise LinkConfigError(f"rtt_ms must be within 0..60000, not {self.rtt_ms}")
        if not 0.0 <= self.jitter_ms <= 60_000.0:
            raise LinkConfigError(f"jitter_ms must be within 0..60000, not {self.jitter_ms}")
        if not 0.0 <= self.loss <= 1.0:
            raise LinkConfigError(f"loss must be within 0..1, not {self.loss}")


@dataclass
class LinkCounters:
    """What one link did with its packets since the emulator started."""

    forwarded: int = 0
    lost: int = 0
    partitioned: int = 0
    overflowed: int = 0
    queued: int = 0
    queued_bytes: int = 0


def link_key(a: str, b: str) -> tuple[str, str]:
    """The name of the link between ``a`` and ``b``, whichever way a packet goes."""
    return (a, b) if a <= b else (b, a)


def ipv4_addresses(packet: bytes) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    """Source and destination of an IPv4 packet, or None for anything else (IPv6, garbage)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])


@dataclass(order=True)
class _Held:
    release_at: float
    sequence: int
    destination: str = field(compare=False)
    link: tuple[str, str] = field(compare=False)
    packet: bytes = field(compare=False)


class LinkEmulator:
    """Decides, for each packet between regions, when it leaves or that it is dropped. No I/O."""

    def __init__(
        self,
        regions: Mapping[str, ipaddress.IPv4Network | str],
        links: Mapping[tuple[str, str], LinkParams] | None = None,
        *,
        seed: int | None = None,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        self._networks = {name: ipaddress.IPv4Network(net) for name, net in regions.items()}
        names = sorted(self._networks)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if self._networks[a].overlaps(self._networks[b]):
                    raise LinkConfigError(f"regions {a} and {b} have overlapping networks")
        self._links: dict[tuple[str, str], LinkParams] = {}
        self._counters: dict[tuple[str, str], LinkCounters] = {}
        self._last_release: dict[tuple[str, str, str], float] = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                self._links[(a, b)] = LinkParams()
                self._counters[(a, b)] = LinkCounters()
        for (a, b), params in (links or {}).items():
            self.set_link(a, b, params)
        self._rng = random.Random(seed)
        self._max_queue_bytes = max_queue_bytes
        self._held: list[_Held] = []
        self._sequence = 0
        #: Packets that named no known region pair (same region, unknown address, not IPv4).
        self.unroutable = 0

    # --- configuration ----------------------------------------------------------------------
    @property
    def regions(self) -> list[str]:
        return sorted(self._networks)

    def link(self, a: str, b: str) -> LinkParams:
        return self._links[self._known(a, b)]

    def set_link(self, a: str, b: str, params: LinkParams) -> None:
        """Change a link from now on; packets already held keep the delay they were given."""
        self._links[self._known(a, b)] = params

    def partition(self, a: str, b: str) -> None:
        key = self._known(a, b)
        self._links[key] = replace(self._links[key], partitioned=True)

    def heal(self, a: str, b: str) -> None:
        key = self._known(a, b)
        self._links[key] = replace(self._links[key], partitioned=False)

    def _known(self, a: str, b: str) -> tuple[str, str]:
        for name in (a, b):
            if name not in self._networks:
                raise LinkConfigError(f"unknown region {name!r} (known: {', '.join(self.regions)})")
        if a == b:
            raise LinkConfigError("a link joins two different regions")
        return link_key(a, b)

    # --- packets ----------------------------------------------------------------------------
    def region_of(self, address: ipaddress.IPv4Address) -> str | None:
        for name, network in self._networks.items():
            if address in network:
                return name
        return None

    def admit(self, packet: bytes, now: float) -> str:
        """Take one packet read at ``now``; returns what happened: held, lost, partitioned, ..."""
        addresses = ipv4_addresses(packet)
        source = destination = None
        if addresses is not None:
            source, destination = self.region_of(addresses[0]), self.region_of(addresses[1])
        if source is None or destination is None or source == destination:
            self.unroutable += 1
            return "unroutable"
        key = link_key(source, destination)
        params, counters = self._links[key], self._counters[key]
        if params.partitioned:
            counters.partitioned += 1
            return "partitioned"
        if params.loss > 0.0 and self._rng.random() < params.loss:
            counters.lost += 1
            return "lost"
        if counters.queued_bytes + len(packet) > self._max_queue_bytes:
            counters.overflowed += 1
            return "overflowed"
        delay = params.rtt_ms / 2000.0
        if params.jitter_ms > 0.0:
            delay += self._rng.uniform(-params.jitter_ms, params.jitter_ms) / 2000.0
        direction = (key[0], key[1], destination)
        release = max(now + max(delay, 0.0), self._last_release.get(direction, 0.0))
        self._last_release[direction] = release
        self._sequence += 1
        heapq.heappush(self._held, _Held(release, self._sequence, destination, key, bytes(packet)))
        counters.queued += 1
        counters.queued_bytes += len(packet)
        return "held"

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """Packets whose time has come, in release order, with the region each goes to."""
        out: list[tuple[str, bytes]] = []
        while self._held and self._held[0].release_at <= now:
            held = heapq.heappop(self._held)
            counters = self._counters[held.link]
            counters.queued -= 1
            counters.queued_bytes -= len(held.packet)
            if self._links[held.link].partitioned:
                # A partition cuts what is on the wire too.
                counters.partitioned += 1
                continue
            counters.forwarded += 1
            out.append((held.destination, held.packet))
        return out

    def next_release(self) -> float | None:
        return self._held[0].release_at if self._held else None

    def stats(self) -> dict[str, Any]:
        return {
            "links": {
                f"{a}|{b}": {**asdict(self._links[(a, b)]), **asdict(self._counters[(a, b)])}
                for (a, b) in sorted(self._links)
            },
            "unroutable": self.unroutable,
        }

    # --- control ----------------------------------------------------------------------------
    def handle_control(self, line: bytes) -> dict[str, Any]:
        """Apply one control request (a JSON line); never raises for a bad request."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise LinkConfigError("a control request is a JSON object")
            op = request.get("op")
            if op == "stats":
                return {"ok": True, **self.stats()}
            between = request.get("between")
            if not (
                isinstance(between, list) and len(between) == 2 and all(isinstance(x, str) for x in between)
            ):
                raise LinkConfigError("'between' must name two regions")
            a, b = between
            if op == "partition":
                self.partition(a, b)
            elif op == "heal":
                self.heal(a, b)
            elif op == "set":
                current = self.link(a, b)
                self.set_link(
                    a,
                    b,
                    LinkParams(
                        rtt_ms=float(request.get("rtt_ms", current.rtt_ms)),
                        jitter_ms=float(request.get("jitter_ms", current.jitter_ms)),
                        loss=float(request.get("loss", current.loss)),
                        partitioned=current.partitioned,
                    ),
                )
            else:
                raise LinkConfigError(f"unknown op {op!r} (known: set, partition, heal, stats)")
            return {"ok": True, "link": asdict(self.link(a, b))}
        except (ValueError, TypeError) as exc:  # LinkConfigError and JSON errors are ValueErrors
            return {"ok": False, "error": str(exc)}


# --- the shell: TUN devices, a selector loop, a control socket --------------------------------
def open_tun(name: str) -> int:
    """Open (creating if needed) the TUN device ``name``; packets without the 4-byte info header."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def control_request(
    socket_path: str | Path, request: Mapping[str, Any], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Send one control request to a running emulator and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps(dict(request)).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return json.loads(answer)


def serve(
    emulator: LinkEmulator,
    devices: Mapping[str, str],
    control_path: str | Path,
    *,
    ready_file: str | Path | None = None,
    clock: Any = time.monotonic,
) -> None:
    """Forward packets between the regions' TUN devices until SIGTERM or SIGINT.

    ``devices`` maps each region to the TUN device its outgoing inter-region packets are routed
    into (and into which packets for it are written). The TUN devices must already exist and be
    up (the launcher creates them, persistent, owned by root).
    """
    fds = {region: open_tun(device) for region, device in devices.items()}
    control_path = Path(control_path)
    control_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control_path))
    os.chmod(control_path, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    for fd in fds.values():
        selector.register(fd, selectors.EVENT_READ, "tun")
    selector.register(listener, selectors.EVENT_READ, "listen")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if ready_file is not None:
        Path(ready_file).write_text(str(os.getpid()))
    try:
        while not stopping:
            deadline = emulator.next_release()
            timeout = None if deadline is None else max(deadline - clock(), 0.0)
            for key, _ in selector.select(timeout if timeout is not None else 1.0):
                if key.data == "tun":
                    _read_packets(emulator, key.fd, clock)
                elif key.data == "listen":
                    _answer_control(emulator, listener)
            for region, packet in emulator.due(clock()):
                try:
                    os.write(fds[region], packet)
                except OSError:
                    pass  # the kernel refused it (device down, no buffer): a lost packet, as on a wire
    finally:
        selector.close()
        listener.close()
        control_path.unlink(missing_ok=True)
        for fd in fds.values():
            os.close(fd)


def _read_packets(emulator: LinkEmulator, fd: int, clock: Any) -> None:
    # Drain what is there now, so that a burst is stamped with the time it arrived.
    for _ in range(256):
        try:
            packet = os.read(fd, MAX_PACKET)
        except BlockingIOError:
            return
        if not packet:
            return
        emulator.admit(packet, clock())


def _answer_control(emulator: LinkEmulator, listener: socket.socket) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1.0)
        try:
            line = b""
            while b"\n" not in line and len(line) <= MAX_CONTROL_LINE:
                chunk = conn.recv(MAX_CONTROL_LINE)
                if not chunk:
                    break
                line += chunk
            answer = (
                emulator.handle_control(line.split(b"\n", 1)[0])
                if len(line) <= MAX_CONTROL_LINE
                else {"ok": False, "error": "control request too long"}
            )
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            return


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--spec", required=True, help="JSON: {regions: {name: cidr}, devices: {name: tun}, links: [...]}"
    )
    parser.add_argument("--control", required=True, help="path of the control socket")
    parser.add_argument("--ready-file", default=None, help="written with this pid once packets flow")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(list(argv) if argv is not None else None)


def emulator_from_spec(spec: Mapping[str, Any], seed: int | None = None) -> LinkEmulator:
    """An emulator from the launcher's spec: ``{"regions": {name: cidr}, "links": [{between, ...}]}``."""
    links = {}
    for link in spec.get("links", []):
        a, b = link["between"]
        links[(a, b)] = LinkParams(
            rtt_ms=float(link.get("rtt_ms", 0.0)),
            jitter_ms=float(link.get("jitter_ms", 0.0)),
            loss=float(link.get("loss", 0.0)),
        )
    return LinkEmulator(spec["regions"], links, seed=seed)


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    emulator = emulator_from_spec(spec, seed=args.seed)
    serve(emulator, spec["devices"], args.control, ready_file=args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
