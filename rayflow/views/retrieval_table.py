"""Rich renderings of rayflow records, shared by the CLI and the jobs."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from rayflow.wire.memory_records import ScoredItem


def retrieval_table(results: Sequence[ScoredItem], title: str, *, with_ids: bool = False) -> Table:
    """One row per retrieved item with every component of its score, so a ranking can be read."""
    table = Table(title=title)
    columns = [
        "#",
        *(["id"] if with_ids else []),
        "title",
        "outcome",
        "score",
        "similarity",
        "recency",
        "reliability",
    ]
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for r in results:
        table.add_row(
            str(r.rank + 1),
            *([r.item.id] if with_ids else []),
            r.item.title if with_ids else r.item.title[:70],
            r.item.outcome.value,
            f"{r.score:.3f}",
            f"{r.similarity:.3f}",
            f"{r.recency:.3f}",
            f"{r.reliability:.3f}",
        )
    return table
