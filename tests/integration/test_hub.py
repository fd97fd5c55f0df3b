"""The hub over real QUIC on 127.0.0.1: tokens, tenants, namespaces, revocation, bad input, audit."""

import asyncio
import dataclasses

import pytest

from rayflow.errors import AuthError, InvalidInputError, ItemNotFoundError, PermissionDeniedError
from rayflow.hub.server import HubServer
from rayflow.wire.hub_client import HubClient, SyncHubClient
from rayflow.wire.hub_ops import OPS

pytestmark = pytest.mark.integration

RW = ["reasoningbank:read", "reasoningbank:write"]


def run(coro):
    return asyncio.run(coro)


async def _with_hub(tmp_path, body):
    async with HubServer(tmp_path / "hub", region="us-west") as hub:
        host, port = hub.address
        clients = []

        def client(token):
            c = HubClient(host, port, ca_pem=hub.ca_pem, token=token)
            clients.append(c)
            return c

        try:
            return await body(hub, client)
        finally:
            for c in clients:
                await c.close()


def test_store_and_search_with_a_token(tmp_path):
    async def body(hub, client):
        acme = client(hub.issue_token("agent-1", "acme", ["*"], RW))
        stored = await acme.store_pattern(
            namespace="swarm/a", title="Use WAL mode", content="sqlite database is locked: enable WAL"
        )
        hits = await acme.search("database is locked", k=3, namespace="swarm")
        assert hits[0]["item"]["id"] == stored["id"]
        assert {"score", "similarity", "recency", "reliability"} <= hits[0].keys()
        assert (await acme.get(stored["id"]))["source_agent"] == "agent-1"
        assert (await acme.health())["region"] == "us-west"

    run(_with_hub(tmp_path, body))


def test_a_second_tenant_sees_nothing_and_cannot_write_into_the_first(tmp_path):
    async def body(hub, client):
        acme = client(hub.issue_token("a", "acme", ["*"], RW))
        globex = client(hub.issue_token("g", "globex", ["*"], RW))
        secret = await acme.store_pattern(namespace="ops", title="Acme secret", content="acme deploys on tuesdays")
        assert await globex.search("acme deploys on tuesdays", k=5) == []
        with pytest.raises(ItemNotFoundError):
            await globex.get(secret["id"])
        with pytest.raises(ItemNotFoundError):
            await globex.report_outcome([secret["id"]], success=False)
        own = await globex.store_pattern(namespace="ops", title="Globex", content="acme deploys on tuesdays")
        assert [h["item"]["id"] for h in await acme.search("acme deploys on tuesdays", k=5)] == [secret["id"]]
        assert (await acme.get(secret["id"]))["failures"] == 0
        assert own["id"] != secret["id"]

    run(_with_hub(tmp_path, body))


def test_namespace_and_scope_limits_are_enforced(tmp_path):
    async def body(hub, client):
        writer = client(hub.issue_token("w", "acme", ["*"], RW))
        other = await writer.store_pattern(namespace="team-b/x", title="B", content="team b knowledge about caches")
        narrow = client(hub.issue_token("n", "acme", ["team-a/*"], RW))
        reader = client(hub.issue_token("r", "acme", ["*"], ["reasoningbank:read"]))
        with pytest.raises(PermissionDeniedError):
            await narrow.store_pattern(namespace="team-b/x", title="t", content="c")
        with pytest.raises(PermissionDeniedError):
            await narrow.search("caches", namespace="team-b")
        with pytest.raises(ItemNotFoundError):
            await narrow.get(other["id"])
        with pytest.raises(PermissionDeniedError):
            await reader.store_pattern(namespace="team-a", title="t", content="c")
        with pytest.raises(PermissionDeniedError):
            await writer.consolidate()
        assert await narrow.store_pattern(namespace="team-a/y", title="A", content="team a knowledge")

    run(_with_hub(tmp_path, body))


def test_missing_tampered_expired_and_revoked_tokens_are_refused(tmp_path):
    async def body(hub, client):
        token = hub.issue_token("a", "acme", ["*"], RW)
        good = client(token)
        await good.store_pattern(namespace="n", title="t", content="content words")
        for bad_token in ("", "not-a-jwt", token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")):
            with pytest.raises(AuthError):
                await client(bad_token).search("content", k=1)
        admin = client(hub.issue_token("admin", "acme", ["*"], ["admin"]))
        claims = hub.verifier.verify(token)
        await admin.revoke(claims.jti, expires_at=claims.exp)
        with pytest.raises(AuthError):
            await good.search("content", k=1)

    run(_with_hub(tmp_path, body))


def test_bad_arguments_get_typed_errors_and_the_server_keeps_serving(tmp_path):
    async def body(hub, client):
        acme = client(hub.issue_token("a", "acme", ["*"], RW))
        with pytest.raises(InvalidInputError):
            await acme.rpc.call("search", {"query": 42}, token=acme.token)
        with pytest.raises(InvalidInputError):
            await acme.rpc.call("store_pattern", {"namespace": "a/../b", "title": "t", "content": "c"},
                                token=acme.token)
        with pytest.raises(InvalidInputError):
            await acme.rpc.call("record_trajectory", {"trajectory": {"task_id": 1}}, token=acme.token)
        with pytest.raises(InvalidInputError):
            await acme.search(b"\x00\x01\x02", k=1)
        assert (await acme.health())["ok"] is True

    run(_with_hub(tmp_path, body))


def test_every_call_is_audited(tmp_path):
    async def body(hub, client):
        acme = client(hub.issue_token("agent-7", "acme", ["*"], RW))
        await acme.store_pattern(namespace="n", title="t", content="content words")
        await acme.search("content", k=1)
        with pytest.raises(AuthError):
            await client("garbage").search("x", k=1)
        return None

    run(_with_hub(tmp_path, body))
    from rayflow.memory.store import Store

    store = Store(tmp_path / "hub" / "memory" / "bank.sqlite3")
    try:
        records = store.audit_records(limit=10)
    finally:
        store.close()
    ops = {(r.actor, r.op, r.outcome) for r in records}
    assert ("agent-7", "store_pattern", "ok") in ops and ("agent-7", "search", "ok") in ops
    assert any(r.outcome == "refused:unauthorized" for r in records)


def test_sync_client_shares_the_async_implementation(tmp_path):
    async def body(hub, client):
        host, port = hub.address
        token = hub.issue_token("s", "acme", ["*"], RW)
        loop = asyncio.get_running_loop()

        def blocking():
            with SyncHubClient(host, port, ca_pem=hub.ca_pem, token=token) as sync:
                stored = sync.store_pattern(namespace="n", title="Sync", content="blocking call from a script")
                return stored["id"], sync.search("blocking call script", k=1)[0]["item"]["id"]

        stored_id, found_id = await loop.run_in_executor(None, blocking)
        assert stored_id == found_id

    run(_with_hub(tmp_path, body))


def test_learning_and_admin_ops_over_rpc(tmp_path):
    import random

    from rayflow.jobs.synthetic_tasks import trajectory

    async def body(hub, client):
        admin = client(hub.issue_token("admin", "acme", ["*"], ["admin"]))
        minted = await admin.issue_token("agent-9", namespaces=["swarm/*"], scopes=RW, ttl_s=120)
        agent = client(minted["token"])
        t = trajectory(random.Random(1), task_id="t-1", success=True, namespace="swarm/run")
        with pytest.raises(PermissionDeniedError):  # attribution cannot be forged
            await agent.record_trajectory(t)
        t = dataclasses.replace(t, agent_id="agent-9")
        recorded = await agent.record_trajectory(t)
        assert recorded["verdict"]["outcome"] == "success" and recorded["item_ids"]
        item_id = recorded["item_ids"][0]
        await agent.report_outcome([item_id], success=True)
        assert (await agent.get(item_id))["successes"] == 1
        report = await admin.consolidate()
        assert report["examined"] >= 1
        assert (await admin.stats())["trajectories"] == 1
        other_tenant_admin = client(hub.issue_token("admin", "globex", ["*"], ["admin"]))
        with pytest.raises(ItemNotFoundError):
            await other_tenant_admin.get(item_id)

    run(_with_hub(tmp_path, body))


def test_the_server_serves_exactly_the_ops_of_the_table_with_their_schemas(tmp_path):
    async def body(hub, client):
        served = hub.rpc.dispatcher.ops
        assert {op: (dict(o.args), o.idempotent) for op, o in served.items()} == {
            op: (dict(info.args), info.idempotent) for op, info in OPS.items()
        }

    run(_with_hub(tmp_path, body))


def test_a_client_built_from_the_servers_endpoint_reaches_it(tmp_path):
    async def body(hub, client):
        assert hub.endpoint.region == "us-west"
        token = hub.issue_token("e", "acme", ["*"], RW)
        async with HubClient.for_endpoint(hub.endpoint, token=token) as direct:
            assert (await direct.health())["region"] == "us-west"

    run(_with_hub(tmp_path, body))


def test_an_item_is_edited_in_place_and_only_within_the_tokens_reach(tmp_path):
    async def body(hub, client):
        writer = client(hub.issue_token("w", "acme", ["*"], RW))
        team_a = client(hub.issue_token("a", "acme", ["team-a/*"], RW))
        reader = client(hub.issue_token("r", "acme", ["*"], ["reasoningbank:read"]))
        globex = client(hub.issue_token("g", "globex", ["*"], RW))
        stored = await writer.store_pattern(namespace="team-b/ci", title="Flaky", content="retry once", tags=["ci"])
        edited = await writer.edit_item(stored["id"], content="retry up to three times")
        assert (edited["id"], edited["title"], edited["content"], edited["tags"]) == (
            stored["id"], "Flaky", "retry up to three times", ["ci"]
        )  # fmt: skip
        assert edited["siblings"] == [] and (await writer.get(stored["id"]))["content"] == "retry up to three times"
        hits = await writer.search("retry up to three times", k=1)
        assert hits[0]["item"]["id"] == stored["id"]  # re-embedded with its new text
        for outsider in (team_a, globex):
            with pytest.raises(ItemNotFoundError):
                await outsider.edit_item(stored["id"], content="vandalised")
        with pytest.raises(PermissionDeniedError):
            await reader.edit_item(stored["id"], content="vandalised")
        assert (await writer.get(stored["id"]))["content"] == "retry up to three times"

    run(_with_hub(tmp_path, body))
