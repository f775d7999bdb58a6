"""``fastnig prune``: the paper's Table 4, pruning neuron sets and reranking validation datasets."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..data import DATASETS, load_collection
from ..evaluation.pruning import evaluate_pruning
from ..evaluation.reranking import build_candidates
from ..neurons.fusion import fuse
from ..neurons.scheme import Scheme
from ..neurons.scheme_storage import is_scheme_file, scheme_json_path
from ..neurons.sets import NeuronSet, intersection, neuron_universe
from ..training.demo_model import load_ranker
from .usage import UsageError, add_ranker_options, ranker_option

PAPER_LEVELS = (0.01, 0.1, 1.0)
PAPER_DATASETS = ("ms-dev", "lotte-lifestyle", "lotte-recreation", "lotte-science", "lotte-technology",
                  "lotte-writing")
DEFAULT_BM25_CACHE = "~/.cache/fastnig/bm25"

DESCRIPTION = """\
Do the neurons NIG finds matter for ranking?  Prune (zero the output of) each
neuron set at each level, rerank every validation dataset with the pruned
model, and compare nDCG@10 with the original model and with random sets of
the same size in the same modules (docs/method.md §8, the paper's Table 4).

PROTOCOL
  For each dataset, --queries queries with a relevant judgment are sampled
  (--seed).  Each query's candidates are its judged-relevant passages plus the
  top --depth (20) of the dataset's own first-stage run, or of BM25 over its
  corpus when it has none (index cached in --bm25-cache).  The model reranks
  them; the score is the relevance logit (same ranking as P(relevant)).  The
  original model's scores are computed once.  Per set and level:
    drop %  = (nDCG@10 original - nDCG@10 pruned) / original * 100  (positive = worse)
    p-value = two-tailed paired t-test over queries; significant if p <= 0.05
    random  = --repetitions random sets with as many neurons in every module
              (layer + component) as the set, averaged (mean, std, how many
              repetitions were significant); with --adaptive, as many of them
              as the verdict needs (random_repetitions in table4.csv)

NEURON SETS (--set, repeatable, in table order)
  NAME=SCHEME.json      a scheme written by `fastnig attribute` (P_x or N_x):
                        its top L % of all neurons at each level L
  SCHEME.json           the same, named by the scheme (e.g. P_ms)
  NAME=fuse:A,B,...     ⊕ of earlier --set schemes (mean of their means),
                        then its top L %; e.g. F_ms=fuse:P_ms,N_ms.
                        fuse:* fuses every scheme given (F_A)
  NAME=and:A,B,...      ∩ of the top-L % sets of earlier --set entries, at
                        each level (e.g. the paper's ∩_{o in O} P_o)
  NAME@L=SET.json       a fixed neuron set for level L only (the JSON of
                        NeuronSet.to_dict(): name, sizes, members)
  --show picks (and orders) the rows; by default every --set is a row.

DATASETS (--dataset, repeatable; default: the paper's six validation sets)
  Any spec `fastnig attribute` takes: an abbreviation (ms-dev,
  lotte-science, ...), an ir_datasets id, a local BEIR folder or
  trec:docs_tsv=D,queries_tsv=Q,qrels_trec=R[,scoreddocs_trec=RUN].
  Datasets are averaged into one table row by label, "(n)" counting those
  with a significant difference: the LoTTE domains form "LoTTE benchmark",
  MS MARCO dev "MSMARCO dev set", any other dataset its own row.  Set a label
  with LABEL=SPEC (e.g. "Small sets=./data/setA").

OUTPUTS (in --out)
  table4.csv   one row per set x level x dataset: set, level_percent, dataset,
               group, num_neurons, num_queries, num_candidates, ndcg_original,
               ndcg_pruned, drop_percent, p_value, significant,
               random_repetitions, random_ndcg_mean, random_drop_mean,
               random_drop_std, random_significant
  table4.md    the paper's layout: rows = set x dataset group, columns =
               levels; bold = biggest drop per level and group, underlined =
               second biggest; a "Random baseline" row
  table4.tex   the same as a LaTeX tabular (booktabs)
"""

EPILOG = """\
example (the paper's Table 4, on a GPU):
  fastnig prune --model castorini/monobert-large-msmarco \\
      --set runs/P_ms.json --set runs/N_ms.json --set F_ms=fuse:P_ms,N_ms \\
      --set F_A=fuse:* --levels 0.01 0.1 1 --queries 200 --dtype float16 --out results/prune

a quick check on local data:
  fastnig prune --model ./my-cross-encoder --set runs/P_cranfield.json \\
      --dataset cranfield --levels 1 --queries 50 --repetitions 5 --out results/quick
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune neuron sets, rerank validation datasets, write Table 4 (CSV, Markdown, LaTeX)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="the cross-encoder: a Hugging Face id, a local save_pretrained folder, or minilm-l6")
    p.add_argument("--set", dest="sets", action="append", required=True, metavar="SPEC",
                   help="a neuron set (see NEURON SETS above); repeat for each")
    p.add_argument("--show", nargs="+", metavar="NAME", default=None,
                   help="the --set names to put in the table, in this order (default: all)")
    p.add_argument("--levels", type=float, nargs="+", default=list(PAPER_LEVELS), metavar="PCT",
                   help="pruning levels, %% of all neurons of the model (default: 0.01 0.1 1)")
    p.add_argument("--by", choices=("value", "abs"), default="value",
                   help="rank neurons by signed mean NIG (value, default) or |mean| (abs)")
    p.add_argument("--dataset", dest="datasets", action="append", default=None, metavar="[LABEL=]SPEC",
                   help="a validation dataset (repeatable; default: ms-dev and the five LoTTE dev sets)")
    p.add_argument("--queries", type=int, default=100, metavar="N",
                   help="queries sampled per dataset (default: 100; 0 = all queries with a relevant judgment)")
    p.add_argument("--depth", type=int, default=20, metavar="K",
                   help="first-stage (or BM25) passages per query, besides the relevant ones (default: 20)")
    p.add_argument("--repetitions", type=int, default=50, metavar="R",
                   help="random sets per neuron set and level (default: 50)")
    p.add_argument("--adaptive", action="store_true",
                   help="draw the random sets of a row in rounds and stop as soon as their mean is known to "
                        "+-0.25 nDCG points or the set-vs-random verdict is decided by 1 point either way "
                        "(at least 5, at most --repetitions; docs/method.md §8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample and of the random sets (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="pairs per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help="tokens of a (query, passage) encoding (default: the model's, at most 512; never more "
                        "than its position embeddings allow)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    add_ranker_options(p)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="model dtype for reranking (default: float32; float16 is fine on a GPU)")
    p.add_argument("--bm25-cache", default=DEFAULT_BM25_CACHE, metavar="DIR",
                   help=f"where BM25 indexes are kept between runs (default: {DEFAULT_BM25_CACHE})")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for table4.csv, table4.md, table4.tex")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ parsing
_NAME = re.compile(r"^[^=:/\\]+$")


def parse_dataset(text: str) -> Tuple[str, Optional[str]]:
    """``"[LABEL=]SPEC"`` -> (spec, label or None).  ``trec:k=v,...`` specs are never split."""
    label, sep, spec = text.partition("=")
    if sep and _NAME.match(label) and spec.strip() and label.strip() != "trec":
        return spec.strip(), label.strip()
    return text.strip(), None


def default_group(spec: str) -> str:
    """The paper's row labels: LoTTE domains together, MS MARCO dev, else the spec itself."""

    key = DATASETS.get(spec, spec)
    if key.startswith("lotte/"):
        return "LoTTE benchmark"
    if key.startswith("msmarco-passage/dev"):
        return "MSMARCO dev set"
    return spec


def parse_set(text: str):
    """One --set value -> ("scheme"|"fuse"|"and"|"fixed", name, payload, level or None)."""
    name, sep, rest = text.partition("=")
    if not sep:  # a bare scheme file
        return "scheme", None, text.strip(), None
    name = name.strip()
    level = None
    if "@" in name:
        name, _, level_text = name.rpartition("@")
        try:
            level = float(level_text.rstrip("%"))
        except ValueError:
            raise UsageError(f"--set {text!r}: {level_text!r} after '@' is not a level in percent") from None
    if not name or "/" in name or "\\" in name:
        raise UsageError(f"--set {text!r}: NAME=... needs a name before '=' (e.g. P_ms=runs/P_ms.json)")
    for kind in ("fuse", "and"):
        if rest.startswith(kind + ":"):
            if level is not None:
                raise UsageError(f"--set {text!r}: {kind}: sets exist at every level; drop '@{level:g}'")
            parts = [x.strip() for x in rest[len(kind) + 1:].split(",") if x.strip()]
            if not parts:
                raise UsageError(f"--set {text!r}: give the names to combine after '{kind}:'")
            return kind, name, parts, None
    return ("fixed" if level is not None else "scheme"), name, rest.strip(), level


def _load_scheme(path, text: str) -> Scheme:
    """The scheme file of ``--set text``; a file it cannot read is the user's to fix (one line, exit 2)."""
    try:
        return Scheme.load(path)
    except ValueError as exc:
        raise UsageError(f"--set {text!r}: {exc}") from None


def build_neuron_sets(specs: List[str], levels: List[float], by: str, model_sizes: Dict[str, int]):
    """--set values -> {name: {level: NeuronSet}} in definition order."""

    schemes: Dict[str, object] = {}
    sets: Dict[str, Dict[float, object]] = {}
    for text in specs:
        kind, name, payload, level = parse_set(text)
        if kind == "scheme":
            path = scheme_json_path(payload)
            if not path.is_file():
                raise UsageError(f"--set {text!r}: no scheme file {path}")
            if not is_scheme_file(path):
                raise UsageError(f"--set {text!r}: {path} is not a scheme written by fastnig attribute; "
                                 "a fixed neuron-set JSON needs a level: NAME@LEVEL=FILE.json")
            scheme = _load_scheme(path, text)
            name = name or scheme.name
            schemes[name] = scheme
            sets[name] = {lv: scheme.top(lv, by=by) for lv in levels}
        elif kind == "fuse":
            chosen = list(schemes) if payload == ["*"] else payload
            unknown = [n for n in chosen if n not in schemes]
            if unknown:
                raise UsageError(f"--set {text!r}: {unknown} are not schemes given by an earlier --set "
                                 f"(known: {', '.join(schemes) or 'none'})")
            if not chosen:
                raise UsageError(f"--set {text!r}: fuse:* needs schemes given by earlier --set options")
            try:
                fused = fuse(*[schemes[n] for n in chosen], name=name)
            except ValueError as exc:  # schemes of other models or settings
                raise UsageError(f"--set {text!r}: {exc}") from None
            schemes[name] = fused
            sets[name] = {lv: fused.top(lv, by=by) for lv in levels}
        elif kind == "and":
            unknown = [n for n in payload if n not in sets]
            if unknown:
                raise UsageError(f"--set {text!r}: {unknown} are not defined by an earlier --set "
                                 f"(known: {', '.join(sets) or 'none'})")
            sets[name] = {}
            for lv in levels:
                parts = [sets[n].get(lv) for n in payload]
                if any(p is None for p in parts):
                    continue
                sets[name][lv] = intersection(*parts, name=f"{name}@{lv:g}%")
        else:  # fixed
            file = Path(payload)
            if not file.is_file():
                raise UsageError(f"--set {text!r}: no such file {file}")
            if is_scheme_file(file):  # a scheme at one level only
                fixed = _load_scheme(file, text).top(level, by=by)
            else:
                try:
                    fixed = NeuronSet.from_dict(json.loads(file.read_text(encoding="utf-8")))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise UsageError(f"--set {text!r}: {file} is neither a scheme nor a neuron-set JSON "
                                     f"(NeuronSet.to_dict(): name, sizes, members): {exc}") from None
            sets.setdefault(name, {})[level] = fixed
        if name in sets:
            for lv, nset in sets[name].items():
                mismatch = [m for m, n in nset.sizes.items() if model_sizes.get(m) != n]
                if mismatch:
                    raise UsageError(f"--set {text!r}: the set is over other neurons than the model's "
                                     f"(e.g. module {mismatch[0]}); was it made with another model?")
    return sets


# ---------------------------------------------------------------------- run
def run(args) -> int:
    for option, value, low in (("--queries", args.queries, 0), ("--depth", args.depth, 0),
                               ("--repetitions", args.repetitions, 1), ("--batch-size", args.batch_size, 1),
                               ("--seed", args.seed, 0), ("--max-length", args.max_length or 4, 4)):
        if value < low:
            raise UsageError(f"{option} must be >= {low}, got {value}")
    if args.adaptive and args.repetitions < 5:
        raise UsageError(f"--adaptive draws at least 5 random sets per row; --repetitions is {args.repetitions}")
    repetitions = {"max": args.repetitions, "stop_when": {}} if args.adaptive else args.repetitions
    levels = list(dict.fromkeys(float(x) for x in args.levels))
    bad = [x for x in levels if not 0 < x <= 100]
    if bad:
        raise UsageError(f"--levels must be in (0, 100] (percent of all neurons), got {bad}")
    progress = not args.quiet

    ranker = ranker_option(args.ranker, args.template)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_ranker(args.model, device=device)
    model.to(getattr(torch, args.dtype))
    sizes = neuron_universe(model)

    sets = build_neuron_sets(args.sets, levels, args.by, sizes)
    shown = args.show or list(sets)
    unknown = [n for n in shown if n not in sets]
    if unknown:
        raise UsageError(f"--show: {unknown} are not --set names ({', '.join(sets)})")
    neuron_sets = {n: sets[n] for n in shown if sets[n]}
    for name, by_level in neuron_sets.items():
        print(f"{name}: " + ", ".join(f"{lv:g}% -> {len(s)} neurons" for lv, s in by_level.items()))

    datasets, groups = {}, {}
    for text in args.datasets or list(PAPER_DATASETS):
        spec, label = parse_dataset(text)
        try:
            collection = load_collection(spec)
        except (ValueError, TypeError) as exc:  # the spec's own checks (DatasetUnavailable is one too)
            raise UsageError(f"--dataset {text!r}: {exc}") from None
        candidates = build_candidates(collection, num_queries=args.queries or None, seed=args.seed,
                                      depth=args.depth, cache_dir=args.bm25_cache, progress=progress)
        print(f"{spec}: {candidates.num_queries} queries, {candidates.num_pairs} candidates "
              f"(first stage: {candidates.source})")
        datasets[spec] = candidates
        groups[spec] = label or default_group(spec)

    table = evaluate_pruning(model, tokenizer, neuron_sets, datasets, groups=groups, repetitions=repetitions,
                             seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                             progress=progress, ranker=ranker)
    paths = table.write(args.out)
    print(table.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
