"""The ``fastnig`` command line: one subcommand per pipeline stage.

Each stage's subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Subcommand modules, in pipeline order.  A module that is missing is skipped.
_COMMANDS = ("attribute", "analyze", "prune", "run", "compare")


class UsageError(Exception):
    """Bad input a user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnig",
        description="Find which neurons of a neural ranker (cross-encoder) matter, with Neuron Integrated "
                    "Gradients: attribute pairs of a dataset, analyse the neuron sets, prune them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}_cmd":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fastnig {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnig {args.command}: interrupted", file=sys.stderr)
        return 130
