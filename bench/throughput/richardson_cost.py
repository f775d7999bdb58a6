"""What the Richardson rule's second accumulator costs in an attribution (not a test).

On the demo cross-encoder (MiniLM-L6, 6 layers, 20,736 neurons), relevant
Cranfield pairs at 128 tokens, N = 32 (33 points, one pair per forward):

* end to end: ``fastnig.attribute(rule="trapezoid")`` and ``rule="richardson"``
  timed alternately (the order flips every repetition), ratio of the medians;
* the op alone: the fused op's time per call with and without ``coarse_out``
  on each attributed Linear's real chunk shape (one thread, median of
  ``--kernel-reps``), summed over the Linears of one chunk, as a share of the
  median attribution time per chunk: less noisy than the end-to-end ratio on
  a shared machine.

    python bench/throughput/richardson_cost.py --out bench/results      # ~3 min on 2 CPU cores
    python bench/throughput/richardson_cost.py --quick --out /tmp/fastnig-bench   # smoke run, 1 pair

Writes ``richardson_cost.json`` and ``richardson_cost.md`` to ``--out``, both
with the run's metadata (commit, date, CPU, GPU, threads, versions).
Needs the demo model (fine-tuned once, cached under ~/.cache/fastnig/models).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fastnig
from fastnig.data import load_collection, sample_pairs
from fastnig.engine.attribute import path_chunks
from fastnig.engine.kernels import Carry, accumulate_conductance, cpu_kernel_isa
from fastnig.engine.memory import auto_step_batch
from fastnig.engine.model import linear_modules
from fastnig.training.demo_model import load_cross_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import RESULTS, run_markdown, run_metadata, write_json  # noqa: E402


def kernel_ms(a4, lengths, coarse: bool, reps: int) -> float:
    """Median ms of one op call on ``a4``'s shape (a filled carry, as in a chunked run)."""
    g4 = torch.randn_like(a4)
    out = torch.zeros(a4.shape[0], a4.shape[3])
    kwargs = {"coarse_out": torch.zeros_like(out)} if coarse else {}
    carry = Carry.like(a4, coarse=coarse)
    accumulate_conductance(a4, g4, lengths, out, carry, "trapezoid", 1, **kwargs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        accumulate_conductance(a4, g4, lengths, out, carry, "trapezoid", 1, **kwargs)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--reps", type=int, default=7, help="attribute calls per rule")
    parser.add_argument("--kernel-reps", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 pair, 1 timed call per rule (after a warm-up round), 3 op repetitions")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.reps, args.kernel_reps = 1, 1, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    model, tokenizer = load_cross_encoder("minilm-l6-cranfield")
    pairs = [p.text_pair for p in sample_pairs(load_collection("cranfield"), label=1, num_pairs=args.pairs, seed=0)]

    times = {"trapezoid": [], "richardson": []}
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for rule in (("trapezoid", "richardson") if rep % 2 else ("richardson", "trapezoid")):
            t0 = time.perf_counter()
            att = fastnig.attribute(model, pairs, tokenizer=tokenizer, steps=args.steps, rule=rule,
                                    max_length=args.max_length, progress=False)
            if rep:
                times[rule].append(time.perf_counter() - t0)
    tokens = int(att.num_tokens.max())
    medians = {rule: statistics.median(t) for rule, t in times.items()}

    # the op alone, on the chunk shapes of this run (past the first-token cut the last layer has 1 token)
    modules = linear_modules(model)
    chunk = min(auto_step_batch(model, modules, tokens, 1, torch.device("cpu"), None), args.steps + 1)
    chunks = len(path_chunks(args.steps + 1, chunk))
    lengths = torch.tensor([tokens])
    last = max(int(n.split(".")[3]) for n in modules if ".layer." in n)
    shapes = {}
    for name, m in modules.items():
        cut = f".layer.{last}." in name and not name.endswith(("query", "key", "value"))
        shape = (1, -(-(args.steps + 1) // chunks), 1 if cut else tokens, m.out_features)
        shapes[shape] = shapes.get(shape, 0) + 1
    op = {False: 0.0, True: 0.0}
    for shape, count in shapes.items():
        a4 = torch.randn(shape)
        for coarse in (False, True):
            op[coarse] += count * kernel_ms(a4, lengths[:1].clamp(max=shape[2]), coarse, args.kernel_reps)
    per_chunk_ms = 1e3 * medians["trapezoid"] / (len(pairs) * chunks)
    result = {
        "settings": vars(args), "tokens": tokens, "chunks_per_pair": chunks, "isa": cpu_kernel_isa(),
        "attribute_s": times, "median_s": medians,
        "end_to_end_ratio": medians["richardson"] / medians["trapezoid"],
        "op_ms_per_chunk": {"trapezoid": op[False], "richardson": op[True]},
        "op_extra_share_of_attribution": (op[True] - op[False]) / per_chunk_ms,
        "load_average": [load_start, os.getloadavg()[0]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_metadata()
    write_json(out / "richardson_cost.json", result, run, indent=1)
    lines = [
        "# Cost of the Richardson accumulator",
        "",
        f"`python bench/throughput/richardson_cost.py{' --quick' if args.quick else ''} --out {args.out}`: "
        f"demo MiniLM-L6 cross-encoder, {len(pairs)} "
        f"Cranfield pairs, {tokens} tokens, N = {args.steps} ({chunks} chunks per pair), {args.threads} torch "
        f"threads, CPU op `{cpu_kernel_isa()}`, 1-min load average {load_start:.1f} → {os.getloadavg()[0]:.1f} "
        "(2 cores shared with other jobs).",
        "",
        "| | trapezoid | richardson | richardson / trapezoid |",
        "|---|---:|---:|---:|",
        f"| attribute, median of {args.reps} (s) | {medians['trapezoid']:.2f} | {medians['richardson']:.2f} | "
        f"{result['end_to_end_ratio']:.3f} |",
        f"| fused op per chunk, all {len(modules)} Linears (ms) | {op[False]:.1f} | {op[True]:.1f} | "
        f"{op[True] / op[False]:.3f} |",
        "",
        f"The op's extra time is {100 * result['op_extra_share_of_attribution']:.2f} % of the attribution's "
        f"time per chunk ({per_chunk_ms:.0f} ms); the end-to-end ratio includes the noise of the shared machine.",
        "",
        run_markdown(run),
        "",
    ]
    (out / "richardson_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
