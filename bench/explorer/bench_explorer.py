"""The neuron explorer's budgets (docs/explorer.md): file size and time-to-interactive in headless Chromium.

A synthetic MonoBERT-large-sized run: 24 layers x (4 x 1024 + 4096 + 1024) = 221,184 neurons, 14
schemes (P_x of 5 datasets, N_x of 4, their 4 fusions F_x and F_A) with random values and segment
means, exemplars (k = 5, by :class:`fastnig.neurons.exemplars.Exemplars` over 24 random pairs)
and a per-token view (256 tokens) for each scheme's top 10 neurons, as ``fastnig explore`` would
write them (the per-token terms are random here: computing them needs the model).  Budgets:
<= 25 MB, interactive (heat map drawn, first table rows rendered) within 2 s of opening.  Also the
demo's explorer (``runs/demo/explorer.html``) when it exists: <= 5 MB.

    python bench/explorer/bench_explorer.py [--repeats 5] [--demo runs/demo/explorer.html]

Writes bench/results/explorer.json and explorer.md.  Needs Debian's chromium (``make browser``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import RESULTS, run_markdown, write_json  # noqa: E402
from browser_driver import Browser  # noqa: E402 - the tests' DevTools-pipe driver (no dependency)

from fastnig.report.explorer import explorer_data, token_payload, write_explorer  # noqa: E402
from fastnig.study.explore import HINT, chosen_neurons  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE = 24, 1024, 4096
SIZE_BUDGET_MB, DEMO_BUDGET_MB, INTERACTIVE_BUDGET_S = 25, 5, 2.0
PAIRS_PER_SCHEME, TOKENS = 24, 256


def monobert_large_sizes():
    sizes = {}
    for layer in range(LAYERS):
        p = f"bert.encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sizes[p + name] = HIDDEN
        sizes[p + "intermediate.dense"] = INTERMEDIATE
        sizes[p + "output.dense"] = HIDDEN
    return sizes


class SyntheticScheme:
    """What the explorer reads of a :class:`fastnig.Scheme` (name, label, mean, segment means, exemplars,
    ranking), with random values: building 221,184-neuron schemes through ``Scheme.add`` and its exact sums
    takes minutes per scheme on this machine, and the page only sees the means anyway."""

    def __init__(self, sizes, name, label, dataset, mean, segments=None, exemplars=None, pair_ids=()):
        self.sizes, self.name, self.label, self.dataset = sizes, name, label, dataset
        self.model, self.is_fused = "synthetic-monobert-large", label == "fused"
        self._mean, self._segments = mean, segments
        self.exemplars, self.pair_ids = exemplars, list(pair_ids)
        self.count = len(self.pair_ids)
        self.total_neurons = int(mean.numel())

    def mean_vector(self):
        return self._mean

    def segment_means(self):
        if self._segments is None:
            return None
        out, at = {}, 0
        for m, n in self.sizes.items():
            out[m], at = self._segments[:, at:at + n], at + n
        return out

    def ranking(self, by="value"):
        values = self._mean.numpy()
        key = values if by == "value" else np.abs(values)
        return np.lexsort((np.arange(values.size), -key))


def synthetic_schemes(seed: int = 0):
    """9 pair schemes of random NIG (heavy-tailed, with segment means and exemplars kept as
    :class:`fastnig.neurons.exemplars.Exemplars` does) + 4 fusions F_x + F_A."""
    from fastnig.neurons.exemplars import Exemplars

    sizes = monobert_large_sizes()
    total = sum(sizes.values())
    gen = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.randn(total, generator=gen) * 2)
    pair_schemes = []
    for label, datasets in (("relevant", ("ms", "tc", "f", "nf", "hp")), ("non-relevant", ("ms", "tc", "f", "nf"))):
        for d in datasets:
            per_pair = torch.randn(PAIRS_PER_SCHEME, 3, total, generator=gen) * spread
            scores = per_pair.sum(dim=1)  # [pairs, N]
            ids = [f"q{i}\td{d}{i}" for i in range(PAIRS_PER_SCHEME)]
            by_module, at = {}, 0
            for m, n in sizes.items():
                by_module[m], at = scores[:, at:at + n], at + n
            exemplars = Exemplars(sizes).add(by_module, ids, 0)
            name = ("P_" if label == "relevant" else "N_") + d
            pair_schemes.append(SyntheticScheme(sizes, name, label, d, scores.double().mean(0),
                                                per_pair.double().mean(0), exemplars, ids))
    fusions = []
    for p in pair_schemes[:5]:
        for n in pair_schemes[5:]:
            if n.dataset == p.dataset:
                fusions.append(SyntheticScheme(sizes, f"F_{p.dataset}", "fused", p.dataset,
                                               (p.mean_vector() + n.mean_vector()) / 2,
                                               (p._segments + n._segments) / 2))
    mean_all = torch.stack([s.mean_vector() for s in pair_schemes]).mean(0)
    seg_all = torch.stack([s._segments for s in pair_schemes]).mean(0)
    return pair_schemes + fusions + [SyntheticScheme(sizes, "F_A", "fused", "all", mean_all, seg_all)]


def synthetic_exemplars(schemes, top: int = 10, seed: int = 0):
    """Exemplars of each scheme's top neurons with random per-token terms (what explore computes with a model)."""
    rng = np.random.default_rng(seed)
    where = [(m, u) for m, n in schemes[0].sizes.items() for u in range(n)]
    pairs, index, exemplars = [], {}, {}
    words = "the boundary layer of supersonic wings shows heat transfer in a shock wave".split()
    for i in chosen_neurons(schemes, top):
        module, unit = where[i]
        for k, s in enumerate(schemes):
            if s.exemplars is None:
                continue
            for pid, value in s.exemplars.of(module, unit, s.pair_ids):
                key = (s.dataset, pid)
                if key not in index:
                    index[key] = len(pairs)
                    text = " ".join(rng.choice(words, TOKENS - 3))
                    pairs.append({"id": pid, "dataset": s.dataset, "query": "heat transfer", "passage": text,
                                  "tokens": ["[CLS]", "heat", "[SEP]"] + text.split(), "segments": [2, 0, 2]
                                  + [1] * (TOKENS - 3)})
                terms = rng.standard_normal(TOKENS)
                terms *= value / terms.sum()
                payload, scale = token_payload(terms)
                exemplars.setdefault(i, []).append({"scheme": k, "pair": index[key], "value": value,
                                                    "sum": float(terms.sum()), "tokens": payload, "scale": scale})
    return exemplars, pairs


def time_to_interactive(path: Path, repeats: int):
    """Per run: (ms from navigation start to the page's ready mark, wall s from Page.navigate to ready,
    ms to sort by another scheme)."""
    out = []
    with Browser() as browser:
        for _ in range(repeats):
            started = time.perf_counter()
            page = browser.open(path.resolve().as_uri())
            page.wait_for("document.body.dataset.ready && document.querySelectorAll('#grid-rows .row').length "
                          "&& document.querySelectorAll('#heatmap td.cell').length", timeout=120)
            wall = time.perf_counter() - started
            ready_ms = page.eval("window.explorerReadyMs")
            sort_ms = page.eval("(() => { const t = performance.now(); explorer.sortBy(1); "
                                "return performance.now() - t; })()")
            errors = page.console_errors
            if errors:
                raise RuntimeError(f"console errors: {errors}")
            out.append((ready_ms, wall, sort_ms))
            page.send("Page.close")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo", default="runs/demo/explorer.html")
    parser.add_argument("--keep", default=None, help="also keep the synthetic explorer here")
    args = parser.parse_args()
    built = time.perf_counter()
    schemes = synthetic_schemes()
    exemplars, pairs = synthetic_exemplars(schemes)
    data = explorer_data(schemes, title="synthetic MonoBERT-large", levels=[0.01, 0.1, 0.5, 1, 5], default_level=1,
                         exemplars=exemplars, pairs=pairs, hint=HINT)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_explorer(Path(args.keep or tmp) / "explorer_synthetic.html", data)
        build_s = time.perf_counter() - built
        size_mb = path.stat().st_size / 1e6
        runs = time_to_interactive(path, args.repeats)
    ready = statistics.median(r[0] for r in runs) / 1000
    wall = statistics.median(r[1] for r in runs)
    sort_ms = statistics.median(r[2] for r in runs)
    demo = Path(args.demo)
    demo_mb = demo.stat().st_size / 1e6 if demo.is_file() else None
    demo_ready = None
    if demo_mb is not None:
        demo_ready = statistics.median(r[0] for r in time_to_interactive(demo, 3)) / 1000
    import os
    report = {
        "synthetic": {"neurons": schemes[0].total_neurons, "schemes": len(schemes),
                      "exemplar_neurons": len(exemplars), "exemplar_pairs": len(pairs),
                      "size_mb": round(size_mb, 2), "budget_mb": SIZE_BUDGET_MB,
                      "interactive_s_median": round(ready, 3),
                      "interactive_s_runs": [round(r[0] / 1000, 3) for r in runs],
                      "wall_s_median": round(wall, 3), "sort_other_scheme_ms_median": round(sort_ms, 1),
                      "budget_s": INTERACTIVE_BUDGET_S, "build_s": round(build_s, 1)},
        "demo": {"path": str(demo), "size_mb": round(demo_mb, 3) if demo_mb is not None else None,
                 "budget_mb": DEMO_BUDGET_MB, "interactive_s_median": round(demo_ready, 3) if demo_ready else None},
        "load_average": os.getloadavg(),
        "browser": "headless Chromium (Debian package), DevTools pipe, 1400x900 window",
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "explorer.json", report)
    s, d = report["synthetic"], report["demo"]
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    md = ["# Neuron explorer: size and time-to-interactive", "",
          "| file | size | budget | interactive (median) | budget |", "|---|---:|---:|---:|---:|",
          f"| synthetic MonoBERT-large ({s['neurons']:,} neurons x {s['schemes']} schemes, exemplars of "
          f"{s['exemplar_neurons']} neurons) | {s['size_mb']} MB | {SIZE_BUDGET_MB} MB "
          f"({ok(size_mb <= SIZE_BUDGET_MB)}) | {s['interactive_s_median']} s | {INTERACTIVE_BUDGET_S} s "
          f"({ok(ready <= INTERACTIVE_BUDGET_S)}) |"]
    if d["size_mb"] is not None:
        md.append(f"| demo (`{d['path']}`) | {d['size_mb']} MB | {DEMO_BUDGET_MB} MB "
                  f"({ok(demo_mb <= DEMO_BUDGET_MB)}) | {d['interactive_s_median']} s | |")
    md += ["", f"Interactive = navigation start to heat map drawn and first table rows rendered "
               f"(`window.explorerReadyMs`), median of {args.repeats}: {s['interactive_s_runs']} s; wall time from "
               f"the navigate command: {s['wall_s_median']} s; sorting the table by another scheme afterwards: "
               f"{s['sort_other_scheme_ms_median']} ms. Load average while measuring: "
               f"{', '.join(f'{x:.1f}' for x in report['load_average'])}.", "", run_markdown(), ""]
    (RESULTS / "explorer.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if size_mb <= SIZE_BUDGET_MB and ready <= INTERACTIVE_BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
