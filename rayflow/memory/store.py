"""SQLite storage of the ReasoningBank, with the single path every mutation goes through.

:meth:`Store.commit` is the only way anything changes: it appends one change record per mutation
(replica id, per-replica sequence number, hybrid logical timestamp, the change itself) and applies
the mutation, in one SQLite transaction. A later replication layer ships those records to peers,
which hand them to :meth:`Store.apply_remote`; both paths run the same apply functions, so a
replica's state is always "the fold of its change log".

Every apply function is idempotent and commutes with the others where replicas may race, so two
replicas that applied the same changes (each in a causal order: a change after everything its
``context`` names) hold the same state, which :meth:`Store.state_digest` shows:

* ``item.put`` is last-writer-wins on (hybrid logical timestamp, replica id), field by field the
  winning edit's, except ``last_used_at``, which only grows; edits made concurrently (neither's
  causal context covers the other) are all kept as siblings (:meth:`Store.item_versions`) until
  an edit that has seen them all replaces them.
* ``item.delete`` wins over a concurrent edit: a deleted item stays deleted, and its fields still
  follow the winning edit; concurrent deletes keep the first reason in sort order.
* ``counter.set`` takes the per-origin maximum (a grow-only counter per origin).
* ``item.touch`` keeps the latest ``last_used_at``.
* links, trajectories, tenants and consolidation runs are insert-once.
* ``auth.key`` (a replica's token signing public key) and ``auth.revoke`` (a revoked token id)
  are insert-once too; they belong to the whole federation (scope ``*``), not to a tenant.

Durability: WAL mode; ``durability="full"`` makes every commit fsync before it returns, so an
acknowledged write survives a crash of the process and of the machine; ``"normal"`` survives a
crash of the process only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import msgpack

from rayflow.errors import InvalidInputError, ItemNotFoundError, StorageError, UnknownTenantError
from rayflow.hlc import HLCTimestamp, HybridLogicalClock
from rayflow.ids import new_id
from rayflow.memory.schema import migrate

log = logging.getLogger(__name__)

#: Change kinds, i.e. the complete vocabulary of the change log.
CHANGE_KINDS = (
    "tenant.put",
    "item.put",
    "item.delete",
    "item.touch",
    "counter.set",
    "link.put",
    "trajectory.put",
    "consolidation.put",
    "auth.key",
    "auth.revoke",
)
#: The scope (in a change's tenant field) of changes that belong to the whole federation, not
#: to one tenant: token signing keys and revocations. Not a valid tenant name.
FEDERATION_SCOPE = "*"
#: Kinds whose changes are federation-wide (they need no tenant).
FEDERATION_KINDS = ("auth.key", "auth.revoke")
#: Local-only request kinds, turned into a logged change inside the write transaction.
#: ``counter.add`` increments this replica's counters: the log records the resulting absolute
#: per-origin values (``counter.set``) so that applying it anywhere, any number of times, agrees.
REQUEST_KINDS = (*CHANGE_KINDS, "counter.add")


@dataclass(frozen=True)
class Mutation:
    """One requested change, before it has a sequence number and timestamp."""

    kind: str
    entity_id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """One audited operation: who did what to which tenant and namespace, and how it ended."""

    at: float
    actor: str
    tenant: str
    op: str
    namespace: str
    outcome: str
    latency_ms: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Change:
    """One applied mutation as recorded in the change log (the unit of replication).

    ``context`` is the causal context: the version vector of the origin replica just before the
    change was committed (so ``context[replica_id] == seq - 1``, the entry left out when zero).
    A receiver applies a change only after everything its context names, which keeps the apply
    functions that need an earlier change (a delete after its put, a link after both ends) safe
    when the change arrives from a third replica first.
    """

    replica_id: str
    seq: int
    hlc: int
    tenant: str
    kind: str
    entity_id: str
    payload: dict[str, Any]
    context: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        """msgpack form, for a wire."""
        return msgpack.packb(
            [
                self.replica_id,
                self.seq,
                self.hlc,
                self.tenant,
                self.kind,
                self.entity_id,
                self.payload,
                self.context,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Change:
        try:
            fields = msgpack.unpackb(data, raw=False)
            if not isinstance(fields, list) or len(fields) not in (7, 8):
                raise InvalidInputError("a change record is a list of 7 or 8 fields")
            replica_id, seq, hlc, tenant, kind, entity_id, payload = fields[:7]
            context = fields[7] if len(fields) == 8 else {}
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise InvalidInputError(f"malformed change record: {exc}") from exc
        if kind not in CHANGE_KINDS or not isinstance(payload, dict):
            raise InvalidInputError(f"malformed change record of kind {kind!r}")
        if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in context.items()
        ):
            raise InvalidInputError("malformed causal context of a change record")
        return cls(str(replica_id), int(seq), int(hlc), str(tenant), kind, str(entity_id), payload, context)


class Store:
    """The ReasoningBank's SQLite database: connections, migrations, the change log."""

    def __init__(
        self,
        path: Path | str,
        *,
        replica_id: str = "",
        durability: str = "full",
        wall_ms: Callable[[], int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # SQLite gives its -wal and -shm files the database file's mode: create it owner-only.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._all_connections: list[apsw.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer = self._connect()
        migrate(self._writer)
        self.replica_id = self._load_replica_id(replica_id)
        (last_hlc,) = self._writer.execute("SELECT coalesce(max(hlc), 0) FROM changes").fetchone()
        self.clock = HybridLogicalClock(wall_ms, last=last_hlc)
        #: What this replica has applied, per origin (kept with the log, under the write lock):
        #: the causal context of the next local change.
        self._applied: dict[str, int] = {
            replica: seq
            for replica, seq in self._writer.execute(
                "SELECT replica_id, max(seq) FROM changes GROUP BY replica_id"
            )
        }
        #: Called after every commit or remote apply that changed the log (see :meth:`add_listener`).
        self._listeners: list[Callable[[Sequence[Change]], None]] = []
        self._closed = False

    # --- connections ------------------------------------------------------------------------
    def _connect(self) -> apsw.Connection:
        try:
            conn = apsw.Connection(str(self.path))
        except apsw.Error as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc
        conn.setbusytimeout(10_000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._connections_lock:
            self._all_connections.append(conn)
        return conn

    def reader(self) -> apsw.Connection:
        """This thread's read connection (WAL lets readers run beside the writer)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextmanager
    def snapshot(self) -> Iterator[apsw.Connection]:
        """A read transaction: every query inside sees one consistent state."""
        conn = self.reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._connections_lock:
            for conn in self._all_connections:
                conn.close()
            self._all_connections.clear()

    # --- identity ---------------------------------------------------------------------------
    def _load_replica_id(self, wanted: str) -> str:
        row = self._writer.execute("SELECT value FROM meta WHERE key='replica_id'").fetchone()
        if row is not None and (not wanted or wanted == row[0]):
            return row[0]
        replica_id = wanted or f"r{new_id().lower()}"
        with self._writer:
            self._writer.execute(
                "INSERT INTO meta(key, value) VALUES('replica_id', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (replica_id,),
            )
        return replica_id

    def add_listener(self, listener: Callable[[Sequence[Change]], None]) -> None:
        """Call ``listener(changes)`` after each transaction that logged changes (local or remote),
        on the committing thread, once they are durable. Replication pushes new changes to peers
        this way; a listener must be quick and must not raise (an error is logged and dropped)."""
        self._listeners.append(listener)

    def _notify(self, changes: Sequence[Change]) -> None:
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # one observer must not fail the commit it observes
                log.exception("a change listener failed")

    # --- the one mutation path --------------------------------------------------------------
    def commit(self, tenant: str, mutations: Sequence[Mutation]) -> list[Change]:
        """Record and apply ``mutations`` for ``tenant`` atomically; returns their change records.

        Either every mutation is applied and logged, or (on any error) none is.
        """
        if not mutations:
            return []
        for mutation in mutations:
            if mutation.kind not in REQUEST_KINDS:
                raise InvalidInputError(f"unknown change kind {mutation.kind!r}")
            if (mutation.kind in FEDERATION_KINDS) != (tenant == FEDERATION_SCOPE):
                raise InvalidInputError(f"{mutation.kind!r} changes belong to the scope {FEDERATION_SCOPE!r} only")
        with self._write_lock:
            applied = dict(self._applied)
            with self._write_transaction() as conn:
                if mutations[0].kind != "tenant.put" and tenant != FEDERATION_SCOPE:
                    _require_tenant(conn, tenant)
                (seq,) = conn.execute(
                    "SELECT coalesce(max(seq), 0) FROM changes WHERE replica_id = ?", (self.replica_id,)
                ).fetchone()
                changes = []
                for mutation in mutations:
                    if mutation.kind == "counter.add":
                        mutation = _counter_increment_to_set(conn, tenant, mutation)
                    seq += 1
                    change = Change(
                        self.replica_id,
                        seq,
                        self.clock.now().pack(),
                        tenant,
                        mutation.kind,
                        mutation.entity_id,
                        mutation.payload,
                        {replica: n for replica, n in applied.items() if n},
                    )
                    _append_change(conn, change)
                    _APPLY[change.kind](conn, change)
                    applied[self.replica_id] = seq
                    changes.append(change)
            self._applied = applied  # only once the transaction committed
        self._notify(changes)
        return changes

    def apply_remote(self, changes: Sequence[Change]) -> int:
        """Apply change records received from other replicas; returns how many were new.

        Records already present (same replica id and sequence number) are skipped, so a peer may
        resend freely.
        """
        applied = 0
        new: list[Change] = []
        with self._write_lock:
            vector = dict(self._applied)
            with self._write_transaction() as conn:
                for change in changes:
                    if change.replica_id == self.replica_id:
                        continue
                    seen = conn.execute(
                        "SELECT 1 FROM changes WHERE replica_id = ? AND seq = ?",
                        (change.replica_id, change.seq),
                    ).fetchone()
                    if seen:
                        continue
                    if (change.kind in FEDERATION_KINDS) != (change.tenant == FEDERATION_SCOPE):
                        raise InvalidInputError(f"a {change.kind!r} change in the wrong scope", scope=change.tenant)
                    self.clock.observe(HLCTimestamp.unpack(change.hlc))
                    if change.kind != "tenant.put" and change.tenant != FEDERATION_SCOPE:
                        _require_tenant(conn, change.tenant)
                    _append_change(conn, change)
                    _APPLY[change.kind](conn, change)
                    vector[change.replica_id] = max(vector.get(change.replica_id, 0), change.seq)
                    new.append(change)
                    applied += 1
            self._applied = vector
        if new:
            self._notify(new)
        return applied

    def get_meta(self, key: str) -> str | None:
        """A value of the database's own settings table (embedder, replica id, ...)."""
        row = self.reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta_if_absent(self, key: str, value: str) -> str:
        """Set a settings value unless one exists; returns the value now stored."""
        with self._write_lock, self._write_transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def changes_since(self, replica_id: str, after_seq: int, limit: int = 1000) -> list[Change]:
        """Change records of ``replica_id`` with sequence numbers above ``after_seq``, in order."""
        rows = self.reader().execute(
            f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE replica_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (replica_id, after_seq, limit),
        )
        return [_change_of_row(row) for row in rows]

    def changes_after(self, vector: dict[str, int], limit: int = 1000) -> list[Change]:
        """Up to ``limit`` change records that ``vector`` (a peer's version vector) lacks, in an
        order that respects causality: hybrid logical time, which every replica advances past
        what it observed, so a change always comes after everything it depended on."""
        with self.snapshot() as conn:
            starts = []
            for replica, held in conn.execute("SELECT replica_id, max(seq) FROM changes GROUP BY replica_id"):
                if held > vector.get(replica, 0):
                    row = conn.execute(
                        "SELECT hlc FROM changes WHERE replica_id = ? AND seq = ?",
                        (replica, vector.get(replica, 0) + 1),
                    ).fetchone()
                    # A replica's log may start above 1 (restored from a snapshot): start at its first.
                    starts.append(row[0] if row is not None else 0)
            if not starts:
                return []
            out: list[Change] = []
            rows = conn.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE hlc >= ? ORDER BY hlc", (min(starts),)
            )
            for row in rows:
                if row[1] > vector.get(row[0], 0):
                    out.append(_change_of_row(row))
                    if len(out) >= limit:
                        break
            return out

    def state_digest(self) -> str:
        """SHA-256 over every replicated row (tenants, items, embeddings, counters, links,
        trajectories, consolidation runs), in a fixed order and leaving out what is local (row
        ids, index positions, the audit log, the change log itself): equal on two replicas exactly
        when they hold the same state, whatever order their changes arrived in."""
        digest = hashlib.sha256()
        with self.snapshot() as conn:
            for query in _DIGEST_QUERIES:
                digest.update(query.encode())
                for row in conn.execute(query):
                    digest.update(msgpack.packb(list(row), use_bin_type=True))
        return digest.hexdigest()

    def item_versions(self, item_id: str) -> list[dict[str, Any]]:
        """The item's current versions, newest first: one when its edits are ordered, several
        (siblings) when edits were made concurrently and no later edit has reconciled them yet.
        Each is ``{"replica", "seq", "hlc", "fields"}`` (the fields as the edit wrote them; text
        fields sealed as stored); the first is the one the item's row shows."""
        rows = self.reader().execute(
            "SELECT replica, seq, hlc, payload FROM item_versions WHERE item_id = ? ORDER BY hlc DESC, replica DESC",
            (item_id,),
        )
        return [
            {"replica": replica, "seq": seq, "hlc": hlc, "fields": msgpack.unpackb(payload, raw=False)}
            for replica, seq, hlc, payload in rows
        ]

    def version_vector(self) -> dict[str, int]:
        """Highest sequence number held per replica: what this replica has seen."""
        rows = self.reader().execute("SELECT replica_id, max(seq) FROM changes GROUP BY replica_id")
        return {replica: seq for replica, seq in rows}

    # --- local, non-replicated log ----------------------------------------------------------
    def audit(self, records: Sequence[AuditRecord]) -> None:
        """Append audit records in one transaction (local to this replica: evidence, not state)."""
        if not records:
            return
        with self._write_lock, self._write_transaction() as conn:
            conn.executemany(
                "INSERT INTO audit(at, actor, tenant, op, namespace, outcome, latency_ms, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.at, r.actor, r.tenant, r.op, r.namespace, r.outcome, r.latency_ms, r.detail)
                    for r in records
                ],
            )

    def audit_records(
        self, *, tenant: str | None = None, since: float = 0.0, limit: int = 100
    ) -> list[AuditRecord]:
        """Newest audit records first, optionally of one tenant."""
        sql = "SELECT at, actor, tenant, op, namespace, outcome, latency_ms, detail FROM audit WHERE at >= ?"
        params: list[Any] = [since]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [AuditRecord(*row) for row in self.reader().execute(sql, params)]

    @contextmanager
    def _write_transaction(self) -> Iterator[apsw.Connection]:
        conn = self._writer
        # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")


# --- apply functions (shared by local commits and remote changes) ------------------------------
_CHANGE_COLUMNS = "replica_id, seq, hlc, tenant, kind, entity_id, payload, context"

#: The replicated state, row by row in a fixed order (see :meth:`Store.state_digest`).
_DIGEST_QUERIES = (
    "SELECT name, created_at FROM tenants ORDER BY name",
    (
        "SELECT id, tenant, namespace, title, description, content, tags, domain, outcome, prior_confidence, "
        "created_at, last_used_at, source_task, source_agent, embedding_model, dim, deleted, deleted_reason, "
        "updated_hlc, updated_by FROM items ORDER BY id"
    ),
    "SELECT i.id, e.model, e.dim, e.vector FROM embeddings e JOIN items i ON i.rowid = e.item_rowid ORDER BY i.id",
    "SELECT item_id, origin, uses, successes, failures FROM item_counters ORDER BY item_id, origin",
    "SELECT src_id, dst_id, kind, tenant, created_at, note FROM links ORDER BY src_id, dst_id, kind",
    "SELECT * FROM trajectories ORDER BY id",
    "SELECT * FROM consolidation_runs ORDER BY id",
    "SELECT item_id, replica, seq, hlc, payload FROM item_versions ORDER BY item_id, replica, seq",
    "SELECT kid, replica, public_key, created_at FROM federation_keys ORDER BY kid",
    "SELECT jti, expires_at, reason FROM federation_revocations ORDER BY jti",
)


def _change_of_row(row: Sequence[Any]) -> Change:
    replica, seq, hlc, tenant, kind, entity_id, payload, context = row
    # A change logged before contexts were recorded depends on its origin's earlier changes only.
    known = (
        msgpack.unpackb(context, raw=False)
        if context is not None
        else ({replica: seq - 1} if seq > 1 else {})
    )
    return Change(replica, seq, hlc, tenant, kind, entity_id, msgpack.unpackb(payload, raw=False), known)


def _append_change(conn: apsw.Connection, change: Change) -> None:
    conn.execute(
        "INSERT INTO changes(replica_id, seq, hlc, tenant, kind, entity_id, payload, context) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.replica_id,
            change.seq,
            change.hlc,
            change.tenant,
            change.kind,
            change.entity_id,
            msgpack.packb(change.payload, use_bin_type=True),
            msgpack.packb(change.context, use_bin_type=True),
        ),
    )


def _require_tenant(conn: apsw.Connection, tenant: str) -> None:
    if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
        raise UnknownTenantError(f"unknown tenant {tenant!r}", tenant=tenant)


def _next_index_seq(conn: apsw.Connection) -> int:
    (seq,) = conn.execute("SELECT coalesce(max(index_seq), 0) + 1 FROM items").fetchone()
    return seq


def _owned_item(conn: apsw.Connection, item_id: str, tenant: str) -> tuple[int, int] | None:
    """(rowid, deleted) of the item if it exists *for this tenant*; other tenants' ids are invisible."""
    row = conn.execute(
        "SELECT rowid, deleted FROM items WHERE id = ? AND tenant = ?", (item_id, tenant)
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _apply_tenant_put(conn: apsw.Connection, change: Change) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO tenants(name, created_at) VALUES (?, ?)",
        (change.tenant, change.payload["created_at"]),
    )


_ITEM_COLUMNS = (
    "namespace",
    "title",
    "description",
    "content",
    "tags",
    "domain",
    "outcome",
    "prior_confidence",
    "created_at",
    "last_used_at",
    "source_task",
    "source_agent",
    "embedding_model",
    "dim",
)


def _record_version(conn: apsw.Connection, change: Change) -> None:
    """Keep an item's frontier of edits: those that no other applied edit of it follows.

    An edit follows another when its causal context covers it (the editor had applied it). A new
    edit removes the versions it follows; two edits made without seeing each other both stay, as
    siblings a reader can see, until an edit made after both (the next write anywhere that has
    seen them) replaces them. The frontier is a function of which edits a replica applied, not of
    their order, so replicas agree on it; it holds at most one version per replica.
    """
    rows = conn.execute(
        "SELECT replica, seq, context FROM item_versions WHERE item_id = ?", (change.entity_id,)
    ).fetchall()
    for _replica, _seq, context in rows:
        if msgpack.unpackb(context, raw=False).get(change.replica_id, 0) >= change.seq:
            return  # an applied edit already follows this one
    for replica, seq, _context in rows:
        if change.context.get(replica, 0) >= seq:
            conn.execute(
                "DELETE FROM item_versions WHERE item_id = ? AND replica = ? AND seq = ?",
                (change.entity_id, replica, seq),
            )
    fields = {key: value for key, value in change.payload.items() if key != "vector"}
    conn.execute(
        "INSERT OR IGNORE INTO item_versions(item_id, replica, seq, hlc, context, payload) VALUES (?, ?, ?, ?, ?, ?)",
        (
            change.entity_id,
            change.replica_id,
            change.seq,
            change.hlc,
            msgpack.packb(change.context, use_bin_type=True),
            msgpack.packb(fields, use_bin_type=True),
        ),
    )


def _apply_item_put(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    existing = conn.execute(
        "SELECT rowid, tenant, deleted, updated_hlc, updated_by FROM items WHERE id = ?", (change.entity_id,)
    ).fetchone()
    values = [p[c] for c in _ITEM_COLUMNS]
    if existing is None or existing[1] == change.tenant:
        _record_version(conn, change)
    if existing is None:
        conn.execute(
            f"INSERT INTO items(id, tenant, {', '.join(_ITEM_COLUMNS)}, updated_hlc, updated_by, index_seq) "
            f"VALUES (?, ?, {', '.join('?' * len(_ITEM_COLUMNS))}, ?, ?, ?)",
            (change.entity_id, change.tenant, *values, change.hlc, change.replica_id, _next_index_seq(conn)),
        )
        rowid = conn.last_insert_rowid()
    else:
        rowid, owner, _deleted, updated_hlc, updated_by = existing
        if owner != change.tenant:
            raise ItemNotFoundError(f"no item {change.entity_id} for tenant {change.tenant!r}")
        # Ties in hybrid time are broken by replica id, so every replica picks the same winner.
        # A deleted item stays deleted (a delete wins over a concurrent edit), but its fields still
        # follow the winning edit, so replicas that saw the edit and the delete in either order
        # hold the same tombstone.
        if (updated_hlc, updated_by) >= (change.hlc, change.replica_id):
            return
        # Every field follows the winning edit except ``last_used_at``, which only grows (uses
        # are ``item.touch`` changes, and an edit must not undo a use it did not see).
        assignments = ", ".join(
            "last_used_at = CASE WHEN ? IS NULL THEN last_used_at ELSE max(coalesce(last_used_at, 0), ?) END"
            if c == "last_used_at"
            else f"{c} = ?"
            for c in _ITEM_COLUMNS
        )
        bound = [value for c, v in zip(_ITEM_COLUMNS, values) for value in ((v, v) if c == "last_used_at" else (v,))]
        conn.execute(
            f"UPDATE items SET {assignments}, updated_hlc = ?, updated_by = ?, index_seq = ? WHERE rowid = ?",
            (*bound, change.hlc, change.replica_id, _next_index_seq(conn), rowid),
        )
    conn.execute(
        "INSERT INTO embeddings(item_rowid, model, dim, vector) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(item_rowid) DO UPDATE SET model=excluded.model, dim=excluded.dim, "
        "vector=excluded.vector",
        (rowid, p["embedding_model"], p["dim"], p["vector"]),
    )


def _apply_item_delete(conn: apsw.Connection, change: Change) -> None:
    owned = _owned_item(conn, change.entity_id, change.tenant)
    if owned is None:
        raise ItemNotFoundError(f"no item {change.entity_id} for tenant {change.tenant!r}")
    rowid, deleted = owned
    reason = str(change.payload.get("reason", ""))
    if deleted:
        # Deletes made concurrently on two replicas: every replica keeps the same reason (the
        # first in sort order, a choice that does not depend on arrival order).
        conn.execute(
            "UPDATE items SET deleted_reason = ? WHERE rowid = ? AND deleted_reason > ?",
            (reason, rowid, reason),
        )
        return
    conn.execute(
        "UPDATE items SET deleted = 1, deleted_reason = ?, index_seq = ? WHERE rowid = ?",
        (reason, _next_index_seq(conn), rowid),
    )


def _apply_item_touch(conn: apsw.Connection, change: Change) -> None:
    owned = _owned_item(conn, change.entity_id, change.tenant)
    if owned is None:
        raise ItemNotFoundError(f"no item {change.entity_id} for tenant {change.tenant!r}")
    conn.execute(
        "UPDATE items SET last_used_at = max(coalesce(last_used_at, 0), ?), index_seq = ? WHERE rowid = ?",
        (change.payload["last_used_at"], _next_index_seq(conn), owned[0]),
    )


def _counter_increment_to_set(conn: apsw.Connection, tenant: str, mutation: Mutation) -> Mutation:
    if _owned_item(conn, mutation.entity_id, tenant) is None:
        raise ItemNotFoundError(f"no item {mutation.entity_id} for tenant {tenant!r}")
    p = mutation.payload
    row = conn.execute(
        "SELECT uses, successes, failures FROM item_counters WHERE item_id = ? AND origin = ?",
        (mutation.entity_id, p["origin"]),
    ).fetchone() or (0, 0, 0)
    return Mutation(
        "counter.set",
        mutation.entity_id,
        {
            "origin": p["origin"],
            "uses": row[0] + p.get("uses", 0),
            "successes": row[1] + p.get("successes", 0),
            "failures": row[2] + p.get("failures", 0),
        },
    )


def _apply_counter_set(conn: apsw.Connection, change: Change) -> None:
    owned = _owned_item(conn, change.entity_id, change.tenant)
    if owned is None:
        raise ItemNotFoundError(f"no item {change.entity_id} for tenant {change.tenant!r}")
    # Reliability feeds ranking, which reads in-memory attributes: they must see this change.
    conn.execute("UPDATE items SET index_seq = ? WHERE rowid = ?", (_next_index_seq(conn), owned[0]))
    p = change.payload
    conn.execute(
        "INSERT INTO item_counters(item_id, origin, uses, successes, failures) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(item_id, origin) DO UPDATE SET uses = max(uses, excluded.uses), "
        "successes = max(successes, excluded.successes), failures = max(failures, excluded.failures)",
        (change.entity_id, p["origin"], p["uses"], p["successes"], p["failures"]),
    )


def _apply_link_put(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    for end in (p["src_id"], p["dst_id"]):
        if _owned_item(conn, end, change.tenant) is None:
            raise ItemNotFoundError(f"no item {end} for tenant {change.tenant!r}")
    conn.execute(
        "INSERT OR IGNORE INTO links(src_id, dst_id, kind, tenant, created_at, note) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (p["src_id"], p["dst_id"], p["kind"], change.tenant, p["created_at"], p.get("note", "")),
    )


def _apply_trajectory_put(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    conn.execute(
        "INSERT OR IGNORE INTO trajectories(id, tenant, namespace, task_id, agent_id, domain, body, "
        "exit_code, tests_passed, tests_failed, reward, verdict_outcome, verdict_confidence, "
        "verdict_reason, judge, used_item_ids, distilled_item_ids, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.entity_id,
            change.tenant,
            p["namespace"],
            p["task_id"],
            p["agent_id"],
            p["domain"],
            p["body"],
            p["exit_code"],
            p["tests_passed"],
            p["tests_failed"],
            p["reward"],
            p["verdict_outcome"],
            p["verdict_confidence"],
            p["verdict_reason"],
            p["judge"],
            p["used_item_ids"],
            p["distilled_item_ids"],
            p["created_at"],
        ),
    )


def _apply_consolidation_put(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    conn.execute(
        "INSERT OR IGNORE INTO consolidation_runs(id, tenant, started_at, finished_at, examined, merged, "
        "contradictions, pruned, params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.entity_id,
            change.tenant,
            p["started_at"],
            p["finished_at"],
            p["examined"],
            p["merged"],
            p["contradictions"],
            p["pruned"],
            p["params"],
        ),
    )


def _apply_auth_key(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    key = p.get("public_key")
    if not isinstance(key, bytes) or len(key) != 32:
        raise InvalidInputError("an auth.key change carries a 32-byte Ed25519 public key", kid=change.entity_id)
    conn.execute(
        "INSERT OR IGNORE INTO federation_keys(kid, replica, public_key, created_at) VALUES (?, ?, ?, ?)",
        (change.entity_id, change.replica_id, key, float(p.get("created_at", 0.0))),
    )


def _apply_auth_revoke(conn: apsw.Connection, change: Change) -> None:
    p = change.payload
    conn.execute(
        "INSERT OR IGNORE INTO federation_revocations(jti, expires_at, reason) VALUES (?, ?, ?)",
        (change.entity_id, float(p.get("expires_at", 0.0)), str(p.get("reason", ""))[:500]),
    )


_APPLY: dict[str, Callable[[apsw.Connection, Change], None]] = {
    "tenant.put": _apply_tenant_put,
    "item.put": _apply_item_put,
    "item.delete": _apply_item_delete,
    "item.touch": _apply_item_touch,
    "counter.set": _apply_counter_set,
    "link.put": _apply_link_put,
    "trajectory.put": _apply_trajectory_put,
    "consolidation.put": _apply_consolidation_put,
    "auth.key": _apply_auth_key,
    "auth.revoke": _apply_auth_revoke,
}
assert set(_APPLY) == set(CHANGE_KINDS)


def default_database_path(state_dir: Path) -> Path:
    """Where the bank's database lives under a state directory."""
    return Path(os.fspath(state_dir)) / "memory" / "bank.sqlite3"
