"""How many path steps does NIG need?  Accuracy against the number of steps, per rule and node set.

On the offline demo cross-encoder (MiniLM-L6 fine-tuned on Cranfield's
training queries, :func:`fastnig.training.demo_model.offline_demo_model`) and relevant
pairs of held-out Cranfield queries and of MEDLINE (``med``, packaged too;
optionally some NFCorpus pairs), for the rules ``left`` / ``trapezoid`` /
``richardson`` and the nodes ``uniform`` / ``chebyshev``, at N = 4, 8, ...,
128 path intervals, it measures, per collection,

* the median (and 90th percentile) over pairs of |delta| / |F(x) - F(x')|;
* the overlap of the top 0.1 % and 1 % neuron sets (neurons ranked by mean
  NIG over the collection's pairs, as :meth:`fastnig.neurons.scheme.Scheme.top`
  does) with those of a 512-step reference (trapezoid, uniform);
* the accuracy of the per-neuron error estimate |T_N - T_{N/2}| / 3
  (:func:`fastnig.engine.quadrature.error_estimate`) against T_N's error from the reference;

and simulates ``steps="auto"`` for several tolerances: per pair N = 16, 32,
... until |delta| <= tolerance · max(|F(x) - F(x')|, 0.01) ("delta"), and,
for ``richardson``, also until the top 1 % neurons' estimated relative L1
error is <= tolerance (:func:`fastnig.engine.quadrature.auto_converged`, "delta+neurons").

Cost: every node set is nested (uniform and Chebyshev-Lobatto nodes of N
are the nodes of 2N taken every other one), so each pair is evaluated once on
the 513 uniform points of the reference and once on the 129 Chebyshev points
of N = 128; every coarser N and both rules are accumulated from the same
forward + backward passes by the engine's own fused op
(:func:`fastnig.engine.kernels.accumulate_conductance`), with one carry per (N,
rule); R_N = (4 T_N - T_{N/2}) / 3 combines two of them
(:func:`fastnig.engine.quadrature.richardson`).  The results equal separate
``fastnig.attribute(steps=N, rule=..., nodes=...)`` calls (same node
positions, same op, same order of summation); the script checks that on its
first pair (every rule) and writes the difference.

    python bench/accuracy/steps_accuracy.py --out bench/results           # ~35 min on 2 CPU cores
    python bench/accuracy/steps_accuracy.py --out bench/results --nodes uniform --reference 256 --max-length 64 \
        --pairs 24 --med-pairs 24                                         # what bench/results holds
    python bench/accuracy/steps_accuracy.py --out /tmp/fastnig-bench --quick   # smoke run: 2 + 2 pairs, N <= 16,
                                                                       # reference 32, 64 tokens

Outputs in ``--out``: ``steps_accuracy.csv`` (one row per collection x rule x nodes x N),
``steps_accuracy_auto.csv`` (the steps="auto" simulation), ``steps_accuracy_estimate.csv``
(the error estimate against the true error),
``steps_accuracy.png`` (the figure), ``steps_accuracy.md`` (tables and the
conclusions, written from the numbers) and ``steps_accuracy.json`` (settings,
per-pair values, timings).  The run's metadata (commit, date, CPU, GPU,
threads, versions) goes into the JSON (``"run"``), the Markdown (last line)
and a ``<name>.meta.json`` beside each CSV; ``--replot`` carries the saved
run's metadata over (and records its own under ``"replotted"``).

Data: Cranfield through ir_datasets, from the ``cran.tar.gz`` packaged with
fastnig (placed in ``IR_DATASETS_HOME`` when it is not there), MEDLINE from
its packaged SMART files (model never trained on it: all 30 queries); the optional
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared _common module
from _common import REPO, RESULTS, run_markdown, run_metadata, write_csv_meta, write_json  # noqa: E402

RULES = ("left", "trapezoid", "richardson")
SUMMED = ("left", "trapezoid")   # accumulated by the op; richardson combines two trapezoid levels
NODES = ("uniform", "chebyshev")
PERCENTS = (0.1, 1.0)
AUTO_TOLERANCES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS), help="output folder (default bench/results)")
    p.add_argument("--quick", action="store_true",
                   help="2 + 2 pairs, N = 4, 8, 16, reference N = 32, 64 tokens (a smoke run, ~1 min on 2 cores)")
    p.add_argument("--pairs", type=int, default=16, help="relevant pairs of held-out Cranfield queries")
    p.add_argument("--med-pairs", type=int, default=16, help="relevant MEDLINE pairs (packaged, out of domain)")
    p.add_argument("--nodes", default="uniform,chebyshev", help="node sets compared (uniform always)")
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
        args.pairs, args.med_pairs, args.nfcorpus_pairs, args.steps, args.reference = 2, 2, 0, "4,8,16", 32
        args.max_length = 64
    args.steps = sorted({int(s) for s in str(args.steps).split(",") if s.strip()})
    args.nodes = [n for n in NODES if n == "uniform" or n in str(args.nodes).split(",")]
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

    from fastnig.engine.encoding import baseline_embeddings, encode_pairs
    from fastnig.engine.kernels import Carry, accumulate_conductance
    from fastnig.engine.model import frozen_eval as _frozen_eval
    from fastnig.engine.model import input_embeddings as _input_embeddings
    from fastnig.engine.model import linear_modules
    from fastnig.engine.quadrature import path_nodes
    from fastnig.engine.scoring import target_function

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
    keys = [(n, r) for n in levels for r in SUMMED]
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
            for rule in SUMMED:
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
    import fastnig

    worst = 0.0
    for rule in (RULES if family == "uniform" else SUMMED):
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

    from fastnig.engine.attribute import Attributions
    from fastnig.neurons.scheme import Scheme

    scores = {m: v.unsqueeze(0).float() for m, v in mean_by_module.items()}
    att = Attributions(scores, torch.zeros(1), torch.ones(1), torch.zeros(1), ["relevant"],
                       torch.ones(1, dtype=torch.long),
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


def add_richardson(nested, levels):
    """Adds ``(N, "richardson")`` = (4 T_N - T_{N/2}) / 3 to a uniform ``nested_nig`` result wherever
    N / 2 is a level too; returns ``{N: {module: |T_N - T_{N/2}| / 3}}``, the per-neuron error estimates."""
    from fastnig.engine.quadrature import error_estimate, richardson

    estimates = {}
    for n in levels:
        if n % 2 or n // 2 not in levels:
            continue
        fine, coarse = nested[(n, "trapezoid")], nested[(n // 2, "trapezoid")]
        nested[(n, "richardson")] = {
            "scores": {m: richardson(v, coarse["scores"][m]) for m, v in fine["scores"].items()},
            "input": richardson(fine["input"], coarse["input"])}
        estimates[n] = {m: error_estimate(v, coarse["scores"][m]) for m, v in fine["scores"].items()}
    return estimates


def steps_to_reach(rows, dataset, rule, nodes, column, target):
    """Smallest N whose value reaches ``target`` and stays there for every larger N."""
    mine = sorted((r for r in rows if r["dataset"] == dataset and r["rule"] == rule and r["nodes"] == nodes),
                  key=lambda r: r["steps"])
    best = None
    for r in reversed(mine):
        if r[column] >= target:
            best = r["steps"]
        else:
            break
    return best


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def accuracy_rows(results, info, members, dataset, sizes, ref_key, levels_of, nodes_list):
    """One row per (rule, nodes, N) for the pairs ``members`` of one collection."""
    ref_sets = top_sets(mean_scores(members, lambda i: results[members[i]][ref_key]["scores"]), sizes, PERCENTS)
    rows = []
    for rule in RULES:
        for nodes in nodes_list:
            for n in levels_of[nodes]:
                key = (nodes, n, rule)
                if key not in results[members[0]]:
                    continue
                sets = top_sets(mean_scores(members, lambda i: results[members[i]][key]["scores"]), sizes, PERCENTS)
                rels = [rel_delta(results[i][key]["input"], info[i]) for i in members]
                rows.append({"dataset": dataset, "rule": rule, "nodes": nodes, "steps": n, "points": n + 1,
                             "median_rel_delta": statistics.median(rels), "p90_rel_delta": quantile(rels, 0.9),
                             "max_rel_delta": max(rels),
                             "median_rel_l1": statistics.median(rel_l1(results[i][key], results[i][ref_key])
                                                                for i in members),
                             "overlap_top0.1": sets[0.1].overlap(ref_sets[0.1]),
                             "overlap_top1": sets[1.0].overlap(ref_sets[1.0])})
    return rows


def rel_l1(result, reference):
    """Σ_neurons |NIG - NIG_ref| / Σ_neurons |NIG_ref| of one pair (all modules)."""
    diff = sum(float((v - reference["scores"][m]).abs().sum()) for m, v in result["scores"].items())
    return diff / sum(float(v.abs().sum()) for v in reference["scores"].values())


def rel_delta(input_nig, info):
    moved = info["f_input"] - info["f_baseline"]
    return abs(input_nig - moved) / abs(moved)


def estimate_rows(results, estimates, members, dataset, reference_n):
    """How well |T_N - T_{N/2}| / 3 estimates T_N's error |T_N - T_ref| (N <= reference / 4, so that the
    reference's own error is at most 1/16 of it); medians over the collection's pairs."""
    import torch

    rows = []
    for n in sorted(estimates[members[0]]):
        if 4 * n > reference_n:
            continue
        ratio_all, ratio_top, within2, conservative = [], [], [], []
        for i in members:
            ref = torch.cat([v for v in results[i][("uniform", reference_n, "trapezoid")]["scores"].values()])
            fine = torch.cat([v for v in results[i][("uniform", n, "trapezoid")]["scores"].values()])
            rich = torch.cat([v for v in results[i][("uniform", n, "richardson")]["scores"].values()])
            est = torch.cat([v for v in estimates[i][n].values()]).double()
            true = (fine - ref).abs().double()
            top = ref.abs().topk(max(1, round(0.01 * ref.numel()))).indices
            ratio_all.append(float(est.sum() / true.sum().clamp_min(1e-30)))
            ratio_top.append(float(est[top].sum() / true[top].sum().clamp_min(1e-30)))
            q = est[top] / true[top].clamp_min(1e-30)
            within2.append(float(((q >= 0.5) & (q <= 2)).double().mean()))
            conservative.append(float(est[top].sum() / (rich - ref).abs().double()[top].sum().clamp_min(1e-30)))
        rows.append({"dataset": dataset, "steps": n, "est_over_true_l1_all": statistics.median(ratio_all),
                     "est_over_true_l1_top1": statistics.median(ratio_top),
                     "within_2x_top1": 100 * statistics.median(within2),
                     "est_over_richardson_error_top1": statistics.median(conservative)})
    return rows


def auto_rows_for(results, estimates, info, members, dataset, sizes, ref_sets, levels):
    """The steps="auto" simulation for one collection: per rule, stopping test and tolerance."""
    import torch

    from fastnig.engine.quadrature import auto_converged, top_error

    cost = {n: sum(m + 1 for m in levels if m <= n) for n in levels}  # every level is a fresh run
    rows = []
    for rule in RULES:
        for stop in (("delta", "delta+neurons") if rule == "richardson" else ("delta",)):
            for tol in AUTO_TOLERANCES:
                chosen = []
                for i in members:
                    f_in, f_b = torch.tensor([info[i]["f_input"]]), torch.tensor([info[i]["f_baseline"]])

                    def done(n):
                        r = results[i][("uniform", n, rule)]
                        err = None
                        if stop == "delta+neurons":
                            err = top_error({m: v.unsqueeze(0) for m, v in r["scores"].items()},
                                            {m: v.unsqueeze(0) for m, v in estimates[i][n].items()})
                        delta = torch.tensor([r["input"] - (info[i]["f_input"] - info[i]["f_baseline"])])
                        return bool(auto_converged(delta, f_in, f_b, tol, err)[0])

                    chosen.append(next((n for n in levels if done(n)), levels[-1]))
                pick = dict(zip(members, chosen))
                sets = top_sets(mean_scores(members, lambda j: results[members[j]][("uniform", pick[members[j]],
                                                                                     rule)]["scores"]),
                                sizes, PERCENTS)
                rows.append({"dataset": dataset, "rule": rule, "stop": stop, "tolerance": tol,
                             "max_steps": levels[-1], "mean_steps": statistics.mean(chosen),
                             "mean_points": statistics.mean(cost[n] for n in chosen), "max_steps_used": max(chosen),
                             "median_rel_delta": statistics.median(
                                 rel_delta(results[i][("uniform", pick[i], rule)]["input"], info[i]) for i in members),
                             "overlap_top0.1": sets[0.1].overlap(ref_sets[0.1]),
                             "overlap_top1": sets[1.0].overlap(ref_sets[1.0])})
    return rows


# ------------------------------------------------------------------ output
def _write_csv(path, rows, cols, run, replotted=None):
    """``rows`` (dicts) as CSV with columns ``cols``; floats to 6 significant digits; ``run`` beside it
    (``<name>.meta.json``, with ``replotted`` when given)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})
    write_csv_meta(path, run, **({"replotted": replotted} if replotted is not None else {}))


ROW_COLUMNS = ["dataset", "rule", "nodes", "steps", "points", "median_rel_delta", "p90_rel_delta", "max_rel_delta",
               "median_rel_l1", "overlap_top0.1", "overlap_top1"]
AUTO_COLUMNS = ["dataset", "rule", "stop", "tolerance", "max_steps", "mean_steps", "mean_points", "max_steps_used",
                "median_rel_delta", "overlap_top0.1", "overlap_top1"]
ESTIMATE_COLUMNS = ["dataset", "steps", "est_over_true_l1_all", "est_over_true_l1_top1", "within_2x_top1",
                    "est_over_richardson_error_top1"]


def write_outputs(out, args, rows, auto_rows, estimate, per_pair_info, timings, check, model_info, reference_n,
                  run, replotted=None):
    """Every output; ``run``: the measuring run's metadata (None: not recorded), ``replotted``: that of a
    ``--replot`` run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "steps_accuracy.csv", rows, ROW_COLUMNS, run, replotted)
    _write_csv(out / "steps_accuracy_auto.csv", auto_rows, AUTO_COLUMNS, run, replotted)
    _write_csv(out / "steps_accuracy_estimate.csv", estimate, ESTIMATE_COLUMNS, run, replotted)

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    colors = {"left": "tab:blue", "trapezoid": "tab:red", "richardson": "tab:green"}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    markers = ["o", "s", "^", "D"]
    for d, dataset in enumerate(datasets):
        for rule, color in colors.items():
            for nodes in NODES:
                mine = [r for r in rows if r["dataset"] == dataset and r["rule"] == rule and r["nodes"] == nodes
                        and r["steps"] < reference_n]
                if not mine:
                    continue
                xs = [r["points"] for r in mine]
                style = ("-" if nodes == "uniform" else ":") + markers[d % len(markers)]
                label = f"{rule}{'' if nodes == 'uniform' else ', ' + nodes}, {dataset}"
                axes[0].loglog(xs, [max(r["median_rel_delta"], 1e-9) for r in mine], style, color=color,
                               label=label, alpha=1 if d == 0 else 0.6)
                axes[1].loglog(xs, [max(r["median_rel_l1"], 1e-9) for r in mine], style, color=color, label=label,
                               alpha=1 if d == 0 else 0.6)
                axes[2].semilogx(xs, [r["overlap_top0.1"] for r in mine], style, color=color, label=label,
                                 alpha=1 if d == 0 else 0.6)
                axes[3].semilogx(xs, [r["overlap_top1"] for r in mine], style, color=color, label=label,
                                 alpha=1 if d == 0 else 0.6)
    axes[0].set_title("input side: median |delta| / |F(x) - F(x')|")
    axes[1].set_title(f"neurons: median rel. L1 error vs N={reference_n}")
    axes[2].set_title(f"top 0.1 % overlap with N={reference_n} trapezoid (%)")
    axes[3].set_title(f"top 1 % overlap with N={reference_n} trapezoid (%)")
    for ax in axes:
        ax.set_xlabel("path points (N + 1 forward + backward passes)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[2:]:
        ax.axhline(99, color="gray", lw=0.8, ls=":")
        ax.set_ylim(min(50, ax.get_ylim()[0]), 101)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"NIG accuracy vs path points — {model_info['name']}, {len(per_pair_info)} pairs "
                 f"({', '.join(datasets)}), max_length {args.max_length}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "steps_accuracy.png", dpi=120)
    plt.close(fig)

    saved = {"settings": {k: v for k, v in vars(args).items()}, "model": model_info, "pairs": per_pair_info,
             "timings_s": timings, "engine_check_max_rel_diff": check, "rows": rows, "auto": auto_rows,
             "estimate": estimate}
    if replotted is not None:
        saved["replotted"] = replotted
    write_json(out / "steps_accuracy.json", saved, run, indent=1)
    lines = [run_markdown(run)]
    if replotted is not None:
        lines.append(f"Replotted at commit `{replotted['git_commit']}`, {replotted['date_utc']}.")
    (out / "steps_accuracy.md").write_text(markdown(args, rows, auto_rows, estimate, per_pair_info, timings, check,
                                                    model_info, reference_n) + "\n" + "\n".join(lines) + "\n")


def _count(pairs):
    counts = {}
    for p in pairs:
        counts[p["dataset"]] = counts.get(p["dataset"], 0) + 1
    return counts


def points_needed(rows, datasets, nodes_list):
    """{(rule, nodes): {dataset: (N for 99 % of the top 0.1 %, of the top 1 %)}}."""
    need = {}
    for rule in RULES:
        for nodes in nodes_list:
            if not any(r["rule"] == rule and r["nodes"] == nodes for r in rows):
                continue
            need[(rule, nodes)] = {d: (steps_to_reach(rows, d, rule, nodes, "overlap_top0.1", 99.0),
                                       steps_to_reach(rows, d, rule, nodes, "overlap_top1", 99.0))
                                   for d in datasets}
    return need


def markdown(args, rows, auto_rows, estimate, pairs, timings, check, model_info, reference_n):
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    nodes_list = list(dict.fromkeys(r["nodes"] for r in rows))
    command = (f"python bench/accuracy/steps_accuracy.py --out {args.out} --pairs {args.pairs} "
               f"--med-pairs {args.med_pairs} "
               f"--nodes {','.join(args.nodes)} --reference {reference_n} --max-length {args.max_length}"
               + (" --quick" if args.quick else ""))
    lines = [
        "# NIG accuracy against the number of path points",
        "",
        f"Produced by `{command}` ({timings['total']:.0f} s on this machine, {args.threads} torch threads"
        + (f"; 1-min load average {timings['load_start']:.1f} at the start, {timings['load_end']:.1f} at the end: "
           "the 2 cores were shared with other jobs" if "load_start" in timings else "") + ").",
        "",
        f"- Model: {model_info['name']} (fine-tuned on {model_info['train_queries']} Cranfield training "
        f"queries: {model_info['training']}).",
        f"- Pairs: {len(pairs)} relevant pairs "
        f"({', '.join(f'{n} {d}' for d, n in _count(pairs).items())}; Cranfield: held-out queries), "
        f"{'all' if args.no_agreement_filter else 'model agrees (P(rel) > 0.5)'}; target relevant, F = P(rel), "
        f"baseline pad, max_length {args.max_length}; median tokens "
        f"{statistics.median(p['num_tokens'] for p in pairs):.0f}; median F(x) - F(x') "
        f"{statistics.median(p['f_input'] - p['f_baseline'] for p in pairs):.3f}.",
        f"- Reference: trapezoid, uniform, N = {reference_n}. Neurons: {model_info['neurons']} "
        f"(top 0.1 % = {model_info['top0.1']} neurons, top 1 % = {model_info['top1']}), ranked by the mean NIG "
        "over each collection's pairs, signed, as `Scheme.top` does.",
        f"- Every N is accumulated from nested nodes of one pass by the engine's fused op, and R_N = "
        f"(4 T_N − T_N/2) / 3 from two of them; on the first pair this matches `fastnig.attribute(steps=16)` "
        f"for every rule and node set to {check:.1e} of max |NIG|.",
        "",
        "## Path points needed for 99 % overlap with the reference",
        "",
        "Smallest N from which the overlap of the top set stays ≥ 99 % for every larger N computed "
        f"(— = not reached; uniform nodes up to N = {reference_n}); cost = N + 1 path points (forward + backward) "
        "for every rule.",
        "",
        "| rule | nodes | " + " | ".join(f"{d}: top 0.1 % | {d}: top 1 %" for d in datasets) + " |",
        "|---|---|" + "---:|---:|" * len(datasets),
    ]
    need = points_needed(rows, datasets, nodes_list)
    for (rule, nodes), per in need.items():
        lines.append(f"| {rule} | {nodes} | " + " | ".join(
            f"{a or '—'} | {b or '—'}" for a, b in (per[d] for d in datasets)) + " |")
    lines += ["", "## Accuracy per (collection, rule, nodes, N)", "",
              "Rel. L1 = Σ over all neurons |NIG − NIG_ref| / Σ |NIG_ref| per pair (median over pairs).", "",
              "| collection | rule | nodes | N | median rel. delta | p90 rel. delta | median rel. L1 | "
              "top 0.1 % overlap | top 1 % overlap |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['rule']} | {r['nodes']} | {r['steps']} | {r['median_rel_delta']:.2e} | "
                     f"{r['p90_rel_delta']:.2e} | {r['median_rel_l1']:.2e} | {r['overlap_top0.1']:.1f} | "
                     f"{r['overlap_top1']:.1f} |")
    lines += ["", "## The per-neuron error estimate |T_N − T_N/2| / 3", "",
              "Against T_N's true error |T_N − T_ref| (medians over pairs): the ratio of the L1 sums over all "
              "neurons and over each pair's top 1 % (by |NIG| of the reference; 1 = exact), the % of those top "
              "neurons whose estimate is within a factor 2 of the truth, and the estimate over R_N's own error "
              "(> 1: conservative for R_N).", "",
              "| collection | N | est / true, all | est / true, top 1 % | within 2×, top 1 % | "
              "est / R_N error, top 1 % |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in estimate:
        lines.append(f"| {r['dataset']} | {r['steps']} | {r['est_over_true_l1_all']:.2f} | "
                     f"{r['est_over_true_l1_top1']:.2f} | {r['within_2x_top1']:.0f} | "
                     f"{r['est_over_richardson_error_top1']:.1f} |")
    lines += ["", "## steps=\"auto\" (simulated from the same passes)", "",
              "Per pair: N = 16, 32, ... capped at max_steps, until "
              "|delta| ≤ tolerance · max(|F(x) − F(x')|, 0.01) (stop = delta) and, for delta+neurons, also the "
              "estimated relative L1 error of the pair's top 1 % neurons ≤ tolerance — "
              "`fastnig.attribute(steps=\"auto\", rule=\"richardson\")`. Each level is a fresh run: a pair "
              "stopping at N costs 17 + 33 + ... + (N + 1) points (mean points).", "",
              "| collection | rule | stop | tolerance | mean N | max N | mean points | median rel. delta | top 0.1 % | "
              "top 1 % |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in auto_rows:
        lines.append(f"| {r['dataset']} | {r['rule']} | {r['stop']} | {r['tolerance']:g} | {r['mean_steps']:.1f} | "
                     f"{r['max_steps_used']} | {r['mean_points']:.1f} | {r['median_rel_delta']:.2e} | "
                     f"{r['overlap_top0.1']:.1f} | {r['overlap_top1']:.1f} |")
    lines += ["", "## Conclusions", ""] + conclusions(rows, auto_rows, need, datasets)
    lines += ["", "![steps accuracy](steps_accuracy.png)", ""]
    return "\n".join(lines)


AUTO_BEFORE = ("trapezoid", "delta", 0.01)       # steps="auto" before issue 16: rule, stopping test, tolerance
AUTO_NOW = ("richardson", "delta+neurons", 0.05)  # and now (fastnig.attribute's defaults)


def equivalent_trapezoid_n(rows, dataset, error):
    """The trapezoid N whose median rel. L1 error would be ``error``: log-log interpolation between the
    measured levels that bracket it (None outside them; the reference level itself is left out)."""
    trap = sorted(((r["steps"], r["median_rel_l1"]) for r in rows if r["dataset"] == dataset
                   and r["rule"] == "trapezoid" and r["nodes"] == "uniform" and r["median_rel_l1"] > 0))
    for (n1, e1), (n2, e2) in zip(trap, trap[1:]):
        if e1 >= error >= e2 and e1 > e2:
            return n1 * math.exp(math.log(error / e1) / math.log(e2 / e1) * math.log(n2 / n1))
    return None


def conclusions(rows, auto_rows, need, datasets):
    """Recommendations written from the measured numbers (rules of thumb stated explicitly)."""
    def worst(key):  # N needed for both sets on every collection (10**9 = not reached)
        return max((n or 10 ** 9) for pair in need[key].values() for n in pair)

    out = []
    for key in sorted(need, key=lambda k: (worst(k), RULES.index(k[0]))):
        n = worst(key)
        out.append(f"- {key[0]} + {key[1]}: 99 % overlap of both top sets on every collection from N = "
                   + (f"{n} ({n + 1} points)." if n < 10 ** 9 else "(not reached)."))
    rich = sorted({r["steps"] for r in rows if r["rule"] == "richardson" and r["steps"] >= 8})
    equivalent = {}
    for n in rich:
        found = [equivalent_trapezoid_n(rows, d, next(r["median_rel_l1"] for r in rows if r["dataset"] == d
                                                      and r["rule"] == "richardson" and r["steps"] == n))
                 for d in datasets]
        if all(found):
            equivalent[n] = min(found)
            out.append(f"- Neuron accuracy: R_{n} ({n + 1} points) has the median rel. L1 error of the trapezoid "
                       f"rule at N ≈ " + " / ".join(f"{f:.0f}" for f in found) + f" ({' / '.join(datasets)}; "
                       "log-log interpolation between measured N).")
    default = next((n for n in rich if equivalent.get(n, 0) >= 90), None)
    if default is not None:
        excess = max((100 / equivalent[default]) ** 2 - 1, 0)  # the trapezoid's error goes as 1/N²
        out.append(f"- **Recommended default: rule=\"richardson\", steps={default}** ({default + 1} points): "
                   f"as accurate on the neurons as the trapezoid rule at N ≈ {equivalent[default]:.0f} (the least "
                   f"over the collections: an error at most {100 * excess:.0f} % above that of the previous default, "
                   f"trapezoid N = 100, 101 points), {101 / (default + 1):.1f}× cheaper for the same answer.")
    for label, (rule, stop, tol) in (("before", AUTO_BEFORE), ("now", AUTO_NOW)):
        mine = [r for r in auto_rows if r["rule"] == rule and r["stop"] == stop and r["tolerance"] == tol]
        if mine:
            out.append(f"- steps=\"auto\" {label} ({rule}, stop on {stop}, tolerance {tol:g}): mean points "
                       + " / ".join(f"{r['mean_points']:.1f}" for r in mine) + ", top 0.1 % / 1 % overlap "
                       + ", ".join(f"{r['overlap_top0.1']:.1f} / {r['overlap_top1']:.1f}" for r in mine)
                       + f" ({' / '.join(r['dataset'] for r in mine)}).")
    return out


# ------------------------------------------------------------------- main
def replot(path: Path, args) -> None:
    """Rewrite the outputs from a saved steps_accuracy.json (no model, no attribution)."""
    saved = json.loads(path.read_text())
    settings = argparse.Namespace(**saved["settings"])
    settings.out = args.out
    write_outputs(Path(args.out), settings, saved["rows"], saved["auto"], saved["estimate"], saved["pairs"],
                  saved["timings_s"], saved["engine_check_max_rel_diff"], saved["model"], settings.reference,
                  saved.get("run"), replotted=run_metadata())
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
    from fastnig.data.splits import split_queries
    from fastnig.neurons.sets import neuron_universe
    from fastnig.training.demo_model import offline_demo_model

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
                  "training": ", ".join(f"{k} {training.get('settings', {}).get(k)}"
                                        for k in ("steps", "lr", "head_lr", "random_negatives", "max_length"))}

    agree = not args.no_agreement_filter
    pairs = [("cranfield", p) for p in select_pairs(model, tokenizer, cranfield, test_ids, args.pairs, args.seed,
                                                     args.max_length, agree, "cranfield")]
    if args.med_pairs:
        med = load_collection("med")
        pairs += [("med", p) for p in select_pairs(model, tokenizer, med, list(med.queries()), args.med_pairs,
                                                   args.seed, args.max_length, agree, "med")]
    if args.nfcorpus_pairs:
        nf = data / "nfcorpus"
        nfc = load_collection("trec", docs_tsv=str(nf / "test.docs"), queries_tsv=str(nf / "test.all.queries"),
                              qrels_trec=str(nf / "test.3-2-1.qrel"), cache_dir=str(cache / "local-docstores"))
        pairs += [("nfcorpus", p) for p in select_pairs(model, tokenizer, nfc, list(nfc.queries()),
                                                         args.nfcorpus_pairs, args.seed, args.max_length, agree,
                                                         "nfcorpus")]
    print(f"[steps_accuracy] {len(pairs)} pairs; reference N={args.reference}; N={args.steps}; "
          f"nodes {args.nodes}", flush=True)

    uniform_levels = sorted(set(args.steps) | {n // 2 for n in args.steps if n > 1}
                            | {16 * 2 ** i for i in range(10) if 16 * 2 ** i <= args.reference} | {args.reference})
    cheb_max = max(args.steps)
    cheb_levels = sorted(set(args.steps) | {16 * 2 ** i for i in range(10) if 16 * 2 ** i <= cheb_max})
    levels_of = {"uniform": [n for n in uniform_levels if n in args.steps or n >= 16], "chebyshev": cheb_levels}
    results = []  # per pair: {(nodes, N, rule): {"scores", "input"}}
    estimates = []  # per pair: {N: {module: |T_N - T_N/2| / 3}}
    per_pair_info = []
    check = float("nan")
    t0 = time.perf_counter()
    for i, (dataset, p) in enumerate(pairs):
        t_pair = time.perf_counter()
        uni, f_in, f_b, ntok = nested_nig(model, tokenizer, p.text_pair, "uniform", args.reference, uniform_levels,
                                          args.step_batch, args.max_length)
        estimates.append(add_richardson(uni, uniform_levels))
        merged = {("uniform",) + k: v for k, v in uni.items()}
        if "chebyshev" in args.nodes:
            cheb, f_in2, f_b2, _ = nested_nig(model, tokenizer, p.text_pair, "chebyshev", cheb_max, cheb_levels,
                                              args.step_batch, args.max_length)
            assert abs(f_in - f_in2) < 1e-5 and abs(f_b - f_b2) < 1e-5
            merged.update({("chebyshev",) + k: v for k, v in cheb.items()})
        if i == 0:
            check = engine_check(model, tokenizer, p.text_pair, uni, "uniform", 16, args.max_length)
            if "chebyshev" in args.nodes:
                check = max(check, engine_check(model, tokenizer, p.text_pair, cheb, "chebyshev", 16, args.max_length))
            print(f"[steps_accuracy] engine check: max rel diff {check:.2e}", flush=True)
        results.append(merged)
        info = {"dataset": dataset, "query_id": p.query_id, "doc_id": p.doc_id, "num_tokens": ntok,
                "f_input": f_in, "f_baseline": f_b}
        info["rel_delta"] = {f"{k[1]}/{k[0]}/{k[2]}": rel_delta(v["input"], info) for k, v in merged.items()}
        per_pair_info.append(info)
        print(f"[steps_accuracy] pair {i + 1}/{len(pairs)} ({dataset}, {ntok} tokens) in "
              f"{time.perf_counter() - t_pair:.0f} s; F(x) - F(x') = {f_in - f_b:.3f}", flush=True)
    timings["attribution"] = time.perf_counter() - t0

    ref_key = ("uniform", args.reference, "trapezoid")
    auto_levels = [n for n in uniform_levels if 16 <= n <= args.reference // 2]
    rows, auto_rows, estimate = [], [], []
    for dataset in dict.fromkeys(d for d, _ in pairs):
        members = [i for i, (d, _) in enumerate(pairs) if d == dataset]
        rows += accuracy_rows(results, per_pair_info, members, dataset, sizes, ref_key, levels_of, args.nodes)
        estimate += estimate_rows(results, estimates, members, dataset, args.reference)
        ref_sets = top_sets(mean_scores(members, lambda j: results[members[j]][ref_key]["scores"]), sizes, PERCENTS)
        auto_rows += auto_rows_for(results, estimates, per_pair_info, members, dataset, sizes, ref_sets, auto_levels)
    timings["total"] = time.perf_counter() - t_start
    timings["load_start"], timings["load_end"] = load_start, os.getloadavg()[0]
    out = Path(args.out)
    write_outputs(out, args, rows, auto_rows, estimate, per_pair_info, timings, check, model_info, args.reference,
                  run_metadata())
    print((out / "steps_accuracy.md").read_text())


if __name__ == "__main__":
    main()
