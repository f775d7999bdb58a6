"""``fastnig explore RUN``: the run's neurons as one self-contained HTML file (docs/explorer.md)."""
from __future__ import annotations

import argparse

from ..report.run_folder import NotARunFolder
from ..study.explore import DEFAULT_TOP, explore_run, explorer_summary
from .usage import UsageError

DESCRIPTION = """\
Write RUN/explorer.html: every neuron of a run in one HTML file that opens
from disk in a browser (no server, no network; data, code and styles inside).

Views, linked (a click in one selects in the others):
  - Overview: a layer x component heat map of each scheme's top-X % neurons
    (or share of |NIG|), and the paper's named sets (P_x, N_x, F_x, F_A,
    P_x ∩ N_x) as toggles;
  - Neurons: every neuron in a table, sortable by any scheme's value or rank,
    filterable by layer, component, set membership and dominant segment;
  - Neuron card: its NIG and rank in every scheme, segment shares, sets, and
    its exemplar pairs (the pairs where its |NIG| is largest, kept by the
    study) with the per-token conductance shaded over the text;
  - Run facts: scorecard, Table 1, Table 4, model quality.

Exemplars: for each scheme's --top neurons (largest |mean NIG|) and every
--neuron given, the page shows their exemplar pairs; explore computes their
per-token view with the run's model (one small attribution per pair).
"""

EPILOG = """\
examples:
  fastnig demo && fastnig explore runs/demo      # then open runs/demo/explorer.html
  fastnig explore runs/paper --top 20 --neuron bert.encoder.layer.9.intermediate.dense:1234
  fastnig explore runs/paper --no-exemplars -o /tmp/paper.html   # no model needed
"""


def register(sub) -> None:
    p = sub.add_parser("explore", help="a run's neurons as one self-contained HTML explorer",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="output folder of `fastnig run` (holds config.json and schemes/)")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="where to write (default: RUN/explorer.html)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                   help=f"exemplars for each scheme's N neurons of largest |mean NIG| (default {DEFAULT_TOP})")
    p.add_argument("--neuron", action="append", default=[], metavar="MODULE:UNIT",
                   help="also the exemplars of this neuron (repeatable); the neuron card names it so")
    p.add_argument("--no-exemplars", dest="exemplars", action="store_false",
                   help="no exemplar pairs (needs neither the model nor the data)")
    p.add_argument("--device", default="cpu", help="where the exemplars' per-token view is computed (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    try:
        path = explore_run(args.run_dir, args.output, top=args.top, neurons=args.neuron, exemplars=args.exemplars,
                           device=args.device, progress=True)
    except NotARunFolder as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        if "neuron" in str(exc):
            raise UsageError(f"--neuron: {exc}") from None
        raise
    print(f"written: {explorer_summary(path)}")
    return 0
