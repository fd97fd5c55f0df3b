"""The link emulator's core: which packets leave when, which are dropped, and how it is steered."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest

from clusters.link_emulator import LinkConfigError, LinkEmulator, LinkParams, ipv4_addresses

REGIONS = {"us-west": "100.90.1.0/24", "eu-central": "100.90.2.0/24", "ap-south": "100.90.3.0/24"}


def packet(src: str, dst: str, payload: bytes = b"x" * 20) -> bytes:
    """A minimal IPv4 header (enough for the emulator, which reads only the addresses) and a payload."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + payload


US, EU, AP = "100.90.1.10", "100.90.2.10", "100.90.3.10"


def emulator(**links: LinkParams) -> LinkEmulator:
    table = {tuple(name.split("__")): params for name, params in links.items()}
    return LinkEmulator(REGIONS, table, seed=7)  # type: ignore[arg-type]


def test_a_packet_leaves_after_half_the_round_trip_time() -> None:
    emu = emulator(**{"eu-central__us-west": LinkParams(rtt_ms=40)})

    assert emu.admit(packet(US, EU), now=10.0) == "held"

    assert emu.due(10.019) == []
    assert emu.due(10.020) == [("eu-central", packet(US, EU))]


def test_both_directions_of_a_link_get_the_same_delay() -> None:
    emu = emulator(**{"us-west__eu-central": LinkParams(rtt_ms=40)})
    emu.admit(packet(EU, US), now=0.0)

    assert emu.next_release() == pytest.approx(0.020)
    assert emu.due(0.020) == [("us-west", packet(EU, US))]


def test_links_are_independent() -> None:
    emu = emulator(
        **{"us-west__eu-central": LinkParams(rtt_ms=40), "us-west__ap-south": LinkParams(rtt_ms=200)}
    )
    emu.admit(packet(US, AP), now=0.0)
    emu.admit(packet(US, EU), now=0.0)

    assert [region for region, _ in emu.due(0.05)] == ["eu-central"]
    assert [region for region, _ in emu.due(0.1)] == ["ap-south"]


def test_traffic_inside_a_region_or_to_unknown_addresses_is_not_forwarded() -> None:
    emu = emulator()

    assert emu.admit(packet(US, "100.90.1.11"), now=0.0) == "unroutable"
    assert emu.admit(packet(US, "192.0.2.1"), now=0.0) == "unroutable"
    assert emu.admit(b"\x60" + b"\x00" * 39, now=0.0) == "unroutable"  # IPv6
    assert emu.admit(b"\x45", now=0.0) == "unroutable"  # truncated
    assert emu.unroutable == 4 and emu.next_release() is None


def test_jitter_never_reorders_a_link() -> None:
    emu = emulator(**{"us-west__eu-central": LinkParams(rtt_ms=40, jitter_ms=30)})
    sent = [packet(US, EU, payload=str(i).encode().ljust(20)) for i in range(200)]
    for i, data in enumerate(sent):
        emu.admit(data, now=i * 0.0001)

    received = [data for _, data in emu.due(10.0)]

    assert received == sent


def test_jitter_spreads_release_times_around_the_delay() -> None:
    emu = emulator(**{"us-west__eu-central": LinkParams(rtt_ms=40, jitter_ms=10)})
    releases = []
    for i in range(300):
        emu.admit(packet(US, EU), now=float(i))  # a second apart: no ordering constraint
        releases.append(emu.next_release() - i)  # type: ignore[operator]
        emu.due(float(i) + 1.0)

    assert min(releases) >= 0.015 - 1e-9 and max(releases) <= 0.025 + 1e-9
    assert max(releases) - min(releases) > 0.005


def test_loss_drops_about_the_asked_fraction() -> None:
    emu = emulator(**{"us-west__eu-central": LinkParams(loss=0.25)})
    outcomes = [emu.admit(packet(US, EU), now=0.0) for _ in range(4000)]

    assert 0.22 < outcomes.count("lost") / len(outcomes) < 0.28


def test_a_partition_drops_new_packets_and_those_on_the_wire_and_heal_restores_the_link() -> None:
    emu = emulator(**{"us-west__eu-central": LinkParams(rtt_ms=40)})
    emu.admit(packet(US, EU), now=0.0)

    emu.partition("eu-central", "us-west")

    assert emu.admit(packet(US, EU), now=0.001) == "partitioned"
    assert emu.due(1.0) == []
    emu.heal("us-west", "eu-central")
    assert emu.admit(packet(US, EU), now=2.0) == "held"
    assert len(emu.due(2.02)) == 1
    assert emu.link("us-west", "eu-central").rtt_ms == 40


def test_a_partition_of_one_link_leaves_the_others_alone() -> None:
    emu = emulator()
    emu.partition("us-west", "eu-central")

    assert emu.admit(packet(US, AP), now=0.0) == "held"


def test_a_full_queue_drops_at_the_tail() -> None:
    emu = LinkEmulator(REGIONS, {("us-west", "eu-central"): LinkParams(rtt_ms=1000)}, max_queue_bytes=100)

    assert emu.admit(packet(US, EU), now=0.0) == "held"  # 40 bytes
    assert emu.admit(packet(US, EU), now=0.0) == "held"  # 80 bytes
    assert emu.admit(packet(US, EU), now=0.0) == "overflowed"
    assert emu.stats()["links"]["eu-central|us-west"]["overflowed"] == 1


def test_link_settings_are_checked() -> None:
    with pytest.raises(LinkConfigError):
        LinkParams(rtt_ms=-1)
    with pytest.raises(LinkConfigError):
        LinkParams(loss=1.5)
    with pytest.raises(LinkConfigError):
        emulator().partition("us-west", "mars")
    with pytest.raises(LinkConfigError):
        LinkEmulator({"a": "10.0.0.0/16", "b": "10.0.1.0/24"})


def test_control_requests_steer_the_links_and_bad_ones_get_an_error() -> None:
    emu = emulator()

    assert emu.handle_control(b'{"op": "set", "between": ["us-west", "eu-central"], "rtt_ms": 80}')["ok"]
    assert emu.link("eu-central", "us-west").rtt_ms == 80
    assert emu.handle_control(b'{"op": "partition", "between": ["us-west", "eu-central"]}')["ok"]
    assert emu.link("us-west", "eu-central").partitioned
    assert (
        emu.handle_control(b'{"op": "heal", "between": ["us-west", "eu-central"]}')["link"]["partitioned"]
        is False
    )
    stats = emu.handle_control(b'{"op": "stats"}')
    assert stats["ok"] and "eu-central|us-west" in stats["links"]

    for bad in (b"not json", b"[]", b'{"op": "explode"}', b'{"op": "heal", "between": ["x"]}',
                b'{"op": "set", "between": ["us-west", "eu-central"], "loss": 7}'):  # fmt: skip
        answer = emu.handle_control(bad)
        assert answer["ok"] is False and answer["error"]
    assert json.dumps(emu.stats())


def test_ipv4_addresses_reads_source_and_destination() -> None:
    assert ipv4_addresses(packet(US, EU)) == (ipaddress.IPv4Address(US), ipaddress.IPv4Address(EU))
