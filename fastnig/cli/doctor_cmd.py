"""``fastnig doctor``: check this installation (and its GPUs) before trusting a long run."""
from __future__ import annotations

import argparse
import time

import torch

from ..engine import build_info, selfcheck
from .usage import UsageError

DESCRIPTION = """\
Check this installation: run it first on a new machine, and on every GPU
machine before a long run.  Prints the versions (Python, torch,
transformers, fastnig), the compiled extension's build (which build of the
CPU kernel runs, whether the CUDA kernels were built and for which GPU
architectures) and the devices torch sees, then runs the checks:

  CPU   the fused kernel against its float64 reference on odd shapes, for
        every build of the CPU kernel that runs here (AVX2 + FMA, baseline),
        rules left and trapezoid, chunks linked by a carry, segments and the
        coarse accumulator; run-to-run bit identity; the CUDA kernels' code
        through the host emulation; an attribution of a tiny random BERT
        (finite scores, small convergence delta); the kernel's bandwidth
  GPU   (each GPU seen, or --device) the build has code for it; the CUDA
        kernel against the reference on the same shapes; run-to-run bit
        identity; the tiny BERT's attribution on the GPU against the CPU's;
        an out-of-memory error injected into a chunked attribution on the
        GPU, whose redo must equal an unchunked run; a throughput figure

and prints one line per check: PASS, FAIL, SKIP (with why) or INFO.  Exit
code 0 when nothing failed, 1 otherwise.  Needs no network, data or model
download; ~15 s on 2 CPU cores (--quick: fewer checks).
"""

EPILOG = """\
examples:
  fastnig doctor
  fastnig doctor --device cuda:1
  fastnig doctor --quick
"""


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check this installation, its kernels and its GPUs (run it first)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", action="append", default=None, metavar="DEVICE",
                   help="the GPU(s) to check, e.g. cuda:1 (repeatable; default: every GPU torch sees)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU checks")
    p.add_argument("--quick", action="store_true",
                   help="leave out the host emulation and the throughput figures")
    p.set_defaults(func=run)


def _gpus(args):
    if args.cpu_only:
        return []
    if not args.device:
        return build_info.gpus()
    for name in args.device:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device (e.g. cuda:0)") from None
        if device.type != "cuda":
            raise UsageError(f"--device {name!r}: give a GPU (cuda:N); the CPU is always checked")
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: torch sees {torch.cuda.device_count()} GPU(s) here")
    return list(dict.fromkeys(args.device))


def _section(title, rows) -> None:
    print(title)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def run(args) -> int:
    gpus = _gpus(args)
    started = time.perf_counter()
    _section("versions", build_info.versions())
    _section("extension (fastnig.engine._C)", build_info.extension_build())
    _section("devices", build_info.devices())
    print("\nchecks")
    results = []

    def show(found):
        for r in found:
            print(f"  {r.status:<4}  {r.name:<56} {r.seconds:5.1f} s  {r.detail}", flush=True)
        results.extend(found)

    tiny = selfcheck.TinyModel()  # one tiny BERT for every check, and its CPU attribution computed once
    show(selfcheck.cpu_checks(tiny=tiny, quick=args.quick))
    for device in gpus:
        show(selfcheck.device_checks(device, tiny=tiny, quick=args.quick))
    if not gpus:
        show([selfcheck.CheckResult("GPU checks", selfcheck.SKIP,
                                    "--cpu-only" if args.cpu_only else "no GPU seen (see devices above)")])
    counts = selfcheck.summary(results)
    verdict = "FAILED: do not trust results of this installation before fixing it" if counts["FAIL"] else "ok"
    print(f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP, {counts['INFO']} INFO "
          f"in {time.perf_counter() - started:.0f} s: {verdict}")
    return 1 if counts["FAIL"] else 0
