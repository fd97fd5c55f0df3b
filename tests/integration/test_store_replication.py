"""Replication of the bank's change log between real SQLite replicas, without a network: the store's
deltas (``rayflow.hub.replication``) through the sync core's causal receive window.

Three replicas write concurrently (new items, edits, deletes, counters, uses, links) and pull from
each other in a random order with small batches; once everyone has pulled from everyone, every
replica holds the same version vector and the same state digest, whatever the order was.
"""

from __future__ import annotations

import random

import pytest

from rayflow.errors import InvalidInputError
from rayflow.hub.replication import apply_deltas, change_of, delta_of
from rayflow.ids import new_id
from rayflow.memory.store import Mutation, Store
from rayflow.sync.delta import Delta
from rayflow.sync.receive_window import ReceiveWindow
from rayflow.sync.vector_clock import VectorClock
from tests.store_support import item_payload, pull

pytestmark = pytest.mark.integration

REPLICAS = ("r-a", "r-b", "r-c")


def live_items(store: Store) -> list[str]:
    rows = store.reader().execute("SELECT id FROM items WHERE deleted = 0 ORDER BY id")
    return [row[0] for row in rows]


def random_write(store: Store, rng: random.Random) -> None:
    items = live_items(store)
    action = rng.choice(["put", "put", "edit", "delete", "count", "touch", "link"] if items else ["put"])
    if action == "put" or (action == "link" and len(items) < 2):
        store.commit(
            "acme", [Mutation("item.put", new_id(), item_payload(title=f"t{rng.random()}".encode()))]
        )
    elif action == "edit":
        store.commit(
            "acme",
            [Mutation("item.put", rng.choice(items), item_payload(content=f"{rng.random()}".encode()))],
        )
    elif action == "delete":
        store.commit(
            "acme", [Mutation("item.delete", rng.choice(items), {"reason": rng.choice(["dup", "wrong"])})]
        )
    elif action == "count":
        origin = store.replica_id
        store.commit(
            "acme",
            [Mutation("counter.add", rng.choice(items), {"origin": origin, "uses": 1, "successes": 1})],
        )
    elif action == "touch":
        store.commit(
            "acme", [Mutation("item.touch", rng.choice(items), {"last_used_at": rng.uniform(1, 100)})]
        )
    else:
        src, dst = rng.sample(items, 2)
        payload = {"src_id": src, "dst_id": dst, "kind": "refines", "created_at": 1.0}
        store.commit("acme", [Mutation("link.put", f"{src}>{dst}", payload)])


@pytest.fixture
def replicas(tmp_path):
    stores = {name: Store(tmp_path / f"{name}.sqlite3", replica_id=name) for name in REPLICAS}
    stores["r-a"].commit("acme", [Mutation("tenant.put", "acme", {"created_at": 1.0})])
    for name in ("r-b", "r-c"):
        pull(stores[name], stores["r-a"], 4096)
    yield stores
    for store in stores.values():
        store.close()


@pytest.mark.parametrize("seed", range(6))
def test_concurrent_writes_converge_to_one_digest_whatever_the_pull_order(replicas, seed):
    rng = random.Random(seed)
    for _ in range(120):
        random_write(replicas[rng.choice(REPLICAS)], rng)
        if rng.random() < 0.3:
            receiver, sender = rng.sample(REPLICAS, 2)
            pull(replicas[receiver], replicas[sender], rng.choice([300, 2000, 1 << 20]))
    for _ in range(2):  # everyone pulls from everyone: all of it reaches all
        for receiver in REPLICAS:
            for sender in REPLICAS:
                if receiver != sender:
                    pull(replicas[receiver], replicas[sender], 1 << 20)
    vectors = {name: store.version_vector() for name, store in replicas.items()}
    digests = {name: store.state_digest() for name, store in replicas.items()}
    assert len({tuple(sorted(v.items())) for v in vectors.values()}) == 1, vectors
    assert len(set(digests.values())) == 1, digests
    assert sum(vectors["r-a"].values()) > 120  # every write (and the tenant) was logged and shipped


def test_a_delete_relayed_by_a_third_replica_waits_for_the_put_it_depends_on(replicas):
    a, b, c = (replicas[name] for name in REPLICAS)
    item = new_id()
    a.commit("acme", [Mutation("item.put", item, item_payload())])
    pull(b, a, 4096)
    (delete,) = b.commit("acme", [Mutation("item.delete", item, {"reason": "wrong"})])
    window = ReceiveWindow(VectorClock.of(c.version_vector()))
    assert window.offer(delta_of(delete)) == []  # held: C has not seen the put
    (put,) = a.changes_since("r-a", 1)
    released = window.offer(delta_of(put))
    assert [(d.origin, d.seq) for d in released] == [("r-a", 2), ("r-b", 1)]
    assert apply_deltas(c, released) == 2
    assert live_items(c) == [] and c.state_digest() == b.state_digest()


def test_a_delta_whose_body_disagrees_with_its_envelope_is_refused(replicas):
    a = replicas["r-a"]
    (change,) = a.commit("acme", [Mutation("item.put", new_id(), item_payload())])
    honest = delta_of(change)
    assert change_of(honest) == change
    forged = [
        Delta("r-x", honest.seq, honest.tenant, VectorClock.of({"r-x": honest.seq - 1}), honest.body),
        Delta(honest.origin, honest.seq, "other-tenant", honest.context, honest.body),
        Delta(
            honest.origin,
            honest.seq + 1,
            honest.tenant,
            honest.context.advance("r-a", honest.seq),
            honest.body,
        ),
        Delta(honest.origin, honest.seq, honest.tenant, honest.context, b"\x93junk"),
    ]
    for delta in forged:
        with pytest.raises(InvalidInputError):
            change_of(delta)


def test_concurrent_edits_stay_as_siblings_until_an_edit_that_saw_both(replicas):
    a, b, c = (replicas[name] for name in REPLICAS)
    item = new_id()
    a.commit("acme", [Mutation("item.put", item, item_payload(content=b"first"))])
    pull(b, a, 1 << 20)
    a.commit("acme", [Mutation("item.put", item, item_payload(content=b"edited at a"))])
    b.commit("acme", [Mutation("item.put", item, item_payload(content=b"edited at b"))])
    assert [v["fields"]["content"] for v in a.item_versions(item)] == [b"edited at a"]
    for receiver, sender in ((a, b), (b, a), (c, b), (c, a)):  # c learns b's edit before a's
        pull(receiver, sender, 1 << 20)
    siblings = {
        store.replica_id: [v["fields"]["content"] for v in store.item_versions(item)] for store in (a, b, c)
    }
    assert siblings["r-a"] == siblings["r-b"] == siblings["r-c"]
    assert sorted(siblings["r-a"]) == [b"edited at a", b"edited at b"]
    shown = a.reader().execute("SELECT content FROM items WHERE id = ?", (item,)).fetchone()[0]
    assert shown == siblings["r-a"][0]  # the row shows the newest sibling
    c.commit("acme", [Mutation("item.put", item, item_payload(content=b"merged at c"))])
    for receiver in (a, b):
        pull(receiver, c, 1 << 20)
    assert all([v["fields"]["content"] for v in s.item_versions(item)] == [b"merged at c"] for s in (a, b, c))
    assert a.state_digest() == b.state_digest() == c.state_digest()


def test_a_reader_sees_concurrent_edits_as_siblings_and_the_next_edit_reconciles_them(tmp_path):
    """Two banks holding the same tenant key (as replicas sharing it will) edit one lesson at once."""
    import secrets

    from rayflow.config import load_config
    from rayflow.memory.bank import ReasoningBank
    from rayflow.memory.crypto import InMemoryKeyProvider

    key = secrets.token_bytes(32)
    banks = [
        ReasoningBank(tmp_path / name, config=load_config({"state_dir": tmp_path / name, "replica_id": name}),
                      key_provider=InMemoryKeyProvider({"acme": key}))
        for name in ("bank-us", "bank-eu")
    ]  # fmt: skip
    us, eu = banks
    try:
        us.create_tenant("acme")
        item = us.store_item("acme", namespace="runs", title="retry flaky tests", content="retry once")
        pull(eu.store, us.store, 1 << 20)
        us.edit_item("acme", item.id, content="retry up to three times")
        eu.edit_item("acme", item.id, content="quarantine the test instead")
        pull(eu.store, us.store, 1 << 20)
        pull(us.store, eu.store, 1 << 20)
        seen = [bank.get("acme", item.id) for bank in banks]
        assert seen[0].content == seen[1].content  # both show the same winner ...
        assert [s.content for s in seen[0].siblings] == [s.content for s in seen[1].siblings]
        both = {seen[0].content, *(s.content for s in seen[0].siblings)}
        assert both == {"retry up to three times", "quarantine the test instead"}  # ... and the other edit
        us.edit_item("acme", item.id, content="retry twice, then quarantine")
        pull(eu.store, us.store, 1 << 20)
        for bank in banks:
            reconciled = bank.get("acme", item.id)
            assert (reconciled.content, reconciled.siblings) == ("retry twice, then quarantine", ())
    finally:
        for bank in banks:
            bank.close()
