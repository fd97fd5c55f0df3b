"""A hub replica as a Ray actor on a real multi-node cluster, used from another process over QUIC."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RW = ["reasoningbank:read", "reasoningbank:write"]

CLIENT = textwrap.dedent(
    """
    import json, sys
    from rayflow.errors import RayflowError
    from rayflow.wire.hub_client import SyncHubClient
    from rayflow.wire.hub_endpoint import HubEndpoint
    spec = json.loads(sys.stdin.read())
    out = {}
    with SyncHubClient.for_endpoint(HubEndpoint.from_dict(spec["endpoint"]), token=spec["token"]) as hub:
        for step in spec["steps"]:
            try:
                if step["op"] == "store":
                    out[step["key"]] = hub.store_pattern(namespace=step["namespace"], title=step["title"],
                                                         content=step["content"])["id"]
                elif step["op"] == "search":
                    out[step["key"]] = [h["item"]["id"] for h in hub.search(step["query"], k=5)]
                elif step["op"] == "get":
                    out[step["key"]] = hub.get(step["id"])["title"]
            except RayflowError as error:
                out[step["key"]] = "error:" + error.code
    print(json.dumps(out))
    """
)


def client_process(endpoint, token, steps):
    """Run the hub client in a separate OS process; returns what each step gave."""
    spec = {"endpoint": endpoint.to_dict(), "token": token, "steps": steps}
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT], input=json.dumps(spec), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def actor_pid(actor):
    import os

    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=180)


@pytest.fixture(scope="module")
def hub(ray_cluster, tmp_path_factory):
    import ray

    from actors.hub_replica import get_hub_replica, start_hub_replica

    state_dir = str(tmp_path_factory.mktemp("hub-us-west"))
    replica = start_hub_replica("eu-central", state_dir)
    ray.get(replica.endpoint.remote(), timeout=120)
    assert ray.get(replica.node_id.remote(), timeout=120) == ray_cluster.node_ids["eu-central"]
    assert get_hub_replica("eu-central") is not None
    yield replica
    ray.get(replica.stop.remote(), timeout=60)
    ray.kill(replica, no_restart=True)


def test_the_replica_listens_on_its_node_address_which_its_certificate_names(hub):
    import ipaddress

    import ray

    from rayflow.rpc.tls import certificate_names

    def node_ip_and_certificate(replica):
        return ray.util.get_node_ip_address(), (replica._server.state_dir / "tls" / "server.pem").read_bytes()

    endpoint = ray.get(hub.endpoint.remote())
    node_ip, server_pem = ray.get(hub.__ray_call__.remote(node_ip_and_certificate), timeout=120)
    # Not loopback on a cluster: workers and sandboxes of the region's other nodes reach it there.
    assert endpoint.host == node_ip
    assert node_ip in certificate_names(server_pem)[1]
    loopback = ipaddress.ip_address(node_ip).is_loopback
    assert endpoint.server_name == ("localhost" if loopback else node_ip)


def test_a_client_in_another_process_stores_and_retrieves_with_a_token(hub):
    import ray

    endpoint = ray.get(hub.endpoint.remote())
    token = ray.get(hub.issue_token.remote("sandbox-1", "acme", ["*"], RW))
    out = client_process(
        endpoint,
        token,
        [
            {"op": "store", "key": "id", "namespace": "swarm/t1", "title": "Pin the dependency",
             "content": "pip resolver conflict: pin the transitive dependency in constraints"},
            {"op": "search", "key": "hits", "query": "pip resolver conflict transitive dependency"},
        ],
    )
    assert out["hits"][0] == out["id"]


def test_tenants_are_isolated_and_revoked_tokens_refused(hub):
    import ray

    endpoint = ray.get(hub.endpoint.remote())
    acme = ray.get(hub.issue_token.remote("a", "acme", ["*"], RW))
    globex = ray.get(hub.issue_token.remote("g", "globex", ["*"], RW))
    stored = client_process(endpoint, acme, [
        {"op": "store", "key": "id", "namespace": "ops", "title": "Acme only",
         "content": "acme rotates the signing keys every monday"},
    ])["id"]
    seen = client_process(endpoint, globex, [
        {"op": "search", "key": "hits", "query": "acme rotates the signing keys every monday"},
        {"op": "get", "key": "get", "id": stored},
    ])
    assert stored not in seen["hits"]
    assert seen["get"] == "error:item_not_found"
    admin = ray.get(hub.issue_token.remote("admin", "acme", ["*"], ["admin"]))
    victim = ray.get(hub.issue_token.remote("v", "acme", ["*"], RW))
    claims = client_process(endpoint, victim, [{"op": "search", "key": "hits", "query": "signing keys"}])
    assert stored in claims["hits"]
    revoke = textwrap.dedent(
        f"""
        import jwt
        from rayflow.wire.hub_client import SyncHubClient
        payload = jwt.decode({victim!r}, options={{"verify_signature": False}})
        with SyncHubClient({endpoint.host!r}, {endpoint.port}, ca_pem={endpoint.ca_pem!r},
                           token={admin!r}) as hub:
            hub.revoke(payload["jti"], expires_at=payload["exp"])
        """
    )
    subprocess.run([sys.executable, "-c", revoke], check=True, timeout=120, capture_output=True)
    refused = client_process(endpoint, victim, [{"op": "search", "key": "hits", "query": "signing keys"}])
    assert refused["hits"] == "error:unauthorized"


def test_a_killed_and_restarted_hub_still_serves_every_acknowledged_item(hub):
    import ray

    endpoint = ray.get(hub.endpoint.remote())
    token = ray.get(hub.issue_token.remote("w", "durable", ["*"], RW))
    steps = [
        {"op": "store", "key": f"id{i}", "namespace": "runs", "title": f"Lesson {i}",
         "content": f"lesson number {i} about flaky integration test number {i}"}
        for i in range(20)
    ]
    acked = client_process(endpoint, token, steps)
    pid_before = actor_pid(hub)
    ray.kill(hub, no_restart=False)  # SIGKILL-like: no clean close, Ray restarts the actor
    # ray.kill returns at once; calls may still reach the dying incarnation until it is gone.
    for _ in range(600):
        if actor_pid(hub) != pid_before:
            break
    else:
        pytest.fail("the hub actor was not restarted")
    endpoint = ray.get(hub.endpoint.remote(), timeout=180)
    token = ray.get(hub.issue_token.remote("w", "durable", ["*"], RW))
    got = client_process(endpoint, token, [{"op": "get", "key": k, "id": v} for k, v in acked.items()])
    assert got == {k: f"Lesson {k[2:]}" for k in acked}
