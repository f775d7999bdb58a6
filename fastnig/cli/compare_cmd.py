"""``fastnig compare RUN``: the reproduction scorecard of a finished run against the paper."""
from __future__ import annotations

import argparse

from ..report.comparison import compare_runs
from ..report.run_folder import NotARunFolder
from ..report.scorecard import REFERENCE_DIR, scorecard
from .usage import UsageError

DESCRIPTION = """\
Compare a finished run (the output folder of `fastnig run`) with the paper
"Which Neurons Matter in IR?" (ICTIR 2024), whose Table 1 and Table 4
numbers ship with fastnig.

Prints, and writes into RUN as scorecard.md and scorecard.csv:
  - the paper's qualitative claims checked on the run's numbers, one line
    each: PASS, FAIL, or N.A. when the run lacks the data a check needs
    (e.g. no F_x was pruned); each line states its rule and threshold;
  - Table 1 (baseline quality) and Table 4 (% nDCG@10 drop when pruning)
    beside the paper's, with ours - paper per cell.  A run whose model,
    datasets, baseline or steps are not the paper's (e.g. the demo) is
    labelled "not the paper's setup": its numbers are not expected to match.

With --with OTHER, also puts RUN beside another finished run (the paper's
§6: the `paper` run with the PAD baseline beside `paper-zero`, the zero
baseline of Möller et al.): the layer profile of N_x and F_x of the in-domain
dataset (share of the last two layers and of the mid layers) and Table 4 of
both.  A run whose config has `compare_with: OTHER` puts the same section in
its report.

Reads only the CSV/JSON files of RUN (config.json, analysis/*.csv,
pruning/table4.csv); needs no model, data or network.
"""

EPILOG = """\
example:
  fastnig demo && fastnig compare runs/demo
  fastnig compare runs/paper-zero --with runs/paper
"""


def register(sub) -> None:
    p = sub.add_parser("compare", help="scorecard of a finished run against the paper's tables and claims",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="output folder of `fastnig run` (holds config.json)")
    p.add_argument("--reference", default="paper", metavar="NAME",
                   help="packaged reference numbers to compare with (default: paper)")
    p.add_argument("--with", dest="other", default=None, metavar="OTHER",
                   help="another finished run to put beside RUN (layer profile and Table 4)")
    p.set_defaults(func=run)


def reference_names():
    """The packaged reference numbers --reference can name (``fastnig/report/reference/*.json``)."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))


def run(args) -> int:

    if args.reference not in reference_names():
        raise UsageError(f"--reference {args.reference!r} is not one of the packaged references "
                         f"({', '.join(reference_names())})")
    try:
        card = scorecard(args.run_dir, reference=args.reference)
    except NotARunFolder as exc:
        raise UsageError(str(exc)) from None
    print(card.to_text(), end="")
    paths = card.write()
    print(f"written: {paths['md']} and {paths['csv']}")
    if args.other:
        try:
            comparison = compare_runs(args.run_dir, args.other)
        except NotARunFolder as exc:
            raise UsageError(f"--with: {exc}") from None
        print("\n" + comparison.to_text(), end="")
    return 0
