"""A faithful re-creation of the upstream ReasoningBank's retrieval, as the benchmark's baseline.

Upstream (agentic-flow) keeps each memory as a JSON document in a ``patterns`` table with its
embedding in ``pattern_embeddings``, and answers every query by reading *all* candidate rows
(joined, filtered by confidence and optionally by a JSON-extracted domain), parsing each JSON
document and embedding, scoring every row, running MMR over every candidate, and bumping the
usage count of what it returns. This module does the same against a real SQLite file. Where
upstream loops per row in JavaScript, the scoring and MMR here are vectorised with numpy, which
favours the baseline: the speed-ups reported against it are lower bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import apsw
import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS patterns (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, pattern_data TEXT NOT NULL,
    confidence REAL NOT NULL DEFAULT 0.5, usage_count INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, last_used TEXT);
CREATE TABLE IF NOT EXISTS pattern_embeddings (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, dims INTEGER NOT NULL, vector BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE INDEX IF NOT EXISTS idx_patterns_confidence ON patterns(confidence DESC);
"""


class UpstreamScanBank:
    """Full-table-scan retrieval over an upstream-shaped SQLite database."""

    def __init__(self, path: Path) -> None:
        self.conn = apsw.Connection(str(path))
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(SCHEMA)

    def insert_many(self, rows: list[tuple[str, dict[str, Any], np.ndarray]]) -> None:
        with self.conn:
            for item_id, data, vector in rows:
                self.conn.execute(
                    "INSERT INTO patterns(id, type, pattern_data, confidence) VALUES (?, 'reasoning_memory', ?, 0.6)",
                    (item_id, json.dumps(data)),
                )
                self.conn.execute(
                    "INSERT INTO pattern_embeddings(id, model, dims, vector) VALUES (?, 'hash', ?, ?)",
                    (item_id, int(vector.shape[0]), vector.astype("<f4").tobytes()),
                )

    def retrieve(self, query_vector: np.ndarray, k: int = 10, lam: float = 0.5) -> list[str]:
        rows = self.conn.execute(
            "SELECT p.id, p.pattern_data, p.confidence, pe.vector, "
            "CAST((julianday('now') - julianday(p.created_at)) AS INTEGER) AS age_days "
            "FROM patterns p JOIN pattern_embeddings pe ON p.id = pe.id "
            "WHERE p.type = 'reasoning_memory' AND p.confidence >= ? "
            "ORDER BY p.confidence DESC, p.usage_count DESC",
            (0.3,),
        ).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        _documents = [json.loads(r[1]) for r in rows]
        vectors = np.vstack([np.frombuffer(r[3], dtype="<f4") for r in rows])
        confidence = np.array([min(r[2], 1.0) for r in rows])
        age = np.array([r[4] for r in rows], dtype=float)
        norms = np.linalg.norm(vectors, axis=1) * float(np.linalg.norm(query_vector))
        similarity = (vectors @ query_vector) / np.where(norms == 0, 1, norms)
        score = 0.65 * similarity + 0.15 * np.exp(-age / 30.0) + 0.2 * confidence
        chosen = _mmr_over_all(score, vectors, k, lam)
        with self.conn:
            for i in chosen:
                self.conn.execute(
                    "UPDATE patterns SET usage_count = usage_count + 1, last_used = CURRENT_TIMESTAMP WHERE id = ?",
                    (ids[i],),
                )
        return [ids[i] for i in chosen]

    def close(self) -> None:
        self.conn.close()


def _mmr_over_all(score: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Upstream's MMR: every candidate competes at every step (no candidate cut-off)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    picked: list[int] = []
    redundancy = np.zeros(len(score))
    available = np.ones(len(score), dtype=bool)
    for _ in range(min(k, len(score))):
        gain = lam * score - (1 - lam) * redundancy
        gain[~available] = -math.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, unit @ unit[best])
    return picked
