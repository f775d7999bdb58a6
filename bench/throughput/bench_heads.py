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

    python bench/throughput/bench_heads.py --repeats 9 --threads 1 --out bench/results/heads_overhead.json
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = with_run({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": os.cpu_count(),
                       "results": [bench("minilm", 1 if args.quick else args.repeats)]})
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
