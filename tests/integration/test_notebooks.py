"""Executes the ReasoningBank quickstart notebook in a real Jupyter kernel and checks what it shows.

A notebook is documentation that can rot silently: an API change breaks a cell and nobody notices
until a newcomer tries it. Running it here keeps it honest, and checking specific outputs (not
only "no error") keeps its story true: the table shows the lesson the text talks about, the plot
is really drawn, and the comparisons come out the way the prose says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from tests.notebook_support import (
    PNG_SIGNATURE,
    cell_errors,
    execute_notebook,
    is_committed_without_outputs,
    kernel_environment,
    one_png_image,
    stream_text,
    table_records,
    tagged_cell,
)

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "reasoningbank_quickstart.ipynb"
#: Per-cell limit; the whole notebook takes a few seconds, so this only catches a hang.
CELL_TIMEOUT_SECONDS = 120
HANDBOOK_CONFIG_TITLE = "Config loader: read optional settings with .get and a documented default"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The quickstart notebook after running every cell once (shared: a kernel start costs seconds)."""
    # The notebook reads its settings with load_config; a RAYFLOW_* variable of the person
    # running the tests must not change what it shows (kernel_environment drops them).
    return execute_notebook(
        NOTEBOOK, tmp_path_factory, kernel_environment(os.environ), cell_timeout_s=CELL_TIMEOUT_SECONDS
    )


# --- the committed file -------------------------------------------------------------------------
def test_notebook_is_committed_without_outputs() -> None:
    assert is_committed_without_outputs(NOTEBOOK)


# --- the executed notebook ----------------------------------------------------------------------
def test_every_cell_runs_without_error(executed: nbformat.NotebookNode) -> None:
    assert cell_errors(executed) == []


def test_retrieval_table_ranks_the_handbook_config_lesson_first(executed: nbformat.NotebookNode) -> None:
    rows = table_records(tagged_cell(executed, "retrieval"), "retrieve:")
    assert rows[0]["rank"] == "1"
    assert rows[0]["title"] == HANDBOOK_CONFIG_TITLE
    assert {"score", "similarity", "recency", "reliability"} <= set(rows[0])
    assert len(rows) == 5


def test_trajectory_verdicts_show_one_success_and_one_failure(executed: nbformat.NotebookNode) -> None:
    cell = tagged_cell(executed, "trajectories")
    verdicts = table_records(cell, "verdicts")
    assert [row["verdict"] for row in verdicts] == ["success", "failure"]
    lessons = table_records(cell, "distilled lessons")
    assert {row["outcome"] for row in lessons} == {"success", "failure"}


def test_reliability_plot_is_rendered_inline_as_png(executed: nbformat.NotebookNode) -> None:
    assert one_png_image(tagged_cell(executed, "reliability")).startswith(PNG_SIGNATURE)


def test_lower_mmr_lambda_returns_more_diverse_results(executed: nbformat.NotebookNode) -> None:
    text = stream_text(tagged_cell(executed, "mmr"))
    cosine = {
        float(lam): float(value)
        for lam, value in re.findall(r"mmr_lambda=([\d.]+): mean pairwise cosine ([\d.]+)", text)
    }
    assert set(cosine) == {1.0, 0.3}
    assert cosine[0.3] < cosine[1.0]


def test_consolidation_merges_links_and_prunes(executed: nbformat.NotebookNode) -> None:
    cell = tagged_cell(executed, "consolidation")
    (report,) = table_records(cell, "consolidation report")
    assert int(report["merged"]) >= 1
    assert int(report["contradictions"]) >= 1
    assert int(report["pruned"]) >= 1
    links = {(row["from"], row["link"], row["to"]) for row in table_records(cell, "links of")}
    assert ("reworded copy", "duplicate_of", "handbook lesson") in links
    assert "pruned (helps 15% of the time)" in stream_text(cell)


def test_reopened_bank_serves_the_same_items(executed: nbformat.NotebookNode) -> None:
    cell = tagged_cell(executed, "reopen")
    rows = table_records(cell, "after reopening")
    assert HANDBOOK_CONFIG_TITLE in [row["title"] for row in rows]
    assert re.search(r"reopened: \d+ live items", stream_text(cell))
