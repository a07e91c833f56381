"""``fedmerge`` command line: discovers sub-commands in :mod:`fedmerge.commands`.

Every command module imports its heavy dependencies (torch, scipy, networkx, flwr, matplotlib)
inside ``run``, so ``fedmerge --help`` and ``fedmerge topology list`` start at once.

Errors caused by bad input (:class:`~fedmerge.errors.FedmergeError`) print one
line naming the culprit and exit with status 2; nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from fedmerge import __version__, commands
from fedmerge.errors import FedmergeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description="Decentralized and continual model merging.",
        epilog="Run 'fedmerge COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"fedmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        cmd = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _extra=getattr(module, "EXTRA_POSITIONALS", None))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a list positional at the first option; a command that sets
    # EXTRA_POSITIONALS = "dest" gets later positionals appended (``merge M A --base R B``).
    if extra and (not args._extra or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, args._extra).extend(extra)
    try:
        return int(args._run(args) or 0)
    except FedmergeError as exc:
        print(f"fedmerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedmerge {args.command}: interrupted", file=sys.stderr)
        return 130
