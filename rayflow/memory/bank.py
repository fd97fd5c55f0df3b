"""The ReasoningBank: store, retrieve, judge, distill and consolidate agents' reasoning memory.

It composes the parts of :mod:`rayflow.memory`: SQLite through :class:`~rayflow.memory.store.Store`
(the source of truth, with its change log), one HNSW index per tenant, an embedder, per-tenant
encryption of text at rest, secret scrubbing, a judge and a distiller.

Every operation names its tenant. A tenant is an isolation boundary: its items sit in their own
index, every SQL statement carries the tenant, and item ids of other tenants behave exactly like
ids that do not exist.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from rayflow.config import Config, MemoryConfig, load_config
from rayflow.errors import (
    ConfigError,
    DimensionMismatchError,
    EmptyTextError,
    InvalidInputError,
    ItemNotFoundError,
    PayloadTooLargeError,
    UnknownTenantError,
)
from rayflow.ids import is_valid_id, new_id
from rayflow.memory.attributes import FilterKey, TenantAttributes
from rayflow.memory.consolidate import plan_consolidation
from rayflow.memory.crypto import CipherCache, FileKeyProvider, KeyProvider, TenantCipher
from rayflow.memory.distill import Distiller, RuleDistiller
from rayflow.memory.embedding import Embedder, embedder_from_name
from rayflow.memory.index import IndexSet, TenantIndex
from rayflow.memory.judge import HeuristicJudge, Judge
from rayflow.memory.scoring import beta_reliability_array, combined_score, mmr_order, recency
from rayflow.memory.scrub import scrub
from rayflow.memory.store import Mutation, Store, default_database_path
from rayflow.namespace import ROOT, normalize_namespace
from rayflow.tenant import validate_tenant_name
from rayflow.wire.memory_records import (
    ItemVersion,
    Lesson,
    MemoryItem,
    Outcome,
    ScoredItem,
    Trajectory,
    Verdict,
)

MAX_TAGS = 32
MAX_TAG_LENGTH = 64
MAX_K = 1000
_TEXT_FIELDS = ("title", "description", "content")


@dataclass(frozen=True)
class TrajectoryRecord:
    """What :meth:`ReasoningBank.record_trajectory` stored."""

    id: str
    verdict: Verdict
    item_ids: tuple[str, ...]


@dataclass(frozen=True)
class ConsolidationReport:
    """What one consolidation run changed."""

    id: str
    tenant: str
    examined: int
    merged: int
    contradictions: int
    pruned: int
    merged_pairs: tuple[tuple[str, str], ...] = field(default=())


@dataclass
class _TenantState:
    """In-memory structures derived from SQLite for one tenant (rebuilt on open)."""

    index: TenantIndex
    attributes: TenantAttributes
    lock: threading.Lock = field(default_factory=threading.Lock)
    unsaved_changes: int = 0


class ReasoningBank:
    """Embedded ReasoningBank over a state directory (no network, no Ray)."""

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        config: Config | None = None,
        embedder: Embedder | None = None,
        key_provider: KeyProvider | None = None,
        judge: Judge | None = None,
        distiller: Distiller | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or load_config()
        self.state_dir = Path(state_dir) if state_dir is not None else self.config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._memory: MemoryConfig = self.config.memory
        self._clock = clock
        self.store = Store(
            default_database_path(self.state_dir),
            replica_id=self.config.replica_id,
            durability=self._memory.durability,
        )
        self.embedder = self._choose_embedder(embedder)
        self._keys = key_provider or FileKeyProvider(self.state_dir / "keys" / "tenant-keys.json")
        self._ciphers = CipherCache(self._keys)
        self.judge_impl: Judge = judge or HeuristicJudge()
        self.distiller: Distiller = distiller or RuleDistiller()
        self._indexes = IndexSet(
            self.state_dir / "memory" / "index",
            dim=self.embedder.dim,
            M=self._memory.hnsw_m,
            ef_construction=self._memory.hnsw_ef_construction,
            ef_search=self._memory.hnsw_ef_search,
        )
        self._tenants: dict[str, _TenantState] = {}
        self._tenants_lock = threading.Lock()
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Save index files and close the database."""
        if self._closed:
            return
        self._closed = True
        with self._tenants_lock:
            for state in self._tenants.values():
                with state.lock:
                    state.index.save()
        self._indexes.close()
        self.store.close()

    def __enter__(self) -> ReasoningBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _choose_embedder(self, given: Embedder | None) -> Embedder:
        stored_json = self.store.get_meta("embedder")
        if stored_json is None:
            chosen = given or embedder_from_name(self._memory.embedder)
            stored_json = self.store.set_meta_if_absent(
                "embedder", json.dumps({"name": chosen.name, "dim": chosen.dim})
            )
        stored = json.loads(stored_json)
        if given is None:
            return embedder_from_name(stored["name"])
        if given.name != stored["name"] or given.dim != stored["dim"]:
            raise ConfigError(
                f"this bank's vectors were made by {stored['name']} ({stored['dim']}-d); "
                f"open it with that embedder, not {given.name} ({given.dim}-d)"
            )
        return given

    # --- tenants ----------------------------------------------------------------------------
    def create_tenant(self, tenant: str) -> None:
        """Create ``tenant`` (and its data key); creating an existing tenant is a no-op."""
        validate_tenant_name(tenant)
        self._keys.create_key(tenant)
        self.store.commit(tenant, [Mutation("tenant.put", tenant, {"created_at": self._clock()})])

    def tenants(self) -> list[str]:
        return [name for (name,) in self.store.reader().execute("SELECT name FROM tenants ORDER BY name")]

    def has_tenant(self, tenant: str) -> bool:
        row = self.store.reader().execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone()
        return row is not None

    def _tenant(self, tenant: str) -> _TenantState:
        """The tenant's in-memory state, loading and catching up its index on first use.

        Another process (a CLI next to a running hub, say) may write to the same database; a
        one-row index probe notices and catches up before the call is served.
        """
        state = self._tenants.get(tenant)
        if state is not None:
            (newest,) = (
                self.store.reader()
                .execute("SELECT max(index_seq) FROM items WHERE tenant = ?", (tenant,))
                .fetchone()
            )
            if newest is not None and newest > state.index.high_water:
                self._catch_up(tenant, state)
            return state
        if not isinstance(tenant, str) or not self.has_tenant(tenant):
            raise UnknownTenantError(f"unknown tenant {tenant!r}", tenant=str(tenant))
        with self._tenants_lock:
            state = self._tenants.get(tenant)
            if state is None:
                state = _TenantState(self._indexes.get(tenant), TenantAttributes())
                self._load_attributes(tenant, state)
                self._catch_up(tenant, state)
                self._tenants[tenant] = state
        return state

    # Ranking and filter attributes of items, with counters summed over origins.
    _ATTRIBUTE_SELECT = (
        "SELECT i.rowid, i.namespace, i.domain, i.outcome, i.deleted, i.prior_confidence, "
        "max(i.created_at, coalesce(i.last_used_at, 0)), "
        "(SELECT coalesce(sum(successes), 0) FROM item_counters c WHERE c.item_id = i.id), "
        "(SELECT coalesce(sum(failures), 0) FROM item_counters c WHERE c.item_id = i.id), "
        "i.index_seq "
        "FROM items i WHERE i.tenant = ? "
    )

    @staticmethod
    def _set_attributes(state: _TenantState, row: tuple[Any, ...]) -> None:
        rowid, namespace, domain, outcome, deleted, prior, last_active, successes, failures = row[:9]
        state.attributes.set(
            rowid,
            namespace=namespace,
            domain=domain,
            outcome=outcome,
            live=not deleted,
            prior=prior,
            successes=successes,
            failures=failures,
            last_active=last_active,
        )

    def _load_attributes(self, tenant: str, state: _TenantState) -> None:
        for row in self.store.reader().execute(self._ATTRIBUTE_SELECT, (tenant,)):
            self._set_attributes(state, row)

    def _catch_up(self, tenant: str, state: _TenantState) -> None:
        """Bring the tenant's index and attributes up to SQLite: the one path from rows to memory.

        Runs after every local commit, and on open (so a crashed process's index catches up from
        the high-water mark recorded with the index file). A row whose vector is already in the
        index (only its counters or use time changed) is not re-inserted.
        """
        with state.lock:
            rows = (
                self.store.reader()
                .execute(
                    self._ATTRIBUTE_SELECT + "AND i.index_seq > ? ORDER BY i.index_seq",
                    (tenant, state.index.high_water),
                )
                .fetchall()
            )
            if not rows:
                return
            removed, candidates = [], []
            for row in rows:
                self._set_attributes(state, row)
                (removed if row[4] else candidates).append(row[0])
            if candidates:
                stored = self._stored_vectors(candidates)
                present = np.array([label in state.index for label in candidates], dtype=bool)
                changed = ~present
                if present.any():
                    known = np.asarray(candidates, dtype=np.int64)[present]
                    same = np.all(np.isclose(state.index.vectors(known), stored[present], atol=1e-6), axis=1)
                    changed[np.flatnonzero(present)[~same]] = True
                if changed.any():
                    state.index.add(np.asarray(candidates, dtype=np.int64)[changed], stored[changed])
            if removed:
                state.index.mark_deleted(np.asarray(removed, dtype=np.int64))
            state.index.high_water = rows[-1][9]
            state.unsaved_changes += len(rows)
            if state.unsaved_changes >= self._memory.index_save_every:
                state.index.save()
                state.unsaved_changes = 0

    def tenant_index(self, tenant: str) -> TenantIndex:
        """The tenant's HNSW index, caught up with SQLite (for recall checks and tools)."""
        return self._tenant(tenant).index

    def flush(self) -> None:
        """Save every loaded index file now (SQLite is already durable)."""
        with self._tenants_lock:
            states = list(self._tenants.values())
        for state in states:
            with state.lock:
                state.index.save()
                state.unsaved_changes = 0

    # --- store ------------------------------------------------------------------------------
    def store_item(
        self,
        tenant: str,
        *,
        namespace: str,
        title: str,
        description: str = "",
        content: str,
        tags: Iterable[str] = (),
        domain: str = "",
        outcome: Outcome | str = Outcome.SUCCESS,
        confidence: float = 0.5,
        source_task: str = "",
        source_agent: str = "",
        embedding: np.ndarray | bytes | None = None,
    ) -> MemoryItem:
        """Store one memory item; returns it with its new id. Secrets are scrubbed first."""
        lesson = Lesson(
            title=title,
            description=description,
            content=content,
            outcome=Outcome(outcome),
            tags=_validate_tags(tags),
            confidence=confidence,
        )
        vectors = None if embedding is None else [embedding]
        return self.store_lessons(
            tenant,
            [lesson],
            namespace=namespace,
            domain=domain,
            source_task=source_task,
            source_agent=source_agent,
            embeddings=vectors,
        )[0]

    def store_lessons(
        self,
        tenant: str,
        lessons: Sequence[Lesson],
        *,
        namespace: str,
        domain: str = "",
        source_task: str = "",
        source_agent: str = "",
        embeddings: Sequence[np.ndarray | bytes] | None = None,
    ) -> list[MemoryItem]:
        """Store several items in one transaction (one fsync): the batched write path."""
        state = self._tenant(tenant)
        items, mutations = self._prepare_items(
            tenant, lessons, namespace, domain, source_task, source_agent, embeddings
        )
        self.store.commit(tenant, mutations)
        self._catch_up(tenant, state)
        return items

    def _prepare_items(
        self,
        tenant: str,
        lessons: Sequence[Lesson],
        namespace: str,
        domain: str,
        source_task: str,
        source_agent: str,
        embeddings: Sequence[np.ndarray | bytes] | None,
    ) -> tuple[list[MemoryItem], list[Mutation]]:
        namespace = normalize_namespace(namespace)
        domain = _validate_label(domain, "domain")
        if not lessons:
            return [], []
        if embeddings is not None and len(embeddings) != len(lessons):
            raise InvalidInputError("one embedding per item is required")
        cleaned = [self._clean_lesson(lesson) for lesson in lessons]
        if embeddings is None:
            vectors = self.embedder.embed([_embedding_text(c) for c in cleaned])
        else:
            vectors = np.vstack([self._coerce_vector(v) for v in embeddings])
        now = self._clock()
        cipher = self._ciphers.cipher(tenant)
        items, mutations = [], []
        for lesson, vector in zip(cleaned, vectors):
            item_id = new_id()
            item = MemoryItem(
                id=item_id,
                tenant=tenant,
                namespace=namespace,
                title=lesson.title,
                description=lesson.description,
                content=lesson.content,
                tags=lesson.tags,
                domain=domain,
                outcome=lesson.outcome,
                prior_confidence=lesson.confidence,
                created_at=now,
                source_task=source_task,
                source_agent=source_agent,
                embedding_model=self.embedder.name,
                dim=self.embedder.dim,
                prior_strength=self._memory.prior_strength,
            )
            payload = self._item_payload(
                cipher, item_id, lesson, namespace=namespace, domain=domain, created_at=now, last_used_at=None,
                source_task=source_task, source_agent=source_agent, vector=vector,
            )  # fmt: skip
            items.append(item)
            mutations.append(Mutation("item.put", item_id, payload))
        return items, mutations

    def _clean_lesson(self, lesson: Lesson) -> Lesson:
        limit = self._memory.max_text_bytes
        fields = {}
        for name in _TEXT_FIELDS:
            value = getattr(lesson, name)
            if not isinstance(value, str):
                raise InvalidInputError(f"{name} must be a string")
            if len(value.encode("utf-8", "surrogatepass")) > limit:
                raise PayloadTooLargeError(f"{name} is larger than {limit} bytes", field=name, limit=limit)
            fields[name] = scrub(value).text.strip()
        for name in ("title", "content"):
            if not fields[name]:
                raise EmptyTextError(f"{name} must not be empty", field=name)
        confidence = float(lesson.confidence)
        if not 0.0 <= confidence <= 1.0:
            raise InvalidInputError(f"confidence must be within [0, 1], not {lesson.confidence}")
        tags = _validate_tags(lesson.tags)
        return Lesson(
            title=fields["title"],
            description=fields["description"],
            content=fields["content"],
            outcome=Outcome(lesson.outcome),
            tags=tags,
            confidence=confidence,
        )

    def _coerce_vector(self, vector: np.ndarray | bytes) -> np.ndarray:
        if isinstance(vector, (bytes, bytearray, memoryview)):
            raw = bytes(vector)
            if len(raw) % 4:
                raise DimensionMismatchError("embedding bytes are not a whole number of float32 values")
            array = np.frombuffer(raw, dtype="<f4")
        else:
            array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.shape[0] != self.embedder.dim:
            raise DimensionMismatchError(
                f"embedding has {array.shape[0]} dimensions, this bank uses {self.embedder.dim}",
                expected=self.embedder.dim,
                got=int(array.shape[0]),
            )
        if not np.all(np.isfinite(array)):
            raise InvalidInputError("embedding contains NaN or infinity")
        norm = float(np.linalg.norm(array))
        if norm == 0.0:
            raise InvalidInputError("embedding is the zero vector")
        return (array / norm).astype(np.float32)

    # --- read -------------------------------------------------------------------------------
    def get(self, tenant: str, item_id: str) -> MemoryItem:
        """One live item of ``tenant``; other tenants' ids raise :class:`ItemNotFoundError`."""
        self._tenant(tenant)
        if not is_valid_id(item_id):
            raise ItemNotFoundError(f"no item {item_id!r}")
        rows = self._fetch_items(tenant, "i.id = ?", (item_id,))
        if not rows:
            raise ItemNotFoundError(f"no item {item_id} for tenant {tenant!r}", item_id=item_id)
        item = self._decode_item(tenant, rows[0])
        versions = self.store.item_versions(item_id)
        if len(versions) < 2:
            return item
        # The first version is the one the row shows; the others were made concurrently with it.
        cipher = self._ciphers.cipher(tenant)
        siblings = tuple(
            ItemVersion(
                version["replica"],
                *_open_texts(cipher, item_id, fields),
                tags=tuple(json.loads(fields["tags"])),
                domain=fields["domain"],
                outcome=Outcome(fields["outcome"]),
            )
            for version in versions[1:]
            for fields in (version["fields"],)
        )
        return dataclasses.replace(item, siblings=siblings)

    def edit_item(
        self,
        tenant: str,
        item_id: str,
        *,
        title: str | None = None,
        description: str | None = None,
        content: str | None = None,
        tags: Iterable[str] | None = None,
    ) -> MemoryItem:
        """Change a live item's text or tags (what is not given stays); returns the item as edited.

        The edit is made after every version this replica holds, so it also reconciles siblings
        (concurrent edits from other regions): what the caller sends becomes the one version.
        Secrets are scrubbed and the item is re-embedded when its text changed.
        """
        current = self.get(tenant, item_id)
        lesson = self._clean_lesson(
            Lesson(
                title=current.title if title is None else title,
                description=current.description if description is None else description,
                content=current.content if content is None else content,
                outcome=current.outcome,
                tags=current.tags if tags is None else _validate_tags(tags),
                confidence=current.prior_confidence,
            )
        )
        row = (
            self.store.reader()
            .execute(
                "SELECT e.vector FROM embeddings e JOIN items i ON i.rowid = e.item_rowid WHERE i.id = ?",
                (item_id,),
            )
            .fetchone()
        )
        same_text = (lesson.title, lesson.description, lesson.content) == (
            current.title, current.description, current.content
        )  # fmt: skip
        vector = (
            row[0] if same_text and row is not None else self.embedder.embed([_embedding_text(lesson)])[0]
        )
        payload = self._item_payload(
            self._ciphers.cipher(tenant), item_id, lesson, namespace=current.namespace, domain=current.domain,
            created_at=current.created_at, last_used_at=current.last_used_at, source_task=current.source_task,
            source_agent=current.source_agent, vector=vector,
        )  # fmt: skip
        self.store.commit(tenant, [Mutation("item.put", item_id, payload)])
        return self.get(tenant, item_id)

    def _item_payload(
        self,
        cipher: TenantCipher,
        item_id: str,
        lesson: Lesson,
        *,
        namespace: str,
        domain: str,
        created_at: float,
        last_used_at: float | None,
        source_task: str,
        source_agent: str,
        vector: np.ndarray | bytes,
    ) -> dict[str, Any]:
        """The ``item.put`` payload of ``lesson`` as item ``item_id``: its text sealed for the tenant."""
        payload: dict[str, Any] = {
            "namespace": namespace,
            "tags": json.dumps(list(lesson.tags)),
            "domain": domain,
            "outcome": lesson.outcome.value,
            "prior_confidence": float(lesson.confidence),
            "created_at": created_at,
            "last_used_at": last_used_at,
            "source_task": source_task,
            "source_agent": source_agent,
            "embedding_model": self.embedder.name,
            "dim": self.embedder.dim,
            "vector": vector if isinstance(vector, bytes) else np.asarray(vector, dtype="<f4").tobytes(),
        }
        for name in _TEXT_FIELDS:
            payload[name] = cipher.encrypt(getattr(lesson, name), _aad(item_id, name))
        return payload

    def links(self, tenant: str, item_id: str) -> list[tuple[str, str, str]]:
        """(src, kind, dst) links touching an item of ``tenant``."""
        self._tenant(tenant)
        rows = self.store.reader().execute(
            "SELECT src_id, kind, dst_id FROM links WHERE tenant = ? AND (src_id = ? OR dst_id = ?) "
            "ORDER BY created_at",
            (tenant, item_id, item_id),
        )
        return [tuple(r) for r in rows]

    _ITEM_SELECT = (
        "SELECT i.rowid, i.id, i.namespace, i.title, i.description, i.content, i.tags, i.domain, "
        "i.outcome, i.prior_confidence, i.created_at, i.last_used_at, i.source_task, i.source_agent, "
        "i.embedding_model, i.dim, "
        "(SELECT coalesce(sum(uses), 0) FROM item_counters c WHERE c.item_id = i.id), "
        "(SELECT coalesce(sum(successes), 0) FROM item_counters c WHERE c.item_id = i.id), "
        "(SELECT coalesce(sum(failures), 0) FROM item_counters c WHERE c.item_id = i.id) "
        "FROM items i "
    )

    def _fetch_items(self, tenant: str, where: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        # The unary + keeps SQLite from scanning the tenant index when ``where`` names rowids or ids.
        sql = self._ITEM_SELECT + f"WHERE +i.tenant = ? AND i.deleted = 0 AND ({where})"
        return self.store.reader().execute(sql, (tenant, *params)).fetchall()

    def _decode_item(self, tenant: str, row: tuple[Any, ...]) -> MemoryItem:
        (_rowid, item_id, namespace, title, description, content, tags, domain, outcome, prior, created,
         last_used, source_task, source_agent, model, dim, uses, successes, failures) = row  # fmt: skip
        sealed = {"title": title, "description": description, "content": content}
        title, description, content = _open_texts(self._ciphers.cipher(tenant), item_id, sealed)
        return MemoryItem(
            id=item_id,
            tenant=tenant,
            namespace=namespace,
            title=title,
            description=description,
            content=content,
            tags=tuple(json.loads(tags)),
            domain=domain,
            outcome=Outcome(outcome),
            prior_confidence=prior,
            uses=uses,
            successes=successes,
            failures=failures,
            created_at=created,
            last_used_at=last_used,
            source_task=source_task,
            source_agent=source_agent,
            embedding_model=model,
            dim=dim,
            prior_strength=self._memory.prior_strength,
        )

    def retrieve(
        self,
        tenant: str,
        query: str | np.ndarray | bytes,
        *,
        k: int = 5,
        namespace: str = ROOT,
        domain: str | None = None,
        outcome: Outcome | str | None = None,
        min_confidence: float = 0.0,
        mmr_lambda: float | None = None,
    ) -> list[ScoredItem]:
        """The ``k`` best items of ``tenant`` for ``query`` within ``namespace`` (a prefix).

        Candidates come from the tenant's HNSW index (filtered inside the search), are scored by
        similarity, recency and reliability, filtered by ``min_confidence`` (on reliability) and
        re-ranked with MMR. ``query`` is text, or a vector from the same embedder.
        """
        state = self._tenant(tenant)
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidInputError(f"k must be an integer within [1, {MAX_K}]")
        lam = self._memory.mmr_lambda if mmr_lambda is None else float(mmr_lambda)
        if not 0.0 <= lam <= 1.0:
            raise InvalidInputError(f"mmr_lambda must be within [0, 1], not {mmr_lambda}")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise InvalidInputError("min_confidence must be within [0, 1]")
        key = FilterKey(
            namespace_prefix=normalize_namespace(namespace, allow_root=True),
            domain=None if domain is None else _validate_label(domain, "domain"),
            outcome=None if outcome is None else Outcome(outcome).value,
        )
        query_vector = self._query_vector(query)
        allowed = state.attributes.mask(key)
        for _attempt in range(3):
            try:
                return self._ranked(tenant, state, query_vector, allowed, k, float(min_confidence), lam)
            except ItemNotFoundError:
                # An item was deleted between the index search and the vector lookup; the next
                # search no longer sees it.
                continue
        return self._ranked(tenant, state, query_vector, allowed, k, float(min_confidence), lam)

    def _ranked(
        self,
        tenant: str,
        state: _TenantState,
        query_vector: np.ndarray,
        allowed: np.ndarray | None,
        k: int,
        min_confidence: float,
        lam: float,
    ) -> list[ScoredItem]:
        live = len(state.index)
        wanted = k * self._memory.oversample
        while True:
            labels, sims = state.index.query(query_vector, wanted, allowed=allowed)
            inputs = state.attributes.ranking_inputs(labels)
            reliability = beta_reliability_array(
                inputs.prior, inputs.successes, inputs.failures, self._memory.prior_strength
            )
            keep = reliability >= min_confidence
            # Filtering on reliability happens after the index search; widen until enough pass.
            if int(keep.sum()) >= k or wanted >= live or len(labels) < wanted:
                break
            wanted = min(live, wanted * 4)
        labels, similarity, reliability = labels[keep], sims[keep].astype(np.float64), reliability[keep]
        if len(labels) == 0:
            return []
        recency_value = recency(inputs.last_active[keep], self._clock(), self._memory.recency_half_life_days)
        score = combined_score(
            similarity,
            recency_value,
            reliability,
            weight_similarity=self._memory.weight_similarity,
            weight_recency=self._memory.weight_recency,
            weight_reliability=self._memory.weight_reliability,
        )
        order = mmr_order(score, state.index.vectors(labels), k, lam)
        chosen = [int(labels[i]) for i in order]
        marks = ",".join("?" * len(chosen))
        rows = {row[0]: row for row in self._fetch_items(tenant, f"i.rowid IN ({marks})", tuple(chosen))}
        results = []
        for i in order:
            row = rows.get(int(labels[i]))
            if row is None:  # deleted after the search: leave it out
                continue
            results.append(
                ScoredItem(
                    item=self._decode_item(tenant, row),
                    similarity=float(similarity[i]),
                    recency=float(recency_value[i]),
                    reliability=float(reliability[i]),
                    score=float(score[i]),
                    rank=len(results),
                )
            )
        return results

    def _query_vector(self, query: str | np.ndarray | bytes) -> np.ndarray:
        if isinstance(query, str):
            if not query.strip():
                raise EmptyTextError("query must not be empty")
            if len(query.encode("utf-8", "surrogatepass")) > self._memory.max_text_bytes:
                raise PayloadTooLargeError("query is too large")
            vector = self.embedder.embed([query])[0]
            if not np.any(vector):
                raise EmptyTextError("query has no searchable words")
            return vector
        return self._coerce_vector(query)

    def _stored_vectors(self, rowids: list[int]) -> np.ndarray:
        """Embeddings of ``rowids`` from SQLite, in order."""
        marks = ",".join("?" * len(rowids))
        found = dict(
            self.store.reader().execute(
                f"SELECT item_rowid, vector FROM embeddings WHERE item_rowid IN ({marks})", tuple(rowids)
            )
        )
        return np.vstack([np.frombuffer(found[r], dtype="<f4") for r in rowids])

    # --- learning ---------------------------------------------------------------------------
    def report_outcome(self, tenant: str, item_ids: Sequence[str], success: bool) -> None:
        """Record that ``item_ids`` were used for a task that then succeeded or failed.

        This is what makes confidence learn: each report moves the items' reliability.
        """
        state = self._tenant(tenant)
        self.store.commit(tenant, self._outcome_mutations(tenant, item_ids, success))
        self._catch_up(tenant, state)

    def _outcome_mutations(self, tenant: str, item_ids: Sequence[str], success: bool) -> list[Mutation]:
        unique = list(dict.fromkeys(item_ids))
        for item_id in unique:
            if not is_valid_id(item_id):
                raise ItemNotFoundError(f"no item {item_id!r}")
        now = self._clock()
        origin = self.store.replica_id
        mutations = []
        for item_id in unique:
            mutations.append(
                Mutation(
                    "counter.add",
                    item_id,
                    {"origin": origin, "uses": 1, "successes": int(success), "failures": int(not success)},
                )
            )
            mutations.append(Mutation("item.touch", item_id, {"last_used_at": now}))
        return mutations

    def judge(self, trajectory: Trajectory) -> Verdict:
        """The configured judge's verdict on a trajectory."""
        return self.judge_impl.judge(trajectory)

    def distill(self, trajectory: Trajectory, verdict: Verdict, *, max_items: int = 3) -> list[Lesson]:
        """Lessons worth keeping from a judged trajectory (scrubbed, at most ``max_items``)."""
        return self.distiller.distill(trajectory, verdict, max_items=max_items)

    def record_trajectory(
        self, tenant: str, trajectory: Trajectory, *, verdict: Verdict | None = None, max_items: int = 3
    ) -> TrajectoryRecord:
        """Judge, distill and store a finished task in one transaction, and credit the items it used."""
        state = self._tenant(tenant)
        namespace = normalize_namespace(trajectory.namespace)
        verdict = verdict or self.judge(trajectory)
        lessons = self.distill(trajectory, verdict, max_items=max_items)
        items, mutations = self._prepare_items(
            tenant,
            lessons,
            namespace,
            trajectory.domain,
            trajectory.task_id,
            trajectory.agent_id,
            None,
        )
        trajectory_id = new_id()
        body = msgpack.packb(
            {
                "query": scrub(trajectory.query).text,
                "steps": [[scrub(s.action).text, scrub(s.observation).text] for s in trajectory.steps],
                "final_output": scrub(trajectory.final_output).text,
            },
            use_bin_type=True,
        )
        if len(body) > 16 * self._memory.max_text_bytes:
            raise PayloadTooLargeError("trajectory is too large to store")
        cipher = self._ciphers.cipher(tenant)
        mutations.append(
            Mutation(
                "trajectory.put",
                trajectory_id,
                {
                    "namespace": namespace,
                    "task_id": trajectory.task_id,
                    "agent_id": trajectory.agent_id,
                    "domain": trajectory.domain,
                    "body": cipher.encrypt_bytes(body, _aad(trajectory_id, "body")),
                    "exit_code": trajectory.exit_code,
                    "tests_passed": trajectory.tests_passed,
                    "tests_failed": trajectory.tests_failed,
                    "reward": trajectory.reward,
                    "verdict_outcome": verdict.outcome.value,
                    "verdict_confidence": float(verdict.confidence),
                    "verdict_reason": scrub(verdict.reason).text,
                    "judge": verdict.judge,
                    "used_item_ids": json.dumps(list(trajectory.used_item_ids)),
                    "distilled_item_ids": json.dumps([item.id for item in items]),
                    "created_at": self._clock(),
                },
            )
        )
        mutations.extend(
            self._outcome_mutations(tenant, trajectory.used_item_ids, verdict.outcome is Outcome.SUCCESS)
        )
        self.store.commit(tenant, mutations)
        self._catch_up(tenant, state)
        return TrajectoryRecord(trajectory_id, verdict, tuple(item.id for item in items))

    def delete(self, tenant: str, item_id: str, *, reason: str = "deleted") -> None:
        """Delete one item of ``tenant`` (a tombstone that replicates)."""
        state = self._tenant(tenant)
        if not is_valid_id(item_id):
            raise ItemNotFoundError(f"no item {item_id!r}")
        self.store.commit(tenant, [Mutation("item.delete", item_id, {"reason": reason})])
        self._catch_up(tenant, state)

    # --- consolidation ----------------------------------------------------------------------
    def consolidate(self, tenant: str, *, full: bool = False) -> ConsolidationReport:
        """Merge duplicates, link contradictions and prune stale low-confidence items.

        By default only items added since the previous run are compared against the rest
        (everything is compared when ``full`` is set); pruning always considers every item.
        """
        state = self._tenant(tenant)
        started = self._clock()
        plan = plan_consolidation(
            self._memory, self.store.reader(), tenant, state.index, full=full, now=started
        )
        run_id = new_id()
        mutations = list(plan.mutations)
        mutations.append(
            Mutation(
                "consolidation.put",
                run_id,
                {
                    "started_at": started,
                    "finished_at": self._clock(),
                    "examined": plan.examined,
                    "merged": len(plan.merged_pairs),
                    "contradictions": plan.contradictions,
                    "pruned": plan.pruned,
                    "params": json.dumps(plan.params),
                },
            )
        )
        self.store.commit(tenant, mutations)
        self._catch_up(tenant, state)
        return ConsolidationReport(
            id=run_id,
            tenant=tenant,
            examined=plan.examined,
            merged=len(plan.merged_pairs),
            contradictions=plan.contradictions,
            pruned=plan.pruned,
            merged_pairs=tuple(plan.merged_pairs),
        )

    # --- introspection ----------------------------------------------------------------------
    def stats(self, tenant: str) -> dict[str, Any]:
        """Counts and health figures for one tenant."""
        state = self._tenant(tenant)
        conn = self.store.reader()

        def scalar(sql: str, *params: Any) -> Any:
            return conn.execute(sql, params).fetchone()[0]

        outcomes = dict(
            conn.execute(
                "SELECT outcome, count(*) FROM items WHERE tenant = ? AND deleted = 0 GROUP BY outcome",
                (tenant,),
            ).fetchall()
        )
        links = dict(
            conn.execute(
                "SELECT kind, count(*) FROM links WHERE tenant = ? GROUP BY kind", (tenant,)
            ).fetchall()
        )
        return {
            "tenant": tenant,
            "items": sum(outcomes.values()),
            "items_success": outcomes.get("success", 0),
            "items_failure": outcomes.get("failure", 0),
            "items_deleted": scalar("SELECT count(*) FROM items WHERE tenant = ? AND deleted = 1", tenant),
            "namespaces": scalar(
                "SELECT count(DISTINCT namespace) FROM items WHERE tenant = ? AND deleted = 0", tenant
            ),
            "links": links,
            "trajectories": scalar("SELECT count(*) FROM trajectories WHERE tenant = ?", tenant),
            "consolidation_runs": scalar("SELECT count(*) FROM consolidation_runs WHERE tenant = ?", tenant),
            "uses": scalar(
                "SELECT coalesce(sum(c.uses), 0) FROM item_counters c JOIN items i ON i.id = c.item_id "
                "WHERE i.tenant = ?",
                tenant,
            ),
            "index_size": len(state.index),
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "replica_id": self.store.replica_id,
        }


# --- helpers ------------------------------------------------------------------------------------
def _aad(entity_id: str, field_name: str) -> bytes:
    """Binds a ciphertext to its row and column, so it cannot be moved to another."""
    return f"{entity_id}|{field_name}".encode()


def _embedding_text(lesson: Lesson) -> str:
    return "\n".join(part for part in (lesson.title, lesson.description, lesson.content) if part)


def _validate_label(value: str, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TAG_LENGTH:
        raise InvalidInputError(f"{name} must be a string of at most {MAX_TAG_LENGTH} characters")
    return value.strip().lower()


def _validate_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise InvalidInputError("tags must be a list of strings, not one string")
    cleaned = tuple(dict.fromkeys(_validate_label(t, "tag") for t in tags if str(t).strip()))
    if len(cleaned) > MAX_TAGS:
        raise InvalidInputError(f"at most {MAX_TAGS} tags")
    return cleaned


def _open_texts(cipher: TenantCipher, item_id: str, sealed: dict[str, Any]) -> tuple[str, ...]:
    """The item's text fields (in ``_TEXT_FIELDS`` order) opened from their sealed form."""
    return tuple(cipher.decrypt(sealed[name], _aad(item_id, name)) for name in _TEXT_FIELDS)
