"""Command line: ``python -m pipeline [COMMAND] ...``.

``python -m pipeline FILE.yaml`` runs the pipeline (the ``run`` command);
every other command is a sub-command module with ``add_arguments(parser)`` and
``main(args) -> int``, imported only when used (MediaPipe and aiortc are heavy).
User mistakes (a :class:`~pipeline.errors.PosewireError`) are printed as one
clear message and exit non-zero, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, cast

from pipeline.errors import ConfigError, PosewireError, TransportError


class _Command(Protocol):
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


#: command name -> module implementing it
COMMANDS: dict[str, str] = {
    "run": "pipeline.cli.run",
    "validate": "pipeline.cli.validate",
    "detect": "pipeline.cli.detect",
    "serve": "pipeline.cli.serve",
    "token": "pipeline.cli.token",
    "receive": "pipeline.cli.receive",
    "report": "pipeline.cli.report",
    "ctl": "pipeline.cli.ctl",
    "replay": "pipeline.cli.replay",
    "export": "pipeline.cli.export",
}

EXIT_USAGE = 2


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` (repeatable, or a comma list: tried in turn) and ``--ca-file``,
    the options of every command that joins a room."""
    parser.add_argument(
        "--server",
        required=True,
        action="append",
        metavar="URL",
        help="server URL, e.g. http://127.0.0.1:8765 or https://rooms.example.org; repeat it "
        "(or give a comma list) for servers tried in turn when one is lost",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="CA certificate(s) to verify https/wss servers with (default: the system's CAs)",
    )


def check_server_arguments(args: argparse.Namespace) -> None:
    """Refuse bad ``--server``/``--ca-file`` values (naming the option) before connecting."""
    from pipeline.model.tls import client_context
    from pipeline.transports.endpoints import server_urls

    try:
        server_urls(args.server)
    except TransportError as exc:
        raise ConfigError([f"--server: {exc}"]) from None
    if args.ca_file is not None:
        client_context(args.ca_file, field="--ca-file")


def _load(name: str) -> _Command:
    return cast(_Command, importlib.import_module(COMMANDS[name]))


def build_parser(name: str) -> argparse.ArgumentParser:
    mod = _load(name)
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline {name}" if name != "run" else "python -m pipeline",
        description=mod.HELP,
    )
    mod.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m pipeline [COMMAND] [ARGS...]\n")
        print("  python -m pipeline FILE.yaml [--duration S] [--report F]   run the pipeline")
        for name in COMMANDS:
            print(f"  python -m pipeline {name:<9} ...   (--help for details)")
        return 0 if args else EXIT_USAGE
    name = args[0] if args[0] in COMMANDS else "run"
    rest = args[1:] if args[0] in COMMANDS else args
    parser = build_parser(name)
    ns = parser.parse_args(rest)
    command: Callable[[argparse.Namespace], int] = _load(name).main
    try:
        return command(ns)
    except ConfigError as exc:
        print("invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except PosewireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 1)
        return code if isinstance(code, int) else 1
    except KeyboardInterrupt:
        return 130
