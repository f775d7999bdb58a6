"""Through which part of the input the important neurons act: the segment analysis (issue 14).

Owns: the table and figure of :func:`segment_table`: for the top-X % set of
each scheme that kept per-segment sums (``attribute(..., segments=True)``),
per (layer, component), the share of the set's conductance that flows
through the query, the passage and the special tokens, and how many members
act mainly through each (``segments.csv``); and per layer, stacked bars of
those shares for P_x, N_x and F_x of one dataset (``segments_<x>_at_<X>pct.png``).
Must not: compute the shares per (layer, component) (:mod:`fastnig.neurons.segment_shares`;
here they are only pooled per layer for the figure), fuse or merge schemes
(:mod:`fastnig.analysis` hands over P_x, N_x, F_x, F_A), or attribute.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..common import PathLike
from ..data.registry import short_name
from ..engine.encoding import SEGMENTS
from ..neurons.scheme import Scheme
from ..neurons.segment_shares import segment_shares
from .writers import new_figure, save_figure, write_csv

Rows = List[Dict[str, object]]

SEGMENT_COLUMNS = (("set", "scheme", "level", "layer", "component", "neurons")
                   + tuple(f"{s}_share" for s in SEGMENTS) + ("magnitude",)
                   + tuple(f"{s}_dominant" for s in SEGMENTS) + SEGMENTS)
"""Columns of ``segments.csv``: ``<segment>`` = signed sum over the members of their mean NIG through
the segment (units of F), the rest as :func:`fastnig.neurons.segment_shares.segment_shares`."""
SEGMENTS_CSV = "segments.csv"
_SEGMENT_COLOR = {"query": "tab:blue", "passage": "tab:orange", "special": "tab:gray"}


def segment_figure_name(dataset: str, percent: float) -> str:
    """``segments_<short dataset name>_at_<percent>pct.png`` (e.g. ``segments_ms_at_1pct.png``)."""
    return f"segments_{short_name(dataset)}_at_{float(percent):g}pct.png"


def segment_table(schemes: Sequence[Scheme], out_dir: Optional[PathLike] = None, *, percent: float = 1.0,
                  by: str = "value") -> Rows:
    """Segment shares of the top ``percent`` % set of every scheme with segment means.

    Args:
        schemes: pair schemes and fusions (e.g. P_x, N_x, F_x, F_A); those
            without segment means (:attr:`Scheme.has_segments`) are left out.
        out_dir: where to write ``segments.csv`` (:data:`SEGMENT_COLUMNS`) and
            the figure of the first scheme's dataset: one panel per scheme of
            that dataset (its P, N and F), per layer stacked bars of the
            query / passage / special shares of the set's conductance, pooled
            over the components (weighted by ``magnitude``).  ``None``: only
            compute.  Nothing is written when no scheme has segment means.
        percent, by: the top set of each scheme (:meth:`Scheme.top`).

    Returns:
        rows with :data:`SEGMENT_COLUMNS`, per set sorted by layer then component
        (``layer`` -1 = outside the layer stack); empty without segment means.
    """
    chosen = [s for s in schemes if s.has_segments]
    rows: Rows = []
    for scheme in chosen:
        top = scheme.top(percent, by=by)
        rows += [{"set": top.name, "scheme": scheme.name, "level": float(percent), **row}
                 for row in segment_shares(scheme, top)]
    if out_dir is not None and rows:
        out_dir = Path(out_dir)
        write_csv(rows, out_dir / SEGMENTS_CSV, SEGMENT_COLUMNS)
        dataset = chosen[0].dataset
        panels = [s.name for s in chosen if s.dataset == dataset]
        _plot_segments(rows, panels, percent, out_dir / segment_figure_name(dataset, percent))
    return rows


def layer_shares(rows: Rows, scheme: str) -> Dict[int, List[float]]:
    """layer -> ``[3]`` shares (query, passage, special) of one scheme's set, pooled over components.

    Each (layer, component) row weighs by its ``magnitude``; a layer whose
    members carry no conductance gets zeros.
    """
    pooled: Dict[int, List[float]] = {}
    for row in rows:
        if row["scheme"] != scheme:
            continue
        sums = pooled.setdefault(int(row["layer"]), [0.0] * len(SEGMENTS))
        for i, name in enumerate(SEGMENTS):
            sums[i] += float(row[f"{name}_share"]) * float(row["magnitude"])
    return {layer: [v / sum(sums) if sum(sums) > 0 else 0.0 for v in sums] for layer, sums in sorted(pooled.items())}


def _plot_segments(rows: Rows, schemes: Sequence[str], percent: float, path: Path) -> Path:
    fig = new_figure(4.2 * len(schemes) + 1, 4.2)
    for k, scheme in enumerate(schemes):
        ax = fig.add_subplot(1, len(schemes), k + 1)
        shares = layer_shares(rows, scheme)
        layers = list(shares)
        positions = list(range(len(layers)))
        bottom = [0.0] * len(layers)
        for i, name in enumerate(SEGMENTS):
            heights = [shares[layer][i] for layer in layers]
            ax.bar(positions, heights, bottom=bottom, color=_SEGMENT_COLOR[name], label=name)
            bottom = [b + h for b, h in zip(bottom, heights)]
        members = {layer: sum(int(r["neurons"]) for r in rows if r["scheme"] == scheme and r["layer"] == layer)
                   for layer in layers}
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{'other' if layer < 0 else layer}\n{members[layer]}" for layer in layers])
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer (neurons of the set there)")
        if k == 0:
            ax.set_ylabel("share of the set's |conductance|")
        ax.set_title(f"{scheme}: top {float(percent):g} %")
    fig.axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)
