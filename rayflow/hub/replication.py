"""The bank's change log as the replication core sees it: changes <-> deltas, a delta source, apply.

The sync core (:mod:`rayflow.sync`) moves opaque deltas with causal contexts and never reads a
change; the store (:mod:`rayflow.memory.store`) logs and applies changes and knows nothing of
peers. This module is the seam between them, on the hub's side: it turns the store's change
records into deltas (the body is the encoded record, the context is the one the store logged),
checks that a received delta's body says exactly what its envelope says (a peer cannot smuggle a
change of another origin, sequence or tenant inside a delta), and serves a peer what its version
vector lacks, read from the log on demand so that the log itself is the only buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

from rayflow.errors import InvalidInputError
from rayflow.memory.store import Change, Store
from rayflow.sync.delta import Delta
from rayflow.sync.vector_clock import VectorClock

#: Change records read from the log per query while filling a batch.
READ_CHUNK = 256


def delta_of(change: Change) -> Delta:
    """The delta that carries ``change`` to a peer."""
    return Delta(
        origin=change.replica_id,
        seq=change.seq,
        tenant=change.tenant,
        context=VectorClock.of(change.context),
        body=change.encode(),
    )


def change_of(delta: Delta) -> Change:
    """The change a received delta carries, refused unless its body matches its envelope."""
    change = Change.decode(delta.body)
    envelope = (delta.origin, delta.seq, delta.tenant, delta.context)
    carried = (change.replica_id, change.seq, change.tenant, VectorClock.of(change.context))
    if carried != envelope:
        raise InvalidInputError(
            "a delta's change record does not match its envelope",
            origin=delta.origin,
            seq=delta.seq,
        )
    return change


class StoreDeltaSource:
    """A replica's change log, offered to peers: its head, and what a given vector lacks."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def head(self) -> VectorClock:
        """Everything this replica holds, per origin."""
        return VectorClock.of(self.store.version_vector())

    def deltas_after(self, vector: VectorClock, max_bytes: int) -> list[Delta]:
        """The deltas ``vector`` lacks, oldest first in causal order, at most ``max_bytes`` of
        encoded bodies but always at least one when any is missing (so a pull makes progress)."""
        known = vector.to_wire()
        out: list[Delta] = []
        used = 0
        while True:
            changes = self.store.changes_after(known, limit=READ_CHUNK)
            if not changes:
                return out
            for change in changes:
                delta = delta_of(change)
                if out and used + delta.size > max_bytes:
                    return out
                out.append(delta)
                used += delta.size
                known[change.replica_id] = change.seq
            if len(changes) < READ_CHUNK:
                return out


def apply_deltas(store: Store, deltas: Sequence[Delta]) -> int:
    """Apply deltas (already in causal order, e.g. from a receive window); returns how many were new."""
    return store.apply_remote([change_of(delta) for delta in deltas])


__all__ = ["StoreDeltaSource", "apply_deltas", "change_of", "delta_of"]
