"""User errors: what the command line prints as one line with exit code 2.

A subcommand raises :class:`UsageError` for input a user can fix.  The
lower layers cannot import this package, so their own validation errors
that a user fixes (a bad config, a dataset or model that is not there, an
optional dependency that is not installed, a folder that is not a run, an
output another job is writing, a damaged file) are listed in
:data:`USER_ERRORS`.  Anything else — a plain ``ValueError`` or
``TypeError`` from deep inside included — is a bug in fastnig: ``fastnig``
prints its traceback and exits with code 1 (:func:`fastnig.cli.main`).

A subcommand that passes a user's value to a lower layer whose validation
raises a plain ``ValueError`` converts it where it makes the call, naming
the option (``raise UsageError(f"--set {text!r}: {exc}") from None``), and
only around that call.
"""
from __future__ import annotations

from typing import Tuple, Type

from ..common import CorruptFile, MissingExtra, OutputLocked
from ..data import DatasetUnavailable, MissingJudgments
from ..engine.loading import ModelUnavailable
from ..engine.rankers import FAMILIES, UnsupportedModel, ranker_from_spec
from ..neurons.expressions import ExpressionError
from ..report.run_folder import NotARunFolder
from ..study.attribution_job import ResumeRefused
from ..study.config import ConfigError


class UsageError(Exception):
    """Bad input a user can fix; printed as one line, exit code 2."""


USER_ERRORS: Tuple[Type[BaseException], ...] = (
    UsageError,          # a subcommand's own checks of its options
    MissingExtra,        # an optional dependency is not installed: the message names the extra
    ConfigError,         # fastnig run: a configuration that cannot work
    DatasetUnavailable,  # a dataset's files are not here and cannot be downloaded
    MissingJudgments,    # the collection has no judgments of the requested kind
    ModelUnavailable,    # the model cannot be loaded: the message says what to provide
    NotARunFolder,       # fastnig compare: the folder is not a run
    ExpressionError,     # a malformed set expression (pruning.sets of a config)
    OutputLocked,        # another fastnig job is writing the same output
    CorruptFile,         # a file fastnig wrote is truncated or damaged: the message names it
    ResumeRefused,       # the scheme at the output path was made another way: another path or the same options
    UnsupportedModel,    # no ranker family handles the model: the message lists the families
)
"""Exception types printed as one line with exit code 2 (with ``--debug``: also their traceback)."""


def is_user_error(exc: BaseException) -> bool:
    """True for bad input a user can fix (:data:`USER_ERRORS`), or a failed operation on a named file
    (an ``OSError`` with a file name: no such file, permission denied, disk full)."""
    if isinstance(exc, USER_ERRORS):
        return True
    return isinstance(exc, OSError) and getattr(exc, "filename", None) is not None


def add_ranker_options(parser) -> None:
    """``--ranker`` / ``--template``: how a command's model scores a pair (read back by :func:`ranker_option`)."""
    parser.add_argument("--ranker", choices=FAMILIES, default=None,
                        help="how the model scores a pair (default: from its class; see docs/rankers.md)")
    parser.add_argument("--template", default=None, metavar="TEXT",
                        help="the ranker's prompt, with {query} and {passage} (default: the family's)")


def ranker_option(family, template):
    """The ranker of ``--ranker`` / ``--template`` (``None``: from the model's class), or a :class:`UsageError`."""
    if template is not None and family is None:
        raise UsageError("--template needs --ranker (the family the template is for)")
    try:
        return ranker_from_spec({"family": family, "template": template} if template is not None else family)
    except ValueError as exc:
        raise UsageError(f"--template: {exc}") from None
