"""Per-tenant HNSW indexes on real files: queries, filters, deletion, growth, persistence, recovery."""

from __future__ import annotations

import itertools
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rayflow.errors import DimensionMismatchError, InvalidInputError, ItemNotFoundError
from rayflow.memory.index import IndexSet, TenantIndex, meta_path_for, tenant_file_stem

pytestmark = pytest.mark.integration

DIM = 128
_TOPICS = [
    ["pytest", "fixture", "assert", "mock", "flaky", "timeout", "parametrize", "coverage"],
    ["docker", "image", "layer", "cache", "build", "registry", "container", "volume"],
    ["sql", "index", "query", "join", "transaction", "migration", "schema", "vacuum"],
    ["http", "retry", "backoff", "timeout", "header", "status", "client", "proxy"],
    ["git", "branch", "merge", "rebase", "conflict", "commit", "tag", "bisect"],
    ["numpy", "array", "dtype", "shape", "broadcast", "matrix", "vector", "slice"],
    ["thread", "lock", "deadlock", "race", "queue", "worker", "pool", "signal"],
    ["parser", "token", "grammar", "syntax", "error", "recover", "lexer", "ast"],
]
_COMMON = ["the", "fix", "when", "use", "a", "check", "before", "after", "run", "failing", "test", "then"]


def make_sentences(count: int, seed: int) -> list[str]:
    """Short task-like sentences, each mostly about one topic, so their vectors form clusters."""
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(count):
        topic = _TOPICS[rng.integers(len(_TOPICS))]
        second = _TOPICS[rng.integers(len(_TOPICS))]
        words = []
        for _ in range(rng.integers(6, 14)):
            roll = rng.random()
            pool = topic if roll < 0.55 else second if roll < 0.7 else _COMMON
            words.append(pool[rng.integers(len(pool))])
        sentences.append(" ".join(words))
    return sentences


def embed(sentences: list[str], dim: int = DIM) -> np.ndarray:
    """Signed feature hashing of word unigrams and bigrams: a text-derived vector without a model."""
    out = np.zeros((len(sentences), dim), dtype=np.float32)
    for row, sentence in enumerate(sentences):
        words = sentence.split()
        for gram in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
            code = zlib.crc32(gram.encode("utf-8"))
            out[row, code % dim] += 1.0 if code & 0x80000000 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out /= norms
    # A sentence whose grams cancel out would be a zero vector; give it a tiny distinct direction.
    empty = ~out.any(axis=1)
    out[empty, 0] = 1.0
    return out


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return embed(make_sentences(600, seed=7))


def _filled(tmp_path: Path, vectors: np.ndarray, **options: int) -> TenantIndex:
    index = TenantIndex(tmp_path / "tenant.hnsw", DIM, **options)
    index.add(np.arange(len(vectors), dtype=np.int64), vectors)
    return index


# --- queries ----------------------------------------------------------------------------------
def test_query_returns_the_item_itself_first_with_similarity_one(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    labels, sims = index.query(corpus[17], 5)
    assert 17 in labels.tolist()
    assert sims[0] == pytest.approx(1.0, abs=1e-5)


def test_similarities_are_true_cosines_sorted_best_first(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    query = corpus[3] * 4.0 + corpus[9]
    labels, sims = index.query(query, 10)
    unit = query / np.linalg.norm(query)
    expected = corpus[labels] @ unit
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    assert np.all(np.diff(sims) <= 1e-6)
    assert labels.dtype == np.int64 and sims.dtype == np.float32


def test_allowed_mask_limits_results_to_allowed_labels(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    allowed = np.zeros(len(corpus), dtype=bool)
    allowed[::7] = True
    labels, _ = index.query(corpus[1], 20, allowed=allowed)
    assert len(labels) == 20
    assert allowed[labels].all()


def test_allowed_mask_is_honoured_inside_the_hnsw_search(tmp_path: Path, corpus) -> None:
    # exact_scan_max=0 forces the filtered graph search instead of the exact scan.
    index = _filled(tmp_path, corpus, exact_scan_max=0)
    allowed = np.zeros(len(corpus), dtype=bool)
    allowed[1::2] = True
    labels, _ = index.query(corpus[2], 15, allowed=allowed)
    assert len(labels) == 15
    assert allowed[labels].all()


def test_labels_past_the_end_of_the_mask_are_not_allowed(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    allowed = np.ones(10, dtype=bool)
    labels, _ = index.query(corpus[500], 50, allowed=allowed)
    assert sorted(labels.tolist()) == list(range(10))


def test_k_larger_than_the_live_count_returns_every_live_item(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:12])
    labels, sims = index.query(corpus[0], 100)
    assert sorted(labels.tolist()) == list(range(12))
    assert len(sims) == 12


def test_k_larger_than_the_allowed_count_in_the_graph_search(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus, exact_scan_max=0)
    allowed = np.zeros(len(corpus), dtype=bool)
    allowed[[5, 50, 500]] = True
    labels, _ = index.query(corpus[0], 10, allowed=allowed)
    assert sorted(labels.tolist()) == [5, 50, 500]


def test_query_on_an_empty_index_returns_nothing(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "empty.hnsw", DIM)
    labels, sims = index.query(corpus[0], 5)
    assert labels.size == 0 and sims.size == 0


def test_mask_allowing_nothing_returns_nothing(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    labels, _ = index.query(corpus[0], 5, allowed=np.zeros(len(corpus), dtype=bool))
    assert labels.size == 0


def test_exact_query_matches_a_numpy_brute_force(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    labels, sims = index.exact_query(corpus[42], 10)
    expected_sims = np.sort(corpus @ corpus[42])[::-1][:10]
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
    np.testing.assert_allclose(corpus[labels] @ corpus[42], sims, atol=1e-5)


# --- mutation ---------------------------------------------------------------------------------
def test_deleted_items_are_not_returned(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    index.mark_deleted(np.array([17, 18, 19]))
    labels, _ = index.query(corpus[17], 50)
    assert not {17, 18, 19} & set(labels.tolist())
    assert len(index) == len(corpus) - 3
    assert 17 not in index


def test_mark_deleted_ignores_absent_and_already_deleted_labels(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:20])
    index.mark_deleted([3])
    index.mark_deleted([3, 999, 3])
    assert len(index) == 19


def test_re_adding_a_deleted_label_brings_it_back_with_its_new_vector(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:50])
    index.mark_deleted([7])
    index.add(np.array([7]), corpus[300][None, :])
    assert 7 in index and len(index) == 50
    labels, sims = index.query(corpus[300], 1)
    assert labels.tolist() == [7]
    assert sims[0] == pytest.approx(1.0, abs=1e-5)


def test_re_adding_a_live_label_replaces_its_vector(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:50])
    index.add(np.array([4]), corpus[400][None, :])
    assert len(index) == 50
    np.testing.assert_allclose(index.vectors([4])[0], corpus[400], atol=1e-6)
    assert index.query(corpus[400], 1)[0].tolist() == [4]


def test_a_label_twice_in_one_batch_keeps_its_last_vector(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM)
    index.add(np.array([1, 2, 1]), corpus[[10, 11, 12]])
    assert len(index) == 2
    np.testing.assert_allclose(index.vectors([1])[0], corpus[12], atol=1e-6)


def test_capacity_doubles_past_the_initial_capacity(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM, initial_capacity=8)
    for start in range(0, 100, 9):
        labels = np.arange(start, min(start + 9, 100))
        index.add(labels, corpus[labels])
    assert len(index) == 100
    assert index.capacity in (128, 256)
    assert index.query(corpus[99], 1)[0].tolist() == [99]


def test_deleted_slots_are_reused_instead_of_growing(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM, initial_capacity=32)
    index.add(np.arange(32), corpus[:32])
    for round_ in range(1, 6):
        index.mark_deleted(np.arange(32 * (round_ - 1), 32 * round_))
        fresh = np.arange(32 * round_, 32 * (round_ + 1))
        index.add(fresh, corpus[fresh])
    assert index.capacity == 32
    assert sorted(index.live_labels().tolist()) == list(range(160, 192))
    labels, _ = index.query(corpus[170], 5)
    assert labels[0] == 170 and set(labels.tolist()) <= set(range(160, 192))


def test_vectors_returns_unit_rows_and_refuses_labels_that_are_not_live(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:10])
    rows = index.vectors([3, 1])
    np.testing.assert_allclose(rows, corpus[[3, 1]], atol=1e-6)
    index.mark_deleted([1])
    with pytest.raises(ItemNotFoundError):
        index.vectors([3, 1])


def test_vectors_of_the_wrong_dimension_are_refused(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM)
    with pytest.raises(DimensionMismatchError):
        index.add(np.array([1]), np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(DimensionMismatchError):
        index.query(np.ones(DIM - 1, dtype=np.float32), 3)


def test_zero_and_non_finite_vectors_are_refused(tmp_path: Path) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM)
    with pytest.raises(InvalidInputError):
        index.add(np.array([1]), np.zeros((1, DIM), dtype=np.float32))
    bad = np.ones((1, DIM), dtype=np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(InvalidInputError):
        index.add(np.array([1]), bad)
    assert len(index) == 0


def test_negative_labels_are_refused(tmp_path: Path, corpus) -> None:
    index = TenantIndex(tmp_path / "t.hnsw", DIM)
    with pytest.raises(InvalidInputError):
        index.add(np.array([-1]), corpus[:1])


# --- persistence ------------------------------------------------------------------------------
def test_save_and_open_round_trip_items_deletions_and_high_water(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus)
    index.mark_deleted([5, 6])
    index.high_water = 1234
    index.save()
    assert not index.dirty

    reopened = TenantIndex.open(index.path, DIM)
    assert reopened.rebuilt_reason is None
    assert reopened.high_water == 1234
    assert len(reopened) == len(corpus) - 2
    assert 5 not in reopened and 7 in reopened
    assert reopened.query(corpus[7], 1)[0].tolist() == [7]
    np.testing.assert_allclose(reopened.vectors([7])[0], corpus[7], atol=1e-6)


def test_a_reopened_index_can_revive_labels_deleted_before_the_save(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:40])
    index.mark_deleted([9])
    index.save()
    reopened = TenantIndex.open(index.path, DIM)
    reopened.add(np.array([9]), corpus[200][None, :])
    assert len(reopened) == 40
    assert reopened.query(corpus[200], 1)[0].tolist() == [9]


def test_save_leaves_only_the_index_and_its_meta(tmp_path: Path, corpus) -> None:
    index = _filled(tmp_path, corpus[:30])
    index.save()
    index.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tenant.hnsw", "tenant.hnsw.meta.json"]
    meta = json.loads(meta_path_for(index.path).read_text())
    assert meta["dim"] == DIM and meta["space"] == "cosine" and meta["live_count"] == 30


def test_open_without_a_file_starts_empty_and_says_missing(tmp_path: Path) -> None:
    index = TenantIndex.open(tmp_path / "nothing.hnsw", DIM)
    assert index.rebuilt_reason == "missing"
    assert len(index) == 0 and index.high_water == 0


def _saved(tmp_path: Path, corpus: np.ndarray) -> Path:
    index = _filled(tmp_path, corpus[:200])
    index.high_water = 77
    index.save()
    return index.path


def test_truncated_file_gives_a_fresh_index_marked_corrupt(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    index = TenantIndex.open(path, DIM)
    assert index.rebuilt_reason is not None and index.rebuilt_reason.startswith("corrupt")
    assert len(index) == 0 and index.high_water == 0


def test_garbage_file_of_the_same_size_gives_a_fresh_index_marked_corrupt(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(1).bytes(size))
    index = TenantIndex.open(path, DIM)
    assert index.rebuilt_reason is not None and index.rebuilt_reason.startswith("corrupt")
    assert len(index) == 0


def test_missing_meta_gives_a_fresh_index(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    meta_path_for(path).unlink()
    index = TenantIndex.open(path, DIM)
    assert index.rebuilt_reason == "meta missing"
    assert len(index) == 0


def test_unreadable_meta_gives_a_fresh_index_marked_corrupt(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    meta_path_for(path).write_text("{not json")
    index = TenantIndex.open(path, DIM)
    assert index.rebuilt_reason is not None and index.rebuilt_reason.startswith("corrupt")


def test_dimension_change_gives_a_fresh_index(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    index = TenantIndex.open(path, 64)
    assert index.rebuilt_reason == "dim mismatch"
    assert index.dim == 64 and len(index) == 0


def test_a_rebuilt_index_is_usable_and_its_save_loads_again(tmp_path: Path, corpus) -> None:
    path = _saved(tmp_path, corpus)
    path.write_bytes(b"\x00" * 100)
    index = TenantIndex.open(path, DIM)
    index.add(np.arange(20), corpus[:20])
    index.high_water = 5
    index.save()
    again = TenantIndex.open(path, DIM)
    assert again.rebuilt_reason is None and len(again) == 20 and again.high_water == 5


# --- concurrency ------------------------------------------------------------------------------
def test_concurrent_readers_and_a_writer_never_crash_and_see_valid_labels(tmp_path: Path) -> None:
    vectors = embed(make_sentences(1200, seed=11))
    index = TenantIndex(tmp_path / "busy.hnsw", DIM, initial_capacity=16)
    index.add(np.arange(100), vectors[:100])

    def writer() -> None:
        for start in range(100, 1200, 50):
            batch = np.arange(start, start + 50)
            index.add(batch, vectors[batch])
            index.mark_deleted(np.arange(start - 100, start - 80))
            index.high_water = start

    def reader(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        allowed = rng.random(1200) < 0.5
        invalid: list[int] = []
        for round_ in range(300):
            mask = allowed if round_ % 2 else None
            labels, sims = index.query(vectors[rng.integers(1200)], 8, allowed=mask)
            for label in labels.tolist():
                if not 0 <= label < 1200 or (mask is not None and not mask[label]):
                    invalid.append(label)
            if sims.size and (sims.max() > 1.0 or sims.min() < -1.0):
                invalid.append(-1)
        return invalid

    with ThreadPoolExecutor(max_workers=4) as pool:
        readers = [pool.submit(reader, seed) for seed in range(3)]
        written = pool.submit(writer)
        # result() re-raises anything a thread raised.
        written.result(timeout=120)
        invalid = [label for future in readers for label in future.result(timeout=120)]
    assert invalid == []
    assert len(index) == 1200 - (1100 // 50) * 20
    assert index.high_water == 1150


# --- recall -----------------------------------------------------------------------------------
def test_hnsw_recall_against_exact_search_is_at_least_95_percent(tmp_path: Path) -> None:
    vectors = embed(make_sentences(5000, seed=3))
    queries = embed(make_sentences(100, seed=4))
    index = TenantIndex(tmp_path / "recall.hnsw", DIM)
    index.add(np.arange(len(vectors)), vectors)
    hits = 0
    for query in queries:
        approximate, _ = index.query(query, 10)
        exact, exact_sims = index.exact_query(query, 10)
        # Items tied with the 10th exact similarity are equally correct answers.
        tied = set(
            np.flatnonzero(vectors @ (query / np.linalg.norm(query)) >= exact_sims[-1] - 1e-6).tolist()
        )
        hits += len(set(approximate.tolist()) & (set(exact.tolist()) | tied))
    assert hits / (10 * len(queries)) >= 0.95


# --- many tenants -----------------------------------------------------------------------------
def test_tenant_file_names_are_safe_and_distinct() -> None:
    names = ["acme", "Acme", "ACME", "a/b", "../etc", "x-61636d65", "ünïcode", "a" * 500, "b" * 500]
    stems = [tenant_file_stem(name) for name in names]
    assert len(set(stems)) == len(names)
    assert len({stem.lower() for stem in stems}) == len(names)
    for stem in stems:
        assert len(stem) < 200
        assert all(ch.isalnum() or ch in "-_" for ch in stem)


def test_empty_tenant_name_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        tenant_file_stem("")


def test_index_set_keeps_tenants_apart_and_reopens_them(tmp_path: Path, corpus) -> None:
    indexes = IndexSet(tmp_path / "idx", DIM)
    indexes.get("alpha").add(np.arange(0, 10), corpus[:10])
    indexes.get("Beta Corp").add(np.arange(10, 20), corpus[10:20])
    assert indexes.get("alpha") is indexes.get("alpha")
    assert set(indexes.get("alpha").query(corpus[15], 20)[0].tolist()) <= set(range(10))
    assert indexes.tenants() == ["Beta Corp", "alpha"]
    indexes.close()

    reopened = IndexSet(tmp_path / "idx", DIM)
    beta = reopened.get("Beta Corp")
    assert beta.rebuilt_reason is None
    assert sorted(beta.live_labels().tolist()) == list(range(10, 20))
    assert reopened.get("gamma").rebuilt_reason == "missing"


def test_save_all_writes_only_changed_indexes(tmp_path: Path, corpus) -> None:
    indexes = IndexSet(tmp_path / "idx", DIM)
    indexes.get("alpha").add(np.arange(5), corpus[:5])
    indexes.get("idle")
    indexes.save_all()
    assert indexes.path_for("alpha").exists()
    assert not indexes.path_for("idle").exists()
    assert not indexes.get("alpha").dirty


def test_broad_filter_is_answered_by_overfetching_and_matches_the_exact_filtered_answer(tmp_path: Path) -> None:
    """A filter keeping half of a large tenant takes the unfiltered search plus a mask lookup."""
    vectors = embed(make_sentences(12_000, seed=11))
    index = _filled(tmp_path, vectors, exact_scan_max=1000, ef_search=200)
    allowed = np.zeros(len(vectors), dtype=bool)
    allowed[::2] = True
    agree = 0
    for query in vectors[1:400:20]:
        labels, _ = index.query(query, 10, allowed=allowed)
        exact, _ = index.exact_query(query, 10, allowed=allowed)
        assert len(labels) == 10 and allowed[labels].all()
        agree += len(set(labels.tolist()) & set(exact.tolist()))
    assert agree / (10 * 20) >= 0.9
