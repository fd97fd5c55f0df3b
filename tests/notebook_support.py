"""Runs a repository notebook in a real Jupyter kernel of this interpreter and reads what its cells showed.

Shared by the notebook tests: each executes one notebook once per module and checks specific
outputs. Why a kernel spec of our own: the kernel must run this interpreter, so the notebook
imports the rayflow under test, and resolving "python3" the usual way is not reliable (see
:func:`execute_notebook`). Why an explicit kernel environment: the kernel must see the suite's
settings that matter (the Ray token, ``RAY_AUTH_*``) and none that would change what a notebook
shows (the person's ``RAYFLOW_*`` settings, a ``RAY_ADDRESS`` pointing at another cluster).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

KERNEL_NAME = "python3"
KERNEL_STARTUP_TIMEOUT_SECONDS = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Variables of the test process a notebook kernel must not inherit.
DROPPED_PREFIXES = ("RAYFLOW_",)
DROPPED_NAMES = ("RAY_ADDRESS",)


def kernel_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The kernel's environment: ``base`` without rayflow settings or a Ray address to connect to.

    Everything else is kept on purpose, ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` above all: a Ray
    cluster the notebook starts must use the same token authentication as the rest of the suite.
    """
    return {
        name: value
        for name, value in base.items()
        if name not in DROPPED_NAMES and not name.startswith(DROPPED_PREFIXES)
    }


def execute_notebook(
    notebook_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    environment: Mapping[str, str],
    *,
    cell_timeout_s: float,
    startup_timeout_s: float = KERNEL_STARTUP_TIMEOUT_SECONDS,
) -> nbformat.NotebookNode:
    """``notebook_path`` after running every cell once, in a fresh kernel started with ``environment``.

    The kernel runs in an empty temporary directory. Cells keep running after an error
    (``allow_errors``), so one test can list every failing cell, the output checks still report
    what did run, and a notebook's closing cells (shutting down what it started) always run.
    """
    # Resolving "python3" the usual way may find a spec in ~/.local/share/jupyter or
    # /usr/share/jupyter that points at another Python, and whether those win over the venv's own
    # spec depends on JUPYTER_PREFER_ENV_PATH. JUPYTER_PATH is searched before all of them, so a
    # spec written there for sys.executable always wins. It applies to this lookup only and
    # installs nothing into the venv or the user's home.
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(path=jupyter_dir / "kernels" / KERNEL_NAME)
    workdir = tmp_path_factory.mktemp("notebook-cwd")
    notebook = nbformat.read(notebook_path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=cell_timeout_s,
        startup_timeout=startup_timeout_s,
        allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_dir))
        # The kernel is started with exactly this environment (the provisioner copies it).
        client.execute(env=dict(environment))
    return notebook


def is_committed_without_outputs(notebook_path: Path) -> bool:
    """Whether the file is a valid notebook whose code cells carry no outputs or execution counts."""
    notebook = nbformat.read(notebook_path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    return bool(code_cells) and all(c.outputs == [] and c.execution_count is None for c in code_cells)


def cell_errors(notebook: nbformat.NotebookNode) -> list[str]:
    """``"cell <id>: <name>: <message>"`` for every error output of an executed notebook."""
    return [
        f"cell {cell.get('id')}: {output.ename}: {output.evalue}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


# --- reading outputs ----------------------------------------------------------------------------
def tagged_cell(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    """The one cell whose metadata carries ``tag``."""
    tagged = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged {tag!r}, found {len(tagged)}"
    return tagged[0]


def stream_text(cell: nbformat.NotebookNode) -> str:
    """Everything the cell printed (stdout and stderr)."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def html_outputs(cell: nbformat.NotebookNode) -> list[str]:
    """The ``text/html`` of every displayed or returned output of the cell, in order."""
    return [o["data"]["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]


def png_images(cell: nbformat.NotebookNode) -> list[bytes]:
    """The decoded bytes of every ``image/png`` output of the cell."""
    return [
        base64.b64decode(output["data"]["image/png"])
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]


def one_png_image(cell: nbformat.NotebookNode) -> bytes:
    """The decoded bytes of the cell's only ``image/png`` output (a plot it drew inline once)."""
    images = png_images(cell)
    assert len(images) == 1, f"expected one PNG output, found {len(images)}"
    return images[0]


@dataclass
class HtmlTable:
    """One ``<table>`` of an output: caption, header cells and body rows (as cell texts)."""

    caption: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)

    def records(self) -> list[dict[str, str]]:
        """Rows as dicts keyed by column header."""
        return [dict(zip(self.header, row)) for row in self.rows]


class _TableParser(HTMLParser):
    """Collects the tables of an HTML fragment: caption, header cells and rows of data cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[HtmlTable] = []
        self._in: str | None = None
        self._text: list[str] = []
        self._row: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append(HtmlTable())
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
                self.tables[-1].rows.append(self._row)
            return
        text = "".join(self._text).strip()
        if tag == "caption":
            self.tables[-1].caption = text
        elif tag == "th":
            self.tables[-1].header.append(text)
        else:
            self._row.append(text)
        self._in = None


def html_tables(cell: nbformat.NotebookNode) -> list[HtmlTable]:
    """Every HTML table the cell displayed, in order."""
    parser = _TableParser()
    for html_text in html_outputs(cell):
        parser.feed(html_text)
    return parser.tables


def table_records(cell: nbformat.NotebookNode, caption_start: str) -> list[dict[str, str]]:
    """The rows of the one table of the cell whose caption starts with ``caption_start``."""
    matches = [t for t in html_tables(cell) if t.caption.startswith(caption_start)]
    captions = [t.caption for t in html_tables(cell)]
    assert len(matches) == 1, f"expected one table captioned {caption_start!r}, got {captions}"
    return matches[0].records()
