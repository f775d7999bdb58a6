"""How many path steps does NIG need?  Accuracy against the number of steps, per rule and node set.

On the offline demo cross-encoder (MiniLM-L6 fine-tuned on Cranfield's
training queries, :func:`fastnig.models.offline_demo_model`) and relevant
pairs of held-out Cranfield queries (optionally some NFCorpus pairs), for the
rules ``left`` / ``trapezoid`` and the nodes ``uniform`` / ``chebyshev``, at
N = 4, 8, ..., 128 path intervals, it measures

* the median (and 90th percentile) over pairs of |delta| / |F(x) - F(x')|;
* the overlap of the top 0.1 % and 1 % neuron sets (neurons ranked by mean
  NIG over the pairs, as :meth:`fastnig.schemes.Scheme.top` does) with those
  of a 512-step reference (trapezoid, uniform);

and simulates ``steps="auto"`` (per pair: N = 16, 32, ... until
|delta| <= tolerance · max(|F(x) - F(x')|, 0.01)) for several tolerances.

Cost: every node set is nested (uniform and Chebyshev-Lobatto nodes of N
are the nodes of 2N taken every other one), so each pair is evaluated once on
the 513 uniform points of the reference and once on the 129 Chebyshev points
of N = 128; every coarser N and both rules are accumulated from the same
forward + backward passes by the engine's own fused op
(:func:`fastnig.kernels.accumulate_conductance`), with one carry per (N,
rule).  The results equal separate ``fastnig.attribute(steps=N, rule=...,
nodes=...)`` calls (same node positions, same op, same order of summation);
the script checks that on its first pair and writes the difference.

    python bench/steps_accuracy.py --out bench/results           # ~15-20 min on 2 CPU cores
    python bench/steps_accuracy.py --out /tmp/quick --quick      # ~2 min: 3 pairs, N <= 32, reference 128

Outputs in ``--out``: ``steps_accuracy.csv`` (one row per rule x nodes x N),
``steps_accuracy_auto.csv`` (the steps="auto" simulation),
``steps_accuracy.png`` (the figure), ``steps_accuracy.md`` (tables and the
conclusions, written from the numbers) and ``steps_accuracy.json`` (settings,
per-pair values, timings).

Data: Cranfield through ir_datasets, from the ``cran.tar.gz`` packaged with
fastnig (placed in ``IR_DATASETS_HOME`` when it is not there); the optional
NFCorpus pairs read its TREC-style files from ``--data`` / ``$FASTNIG_DATA``
(``nfcorpus/test.docs``, ...).  Caches (model, BM25 index,
ir_datasets) go to ``--cache-dir`` (default ``$FASTNIG_CACHE`` or
``~/.cache/fastnig``), never into the repository.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = ("left", "trapezoid")
NODES = ("uniform", "chebyshev")
PERCENTS = (0.1, 1.0)
AUTO_TOLERANCES = (0.1, 0.05, 0.02, 0.01, 0.005)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output folder (default bench/results)")
    p.add_argument("--quick", action="store_true", help="3 pairs, N = 4..32, reference N = 128 (a smoke run)")
    p.add_argument("--pairs", type=int, default=16, help="relevant pairs of held-out Cranfield queries")
    p.add_argument("--nfcorpus-pairs", type=int, default=0, help="relevant NFCorpus pairs to add (out of domain)")
    p.add_argument("--steps", default="4,8,16,32,64,128", help="N values compared (powers of 2)")
    p.add_argument("--reference", type=int, default=512, help="N of the trapezoid/uniform reference (power of 2)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--step-batch", type=int, default=64, help="path points per forward (bounds memory)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="models, BM25 index, ir_datasets (default ~/.cache/fastnig)")
    p.add_argument("--data", default=None, help="folder holding nfcorpus/ for --nfcorpus-pairs "
                                               "(default $FASTNIG_DATA)")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only rewrite the figure, tables and conclusions from a steps_accuracy.json")
    p.add_argument("--no-agreement-filter", action="store_true",
                   help="keep pairs the model does not score relevant (P(rel) <= 0.5)")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.nfcorpus_pairs, args.steps, args.reference = 3, 0, "4,8,16,32", 128
    args.steps = sorted({int(s) for s in str(args.steps).split(",") if s.strip()})
    for n in args.steps + [args.reference]:
        if n < 1 or n & (n - 1):
            p.error(f"steps and --reference must be powers of 2 (nested node sets), got {n}")
    if max(args.steps) > args.reference:
        p.error("--reference must be at least the largest N compared")
    return args


# ---------------------------------------------------------------- set-up
def data_dir(arg) -> Path:
    """The folder holding ``nfcorpus/`` (only --nfcorpus-pairs reads it): --data, else $FASTNIG_DATA."""
    found = arg or os.environ.get("FASTNIG_DATA")
    return Path(found) if found else Path("FASTNIG_DATA-not-set")


def prepare_ir_datasets(cache: Path) -> None:
    """Point ir_datasets at a home under the cache (before ir_datasets is imported); fastnig places the
    packaged cran.tar.gz there on first use."""
    home = Path(os.environ.get("IR_DATASETS_HOME") or cache / "ir_datasets").expanduser()
    os.environ["IR_DATASETS_HOME"] = str(home)


def select_pairs(model, tokenizer, collection, query_ids, num, seed, max_length, agree, what):
    """``num`` relevant pairs of these queries (at most 2 per query), agreeing with the model if asked."""
    from fastnig.data import filter_agreeing, sample_pairs

    keep = set(query_ids)
    import warnings

    with warnings.catch_warnings():  # "only N pairs available": we ask for all of them on purpose
        warnings.simplefilter("ignore")
        pool = [p for p in sample_pairs(collection, label=1, num_pairs=100000, seed=seed, max_per_query=2)
                if p.query_id in keep]
    chosen = []
    for start in range(0, len(pool), 2 * num):
        block = pool[start:start + 2 * num]
        if agree:
            block, _ = filter_agreeing(model, tokenizer, block, max_length=max_length, progress=False)
        chosen += block
        if len(chosen) >= num:
            break
    if len(chosen) < num:
        print(f"[steps_accuracy] {what}: only {len(chosen)} pairs available", file=sys.stderr)
    return chosen[:num]


# ---------------------------------------------------------- multi-level NIG
def nested_nig(model, tokenizer, pair, family, n_max, levels, step_batch, max_length):
    """NIG of every Linear neuron, and the input-side delta terms, at every N in ``levels``, both rules.

    One pass over the ``n_max + 1`` nodes of ``family``; level N uses every
    ``n_max / N``-th node, accumulated by the engine's fused op with its own
    carry, exactly as ``fastnig.attribute(steps=N, nodes=family)`` does.

    Returns ``{(N, rule): {"scores": {module: [out] float32}, "input": float64}}``,
    ``f_input``, ``f_baseline``, ``num_tokens``.
    """
    import torch

    from fastnig.attribution import baseline_embeddings, encode_pairs, path_nodes
    from fastnig.cross_encoder import frozen_eval as _frozen_eval, input_embeddings as _input_embeddings
    from fastnig.cross_encoder import linear_modules, target_function
    from fastnig.kernels import Carry, accumulate_conductance

    modules = linear_modules(model)
    embeddings = _input_embeddings(model)
    accepts_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    enc = encode_pairs(tokenizer, [pair], max_length, "pad", accepts_types)
    alphas = path_nodes(n_max, family)
    for n in levels:  # the nested nodes are exactly those fastnig.attribute uses at N
        assert torch.equal(alphas[::n_max // n], path_nodes(n, family)), (family, n)
    lengths = enc.lengths
    mask = enc.attention_mask
    types = enc.token_type_ids
    keys = [(n, r) for n in levels for r in RULES]
    out = {k: {name: torch.zeros(1, m.out_features, dtype=torch.float32) for name, m in modules.items()}
           for k in keys}
    carries = {k: {} for k in keys}
    input_out = {k: torch.zeros(1, embeddings.weight.shape[1], dtype=torch.float64) for k in keys}
    input_carry = {k: None for k in keys}
    f_values = []

    def accumulate(name, a4, g4, start, target, carry_store):
        for n in levels:
            stride = n_max // n
            idx = [i for i in range(a4.shape[1]) if (start + i) % stride == 0]
            if not idx:
                continue
            index = torch.tensor(idx)
            a_sub, g_sub = a4.index_select(1, index), g4.index_select(1, index)
            for rule in RULES:
                key = (n, rule)
                carry = carry_store[key].get(name) if name is not None else input_carry[key]
                if carry is None:
                    carry = Carry.like(a_sub)
                    if name is None:
                        input_carry[key] = carry
                    else:
                        carry_store[key][name] = carry
                accumulate_conductance(a_sub, g_sub, lengths, target[key] if name is None else target[key][name],
                                       carry, rule)

    with _frozen_eval(model), torch.no_grad():
        x_in, x_base = baseline_embeddings(embeddings, enc, "pad", tokenizer.pad_token_id)
        x_in, x_base = x_in.float(), x_base.float()
        direction = x_in - x_base
    relevant = torch.tensor([True])
    with _frozen_eval(model):
        for start in range(0, n_max + 1, step_batch):
            stop = min(start + step_batch, n_max + 1)
            S = stop - start
            alpha = alphas[start:stop].to(torch.float32)
            path = (x_base.unsqueeze(1) + alpha.view(1, S, 1, 1) * direction.unsqueeze(1)).flatten(0, 1)
            path.requires_grad_(True)
            acts = {}

            def on_forward(mod, inp, o, name):
                acts[name] = o
                o.register_hook(lambda g, name=name: accumulate(
                    name, acts.pop(name).detach().unflatten(0, (1, S)), g.unflatten(0, (1, S)), start, out, carries))

            handles = [m.register_forward_hook(lambda mod, inp, o, name=name: on_forward(mod, inp, o, name))
                       for name, m in modules.items()]
            try:
                kwargs = {"inputs_embeds": path, "attention_mask": mask.repeat_interleave(S, dim=0)}
                if types is not None:
                    kwargs["token_type_ids"] = types.repeat_interleave(S, dim=0)
                f = target_function(model(**kwargs).logits, relevant.repeat_interleave(S), "probability")
                torch.autograd.backward(f.sum(), inputs=[path])
            finally:
                for h in handles:
                    h.remove()
            assert not acts, f"no gradient reached {sorted(acts)[:3]}"
            f_values.append(f.detach().double())
            accumulate(None, path.detach().unflatten(0, (1, S)), path.grad.unflatten(0, (1, S)), start, input_out,
                       None)
    f_all = torch.cat(f_values)
    result = {k: {"scores": {name: v[0] for name, v in out[k].items()}, "input": float(input_out[k].sum())}
              for k in keys}
    return result, float(f_all[-1]), float(f_all[0]), int(lengths[0])


def engine_check(model, tokenizer, pair, nested, family, n, max_length):
    """Max |difference| between the nested accumulation and fastnig.attribute at N = n, relative to max |NIG|."""
    import torch

    import fastnig

    worst = 0.0
    for rule in RULES:
        att = fastnig.attribute(model, [pair], tokenizer=tokenizer, steps=n, rule=rule, nodes=family,
                                max_length=max_length, progress=False)
        ours = nested[(n, rule)]["scores"]
        scale = max(float(v.abs().max()) for v in att.scores.values())
        diff = max(float((att.scores[m][0] - ours[m]).abs().max()) for m in ours)
        worst = max(worst, diff / scale)
    return worst


# ------------------------------------------------------------- statistics
def top_sets(mean_by_module, sizes, percents):
    """Top-X % neuron sets of a mean-NIG vector, through fastnig's own Scheme ranking."""
    import torch

    from fastnig.attribution import Attributions
    from fastnig.schemes import Scheme

    scores = {m: v.unsqueeze(0).float() for m, v in mean_by_module.items()}
    att = Attributions(scores, torch.zeros(1), torch.ones(1), torch.zeros(1), ["relevant"], torch.ones(1, dtype=torch.long),
                       {"model": "demo", "target": "relevant"})
    scheme = Scheme.from_attributions(att, ["mean"], "study", sizes=sizes)
    return {p: scheme.top(p) for p in percents}


def mean_scores(per_pair, pick):
    """Mean over pairs of the per-module NIG vectors; ``pick(i)`` -> that pair's scores dict."""
    first = pick(0)
    total = {m: v.double().clone() for m, v in first.items()}
    for i in range(1, len(per_pair)):
        for m, v in pick(i).items():
            total[m] += v.double()
    return {m: v / len(per_pair) for m, v in total.items()}


def steps_to_reach(rows, rule, nodes, column, target):
    """Smallest N whose value reaches ``target`` and stays there for every larger N."""
    mine = sorted((r for r in rows if r["rule"] == rule and r["nodes"] == nodes), key=lambda r: r["steps"])
    best = None
    for r in reversed(mine):
        if r[column] >= target:
            best = r["steps"]
        else:
            break
    return best


# ------------------------------------------------------------------ output
def _write_csv(path, rows, cols):
    """``rows`` (dicts) as CSV with columns ``cols``; floats to 6 significant digits."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})


def write_outputs(out, args, rows, auto_rows, per_pair_info, timings, check, model_info, reference_n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "steps_accuracy.csv", rows,
               ["rule", "nodes", "steps", "points", "median_rel_delta", "p90_rel_delta", "max_rel_delta",
                "overlap_top0.1", "overlap_top1"])
    _write_csv(out / "steps_accuracy_auto.csv", auto_rows,
               ["rule", "nodes", "tolerance", "max_steps", "mean_steps", "max_steps_used", "median_rel_delta",
                "overlap_top0.1", "overlap_top1"])

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {("left", "uniform"): ("tab:blue", "-o"), ("left", "chebyshev"): ("tab:blue", "--s"),
              ("trapezoid", "uniform"): ("tab:red", "-o"), ("trapezoid", "chebyshev"): ("tab:red", "--s")}
    for (rule, nodes), (color, style) in styles.items():
        mine = [r for r in rows if r["rule"] == rule and r["nodes"] == nodes and r["steps"] < reference_n]
        xs = [r["steps"] for r in mine]
        label = f"{rule}, {nodes}"
        axes[0].loglog(xs, [max(r["median_rel_delta"], 1e-9) for r in mine], style, color=color, label=label)
        axes[1].semilogx(xs, [r["overlap_top0.1"] for r in mine], style, color=color, label=label)
        axes[2].semilogx(xs, [r["overlap_top1"] for r in mine], style, color=color, label=label)
    axes[0].set_title("median |delta| / |F(x) - F(x')|")
    axes[1].set_title(f"top 0.1 % overlap with N={reference_n} trapezoid (%)")
    axes[2].set_title(f"top 1 % overlap with N={reference_n} trapezoid (%)")
    for ax in axes:
        ax.set_xlabel("steps N (N + 1 path points)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1:]:
        ax.axhline(99, color="gray", lw=0.8, ls=":")
        ax.set_ylim(min(50, ax.get_ylim()[0]), 101)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"NIG accuracy vs steps — {model_info['name']}, {len(per_pair_info)} pairs, "
                 f"max_length {args.max_length}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "steps_accuracy.png", dpi=120)
    plt.close(fig)

    (out / "steps_accuracy.json").write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items()}, "model": model_info, "pairs": per_pair_info,
        "timings_s": timings, "engine_check_max_rel_diff": check, "rows": rows, "auto": auto_rows,
    }, indent=1))
    (out / "steps_accuracy.md").write_text(markdown(args, rows, auto_rows, per_pair_info, timings, check,
                                                    model_info, reference_n))


def _pct(v):
    return "—" if v is None else f"{v:.1f}"


def markdown(args, rows, auto_rows, pairs, timings, check, model_info, reference_n):
    lines = [
        "# NIG accuracy against the number of path steps",
        "",
        f"Produced by `python bench/steps_accuracy.py --out {args.out}{' --quick' if args.quick else ''}` "
        f"({timings['total']:.0f} s on this machine, {args.threads} torch threads"
        + (f"; 1-min load average {timings['load_start']:.1f} at the start, {timings['load_end']:.1f} at the end: "
           "the 2 cores were shared with other jobs" if "load_start" in timings else "") + ").",
        "",
        f"- Model: {model_info['name']} (fine-tuned on {model_info['train_queries']} Cranfield training "
        f"queries; held-out nDCG@10 {model_info.get('ndcg', '—')}).",
        f"- Pairs: {len(pairs)} relevant pairs "
        f"({', '.join(f'{n} {d}' for d, n in _count(pairs).items())}), held-out queries, "
        f"{'all' if args.no_agreement_filter else 'model agrees (P(rel) > 0.5)'}; target relevant, F = P(rel), "
        f"baseline pad, max_length {args.max_length}; median tokens "
        f"{statistics.median(p['num_tokens'] for p in pairs):.0f}; median F(x) - F(x') "
        f"{statistics.median(p['f_input'] - p['f_baseline'] for p in pairs):.3f}.",
        f"- Reference: trapezoid, uniform, N = {reference_n}. Neurons: {model_info['neurons']} "
        f"(top 0.1 % = {model_info['top0.1']} neurons, top 1 % = {model_info['top1']}), ranked by the mean NIG "
        "over the pairs, signed, as `Scheme.top` does.",
        f"- Every N is accumulated from nested nodes of one pass by the engine's fused op; on the first pair it "
        f"matches `fastnig.attribute(steps=16)` for all four (rule, nodes) to {check:.1e} of max |NIG|.",
        "",
        "## Accuracy per (rule, nodes, N)",
        "",
        "| rule | nodes | N | median rel. delta | p90 rel. delta | top 0.1 % overlap | top 1 % overlap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['nodes']} | {r['steps']} | {r['median_rel_delta']:.2e} | "
                     f"{r['p90_rel_delta']:.2e} | {r['overlap_top0.1']:.1f} | {r['overlap_top1']:.1f} |")
    lines += ["", "## Steps needed for 99 % overlap with the reference", "",
              "Smallest N from which the overlap stays ≥ 99 % for every larger N computed "
              f"(— = not reached; uniform nodes go up to N = {reference_n}, Chebyshev up to N = {max(args.steps)}).", "",
              "| rule | nodes | top 0.1 % | top 1 % | median rel. delta ≤ 1 % from N |", "|---|---|---:|---:|---:|"]
    need = {}
    for rule in RULES:
        for nodes in NODES:
            a = steps_to_reach(rows, rule, nodes, "overlap_top0.1", 99.0)
            b = steps_to_reach(rows, rule, nodes, "overlap_top1", 99.0)
            mine = sorted((r for r in rows if r["rule"] == rule and r["nodes"] == nodes), key=lambda r: r["steps"])
            c = next((r["steps"] for r in mine if r["median_rel_delta"] <= 0.01), None)
            need[(rule, nodes)] = (a, b)
            lines.append(f"| {rule} | {nodes} | {a or '—'} | {b or '—'} | {c or '—'} |")
    lines += ["", "## steps=\"auto\" (simulated from the same passes)", "",
              "Per pair: N = 16, 32, ... until |delta| ≤ tolerance · max(|F(x) − F(x')|, 0.01), as "
              "`fastnig.attribute(steps=\"auto\")` does, capped at max_steps.", "",
              "| rule | nodes | tolerance | max_steps | mean N | max N | median rel. delta | top 0.1 % | top 1 % |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in auto_rows:
        lines.append(f"| {r['rule']} | {r['nodes']} | {r['tolerance']:g} | {r['max_steps']} | {r['mean_steps']:.1f} | "
                     f"{r['max_steps_used']} | {r['median_rel_delta']:.2e} | {r['overlap_top0.1']:.1f} | "
                     f"{r['overlap_top1']:.1f} |")
    lines += ["", "## Conclusions", ""] + conclusions(rows, auto_rows, need, reference_n, args.steps)
    lines += ["", "![steps accuracy](steps_accuracy.png)", ""]
    return "\n".join(lines)


def _count(pairs):
    counts = {}
    for p in pairs:
        counts[p["dataset"]] = counts.get(p["dataset"], 0) + 1
    return counts


def conclusions(rows, auto_rows, need, reference_n, steps):
    """Recommendations written from the measured numbers (rules of thumb stated explicitly)."""
    def cost(key):
        a, b = need[key]
        return (max(a or 10 ** 9, b or 10 ** 9), a or 10 ** 9)

    ranked = sorted(need, key=cost)
    best = ranked[0]
    out = []
    for key in ranked:
        a, b = need[key]
        top = reference_n if key[1] == "uniform" else max(steps)
        out.append(f"- {key[0]} + {key[1]}: 99 % overlap of the top 0.1 % set from N = "
                   f"{a or f'(not reached up to {top})'}, of the top 1 % set from N = {b or f'(not reached up to {top})'}.")
    at = {(r["rule"], r["nodes"], r["steps"]): r for r in rows}
    ratios = [(n, at[("left", "uniform", n)]["median_rel_delta"] / max(at[("trapezoid", "uniform", n)]["median_rel_delta"], 1e-12))
              for n in (32, max(steps)) if ("left", "uniform", n) in at and ("trapezoid", "uniform", n) in at]
    if ratios:
        out.append("- Median relative delta of left / trapezoid (uniform nodes): "
                   + ", ".join(f"{r:.0f}× at N = {n}" for n, r in dict(ratios).items())
                   + ". Trapezoid costs nothing more: the same N + 1 evaluations.")
    cheb = [(n, at[("trapezoid", "chebyshev", n)], at[("trapezoid", "uniform", n)]) for n in steps
            if ("trapezoid", "chebyshev", n) in at and ("trapezoid", "uniform", n) in at]
    worse = [n for n, c, u in cheb if c["median_rel_delta"] > u["median_rel_delta"]]
    if cheb:
        verdict = "do not pay here" if 2 * len(worse) > len(cheb) else "pay here"
        out.append(f"- Chebyshev–Lobatto nodes (denser at both ends of the path) {verdict}: with the trapezoid "
                   f"rule their median relative delta is larger than uniform nodes' at {len(worse)} of {len(cheb)} "
                   f"N values; 99 % overlap (top 0.1 % / 1 %) from N = {need[('trapezoid', 'chebyshev')][0] or '—'} / "
                   f"{need[('trapezoid', 'chebyshev')][1] or '—'} against {need[('trapezoid', 'uniform')][0] or '—'} / "
                   f"{need[('trapezoid', 'uniform')][1] or '—'} with uniform nodes.")
    out.append(f"- **Recommended default: rule=\"{best[0]}\", nodes=\"{best[1]}\"** (fewest steps to 99 % overlap "
               "of both sets; ties broken by the top 0.1 % set).")
    mine = sorted((r for r in auto_rows if r["rule"] == best[0] and r["nodes"] == best[1]),
                  key=lambda r: r["tolerance"])
    if mine:
        tightest = mine[0]
        target = (tightest["overlap_top0.1"], tightest["overlap_top1"])
        same = [r for r in mine if (r["overlap_top0.1"], r["overlap_top1"]) >= target]
        pick = max(same, key=lambda r: r["tolerance"])
        current = next((r for r in mine if r["tolerance"] == 0.01), None)
        note = "" if current is None or current is pick else (
            f"; the engine's current default 0.01 gives {current['overlap_top0.1']:.1f} / "
            f"{current['overlap_top1']:.1f} % at mean N = {current['mean_steps']:.1f}")
        ok = pick["overlap_top0.1"] >= 99 and pick["overlap_top1"] >= 99
        out.append(f"- **Recommended steps=\"auto\" tolerance: {pick['tolerance']:g}** with {best[0]} + {best[1]}: "
                   f"the loosest tolerance that keeps the overlap of the tightest one tried "
                   f"({tightest['tolerance']:g}): {pick['overlap_top0.1']:.1f} % (top 0.1 %) and "
                   f"{pick['overlap_top1']:.1f} % (top 1 %) at mean N = {pick['mean_steps']:.1f}, at most "
                   f"{pick['max_steps_used']}{note}." + ("" if ok else " It stays below 99 %: prefer fixed steps."))
    return out


# ------------------------------------------------------------------- main
def replot(path: Path, args) -> None:
    """Rewrite the outputs from a saved steps_accuracy.json (no model, no attribution)."""
    saved = json.loads(path.read_text())
    settings = argparse.Namespace(**saved["settings"])
    settings.out = args.out
    write_outputs(Path(args.out), settings, saved["rows"], saved["auto"], saved["pairs"], saved["timings_s"],
                  saved["engine_check_max_rel_diff"], saved["model"], settings.reference)
    print((Path(args.out) / "steps_accuracy.md").read_text())


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.replot:
        return replot(Path(args.replot), args)
    load_start = os.getloadavg()[0]
    cache = Path(args.cache_dir or os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig").expanduser()
    data = data_dir(args.data)
    if args.nfcorpus_pairs and not (data / "nfcorpus").is_dir():
        sys.exit(f"--nfcorpus-pairs needs NFCorpus's TREC-style files in {data / 'nfcorpus'} "
                 "(pass --data or set FASTNIG_DATA to the folder holding nfcorpus/)")
    prepare_ir_datasets(cache)
    os.environ.setdefault("FASTNIG_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from fastnig.data import load_collection
    from fastnig.models import offline_demo_model, split_queries
    from fastnig.schemes import neuron_universe

    cranfield = load_collection("cranfield")
    train_ids, test_ids = split_queries(cranfield, seed=args.seed)
    t0 = time.perf_counter()
    model, tokenizer = offline_demo_model(cache / "models", dataset=cranfield, train_query_ids=train_ids,
                                          seed=args.seed, evaluate=True)
    timings = {"model": time.perf_counter() - t0}
    info_path = Path(model.config.name_or_path) / "fastnig_training.json"
    training = json.loads(info_path.read_text()) if info_path.exists() else {}
    sizes = neuron_universe(model)
    total = sum(sizes.values())
    model_info = {"name": "MiniLM-L6 cross-encoder (offline demo)", "path": str(model.config.name_or_path),
                  "train_queries": len(train_ids), "neurons": total,
                  "top0.1": round(0.001 * total), "top1": round(0.01 * total),
                  "ndcg": training.get("evaluation", {}).get("summary", "—")}

    agree = not args.no_agreement_filter
    pairs = [("cranfield", p) for p in select_pairs(model, tokenizer, cranfield, test_ids, args.pairs, args.seed,
                                                     args.max_length, agree, "cranfield")]
    if args.nfcorpus_pairs:
        nf = data / "nfcorpus"
        nfc = load_collection("trec", docs_tsv=str(nf / "test.docs"), queries_tsv=str(nf / "test.all.queries"),
                              qrels_trec=str(nf / "test.3-2-1.qrel"), cache_dir=str(cache / "local-docstores"))
        pairs += [("nfcorpus", p) for p in select_pairs(model, tokenizer, nfc, list(nfc.queries()),
                                                         args.nfcorpus_pairs, args.seed, args.max_length, agree,
                                                         "nfcorpus")]
    print(f"[steps_accuracy] {len(pairs)} pairs; reference N={args.reference}; N={args.steps}", flush=True)

    uniform_levels = sorted(set(args.steps) | {16 * 2 ** i for i in range(10) if 16 * 2 ** i <= args.reference}
                            | {args.reference})
    cheb_max = max(args.steps)
    cheb_levels = sorted(set(args.steps) | {16 * 2 ** i for i in range(10) if 16 * 2 ** i <= cheb_max})
    results = []  # per pair: {(nodes, N, rule): {"scores", "input"}}
    per_pair_info = []
    check = float("nan")
    t0 = time.perf_counter()
    for i, (dataset, p) in enumerate(pairs):
        t_pair = time.perf_counter()
        uni, f_in, f_b, ntok = nested_nig(model, tokenizer, p.text_pair, "uniform", args.reference, uniform_levels,
                                          args.step_batch, args.max_length)
        cheb, f_in2, f_b2, _ = nested_nig(model, tokenizer, p.text_pair, "chebyshev", cheb_max, cheb_levels,
                                          args.step_batch, args.max_length)
        assert abs(f_in - f_in2) < 1e-5 and abs(f_b - f_b2) < 1e-5
        merged = {("uniform",) + k: v for k, v in uni.items()}
        merged.update({("chebyshev",) + k: v for k, v in cheb.items()})
        if i == 0:
            check = max(engine_check(model, tokenizer, p.text_pair, uni, "uniform", 16, args.max_length),
                        engine_check(model, tokenizer, p.text_pair, cheb, "chebyshev", 16, args.max_length))
            print(f"[steps_accuracy] engine check: max rel diff {check:.2e}", flush=True)
        results.append(merged)
        per_pair_info.append({"dataset": dataset, "query_id": p.query_id, "doc_id": p.doc_id,
                              "num_tokens": ntok, "f_input": f_in, "f_baseline": f_b,
                              "rel_delta": {f"{k[1]}/{k[0]}/{k[2]}": abs(v["input"] - (f_in - f_b)) / abs(f_in - f_b)
                                            for k, v in merged.items()}})
        print(f"[steps_accuracy] pair {i + 1}/{len(pairs)} ({ntok} tokens) in {time.perf_counter() - t_pair:.0f} s; "
              f"F(x) - F(x') = {f_in - f_b:.3f}", flush=True)
    timings["attribution"] = time.perf_counter() - t0

    def rel(i, key):
        info = per_pair_info[i]
        return abs(results[i][key]["input"] - (info["f_input"] - info["f_baseline"])) / \
            abs(info["f_input"] - info["f_baseline"])

    ref_key = ("uniform", args.reference, "trapezoid")
    ref_sets = top_sets(mean_scores(results, lambda i: results[i][ref_key]["scores"]), sizes, PERCENTS)
    rows = []
    for rule in RULES:
        for nodes in NODES:
            levels = uniform_levels if nodes == "uniform" else cheb_levels
            for n in levels:
                key = (nodes, n, rule)
                sets = top_sets(mean_scores(results, lambda i: results[i][key]["scores"]), sizes, PERCENTS)
                rels = sorted(rel(i, key) for i in range(len(results)))
                rows.append({"rule": rule, "nodes": nodes, "steps": n, "points": n + 1,
                             "median_rel_delta": statistics.median(rels),
                             "p90_rel_delta": rels[min(len(rels) - 1, math.ceil(0.9 * len(rels)) - 1)],
                             "max_rel_delta": rels[-1],
                             "overlap_top0.1": sets[0.1].overlap(ref_sets[0.1]),
                             "overlap_top1": sets[1.0].overlap(ref_sets[1.0])})

    auto_rows = []
    for rule in RULES:
        for nodes in NODES:
            max_steps = args.reference // 2 if nodes == "uniform" else cheb_max
            levels = [n for n in (uniform_levels if nodes == "uniform" else cheb_levels) if 16 <= n <= max_steps]
            if not levels:
                continue
            for tol in AUTO_TOLERANCES:
                chosen = []
                for i, info in enumerate(per_pair_info):
                    moved = max(abs(info["f_input"] - info["f_baseline"]), 0.01)
                    pick = next((n for n in levels
                                 if abs(results[i][(nodes, n, rule)]["input"] - (info["f_input"] - info["f_baseline"]))
                                 <= tol * moved), levels[-1])
                    chosen.append(pick)
                sets = top_sets(mean_scores(results, lambda i: results[i][(nodes, chosen[i], rule)]["scores"]),
                                sizes, PERCENTS)
                rels = [rel(i, (nodes, chosen[i], rule)) for i in range(len(results))]
                auto_rows.append({"rule": rule, "nodes": nodes, "tolerance": tol, "max_steps": max_steps,
                                  "mean_steps": statistics.mean(chosen), "max_steps_used": max(chosen),
                                  "median_rel_delta": statistics.median(rels),
                                  "overlap_top0.1": sets[0.1].overlap(ref_sets[0.1]),
                                  "overlap_top1": sets[1.0].overlap(ref_sets[1.0])})
    timings["total"] = time.perf_counter() - t_start
    timings["load_start"], timings["load_end"] = load_start, os.getloadavg()[0]
    out = Path(args.out)
    write_outputs(out, args, rows, auto_rows, per_pair_info, timings, check, model_info, args.reference)
    print((out / "steps_accuracy.md").read_text())


if __name__ == "__main__":
    main()
