"""The paper's RQ1/RQ2 analyses: numbers, CSV tables and PNG figures.

Every analysis is a function that returns its numbers as a list of rows
(dicts, one per CSV line) and, given ``out_dir``, also writes the CSV and the
figure(s) there:

- :func:`pairwise_overlaps` — overlap % of the top-X % sets of every two
  datasets, per label, over pruning levels; in-domain/out-of-domain pairs
  (solid) vs out-of-domain/out-of-domain pairs (grey dashed): Figures 2a–d
  (``figure2a_…png``: relevant, 2b: relevant without ``exclude``, 2c / 2d:
  non-relevant).
- :func:`intersection_summary` — ∩ over the OOD datasets (∩_O), over all
  datasets (∩_A), per label, and P_x ∩ N_x per dataset: Figure 3.
- :func:`layer_component_counts` — members of neuron sets per layer and
  component: Figures 4a (N of the in-domain dataset) and 4b (its F).
- :func:`layer_profile` — members per layer of several sets (the pruned
  sets of Table 4): Figure 5.
- Table 1 lives in :mod:`fastnig.evaluation.table1`; CSV and figure plumbing in
  :mod:`fastnig.analysis.writers`.
- :func:`scheme_summary` — pairs, dropped pairs, convergence delta per scheme.
- the segment analysis (``segments.csv`` + figure, when the schemes kept
  per-segment sums) lives in :mod:`fastnig.analysis.segments`.
- :func:`analyze` — all of the above from a list of schemes (what
  ``fastnig analyze`` runs).

Schemes are identified by (dataset, label); a dataset is in-domain when its
name or docs/method.md §7 abbreviation equals ``in_domain`` (``"ms"`` by default).
Datasets are listed in-domain first, then by short name, whatever the order
the schemes were given in.
Percentages of a ∩ over several sets are |∩| / |one set| · 100 (all the sets
of one level have the same size).  Figures are drawn with matplotlib's Agg
canvas directly, so the caller's pyplot backend is left alone.
"""
from __future__ import annotations

import logging
import os
import re
from itertools import combinations
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..common import optional_import
from ..data.registry import short_name
from ..neurons.expressions import ExpressionError, evaluate
from ..neurons.fusion import fuse, fuse_all
from ..neurons.scheme import LABELS, RANK_BY, Scheme
from ..neurons.sets import COMPONENTS, OTHER_COMPONENTS, NeuronSet, intersection
from ..neurons.stability import stability_estimates
from .segments import segment_table
from .writers import level_axis, new_figure, save_figure, write_csv

DEFAULT_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Pruning levels (% of all neurons) of the overlap curves; the paper's 0.01, 0.1 and 1 among them."""

LABEL_SYMBOL = {"relevant": "P", "non-relevant": "N"}
_LABEL_COLOR = {"relevant": "tab:red", "non-relevant": "tab:purple"}
_COMPONENT_COLOR = {"query": "tab:blue", "key": "tab:orange", "value": "tab:green",
                    "attention_output": "tab:red", "intermediate": "tab:purple", "ff_output": "tab:brown",
                    "embeddings": "tab:gray", "pooler": "tab:olive", "other": "tab:cyan"}

PathLike = Union[str, os.PathLike]
Rows = List[Dict[str, object]]
log = logging.getLogger("fastnig.analysis")


# ------------------------------------------------------------------- helpers
def _matches(dataset: str, names: Iterable[str]) -> bool:
    names = set(names)
    return dataset in names or short_name(dataset) in names


def index_schemes(schemes: Iterable[Scheme], in_domain: str = "ms") -> Dict[Tuple[str, str], Scheme]:
    """``(dataset, label) -> Scheme``: in-domain datasets first, then by short name; P before N.

    Several schemes of one (dataset, label) — e.g. the parts of a split run —
    are merged (exactly; shared pair ids are refused).  All schemes must
    share model, modules and settings (except the target label); fused
    schemes are refused (give the P_x / N_x schemes; fusions are derived).
    """
    schemes = list(schemes)
    if not schemes:
        raise ValueError("schemes: give at least one Scheme")
    for s in schemes:
        if not isinstance(s, Scheme):
            raise TypeError(f"schemes: expected Scheme objects, got {type(s).__name__}")
        if s.is_fused:
            raise ValueError(f"schemes: {s.name} is a fusion; give the P_x / N_x schemes it was made from")
        if s.count == 0:
            raise ValueError(f"schemes: {s.name} has no pairs")
        schemes[0].check_compatible(s, same_data=False, op="analyse together")
    out: Dict[Tuple[str, str], Scheme] = {}
    for s in schemes:
        key = (s.dataset, s.label)
        out[key] = out[key].merge(s) if key in out else s
    return dict(sorted(out.items(), key=lambda kv: (not _matches(kv[0][0], [in_domain]), short_name(kv[0][0]),
                                                    kv[0][0], LABELS.index(kv[0][1]))))


class _TopCache:
    """Top-X % sets computed once per (scheme, level)."""

    def __init__(self, by: str):
        if by not in RANK_BY:
            raise ValueError(f"by must be one of {RANK_BY}, got {by!r}")
        self.by = by
        self._sets: Dict[Tuple[int, float], NeuronSet] = {}

    def __call__(self, scheme: Scheme, level: float) -> NeuronSet:
        key = (id(scheme), float(level))
        if key not in self._sets:
            self._sets[key] = scheme.top(level, by=self.by)
        return self._sets[key]


def _check_levels(levels) -> List[float]:
    try:
        levels = [float(x) for x in levels]
    except (TypeError, ValueError):
        raise TypeError(f"levels must be a list of percentages, got {levels!r}") from None
    if not levels or any(not 0 < x <= 100 for x in levels):
        raise ValueError(f"levels must be percentages in (0, 100], e.g. {list(DEFAULT_LEVELS)}; got {levels}")
    return sorted(set(levels))


def _suffix(exclude: Sequence[str]) -> str:
    return "" if not exclude else "_without_" + "-".join(_slug(x) for x in exclude)


def figure2_name(label: str, exclude: Sequence[str] = ()) -> str:
    """File name of a pairwise-overlap figure, numbered as the paper's Figure 2 (a/b relevant, c/d non-relevant;
    b and d without ``exclude``)."""
    letter = {("relevant", False): "a", ("relevant", True): "b", ("non-relevant", False): "c",
              ("non-relevant", True): "d"}[(label, bool(exclude))]
    return f"figure2{letter}_pairwise_overlap_{label}{_suffix(exclude)}.png"


def figure3_name(exclude: Sequence[str] = ()) -> str:
    """File name of the intersection summary (the paper's Figure 3; one file per ``exclude`` variant)."""
    return f"figure3_intersections{_suffix(exclude)}.png"


def _slug(text: str) -> str:
    text = text.replace("%", "pct").replace("@", "_at_").replace("⊕", "+").replace("∩", "cap").replace("|", "abs")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "set"


# ----------------------------------------------------------- Figures 2a-d
PAIRWISE_COLUMNS = ("label", "scheme_a", "scheme_b", "dataset_a", "dataset_b", "pair_kind", "level_percent",
                    "set_size", "common", "overlap_percent")


def pairwise_overlaps(schemes: Iterable[Scheme], out_dir: Optional[PathLike] = None, *,
                      levels: Sequence[float] = DEFAULT_LEVELS, in_domain: str = "ms",
                      exclude: Sequence[str] = (), by: str = "value") -> Rows:
    """Overlap % of the top-X % sets of every two datasets of one label (Figures 2a–d).

    Args:
        schemes: P_x / N_x schemes (see :func:`index_schemes`).
        out_dir: where to write ``pairwise_overlap<suffix>.csv`` and one
            figure per label (:func:`figure2_name`: ``figure2a_…`` relevant,
            ``figure2c_…`` non-relevant; ``figure2b`` / ``figure2d`` with
            ``exclude``); ``None`` = only compute.  ``<suffix>`` is
            ``_without_<x>-<y>`` when ``exclude`` is given.
        levels: pruning levels, % of all neurons of the model.
        in_domain: the in-domain dataset (name or abbreviation).
        exclude: datasets left out (names or abbreviations).
        by: ``"value"`` (signed mean, default) or ``"abs"``.

    Returns:
        rows with :data:`PAIRWISE_COLUMNS`: ``pair_kind`` is ``"ID-OOD"``
        when one dataset is in-domain, ``"OOD-OOD"`` otherwise (``"ID-ID"``
        if both); ``overlap_percent`` = |S_a ∩ S_b| / |S_a| · 100 (NaN when
        the level keeps no neuron).
    """
    levels = _check_levels(levels)
    index = index_schemes(schemes, in_domain)
    top = _TopCache(by)
    rows: Rows = []
    for label in LABELS:
        chosen = [(d, s) for (d, l), s in index.items() if l == label and not _matches(d, exclude)]
        for (da, sa), (db, sb) in combinations(chosen, 2):
            ids = _matches(da, [in_domain]) + _matches(db, [in_domain])
            kind = ("OOD-OOD", "ID-OOD", "ID-ID")[ids]
            for level in levels:
                a, b = top(sa, level), top(sb, level)
                rows.append({"label": label, "scheme_a": sa.name, "scheme_b": sb.name,
                             "dataset_a": short_name(da), "dataset_b": short_name(db), "pair_kind": kind,
                             "level_percent": level, "set_size": len(a), "common": len(a & b),
                             "overlap_percent": a.overlap(b)})
    if out_dir is not None:
        out_dir = Path(out_dir)
        suffix = _suffix(exclude)
        write_csv(rows, out_dir / f"pairwise_overlap{suffix}.csv", PAIRWISE_COLUMNS)
        for label in LABELS:
            label_rows = [r for r in rows if r["label"] == label]
            if label_rows:
                _plot_pairwise(label_rows, label, levels, exclude, out_dir / figure2_name(label, exclude))
    return rows


def _plot_pairwise(rows: Rows, label: str, levels: Sequence[float], exclude: Sequence[str], path: Path) -> Path:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    curves: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["scheme_a"], r["scheme_b"], r["pair_kind"]), []).append(
            (r["level_percent"], r["overlap_percent"]))
    ood_labelled = False
    for (a, b, kind), points in curves.items():
        x, y = zip(*sorted(points))
        if kind == "OOD-OOD":
            ax.plot(x, y, linestyle="--", color="0.6", linewidth=1,
                    label=None if ood_labelled else "OOD ∩ OOD pairs")
            ood_labelled = True
        else:
            ax.plot(x, y, linestyle="-", marker="o", markersize=3, linewidth=1.5, label=f"{a} ∩ {b}")
    level_axis(ax, levels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("overlap (% of a set)")
    symbol = LABEL_SYMBOL[label]
    title = f"Figure {path.name[6:8]} — {label} neurons: {symbol}_x ∩ {symbol}_y"
    if exclude:
        title += f" (without {', '.join(exclude)})"
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    return save_figure(fig, path)


# ------------------------------------------------------------------ Figure 3
INTERSECTION_COLUMNS = ("curve", "name", "label", "datasets", "level_percent", "set_size", "common", "percent")


def intersection_summary(schemes: Iterable[Scheme], out_dir: Optional[PathLike] = None, *,
                         levels: Sequence[float] = DEFAULT_LEVELS, in_domain: str = "ms",
                         exclude: Sequence[str] = (), by: str = "value") -> Rows:
    """∩_O, ∩_A per label and P_x ∩ N_x per dataset over pruning levels (Figure 3).

    Curves (``curve`` column):
        ``cap_O``: ∩ of the top sets of every out-of-domain dataset of the
        label (needs two or more); ``cap_A``: the same with the in-domain
        dataset too (only when there is one); ``P_cap_N``: P_x ∩ N_x for each
        dataset with both labels (``label`` = ``"both"``).
    ``percent`` = |∩| / |one set| · 100.  Files: ``intersections<suffix>.csv``
    and ``figure3_intersections<suffix>.png`` (arguments as in :func:`pairwise_overlaps`).
    """
    levels = _check_levels(levels)
    index = index_schemes(schemes, in_domain)
    top = _TopCache(by)
    rows: Rows = []

    def add(curve: str, name: str, label: str, members: List[Scheme], level: float) -> None:
        sets = [top(s, level) for s in members]
        common = len(intersection(*sets))
        size = len(sets[0])
        rows.append({"curve": curve, "name": name, "label": label,
                     "datasets": "+".join(short_name(s.dataset) for s in members), "level_percent": level,
                     "set_size": size, "common": common, "percent": common / size * 100 if size else float("nan")})

    for label in LABELS:
        symbol = LABEL_SYMBOL[label]
        all_sets = [s for (d, l), s in index.items() if l == label and not _matches(d, exclude)]
        ood = [s for s in all_sets if not _matches(s.dataset, [in_domain])]
        for level in levels:
            if len(ood) >= 2:
                add("cap_O", f"∩_O {symbol}", label, ood, level)
            if len(all_sets) >= 2 and len(all_sets) > len(ood):
                add("cap_A", f"∩_A {symbol}", label, all_sets, level)
    for (dataset, label), pos in index.items():
        if label != "relevant" or _matches(dataset, exclude) or (dataset, "non-relevant") not in index:
            continue
        neg = index[(dataset, "non-relevant")]
        for level in levels:
            add("P_cap_N", f"{pos.name} ∩ {neg.name}", "both", [pos, neg], level)
    if out_dir is not None:
        out_dir = Path(out_dir)
        suffix = _suffix(exclude)
        write_csv(rows, out_dir / f"intersections{suffix}.csv", INTERSECTION_COLUMNS)
        if rows:
            _plot_intersections(rows, levels, exclude, out_dir / figure3_name(exclude))
    return rows


def _plot_intersections(rows: Rows, levels: Sequence[float], exclude: Sequence[str], path: Path) -> Path:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    curves: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["curve"], r["name"], r["label"]), []).append((r["level_percent"], r["percent"]))
    pn_labelled = False
    for (curve, name, label), points in curves.items():
        x, y = zip(*sorted(points))
        if curve == "P_cap_N":
            ax.plot(x, y, linestyle=":", color="0.5", linewidth=1.2,
                    label=None if pn_labelled else "P_x ∩ N_x (each dataset)")
            pn_labelled = True
        else:
            ax.plot(x, y, linestyle="--" if curve == "cap_O" else "-", marker="o", markersize=3,
                    color=_LABEL_COLOR[label], label=name)
    level_axis(ax, levels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("neurons in the intersection (% of a set)")
    title = "Figure 3 — intersections of attribution schemes"
    if exclude:
        title += f" (without {', '.join(exclude)})"
    ax.set_title(title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


# -------------------------------------------------------------- Figures 4-5
LAYER_COLUMNS = ("set", "layer", "component", "count")


def figure4_name(set_name: str, in_domain: str = "ms") -> str:
    """File name of a per-layer-and-component chart: the paper's Figure 4a for N_<in-domain>, 4b for
    F_<in-domain> (``figure4a_layers_N_ms_at_1pct.png``); other sets ``layers_<set>.png`` (not in the paper)."""
    base = set_name.split("@")[0]
    number = {f"N_{in_domain}": "figure4a_", f"F_{in_domain}": "figure4b_"}.get(base, "") if in_domain else ""
    return f"{number}layers_{_slug(set_name)}.png"


def layer_component_counts(neuron_sets: Union[NeuronSet, Sequence[NeuronSet]],
                           out_dir: Optional[PathLike] = None, *, in_domain: str = "ms") -> Rows:
    """Members of each set per (layer, component), zeros included (Figures 4a/4b).

    Files: ``layers_components.csv`` (all sets) and one stacked bar chart per
    set, named by :func:`figure4_name` (Figure 4a = N of ``in_domain``, 4b =
    its F).  ``layer`` -1 = outside the layer stack.
    """
    if isinstance(neuron_sets, NeuronSet):
        neuron_sets = [neuron_sets]
    rows: Rows = []
    for s in neuron_sets:
        if not isinstance(s, NeuronSet):
            raise TypeError(f"neuron_sets: expected NeuronSet objects, got {type(s).__name__}")
        for (layer, comp), count in s.counts_by_layer_component().items():
            rows.append({"set": s.name, "layer": layer, "component": comp, "count": count})
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_csv(rows, out_dir / "layers_components.csv", LAYER_COLUMNS)
        for s in neuron_sets:
            _plot_layers(s, out_dir / figure4_name(s.name, in_domain))
    return rows


def _plot_layers(neuron_set: NeuronSet, path: Path) -> Path:
    counts = neuron_set.counts_by_layer_component()
    layers = sorted({layer for layer, _ in counts})
    present = [c for c in COMPONENTS + OTHER_COMPONENTS if any(comp == c for _, comp in counts)]
    fig = new_figure(max(6.0, 0.35 * len(layers) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(layers)))
    bottom = [0] * len(layers)
    for comp in present:
        heights = [counts.get((layer, comp), 0) for layer in layers]
        ax.bar(positions, heights, bottom=bottom, color=_COMPONENT_COLOR[comp], label=comp)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(positions)
    ax.set_xticklabels(["other" if layer < 0 else str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    MaxNLocator = optional_import("matplotlib.ticker", "for the figures").MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure = {"figure4a": "Figure 4a — ", "figure4b": "Figure 4b — "}.get(path.name[:8], "")
    ax.set_title(f"{figure}{neuron_set.name}: {len(neuron_set)} neurons per layer and component")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


FIGURE5 = "figure5_layers.png"
PROFILE_COLUMNS = ("set", "expression", "layer", "count")


def layer_profile(neuron_sets: Mapping[str, NeuronSet], out_dir: Optional[PathLike] = None) -> Rows:
    """Members of each set per layer, zeros included (the paper's Figure 5: important neurons per layer at 1 %).

    Args:
        neuron_sets: ``expression -> NeuronSet`` (e.g. the pruned sets of Table 4 at 1 %).
        out_dir: where to write ``layer_profile.csv`` and ``figure5_layers.png``
            (one line per set; ``None`` = only compute).

    Returns:
        rows with :data:`PROFILE_COLUMNS` (``layer`` -1 = outside the layer stack).
    """
    rows: Rows = []
    for expression, s in neuron_sets.items():
        if not isinstance(s, NeuronSet):
            raise TypeError(f"neuron_sets: expected NeuronSet values, got {type(s).__name__}")
        per_layer: Dict[int, int] = {}
        for (layer, _comp), count in s.counts_by_layer_component().items():
            per_layer[layer] = per_layer.get(layer, 0) + count
        for layer in sorted(per_layer):
            rows.append({"set": s.name, "expression": expression, "layer": layer, "count": per_layer[layer]})
    if out_dir is not None and rows:
        out_dir = Path(out_dir)
        write_csv(rows, out_dir / "layer_profile.csv", PROFILE_COLUMNS)
        fig = new_figure(8, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        for expression in neuron_sets:
            points = [(r["layer"], r["count"]) for r in rows if r["expression"] == expression and r["layer"] >= 0]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", markersize=3, linewidth=1.3, label=expression)
        ax.set_xlabel("layer")
        ax.set_ylabel("neurons in the set")
        percent = next(iter(neuron_sets.values())).name.split("@")[-1] if neuron_sets else ""
        ax.set_title(f"Figure 5 — important neurons per layer ({percent})")
        ax.legend(fontsize="small", ncol=2)
        save_figure(fig, out_dir / FIGURE5)
    return rows


# ------------------------------------------------------------------ summary
SUMMARY_COLUMNS = ("name", "dataset", "label", "model", "pairs", "dropped", "mean_abs_delta", "max_abs_delta",
                   "median_relative_delta", "baseline", "steps", "rule", "output", "max_length", "dtype")


STOPPING_COLUMNS = ("pairs_sampled", "stop_reason")
"""How many pairs were sampled and why attribution stopped (``extra["stopping"]``; empty for older schemes)."""


def stability_column(level: float) -> str:
    """``schemes.csv`` column of the stability estimate at ``level`` %: ``"stability@1%"``."""
    return f"stability@{float(level):g}%"


def scheme_summary(schemes: Iterable[Scheme], out_dir: Optional[PathLike] = None, *,
                   levels: Sequence[float] = DEFAULT_LEVELS, by: str = "value") -> Rows:
    """One row per scheme: pairs summed, pairs dropped by the agreement filter,
    convergence delta, settings, pairs sampled and why attribution stopped,
    and per level the stability estimate of its top-X % set
    (:func:`fastnig.neurons.stability.stability`: the fraction expected to stay if the
    pairs were doubled; NaN = not available, e.g. a scheme saved before
    schemes kept halves); file ``schemes.csv``."""
    levels = _check_levels(levels)
    rows: Rows = []
    for s in schemes:
        delta = s.delta_summary()
        stopping = s.extra.get("stopping") or {}
        estimates = stability_estimates(s, levels, by=by)
        rows.append({"name": s.name, "dataset": s.dataset, "label": s.label, "model": s.model, "pairs": s.count,
                     "dropped": s.num_dropped, "mean_abs_delta": delta["mean_abs_delta"],
                     "max_abs_delta": delta["max_abs_delta"], "median_relative_delta": delta["median_relative_delta"],
                     **{k: s.settings.get(k) for k in ("baseline", "steps", "rule", "output", "max_length", "dtype")},
                     "pairs_sampled": stopping.get("pairs_sampled", ""), "stop_reason": stopping.get("reason", ""),
                     **{stability_column(level): estimates[level] for level in levels}})
    if out_dir is not None:
        write_csv(rows, Path(out_dir) / "schemes.csv",
                  SUMMARY_COLUMNS + STOPPING_COLUMNS + tuple(stability_column(x) for x in levels))
    return rows


# ----------------------------------------------------------------- all of it
def standard_schemes(schemes: Iterable[Scheme], *, in_domain: str = "ms") -> List[Scheme]:
    """The schemes the paper looks at per layer: every P_x and N_x (:func:`index_schemes` order),
    F_x = P_x ⊕ N_x for each dataset with both labels, and F_A (with several schemes)."""
    index = index_schemes(schemes, in_domain)
    out = list(index.values())
    for (dataset, label), pos in index.items():
        if label == "relevant" and (dataset, "non-relevant") in index:
            out.append(fuse(pos, index[(dataset, "non-relevant")]))
    if len(index) > 1:
        out.append(fuse_all(index.values()))
    return out


def profile_sets(schemes: Iterable[Scheme], expressions: Optional[Sequence[str]] = None, percent: float = 1.0, *,
                 in_domain: str = "ms", by: str = "value") -> Dict[str, NeuronSet]:
    """``expression -> NeuronSet`` at ``percent`` for Figure 5.

    ``expressions`` = set expressions (:mod:`fastnig.neurons.expressions`; the
    run's pruned sets); default: P, N and F of ``in_domain`` and F_A.  Those
    the schemes cannot build (e.g. no N of the dataset) are left out.
    """
    index = index_schemes(schemes, in_domain)
    exprs = list(expressions) if expressions else [f"P_{in_domain}", f"N_{in_domain}", f"F_{in_domain}", "F_A"]
    out: Dict[str, NeuronSet] = {}
    for expr in exprs:
        try:
            out[expr] = evaluate(expr, index, percent, in_domain=[in_domain], by=by, name=f"{expr}@{percent:g}%")
        except (ExpressionError, KeyError):
            continue
    return out


def analyze(schemes: Iterable[Scheme], out_dir: PathLike, *, levels: Sequence[float] = DEFAULT_LEVELS,
            in_domain: str = "ms", exclude: Sequence[str] = (), by: str = "value",
            layer_percent: float = 1.0, profile: Optional[Sequence[str]] = None) -> Dict[str, Rows]:
    """Every scheme analysis into ``out_dir``; returns ``{table name: rows}``.

    Writes ``schemes.csv``; ``pairwise_overlap.csv`` + Figures 2a/2c and
    ``intersections.csv`` + Figure 3 over all datasets, and again with the
    ``_without_<...>`` suffix (Figures 2b/2d, Figure 3 without) when
    ``exclude`` is given; ``layers_components.csv`` + one chart per top
    ``layer_percent`` % set of :func:`standard_schemes` (Figures 4a/4b for N
    and F of ``in_domain``); ``layer_profile.csv`` + Figure 5 for the sets
    ``profile`` (set expressions, default :func:`profile_sets`'s); and, when
    the schemes kept per-segment sums, ``segments.csv`` + the segment figure
    (:func:`fastnig.analysis.segments.segment_table`, at ``layer_percent``).
    """
    schemes = list(schemes)
    index = index_schemes(schemes, in_domain)
    merged = list(index.values())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: Dict[str, Rows] = {"schemes": scheme_summary(merged, out_dir, levels=levels, by=by)}
    variants = [()] + ([tuple(exclude)] if exclude else [])
    for ex in variants:
        suffix = _suffix(ex)
        tables[f"pairwise_overlap{suffix}"] = pairwise_overlaps(merged, out_dir, levels=levels,
                                                                in_domain=in_domain, exclude=ex, by=by)
        tables[f"intersections{suffix}"] = intersection_summary(merged, out_dir, levels=levels,
                                                                in_domain=in_domain, exclude=ex, by=by)
    standard = standard_schemes(merged, in_domain=in_domain)
    tables["layers_components"] = layer_component_counts(
        [s.top(layer_percent, by=by) for s in standard], out_dir, in_domain=in_domain)
    if any(s.has_segments for s in standard):
        tables["segments"] = segment_table(standard, out_dir, percent=layer_percent, by=by)
    else:
        log.info("no per-segment sums in the schemes (attribution.segments / --segments): no segments.csv")
    tables["layer_profile"] = layer_profile(
        profile_sets(merged, profile, layer_percent, in_domain=in_domain, by=by), out_dir)
    return tables
