"""``fastnig circuit RUN --scheme P_ms --top 10``: conditional NIG among a scheme's top units (docs/method.md §13)."""
from __future__ import annotations

import argparse

from ..report.run_folder import NotARunFolder
from ..study.circuit_run import DEFAULT_PAIRS, DEFAULT_TOP, circuit_run
from .usage import UsageError

DESCRIPTION = """\
The circuit of a scheme's top units: its top-k neurons (largest mean NIG) and
its top-k attention heads (largest mean head NIG over the scheme's pairs);
for each, conditional NIG toward it of every chosen unit below it, averaged
over the scheme's first pairs, as a weighted graph: RUN/circuits/SCHEME.json
and SCHEME.png (layers bottom to top, edges by weight).
"""

EPILOG = """\
examples:
  fastnig demo && fastnig circuit runs/demo --scheme P_cran --top 5
  fastnig circuit runs/paper --scheme P_ms --top 10 --pairs 16 --device cuda
"""


def register(sub) -> None:
    p = sub.add_parser("circuit", help="conditional NIG among a scheme's top neurons and heads, as a graph",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="output folder of `fastnig run` (holds config.json and schemes/)")
    p.add_argument("--scheme", required=True, help="scheme name, e.g. P_ms or N_cran")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K", help=f"top-K neurons and heads "
                   f"(default {DEFAULT_TOP})")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, metavar="N",
                   help=f"the scheme's first N pairs to average over (default {DEFAULT_PAIRS})")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="where to write (default RUN/circuits)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.top < 1 or args.pairs < 1:
        raise UsageError(f"--top and --pairs must be >= 1, got {args.top} and {args.pairs}")
    try:
        json_path, png = circuit_run(args.run_dir, args.scheme, top=args.top, pairs=args.pairs, out=args.output,
                                     device=args.device, progress=True)
    except NotARunFolder as exc:
        raise UsageError(str(exc)) from None
    print(f"{json_path}\n{png}")
    return 0
