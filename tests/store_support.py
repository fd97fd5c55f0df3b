"""Change payloads for tests that drive the store's mutation path directly (store and replication tests)."""

from __future__ import annotations

from typing import Any

from rayflow.hub.replication import StoreDeltaSource, apply_deltas
from rayflow.memory.store import Store
from rayflow.sync.receive_window import ReceiveWindow
from rayflow.sync.vector_clock import VectorClock


def item_payload(**overrides: Any) -> dict[str, Any]:
    """An ``item.put`` payload with every column the store needs; ``overrides`` replace fields."""
    payload = {
        "namespace": "ns",
        "title": b"t",
        "description": b"d",
        "content": b"c",
        "tags": "[]",
        "domain": "",
        "outcome": "success",
        "prior_confidence": 0.5,
        "created_at": 1.0,
        "last_used_at": None,
        "source_task": "",
        "source_agent": "",
        "embedding_model": "m",
        "dim": 2,
        "vector": b"\x00\x00\x80?\x00\x00\x00\x00",
    }
    payload.update(overrides)
    return payload


def pull(receiver: Store, sender: Store, max_bytes: int) -> int:
    """``receiver`` pulls what it lacks from ``sender`` in batches of ``max_bytes``; returns deltas applied."""
    window = ReceiveWindow(VectorClock.of(receiver.version_vector()))
    source = StoreDeltaSource(sender)
    applied = 0
    while True:
        batch = source.deltas_after(window.wants(), max_bytes)
        if not batch:
            return applied
        for delta in batch:
            applied += apply_deltas(receiver, window.offer(delta))
