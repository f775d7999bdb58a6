"""The ``fastnig`` command line: one subcommand per pipeline stage.

Each stage's subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning an exit code.

Errors: bad input a user can fix (:data:`fastnig.cli.usage.USER_ERRORS`) is
printed as one line, exit code 2; anything else is a bug in fastnig, printed
with its traceback, exit code 1.  ``--debug`` (before or after the
subcommand) shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import List, Optional

from . import analyze_cmd, attribute_cmd, circuit_cmd, compare_cmd, doctor_cmd, explore_cmd, prune_cmd, run_cmd
from .usage import is_user_error

# Subcommand modules, in pipeline order; the installation check last.
_COMMANDS = (attribute_cmd, analyze_cmd, prune_cmd, run_cmd, compare_cmd, explore_cmd, circuit_cmd, doctor_cmd)

_DEBUG_HELP = "on an error, print the full traceback (also for bad input, which is otherwise one line)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnig",
        description="Find which neurons of a neural ranker (cross-encoder) matter, with Neuron Integrated "
                    "Gradients: attribute pairs of a dataset, analyse the neuron sets, prune them.",
        epilog="New machine (or a GPU)? Run `fastnig doctor` first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    for command in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message's lines joined); the type's name when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastnig {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every error of a subcommand ends up
        if is_user_error(exc):
            if args.debug:
                traceback.print_exc()
            print(f"fastnig {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"fastnig {args.command}: internal error ({type(exc).__name__}): this is a bug in fastnig, not in "
              "your input; please report it with the traceback above", file=sys.stderr)
        return 1
