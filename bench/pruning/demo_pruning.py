"""The demo's pruning stage before / after issue 24, and whether bf16 reranking changes anything (not a test).

Runs ``stage_pruning`` of the demo config (``fastnig/study/configs/demo.yaml``:
P_cran, N_cran, F_A at 1 % and 5 % on 34 held-out Cranfield queries, 3
random sets per row) on the schemes of a finished demo run, in two settings,
alternately (``--rounds`` times each, median):

* **before**: fp32, full forwards (``dtype: float32, prefix_reuse: false``):
  the computation of the code before issue 24;
* **after**: bf16 autocast (``dtype: auto``: bf16 on a CPU with AVX512-BF16 /
  AMX) and prefix reuse (the default; fp32 stays the default dtype,
  docs/pruning.md).

(the demo's sets all reach layer 0 at 1 % and 5 %, so prefix reuse has nothing
to skip there: the difference is the dtype).  The per-query nDCG@10 of every
reranking the stage ran (the original model, each set, each random set) is
recorded in both settings and compared, and every Table 4 verdict of the two
tables: significance of each row, N_cran > P_cran at each level, and each set
(F_A included) against its random mean.

    python bench/pruning/demo_pruning.py --run runs/demo --out bench/results      # 53 min at a load of 10-20 on 2 cores
    python bench/pruning/demo_pruning.py --run runs/demo --quick --out /tmp/fastnig-bench

Writes ``demo_pruning.json`` and ``demo_pruning.md`` (with the run's metadata).
Needs a finished ``fastnig demo`` run (its ``schemes/``) and the cached demo model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastnig.evaluation.pruning import PruningBenchmark, native_bf16
from fastnig.evaluation.reranking import build_candidates, compare_ndcg
from fastnig.study.config import load_config
from fastnig.study.distributed import Ranks
from fastnig.study.pipeline import preflight, stage_attribution, stage_pruning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import run_markdown, write_json  # noqa: E402

SETTINGS = {"before": {"dtype": "float32", "prefix_reuse": False},
            "after": {"dtype": "auto", "prefix_reuse": True}}


def verdicts(rows):
    """Every Table 4 verdict of a table's rows: significance, N > P per level, set vs random per row."""
    out = {}
    by = {(r["set"], r["level_percent"], r["dataset"]): r for r in rows}
    for (name, level, dataset), r in sorted(by.items()):
        out[f"significant {name} @ {level:g}%"] = bool(r["significant"])
        out[f"{name} @ {level:g}% hurts more than random"] = r["drop_percent"] > r["random_drop_mean"]
        n, p = by.get(("N_cran", level, dataset)), by.get(("P_cran", level, dataset))
        if n and p:
            out[f"N_cran > P_cran @ {level:g}%"] = n["drop_percent"] > p["drop_percent"]
    return out


def stage_times(study, schemes, rounds, scratch):
    """Wall times of ``stage_pruning`` per setting (alternating), each setting's table rows, and the per-query
    nDCG@10 of every reranking it ran, in order (the original, then each set and its random sets)."""
    times = {k: [] for k in SETTINGS}
    tables, work, per_query = {}, {}, {}
    base = copy.deepcopy(study.config.pruning)
    original_ndcg = PruningBenchmark.ndcg
    for _ in range(rounds):
        for name, settings in SETTINGS.items():
            study.config.pruning = {**base, **settings}
            shutil.rmtree(scratch / "pruning", ignore_errors=True)
            study.benchmarks.clear()  # no reranking kept from the previous run: every run starts cold
            seen = []

            def recording(self, scores, seen=seen):
                value = original_ndcg(self, scores)
                seen.append(value)
                return value

            PruningBenchmark.ndcg = recording
            try:
                started = time.perf_counter()
                table = stage_pruning(study, schemes, progress=False)
                times[name].append(time.perf_counter() - started)
            finally:
                PruningBenchmark.ndcg = original_ndcg
            tables[name], per_query[name] = table.rows, seen
            work[name] = json.loads((scratch / "pruning" / "work.json").read_text())
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    study.config.pruning = base
    return times, tables, work, per_query


def warm_up(study):
    """BM25 candidates (cached index), ranx's and scipy's first calls: outside the timed runs."""
    pru = study.config.pruning
    candidates = build_candidates(study.validation["cran"], num_queries=pru["queries"], seed=pru["seed"],
                                  depth=pru["depth"], cache_dir=study.config.cache_dir / "bm25", progress=False)
    bench = PruningBenchmark(study.model, study.tokenizer, candidates, pru["batch_size"], pru["max_length"],
                             progress=False)
    bench.ndcg(np.arange(candidates.num_pairs, dtype=np.float64))
    compare_ndcg([0.5, 0.6, 0.7], [0.4, 0.6, 0.6])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished demo run folder (its schemes/ are used)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each setting (alternating)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 random set per row")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    source = Path(args.run)
    if not (source / "schemes").is_dir():
        sys.exit(f"{source}/schemes not found: run `fastnig demo --output {source}` first")
    scratch = Path(tempfile.mkdtemp(prefix="fastnig-prune-bench-"))
    shutil.copytree(source / "schemes", scratch / "schemes")
    cfg = load_config("demo", output=str(scratch))
    if args.quick:
        cfg.pruning["repetitions"] = 1
    study = preflight(cfg, Ranks())
    schemes = stage_attribution(study, progress=False)
    rounds = 1 if args.quick else args.rounds
    warm_up(study)
    times, tables, work, per_query = stage_times(study, schemes, rounds, scratch)
    comparison = {}
    for i, (a, b) in enumerate(zip(per_query["before"], per_query["after"])):
        diff = np.abs(a - b)
        comparison[str(i)] = {"queries_changed": int(np.count_nonzero(diff)), "max_abs_diff": float(diff.max()),
                              "mean_fp32": float(a.mean()), "mean_bf16": float(b.mean())}
    info = {"rerankings": len(per_query["before"]), "queries": int(per_query["before"][0].size),
            "rerankings_with_a_changed_query": sum(c["queries_changed"] > 0 for c in comparison.values()),
            "queries_changed_total": sum(c["queries_changed"] for c in comparison.values()),
            "max_abs_diff": max(c["max_abs_diff"] for c in comparison.values())}
    report = {
        "settings": SETTINGS, "rounds": rounds, "native_bf16": native_bf16(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(), "load_average_after": list(os.getloadavg()),
        "stage_seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "speedup_after_vs_before": statistics.median(times["before"]) / statistics.median(times["after"]),
        "verdicts": {k: verdicts(v) for k, v in tables.items()},
        "verdicts_identical": verdicts(tables["after"]) == verdicts(tables["before"]),
        "tables": tables, "work": work, "bf16_vs_fp32_per_query": comparison, "bf16_vs_fp32_info": info,
    }
    out = Path(args.out)
    write_json(out / "demo_pruning.json", report)
    lines = ["# Demo pruning stage before / after issue 24", "",
             f"stage_pruning of the demo config, {rounds} timed run(s) per setting, alternating; median seconds:", "",
             "| setting | dtype | prefix reuse | median s | runs |", "|---|---|---|---|---|"]
    for k, s in SETTINGS.items():
        lines.append(f"| {k} | {s['dtype']} | {s['prefix_reuse']} | {report['median_seconds'][k]:.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in times[k])} |")
    lines += ["", f"Speed-up after / before: **{report['speedup_after_vs_before']:.2f}x**; every verdict identical: "
              f"{report['verdicts_identical']}.", "",
              f"bf16 vs fp32, per-query nDCG@10 of the {info['rerankings']} rerankings ({info['queries']} queries "
              f"each; the original model's first): {info['rerankings_with_a_changed_query']} rerankings with a "
              f"changed query, {info['queries_changed_total']} query values changed in all, largest difference "
              f"{info['max_abs_diff']:.4f}.", "",
              "| reranking | queries changed | max abs diff | mean fp32 | mean bf16 |", "|---|---|---|---|---|"]
    for key, c in comparison.items():
        lines.append(f"| {key} | {c['queries_changed']} | {c['max_abs_diff']:.4f} | {c['mean_fp32']:.4f} | "
                     f"{c['mean_bf16']:.4f} |")
    lines += ["", "Verdicts (before = after?):", ""]
    for key, value in report["verdicts"]["before"].items():
        lines.append(f"- {key}: {value} / {report['verdicts']['after'][key]}")
    lines += ["", "Rows (before / after): set, level, drop %, p, random drop mean:", ""]
    for a, b in zip(tables["before"], tables["after"]):
        lines.append(f"- {a['set']} @ {a['level_percent']:g}%: {a['drop_percent']:.2f} / {b['drop_percent']:.2f}, "
                     f"p {a['p_value']:.3g} / {b['p_value']:.3g}, random {a['random_drop_mean']:.2f} / "
                     f"{b['random_drop_mean']:.2f}")
    (out / "demo_pruning.md").write_text("\n".join(lines) + "\n\n" + run_markdown() + "\n")
    print("\n".join(lines))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
