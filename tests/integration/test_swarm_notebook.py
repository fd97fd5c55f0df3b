"""Executes the swarm quickstart notebook in a real Jupyter kernel and checks what it shows.

The notebook starts its own local Ray cluster, a hub and real sandboxes, and runs the demo's
fixing agent three times; the checks hold it to what its prose promises: the result renders as a
table, the timeline is drawn, the second run needs fewer attempts than the first, MaTTS keeps
every rollout, and the notebook shuts its Ray cluster down.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from rayflow.views.job_result import COLUMNS
from tests.notebook_support import (
    PNG_SIGNATURE,
    HtmlTable,
    cell_errors,
    execute_notebook,
    html_outputs,
    html_tables,
    is_committed_without_outputs,
    kernel_environment,
    one_png_image,
    png_images,
    stream_text,
    table_records,
    tagged_cell,
)

# The notebook takes about a minute on two cores; the module limit covers a slow, busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "swarm_quickstart.ipynb"
#: Per-cell limit: a cell runs a whole job, so this is generous and only catches a hang.
CELL_TIMEOUT_SECONDS = 300
MODULES = 8
MATTS_SUBTASKS = 4
MATTS_K = 2


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The notebook after running every cell once (shared: it runs three jobs)."""
    return execute_notebook(
        NOTEBOOK, tmp_path_factory, kernel_environment(os.environ), cell_timeout_s=CELL_TIMEOUT_SECONDS
    )


def result_tables(cell: nbformat.NotebookNode) -> list[HtmlTable]:
    """The per-subtask tables a ``JobResult`` rendered in the cell."""
    return [table for table in html_tables(cell) if table.header == list(COLUMNS)]


# --- before running ----------------------------------------------------------------------------
def test_notebook_is_committed_without_outputs() -> None:
    assert is_committed_without_outputs(NOTEBOOK)


def test_the_kernel_gets_the_suites_ray_token_and_no_foreign_ray_address() -> None:
    environment = kernel_environment({**os.environ, "RAY_ADDRESS": "10.0.0.1:6379"})
    assert environment["RAY_AUTH_MODE"] == os.environ["RAY_AUTH_MODE"] == "token"
    assert environment["RAY_AUTH_TOKEN"] == os.environ["RAY_AUTH_TOKEN"]
    assert "RAY_ADDRESS" not in environment


# --- the executed notebook ----------------------------------------------------------------------
def test_every_cell_runs_without_error(executed: nbformat.NotebookNode) -> None:
    assert cell_errors(executed) == []


def test_progress_is_shown_as_a_notebook_display(executed: nbformat.NotebookNode) -> None:
    blocks = [text for text in html_outputs(tagged_cell(executed, "run1")) if "<progress" in text]
    assert len(blocks) == 1
    assert f"{MODULES}/{MODULES}" in blocks[0]


def test_the_first_run_renders_its_result_as_an_html_table(executed: nbformat.NotebookNode) -> None:
    (table,) = result_tables(tagged_cell(executed, "run1"))
    rows = table.records()
    assert [row["#"] for row in rows] == [str(i) for i in range(MODULES)] + ["total"]
    assert all(row["ok"] == "yes" for row in rows[:-1])
    assert rows[-1]["ok"] == f"{MODULES}/{MODULES}"


def test_the_synthesized_report_is_printed(executed: nbformat.NotebookNode) -> None:
    text = stream_text(tagged_cell(executed, "report"))
    assert "Report of quickstart-run-1" in text
    assert re.search(rf"Passed\s+{MODULES}\b", text)


def test_the_timeline_is_drawn_inline_as_png(executed: nbformat.NotebookNode) -> None:
    assert one_png_image(tagged_cell(executed, "timeline")).startswith(PNG_SIGNATURE)


def test_the_second_run_needs_fewer_attempts_than_the_first(executed: nbformat.NotebookNode) -> None:
    cell = tagged_cell(executed, "compare")
    match = re.search(r"attempts: run 1 = (\d+), run 2 = (\d+)", stream_text(cell))
    assert match is not None
    first, second = int(match[1]), int(match[2])
    assert second < first
    rows = table_records(cell, "attempts per module")
    assert len(rows) == MODULES
    assert sum(int(row["run 2 memory hits"]) for row in rows) > 0
    assert len(png_images(cell)) == 1


def test_matts_keeps_every_rollout_of_every_subtask(executed: nbformat.NotebookNode) -> None:
    cell = tagged_cell(executed, "matts")
    (table,) = result_tables(cell)
    assert len(table.rows) == MATTS_SUBTASKS + 1
    rollouts = table_records(cell, "rollouts kept per subtask")
    by_subtask: dict[str, list[dict[str, str]]] = {}
    for row in rollouts:
        by_subtask.setdefault(row["subtask"], []).append(row)
    assert len(by_subtask) == MATTS_SUBTASKS
    for rows in by_subtask.values():
        assert sorted(row["rollout"] for row in rows) == [str(i) for i in range(MATTS_K)]
        assert [row["kept"] for row in rows].count("True") == 1


def test_the_notebook_shuts_its_ray_cluster_down(executed: nbformat.NotebookNode) -> None:
    assert "Ray connected: False" in stream_text(tagged_cell(executed, "shutdown"))
