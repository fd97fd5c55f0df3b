"""How the host starts the guest's programs: the command lines and the agent host's socket path.

The host never imports the guest; it only names it. Every command line that starts guest code
in a sandbox is built here, next to the names it uses, so the two sides cannot drift apart:

* :func:`runtime_argv`: ``rayflow.guest`` (``serve``, ``run SPEC``, ``host ...``) with the
  runtime's own interpreter and import path, without ``site`` (faster start, no user packages);
* :func:`launcher_argv`: the agent host's launcher (:mod:`rayflow.guest.host_launcher`), loaded as
  a top-level module from the ``rayflow/guest`` and ``rayflow/wire`` directories so that neither the
  ``rayflow`` package nor ``site`` is imported on the path of every subtask.

Standard library only, and importable as a top-level module: the launcher loads it that way.
"""

from __future__ import annotations

#: The package a sandbox runs (``python -m rayflow.guest``).
GUEST_PACKAGE = "rayflow.guest"
#: Where the agent host listens, relative to the sandbox's work directory.
AGENT_HOST_SOCKET = ".rayflow/agent-host.sock"
#: Directories (under each entry of the runtime's path) the launcher is loaded from.
LAUNCHER_DIRS = ("rayflow/guest", "rayflow/wire")


def runtime_argv(python: str, path: list[str], *args: str) -> list[str]:
    """argv that runs ``rayflow.guest`` with ``python`` and the runtime's import ``path``."""
    code = (
        f"import sys; sys.path[:0] = {path!r}; import runpy; "
        f"runpy.run_module({GUEST_PACKAGE!r}, run_name='__main__', alter_sys=True)"
    )
    return [python, "-I", "-S", "-c", code, *args]


def launcher_argv(python: str, path: list[str], socket_path: str, *args: str) -> list[str]:
    """argv that runs the agent host's launcher against ``socket_path`` (``run SPEC`` or ``ping``).

    The launcher's directories are appended (not prepended) to the interpreter's own path, so
    the standard library cannot be shadowed by the runtime's modules.
    """
    code = (
        f"import sys; P = {path!r}; sys.path += [p + '/' + d for p in P for d in {LAUNCHER_DIRS!r}]; "
        "import host_launcher; sys.exit(host_launcher.main(P, sys.argv[1:]))"
    )
    return [python, "-I", "-S", "-c", code, socket_path, *args]
