"""GPU fast path: pairs/s and fraction of the bf16 peak on a MonoBERT-large-shaped model.

Random weights, real BERT-large architecture (24 layers, 1024 hidden, 4096
intermediate, 2 logits), pairs of ``--tokens`` tokens, ``--steps`` path
intervals, bf16 autocast with the fused accumulation in fp32,
``step_batch="auto"`` (as many path points per batch as free memory allows).

    python bench/throughput/bench_gpu.py                       # on a GPU: 256 tokens, 100 steps, 8 pairs
    python bench/throughput/bench_gpu.py --quick               # on a GPU: a tiny shape
    python bench/throughput/bench_gpu.py --quick --device cpu  # no GPU: a tiny shape, to check the script runs

Without CUDA it stops with a message unless ``--device cpu`` is given.  The
JSON carries the run's metadata (commit, date, CPU, GPU, threads, versions)
under ``"run"``; ``--out FILE`` also writes it to FILE.

Useful FLOPs per pair = (N + 1) points x (forward + input-gradient backward),
counted as 2 x 2 x (Linear parameters x tokens + attention 2 x tokens^2 x
hidden per layer); % of peak = useful FLOP/s / ``--peak-tflops`` (default
from the device name: H100/H200 989, A100 312 dense bf16 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import make_model, make_tokenizer, with_run  # noqa: E402

import fastnig  # noqa: E402

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40": 362.0, "A10": 125.0}
WORDS = "heat transfer boundary layer supersonic wings pressure shock wave results".split()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--pair-batch", type=int, default=1)
    parser.add_argument("--device", default="cuda",
                        help="default cuda; without a GPU only an explicit --device cpu runs (a smoke test)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny shape (2 x 64), 32 tokens, 8 steps, 2 pairs")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench_gpu.py: no CUDA device (torch {torch.__version__}): this benchmark measures the GPU "
                 "fast path and needs one. To check that the script runs on a CPU: --quick --device cpu")
    if args.quick:
        args.tokens, args.steps, args.pairs = 32, 8, 2
        shape = dict(hidden=64, layers=2, heads=4, intermediate=256)
    else:
        shape = dict(hidden=1024, layers=24, heads=16, intermediate=4096)
    tok = make_tokenizer()
    model = make_model(num_labels=2, vocab_size=tok.vocab_size, max_positions=512, init_range=0.02,
                       **shape).to(args.device)
    passage = " ".join(WORDS[i % len(WORDS)] for i in range(args.tokens))
    pairs = [("heat transfer on wings", passage)] * args.pairs
    dtype = getattr(torch, args.dtype)
    run = lambda n: fastnig.attribute(model, pairs[:n], tokenizer=tok, steps=args.steps, max_length=args.tokens,
                                      dtype=dtype, step_batch="auto", pair_batch=args.pair_batch, progress=False)
    run(1)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run(args.pairs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    h, L, T = shape["hidden"], shape["layers"], int(result.num_tokens[0])
    linear_params = sum(m.in_features * m.out_features for m in fastnig.linear_modules(model).values())
    flops_per_point = 2 * 2 * (linear_params * T + L * 2 * T * T * h)
    flops = flops_per_point * (args.steps + 1) * args.pairs
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    report = {"device": name, "tokens": T, "steps": args.steps, "pairs": args.pairs, "dtype": args.dtype,
              "seconds": seconds, "seconds_per_pair": seconds / args.pairs, "pairs_per_s": args.pairs / seconds,
              "useful_tflops": flops / seconds / 1e12, "peak_tflops": peak,
              "fraction_of_peak": (flops / seconds / 1e12 / peak) if peak else None,
              "max_abs_delta": float(result.delta.abs().max())}
    text = json.dumps(with_run(report), indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
