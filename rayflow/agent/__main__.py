"""Command line of the in-sandbox runtime: ``python -m rayflow.agent serve | run SPEC | --version``.

Plain ``argparse`` on purpose: the sandbox image carries no CLI framework.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rayflow.agent import runtime_version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rayflow.agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rayflow-agent {runtime_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve channel requests on stdin/stdout")
    serve.add_argument(
        "--workdir-alias",
        help="the working directory as the host names it, when the runtime's own is elsewhere",
    )
    serve.add_argument(
        "--exec-memory-bytes", type=int, help="address-space limit (RLIMIT_AS) of every command started"
    )
    run = commands.add_parser("run", help="run the subtask described by a JSON file; print a JSON result")
    run.add_argument("spec_file", help="path of the subtask spec (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="rayflow-agent: %(message)s")
    if args.command == "serve":
        from rayflow.agent.server import serve_stdio

        return serve_stdio(workdir_alias=args.workdir_alias, exec_memory_bytes=args.exec_memory_bytes)
    from rayflow.agent.runner import run_spec_file

    return run_spec_file(args.spec_file)


if __name__ == "__main__":
    sys.exit(main())
