"""Benchmark of the embedded ReasoningBank: retrieval latency and recall, baselines, insert rates.

Run from the repository root: ``python benchmarks/memory.py [--quick] [--out FILE]``.

* Data: lessons generated from coding-task templates and embedded with the default hashing
  embedder (text-derived vectors; HNSW recall on random vectors would mean nothing).
* ``retrieve_*``: the full tenant-scoped ``ReasoningBank.retrieve`` (index search, SQLite fetch,
  scoring, MMR, decryption of the results) with a pre-computed query vector, which is how a hub
  receives queries; ``retrieve_text_p50_ms`` adds embedding the query text.
* ``recall_at_10``: the HNSW top-10 against an exact scan of the same vectors, counting a
  returned item as correct when it is at least as similar as the exact 10th (ties are equally
  correct answers); ``recall_at_10_strict`` counts only identical ids.
* ``index_query_p50_ms``: the HNSW search alone, for comparison with the whole pipeline.
* ``exact_scan_p50_ms``: a brute-force numpy scan over every vector of the tenant.
* ``upstream_scan_p50_ms_10k``: the upstream design's full-table-scan retrieval at 10k items
  (see ``upstream_scan.py``), against our retrieve on a 10k bank in the same run.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, percentile_ms, write_result  # noqa: E402
from upstream_scan import UpstreamScanBank  # noqa: E402

from rayflow.config import load_config  # noqa: E402
from rayflow.jobs.synthetic_tasks import lesson_texts, task_query  # noqa: E402
from rayflow.memory.bank import ReasoningBank  # noqa: E402
from rayflow.wire.memory_records import Lesson, Outcome  # noqa: E402

TENANT = "acme"
BATCH = 1000


def progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )


def build_bank(
    path: Path, texts, vectors: np.ndarray, console: Console, label: str
) -> tuple[ReasoningBank, float]:
    """A bank holding every text, filled through the batched write path; returns it and items/s."""
    config = load_config({"state_dir": path, "memory.index_save_every": 10**9}, env={})
    bank = ReasoningBank(path, config=config)
    bank.create_tenant(TENANT)
    started = time.perf_counter()
    with progress(console) as bar:
        task = bar.add_task(f"batched insert ({label})", total=len(texts))
        for start in range(0, len(texts), BATCH):
            chunk = texts[start : start + BATCH]
            lessons = [
                Lesson(
                    t.title,
                    t.description,
                    t.content,
                    Outcome.SUCCESS if t.success else Outcome.FAILURE,
                    t.tags,
                )
                for t in chunk
            ]
            bank.store_lessons(
                TENANT,
                lessons,
                namespace=f"team-{(start // BATCH) % 10}/swarm",
                embeddings=list(vectors[start : start + BATCH]),
            )
            bar.advance(task, len(chunk))
    return bank, len(texts) / (time.perf_counter() - started)


def time_calls(fn, args_list) -> list[float]:
    samples = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    args = parse_args("memory", __doc__.splitlines()[0])
    console = Console()
    n_items = 20_000 if args.quick else 100_000
    n_queries = 200 if args.quick else 1000
    n_upstream_queries = 20 if args.quick else 50
    rng = random.Random(42)
    metrics: dict[str, float | int | bool] = {}

    texts = lesson_texts(n_items, seed=1)
    queries = [task_query(rng) for _ in range(n_queries)]
    with tempfile.TemporaryDirectory(prefix="rayflow-bench-") as tmp:
        root = Path(tmp)
        probe = ReasoningBank(root / "probe", config=load_config({"state_dir": root / "probe"}, env={}))
        embedder = probe.embedder
        probe.close()
        t0 = time.perf_counter()
        with progress(console) as bar:
            task = bar.add_task("embedding lesson texts", total=n_items)
            parts = []
            for start in range(0, n_items, BATCH):
                chunk = texts[start : start + BATCH]
                parts.append(embedder.embed([f"{t.title}\n{t.description}\n{t.content}" for t in chunk]))
                bar.advance(task, len(chunk))
        vectors = np.vstack(parts)
        metrics["embed_per_s"] = round(n_items / (time.perf_counter() - t0), 1)
        query_vectors = embedder.embed(queries)

        bank, batch_rate = build_bank(root / "main", texts, vectors, console, f"{n_items} items")
        metrics["n_items"] = n_items
        metrics["dim"] = int(vectors.shape[1])
        metrics["batch_insert_per_s"] = round(batch_rate, 1)

        # Single inserts: one transaction (and one fsync) per item, embedding included.
        singles = lesson_texts(300, seed=99)
        t0 = time.perf_counter()
        for t in singles:
            bank.store_item(
                TENANT, namespace="team-0/single", title=t.title, description=t.description, content=t.content
            )
        metrics["insert_per_s"] = round(len(singles) / (time.perf_counter() - t0), 1)

        blobs = [v.astype("<f4").tobytes() for v in query_vectors]
        for b in blobs[:20]:  # warm caches and the tenant's state
            bank.retrieve(TENANT, b, k=10)
        samples = time_calls(lambda b: bank.retrieve(TENANT, b, k=10), [(b,) for b in blobs])
        metrics["retrieve_p50_ms"] = round(percentile_ms(samples, 50), 4)
        metrics["retrieve_p99_ms"] = round(percentile_ms(samples, 99), 4)
        samples = time_calls(lambda q: bank.retrieve(TENANT, q, k=10), [(q,) for q in queries[:200]])
        metrics["retrieve_text_p50_ms"] = round(percentile_ms(samples, 50), 4)
        samples = time_calls(
            lambda b: bank.retrieve(TENANT, b, k=10, namespace="team-3"), [(b,) for b in blobs[:200]]
        )
        metrics["retrieve_ns_filtered_p50_ms"] = round(percentile_ms(samples, 50), 4)

        index = bank.tenant_index(TENANT)
        samples = time_calls(lambda v: index.query(v, 10), [(v,) for v in query_vectors])
        metrics["index_query_p50_ms"] = round(percentile_ms(samples, 50), 4)
        strict_hits = tie_hits = 0
        exact_samples = []
        for v in query_vectors:
            labels, _ = index.query(v, 10)
            t0 = time.perf_counter()
            exact_labels, exact_sims = index.exact_query(v, 10)
            exact_samples.append(time.perf_counter() - t0)
            strict_hits += len(set(labels.tolist()) & set(exact_labels.tolist()))
            found = index.vectors(labels) @ (v / np.linalg.norm(v))
            tie_hits += int(np.sum(found >= exact_sims[-1] - 1e-6))
        metrics["recall_at_10"] = round(tie_hits / (10 * len(query_vectors)), 4)
        metrics["recall_at_10_strict"] = round(strict_hits / (10 * len(query_vectors)), 4)
        metrics["exact_scan_p50_ms"] = round(percentile_ms(exact_samples, 50), 4)
        metrics["speedup_vs_exact"] = round(metrics["exact_scan_p50_ms"] / metrics["retrieve_p50_ms"], 2)
        bank.close()

        # Upstream's full scan against our retrieve, both at 10k items, in this run.
        n_small = 10_000
        small, _ = build_bank(root / "small", texts[:n_small], vectors[:n_small], console, "10k items")
        upstream = UpstreamScanBank(root / "upstream.sqlite3")
        upstream.insert_many(
            [
                (
                    f"u{i}",
                    {
                        "title": t.title,
                        "description": t.description,
                        "content": t.content,
                        "domain": t.domain,
                    },
                    vectors[i],
                )
                for i, t in enumerate(texts[:n_small])
            ]
        )
        ours = time_calls(lambda b: small.retrieve(TENANT, b, k=10), [(b,) for b in blobs[:200]])
        with progress(console) as bar:
            task = bar.add_task("upstream full-scan retrieval (10k)", total=n_upstream_queries)
            theirs = []
            for v in query_vectors[:n_upstream_queries]:
                t0 = time.perf_counter()
                upstream.retrieve(v, k=10)
                theirs.append(time.perf_counter() - t0)
                bar.advance(task)
        metrics["retrieve_p50_ms_10k"] = round(percentile_ms(ours, 50), 4)
        metrics["upstream_scan_p50_ms_10k"] = round(percentile_ms(theirs, 50), 3)
        metrics["speedup_vs_upstream_10k"] = round(
            metrics["upstream_scan_p50_ms_10k"] / metrics["retrieve_p50_ms_10k"], 1
        )
        upstream.close()
        small.close()

    metrics["meets_latency_target"] = metrics["retrieve_p50_ms"] <= 0.5
    metrics["meets_recall_target"] = metrics["recall_at_10"] >= 0.95
    metrics["meets_upstream_target"] = metrics["speedup_vs_upstream_10k"] >= 50
    write_result("memory", args.quick, metrics, args.out, console)


if __name__ == "__main__":
    main()
