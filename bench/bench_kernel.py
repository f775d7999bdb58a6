"""Times the fused CPU op on the MiniLM shapes (not a test).

a, g: [1, 33, 128, H] fp32 with H = 1536 (FFN intermediate) and 384 (hidden),
one thread, a filled carry (as in the engine's chunked path), median of N runs.
Optional variants: --segments (3 segments) and --coarse (Richardson accumulator).

    .venv/bin/python bench/bench_kernel.py [--reps 21] [--segments] [--coarse]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastnig.engine.kernels import Carry, accumulate_conductance, cpu_kernel_isa


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--segments", action="store_true")
    parser.add_argument("--coarse", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
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
        print(f"H={H:5d}: median {med * 1e3:7.3f} ms  min {min(times) * 1e3:7.3f} ms  ({mb / 1e3 / med:5.2f} GB/s of a+g)")


if __name__ == "__main__":
    main()
