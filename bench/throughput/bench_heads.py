"""What heads cost: ``heads=True``, the attention pattern by segment and a conditional target vs plain.

Prints one JSON object (``--out FILE`` also writes it).  On the MiniLM shape
(random weights, 6 layers, hidden 384, 12 heads, MLP 1536) and one pair of
~128 tokens, N = 32, it times, interleaved with the order rotating every
repetition (median of ``--repeats``):

* ``plain``: ``fastnig.attribute`` with the default settings;
* ``heads``: the same with ``heads=True`` (every head of every layer, same pass);
* ``pattern``: :func:`fastnig.engine.patterns.attention_pattern_nig` (eager attention,
  head × query segment × key segment blocks), when that module is present;
* ``conditional``: one conditional target, ``target=fastnig.Unit(<last layer's
  intermediate.dense>, 0)`` (every unit below it attributed, nothing above computed).

Ratios ``*_over_plain`` are ratios of the medians, of wall time and of the
process's CPU time (``time.process_time``; with ``--threads 1`` the CPU time is
the compute alone, far less sensitive than wall time to other jobs on a shared
machine), plus the ratio of the minima of wall time.

Two more sections (``--sections``; all three by default):

* ``targets``: ``--targets`` k conditional targets of the same pair, batched
  (:func:`fastnig.engine.units.attribute_units` forced to one pass of k) vs k
  separate ``fastnig.attribute(..., target=unit)`` runs vs ``attribute_units``'s
  own choice (``default``: the memory model and the depth grouping), interleaved,
  for k units of the last layer (same depth, as a circuit's top units often are)
  and for k units at different depths (a batched pass runs every replica up to
  the highest target);
* ``segment_op``: the attention-pattern view's per-step block sums on the MiniLM
  shape (``[P, 12, 128, 128]`` probabilities, the pair's real segments, trapezoid),
  the fused segment-pair op (:mod:`fastnig.engine.pattern_kernels`, one thread) vs the
  einsum reference: median time per call and peak memory the call allocates
  (torch profiler, CPU), for P = 1 and 8; and a whole pattern pass with each.

    python bench/throughput/bench_heads.py --repeats 9 --threads 1 --out bench/results/heads_overhead.json
    python bench/throughput/bench_heads.py --sections targets,segment_op --repeats 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: the shared _common module
sys.path.insert(0, str(HERE))
from _common import with_run  # noqa: E402
from bench_attribute import PASSAGE, QUERY, build  # noqa: E402

import fastnig  # noqa: E402


def runners(model, tok, tokens, steps):
    last = model.config.num_hidden_layers - 1
    unit = fastnig.Unit(f"bert.encoder.layer.{last}.intermediate.dense", 0)
    pairs = [(QUERY, PASSAGE)]
    common = dict(tokenizer=tok, steps=steps, max_length=tokens, progress=False)
    out = {
        "plain": lambda: fastnig.attribute(model, pairs, **common),
        "heads": lambda: fastnig.attribute(model, pairs, heads=True, **common),
        "conditional": lambda: fastnig.attribute(model, pairs, target=unit, **common),
    }
    try:
        from fastnig.engine.patterns import attention_pattern_nig
    except ImportError:
        return out
    out["pattern"] = lambda: attention_pattern_nig(model, pairs, **common)
    return out


def bench(shape, repeats):
    model, tok, tokens, steps = build(shape)
    run = runners(model, tok, tokens, steps)
    names = list(run)
    for fn in run.values():  # warm-up
        fn()
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for key in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            run[key]()
            times[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    low = {k: min(v) for k, v in times.items()}
    others = [k for k in names if k != "plain"]
    return {"shape": shape, "steps": steps, "tokens": tokens, "repeats": repeats, "seconds_median": med,
            "cpu_seconds_median": med_cpu, "seconds_min": low, "seconds_all": times, "cpu_seconds_all": cpu,
            **{f"{k}_over_plain": med[k] / med["plain"] for k in others},
            **{f"{k}_over_plain_cpu": med_cpu[k] / med_cpu["plain"] for k in others},
            **{f"{k}_over_plain_min": low[k] / low["plain"] for k in others}}


def _interleaved(run, repeats):
    """Median wall and CPU seconds of each runner, the order rotating every repetition (after a warm-up)."""
    names = list(run)
    for fn in run.values():
        fn()
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for r in range(repeats):
        for key in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            run[key]()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()}


def bench_targets(shape, repeats, k):
    """k conditional targets of one pair: one batched pass vs k separate runs."""
    from fastnig.engine.units import attribute_units

    model, tok, tokens, steps = build(shape)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    last = layers - 1
    same = [fastnig.Unit(f"bert.encoder.layer.{last}.intermediate.dense", i) if i % 2 == 0 else
            fastnig.Unit(f"bert.encoder.layer.{last}.attention.output.dense", i % heads, kind="head")
            for i in range(k)]
    mixed = [fastnig.Unit(f"bert.encoder.layer.{last - (i * last) // max(k - 1, 1)}.intermediate.dense", i)
             for i in range(k)]
    pairs = [(QUERY, PASSAGE)]
    common = dict(tokenizer=tok, steps=steps, max_length=tokens, progress=False, heads=True)
    out = {"shape": shape, "steps": steps, "tokens": tokens, "repeats": repeats, "targets": k}
    for label, units in (("same_depth", same), ("mixed_depth", mixed)):
        run = {"batched": lambda units=units: attribute_units(model, pairs, units, per_pass=k, depth_slack=None,
                                                              **common),
               "separate": lambda units=units: [fastnig.attribute(model, pairs, target=u, **common) for u in units],
               "default": lambda units=units: attribute_units(model, pairs, units, **common)}
        wall, cpu = _interleaved(run, repeats)
        out[label] = {"units": [u.describe() for u in units], "seconds_median": wall, "cpu_seconds_median": cpu,
                      **{f"{key}_over_separate": wall[key] / wall["separate"] for key in ("batched", "default")},
                      **{f"{key}_over_separate_cpu": cpu[key] / cpu["separate"] for key in ("batched", "default")}}
    return out


def _peak_bytes(fn):
    """Peak of what ``fn`` allocates on the CPU (torch profiler: allocations and frees in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    now = peak = 0
    for _, size in events:
        now += size
        peak = max(peak, now)
    return peak


def bench_segment_op(shape, repeats, calls=50):
    """The pattern view's block sums per path step: fused segment-pair op vs the einsum reference."""
    from fastnig.engine import pattern_kernels as pk
    from fastnig.engine.encoding import encode_pairs
    from fastnig.engine.patterns import attention_pattern_nig

    model, tok, tokens, steps = build(shape)
    heads = model.config.num_attention_heads
    enc = encode_pairs(tok, [(QUERY, PASSAGE)], tokens, "pad", True)
    T = enc.segments.shape[1]
    out = {"shape": shape, "tokens": T, "heads": heads, "calls": calls, "per_pairs": {}}
    for P in (1, 8):
        gen = torch.Generator().manual_seed(0)
        a0, a1 = (torch.softmax(torch.randn(P, heads, T, T, generator=gen), -1) for _ in range(2))
        g0, g1 = (torch.randn(P, heads, T, T, generator=gen) for _ in range(2))
        ids = enc.segments.expand(P, T).contiguous()
        blocks = torch.zeros(P, heads, 3, 3)
        ops = {"fused": lambda: pk.accumulate_segment_pairs(a0, g0, a1, g1, ids, ids, blocks, threads=1),
               "einsum": lambda: pk.accumulate_segment_pairs_ref(a0, g0, a1, g1, ids, ids, blocks)}
        row = {}
        for name, fn in ops.items():
            fn()
            times = []
            for _ in range(max(repeats, 3)):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - start) / calls)
            row[f"{name}_ms_per_call"] = 1000 * statistics.median(times)
            row[f"{name}_peak_bytes"] = _peak_bytes(fn)
        row["input_bytes_per_tensor"] = a0.numel() * 4
        row["einsum_over_fused"] = row["einsum_ms_per_call"] / row["fused_ms_per_call"]
        out["per_pairs"][str(P)] = row
    pairs = [(QUERY, PASSAGE)]
    common = dict(tokenizer=tok, steps=steps, max_length=tokens, progress=False)
    real = pk.segment_pairs_available

    def einsum_pass():
        pk.segment_pairs_available = lambda device: False
        try:
            attention_pattern_nig(model, pairs, **common)
        finally:
            pk.segment_pairs_available = real

    wall, cpu = _interleaved({"fused": lambda: attention_pattern_nig(model, pairs, **common),
                              "einsum": einsum_pass}, repeats)
    out["pattern_pass"] = {"seconds_median": wall, "cpu_seconds_median": cpu,
                           "einsum_over_fused_cpu": cpu["einsum"] / cpu["fused"]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat")
    parser.add_argument("--sections", default="overhead,targets,segment_op",
                        help="comma-separated: overhead, targets, segment_op")
    parser.add_argument("--targets", type=int, default=4, help="k of the targets section")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": os.cpu_count()}
    if "overhead" in sections:
        report["results"] = [bench("minilm", repeats)]
    if "targets" in sections:
        report["targets"] = bench_targets("minilm", repeats, args.targets)
    if "segment_op" in sections:
        report["segment_op"] = bench_segment_op("minilm", repeats)
    report = with_run(report)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
