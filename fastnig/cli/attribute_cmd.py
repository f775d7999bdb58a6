"""``fastnig attribute``: one dataset and label -> one scheme file (resumable)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data import NEGATIVES, label_mapping, load_collection
from ..engine.quadrature import DEFAULT_RULE, DEFAULT_STEPS, RULES
from ..engine.settings import AttributionSettings
from ..neurons.stability import StopRule
from ..study.attribution_job import ResumeRefused, attribute_dataset
from ..training.demo_model import load_ranker
from .usage import UsageError, add_ranker_options, ranker_option

DESCRIPTION = """\
Attribute the pairs of one dataset and one label with Neuron Integrated
Gradients and save their per-neuron mean as a scheme (P_x for relevant pairs,
N_x for non-relevant ones).

Pairs are sampled deterministically (--seed), filtered to those the model
classifies correctly (docs/method.md §6.1), and attributed in chunks; the scheme file is
saved after each chunk.  Run the same command again after an interruption and
it continues where it stopped; the result equals an uninterrupted run.

Datasets: an abbreviation (ms, f, tc, nf, nq, tn, r, b, ms-dev, lotte-science,
...), any ir_datasets id (cranfield, beir/nfcorpus/test, ...), a local BEIR
folder, or trec:docs_tsv=D,queries_tsv=Q,qrels_trec=R.

Labels: --relevant lists the grades counted relevant (default: every grade
>= --relevance-threshold); --nonrelevant the grades counted non-relevant
(default: the judged grades below the lowest relevant one, never a negative
grade).  The paper's setup: ms --relevant 2,3; tc, nf, nq --relevant 2;
r --relevant 1,2 (see fastnig/study/configs/paper.yaml).  --negatives bm25 fills
up the judged non-relevant pairs, when too few, with the top BM25-ranked
unjudged passages of queries with a relevant one.
Models: a Hugging Face id, a local save_pretrained folder, or minilm-l6.
"""

EPILOG = """\
example:
  fastnig attribute --model ./my-cross-encoder --dataset cranfield \\
      --label relevant --pairs 200 --steps 50 --out runs/P_cranfield
  fastnig attribute --model castorini/monobert-large-msmarco --dataset ms \\
      --label non-relevant --relevant 2,3 --nonrelevant 0,1 --negatives bm25 --out runs/N_ms
  fastnig attribute --model ./my-cross-encoder --dataset cranfield \\
      --label relevant --pairs 1000 --stop-level 1 --stop-overlap 0.95 --out runs/P_cranfield
  fastnig analyze runs/ --out runs/analysis
"""


def register(sub) -> None:
    p = sub.add_parser("attribute", help="attribute one dataset/label into a scheme file",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face id, local folder, or 'minilm-l6'")
    add_ranker_options(p)
    p.add_argument("--dataset", required=True, help="dataset spec (see above)")
    p.add_argument("--label", required=True, choices=["relevant", "non-relevant"], help="which pairs to attribute")
    p.add_argument("--out", required=True, help="scheme path, e.g. runs/P_nf (writes P_nf.json + tensors)")
    p.add_argument("--pairs", type=int, default=100, help="pairs sampled before the agreement filter (default 100)")
    p.add_argument("--stop-level", type=float, default=None, metavar="X",
                   help="early stopping: attribute in rounds (16, 32, 64, ... sampled pairs, at most --pairs) and "
                        "stop once the top X %% set is stable (needs --stop-overlap)")
    p.add_argument("--stop-overlap", type=float, default=None, metavar="O",
                   help="early stopping: stop when doubling the pairs is estimated to keep at least this fraction "
                        "of the top --stop-level %% set (e.g. 0.95; docs/method.md §6.6)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--negatives", choices=list(NEGATIVES), default="judged",
                   help="non-relevant pairs: judged ones only (default); judged filled up with BM25-ranked "
                        "unjudged passages (bm25); or random unjudged documents (unjudged)")
    p.add_argument("--relevance-threshold", type=int, default=1,
                   help="lowest grade counted relevant when --relevant is not given (default 1)")
    p.add_argument("--relevant", default=None, metavar="GRADES",
                   help="grades counted relevant, comma-separated, e.g. 2,3 (default: >= --relevance-threshold)")
    p.add_argument("--nonrelevant", default=None, metavar="GRADES",
                   help="grades counted non-relevant, e.g. 0,1 (default: judged grades below the lowest "
                        "relevant one, >= 0)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where --negatives bm25 keeps its BM25 index (default: ~/.cache/fastnig/bm25)")
    p.add_argument("--no-filter", action="store_true", help="keep pairs the model gets wrong")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"path intervals N (default {DEFAULT_STEPS})")
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help=f"integration rule (default {DEFAULT_RULE}: (4 T_N - T_N/2) / 3 from the same N + 1 points, "
                        "needs even N; trapezoid; left = Captum's LayerConductance)")
    p.add_argument("--nodes", choices=["uniform", "chebyshev"], default="uniform", help="path positions")
    p.add_argument("--baseline", choices=["pad", "pad-query", "zero", "zero-query"], default="pad")
    p.add_argument("--output", choices=["probability", "logit"], default="probability",
                   help="what F is: the class probability (default) or the raw logit")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per pair (default: the model's, at most 512; capped at its position embeddings)")
    p.add_argument("--step-batch", type=int, default=None,
                   help="path points per forward (default: sized from free memory, ~2048 token rows on CPU)")
    p.add_argument("--pair-batch", type=int, default=1, help="pairs per forward (default 1)")
    p.add_argument("--chunk-pairs", type=int, default=8, help="pairs between two saves (default 8)")
    p.add_argument("--segments", action="store_true",
                   help="also keep each neuron's conductance split by query, passage and special tokens "
                        "(fastnig analyze then writes segments.csv and the segment figure)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_grades(text, option: str):
    """``"2,3"`` -> ``[2, 3]``; ``None`` stays ``None``; ``""`` = no grade (e.g. --nonrelevant '' : no N_x)."""
    if text is None:
        return None
    try:
        return [int(g) for g in text.replace(" ", "").split(",") if g]
    except ValueError:
        raise UsageError(f"{option} {text!r}: give integer grades separated by commas, e.g. 2,3") from None


def run(args) -> int:
    relevant = parse_grades(args.relevant, "--relevant")
    nonrelevant = parse_grades(args.nonrelevant, "--nonrelevant")
    try:
        label_mapping(relevant, nonrelevant, args.relevance_threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop_when = None
    if (args.stop_level is None) != (args.stop_overlap is None):
        raise UsageError("early stopping needs both --stop-level and --stop-overlap")
    if args.stop_level is not None:
        try:
            stop_when = StopRule.parse({"level": args.stop_level, "overlap": args.stop_overlap})
        except ValueError as exc:
            raise UsageError(str(exc).replace("stop_when.level", "--stop-level")
                             .replace("stop_when.overlap", "--stop-overlap")) from None
    try:
        settings = AttributionSettings(steps=args.steps, rule=args.rule, nodes=args.nodes, baseline=args.baseline,
                                       output=args.output, max_length=args.max_length, step_batch=args.step_batch,
                                       pair_batch=args.pair_batch, segments=args.segments)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for option, value in (("--pairs", args.pairs), ("--chunk-pairs", args.chunk_pairs)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    ranker = ranker_option(args.ranker, args.template)
    try:
        collection = load_collection(args.dataset)
    except (ValueError, TypeError) as exc:  # the spec's own checks (DatasetUnavailable is one too)
        raise UsageError(f"--dataset {args.dataset!r}: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_ranker(args.model, device=device)
    bm25_dir = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "fastnig" / "bm25"
    try:
        scheme = attribute_dataset(
            model, tokenizer, collection, label=args.label, num_pairs=args.pairs, out=args.out, seed=args.seed,
            negatives=args.negatives, relevance_threshold=args.relevance_threshold, relevant=relevant,
            nonrelevant=nonrelevant, bm25_cache_dir=bm25_dir,
            agreement_filter=not args.no_filter, chunk_pairs=args.chunk_pairs, settings=settings,
            progress=not args.quiet, stop_when=stop_when, ranker=ranker)
    except ResumeRefused as exc:  # the scheme already at --out was made another way
        raise UsageError(f"--out {args.out}: {exc}") from None
    if not args.quiet:
        print(f"{scheme.name}: {scheme.count} pairs attributed, {scheme.num_dropped} dropped by the agreement "
              f"filter -> {args.out}")
        if stop_when is not None:
            stopping = scheme.extra.get("stopping") or {}
            print(f"early stopping: {stopping.get('pairs_sampled')} of at most {args.pairs} sampled pairs used "
                  f"({stopping.get('reason')})")
    return 0
