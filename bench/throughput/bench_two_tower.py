"""Throughput of fastnig.attribute on a two-tower ranker (issue 27) against a bare forward + backward
and Captum.

A MiniLM-shaped bi-encoder (6 layers, hidden 384, intermediate 1536, 12 heads, random weights, one
shared tower, mean pooling, dot product) and one (query, passage) pair of 32 + 128 tokens, 32 path
intervals (33 points).  Timed, interleaved and repeated (median):

* ``fastnig``: ``fastnig.attribute(..., ranker=BiEncoder("mean", "dot"))`` over every Linear of the
  tower, both calls (query and passage) attributed and summed; default settings (``richardson``,
  ``step_batch="auto"``);
* ``bare``: one forward of both towers over the 33 path points (query and passage interpolated
  together) and the input-gradient backward, parameters frozen: the floor any one-pass method pays;
  ``bare_chunked``: the same over the path chunks ``fastnig`` uses (``step_batch="auto"``; on CPU
  about 2,048 token rows per forward); ``fastnig_over_bare`` is against the faster of the two;
* ``captum``: Captum ``LayerConductance`` with the two inputs (query, passage), the towers as two
  modules of the same weights (Captum cannot attribute a module called twice), one module at a time,
  on a sample of modules of both towers spread over depth, extrapolated to all modules of both towers.

    python bench/throughput/bench_two_tower.py --threads 1 --out bench/results/two_tower.json
    python bench/throughput/bench_two_tower.py --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import make_tokenizer, with_run  # noqa: E402

import fastnig  # noqa: E402
from fastnig.rankers import BiEncoder  # noqa: E402

QUERY_TOKENS, PASSAGE_TOKENS, STEPS = 32, 128, 32
WORDS = ("heat transfer supersonic wing pressure laminar boundary layer shock wave flow theory experimental "
         "results model method").split()


def text(tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens - 2))  # [CLS] ... [SEP]


def build(layers=6, hidden=384, intermediate=1536, heads=12):
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512)
    return tf.BertModel(cfg, add_pooling_layer=False).eval(), tok


def mean_pool(h, mask):
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


def tower_inputs(tok, model, s: str):
    enc = tok(s, return_tensors="pt", return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"].bool()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(ids), emb(torch.where(special, ids, tok.pad_token_id)), enc["attention_mask"]


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--captum-modules", type=int, default=3, help="modules per tower timed with Captum")
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 repeats: a smoke run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = build(layers=2 if args.quick else 6)
    repeats = 2 if args.quick else args.repeats
    query, passage = text(QUERY_TOKENS), text(PASSAGE_TOKENS)
    (xq, bq, mq), (xd, bd, md) = tower_inputs(tok, model, query), tower_inputs(tok, model, passage)
    assert xq.shape[1] == QUERY_TOKENS and xd.shape[1] == PASSAGE_TOKENS, (xq.shape, xd.shape)
    alphas = torch.linspace(0, 1, STEPS + 1).view(-1, 1, 1)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(False)

    def score(towers, eq, ed, aq, ad):
        q = mean_pool(towers[0](inputs_embeds=eq, attention_mask=aq).last_hidden_state, aq)
        d = mean_pool(towers[1](inputs_embeds=ed, attention_mask=ad).last_hidden_state, ad)
        return (q * d).sum(-1)

    def fastnig_run():
        fastnig.attribute(model, [(query, passage)], tokenizer=tok, ranker=BiEncoder("mean", "dot"), steps=STEPS,
                          progress=False)

    def bare(chunks=((0, STEPS + 1),)):
        for start, stop in chunks:
            a = alphas[start:stop]
            pq = (bq + a * (xq - bq)).requires_grad_(True)
            pd = (bd + a * (xd - bd)).requires_grad_(True)
            n = stop - start
            f = score((model, model), pq, pd, mq.expand(n, -1), md.expand(n, -1))
            torch.autograd.backward(f.sum(), inputs=[pq, pd])

    from fastnig.engine.attribute import path_chunks
    from fastnig.engine.memory import CPU_ROWS_PER_FORWARD

    per_forward = max(1, CPU_ROWS_PER_FORWARD // (QUERY_TOKENS + PASSAGE_TOKENS))
    chunked = path_chunks(STEPS + 1, per_forward)

    def bare_chunked():
        bare(chunked)

    towers = (model, copy.deepcopy(model))
    linears = [[m for m in t.modules() if isinstance(m, nn.Linear)] for t in towers]
    per_tower = len(linears[0])
    sample = [round(i * (per_tower - 1) / max(args.captum_modules - 1, 1)) for i in range(args.captum_modules)]

    def captum_sample():
        from captum.attr import LayerConductance

        forward = lambda eq, ed, aq, ad: score(towers, eq, ed, aq, ad)  # noqa: E731
        for t in (0, 1):
            for i in sample:
                LayerConductance(forward, linears[t][i]).attribute(
                    (xq, xd), baselines=(bq, bd), additional_forward_args=(mq, md), n_steps=STEPS,
                    method="riemann_trapezoid")

    fastnig_run(), bare()  # warm up
    results = {"fastnig": [], "bare": [], "bare_chunked": [], "captum_sample": []}
    for _ in range(repeats):
        results["fastnig"] += timed(fastnig_run, 1)
        results["bare"] += timed(bare, 1)
        results["bare_chunked"] += timed(bare_chunked, 1)
        results["captum_sample"] += timed(captum_sample, 1)
    median = {k: statistics.median(v) for k, v in results.items()}
    captum_all = median["captum_sample"] / (2 * len(sample)) * (2 * per_tower)
    report = {
        "shape": {"layers": 2 if args.quick else 6, "hidden": 384, "intermediate": 1536, "heads": 12,
                  "query_tokens": QUERY_TOKENS, "passage_tokens": PASSAGE_TOKENS, "steps": STEPS,
                  "towers": "shared", "pooling": "mean", "similarity": "dot",
                  "linears_per_tower": per_tower, "captum_modules_timed": 2 * len(sample)},
        "threads": torch.get_num_threads(),
        "bare_chunks": chunked,
        "seconds": {"fastnig": median["fastnig"], "bare": median["bare"], "bare_chunked": median["bare_chunked"],
                    "captum_all_modules": captum_all},
        "fastnig_over_bare": median["fastnig"] / min(median["bare"], median["bare_chunked"]),
        "captum_over_fastnig": captum_all / median["fastnig"],
        "samples": results,
    }
    report = with_run(report)
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
