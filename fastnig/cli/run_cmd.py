"""``fastnig run CONFIG`` and ``fastnig demo``: the whole study in one command."""
from __future__ import annotations

import argparse
import logging
import sys

from ..study.pipeline import run_study
from ..study.plan import ACCELERATORS, measure_cpu_flops, plan_config, render
from .usage import UsageError

DESCRIPTION = """\
Run the whole study of "Which Neurons Matter in IR?" from one configuration
file (YAML or TOML): attribution schemes per dataset and label, the overlap
and per-layer analyses (Figures 2a-d, 3, 4a/4b, 5), the baseline table (Table 1),
the pruning evaluation against random pruning (Table 4), and a report
(report.md + report.html: findings and the reproduction scorecard first,
settings and timings last) in the output folder.

CONFIG is a file or a packaged name: `paper` (MonoBERT-large, the paper's
eight datasets and validation sets; needs network access and licensed data),
`paper-zero` (the same with the zero baseline, the paper's §6; its report
puts itself beside runs/paper) or `demo` (offline: a MiniLM-L6 cross-encoder fine-tuned on the spot,
Cranfield and MEDLINE, both packaged with fastnig).

Every stage writes atomically and is skipped when its output exists with the
same settings: run the same command again after an interruption and only
unfinished work is redone.  Several processes: launch with torchrun, e.g.
  torchrun --nproc-per-node 4 -m fastnig run paper
(pairs, queries and pruning runs are sharded; rank 0 writes the outputs).

--plan prints what the configuration costs instead of running it: schemes,
pairs, path points, token rows and FLOPs (from the model's config.json or
its known shape), with the estimated time on this machine (a short measured
matmul) and on 1 and 8 H100 GPUs (with --device: on --gpus of that
accelerator instead), at a stated efficiency.  It needs no network, data or
model weights and takes a few seconds.
"""

EPILOG = """\
examples:
  fastnig run paper --output runs/paper
  fastnig run my.yaml --model ./my-cross-encoder --dataset ms=beir/scifact/test
  fastnig demo
  fastnig run paper --plan --device h100 --gpus 8
"""


def register(sub) -> None:
    for name in ("run", "demo"):
        if name == "run":
            p = sub.add_parser("run", help="run a whole study from a config file", description=DESCRIPTION,
                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
            p.add_argument("config", help="config file (.yaml/.toml) or packaged name: paper, paper-zero, demo")
        else:
            p = sub.add_parser("demo", help="the offline demo study (= fastnig run demo)",
                               description="Run the packaged offline demo configuration: fine-tune MiniLM-L6 as "
                                           "a cross-encoder (cached), attribute Cranfield and MEDLINE pairs, "
                                           "analyse, prune, and write the report. About 10 minutes on 2 CPU "
                                           "cores the first time.",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            p.set_defaults(config="demo")
        p.add_argument("--model", default=None, help="override the model (Hugging Face id or folder)")
        p.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                       help="override or add a dataset of the config (attribution or validation), e.g. "
                            "ms=msmarco-passage/trec-dl-2019/judged; repeatable")
        p.add_argument("--output", default=None, help="override the output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bars or log lines on the console")
        plan = p.add_argument_group("cost plan (nothing is run)")
        plan.add_argument("--plan", action="store_true",
                          help="print the work and estimated time of the config, offline, in seconds")
        plan.add_argument("--device", default=None, metavar="NAME",
                          help="with --plan: estimate on this accelerator (h100, h200, a100, l4, t4) instead of "
                               "the default reference, 1 and 8 x h100")
        plan.add_argument("--gpus", type=int, default=1, metavar="N",
                          help="with --plan --device: number of accelerators (default: 1)")
        plan.add_argument("--tokens", type=int, default=None, metavar="N",
                          help="with --plan: assumed mean tokens per pair (default: max_length, an upper bound)")
        p.set_defaults(func=run)


def run(args) -> int:
    datasets = {}
    for item in args.dataset:
        if "=" not in item:
            raise UsageError(f"--dataset {item!r}: write NAME=SPEC, e.g. nf=beir/nfcorpus/test")
        name, spec = item.split("=", 1)
        datasets[name.strip()] = spec.strip()
    if args.plan:
        return _plan(args, datasets)
    if args.device or args.gpus != 1 or args.tokens is not None:
        raise UsageError("--device, --gpus and --tokens go with --plan (the run's torch device is the config's "
                         "`device:` key)")
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fastnig] %(message)s"))
        logging.getLogger("fastnig.run").addHandler(handler)
    report = run_study(args.config, progress=not args.quiet, model=args.model, datasets=datasets or None,
                       output=args.output)
    if not args.quiet:
        print(f"report: {report} (and report.html beside it)")
    return 0


def _plan(args, datasets) -> int:

    if args.device and args.device.lower() not in ACCELERATORS:
        raise UsageError(f"--device {args.device!r} is not one of {sorted(ACCELERATORS)}")
    if args.gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {args.gpus}")
    if args.gpus != 1 and not args.device:
        raise UsageError("--gpus needs --device (e.g. --device h100 --gpus 8)")
    # A ConfigError is a user error: fastnig.cli.main prints it as one line with exit code 2.
    plan = plan_config(args.config, tokens=args.tokens, model=args.model, datasets=datasets or None)
    print(render(plan, cpu_flops=measure_cpu_flops(min(plan.shape.hidden, 1024)), device=args.device,
                 gpus=args.gpus))
    return 0
