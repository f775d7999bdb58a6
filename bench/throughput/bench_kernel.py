"""Times the fused CPU op on the MiniLM shapes (not a test).

a, g: [1, 33, 128, H] fp32 with H = 1536 (FFN intermediate) and 384 (hidden),
one thread, a filled carry (as in the engine's chunked path), median of N runs.
Optional variants: --segments (3 segments) and --coarse (Richardson accumulator).

    .venv/bin/python bench/throughput/bench_kernel.py [--reps 21] [--segments] [--coarse]
    .venv/bin/python bench/throughput/bench_kernel.py --quick      # 5 reps

Prints text (a first ``run:`` line with the run's metadata: commit, date, CPU,
GPU, threads, versions); ``--out FILE`` also writes the results as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fastnig.engine.kernels import Carry, accumulate_conductance, cpu_kernel_isa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import run_metadata, with_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--segments", action="store_true")
    parser.add_argument("--coarse", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5 reps (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.quick:
        args.reps = 5
    torch.manual_seed(0)
    run = run_metadata()
    print("run: " + json.dumps(run))
    results = []
    print(f"isa={cpu_kernel_isa()} threads=1 reps={args.reps} segments={args.segments} coarse={args.coarse}")
    for H in (1536, 384):
        a = torch.randn(1, 33, 128, H)
        g = torch.randn(1, 33, 128, H)
        lengths = torch.tensor([128])
        kwargs = {}
        out_shape = (1, H)
        if args.segments:
            seg = torch.zeros(1, 128, dtype=torch.int64)
            seg[:, 1:20] = 1
            seg[:, 20:] = 2
            kwargs["segments"] = seg
            out_shape = (1, 3, H)
        out = torch.zeros(out_shape)
        if args.coarse:
            kwargs["coarse_out"] = torch.zeros(out_shape)
        carry = Carry.like(a)
        accumulate_conductance(a, g, lengths, out, carry, "trapezoid", 1, **kwargs)  # warm-up, fills the carry
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            accumulate_conductance(a, g, lengths, out, carry, "trapezoid", 1, **kwargs)
            times.append(time.perf_counter() - t0)
        mb = 2 * a.numel() * a.element_size() / 1e6
        med = statistics.median(times)
        print(f"H={H:5d}: median {med * 1e3:7.3f} ms  min {min(times) * 1e3:7.3f} ms  "
              f"({mb / 1e3 / med:5.2f} GB/s of a+g)")
        results.append({"H": H, "shape": list(a.shape), "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
                        "gb_per_s": mb / 1e3 / med, "times_s": times})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"isa": cpu_kernel_isa(), "reps": args.reps, "segments": args.segments, "coarse": args.coarse,
                  "results": results}
        Path(args.out).write_text(json.dumps(with_run(report, run), indent=2) + "\n")


if __name__ == "__main__":
    main()
