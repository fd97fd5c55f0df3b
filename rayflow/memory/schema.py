"""The ReasoningBank's SQLite schema, as an explicit list of versioned migrations.

``PRAGMA user_version`` holds the version a database is at. Opening a database runs every
migration above it, each in its own transaction; a database from a *newer* rayflow is refused
with :class:`~rayflow.errors.SchemaTooNewError` rather than read with the wrong assumptions.

Layout notes (why, not what):

* ``items.rowid`` is a local integer used only as the HNSW label on this replica; the global
  identity of an item is ``items.id`` (see :mod:`rayflow.ids`), which is what change records and
  links use, so rows can move between replicas.
* Text fields are AES-GCM ciphertext (BLOB); tags, domain, namespace and outcome stay plain
  because retrieval filters on them; embeddings stay plain because the index needs them.
* ``item_counters`` keeps uses/successes/failures per origin (a replica id, or a merged duplicate)
  so that replicas can merge concurrent increments by taking the per-origin maximum: a
  grow-only counter per origin, summed for the total.
* ``changes`` is the replication log: every mutation appends one row in the same transaction that
  applies it. ``(replica_id, seq)`` is unique, which also makes re-applying a received change a
  no-op.
* ``index_seq`` increases locally whenever a row changes in a way that state derived in memory
  (the vector index, the ranking attributes) must see: an insert, an update, a delete, a use or
  an outcome. The index file records how far it has caught up and replays only what is newer.
"""

from __future__ import annotations

from dataclasses import dataclass

import apsw

from rayflow.errors import SchemaTooNewError


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial ReasoningBank schema",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) STRICT;

        CREATE TABLE tenants (
            name       TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        ) STRICT;

        CREATE TABLE items (
            rowid            INTEGER PRIMARY KEY,
            id               TEXT NOT NULL UNIQUE,
            tenant           TEXT NOT NULL REFERENCES tenants(name),
            namespace        TEXT NOT NULL,
            title            BLOB NOT NULL,
            description      BLOB NOT NULL,
            content          BLOB NOT NULL,
            tags             TEXT NOT NULL DEFAULT '[]',
            domain           TEXT NOT NULL DEFAULT '',
            outcome          TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
            prior_confidence REAL NOT NULL CHECK (prior_confidence BETWEEN 0 AND 1),
            created_at       REAL NOT NULL,
            last_used_at     REAL,
            source_task      TEXT NOT NULL DEFAULT '',
            source_agent     TEXT NOT NULL DEFAULT '',
            embedding_model  TEXT NOT NULL,
            dim              INTEGER NOT NULL,
            deleted          INTEGER NOT NULL DEFAULT 0,
            deleted_reason   TEXT NOT NULL DEFAULT '',
            updated_hlc      INTEGER NOT NULL,
            updated_by       TEXT NOT NULL,
            index_seq        INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX items_by_tenant_namespace ON items(tenant, namespace);
        CREATE INDEX items_by_tenant_index_seq ON items(tenant, index_seq);
        CREATE INDEX items_by_index_seq ON items(index_seq);

        CREATE TABLE embeddings (
            item_rowid INTEGER PRIMARY KEY REFERENCES items(rowid),
            model      TEXT NOT NULL,
            dim        INTEGER NOT NULL,
            vector     BLOB NOT NULL
        ) STRICT;

        CREATE TABLE item_counters (
            item_id   TEXT NOT NULL,
            origin    TEXT NOT NULL,
            uses      INTEGER NOT NULL DEFAULT 0,
            successes INTEGER NOT NULL DEFAULT 0,
            failures  INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (item_id, origin)
        ) STRICT, WITHOUT ROWID;

        CREATE TABLE links (
            src_id     TEXT NOT NULL,
            dst_id     TEXT NOT NULL,
            kind       TEXT NOT NULL CHECK (kind IN ('duplicate_of', 'contradicts', 'refines')),
            tenant     TEXT NOT NULL,
            created_at REAL NOT NULL,
            note       TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (src_id, dst_id, kind)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX links_by_dst ON links(dst_id);

        CREATE TABLE trajectories (
            id                 TEXT PRIMARY KEY,
            tenant             TEXT NOT NULL REFERENCES tenants(name),
            namespace          TEXT NOT NULL,
            task_id            TEXT NOT NULL,
            agent_id           TEXT NOT NULL DEFAULT '',
            domain             TEXT NOT NULL DEFAULT '',
            body               BLOB NOT NULL,
            exit_code          INTEGER,
            tests_passed       INTEGER,
            tests_failed       INTEGER,
            reward             REAL,
            verdict_outcome    TEXT NOT NULL CHECK (verdict_outcome IN ('success', 'failure')),
            verdict_confidence REAL NOT NULL,
            verdict_reason     TEXT NOT NULL,
            judge              TEXT NOT NULL,
            used_item_ids      TEXT NOT NULL DEFAULT '[]',
            distilled_item_ids TEXT NOT NULL DEFAULT '[]',
            created_at         REAL NOT NULL
        ) STRICT;
        CREATE INDEX trajectories_by_tenant_task ON trajectories(tenant, task_id);

        CREATE TABLE consolidation_runs (
            id             TEXT PRIMARY KEY,
            tenant         TEXT NOT NULL,
            started_at     REAL NOT NULL,
            finished_at    REAL NOT NULL,
            examined       INTEGER NOT NULL,
            merged         INTEGER NOT NULL,
            contradictions INTEGER NOT NULL,
            pruned         INTEGER NOT NULL,
            params         TEXT NOT NULL
        ) STRICT;

        CREATE TABLE audit (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            at         REAL NOT NULL,
            actor      TEXT NOT NULL,
            tenant     TEXT NOT NULL,
            op         TEXT NOT NULL,
            namespace  TEXT NOT NULL DEFAULT '',
            outcome    TEXT NOT NULL,
            latency_ms REAL,
            detail     TEXT NOT NULL DEFAULT ''
        ) STRICT;
        CREATE INDEX audit_by_tenant_time ON audit(tenant, at);

        CREATE TABLE changes (
            replica_id TEXT NOT NULL,
            seq        INTEGER NOT NULL,
            hlc        INTEGER NOT NULL,
            tenant     TEXT NOT NULL,
            kind       TEXT NOT NULL,
            entity_id  TEXT NOT NULL,
            payload    BLOB NOT NULL,
            PRIMARY KEY (replica_id, seq)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX changes_by_hlc ON changes(hlc);
        """,
    ),
    Migration(
        2,
        "the causal context of each change (its origin's version vector when it was committed)",
        # NULL for changes logged before replication existed: they depend only on their origin's
        # earlier changes, which is what a reader assumes for a NULL context.
        "ALTER TABLE changes ADD COLUMN context BLOB;",
    ),
    Migration(
        3,
        "federation-wide trust: the token signing keys of every replica, and revoked token ids",
        """
        CREATE TABLE federation_keys (
            kid        TEXT PRIMARY KEY,
            replica    TEXT NOT NULL,
            public_key BLOB NOT NULL,
            created_at REAL NOT NULL
        ) STRICT;

        CREATE TABLE federation_revocations (
            jti        TEXT PRIMARY KEY,
            expires_at REAL NOT NULL,
            reason     TEXT NOT NULL DEFAULT ''
        ) STRICT;
        """,
    ),
    Migration(
        4,
        "each item's concurrent edits (siblings): the edits no other applied edit of it follows",
        """
        CREATE TABLE item_versions (
            item_id TEXT NOT NULL,
            replica TEXT NOT NULL,
            seq     INTEGER NOT NULL,
            hlc     INTEGER NOT NULL,
            context BLOB NOT NULL,
            payload BLOB NOT NULL,
            PRIMARY KEY (item_id, replica, seq)
        ) STRICT, WITHOUT ROWID;
        """,
    ),
)

CURRENT_VERSION = MIGRATIONS[-1].version


def migrate(conn: apsw.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring ``conn``'s schema up to the newest version; returns the version reached."""
    newest = migrations[-1].version
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > newest:
        raise SchemaTooNewError(
            f"database schema version {version} is newer than this rayflow understands ({newest}); "
            "upgrade rayflow to open it",
            found=version,
            supported=newest,
        )
    for migration in migrations:
        if migration.version <= version:
            continue
        with conn:
            conn.execute(migration.sql)
            # PRAGMA does not take bound parameters; the version is our own integer.
            conn.execute(f"PRAGMA user_version = {int(migration.version)}")
        version = migration.version
    return version
