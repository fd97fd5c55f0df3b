"""The house rules hold: layers, the sandbox wall, Ray only at the face, no import cycles.

The rules themselves are import-linter contracts in ``pyproject.toml``; this test runs them with
the suite so that a broken contract is a failing test, and checks that the contracts still cover
every top-level part of the library (a new package nobody placed would otherwise escape them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
#: Top-level modules of ``rayflow`` that no contract needs to place: the package's face file
#: (lazy ``rayflow.init``/``Swarm``), ``python -m rayflow`` and the local service stand-ins.
UNPLACED = {"__init__", "__main__", "testing"}


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_every_import_contract_is_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint is not None, "import-linter is not installed (it is in the dev extra)"
    proc = subprocess.run(
        [lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_layers_place_every_part_of_the_library() -> None:
    layers = next(c for c in _contracts() if c["id"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}  # type: ignore[union-attr]
    parts = {
        path.stem if path.is_file() else path.name
        for path in (REPO / "rayflow").iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").is_file())
    }

    unplaced = {part for part in parts - UNPLACED if f"rayflow.{part}" not in placed}

    # The guest is the other side of the wall, kept apart by its own contracts rather than a layer.
    assert unplaced == {"guest"}


def test_the_guest_and_the_wire_may_not_reach_the_heavy_packages() -> None:
    by_id = {c["id"]: c for c in _contracts()}
    heavy = {"ray", "numpy", "hnswlib", "apsw"}

    for side in ("guest", "wire"):
        assert heavy <= set(by_id[side]["forbidden_modules"])  # type: ignore[arg-type]
    assert by_id["host-never-runs-guest"]["forbidden_modules"] == ["rayflow.guest"]
