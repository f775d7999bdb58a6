"""The adaptive random baseline against the fixed 50 repetitions, on the demo model (not a test).

For each validation dataset (the 34 held-out Cranfield queries of the demo,
and 10 MEDLINE queries; 10 BM25 candidates + the relevant ones per query)
and each row of the demo's Table 4 (P_cran, N_cran, F_A at ``--levels``),
the random baseline is drawn with the paper's fixed 50 repetitions, then
with the adaptive rule (``repetitions: {max: 50, stop_when: {}}``, the
defaults of :data:`DEFAULT_STOP`) from the same store:
a stopped row is the first n of the fixed run (tests/test_pruning_adaptive.py),
so the adaptive row costs nothing more here and its n is what an adaptive
run would draw.  Per row: n, why it stopped, the random mean drop (adaptive
vs fixed), the difference in nDCG points against the row's stated precision
(its interval half-width at the stop), and the verdict "the set hurts more
than random" both ways.  Also: the work saved (random rerankings drawn vs
50 per row), and the prefix-reuse work of the demo's sets at the paper's
levels (0.01, 0.1, 1 %: the share of layers a pruned forward runs), which
``fastnig run --plan`` uses.

    python bench/pruning/adaptive_validation.py --run runs/demo --out bench/results  # hours on a loaded 2-core box
    python bench/pruning/adaptive_validation.py --run runs/demo --quick --out /tmp/fastnig-bench

Writes ``adaptive_validation.json`` and ``adaptive_validation.md`` (with the run's metadata), the JSON
after every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fastnig.evaluation.prefix_cache import PrefixCache
from fastnig.evaluation.pruning import PruningBenchmark, module_counts
from fastnig.evaluation.random_baseline import RepetitionRule
from fastnig.evaluation.reranking import build_candidates
from fastnig.neurons.expressions import evaluate
from fastnig.neurons.scheme import Scheme
from fastnig.study.config import load_config
from fastnig.study.plan import plan_config
from fastnig.training.demo_model import offline_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import run_markdown, write_json  # noqa: E402

DATASETS = {"cran": ("cranfield@heldout", 34), "med": ("med", 10)}
PAPER_LEVELS = (0.01, 0.1, 1.0)


def load_schemes(run: Path):
    out = {}
    for name in ("cran", "med"):
        for label, prefix in (("relevant", "P"), ("non-relevant", "N")):
            out[(name, label)] = Scheme.load(run / "schemes" / f"{prefix}_{name}")
    return out


def adaptive_stop(rule: RepetitionRule, points: np.ndarray, set_points: float):
    """``(n, reason)`` of the adaptive rule on the first repetitions ``points`` (nDCG points), or
    ``(None, None)`` when it would draw more than ``points`` holds."""
    for end in rule.checkpoints():
        if end > points.size:
            return None, None
        reason = rule.stop_reason(points[:end], set_points)
        if reason is not None:
            return end, reason
    return None, None


def verdict(rule: RepetitionRule, points: np.ndarray, set_points: float) -> str:
    """The set against its random sets, from these repetitions: ``"more"`` / ``"less"`` (the set's pruned nDCG below /
    above the random interval by the margin: it hurts more / less than random), ``"as random"`` (the interval within
    the margin of the set) or ``"undecided"``."""
    h, gap = rule.half_width_of(points), set_points - float(points.mean())
    if abs(gap) >= h + rule.margin:
        return "more" if gap < 0 else "less"
    return "as random" if abs(gap) + h <= rule.margin else "undecided"


def summary_row(rule: RepetitionRule, row: dict) -> dict:
    """``row`` (its ``random_points`` [reference] and ``set_points``, nDCG points) with the adaptive stop and the
    comparison with the reference (all its repetitions) added."""
    points, set_points = np.asarray(row["random_points"], dtype=np.float64), float(row["set_points"])
    ndcg0 = float(row["set_points"]) / (1.0 - row["drop"] / 100.0) if row["drop"] != 100 else float("nan")
    n, reason = adaptive_stop(rule, points, set_points)
    out = {k: v for k, v in row.items() if not k.startswith(("random_drop_adaptive", "mean_points_diff",
                                                             "half_width_points", "within_precision",
                                                             "hurts_more_adaptive", "same_verdict", "verdict"))}
    out.update({"reference_repetitions": int(points.size), "n": n, "stopped": reason,
                "half_width_points_reference": rule.half_width_of(points),
                "hurts_more_reference": bool(set_points < points.mean()),
                "verdict_reference": verdict(rule, points, set_points)})
    if n is not None:
        head = points[:n]
        h, diff = rule.half_width_of(head), abs(head.mean() - points.mean())
        out.update({"random_drop_adaptive": float(100.0 * (1.0 - head.mean() / ndcg0)), "mean_points_diff": float(diff),
                    "half_width_points": h, "within_precision": bool(diff <= h),
                    "hurts_more_adaptive": bool(set_points < head.mean()),
                    "verdict_adaptive": verdict(rule, head, set_points)})
        # Table 4's verdict: the set's drop above the random mean drop (its nDCG below the random mean); and the
        # rule's own decision (more / less / as random / undecided, by the margin).
        out["same_verdict"] = out["hurts_more_adaptive"] == out["hurts_more_reference"]
        out["same_decision"] = out["verdict_adaptive"] == out["verdict_reference"]
    return out


def summarize(rule: RepetitionRule, rows: list) -> dict:
    """The rows' totals: stops within the reference, mean n (rows not stopped counted at the rule's max), precision
    and verdicts."""
    stopped = [r for r in rows if r["n"] is not None]
    ns = [r["n"] if r["n"] is not None else rule.max for r in rows]
    return {"rows": len(rows), "rows_stopped_within_reference": len(stopped),
            "mean_n_of_stopped": float(np.mean([r["n"] for r in stopped])) if stopped else None,
            "mean_n_counting_unstopped_at_max": float(np.mean(ns)),
            "reasons": {k: sum(r["stopped"] == k for r in stopped) for k in ("precise", "decided", "equivalent",
                                                                              "max")},
            "all_within_precision": all(r["within_precision"] for r in stopped),
            "all_same_verdict": all(r["same_verdict"] for r in stopped),
            "same_decision": sum(r["same_decision"] for r in stopped)}


def measured_rows(rows_state) -> list:
    """Raw rows (no rule applied) from the benchmarks' results: per-row random points and the set's points."""
    rows = []
    for (dname, expr, level), (result, fixed) in rows_state.items():
        rows.append({"dataset": dname, "set": expr, "level": level, "drop": result.drop_percent,
                     "significant": result.significant, "p_value": result.p_value,
                     "random_drop_reference": fixed.mean_drop, "random_std_reference": fixed.std_drop,
                     "set_points": float(100.0 * result.comparison.ndcg_pruned),
                     "random_points": [float(x) for x in 100.0 * fixed.ndcg_pruned]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished demo run folder (its schemes/ are used)")
    parser.add_argument("--levels", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--max", type=int, default=50, help="the fixed run's repetitions (the paper: 50)")
    parser.add_argument("--dtype", default="auto", help="reranking dtype (float32, bfloat16, auto)")
    parser.add_argument("--quick", action="store_true", help="smoke run: max 6, one level, Cranfield only")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--from-json", metavar="PATH",
                        help="recompute the rule's stops and the comparison from a saved adaptive_validation.json "
                             "(its rows keep every repetition's points): no model, no reranking")
    args = parser.parse_args()
    if args.from_json:
        return resummarize(Path(args.from_json), Path(args.out))
    cfg = load_config("demo")
    pru = cfg.pruning
    model, tok = offline_demo_model(cfg.cache_dir / "models")
    schemes = load_schemes(Path(args.run))
    maximum = 6 if args.quick else args.max
    levels = args.levels[:1] if args.quick else args.levels
    rule = RepetitionRule.parse({"max": maximum, "stop_when": {"min": 5 if maximum >= 5 else 2}})
    datasets = {"cran": DATASETS["cran"]} if args.quick else DATASETS
    sets = {(e, lv): evaluate(e, schemes, lv, in_domain=["cran"], by=pru["by"], name=e)
            for e in pru["sets"] for lv in levels}
    out = Path(args.out)
    report = {"rule": rule.as_dict(), "fixed_repetitions": maximum, "dtype": args.dtype, "datasets": {}}
    from fastnig.data import load_collection

    # Prefix reuse at the paper's levels, on the demo's sets: the share of the layers a pruned forward runs.
    probe = PrefixCache(model)
    layers = len(probe.layers)
    work = []
    for expr in pru["sets"]:
        for level in PAPER_LEVELS:
            nset = evaluate(expr, schemes, level, in_domain=["cran"], by=pru["by"], name=expr)
            start = probe.lowest_layer(list(module_counts(nset)))
            work.append({"set": expr, "level": level, "lowest_layer": start, "layers": layers,
                         "layer_work": (layers - min(start, layers - 1)) / layers})
    report["prefix_at_paper_levels"] = {"rows": work, "mean_layer_work": float(np.mean([w["layer_work"]
                                                                                         for w in work]))}
    benches, rows_state = {}, {}
    for dname, (spec, queries) in datasets.items():
        candidates = build_candidates(load_collection(spec), num_queries=queries, seed=pru["seed"],
                                      depth=pru["depth"], cache_dir=cfg.cache_dir / "bm25", progress=False)
        bench = PruningBenchmark(model, tok, candidates, pru["batch_size"], pru["max_length"], progress=False,
                                 dtype=args.dtype)
        bench.prepare(list(sets.values()), maximum)
        benches[dname] = bench
        report["datasets"][dname] = {"spec": spec, "queries": len(candidates.queries), "pairs": candidates.num_pairs}
        for (expr, level), nset in sets.items():
            rows_state[(dname, expr, level)] = [bench.evaluate(nset), None]
    started = time.perf_counter()
    # Repetitions in blocks of 5 over every row, so that a run cut short still compares every row with the
    # same reference (its first R repetitions).
    for reference in list(range(5, maximum, 5)) + [maximum]:
        for (dname, expr, level), state in rows_state.items():
            state[1] = benches[dname].random_baseline(sets[(expr, level)], reference, pru["seed"])
        rows = [summary_row(rule, r) for r in measured_rows(rows_state)]
        report.update({"reference_repetitions": reference, "seconds": time.perf_counter() - started, "rows": rows,
                       "summary": {**summarize(rule, rows),
                                   "forwards": {d: b.forwards for d, b in benches.items()}}})
        write_json(out / "adaptive_validation.json", report)
        write_markdown(out, report)
        print(f"reference {reference}: {report['summary']}", flush=True)
    paper = plan_config("paper")
    report["paper_plan"] = {"total_flops": paper.total_flops, "fixed_total_flops": paper.fixed_total_flops,
                            "fixed_pruning_flops": paper.fixed_pruning_flops}
    write_json(out / "adaptive_validation.json", report)
    write_markdown(out, report)


def resummarize(source: Path, out: Path) -> None:
    """Apply the current default rule (``max``: the saved run's fixed repetitions) to its raw rows (the repetitions
    drawn so far); write the results."""
    import json

    report = json.loads(source.read_text())
    maximum = report["fixed_repetitions"]
    rule = RepetitionRule.parse({"max": maximum, "stop_when": {"min": 5 if maximum >= 5 else 2}})
    rows = [summary_row(rule, r) for r in report["rows"]]
    forwards = report.get("summary", {}).get("forwards")
    report.update({"rule": rule.as_dict(), "rows": rows, "summary": {**summarize(rule, rows), "forwards": forwards},
                   "resummarized_from": str(source)})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "adaptive_validation.json", report, run=report.get("run"))
    write_markdown(out, report)
    print(json.dumps(report["summary"], indent=1))


def write_markdown(out: Path, report):
    rows, s = report["rows"], report["summary"]
    lines = ["# Adaptive random baseline vs fixed repetitions (demo model)", "",
             f"Rule {report['rule']}; reference: the first {report['reference_repetitions']} of the fixed "
             f"{report['fixed_repetitions']} repetitions; dtype {report['dtype']}; datasets "
             + ", ".join(f"{k} ({v['queries']} queries, {v['pairs']} pairs)" for k, v in report["datasets"].items())
             + ".", "",
             "| dataset | set | level | drop % | p | n | stopped | random drop (reference) | (adaptive) | "
             "diff (points) | half-width (points) | Table 4 verdict same | decision (reference) | (adaptive) |",
             "|" + "---|" * 14]
    for r in rows:
        adaptive = (f"{r['random_drop_adaptive']:.2f} | {r['mean_points_diff']:.3f} | {r['half_width_points']:.3f} | "
                    f"{r['same_verdict']} | {r['verdict_reference']} | {r['verdict_adaptive']}") if r["n"] is not None \
            else f"– | – | – | – | {r['verdict_reference']} | –"
        lines.append(f"| {r['dataset']} | {r['set']} | {r['level']:g} | {r['drop']:.2f} | {r['p_value']:.3g} | "
                     f"{r['n'] if r['n'] is not None else '> ' + str(r['reference_repetitions'])} | "
                     f"{r['stopped'] or '–'} | {r['random_drop_reference']:.2f} | {adaptive} |")
    lines += ["", f"Rows stopped within the reference: {s['rows_stopped_within_reference']} of {s['rows']} "
              f"({s['reasons']}), mean n of those {s['mean_n_of_stopped']}, mean n with the others counted at the "
              f"maximum {s['mean_n_counting_unstopped_at_max']:.2f}; every adaptive mean within its stated half-width "
              f"of the reference mean: {s['all_within_precision']}; Table 4's verdict (set vs random mean) the same "
              f"in every row: {s['all_same_verdict']}; the rule's decision the same in {s['same_decision']} rows.",
              f"Prefix reuse at the paper's levels (demo sets): pruned forwards run "
              f"{report['prefix_at_paper_levels']['mean_layer_work']:.1%} of the layers on average."]
    run = run_markdown(report["run"]) if report.get("run") else run_markdown()
    (out / "adaptive_validation.md").write_text("\n".join(lines) + "\n\n" + run + "\n")


if __name__ == "__main__":
    main()
