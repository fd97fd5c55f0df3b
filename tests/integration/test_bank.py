"""The ReasoningBank end to end on real SQLite and HNSW files in a temporary state directory."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from rayflow.config import load_config
from rayflow.errors import (
    ConfigError,
    DimensionMismatchError,
    EmptyTextError,
    InvalidInputError,
    InvalidNamespaceError,
    ItemNotFoundError,
    PayloadTooLargeError,
    UnknownTenantError,
)
from rayflow.jobs.synthetic_tasks import lesson_texts, trajectory
from rayflow.memory.bank import ReasoningBank
from rayflow.memory.embedding import HashingEmbedder
from rayflow.wire.memory_records import Outcome, Step, Trajectory

pytestmark = pytest.mark.integration
DAY = 86_400.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_bank(path, clock=None, **overrides):
    config = load_config({"state_dir": path, **overrides}, env={})
    return ReasoningBank(path, config=config, clock=clock or Clock())


@pytest.fixture
def bank(tmp_path):
    b = open_bank(tmp_path)
    b.create_tenant("acme")
    b.create_tenant("globex")
    yield b
    b.close()


def add(bank, title, content, *, tenant="acme", namespace="swarm", **kw):
    return bank.store_item(tenant, namespace=namespace, title=title, content=content, **kw)


def test_retrieve_ranks_the_lexically_closest_item_first(bank):
    add(bank, "Fix ImportError in pytest collection", "import yaml lazily inside the config loader")
    add(bank, "Speed up the csv importer", "read rows in chunks with a buffered reader")
    add(bank, "Rotate the session store keys", "schedule key rotation weekly")
    results = bank.retrieve("acme", "pytest ImportError while importing yaml in config loader", k=3)
    assert results[0].item.title == "Fix ImportError in pytest collection"
    assert results[0].similarity > results[1].similarity


def test_each_result_carries_its_score_components(bank):
    add(bank, "Retry with backoff", "wrap the http client call in a retry with exponential backoff")
    (r,) = bank.retrieve("acme", "http client retry backoff", k=1)
    cfg = bank.config.memory
    expected = (
        cfg.weight_similarity * r.similarity
        + cfg.weight_recency * r.recency
        + cfg.weight_reliability * r.reliability
    )
    assert r.score == pytest.approx(expected)
    assert 0 < r.similarity <= 1 and r.recency == pytest.approx(1.0) and r.reliability == pytest.approx(0.5)


def test_one_tenant_never_sees_or_alters_another_tenants_items(bank):
    secret = add(bank, "Acme deploy secret sauce", "acme deploys with blue green canaries", tenant="acme")
    add(bank, "Globex note", "globex deploys on fridays", tenant="globex")
    found = bank.retrieve("globex", "acme deploys with blue green canaries", k=10)
    assert all(r.item.tenant == "globex" for r in found)
    assert secret.id not in {r.item.id for r in found}
    with pytest.raises(ItemNotFoundError):
        bank.get("globex", secret.id)
    with pytest.raises(ItemNotFoundError):
        bank.delete("globex", secret.id)
    with pytest.raises(ItemNotFoundError):
        bank.report_outcome("globex", [secret.id], success=False)
    assert bank.get("acme", secret.id).failures == 0


def test_unknown_tenant_is_a_typed_error(bank):
    with pytest.raises(UnknownTenantError):
        bank.retrieve("initech", "anything", k=1)
    with pytest.raises(UnknownTenantError):
        add(bank, "t", "c", tenant="initech")


def test_namespace_prefix_scopes_retrieval_by_whole_segments(bank):
    a = add(bank, "Parser fix", "fix the date parser timezone bug", namespace="swarm/team-a")
    b = add(bank, "Parser fix", "fix the date parser timezone bug", namespace="swarm/team-ab")
    c = add(bank, "Parser fix", "fix the date parser timezone bug", namespace="swarm/team-a/sub")
    ids = {r.item.id for r in bank.retrieve("acme", "date parser timezone", k=10, namespace="swarm/team-a")}
    assert ids == {a.id, c.id}
    assert b.id in {r.item.id for r in bank.retrieve("acme", "date parser timezone", k=10, namespace="swarm")}


def test_domain_and_outcome_filters(bank):
    ok = add(bank, "Cache warmup", "warm the lru cache on start", domain="backend", outcome="success")
    bad = add(
        bank,
        "Cache warmup failed",
        "warming the lru cache on start timed out",
        domain="backend",
        outcome="failure",
    )
    other = add(bank, "Cache warmup", "warm the lru cache on start", domain="frontend")
    assert {r.item.id for r in bank.retrieve("acme", "lru cache warm", k=10, domain="backend")} == {
        ok.id,
        bad.id,
    }
    assert {r.item.id for r in bank.retrieve("acme", "lru cache warm", k=10, outcome="failure")} == {bad.id}
    assert other.id in {r.item.id for r in bank.retrieve("acme", "lru cache warm", k=10)}


def test_min_confidence_filters_on_learned_reliability(bank):
    good = add(bank, "Use WAL mode", "sqlite database is locked: enable WAL and a busy timeout")
    bad = add(bank, "Delete the lock file", "sqlite database is locked: delete the -wal file")
    for _ in range(6):
        bank.report_outcome("acme", [good.id], success=True)
        bank.report_outcome("acme", [bad.id], success=False)
    results = bank.retrieve("acme", "sqlite database is locked", k=5, min_confidence=0.6)
    assert [r.item.id for r in results] == [good.id]


def test_reported_outcomes_update_counts_and_reliability(bank):
    item = add(bank, "Pin numpy", "pin numpy below 2 for the old extension", confidence=0.5)
    bank.report_outcome("acme", [item.id], success=True)
    bank.report_outcome("acme", [item.id, item.id], success=False)  # one report per task
    got = bank.get("acme", item.id)
    assert (got.uses, got.successes, got.failures) == (2, 1, 1)
    assert got.reliability == pytest.approx(0.5)
    assert got.last_used_at is not None
    for _ in range(8):
        bank.report_outcome("acme", [item.id], success=True)
    assert bank.get("acme", item.id).reliability > 0.8


def test_reliability_lifts_an_item_above_an_equally_similar_one(bank):
    a = add(bank, "Approach A", "restart the queue consumer after a broker failover")
    b = add(bank, "Approach B", "restart the queue consumer after a broker failover")
    for _ in range(5):
        bank.report_outcome("acme", [b.id], success=True)
        bank.report_outcome("acme", [a.id], success=False)
    results = bank.retrieve("acme", "queue consumer broker failover", k=2, mmr_lambda=1.0)
    assert [r.item.id for r in results] == [b.id, a.id]


def test_mmr_lambda_trades_relevance_for_diversity(bank):
    dupes = [
        add(bank, f"Retry variant {i}", "retry the flaky http client call with exponential backoff")
        for i in range(3)
    ]
    distinct = add(bank, "Retry budget", "cap http retries with a budget per client to avoid storms")
    query = "retry flaky http client call with exponential backoff"
    relevance_only = [r.item.id for r in bank.retrieve("acme", query, k=2, mmr_lambda=1.0)]
    diverse = [r.item.id for r in bank.retrieve("acme", query, k=2, mmr_lambda=0.3)]
    assert set(relevance_only) <= {d.id for d in dupes}
    assert distinct.id in diverse


def test_record_trajectory_judges_distills_and_credits_used_items(bank):
    used = add(bank, "Reproduce first", "write a failing test before changing the code")
    rng = __import__("random").Random(3)
    ok = trajectory(rng, task_id="t1", success=True)
    ok = Trajectory(**{**ok.__dict__, "used_item_ids": (used.id,)})
    record = bank.record_trajectory("acme", ok)
    assert record.verdict.outcome is Outcome.SUCCESS
    assert 1 <= len(record.item_ids) <= 3
    assert all(bank.get("acme", i).outcome is Outcome.SUCCESS for i in record.item_ids)
    assert bank.get("acme", used.id).successes == 1
    failed = bank.record_trajectory("acme", trajectory(rng, task_id="t2", success=False))
    assert failed.verdict.outcome is Outcome.FAILURE
    lessons = [bank.get("acme", i) for i in failed.item_ids]
    assert lessons and all(item.outcome is Outcome.FAILURE for item in lessons)
    assert bank.stats("acme")["trajectories"] == 2


def test_secrets_are_scrubbed_before_anything_reaches_disk(bank, tmp_path):
    token = "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0EdCbA9"
    item = add(bank, "Deploy notes", f"export GITHUB_TOKEN={token} then mail ops@example.com")
    bank.record_trajectory(
        "acme",
        Trajectory(
            task_id="t",
            query="deploy",
            steps=(Step(f"curl -H 'Authorization: Bearer {token}'", "ok"),),
            exit_code=0,
            tests_passed=3,
            tests_failed=0,
            final_output=f"done {token}",
        ),
    )
    stored = bank.get("acme", item.id).content
    assert token not in stored and "ops@example.com" not in stored and "[REDACTED" in stored
    bank.flush()
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert token.encode() not in blob


def test_text_is_encrypted_at_rest(bank, tmp_path):
    add(bank, "Unmistakable plaintext marker", "zebra-quokka-narwhal is the content")
    bank.flush()
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "keys" not in p.parts)
    assert b"zebra-quokka-narwhal" not in blob and b"Unmistakable" not in blob
    key_file = tmp_path / "keys" / "tenant-keys.json"
    assert key_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"title": "  ", "content": "x"}, EmptyTextError),
        ({"title": "t", "content": ""}, EmptyTextError),
        ({"title": "t", "content": "x" * (64 * 1024 + 1)}, PayloadTooLargeError),
        ({"title": "t", "content": "c", "namespace": "a/../b"}, InvalidNamespaceError),
        ({"title": "t", "content": "c", "confidence": 1.5}, InvalidInputError),
        ({"title": "t", "content": "c", "tags": "not-a-list"}, InvalidInputError),
        ({"title": "t", "content": "c", "embedding": np.ones(17, dtype=np.float32)}, DimensionMismatchError),
        ({"title": "t", "content": "c", "embedding": b"\x00\x01\x02"}, DimensionMismatchError),
        ({"title": "t", "content": "c", "embedding": np.zeros(384, dtype=np.float32)}, InvalidInputError),
    ],
)
def test_bad_input_gets_a_typed_error_and_stores_nothing(bank, kwargs, error):
    kwargs = {"namespace": "swarm", **kwargs}
    with pytest.raises(error):
        bank.store_item("acme", **kwargs)
    assert bank.stats("acme")["items"] == 0


def test_bad_retrieve_arguments_get_typed_errors(bank):
    add(bank, "t", "content words")
    for kwargs, error in (
        ({"query": ""}, EmptyTextError),
        ({"query": "x", "k": 0}, InvalidInputError),
        ({"query": "x", "mmr_lambda": 2.0}, InvalidInputError),
        ({"query": np.ones(10, dtype=np.float32)}, DimensionMismatchError),
        ({"query": "x", "namespace": "../etc"}, InvalidNamespaceError),
        ({"query": "x", "outcome": "meh"}, ValueError),
    ):
        with pytest.raises(error):
            bank.retrieve("acme", **kwargs)


def test_precomputed_embeddings_as_bytes_are_accepted(bank):
    vector = bank.embedder.embed(["bytes travel over the wire"])[0]
    item = add(bank, "wire", "bytes travel over the wire", embedding=vector.astype("<f4").tobytes())
    (hit,) = bank.retrieve("acme", vector.astype("<f4").tobytes(), k=1)
    assert hit.item.id == item.id and hit.similarity == pytest.approx(1.0, abs=1e-5)


def test_consolidation_merges_duplicates_keeping_counts_and_a_link(bank):
    first = add(bank, "Fix flaky test", "mark the network test and fake the socket in the unit test")
    second = add(bank, "Fix flaky test", "mark the network test and fake the socket in the unit test")
    bank.report_outcome("acme", [first.id], success=True)
    bank.report_outcome("acme", [second.id], success=True)
    bank.report_outcome("acme", [second.id], success=False)
    report = bank.consolidate("acme")
    assert report.merged == 1
    survivor = bank.get("acme", first.id)
    assert (survivor.uses, survivor.successes, survivor.failures) == (3, 2, 1)
    with pytest.raises(ItemNotFoundError):
        bank.get("acme", second.id)
    assert (second.id, "duplicate_of", first.id) in bank.links("acme", first.id)
    assert [r.item.id for r in bank.retrieve("acme", "flaky network test socket", k=5)] == [first.id]


def test_consolidation_links_contradicting_outcomes(bank):
    a = add(
        bank, "Bump the pool size", "raise the db connection pool size to fix timeouts", outcome="success"
    )
    b = add(
        bank, "Bump the pool size", "raise the db connection pool size to fix timeouts", outcome="failure"
    )
    assert bank.consolidate("acme").contradictions == 1
    assert any(kind == "contradicts" for _, kind, _ in bank.links("acme", a.id))
    assert bank.get("acme", b.id)  # both kept
    assert bank.consolidate("acme", full=True).contradictions == 0  # linked once


def test_consolidation_prunes_stale_low_confidence_items(tmp_path):
    clock = Clock()
    bank = open_bank(tmp_path, clock)
    try:
        bank.create_tenant("acme")
        weak = add(bank, "Bad idea", "disable the tests to make ci green")
        fresh = add(bank, "Good idea", "reproduce the failure with a minimal test first")
        for _ in range(4):
            bank.report_outcome("acme", [weak.id], success=False)
        assert bank.consolidate("acme").pruned == 0  # low confidence but recently used
        clock.now += 45 * DAY
        report = bank.consolidate("acme")
        assert report.pruned == 1
        with pytest.raises(ItemNotFoundError):
            bank.get("acme", weak.id)
        assert bank.get("acme", fresh.id)
    finally:
        bank.close()


def test_recency_decays_with_age(tmp_path):
    clock = Clock()
    bank = open_bank(tmp_path, clock)
    try:
        bank.create_tenant("acme")
        add(bank, "Old trick", "vacuum the sqlite database weekly")
        clock.now += 30 * DAY
        (r,) = bank.retrieve("acme", "vacuum sqlite database", k=1)
        assert r.recency == pytest.approx(0.5, rel=1e-3)
    finally:
        bank.close()


def test_corrupt_index_file_is_rebuilt_from_sqlite(tmp_path):
    bank = open_bank(tmp_path)
    bank.create_tenant("acme")
    ids = [
        bank.store_item("acme", namespace="n", title=t.title, content=t.content).id for t in lesson_texts(50)
    ]
    bank.close()
    index_files = list((tmp_path / "memory" / "index").glob("*.hnsw"))
    assert index_files
    for path in index_files:
        path.write_bytes(os.urandom(path.stat().st_size))
    reopened = open_bank(tmp_path)
    try:
        assert reopened.stats("acme")["index_size"] == 50
        text = lesson_texts(50)[7]
        assert reopened.retrieve("acme", text.content, k=1)[0].item.id == ids[7]
    finally:
        reopened.close()


def test_index_catches_up_after_a_kill_9_before_it_was_saved(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        from rayflow.config import load_config
        from rayflow.memory.bank import ReasoningBank
        from rayflow.jobs.synthetic_tasks import lesson_texts
        path = {str(tmp_path)!r}
        bank = ReasoningBank(path, config=load_config({{"state_dir": path}}, env={{}}))
        bank.create_tenant("acme")
        for t in lesson_texts(5000):
            item = bank.store_item("acme", namespace="n", title=t.title, content=t.content)
            print(item.id, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 120:
            os.kill(proc.pid, 9)
            break
    proc.wait()
    acked += [x.strip() for x in proc.stdout if x.strip()]
    bank = open_bank(tmp_path)
    try:
        assert bank.stats("acme")["index_size"] >= len(acked)
        texts = lesson_texts(len(acked))
        hits = bank.retrieve("acme", texts[100].content, k=1)
        assert hits[0].item.id == acked[100]
    finally:
        bank.close()


def test_reopening_with_a_different_embedder_is_refused(tmp_path):
    bank = open_bank(tmp_path)
    bank.create_tenant("acme")
    bank.close()
    config = load_config({"state_dir": tmp_path}, env={})
    with pytest.raises(ConfigError):
        ReasoningBank(tmp_path, config=config, embedder=HashingEmbedder(dim=128))


def test_concurrent_readers_and_a_writer_stay_consistent(bank):
    texts = lesson_texts(400)
    for t in texts[:100]:
        add(bank, t.title, t.content)
    errors = []

    def reader():
        try:
            for t in texts[:60]:
                results = bank.retrieve("acme", t.content, k=5)
                assert results and all(r.item.tenant == "acme" for r in results)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def writer():
        try:
            bank.store_lessons("acme", [], namespace="swarm")
            for t in texts[100:400]:
                add(bank, t.title, t.content)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert bank.stats("acme")["items"] == 400


def test_writes_from_another_process_are_seen_without_reopening(tmp_path):
    bank = open_bank(tmp_path)
    bank.create_tenant("acme")
    add(bank, "Local item", "written by this process about caching")
    script = textwrap.dedent(
        f"""
        from rayflow.config import load_config
        from rayflow.memory.bank import ReasoningBank
        path = {str(tmp_path)!r}
        with ReasoningBank(path, config=load_config({{"state_dir": path}}, env={{}})) as other:
            item = other.store_item("acme", namespace="swarm", title="Remote item",
                                    content="written by another process about zebra migrations")
            print(item.id)
        """
    )
    try:
        remote_id = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
        ).stdout.strip()
        hits = bank.retrieve("acme", "zebra migrations", k=1)
        assert hits[0].item.id == remote_id
    finally:
        bank.close()
