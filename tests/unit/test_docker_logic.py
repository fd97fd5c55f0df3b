"""Pure parts of the docker backend: the attach stream demultiplexer, options, kill refinement, rules."""

from __future__ import annotations

import struct

import pytest

from rayflow.errors import InvalidInputError
from rayflow.sandbox import docker_network
from rayflow.sandbox.docker_backend import StreamDemuxer, container_options, split_options, tmpfs_options
from rayflow.sandbox.docker_network import Rule, Target
from rayflow.sandbox.spec import MIB, ExecResult, KillReason, Limits, SandboxSpec
from rayflow.sandbox.wrapper import refine_kill


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def test_demuxer_splits_frames_by_stream() -> None:
    data = frame(1, b"out") + frame(2, b"err") + frame(1, b"more")
    assert StreamDemuxer().feed(data) == [(1, b"out"), (2, b"err"), (1, b"more")]


def test_demuxer_hands_out_pieces_fed_one_byte_at_a_time() -> None:
    demuxer = StreamDemuxer()
    pieces = [p for byte in frame(1, b"abc") + frame(2, b"") for p in demuxer.feed(bytes([byte]))]
    assert b"".join(p for s, p in pieces if s == 1) == b"abc" and not demuxer.mid_frame


def test_demuxer_reports_a_truncated_frame() -> None:
    demuxer = StreamDemuxer()
    demuxer.feed(frame(1, b"abcdef")[:-2])
    assert demuxer.mid_frame


def test_demuxer_refuses_an_unknown_stream() -> None:
    with pytest.raises(InvalidInputError):
        StreamDemuxer().feed(frame(7, b"x"))


def test_tmpfs_is_sized_owned_by_the_sandbox_user_and_executable() -> None:
    assert tmpfs_options(8 * MIB) == f"size={8 * MIB},uid=10001,gid=10001,mode=0700,exec"


def test_container_options_lock_the_container_down() -> None:
    spec = SandboxSpec(owner="w", limits=Limits(cpus=0.5, memory_bytes=64 * MIB, pids=32))
    create, host = split_options(container_options(spec, "dk-1", None))
    assert create["user"] == "10001:10001" and create["stdin_open"] and not create["tty"]
    assert create["labels"]["rayflow.owner"] == "w" and create["labels"]["rayflow.sandbox"] == "dk-1"
    assert host["network_mode"] == "none" and host["read_only"] and host["init"]
    assert host["cap_drop"] == ["ALL"] and host["security_opt"] == ["no-new-privileges"]
    assert host["mem_limit"] == host["memswap_limit"] == 64 * MIB
    assert (host["nano_cpus"], host["pids_limit"]) == (500_000_000, 32)
    assert set(host["tmpfs"]) == {"/tmp", "/workspace"}


def test_a_sigkill_without_an_oom_kill_is_not_reported_as_oom() -> None:
    result = ExecResult(137, b"", b"", 0.1, killed=KillReason.OOM)
    assert refine_kill(result, new_ooms=0, new_refusals=0).killed is None
    assert refine_kill(result, new_ooms=1, new_refusals=0).killed is KillReason.OOM


def test_a_failure_during_refused_forks_is_reported_as_pids() -> None:
    result = ExecResult(1, b"", b"", 0.1)
    assert refine_kill(result, new_ooms=0, new_refusals=3).killed is KillReason.PIDS
    assert refine_kill(ExecResult(0, b"", b"", 0.1), 0, 3).killed is None


def test_loopback_endpoints_are_rewritten_from_the_gateway_and_accepted_above_the_drop() -> None:
    rules = docker_network.rules("dk-1", "rfdk1", "172.18.0.1", [Target("127.0.0.1", 4433, True)])
    inputs = [r for r in rules if r.chain == "INPUT" and not r.ipv6]
    # Inserted at position 1 in order: the last inserted ends up first.
    assert inputs[0].args[-1] == "DROP" and all(r.args[-1] == "ACCEPT" for r in inputs[1:])
    dnat = [r for r in rules if r.table == "nat"]
    assert {r.args[r.args.index("-p") + 1] for r in dnat} == {"tcp", "udp"}
    assert all("127.0.0.1:4433" in r.args and "172.18.0.1" in r.args for r in dnat)
    assert not any("RELATED,ESTABLISHED" in r.args for r in rules)  # internal: nothing forwarded


def test_remote_endpoints_are_forwarded_with_replies_allowed() -> None:
    rules = docker_network.rules("dk-1", "rfdk1", "172.18.0.1", [Target("192.0.2.7", 443, False)])
    forward = [r for r in rules if r.chain == "DOCKER-USER"]
    assert any("RELATED,ESTABLISHED" in r.args for r in forward)
    assert sum(r.args[-1] == "ACCEPT" and "192.0.2.7" in r.args for r in forward) == 2
    assert not any(r.table == "nat" for r in rules)


def test_every_rule_carries_the_sandbox_tag() -> None:
    rules = docker_network.rules("dk-1", "rfdk1", "172.18.0.1", [Target("127.0.0.1", 1, True)])
    assert all("rayflow-sandbox=dk-1" in r.args for r in rules)


def test_tagged_deletions_find_saved_rules_of_the_wanted_sandboxes() -> None:
    dump = (
        "*filter\n:INPUT ACCEPT [0:0]\n"
        '-A INPUT -i rfa -m comment --comment "rayflow-sandbox=dk-a" -j DROP\n'
        "-A INPUT -i rfb -m comment --comment rayflow-sandbox=dk-b -j DROP\n"
        "-A INPUT -i eth0 -j ACCEPT\nCOMMIT\n"
        '*nat\n-A PREROUTING -i rfa -m comment --comment "rayflow-sandbox=dk-a" -j DNAT --to-destination 127.0.0.1:1\nCOMMIT\n'
    )
    found = docker_network.tagged_deletions(dump, ["dk-a"])
    assert [(i, t) for i, t, _ in found] == [("dk-a", "filter"), ("dk-a", "nat")]
    assert all(line.startswith("-D ") for _, _, line in found)
    assert {i for i, _, _ in docker_network.tagged_deletions(dump)} == {"dk-a", "dk-b"}


def test_restore_script_commits_each_table_once() -> None:
    script = docker_network.restore_script([("filter", "-D A x"), ("nat", "-D B y"), ("filter", "-D C z")])
    assert script == "*filter\n-D A x\n-D C z\nCOMMIT\n*nat\n-D B y\nCOMMIT\n"


def test_insert_line_quotes_arguments_as_iptables_restore_reads_them() -> None:
    rule = Rule("filter", "INPUT", ("-m", "comment", "--comment", "a b", "-j", "DROP"))
    assert docker_network.insert_line(rule) == '-I INPUT 1 -m comment --comment "a b" -j DROP'
    quoted = Rule("filter", "INPUT", ("-m", "comment", "--comment", 'say "x" \\', "-j", "DROP"))
    assert docker_network.insert_line(quoted).split(" --comment ")[1] == '"say \\"x\\" \\\\" -j DROP'


def test_a_negation_stays_bare_for_iptables_restore() -> None:
    rule = Rule("nat", "POSTROUTING", ("-s", "100.87.0.10/32", "!", "-o", "rfl1", "-j", "MASQUERADE"))
    assert docker_network.insert_line(rule) == "-I POSTROUTING 1 -s 100.87.0.10/32 ! -o rfl1 -j MASQUERADE"


def test_a_hub_at_a_node_address_is_reached_directly_from_the_bridge() -> None:
    rules = docker_network.rules("dk-1", "rfdk1", "172.18.0.1", [Target("100.90.1.10", 4433, False)])
    assert not any(r.table == "nat" for r in rules)  # no rewrite; the engine masquerades its bridges
    for chain in ("INPUT", "DOCKER-USER"):
        accepts = [
            r for r in rules if r.chain == chain and r.args[-1] == "ACCEPT" and "100.90.1.10" in r.args
        ]
        assert {r.args[r.args.index("-p") + 1] for r in accepts} == {"tcp", "udp"}, chain
        assert all("--dport" in r.args and "4433" in r.args for r in accepts)
    assert any("RELATED,ESTABLISHED" in r.args for r in rules if r.chain == "DOCKER-USER")
    assert docker_network.sandbox_address(Target("100.90.1.10", 4433, False), "172.18.0.1") == "100.90.1.10"


def test_a_loopback_hub_keeps_its_rewrite_to_the_gateway() -> None:
    target = Target("127.0.0.1", 4433, True)
    assert docker_network.sandbox_address(target, "172.18.0.1") == "172.18.0.1"
    rules = docker_network.rules("dk-1", "rfdk1", "172.18.0.1", [target])
    assert not any(r.chain == "DOCKER-USER" and r.args[-1] == "ACCEPT" for r in rules)


def test_a_loopback_hub_is_refused_when_the_engine_is_in_another_namespace() -> None:
    from rayflow.errors import ConfigError

    docker_network.check_targets([Target("127.0.0.1", 4433, True)], None)
    docker_network.check_targets([Target("100.90.1.10", 4433, False)], "/proc/7/ns/net")
    with pytest.raises(ConfigError, match="loopback"):
        docker_network.check_targets([Target("127.0.0.1", 4433, True)], "/proc/7/ns/net")


def test_rules_run_in_another_namespace_through_nsenter() -> None:
    from rayflow.sandbox import netfilter

    assert netfilter.in_netns(None, ["iptables-save"]) == ["iptables-save"]
    assert netfilter.in_netns("/proc/7/ns/net", ["iptables-save"]) == [
        "nsenter", "--net=/proc/7/ns/net", "iptables-save",
    ]  # fmt: skip
