"""How many pairs does a scheme need?  Validation of the split-half stability estimate.

For each scheme (Cranfield and MEDLINE, relevant and non-relevant — random
unjudged negatives), on the offline demo model (MiniLM-L6 fine-tuned on
Cranfield, :func:`fastnig.training.demo_model.offline_demo_model`):

1. draw pairs deterministically (seed 0), keep those the model agrees with
   (the agreement filter), in draw order, until the *pool* holds ``--pool``
   pairs; attribute every pool pair once (cached per chunk under ``--cache``,
   so a killed run continues);
2. for n = 16, 32, 64, 128 and every block of n pairs ``[j·2n, j·2n + n)`` of
   the pool (8, 4, 2, 1 blocks), build the scheme of those n pairs with
   :class:`fastnig.Scheme` (halves by the pair-id hash, as in a real run) and
   compare, at X = 0.1, 1, 5 %:

   * the estimate for doubled pairs, :func:`fastnig.neurons.stability.stability`
     (factor 2), with the true overlap of the top-X % set of the n pairs and
     that of the 2n pairs ``[j·2n, j·2n + 2n)``;
   * the estimate for the whole pool (factor pool / n) with the true overlap
     of the top-X % set of the n pairs and that of the whole pool;

3. simulates the early-stopping rule (level 1 %, overlap 0.95, rounds of
   16, 32, 64, ... pairs of the pool) and reports where it stops, the true
   overlap of the stopped set with the pool's, and what it saves.

Writes ``stability.csv`` (one row per scheme × level × n, means over blocks),
``stability_blocks.csv`` (every block), ``stability_stopping.csv``,
``stability.md``, ``stability.json`` and ``stability.png`` into ``--out``; the
run's metadata (commit, date, CPU, GPU, threads, versions) goes into the JSON
(``"run"``), the Markdown (last line) and a ``<name>.meta.json`` beside each CSV.

    python bench/accuracy/stability.py --out bench/results          # ~30 min on 2 busy CPU cores (4 steps)
    python bench/accuracy/stability.py --quick --out /tmp/fastnig-bench   # smoke run: P_cranfield + N_med, pool 32

Needs the demo model (fine-tuned once, cached under ~/.cache/fastnig/models).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import fastnig
from fastnig.data import filter_agreeing, load_collection, sample_pairs
from fastnig.engine.attribute import Attributions
from fastnig.neurons.scheme import Scheme
from fastnig.neurons.sets import neuron_universe, top_count
from fastnig.neurons.stability import StopRule, stability_estimates, top_overlap
from fastnig.study.pipeline import pair_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import RESULTS, run_markdown, run_metadata, write_csv_meta, write_json  # noqa: E402

SCHEMES = [("cranfield", "relevant"), ("cranfield", "non-relevant"), ("med", "relevant"), ("med", "non-relevant")]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def agreeing_pool(model, tokenizer, collection, label: str, pool: int, max_length: int):
    """The first ``pool`` agreeing pairs of the seed-0 draw (the draw grows until enough agree)."""
    negatives = "unjudged" if label == "non-relevant" else "judged"
    size = int(pool * 1.5)
    while True:
        drawn = sample_pairs(collection, label=label, num_pairs=size, seed=0, negatives=negatives)
        kept, _ = filter_agreeing(model, tokenizer, drawn, max_length=max_length, progress=False)
        if len(kept) >= pool or len(drawn) < size:
            return kept[:pool], len(drawn), len(kept)
        size *= 2


def attribute_pool(model, tokenizer, pairs, label: str, cache: Path, steps: int, max_length: int,
                   chunk: int = 16) -> Attributions:
    """Per-pair NIG of every pool pair, resumable chunk by chunk through ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(pairs), chunk):
        block = pairs[start:start + chunk]
        key = {"ids": [pair_id(p) for p in block], "steps": steps, "max_length": max_length,
               "model": str(model.config.name_or_path)}
        path = cache / f"chunk{start:05d}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            if saved["key"] == key:
                parts.append(saved["att"])
                continue
        t = time.perf_counter()
        att = fastnig.attribute(model, [p.text_pair for p in block], tokenizer=tokenizer, target=label, steps=steps,
                                max_length=max_length, progress=False)
        torch.save({"key": key, "att": att}, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)
        parts.append(att)
        log(f"  {start + len(block)}/{len(pairs)} pairs ({(time.perf_counter() - t) / len(block):.2f} s/pair)")
    first = parts[0]
    return Attributions(scores={m: torch.cat([p.scores[m] for p in parts]) for m in first.scores},
                        delta=torch.cat([p.delta for p in parts]), f_input=torch.cat([p.f_input for p in parts]),
                        f_baseline=torch.cat([p.f_baseline for p in parts]),
                        targets=[t for p in parts for t in p.targets],
                        num_tokens=torch.cat([p.num_tokens for p in parts]), settings=dict(first.settings))


def subset(att: Attributions, lo: int, hi: int) -> Attributions:
    return Attributions(scores={m: v[lo:hi] for m, v in att.scores.items()}, delta=att.delta[lo:hi],
                        f_input=att.f_input[lo:hi], f_baseline=att.f_baseline[lo:hi], targets=att.targets[lo:hi],
                        num_tokens=att.num_tokens[lo:hi], settings=att.settings)


def scheme_of(att: Attributions, ids: List[str], sizes, dataset: str, lo: int, hi: int) -> Scheme:
    scheme = Scheme.empty(sizes, {"model": str(att.settings.get("model") or "demo"), "dataset": dataset,
                                  "label": att.targets[0]})
    return scheme.add(subset(att, lo, hi), ids[lo:hi])


def write_csv(rows: List[Dict], path: Path, run: Dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_csv_meta(path, run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="output folder (default bench/results)")
    ap.add_argument("--pool", type=int, default=256, help="agreeing pairs per scheme (default 256)")
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 1.0, 5.0])
    ap.add_argument("--steps", type=int, default=4,
                    help="path intervals (default 4, trapezoid: the noise between pairs dominates; keeps the run "
                         "near 30 min on 2 busy cores)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--stop-level", type=float, default=1.0)
    ap.add_argument("--stop-overlap", type=float, default=0.95)
    ap.add_argument("--cache", default=None,
                    help="attribution cache (default ~/.cache/fastnig/bench_stability, with --quick "
                         "~/.cache/fastnig/bench_stability_quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on busy shared cores, 2 threads wait on each other)")
    ap.add_argument("--schemes", nargs="+", default=None, metavar="NAME",
                    help="only these of P_cranfield N_cranfield P_med N_med (e.g. to fill the cache in two "
                         "processes; a last run with all of them then reads the cache)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: P_cranfield and N_med, pool 32, n = 8 and 16")
    args = ap.parse_args(argv)
    if args.quick:
        args.pool, args.ns, args.schemes = 32, [8, 16], ["P_cranfield", "N_med"]
    if args.cache is None:
        args.cache = str(Path.home() / ".cache" / "fastnig" / ("bench_stability_quick" if args.quick
                                                                else "bench_stability"))
    torch.set_num_threads(args.threads)
    if max(args.ns) * 2 > args.pool:
        ap.error(f"--pool must be at least 2 × the largest n ({2 * max(args.ns)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from fastnig.training.demo_model import offline_demo_model

    model, tokenizer = offline_demo_model(progress=True)
    sizes = neuron_universe(model)
    log(f"model {model.config.name_or_path}: {sum(sizes.values())} neurons")
    rule = StopRule(level=args.stop_level, overlap=args.stop_overlap)

    rows, block_rows, stop_rows = [], [], []
    for dataset, label in SCHEMES:
        name = ("P_" if label == "relevant" else "N_") + dataset
        if args.schemes and name not in args.schemes:
            continue
        collection = load_collection(dataset)
        pool, drawn, agreeing = agreeing_pool(model, tokenizer, collection, label, args.pool, args.max_length)
        log(f"{name}: {len(pool)} pool pairs ({agreeing} of {drawn} drawn agree)")
        if len(pool) < 2 * min(args.ns):
            log(f"{name}: too few agreeing pairs, skipped")
            continue
        if len(pool) < 2 * max(args.ns):
            log(f"{name}: only {len(pool)} agreeing pairs exist: n > {len(pool) // 2} is left out")
        model_name = Path(str(model.config.name_or_path)).name
        cache = Path(args.cache) / f"{model_name}-s{args.steps}-t{args.max_length}" / name
        att = attribute_pool(model, tokenizer, pool, label, cache, args.steps, args.max_length)
        ids = [pair_id(p) for p in pool]
        n_pool = len(pool)
        whole = scheme_of(att, ids, sizes, dataset, 0, n_pool)
        for n in args.ns:
            for j in range(n_pool // (2 * n)):  # no block when 2n > pool
                lo = j * 2 * n
                small = scheme_of(att, ids, sizes, dataset, lo, lo + n)
                double = scheme_of(att, ids, sizes, dataset, lo, lo + 2 * n)
                est2 = stability_estimates(small, args.levels, factor=2.0)
                estp = stability_estimates(small, args.levels, factor=n_pool / n)
                for level in args.levels:
                    k = top_count(level, small.total_neurons)
                    block_rows.append({
                        "scheme": name, "level_percent": level, "n": n, "block": j, "k": k,
                        "half_sizes": "/".join(map(str, small.half_counts())),
                        "estimate_2n": est2[level],
                        "true_2n": top_overlap(small.mean_vector().numpy(), double.mean_vector().numpy(), k),
                        "estimate_pool": estp[level],
                        "true_pool": top_overlap(small.mean_vector().numpy(), whole.mean_vector().numpy(), k)})
        # early stopping on the pool's prefix
        stop_n, checks, estimates = n_pool, [], []
        for end in rule.round_ends(n_pool)[:-1]:
            holds, estimate = rule.check(scheme_of(att, ids, sizes, dataset, 0, end), estimates)
            estimates.append(estimate)
            checks.append(f"{end}:{estimate:.3f}")
            if holds:
                stop_n = end
                break
        stopped = scheme_of(att, ids, sizes, dataset, 0, stop_n)
        k = top_count(rule.level, stopped.total_neurons)
        stop_rows.append({"scheme": name, "pool": n_pool,
                          "rule": f"level {rule.level:g} %, overlap {rule.overlap:g}, confirm {rule.confirm}",
                          "stopped_at": stop_n, "stopped_before_pool": stop_n < n_pool,
                          "true_overlap_with_pool": top_overlap(stopped.mean_vector().numpy(),
                                                                whole.mean_vector().numpy(), k),
                          "saved_vs_pool": 1 - stop_n / n_pool, "checks": " ".join(checks)})
        log(f"{name}: rule stops at {stop_n} ({' '.join(checks)})")

    # means over blocks
    order = [("P_" if label == "relevant" else "N_") + dataset for dataset, label in SCHEMES]
    keys = sorted({(r["scheme"], r["level_percent"], r["n"]) for r in block_rows},
                  key=lambda t: (order.index(t[0]), t[1], t[2]))
    for key in keys:
        group = [r for r in block_rows if (r["scheme"], r["level_percent"], r["n"]) == key]
        mean = {c: float(np.mean([r[c] for r in group])) for c in ("estimate_2n", "true_2n", "estimate_pool",
                                                                   "true_pool")}
        rows.append({"scheme": key[0], "level_percent": key[1], "n": key[2], "blocks": len(group), **mean,
                     "abs_err_2n": float(np.mean([abs(r["estimate_2n"] - r["true_2n"]) for r in group])),
                     "abs_err_pool": float(np.mean([abs(r["estimate_pool"] - r["true_pool"]) for r in group]))})
    run = run_metadata()
    write_csv(rows, out / "stability.csv", run)
    write_csv(block_rows, out / "stability_blocks.csv", run)
    write_csv(stop_rows, out / "stability_stopping.csv", run)
    mae = {}
    for level in args.levels:
        group = [r for r in block_rows if r["level_percent"] == level]
        mae[level] = {t: float(np.mean([abs(r[f"estimate_{t}"] - r[f"true_{t}"]) for r in group]))
                      for t in ("2n", "pool")}
        mae[level]["bias_2n"] = float(np.mean([r["estimate_2n"] - r["true_2n"] for r in group]))
        mae[level]["bias_pool"] = float(np.mean([r["estimate_pool"] - r["true_pool"] for r in group]))
    elapsed = time.perf_counter() - started
    write_markdown(out / "stability.md", rows, stop_rows, mae, args, elapsed, str(model.config.name_or_path), run)
    plot(out / "stability.png", rows, block_rows, args.levels)
    write_json(out / "stability.json", {"mae": mae, "seconds": elapsed, "args": vars(args)}, run)
    log(f"done in {elapsed / 60:.1f} min -> {out}/stability.md")
    return 0


def write_markdown(path: Path, rows, stop_rows, mae, args, elapsed: float, model: str, run: Dict) -> None:
    lines = [f"Demo model `{Path(model).name}`, {args.pool} agreeing pairs per scheme (seed-0 draw; non-relevant "
             f"= random unjudged documents), {args.steps} steps, {args.max_length} tokens; {elapsed / 60:.1f} min.",
             "",
             "Estimate vs true overlap of the top-X % set of n pairs with that of 2n pairs (est 2n / true 2n) "
             "and with that of the whole pool (est pool / true pool); means over the disjoint blocks of n "
             "pairs [j·2n, j·2n + n) of the pool (blocks).", "",
             "| scheme | X % | n | blocks | est 2n | true 2n | est pool | true pool |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['level_percent']:g} | {r['n']} | {r['blocks']} | {r['estimate_2n']:.3f} | "
                     f"{r['true_2n']:.3f} | {r['estimate_pool']:.3f} | {r['true_pool']:.3f} |")
    lines += ["", "Mean absolute error (and mean signed error, + = optimistic) over every block:", "",
              "| X % | MAE vs 2n | bias vs 2n | MAE vs pool | bias vs pool |", "|---|---|---|---|---|"]
    for level, m in mae.items():
        lines.append(f"| {level:g} | {m['2n']:.3f} | {m['bias_2n']:+.3f} | {m['pool']:.3f} | {m['bias_pool']:+.3f} |")
    lines += ["", f"Early stopping (level {args.stop_level:g} %, overlap {args.stop_overlap:g}, rounds 16, 32, 64, … "
              f"pairs of the pool; estimate at each round end):", "",
              "| scheme | stopped at | true overlap with the pool's set | saved vs the pool | estimates |",
              "|---|---|---|---|---|"]
    for r in stop_rows:
        lines.append(f"| {r['scheme']} | {r['stopped_at']} of {r['pool']} | {r['true_overlap_with_pool']:.3f} | "
                     f"{100 * r['saved_vs_pool']:.0f} % | {r['checks']} |")
    lines += ["", run_markdown(run)]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows, block_rows, levels) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * (len(levels) + 1), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    colors = {"P_cranfield": "tab:red", "N_cranfield": "tab:purple", "P_med": "tab:orange", "N_med": "tab:blue"}
    values = [r[c] for r in rows for c in ("true_2n", "estimate_2n", "true_pool")]
    low = max(0.0, math.floor((min(values) - 0.03) * 20) / 20)
    for i, level in enumerate(levels):
        ax = fig.add_subplot(1, len(levels) + 1, i + 1)
        for name, color in colors.items():
            sel = [r for r in rows if r["scheme"] == name and r["level_percent"] == level]
            if not sel:
                continue
            ns = [r["n"] for r in sel]
            ax.plot(ns, [r["true_2n"] for r in sel], "-o", color=color, label=f"{name} true (2n)", ms=3)
            ax.plot(ns, [r["estimate_2n"] for r in sel], "--x", color=color, label=f"{name} estimate (2n)", ms=4)
            ax.plot(ns, [r["true_pool"] for r in sel], ":", color=color, alpha=0.6)
        ax.set_xscale("log", base=2)
        ns = sorted({r["n"] for r in rows})
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.minorticks_off()
        ax.set_ylim(low, 1.005)
        ax.set_title(f"top {level:g} %")
        ax.set_xlabel("pairs n")
        if i == 0:
            ax.set_ylabel("overlap of the top set at n with that at 2n")
        ax.grid(alpha=0.3)
    fig.axes[-1].legend(fontsize=6, loc="lower right")
    ax = fig.add_subplot(1, len(levels) + 1, len(levels) + 1)
    markers = dict(zip(levels, "o^s"))
    for r in block_rows:
        ax.scatter(r["true_2n"], r["estimate_2n"], s=10, color=colors.get(r["scheme"], "k"),
                   marker=markers.get(r["level_percent"], "o"), alpha=0.6)
    lo = min([low] + [r["true_2n"] for r in block_rows] + [r["estimate_2n"] for r in block_rows])
    ax.plot([lo, 1], [lo, 1], "k-", lw=0.8)
    ax.set_xlabel("true overlap, n vs 2n (one block)")
    ax.set_ylabel("estimate")
    ax.set_title("every block (o 0.1 %, ^ 1 %, s 5 %)")
    ax.grid(alpha=0.3)
    fig.suptitle("split-half estimate (dashed) vs true overlap (solid: n vs 2n; dotted: n vs the whole pool)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


if __name__ == "__main__":
    sys.exit(main())
