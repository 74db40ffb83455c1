"""The ``dicom-node`` command line: discovers subcommands in ``dicom_node.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from dicom_node import __version__, commands
from dicom_node.errors import UserError
from dicom_node.logs import quiet_libraries


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand found in ``dicom_node.commands``.

    With ``only``, just that subcommand gets its arguments: some commands (train) describe theirs
    with heavy imports, which must not slow down every other command.
    """
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="CT vision-language DICOM node: receives CT series, finds per-organ "
        "findings and returns DICOM SEG and SR to the PACS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if not hasattr(module, "run"):
            continue
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        if only is None or only == module.NAME:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command or "")
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "serve" and args.verbose == 0:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(logging.DEBUG if args.verbose > 1 else logging.WARNING)  # every command, not only serve
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"dicom-node {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
