"""The ``fastnig`` command line: one subcommand per pipeline stage.

Each stage's subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..common import MissingExtra
from . import analyze_cmd, attribute_cmd, compare_cmd, prune_cmd, run_cmd
from .usage import UsageError

# Subcommand modules, in pipeline order.
_COMMANDS = (attribute_cmd, analyze_cmd, prune_cmd, run_cmd, compare_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnig",
        description="Find which neurons of a neural ranker (cross-encoder) matter, with Neuron Integrated "
                    "Gradients: attribute pairs of a dataset, analyse the neuron sets, prune them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
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
    except (UsageError, MissingExtra, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fastnig {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnig {args.command}: interrupted", file=sys.stderr)
        return 130
