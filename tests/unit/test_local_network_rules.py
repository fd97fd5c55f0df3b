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
