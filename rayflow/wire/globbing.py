"""Which files of a repository a glob names: the "one subtask per matching file" decomposition.

Standard library only, because pattern B runs decomposition inside a sandbox, whose image carries
just the runtime and a few light modules.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from rayflow.errors import ConfigError


def glob_files(repo: Path, pattern: str) -> list[str]:
    """Sorted repository-relative paths under ``repo`` matching ``pattern`` (``**`` spans directories).

    Hidden directories (``.git``) and caches are skipped: nobody means them when asking for a glob.
    """
    if not repo.is_dir():
        raise ConfigError(f"repository {repo} is not a directory")
    found: list[str] = []
    for directory, subdirs, files in os.walk(repo):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
        for name in files:
            relative = (Path(directory) / name).relative_to(repo).as_posix()
            if _glob_match(relative, pattern):
                found.append(relative)
    return sorted(found)


def _glob_match(path: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(path, pattern):
        return True
    # "**/x" also matches "x" at the top, as shells with globstar do.
    return pattern.startswith("**/") and fnmatch.fnmatchcase(path, pattern[3:])
