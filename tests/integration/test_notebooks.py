"""Executes the ReasoningBank quickstart notebook in a real Jupyter kernel and checks what it shows.

A notebook is documentation that can rot silently: an API change breaks a cell and nobody notices
until a newcomer tries it. Running it here keeps it honest, and checking specific outputs (not
only "no error") keeps its story true: the table shows the lesson the text talks about, the plot
is really drawn, and the comparisons come out the way the prose says.
"""

from __future__ import annotations

import base64
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "reasoningbank_quickstart.ipynb"
KERNEL_NAME = "python3"
#: Per-cell limit; the whole notebook takes a few seconds, so this only catches a hang.
CELL_TIMEOUT_SECONDS = 120
KERNEL_STARTUP_TIMEOUT_SECONDS = 60
HANDBOOK_CONFIG_TITLE = "Config loader: read optional settings with .get and a documented default"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The quickstart notebook after running every cell once (shared: a kernel start costs seconds)."""
    # The kernel must run this interpreter, so the notebook imports the rayflow under test.
    # Resolving "python3" the usual way is not reliable: a spec of that name in the user's
    # ~/.local/share/jupyter or in /usr/share/jupyter may point at another Python, and whether
    # those win over the venv's own spec depends on JUPYTER_PREFER_ENV_PATH. JUPYTER_PATH is
    # searched before all of them, so a spec written there for sys.executable always wins. It
    # applies to this test only and installs nothing into the venv or the user's home.
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(path=jupyter_dir / "kernels" / KERNEL_NAME)
    workdir = tmp_path_factory.mktemp("notebook-cwd")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_SECONDS,
        startup_timeout=KERNEL_STARTUP_TIMEOUT_SECONDS,
        # Keep going after an error, so one test can list every failing cell and the output
        # checks still report what did run.
        allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_dir))
        # The notebook reads its settings with load_config; a RAYFLOW_* variable of the person
        # running the tests must not change what it shows.
        for name in list(os.environ):
            if name.startswith("RAYFLOW_"):
                patch.delenv(name)
        client.execute()
    return notebook


# --- reading outputs ----------------------------------------------------------------------------
def _cell(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    tagged = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged {tag!r}, found {len(tagged)}"
    return tagged[0]


def _stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


class _TableParser(HTMLParser):
    """Collects the tables that the notebook's ``show_table`` renders: caption, header, rows."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self._in: str | None = None
        self._text: list[str] = []
        self._row: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append({"caption": "", "header": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("caption", "th", "td"):
            self._in, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._in:
            if tag == "tr" and self._row and self.tables:
                self.tables[-1]["rows"].append(self._row)
            return
        text = "".join(self._text).strip()
        if tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag == "th":
            self.tables[-1]["header"].append(text)
        else:
            self._row.append(text)
        self._in = None


def _tables(cell: nbformat.NotebookNode) -> dict[str, list[dict[str, str]]]:
    """Caption -> rows (as dicts keyed by column header) of every HTML table a cell displayed."""
    parser = _TableParser()
    for output in cell.outputs:
        html_text = output.get("data", {}).get("text/html")
        if html_text:
            parser.feed(html_text)
    return {t["caption"]: [dict(zip(t["header"], row)) for row in t["rows"]] for t in parser.tables}


def _table(cell: nbformat.NotebookNode, caption_start: str) -> list[dict[str, str]]:
    matches = [rows for caption, rows in _tables(cell).items() if caption.startswith(caption_start)]
    assert len(matches) == 1, f"expected one table captioned {caption_start!r}, got {list(_tables(cell))}"
    return matches[0]


# --- the committed file -------------------------------------------------------------------------
def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells)


# --- the executed notebook ----------------------------------------------------------------------
def test_every_cell_runs_without_error(executed: nbformat.NotebookNode) -> None:
    errors = [
        f"cell {cell.get('id')}: {output.ename}: {output.evalue}"
        for cell in executed.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert errors == []


def test_retrieval_table_ranks_the_handbook_config_lesson_first(executed: nbformat.NotebookNode) -> None:
    rows = _table(_cell(executed, "retrieval"), "retrieve:")
    assert rows[0]["rank"] == "1"
    assert rows[0]["title"] == HANDBOOK_CONFIG_TITLE
    assert {"score", "similarity", "recency", "reliability"} <= set(rows[0])
    assert len(rows) == 5


def test_trajectory_verdicts_show_one_success_and_one_failure(executed: nbformat.NotebookNode) -> None:
    cell = _cell(executed, "trajectories")
    verdicts = _table(cell, "verdicts")
    assert [row["verdict"] for row in verdicts] == ["success", "failure"]
    lessons = _table(cell, "distilled lessons")
    assert {row["outcome"] for row in lessons} == {"success", "failure"}


def test_reliability_plot_is_rendered_inline_as_png(executed: nbformat.NotebookNode) -> None:
    images = [
        base64.b64decode(output["data"]["image/png"])
        for output in _cell(executed, "reliability").outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1
    assert images[0].startswith(PNG_SIGNATURE)


def test_lower_mmr_lambda_returns_more_diverse_results(executed: nbformat.NotebookNode) -> None:
    text = _stream_text(_cell(executed, "mmr"))
    cosine = {
        float(lam): float(value)
        for lam, value in re.findall(r"mmr_lambda=([\d.]+): mean pairwise cosine ([\d.]+)", text)
    }
    assert set(cosine) == {1.0, 0.3}
    assert cosine[0.3] < cosine[1.0]


def test_consolidation_merges_links_and_prunes(executed: nbformat.NotebookNode) -> None:
    cell = _cell(executed, "consolidation")
    (report,) = _table(cell, "consolidation report")
    assert int(report["merged"]) >= 1
    assert int(report["contradictions"]) >= 1
    assert int(report["pruned"]) >= 1
    links = {(row["from"], row["link"], row["to"]) for row in _table(cell, "links of")}
    assert ("reworded copy", "duplicate_of", "handbook lesson") in links
    assert "pruned (helps 15% of the time)" in _stream_text(cell)


def test_reopened_bank_serves_the_same_items(executed: nbformat.NotebookNode) -> None:
    cell = _cell(executed, "reopen")
    rows = _table(cell, "after reopening")
    assert HANDBOOK_CONFIG_TITLE in [row["title"] for row in rows]
    assert re.search(r"reopened: \d+ live items", _stream_text(cell))
