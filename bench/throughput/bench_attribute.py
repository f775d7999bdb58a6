"""Throughput of fastnig.attribute against Captum and a bare forward+backward.

Prints one JSON object.  For each model shape (random weights, real BERT
architecture) and one pair of ~`tokens` tokens, it times, interleaved and
repeated (median):

* ``fastnig``: ``fastnig.attribute`` over every encoder Linear (N+1 points,
  default settings: path chunks sized by ``auto_step_batch``, last layer cut
  to the first token by ``first_token_cut``);
* ``fastnig_no_cut``: the same without the first-token cut (what the cut saves);
* ``fastnig_segments``: the same with ``segments=True`` (per-segment sums:
  query, passage, special; ``segments_over_fastnig`` = ratio of the medians);
* ``bare``: one forward + input-gradient backward over the same N+1 path
  points in one batch, with the same frozen parameters;
* ``bare_chunked``: the same over the same path chunks as ``fastnig``: the
  floor a plain one-pass method pays (the ``fastnig_over_bare`` reported is
  against the faster of the two bares);
* ``captum``: Captum ``LayerConductance`` looped over a sample of the same
  Linear modules (spread over depth), extrapolated to all of them;

plus the peak memory of ``attribute`` with and without ``step_batch`` (fresh
subprocesses, RSS) and the fused accumulation op alone against the unfused
PyTorch expression (``accumulate_conductance_ref``) on the same tensors.

    python bench/throughput/bench_attribute.py                 # MiniLM shape + BERT-large shape
    python bench/throughput/bench_attribute.py --shapes minilm --repeats 15 --captum-repeats 4
    python bench/throughput/bench_attribute.py --shapes minilm --segments-only --repeats 7   # segments only
    python bench/throughput/bench_attribute.py --quick         # smoke run, < 1 min on 2 cores

The JSON carries the run's metadata (commit, date, CPU, GPU, threads,
versions) under ``"run"``; ``--out FILE`` also writes it to FILE.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import make_model, make_tokenizer, with_run  # noqa: E402

import fastnig  # noqa: E402
from fastnig.engine import first_token
from fastnig.engine.attribute import path_chunks
from fastnig.engine.encoding import baseline_embeddings, encode_pairs
from fastnig.engine.kernels import Carry, accumulate_conductance, accumulate_conductance_ref
from fastnig.engine.memory import auto_step_batch
from fastnig.engine.model import linear_modules
from fastnig.engine.scoring import target_function

SHAPES = {
    # name: (layers, hidden, intermediate, heads, tokens, steps)
    "minilm": (6, 384, 1536, 12, 128, 32),
    "bert-large": (24, 1024, 4096, 16, 64, 8),
}
QUERY = "what is the effect of heat transfer on supersonic wings"
PASSAGE = ("experimental results of heat transfer and pressure in the laminar boundary layer of supersonic "
           "wings show large effects of the shock wave on heating ") * 20


def build(shape):
    layers, hidden, inter, heads, tokens, steps = SHAPES[shape]
    tok = make_tokenizer()
    model = make_model(num_labels=2, hidden=hidden, layers=layers, heads=heads, intermediate=inter,
                       vocab_size=tok.vocab_size, max_positions=512, init_range=0.02)
    return model, tok, tokens, steps


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_fastnig(model, tok, tokens, steps, **kw):
    return fastnig.attribute(model, [(QUERY, PASSAGE)], tokenizer=tok, steps=steps, max_length=tokens,
                             progress=False, **kw)


def fastnig_chunks(model, tok, tokens, steps):
    """The path chunks ``fastnig.attribute`` uses by default for this pair."""
    n_tokens = int(encode_pairs(tok, [(QUERY, PASSAGE)], tokens, "pad", True).lengths[0])
    points = auto_step_batch(model, linear_modules(model), n_tokens, 1, torch.device("cpu"))
    return path_chunks(steps + 1, points)


def bare_forward_backward(model, tok, tokens, steps, chunks=None):
    """Forward + backward to the input embeddings over the same path points
    (in one batch, or chunk by chunk); returns the last chunk's input gradient."""
    enc = encode_pairs(tok, [(QUERY, PASSAGE)], tokens, "pad", True)
    emb = model.get_input_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        x, xb = baseline_embeddings(emb, enc, "pad", tok.pad_token_id)
    alphas = torch.linspace(0, 1, steps + 1)
    for start, stop in chunks or [(0, steps + 1)]:
        n = stop - start
        path = (xb + alphas[start:stop].view(-1, 1, 1) * (x - xb)).requires_grad_(True)
        logits = model(inputs_embeds=path, attention_mask=enc.attention_mask.expand(n, -1),
                       token_type_ids=enc.token_type_ids.expand(n, -1)).logits
        f = target_function(logits, torch.ones(n, dtype=torch.bool))
        torch.autograd.backward(f.sum(), inputs=[path])
    return path.grad


def run_fastnig_without_cut(model, tok, tokens, steps):
    """``fastnig.attribute`` with the first-token cut of the last layer switched off
    (``first_token_cut=False``; a fastnig without that switch gets its cut patched out)."""
    if "first_token_cut" in inspect.signature(fastnig.attribute).parameters:
        return run_fastnig(model, tok, tokens, steps, first_token_cut=False)
    original = first_token.first_token_cut
    first_token.first_token_cut = lambda model: None
    try:
        return run_fastnig(model, tok, tokens, steps)
    finally:
        first_token.first_token_cut = original


def captum_layers(model, tok, tokens, steps, names):
    from captum.attr import LayerConductance

    enc = encode_pairs(tok, [(QUERY, PASSAGE)], tokens, "pad", True)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x, xb = baseline_embeddings(emb, enc, "pad", tok.pad_token_id)
    modules = dict(model.named_modules())

    def forward(inputs_embeds):
        n = inputs_embeds.shape[0]
        logits = model(inputs_embeds=inputs_embeds, attention_mask=enc.attention_mask.expand(n, -1),
                       token_type_ids=enc.token_type_ids.expand(n, -1)).logits
        return target_function(logits, torch.ones(n, dtype=torch.bool))

    for name in names:
        LayerConductance(forward, modules[name]).attribute(x, baselines=xb, n_steps=steps,
                                                           method="riemann_trapezoid")


def bench_op(model, tok, tokens, steps, repeats):
    """The fused op alone vs the unfused expression, on an intermediate layer's real tensors."""
    name = next(n for n in linear_modules(model) if "intermediate" in n)
    captured = {}
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.detach()))
    grad = bare_forward_backward(model, tok, tokens, steps)
    handle.remove()
    del grad
    a = captured["a"].unsqueeze(0)            # [1, N+1, T, H]
    g = torch.randn_like(a)
    lengths = torch.tensor([a.shape[2]])
    out = torch.zeros(1, a.shape[-1])
    times = {"fused": [], "unfused": []}
    for _ in range(repeats):
        times["fused"].append(_timed(lambda: accumulate_conductance(a, g, lengths, out, Carry.like(a))))
        times["unfused"].append(_timed(lambda: accumulate_conductance_ref(a, g, lengths, out, Carry.like(a))))
    fused, unfused = statistics.median(times["fused"]), statistics.median(times["unfused"])
    return {"layer": name, "shape": list(a.shape), "fused_s": fused, "unfused_s": unfused,
            "speedup": unfused / fused}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_here(shape, step_batch):
    """Peak RSS growth (MiB) during one attribute call, sampled every 2 ms."""
    import threading

    model, tok, tokens, steps = build(shape)
    before = _rss_mib()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        run_fastnig(model, tok, tokens, steps, step_batch=step_batch)
    finally:
        done.set()
        thread.join()
    return peak[0] - before


def peak_memory(shape, step_batch):
    """:func:`peak_memory_here` in a fresh interpreter (no allocator caching from earlier runs)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import bench_attribute as b; print(b.peak_memory_here({shape!r}, {step_batch!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_segments(shape, repeats):
    """``segments=True`` against ``False`` alone: interleaved, the order alternating every repetition."""
    model, tok, tokens, steps = build(shape)
    times = {"fastnig": [], "fastnig_segments": []}
    run_fastnig(model, tok, tokens, steps, segments=True)  # warm-up
    for r in range(repeats):
        for key in (("fastnig", "fastnig_segments") if r % 2 == 0 else ("fastnig_segments", "fastnig")):
            times[key].append(_timed(lambda: run_fastnig(model, tok, tokens, steps, segments=key != "fastnig")))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": shape, "steps": steps, "repeats": repeats, "seconds_median": med, "seconds_all": times,
            "segments_over_fastnig": med["fastnig_segments"] / med["fastnig"]}


def bench_shape(shape, repeats, captum_sample, captum_repeats, peak=True):
    model, tok, tokens, steps = build(shape)
    names = list(linear_modules(model))
    # A sample spread evenly over depth: Captum's cost per layer depends on depth.
    k = min(captum_sample, len(names)) if captum_sample else len(names)
    sample = [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]
    chunks = fastnig_chunks(model, tok, tokens, steps)
    times = {"fastnig": [], "fastnig_no_cut": [], "fastnig_segments": [], "bare": [], "bare_chunked": [],
             "captum": []}
    captum_at = {i * repeats // captum_repeats for i in range(min(captum_repeats, repeats))}
    run_fastnig(model, tok, tokens, steps)  # warm-up
    for r in range(repeats):
        times["bare"].append(_timed(lambda: bare_forward_backward(model, tok, tokens, steps)))
        times["bare_chunked"].append(_timed(lambda: bare_forward_backward(model, tok, tokens, steps, chunks)))
        times["fastnig"].append(_timed(lambda: run_fastnig(model, tok, tokens, steps)))
        times["fastnig_no_cut"].append(_timed(lambda: run_fastnig_without_cut(model, tok, tokens, steps)))
        times["fastnig_segments"].append(_timed(lambda: run_fastnig(model, tok, tokens, steps, segments=True)))
        if r in captum_at:  # Captum is slow: fewer repetitions, spread over the run
            times["captum"].append(_timed(lambda: captum_layers(model, tok, tokens, steps, sample))
                                   * len(names) / len(sample))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    n_tokens = int(encode_pairs(tok, [(QUERY, PASSAGE)], tokens, "pad", True).lengths[0])
    result = {
        "shape": shape, "layers": SHAPES[shape][0], "hidden": SHAPES[shape][1],
        "intermediate": SHAPES[shape][2], "tokens": n_tokens, "steps": steps, "linear_modules": len(names),
        "captum_layers_timed": len(sample), "path_chunks": [b - a for a, b in chunks],
        "seconds_median": med, "seconds_all": times,
        "fastnig_vs_captum_speedup": med["captum"] / med["fastnig"] if times["captum"] else None,
        "fastnig_over_bare": med["fastnig"] / min(med["bare"], med["bare_chunked"]),
        "fastnig_no_cut_over_bare": med["fastnig_no_cut"] / min(med["bare"], med["bare_chunked"]),
        "segments_over_fastnig": med["fastnig_segments"] / med["fastnig"],
        "fused_op": bench_op(model, tok, tokens, steps, max(repeats, 5)),
    }
    chunk = max((steps + 1) // 4, 1)
    if peak:
        result["peak_rss_mib"] = {f"step_batch={steps + 1} (all at once)": peak_memory(shape, steps + 1),
                                  f"step_batch={chunk}": peak_memory(shape, chunk)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=9, help="repetitions per timing (median reported)")
    parser.add_argument("--captum-repeats", type=int, default=3,
                        help="repetitions of the (slow) Captum timing, MiniLM shape; 1 for BERT-large "
                             "(0 = skip Captum)")
    parser.add_argument("--no-peak-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--captum-sample", type=int, default=0,
                        help="time Captum on this many Linear modules spread over depth and extrapolate "
                             "(0 = all of them for the MiniLM shape, 8 for BERT-large)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--segments-only", action="store_true",
                        help="time only attribute with segments=True against False (interleaved)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MiniLM shape only, 1 repeat, Captum once on 1 Linear (extrapolated), "
                             "no peak-memory subprocesses")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.repeats, args.captum_repeats, args.captum_sample = ["minilm"], 1, 1, 1
        args.no_peak_memory = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.segments_only:
        results = [bench_segments(s, args.repeats) for s in args.shapes]
    else:
        results = [bench_shape(s, args.repeats if s == "minilm" else max(1, args.repeats // 3),
                               args.captum_sample or (0 if s == "minilm" else 8),
                               args.captum_repeats if s == "minilm" else min(1, args.captum_repeats),
                               peak=not args.no_peak_memory)
                   for s in args.shapes]
    report = with_run({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": os.cpu_count(),
                       "results": results})
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
