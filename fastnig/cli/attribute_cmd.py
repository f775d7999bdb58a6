"""``fastnig attribute``: one dataset and label -> one scheme file (resumable)."""
from __future__ import annotations

import argparse

import torch

from ..models import load_cross_encoder
from ..pipeline import attribute_dataset

DESCRIPTION = """\
Attribute the pairs of one dataset and one label with Neuron Integrated
Gradients and save their per-neuron mean as a scheme (P_x for relevant pairs,
N_x for non-relevant ones).

Pairs are sampled deterministically (--seed), filtered to those the model
classifies correctly (SPEC §6), and attributed in chunks; the scheme file is
saved after each chunk.  Run the same command again after an interruption and
it continues where it stopped; the result equals an uninterrupted run.

Datasets: an abbreviation (ms, f, tc, nf, nq, tn, r, b, ms-dev, lotte-science,
...), any ir_datasets id (cranfield, beir/nfcorpus/test, ...), a local BEIR
folder, or trec:docs_tsv=D,queries_tsv=Q,qrels_trec=R.
Models: a Hugging Face id, a local save_pretrained folder, or minilm-l6.
"""

EPILOG = """\
example:
  fastnig attribute --model ./my-cross-encoder --dataset cranfield \\
      --label relevant --pairs 200 --steps 50 --out runs/P_cranfield
  fastnig analyze runs/ --out runs/analysis
"""


def register(sub) -> None:
    p = sub.add_parser("attribute", help="attribute one dataset/label into a scheme file",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face id, local folder, or 'minilm-l6'")
    p.add_argument("--dataset", required=True, help="dataset spec (see above)")
    p.add_argument("--label", required=True, choices=["relevant", "non-relevant"], help="which pairs to attribute")
    p.add_argument("--out", required=True, help="scheme path, e.g. runs/P_nf (writes P_nf.json + tensors)")
    p.add_argument("--pairs", type=int, default=100, help="pairs sampled before the agreement filter (default 100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--negatives", choices=["judged", "unjudged"], default="judged",
                   help="non-relevant pairs: judged grade 0 (default, SPEC) or random unjudged documents")
    p.add_argument("--relevance-threshold", type=int, default=1, help="lowest grade counted relevant (default 1)")
    p.add_argument("--no-filter", action="store_true", help="keep pairs the model gets wrong")
    p.add_argument("--steps", type=int, default=100, help="path intervals N (default 100)")
    p.add_argument("--rule", choices=["trapezoid", "left"], default="trapezoid",
                   help="integration rule (default trapezoid; left = Captum's LayerConductance)")
    p.add_argument("--nodes", choices=["uniform", "chebyshev"], default="uniform", help="path positions")
    p.add_argument("--baseline", choices=["pad", "pad-query", "zero", "zero-query"], default="pad")
    p.add_argument("--output", choices=["probability", "logit"], default="probability",
                   help="what F is: the class probability (default) or the raw logit")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per pair (default: the model's, at most 512; capped at its position embeddings)")
    p.add_argument("--step-batch", type=int, default=None, help="path points per forward (default: sized from free memory, ~2048 token rows on CPU)")
    p.add_argument("--pair-batch", type=int, default=1, help="pairs per forward (default 1)")
    p.add_argument("--chunk-pairs", type=int, default=8, help="pairs between two saves (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_cross_encoder(args.model, device=device)
    scheme = attribute_dataset(
        model, tokenizer, args.dataset, label=args.label, num_pairs=args.pairs, out=args.out, seed=args.seed,
        negatives=args.negatives, relevance_threshold=args.relevance_threshold,
        agreement_filter=not args.no_filter, chunk_pairs=args.chunk_pairs, steps=args.steps, rule=args.rule, nodes=args.nodes,
        baseline=args.baseline, output=args.output, max_length=args.max_length, step_batch=args.step_batch,
        pair_batch=args.pair_batch, progress=not args.quiet)
    if not args.quiet:
        print(f"{scheme.name}: {scheme.count} pairs attributed, {scheme.num_dropped} dropped by the agreement "
              f"filter -> {args.out}")
    return 0
