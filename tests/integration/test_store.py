"""The store's single mutation path, its change log and replication-ready merges, on real SQLite files."""

import os
import subprocess
import sys
import textwrap

import apsw
import msgpack
import pytest

from rayflow.errors import InvalidInputError, ItemNotFoundError, SchemaTooNewError, UnknownTenantError
from rayflow.ids import new_id
from rayflow.memory.schema import CURRENT_VERSION
from rayflow.memory.store import Change, Mutation, Store
from tests.store_support import item_payload as _item_payload

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "bank.sqlite3", replica_id="replica-a")
    s.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 1.0})])
    yield s
    s.close()


def test_every_mutation_appends_a_change_record_in_sequence(store):
    item_id = new_id()
    changes = store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
    assert [c.seq for c in store.changes_since("replica-a", 0)] == [1, 2]
    assert changes[0].kind == "item.put" and changes[0].replica_id == "replica-a"
    hlcs = [c.hlc for c in store.changes_since("replica-a", 0)]
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == 2


def test_a_failing_mutation_rolls_back_the_whole_commit(store):
    item_id = new_id()
    with pytest.raises(ItemNotFoundError):
        store.commit(
            "acme",
            [Mutation("item.put", item_id, _item_payload()), Mutation("item.delete", new_id(), {})],
        )
    assert store.reader().execute("SELECT count(*) FROM items").fetchone()[0] == 0
    assert len(store.changes_since("replica-a", 0)) == 1


def test_unknown_kinds_and_tenants_are_refused(store):
    with pytest.raises(InvalidInputError):
        store.commit("acme", [Mutation("item.explode", new_id(), {})])
    with pytest.raises(UnknownTenantError):
        store.commit("nobody", [Mutation("item.put", new_id(), _item_payload())])


def test_one_tenant_cannot_touch_another_tenants_item(store):
    store.commit("other", [Mutation("tenant.put", "other", {"created_at": 1.0})])
    item_id = new_id()
    store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
    for kind, payload in (
        ("item.delete", {}),
        ("item.touch", {"last_used_at": 5.0}),
        ("counter.add", {"origin": "x", "uses": 1}),
    ):
        with pytest.raises(ItemNotFoundError):
            store.commit("other", [Mutation(kind, item_id, payload)])
    with pytest.raises(ItemNotFoundError):
        store.commit("other", [Mutation("item.put", item_id, _item_payload(title=b"hijack"))])
    row = (
        store.reader().execute("SELECT tenant, title, deleted FROM items WHERE id = ?", (item_id,)).fetchone()
    )
    assert row == ("acme", b"t", 0)


def test_counter_increments_are_logged_as_absolute_per_origin_values(store):
    item_id = new_id()
    store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
    for _ in range(3):
        store.commit(
            "acme", [Mutation("counter.add", item_id, {"origin": "replica-a", "uses": 1, "successes": 1})]
        )
    last = store.changes_since("replica-a", 0)[-1]
    assert last.kind == "counter.set"
    assert (last.payload["uses"], last.payload["successes"]) == (3, 3)


def test_remote_changes_apply_once_and_merge_counters_without_loss(tmp_path, store):
    """Two replicas increment the same item concurrently; exchanging logs in any order loses nothing."""
    other = Store(tmp_path / "other.sqlite3", replica_id="replica-b")
    try:
        item_id = new_id()
        store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
        other.apply_remote(store.changes_since("replica-a", 0))
        for _ in range(2):
            store.commit("acme", [Mutation("counter.add", item_id, {"origin": "replica-a", "uses": 1})])
        for _ in range(5):
            other.commit("acme", [Mutation("counter.add", item_id, {"origin": "replica-b", "uses": 1})])
        to_b = store.changes_since("replica-a", 0)
        to_a = other.changes_since("replica-b", 0)
        assert other.apply_remote(list(reversed(to_b))) == 2
        assert other.apply_remote(to_b) == 0  # resending is harmless
        store.apply_remote(to_a)
        totals = [
            s.reader()
            .execute("SELECT sum(uses) FROM item_counters WHERE item_id = ?", (item_id,))
            .fetchone()[0]
            for s in (store, other)
        ]
        assert totals == [7, 7]
        assert store.version_vector() == other.version_vector() == {"replica-a": 4, "replica-b": 5}
    finally:
        other.close()


def test_last_writer_wins_on_concurrent_item_updates(tmp_path, store):
    other = Store(tmp_path / "other.sqlite3", replica_id="replica-b")
    try:
        item_id = new_id()
        store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
        other.apply_remote(store.changes_since("replica-a", 0))
        store.commit("acme", [Mutation("item.put", item_id, _item_payload(title=b"from-a"))])
        other.commit("acme", [Mutation("item.put", item_id, _item_payload(title=b"from-b"))])
        other.apply_remote(store.changes_since("replica-a", 0))
        store.apply_remote(other.changes_since("replica-b", 0))
        titles = {
            s.reader().execute("SELECT title FROM items WHERE id = ?", (item_id,)).fetchone()[0]
            for s in (store, other)
        }
        assert len(titles) == 1  # both replicas converge on the same winner
    finally:
        other.close()


def test_change_records_round_trip_and_malformed_ones_are_refused(store):
    change = store.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 2.0})])[0]
    assert Change.decode(change.encode()) == change
    for garbage in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb(["r", 1, 1, "t", "nope", "e", {}])):
        with pytest.raises(InvalidInputError):
            Change.decode(garbage)


def test_database_from_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.sqlite3"
    Store(path).close()
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {CURRENT_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNewError):
        Store(path)


def test_replica_id_persists_across_reopen(tmp_path):
    first = Store(tmp_path / "db.sqlite3")
    replica = first.replica_id
    first.close()
    again = Store(tmp_path / "db.sqlite3")
    assert again.replica_id == replica
    again.close()


def test_acknowledged_writes_survive_kill_9(tmp_path):
    """A child process commits, reports each acknowledged id, and is killed mid-stream."""
    path = tmp_path / "crash.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, sys
        from rayflow.ids import new_id
        from rayflow.memory.store import Mutation, Store
        s = Store({str(path)!r}, replica_id="crashy")
        s.commit("acme", [Mutation("tenant.put", "acme", {{"created_at": 1.0}})])
        payload = {_item_payload()!r}
        for i in range(100000):
            item_id = new_id()
            s.commit("acme", [Mutation("item.put", item_id, payload)])
            sys.stdout.write(item_id + "\\n"); sys.stdout.flush()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 200:
            os.kill(proc.pid, 9)
            break
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    store = Store(path)
    present = {row[0] for row in store.reader().execute("SELECT id FROM items")}
    store.close()
    assert len(acked) >= 200
    assert set(acked) <= present


def test_database_files_are_owner_only(tmp_path):
    store = Store(tmp_path / "private.sqlite3")
    store.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 1.0})])
    try:
        for path in tmp_path.glob("private.sqlite3*"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        store.close()


def test_each_change_records_its_causal_context(tmp_path, store):
    """A change names what its origin had applied before it: its own earlier changes and the
    remote ones it had seen; a failed commit leaves the next change's context as it was."""
    other = Store(tmp_path / "other.sqlite3", replica_id="replica-b")
    try:
        item_id = new_id()
        put = store.commit("acme", [Mutation("item.put", item_id, _item_payload())])[0]
        assert put.context == {"replica-a": 1}  # after the fixture's tenant.put
        other.apply_remote(store.changes_since("replica-a", 0))
        with pytest.raises(ItemNotFoundError):
            other.commit("acme", [Mutation("item.delete", new_id(), {"reason": "gone"})])
        delete = other.commit("acme", [Mutation("item.delete", item_id, {"reason": "wrong"})])[0]
        assert (delete.seq, delete.context) == (1, {"replica-a": 2})
        assert other.changes_since("replica-b", 0)[0].context == {"replica-a": 2}
        assert Change.decode(delete.encode()) == delete
    finally:
        other.close()


def test_a_peer_gets_what_it_lacks_in_causal_order_even_from_a_third_replica(tmp_path, store):
    """C learns A's item and B's delete of it from B alone: `changes_after` gives them in an order
    C can apply (the delete after the put it depends on), and only what C's vector lacks."""
    b = Store(tmp_path / "b.sqlite3", replica_id="replica-b")
    c = Store(tmp_path / "c.sqlite3", replica_id="replica-c")
    try:
        item_id = new_id()
        store.commit("acme", [Mutation("item.put", item_id, _item_payload())])
        b.apply_remote(store.changes_since("replica-a", 0))
        b.commit("acme", [Mutation("item.delete", item_id, {"reason": "wrong"})])
        missing = b.changes_after(c.version_vector())
        assert [(ch.replica_id, ch.seq) for ch in missing] == [("replica-a", 1), ("replica-a", 2), ("replica-b", 1)]
        assert c.apply_remote(missing) == 3
        deleted = c.reader().execute("SELECT deleted FROM items WHERE id = ?", (item_id,)).fetchone()[0]
        assert deleted == 1 and c.version_vector() == b.version_vector()
        assert b.changes_after(c.version_vector()) == []
        assert b.changes_after({"replica-a": 2}) == b.changes_since("replica-b", 0)
        assert len(b.changes_after({}, limit=2)) == 2
    finally:
        b.close()
        c.close()


def test_changes_logged_before_contexts_existed_depend_on_their_origin_only(tmp_path):
    """A bank written by the first schema: its changes get the context a reader may assume."""
    from rayflow.memory.schema import MIGRATIONS, migrate

    path = tmp_path / "old.sqlite3"
    conn = apsw.Connection(str(path))
    migrate(conn, MIGRATIONS[:1])
    for seq in (1, 2):
        conn.execute(
            "INSERT INTO changes(replica_id, seq, hlc, tenant, kind, entity_id, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("old", seq, seq, "acme", "tenant.put", "acme", msgpack.packb({"created_at": 1.0})),
        )
    conn.close()
    reopened = Store(path, replica_id="old")
    try:
        assert [c.context for c in reopened.changes_since("old", 0)] == [{}, {"old": 1}]
        assert reopened.commit("acme", [Mutation("tenant.put", "acme", {"created_at": 2.0})])[0].context == {"old": 2}
    finally:
        reopened.close()
