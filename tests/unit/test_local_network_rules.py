"""Pure parts of local sandbox networking: address choice, names, the fence, the commands, the argv."""

from __future__ import annotations

import ipaddress

import pytest

from rayflow.errors import ConfigError, RayflowError
from rayflow.sandbox import local_network, netfilter
from rayflow.sandbox.local_backend import ArgvFds, HostLayout, bwrap_argv, plan_limits
from rayflow.sandbox.netfilter import Target
from rayflow.sandbox.spec import NetworkPolicy, SandboxSpec

LOOPBACK = [Target("127.0.0.1", 4433, True)]
REMOTE = [Target("192.0.2.7", 443, False)]
LINK = local_network.plan_link("rf-0123456789ab", ipaddress.IPv4Network("100.87.0.8/30"))


def test_the_same_id_picks_the_same_network() -> None:
    first = local_network.pick_network("rf-aaaaaaaaaaaa", [])
    assert first == local_network.pick_network("rf-aaaaaaaaaaaa", [])
    assert first.prefixlen == 30 and first.subnet_of(ipaddress.IPv4Network(local_network.DEFAULT_POOL))


def test_a_taken_network_is_skipped() -> None:
    first = local_network.pick_network("rf-aaaaaaaaaaaa", [])
    second = local_network.pick_network("rf-aaaaaaaaaaaa", [first])
    assert second != first and not second.overlaps(first)


def test_a_route_covering_the_whole_pool_leaves_no_network() -> None:
    with pytest.raises(RayflowError, match="no free /30"):
        local_network.pick_network("rf-a", [ipaddress.IPv4Network("100.64.0.0/10")], "100.87.0.0/28")


def test_a_pool_smaller_than_a_slash_30_is_refused() -> None:
    with pytest.raises(ConfigError):
        local_network.pick_network("rf-a", [], "100.87.0.0/31")


def test_taken_networks_read_routes_and_addresses_but_not_the_default_route() -> None:
    routes = [{"dst": "default"}, {"dst": "172.17.0.0/16"}, {"dst": "192.0.2.1"}]
    addresses = [{"addr_info": [{"local": "100.87.3.5", "prefixlen": 30}]}, {"ifname": "x"}]
    taken = local_network.taken_networks(routes, addresses)
    assert [str(n) for n in taken] == ["172.17.0.0/16", "192.0.2.1/32", "100.87.3.4/30"]


def test_link_puts_the_host_end_first_and_names_fit_an_interface() -> None:
    assert (LINK.host_address, LINK.sandbox_address) == ("100.87.0.9", "100.87.0.10")
    assert LINK.host_if == "rfl0123456789ab" and len(LINK.host_if) <= netfilter.MAX_IFNAME
    assert LINK.netns == "rayflow-rf-0123456789ab"
    assert local_network.sandbox_id_of(LINK.netns) == "rf-0123456789ab"


def test_other_programs_namespaces_are_not_taken_for_sandboxes() -> None:
    assert local_network.sandbox_id_of("cni-1234") is None


def test_an_id_that_could_escape_a_path_is_refused() -> None:
    with pytest.raises(ConfigError):
        local_network.netns_name("../etc")


def test_loopback_endpoints_are_rewritten_from_the_host_end_and_nothing_is_forwarded() -> None:
    rules = local_network.rules(LINK, LOOPBACK)
    dnat = [r for r in rules if r.table == "nat"]
    assert {r.chain for r in dnat} == {"PREROUTING"}
    assert all("100.87.0.9" in r.args and "127.0.0.1:4433" in r.args for r in dnat)
    forward = [r for r in rules if r.chain == "FORWARD" and not r.ipv6]
    assert forward and all(r.args[-1] == "DROP" for r in forward)


def test_remote_endpoints_are_forwarded_and_masqueraded() -> None:
    rules = local_network.rules(LINK, REMOTE)
    accepts = [r for r in rules if r.chain == "FORWARD" and r.args[-1] == "ACCEPT"]
    assert any("RELATED,ESTABLISHED" in r.args for r in accepts)
    assert sum("192.0.2.7" in r.args for r in accepts) == 2
    masquerade = [r for r in rules if r.chain == "POSTROUTING"]
    assert len(masquerade) == 1 and "100.87.0.10/32" in masquerade[0].args


def test_every_local_rule_carries_the_local_tag_and_docker_sweeps_skip_it() -> None:
    rules = local_network.rules(LINK, LOOPBACK + REMOTE)
    assert all("rayflow-local=rf-0123456789ab" in r.args for r in rules)
    dump = "*filter\n" + "".join(f"-A {netfilter.insert_line(r)[6:]}\n" for r in rules if r.table == "filter")
    assert netfilter.tagged_deletions(dump) == []
    assert {i for i, _, _ in netfilter.tagged_deletions(dump, prefix=local_network.TAG_PREFIX)} == {
        LINK.sandbox_id
    }


def test_ipv6_is_dropped_both_ways_on_the_host_end() -> None:
    v6 = [r for r in local_network.rules(LINK, LOOPBACK) if r.ipv6]
    assert {(r.chain, r.args[0]) for r in v6} == {("INPUT", "-i"), ("FORWARD", "-i"), ("FORWARD", "-o")}


def test_the_default_route_is_added_only_for_remote_endpoints() -> None:
    def has_default(commands: list[list[str]]) -> bool:
        return any("default" in argv for argv in commands)

    assert not has_default(local_network.setup_commands(LINK, remote=False))
    assert has_default(local_network.setup_commands(LINK, remote=True))


def test_ipv6_is_switched_off_in_the_namespace_before_the_veth_is_made() -> None:
    commands = local_network.setup_commands(LINK, remote=False)
    order = [i for i, argv in enumerate(commands) if local_network.NO_IPV6 in argv or "veth" in argv]
    assert commands[order[0]][-1] == local_network.NO_IPV6 and "veth" in commands[order[1]]


def test_route_localnet_is_set_only_with_a_loopback_endpoint() -> None:
    assert ("ipv4", "route_localnet", "1") in local_network.host_interface_options(LINK, LOOPBACK)
    assert ("ipv4", "route_localnet", "1") not in local_network.host_interface_options(LINK, REMOTE)


def test_the_hub_is_reached_at_the_host_end_for_a_loopback_hub() -> None:
    policy = NetworkPolicy.hub_only("127.0.0.1", 4433)
    assert local_network.hub_endpoint(policy, LOOPBACK, LINK) == ("100.87.0.9", 4433)


def test_an_allow_list_names_no_hub() -> None:
    policy = NetworkPolicy.allow_list(("127.0.0.1", 4433))
    assert local_network.hub_endpoint(policy, LOOPBACK, LINK) is None


def _argv(spec: SandboxSpec, **kwargs: object) -> list[str]:
    layout = HostLayout(python="/opt/py/bin/python3", python_prefix="/opt/py", packages=())
    plan = plan_limits(spec.limits, ())
    return bwrap_argv(spec, layout, uid=1, fds=ArgvFds(5, 6, 7, 8), plan=plan, bwrap="bwrap", **kwargs)  # type: ignore[arg-type]


def test_a_networked_sandbox_starts_in_its_namespace_and_keeps_it() -> None:
    spec = SandboxSpec(owner="w", network=NetworkPolicy.hub_only("127.0.0.1", 4433))
    argv = _argv(spec, netns=LINK.netns_path, hub=("100.87.0.9", 4433))
    assert argv[:3] == ["nsenter", f"--net={LINK.netns_path}", "bwrap"]
    assert "--unshare-net" not in argv
    env = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert (env["RAYFLOW_HUB_HOST"], env["RAYFLOW_HUB_PORT"]) == ("100.87.0.9", "4433")


def test_a_networked_spec_without_a_namespace_is_refused() -> None:
    spec = SandboxSpec(owner="w", network=NetworkPolicy.allow_list(("127.0.0.1", 1)))
    with pytest.raises(ConfigError, match="only network mode 'none'"):
        _argv(spec)


# --- a hub at its real address (a Ray node's), not on loopback ----------------------------------
NODE_HUB = [Target("100.90.1.10", 4433, False)]


def test_a_hub_at_a_node_address_is_allowed_directly_without_rewriting() -> None:
    rules = local_network.rules(LINK, NODE_HUB)
    assert not any(r.chain == "PREROUTING" or "DNAT" in r.args for r in rules)
    for chain in ("INPUT", "FORWARD"):
        accepts = [
            r for r in rules if r.chain == chain and r.args[-1] == "ACCEPT" and "100.90.1.10" in r.args
        ]
        assert {r.args[r.args.index("-p") + 1] for r in accepts} == {"tcp", "udp"}, chain
        assert all(r.args[r.args.index("--dport") + 1] == "4433" for r in accepts)
        assert all(r.args[:2] == ("-i", LINK.host_if) for r in accepts)


def test_a_hub_at_a_node_address_is_accepted_above_the_drops_and_nothing_else_is() -> None:
    rules = local_network.rules(LINK, NODE_HUB)
    for chain in ("INPUT", "FORWARD"):
        mine = [r for r in rules if r.chain == chain and not r.ipv6]
        # Inserted at position 1 in list order: the drops, listed first, end up below the accepts.
        first_accept = next(i for i, r in enumerate(mine) if r.args[-1] == "ACCEPT")
        assert all(r.args[-1] == "DROP" for r in mine[:first_accept])
        assert all(r.args[-1] == "ACCEPT" for r in mine[first_accept:])
        other = [r for r in mine if r.args[-1] == "ACCEPT" and "RELATED,ESTABLISHED" not in r.args]
        assert all("100.90.1.10" in r.args for r in other)


def test_a_hub_at_a_node_address_is_masqueraded_only_toward_the_outside() -> None:
    masquerade = [r for r in local_network.rules(LINK, NODE_HUB) if r.table == "nat"]
    assert len(masquerade) == 1 and masquerade[0].chain == "POSTROUTING"
    args = masquerade[0].args
    assert args[args.index("-s") + 1] == f"{LINK.sandbox_address}/32"
    assert args[args.index("-o") - 1 : args.index("-o") + 2] == ("!", "-o", LINK.host_if)


def test_the_sandbox_dials_a_node_hub_at_its_real_address() -> None:
    policy = NetworkPolicy.hub_only("100.90.1.10", 4433)
    assert local_network.hub_endpoint(policy, NODE_HUB, LINK) == ("100.90.1.10", 4433)
    assert any("default" in argv for argv in local_network.setup_commands(LINK, remote=True))


def test_a_loopback_hub_next_to_a_node_endpoint_keeps_its_rewrite() -> None:
    rules = local_network.rules(LINK, LOOPBACK + NODE_HUB)
    dnat = [r for r in rules if r.chain == "PREROUTING"]
    assert dnat and all("127.0.0.1:4433" in r.args for r in dnat)
    assert not any("100.90.1.10" in r.args for r in dnat)


def test_the_host_end_forwards_only_when_an_endpoint_is_off_loopback() -> None:
    assert ("ipv4", "forwarding", "1") in local_network.host_interface_options(LINK, NODE_HUB)
    assert ("ipv4", "forwarding", "1") not in local_network.host_interface_options(LINK, LOOPBACK)


def test_replies_come_in_on_the_routed_interfaces_and_local_addresses_need_none() -> None:
    answers = [
        [{"dst": "100.90.1.10", "gateway": "100.90.1.1", "dev": "eth0"}],
        [{"type": "local", "dst": "100.90.1.11", "dev": "lo"}],
        [{"dst": "100.90.2.10", "gateway": "100.90.1.1", "dev": "eth0"}],
        [{"dst": "192.0.2.7", "dev": "wg0"}],
    ]
    assert local_network.reply_interfaces(answers) == ["eth0", "wg0"]


def test_forwarding_is_switched_on_once_and_off_after_the_last_sandbox() -> None:
    ledger, on = local_network.claim_forwarding({}, "rf-a", ["eth0"], {"eth0": False})
    assert on == ["eth0"] and ledger == {"eth0": ["rf-a"]}
    ledger, on = local_network.claim_forwarding(ledger, "rf-b", ["eth0"], {"eth0": True})
    assert on == [] and ledger == {"eth0": ["rf-a", "rf-b"]}
    alive = {"rf-a", "rf-b"}
    ledger, off = local_network.release_forwarding(ledger, "rf-a", alive.__contains__)
    assert off == [] and ledger == {"eth0": ["rf-b"]}
    ledger, off = local_network.release_forwarding(ledger, "rf-b", alive.__contains__)
    assert off == ["eth0"] and ledger == {}


def test_forwarding_someone_else_switched_on_is_never_claimed_nor_switched_off() -> None:
    ledger, on = local_network.claim_forwarding({}, "rf-a", ["eth0"], {"eth0": True})
    assert (ledger, on) == ({}, [])
    assert local_network.release_forwarding(ledger, "rf-a", lambda _: True) == ({}, [])


def test_sandboxes_gone_without_a_destroy_do_not_hold_forwarding_on() -> None:
    ledger = {"eth0": ["rf-crashed", "rf-a"]}
    assert local_network.release_forwarding(ledger, "rf-a", lambda i: i != "rf-crashed") == ({}, ["eth0"])
