"""fastnig on the generative rankers (issue 23): time against a bare forward + backward and Captum, the
last-token cut, and what fits one 80 GB GPU for Qwen3-Reranker-0.6B / 4B / 8B.

Timing, on CPU, random weights (the real architectures, nothing downloaded),
one (query, passage) pair of 128 tokens through the family's template, 32 path
steps (33 points), float32:

* ``qwen3-0.6b-4l``: a ``Qwen3ForCausalLM`` shaped like Qwen3-0.6B (hidden 1024,
  16 query / 8 key-value heads of head_dim 128, MLP 3072 SwiGLU, the real
  vocabulary of 151,669 rows, tied embeddings) cut to 4 layers, ``yes_no``
  ranker (Qwen3-Reranker's prompt; the yes/no logits at the last token);
* ``monot5-base-2+2``: a ``T5ForConditionalGeneration`` shaped like t5-base
  (the base of castorini/monot5-base-msmarco: d_model 768, 12 heads of d_kv 64,
  d_ff 3072 with ReLU as in t5-base (not v1.1's gated GELU), vocabulary 32,128,
  tied embeddings) cut to 2 encoder + 2 decoder layers, ``monot5`` ranker.

Variants, interleaved in each repetition (the order rotating), medians:

* ``fastnig``: ``fastnig.attribute`` over every attributed Linear (default
  settings: Richardson rule, chunks by ``auto_step_batch``, the last-token cut);
* ``fastnig_no_cut`` (decoder): the same with ``last_token_cut=False``;
* ``bare``: one forward + input-gradient backward of the same F (the ranker's
  own ``logits``: for the decoder the base model, the last token, the two
  answer rows of the head; no cut, no hooks) over the same 33 points in one batch;
* ``bare_chunked``: the same over the path chunks ``fastnig`` uses (the
  ``fastnig_over_bare`` ratio is against the faster of the two bares);
* ``captum``: Captum ``LayerConductance`` (one per module, 32 steps, the same
  F without the cut) over a sample of ``k`` attributed modules spread over
  depth, extrapolated linearly to all of them (``captum_modules_timed``).

The last-token cut's exactness: the largest relative difference between the
scores with and without it (per layer ``max|a - b| / max|b|``, the maximum over layers).

The memory table (``--memory``, also part of a full run) needs no model
weights: the three Qwen3-Reranker configs are built on the ``meta`` device,
in bfloat16, 512 tokens, one pair.  It reports ``fastnig.engine.memory.chunk_memory``
(which was written for BERT-like encoders) and this script's decoder formula
(:func:`decoder_chunk_memory`), checked against the CPU allocator's measured
peak on a 2-layer Qwen3-0.6B-shaped bf16 model (``calibration``).

    python bench/throughput/bench_rankers.py                     # both shapes, defaults (long: 30+ min here)
    python bench/throughput/bench_rankers.py --quick             # smoke run, writes to /tmp/fastnig-bench
    python bench/throughput/bench_rankers.py --memory-only       # the memory table and its calibration

The committed ``bench/results/rankers_cpu.*`` (2026-12-05) come from three
runs, the two shapes side by side, then merged (each timing keeps its own
run metadata; 11-14 min per run on the shared 2-core machine at a load of 10-18):

    python bench/throughput/bench_rankers.py --shapes monot5-base-2+2 --repeats 3 --captum-k 2 \
        --no-calibration --out /tmp/t
    python bench/throughput/bench_rankers.py --shapes qwen3-0.6b-4l --repeats 3 --captum-k 1 \
        --chunked-bare-only --no-calibration --out /tmp/q     # twice: /tmp/q, then /tmp/q2
    python bench/throughput/bench_rankers.py --memory-only --out /tmp/m
    python bench/throughput/bench_rankers.py --merge /tmp/q/rankers_cpu.json /tmp/q2/rankers_cpu.json \
        /tmp/t/rankers_cpu.json --calibration-from /tmp/m/rankers_memory.json

Writes ``rankers_cpu.json`` and ``rankers_cpu.md`` into ``--out`` (default
``bench/results``; ``--quick``: ``/tmp/fastnig-bench``), each with the run's
metadata (commit, date, CPU, threads, versions).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import make_word_tokenizer, run_markdown, run_metadata, with_run  # noqa: E402

import fastnig  # noqa: E402
from fastnig.engine.attribute import path_chunks  # noqa: E402
from fastnig.engine.encoding import baseline_embeddings  # noqa: E402
from fastnig.engine.memory import auto_step_batch, chunk_memory  # noqa: E402
from fastnig.engine.rankers import bind_ranker  # noqa: E402
from fastnig.engine.scoring import target_function  # noqa: E402

QUERY = "what is the effect of heat transfer on supersonic wings"
PASSAGE = ("experimental results of heat transfer and pressure in the laminar boundary layer of supersonic "
           "wings show large effects of the shock wave on heating ") * 20
QWEN3_VOCAB = 151_669
GB = 10**9
GIB = 2**30

# Qwen3-Reranker configs (their config.json): hidden, layers, query heads, kv heads, head_dim, MLP
QWEN3_RERANKERS = {
    "Qwen3-Reranker-0.6B": (1024, 28, 16, 8, 128, 3072),
    "Qwen3-Reranker-4B": (2560, 36, 32, 8, 128, 9728),
    "Qwen3-Reranker-8B": (4096, 36, 32, 8, 128, 12288),
}


# ------------------------------------------------------------------ models
def qwen3(hidden=1024, layers=4, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=QWEN3_VOCAB,
          dtype=torch.float32, device=None, seed=0):
    """A random-weight Qwen3ForCausalLM of the given shape (``device="meta"``: no memory at all)."""
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=4, initializer_range=0.02)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            model = tf.Qwen3ForCausalLM(cfg)
        return model.to(dtype).eval()
    return tf.Qwen3ForCausalLM(cfg).to(dtype).eval()


def monot5_base(layers=2, seed=0):
    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=layers,
                      num_decoder_layers=layers, num_heads=12, feed_forward_proj="relu",
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return tf.T5ForConditionalGeneration(cfg).float().eval()


SHAPES = {
    # name: (builder, tokenizer kind, ranker family, description)
    "qwen3-0.6b-4l": (lambda: qwen3(), "qwen", "yes_no",
                      "Qwen3ForCausalLM, Qwen3-0.6B shape (hidden 1024, 16/8 heads, head_dim 128, MLP 3072 "
                      "SwiGLU, vocab 151,669, tied), 4 layers"),
    "monot5-base-2+2": (lambda: monot5_base(), "t5", "monot5",
                        "T5ForConditionalGeneration, t5-base shape (d_model 768, 12 heads, d_kv 64, d_ff 3072 "
                        "ReLU, vocab 32,128, tied), 2 encoder + 2 decoder layers"),
}


# ------------------------------------------------------------------ timing
def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Setup:
    def __init__(self, shape, tokens, steps):
        build, kind, family, self.description = SHAPES[shape]
        self.shape, self.family, self.tokens, self.steps = shape, family, tokens, steps
        self.model = build()
        for p in self.model.parameters():
            p.requires_grad_(False)  # the bare and Captum get no parameter gradients either
        self.tok = make_word_tokenizer(kind)
        self.bound = bind_ranker(family, self.model, self.tok)
        self.modules = self.bound.modules()
        self.enc = self.bound.encode([(QUERY, PASSAGE)], tokens, "pad")
        self.n_tokens = int(self.enc.lengths[0])
        with torch.no_grad():
            self.x, self.xb = baseline_embeddings(self.bound.embeddings, self.enc, "pad", self.bound.pad_id)
        points = auto_step_batch(self.model, self.modules, self.n_tokens, 1, torch.device("cpu"), coarse=True)
        self.chunks = path_chunks(steps + 1, min(points, steps + 1))

    def fastnig(self, **kw):
        return fastnig.attribute(self.model, [(QUERY, PASSAGE)], tokenizer=self.tok, ranker=self.family,
                                 steps=self.steps, max_length=self.tokens, progress=False, **kw)

    def f(self, inputs_embeds, cut=False):
        n = inputs_embeds.shape[0]
        logits = self.bound.logits(inputs_embeds, self.enc.attention_mask.expand(n, -1), None, cut)
        return target_function(logits, torch.ones(n, dtype=torch.bool))

    def bare(self, chunks=None):
        """Forward + backward of F to the path over the same points (one batch, or fastnig's chunks)."""
        alphas = torch.linspace(0, 1, self.steps + 1)
        for start, stop in chunks or [(0, self.steps + 1)]:
            path = (self.xb + alphas[start:stop].view(-1, 1, 1) * (self.x - self.xb)).requires_grad_(True)
            torch.autograd.backward(self.f(path).sum(), inputs=[path])
        return path.grad

    def captum(self, names):
        from captum.attr import LayerConductance

        named = dict(self.model.named_modules())
        for name in names:
            LayerConductance(self.f, named[name]).attribute(self.x, baselines=self.xb, n_steps=self.steps,
                                                            method="riemann_trapezoid")


def spread(names, k):
    """``k`` names spread evenly over ``names`` (depth order; ``k = 1``: the middle one, since Captum's
    cost per module falls linearly with depth)."""
    k = min(k, len(names))
    if k == 1:
        return [names[len(names) // 2]]
    return [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]


def max_relative_difference(a, b):
    """Max over layers of ``max|a - b| / max|b|`` (scores with and without the cut)."""
    worst = 0.0
    for name in b.scores:
        ref = b.scores[name].abs().max().item()
        worst = max(worst, (a.scores[name] - b.scores[name]).abs().max().item() / max(ref, 1e-30))
    return worst


def bench_shape(shape, tokens, steps, repeats, captum_repeats, captum_k, single_bare=False):
    s = Setup(shape, tokens, steps)
    names = list(s.modules)
    sample = spread(names, captum_k) if captum_k else names
    decoder = s.family in ("yes_no", "last_token_classifier")
    last = {}  # the latest attributions of each fastnig variant (the cut's exactness check)

    def keep(key, **kw):
        last[key] = s.fastnig(**kw)

    runs = {"fastnig": lambda: keep("fastnig")}
    if not single_bare:
        runs["bare"] = lambda: s.bare()
    runs["bare_chunked"] = lambda: s.bare(s.chunks)
    if decoder:
        runs["fastnig_no_cut"] = lambda: keep("fastnig_no_cut", last_token_cut=False)
    times = {k: [] for k in [*runs, "captum"]}
    keep("fastnig")  # warm-up
    captum_at = {round(i * repeats / captum_repeats) for i in range(min(captum_repeats, repeats))}
    order = list(runs)
    for r in range(repeats):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for key in rotated:
            times[key].append(_timed(runs[key]))
        if r in captum_at:
            times["captum"].append(_timed(lambda: s.captum(sample)) * len(names) / len(sample))
        print(f"  {shape} rep {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    floor = min(med.get("bare", float("inf")), med["bare_chunked"])
    result = {
        "run": run_metadata(),
        "shape": shape, "model": s.description, "ranker": s.family, "tokens": s.n_tokens, "steps": steps,
        "points": steps + 1, "attributed_modules": len(names), "path_chunks": [b - a for a, b in s.chunks],
        "repeats": repeats, "captum_repeats": len(times["captum"]),
        "captum_modules_timed": sample, "captum_extrapolated": len(sample) < len(names),
        "seconds_median": med, "seconds_all": times,
        "fastnig_over_bare": med["fastnig"] / floor,
        "fastnig_vs_captum_speedup": med["captum"] / med["fastnig"] if times["captum"] else None,
    }
    if decoder:
        with_cut, without = last["fastnig"], last["fastnig_no_cut"]
        result["fastnig_no_cut_over_bare"] = med["fastnig_no_cut"] / floor
        result["last_token_cut"] = {
            "speedup": med["fastnig_no_cut"] / med["fastnig"],
            "max_relative_difference_of_scores": max_relative_difference(with_cut, without),
            "f_input_with_cut": with_cut.f_input.tolist(), "f_input_without_cut": without.f_input.tolist()}
    return result


# ------------------------------------------------------------------ memory
def decoder_chunk_memory(hidden, layers, heads, kv_heads, head_dim, intermediate, tokens, pairs=1, c=2,
                         last_token_cut=True, repeat_kv=True, coarse=True):
    """Bytes of one path chunk of a Qwen3 / Llama-family decoder with weights in a c-byte dtype
    (bf16: c = 2), no autocast: ``(per_point, fixed)``.  Per layer and token row, what autograd
    keeps for the input gradient (parameters detached, so no Linear keeps its input):

    * the Linear outputs: q, k, v, o, gate, up, down (c each; the attributed outputs are also
      held by fastnig's hooks until their gradient arrives - the same tensors);
    * RMSNorm's float32 copy of its input (4 bytes): the two layer norms (hidden wide) and
      Qwen3's q_norm / k_norm (per head);
    * attention (SDPA): the rotated q and k, k and v repeated to every query head
      (``repeat_kv``: transformers repeats them whenever it passes a mask), the output (c)
      and the log-sum-exp (heads x 4 bytes);
    * the MLP's SiLU(gate) (c), kept by the product with up;

    the last-token cut: the last layer's o, gate, up, down, SiLU on one row per pair;
    per row once: the final norm's float32 copy, the path and its gradient (c each),
    cos/sin of the rotary embedding, a bool attention mask row (tokens bytes), and the
    transient peak of backward (two MLP-wide gradients and one attention-wide, c).
    Fixed: fastnig's carries (two points of every attributed output, four with the
    Richardson rule's coarse sum; c each), the input, baseline and their difference in
    float32, the input's carries.
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = pairs * tokens
    last = pairs if last_token_cut else rows
    full_layer = (c * (q + 2 * kv + hidden + 2 * intermediate + hidden)      # Linear outputs
                  + 4 * (2 * hidden + q + kv)                                 # RMSNorm fp32 copies
                  + c * (q + (q if repeat_kv else kv) + (q if repeat_kv else 0) + q) + 4 * heads
                  + c * intermediate)                                         # SiLU(gate)
    past_cut = c * (hidden + 2 * intermediate + hidden) + c * intermediate   # o, gate, up, down, SiLU
    per_point = {
        "layers": rows * full_layer * layers - (rows - last) * past_cut,
        "final norm, path, gradient, rotary, mask": rows * (4 * hidden + 2 * c * hidden + 2 * c * head_dim + tokens),
        "backward transients": rows * c * (2 * intermediate + q),
    }
    attributed_per_layer_rows = (q + 2 * kv + 2 * intermediate + 2 * hidden) * tokens
    attributed = attributed_per_layer_rows * layers - (hidden + 2 * intermediate + hidden) * (tokens - 1) * (
        1 if last_token_cut else 0)
    points = 4 if coarse else 2
    fixed = {"carries": pairs * attributed * points * c,
             "input carry and embeddings": pairs * tokens * hidden * (3 * 4 + points * c)}
    return per_point, fixed


def _measured_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes while ``fn`` runs (torch's profiler, every allocation and free;
    the same measurement as tests/test_engine_robustness.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def calibrate(tokens=128, layers=2, points=8, vocab=4096):
    """Measured CPU peak of ``attribute`` in chunks of ``points`` path points (two chunks) on a
    2-layer Qwen3-0.6B-shaped bf16 model, against ``chunk_memory`` and :func:`decoder_chunk_memory`."""
    model = qwen3(layers=layers, vocab=vocab, dtype=torch.bfloat16)
    tok = make_word_tokenizer("qwen")
    bound = bind_ranker("yes_no", model, tok)
    modules = bound.modules()

    def run():
        return fastnig.attribute(model, [(QUERY, PASSAGE)], tokenizer=tok, ranker="yes_no", steps=2 * points - 2,
                                 step_batch=points, max_length=tokens, progress=False)

    n = int(run().num_tokens[0])
    measured = _measured_peak_bytes(run)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = chunk_memory(model, modules, n, 1).total(points)
    per_point, fixed = decoder_chunk_memory(1024, layers, 16, 8, 128, 3072, n)
    formula = sum(fixed.values()) + points * sum(per_point.values())
    return {"model": f"Qwen3-0.6B shape, {layers} layers, vocab {vocab}, bfloat16", "tokens": n,
            "points_per_chunk": points, "measured_peak_mib": measured / 2**20,
            "note": "measured: peak live CPU tensor bytes during attribute (profiler), weights not included",
            "weights_mib": weights / 2**20, "chunk_memory_mib": engine / 2**20,
            "decoder_formula_mib": formula / 2**20,
            "chunk_memory_over_measured": engine / measured, "decoder_formula_over_measured": formula / measured}


def memory_table(tokens=512, gpu_bytes=80 * GB, reserve=GIB, steps=32):
    """What fits one 80 GB GPU per Qwen3-Reranker at ``tokens`` tokens, one pair, bf16 weights."""
    rows = []
    for name, (hidden, layers, heads, kv, head_dim, inter) in QWEN3_RERANKERS.items():
        model = qwen3(hidden, layers, heads, kv, head_dim, inter, device="meta", dtype=torch.bfloat16)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
        modules = {n: m for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
        free = gpu_bytes - weights - reserve
        engine = chunk_memory(model, modules, tokens, 1)
        per_point, fixed = decoder_chunk_memory(hidden, layers, heads, kv, head_dim, inter, tokens)
        row = {"model": name, "hidden": hidden, "layers": layers, "heads": f"{heads}/{kv}", "mlp": inter,
               "attributed_linears": len(modules), "weights_gib": weights / GIB,
               "free_after_weights_gib": free / GIB}
        for label, pp, fx in (("chunk_memory", engine.per_point, engine.fixed),
                              ("decoder_formula", per_point, fixed)):
            per, fixed_b = sum(pp.values()), sum(fx.values())
            fit = int((free - fixed_b) // per)
            auto = int((free * 0.5 - fixed_b) // per)  # auto_step_batch's budget: half the free memory
            row[label] = {"per_point_mib": per / 2**20, "fixed_mib": fixed_b / 2**20, "points_that_fit": fit,
                          "auto_step_batch": max(1, auto), f"{steps + 1}_points_in_one_chunk": fit >= steps + 1,
                          f"peak_of_{steps + 1}_points_gib": (fixed_b + (steps + 1) * per + weights) / GIB}
        rows.append(row)
    return {"tokens": tokens, "pairs": 1, "gpu_bytes": gpu_bytes, "reserved_bytes": reserve,
            "note": f"free = {gpu_bytes / GB:.0f} GB - weights (bf16) - {reserve / GIB:.0f} GiB (CUDA context, "
                    "workspace); points_that_fit uses all of it, auto_step_batch half of it "
                    "(fastnig's fraction=0.5)", "rows": rows}


# ------------------------------------------------------------------ report
def markdown(report):
    lines = ["# fastnig on generative rankers (CPU)", ""]
    for r in report.get("timing", []):
        med = r["seconds_median"]
        lines += [f"## {r['shape']}: {r['model']}", "",
                  f"Ranker `{r['ranker']}`, {r['tokens']} tokens, {r['steps']} steps ({r['points']} points), "
                  f"{r['attributed_modules']} attributed Linears, path chunks {r['path_chunks']}, "
                  f"{r['repeats']} repetitions (Captum {r['captum_repeats']}, on "
                  f"{len(r['captum_modules_timed'])} module(s)"
                  + (", extrapolated linearly to all" if r["captum_extrapolated"] else "") + "), medians.", "",
                  f"Measured {r['run']['date_utc']} (commit `{r['run']['git_commit']}`): `{r['run']['command']}`.", "",
                  "| variant | median s | each repetition, s |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {', '.join(f'{x:.1f}' for x in r['seconds_all'][k])} |" for k, v in med.items()]
        lines += ["", f"* fastnig / bare (the faster bare): **{r['fastnig_over_bare']:.2f}x**"]
        if r.get("fastnig_vs_captum_speedup"):
            lines += [f"* Captum / fastnig: **{r['fastnig_vs_captum_speedup']:.1f}x**"]
        if "last_token_cut" in r:
            cut = r["last_token_cut"]
            lines += [f"* last-token cut: no-cut / cut time **{cut['speedup']:.2f}x**; max relative difference "
                      f"of the scores {cut['max_relative_difference_of_scores']:.1e}",
                      f"* fastnig without the cut / bare: {r['fastnig_no_cut_over_bare']:.2f}x"]
        lines.append("")
    mem = report.get("memory")
    if mem:
        lines += [f"## Memory: Qwen3-Reranker on one 80 GB GPU, {mem['tokens']} tokens, one pair, bf16", "",
                  mem["note"] + ".", "",
                  "| model | weights GiB | per point MiB (formula / chunk_memory) | points that fit (formula / "
                  "chunk_memory) | auto_step_batch (formula) | 33 points in one chunk | peak of 33 points GiB |",
                  "|---|---|---|---|---|---|---|"]
        for row in mem["rows"]:
            d, e = row["decoder_formula"], row["chunk_memory"]
            lines.append(f"| {row['model']} | {row['weights_gib']:.2f} | {d['per_point_mib']:.0f} / "
                         f"{e['per_point_mib']:.0f} | {d['points_that_fit']} / {e['points_that_fit']} | "
                         f"{d['auto_step_batch']} | {'yes' if d['33_points_in_one_chunk'] else 'no'} | "
                         f"{d['peak_of_33_points_gib']:.1f} |")
        cal = mem.get("calibration")
        if cal:
            lines += ["", f"Calibration ({cal['model']}, {cal['tokens']} tokens, {cal['points_per_chunk']} points "
                      f"per chunk, CPU): measured peak {cal['measured_peak_mib']:.0f} MiB; decoder formula "
                      f"{cal['decoder_formula_mib']:.0f} MiB ({cal['decoder_formula_over_measured']:.2f}x); "
                      f"chunk_memory {cal['chunk_memory_mib']:.0f} MiB ({cal['chunk_memory_over_measured']:.2f}x)."]
        lines.append("")
    lines.append(run_markdown(report["run"]))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=0,
                        help="repetitions (0 = 3 for the decoder, 5 for monoT5)")
    parser.add_argument("--captum-repeats", type=int, default=3)
    parser.add_argument("--captum-k", type=int, default=4,
                        help="Captum on this many modules spread over depth, extrapolated (0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--chunked-bare-only", action="store_true",
                        help="time the bare pass over fastnig's chunks only, not also in one batch (saves time)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table (and its calibration)")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--calibration-from", default=None, metavar="JSON",
                        help="take the calibration from an earlier run's JSON (with that run's metadata) "
                             "instead of measuring it again")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 72 tokens, 4 steps, 1 repetition, Captum on 1 module, no calibration")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="write one report from the timings of earlier runs' JSON files (e.g. one per "
                             "--shapes, run side by side; each timing keeps its own run metadata under 'run') "
                             "and this run's memory table")
    parser.add_argument("--out", default=None, help="folder of rankers_cpu.{json,md} (default bench/results; "
                                                    "--quick: /tmp/fastnig-bench)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.steps, args.repeats, args.captum_repeats, args.captum_k = 72, 4, 1, 1, 1
        args.no_calibration = True
    out = Path(args.out or ("/tmp/fastnig-bench" if args.quick else Path(__file__).resolve().parents[1] / "results"))
    report = {"timing": []}
    if args.merge:
        for path in args.merge:
            report["timing"] += json.loads(Path(path).read_text())["timing"]
    elif not args.memory_only:
        for shape in args.shapes:
            repeats = args.repeats or (3 if shape.startswith("qwen") else 5)
            report["timing"].append(bench_shape(shape, args.tokens, args.steps, repeats, args.captum_repeats,
                                                args.captum_k, single_bare=args.chunked_bare_only))
    report["memory"] = memory_table()
    if args.calibration_from:
        earlier = json.loads(Path(args.calibration_from).read_text())
        report["memory"]["calibration"] = {**earlier["memory"]["calibration"], "run": earlier["run"]}
    elif not args.no_calibration:
        report["memory"]["calibration"] = calibrate()
    report = with_run(report)
    out.mkdir(parents=True, exist_ok=True)
    name = "rankers_memory" if args.memory_only else "rankers_cpu"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
