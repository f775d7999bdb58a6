"""``fastnig analyze``: figures and CSV tables from saved attribution schemes."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List

import torch

from ..analysis.neuron_analyses import DEFAULT_LEVELS, analyze, index_schemes
from ..analysis.table1 import baseline_table
from ..data import LabelledPair, filter_agreeing
from ..engine.loading import ModelUnavailable
from ..evaluation.table1 import baseline_differences
from ..neurons.scheme import Scheme
from ..neurons.scheme_storage import is_scheme_file, scheme_json_path
from ..training.demo_model import load_ranker
from .usage import UsageError

DESCRIPTION = """\
Build the paper's analyses (RQ1/RQ2) from attribution schemes written by
`fastnig attribute`: which neurons the datasets share, per label and pruning
level, and where in the model those neurons are.

INPUTS
  SCHEMES   scheme files (the .json file of each scheme; its .safetensors
            file must sit beside it) or folders, searched recursively for
            scheme .json files.  One scheme per (dataset, label): P_x for
            "relevant", N_x for "non-relevant".  Schemes of the same dataset
            and label (e.g. two halves of a run) are merged.  All schemes
            must come from the same model and settings (steps, baseline...).

OUTPUTS (in --out)
  schemes.csv                      pairs, dropped pairs, convergence delta per scheme
  pairwise_overlap.csv             overlap % of the top-X% sets of every two datasets
  figure2a_/figure2c_*.png         ... one figure per label (relevant 2a, non-relevant 2c):
                                   solid = in-domain vs OOD, grey dashed = OOD vs OOD
  intersections.csv                ∩ over OOD datasets, over all datasets, and
  figure3_intersections.png        P_x ∩ N_x per dataset (paper Fig. 3)
  *_without_<x>.csv, figure2b_/    the same without the --exclude datasets (Fig. 2b/2d,
  figure2d_/figure3_*_without_*    and Figure 3 without them)
  layers_components.csv            neurons per layer and component of the top
  figure4a_/figure4b_layers_*.png  --layer-percent sets: Fig. 4a = N of --in-domain,
  layers_<set>.png                 Fig. 4b = its F = P ⊕ N; every other P_x, N_x, F_x, F_A
  layer_profile.csv, figure5_layers.png
                                   neurons per layer of P, N, F of --in-domain and F_A (Fig. 5)
  segments.csv,                    schemes attributed with --segments only: per layer and
  segments_<x>_at_<X>pct.png       component, the share of each top --layer-percent set's
                                   conductance through the query, the passage and the special
                                   tokens, and its neurons by dominant segment; the figure:
                                   per layer for P, N and F of the first dataset
  baselines.csv, table1_baselines.png
                                   with --baseline-model: Table 1, mean P(rel) - P(non-rel)
                                   over the pairs the model judges relevant (the pairs
                                   are taken as relevant ones), input and baselines

EXAMPLE
  fastnig attribute ... --out runs/      # one scheme per dataset and label
  fastnig analyze runs/ --out report/ --in-domain ms --exclude r nf
  fastnig analyze --baseline-model castorini/monobert-large-msmarco \\
      --baseline-pairs pairs.tsv --out report/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="figures and CSV tables (overlaps, intersections, layers, baselines) from schemes",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("schemes", nargs="*", metavar="SCHEMES",
                   help="scheme .json files or folders containing them")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the CSV tables and PNG figures")
    p.add_argument("--levels", type=float, nargs="+", metavar="PCT", default=None,
                   help="pruning levels, %% of all neurons (default: 0.01 0.02 0.05 0.1 0.2 0.5 1 2 5 10)")
    p.add_argument("--in-domain", default="ms", metavar="NAME",
                   help="the in-domain dataset, by name or abbreviation (default: ms, TREC DL 2019)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                   help="also make every overlap figure without these datasets (the paper: r nf)")
    p.add_argument("--by", choices=("value", "abs"), default="value",
                   help="rank neurons by signed mean (value, default) or absolute mean (abs)")
    p.add_argument("--layer-percent", type=float, default=1.0, metavar="PCT",
                   help="top %% of neurons shown per layer and component (default: 1)")
    b = p.add_argument_group("baseline comparison (Table 1), optional")
    b.add_argument("--baseline-model", metavar="MODEL",
                   help="Hugging Face cross-encoder (name or local folder) to compare baselines on")
    b.add_argument("--baseline-pairs", metavar="FILE",
                   help="pairs: TSV lines 'query<TAB>passage', or JSONL with 'query' and 'passage' keys")
    b.add_argument("--baseline-max-pairs", type=int, default=1000, metavar="N",
                   help="use the first N pairs of the file that the model judges relevant (default: 1000, "
                        "as the paper)")
    b.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help="tokens of the pair encoding (default: the model's, at most 512)")
    b.add_argument("--device", default=None, help="where to run the model (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def find_scheme_files(paths: List[str]) -> List[Path]:
    """Scheme JSON files from files and folders (folders searched recursively), sorted, no duplicates."""

    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*.json") if is_scheme_file(p))
            if not inside:
                raise UsageError(f"no scheme files (.json written by fastnig attribute) in folder {path}")
            found.extend(inside)
            continue
        json_path = scheme_json_path(path)
        if not json_path.is_file():
            raise UsageError(f"{raw}: no such scheme file or folder")
        if not is_scheme_file(json_path):
            raise UsageError(f"{json_path} is not a fastnig scheme file")
        found.append(json_path)
    return list(dict.fromkeys(p.resolve() for p in found))


def _load_scheme(path: Path) -> Scheme:
    """A scheme file given on the command line; one it cannot read is the user's to fix (one line, exit 2)."""
    try:
        return Scheme.load(path)
    except ValueError as exc:
        raise UsageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def read_pairs(path: str, limit: int) -> list:
    """(query, passage) pairs from a TSV or JSONL file, the first ``limit``."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--baseline-pairs: no such file {path}")
    pairs = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    row = json.loads(line)
                    pairs.append((row["query"], row.get("passage", row.get("text"))))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise UsageError(f"{path}:{number}: a JSONL line needs 'query' and 'passage' ({exc})") from None
            else:
                parts = line.split("\t")
                if len(parts) < 2:
                    raise UsageError(f"{path}:{number}: expected 'query<TAB>passage'")
                pairs.append((parts[-2], parts[-1]) if len(parts) > 2 else (parts[0], parts[1]))
            if len(pairs) >= limit:
                break
    if not pairs:
        raise UsageError(f"--baseline-pairs: {path} holds no pairs")
    return pairs


def run(args) -> int:
    if not args.schemes and not args.baseline_model:
        raise UsageError("give scheme files/folders, or --baseline-model and --baseline-pairs (see --help)")
    if bool(args.baseline_model) != bool(args.baseline_pairs):
        raise UsageError("--baseline-model and --baseline-pairs go together")
    if args.baseline_max_pairs < 1:
        raise UsageError("--baseline-max-pairs must be >= 1")
    bad = [x for x in args.levels or () if not 0 < x <= 100]
    if bad:
        raise UsageError(f"--levels must be in (0, 100] (percent of all neurons), got {bad}")
    if not 0 < args.layer_percent <= 100:
        raise UsageError(f"--layer-percent must be in (0, 100], got {args.layer_percent}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time() - 1

    if args.schemes:
        files = find_scheme_files(args.schemes)
        schemes = [_load_scheme(f) for f in files]
        for s in [s for s in schemes if s.is_fused]:
            print(f"skipping {s.name}: a fusion (fusions are derived here from the P_x / N_x schemes)")
        schemes = [s for s in schemes if not s.is_fused]
        if not schemes:
            raise UsageError("no P_x / N_x scheme among the files given (only fusions)")
        print(f"read {len(schemes)} scheme(s): " + ", ".join(f"{s.name} ({s.count} pairs)" for s in schemes))
        try:  # schemes of other models or settings, the same pairs twice, a scheme without pairs
            schemes = list(index_schemes(schemes, args.in_domain).values())
        except ValueError as exc:
            raise UsageError(f"the schemes given cannot be analysed together: {exc}") from None
        tables = analyze(schemes, out, levels=args.levels or DEFAULT_LEVELS, in_domain=args.in_domain,
                         exclude=args.exclude, by=args.by, layer_percent=args.layer_percent)
        for row in tables["schemes"]:
            print(f"  {row['name']}: {row['pairs']} pairs, {row['dropped']} dropped by the agreement filter, "
                  f"mean |delta| {row['mean_abs_delta']:.3g}")
        if "segments" not in tables:
            print("no segments.csv: the schemes have no per-segment sums (attribute with --segments)")

    if args.baseline_model:
        pairs = read_pairs(args.baseline_pairs, args.baseline_max_pairs)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, tokenizer = load_ranker(args.baseline_model, device=device)
        except ModelUnavailable as exc:
            raise UsageError(f"--baseline-model: {exc}") from None
        labelled = [LabelledPair(str(i), str(i), q, d, 1, 1) for i, (q, d) in enumerate(pairs)]
        kept, report = filter_agreeing(model, tokenizer, labelled, max_length=args.max_length, progress=False)
        if not kept:
            raise UsageError(f"--baseline-pairs: the model judges none of the {len(pairs)} pairs relevant")
        kept = kept[:args.baseline_max_pairs]
        print(f"Table 1 over {len(kept)} pairs the model judges relevant ({report['dropped']} of {len(pairs)} "
              f"dropped by the agreement filter)")
        diffs = baseline_differences(model, tokenizer, [p.text_pair for p in kept], max_length=args.max_length)
        for row in baseline_table(diffs, out, pairs=len(kept), dataset=Path(args.baseline_pairs).name):
            print(f"  {row['baseline']:<10} mean P(rel) - P(non-rel) {row['mean_difference']:+.3f} "
                  f"(original {row['original_difference']:+.3f})")

    written = sorted(p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= started)
    print(f"wrote {len(written)} file(s) to {out}: " + ", ".join(p.name for p in written))
    return 0
