"""The README's layout section matches the tree: every path it names exists, and it names every
part of the library, of the wall and of the guest (so a new room cannot go undescribed)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Folders whose every entry the layout must name.
LISTED_IN_FULL = ("rayflow", "rayflow/wire", "rayflow/guest")


def _layout_paths() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block is not None, "the layout section has no code block"
    paths: list[str] = []
    parents: list[str] = []
    for line in block[1].splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.split(r" {2,}", line.strip(), maxsplit=1)[0].split()
        del parents[depth:]
        prefix = "/".join(parents)
        for name in names:
            paths.append(f"{prefix}/{name}".lstrip("/").rstrip("/"))
        if names[-1].endswith("/"):
            parents.append(names[-1].rstrip("/"))
    return paths


def test_every_path_the_layout_names_exists() -> None:
    missing = [path for path in _layout_paths() if not (REPO / path).exists()]
    assert missing == []


def test_the_layout_names_every_part_of_the_library_the_wall_and_the_guest() -> None:
    named = set(_layout_paths())
    unnamed = [
        f"{folder}/{entry.name}"
        for folder in LISTED_IN_FULL
        for entry in sorted((REPO / folder).iterdir())
        if _is_part(entry) and f"{folder}/{entry.name}" not in named
    ]
    assert unnamed == []


def _is_part(entry: Path) -> bool:
    """A module or package of its folder (a package's own ``__init__`` is named by the folder)."""
    if entry.is_dir():
        return (entry / "__init__.py").is_file()
    return entry.suffix == ".py" and (entry.name != "__init__.py" or entry.parent.name == "rayflow")
