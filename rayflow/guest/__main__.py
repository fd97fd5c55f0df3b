"""Command line of the in-sandbox runtime: ``python -m rayflow.guest serve | run SPEC | host | --version``.

Plain ``argparse`` on purpose: the sandbox image carries no CLI framework.

Start-up cost matters here: ``serve`` is the main process of every sandbox, so its start is part
of every cold sandbox start. Hence the version (read from package metadata, ~15 ms) is looked up
only when ``--version`` is asked for, and a well-formed ``serve`` command line is read without
building the ``argparse`` parser (~4 ms with its message catalogue); anything else, including
every malformed line, goes through ``argparse`` for its usual messages.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

#: Options of ``serve``: name -> (converter, help).
SERVE_OPTIONS: dict[str, tuple[type, str]] = {
    "--workdir-alias": (
        str,
        "the working directory as the host names it, when the runtime's own is elsewhere",
    ),
    "--exec-memory-bytes": (int, "address-space limit (RLIMIT_AS) of every command started"),
}


def _parser() -> argparse.ArgumentParser:
    import argparse

    class VersionAction(argparse.Action):
        """``--version``: prints the runtime's version, computed only when asked."""

        def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
            super().__init__(
                option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
            )

        def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
            from rayflow.guest import runtime_version

            print(f"rayflow-agent {runtime_version()}")
            parser.exit()

    parser = argparse.ArgumentParser(prog="python -m rayflow.guest", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=VersionAction, help="print the runtime's version and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve channel requests on stdin/stdout")
    for name, (kind, text) in SERVE_OPTIONS.items():
        serve.add_argument(name, type=kind, help=text)
    run = commands.add_parser("run", help="run the subtask described by a JSON file; print a JSON result")
    run.add_argument("spec_file", help="path of the subtask spec (JSON)")
    host = commands.add_parser("host", help="serve subtask runs from a pre-imported process on a unix socket")
    host.add_argument("--socket", default=None, help="path of the socket (default: .rayflow/agent-host.sock)")
    host.add_argument("--preload", default="", help="comma-separated modules to import ahead of time")
    host.add_argument("--detach", action="store_true", help="return once the socket listens; serve in the background")
    host.add_argument("--log", default=None, help="where a detached host writes its log (default: SOCKET.log)")
    return parser


def parse_serve(argv: Sequence[str]) -> dict[str, object] | None:
    """The options of a well-formed ``serve [--name=value | --name value]...`` line, else ``None``.

    ``None`` (anything unusual: another command, help, a repeated or unknown option, a bad number)
    sends the line to ``argparse``, which accepts or rejects it with its own messages.
    """
    if not argv or argv[0] != "serve":
        return None
    options: dict[str, object] = {}
    rest = list(argv[1:])
    while rest:
        name, sep, value = rest.pop(0).partition("=")
        if name not in SERVE_OPTIONS or name in options:
            return None
        if not sep:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        try:
            options[name] = SERVE_OPTIONS[name][0](value)
        except ValueError:
            return None
    return {_dest(name): options.get(name) for name in SERVE_OPTIONS}


def _dest(option: str) -> str:
    """``--exec-memory-bytes`` -> ``exec_memory_bytes``, as ``argparse`` names it."""
    return option[2:].replace("-", "_")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    serve = parse_serve(args)
    if serve is None:
        parsed = _parser().parse_args(args)
        if parsed.command == "serve":
            serve = {_dest(name): getattr(parsed, _dest(name)) for name in SERVE_OPTIONS}
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="rayflow-agent: %(message)s")
    if serve is not None:
        from rayflow.guest.runtime import serve_stdio

        return serve_stdio(**serve)  # type: ignore[arg-type]
    if parsed.command == "host":
        from rayflow.guest.agent_host import parse_preload, serve_host
        from rayflow.wire.guest_commands import AGENT_HOST_SOCKET

        return serve_host(
            parsed.socket or AGENT_HOST_SOCKET,
            preload_names=parse_preload(parsed.preload),
            detach=parsed.detach,
            log_path=parsed.log,
        )
    from rayflow.guest.runner import run_spec_file

    return run_spec_file(parsed.spec_file)


if __name__ == "__main__":
    sys.exit(main())
