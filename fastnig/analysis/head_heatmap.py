"""The layer × head heat map of a head scheme (mean head NIG), as CSV and PNG, and the top-X % head sets.

Owns: :func:`head_grid` (``[layers, heads]`` mean NIG from a head scheme or a
``{output projection: [heads]}`` mapping; T5's decoder and cross-attention
layers get rows of their own, named by the projection),
:func:`write_head_heatmap` and :func:`head_set_rows` / :func:`write_head_sets`
(each head scheme's top-X % heads, their ∩ over the datasets per label and
P_x ∩ N_x, with the :mod:`fastnig.neurons.sets` algebra).  Must not: attribute
or read run folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch

from ..engine.heads import head_layer
from ..neurons.head_schemes import head_label
from ..neurons.sets import NeuronSet, intersection
from .writers import new_figure, save_figure, write_csv

HEAD_SET_COLUMNS = ("level_percent", "set", "heads", "overlap_percent", "members")


def head_grid(means: Mapping[str, torch.Tensor]) -> Tuple[List[str], torch.Tensor]:
    """``(row names, [rows, heads])``: one row per attention layer (output projection), in model order."""
    names = list(means)
    if not names:
        raise ValueError("no heads to draw")
    width = max(int(means[n].numel()) for n in names)
    grid = torch.full((len(names), width), float("nan"), dtype=torch.float64)  # a scheme's means are float64
    for i, name in enumerate(names):
        values = means[name].detach().double().flatten()
        grid[i, :values.numel()] = values
    return names, grid


def _row_label(name: str) -> str:
    layer = head_layer(name)
    prefix = "dec " if "decoder" in name else ""
    cross = " (cross)" if "EncDecAttention" in name else ""
    return f"{prefix}L{layer}{cross}" if layer >= 0 else name


def write_head_heatmap(scheme_or_means, folder: Union[str, Path], name: str = "heads") -> Tuple[Path, Path]:
    """``<name>.csv`` (layer, head, mean NIG) and ``<name>.png`` (layers bottom to top, heads left to right,
    a diverging colour scale centred on 0) in ``folder``."""
    means = scheme_or_means.mean if hasattr(scheme_or_means, "mean") else scheme_or_means
    rows, grid = head_grid(means)
    folder = Path(folder)
    csv = write_csv([{"module": r, "layer": head_layer(r), "head": h, "mean_nig": float(grid[i, h])}
                     for i, r in enumerate(rows) for h in range(grid.shape[1]) if not torch.isnan(grid[i, h])],
                    folder / f"{name}.csv")
    fig = new_figure(1.2 + 0.45 * grid.shape[1], 1.2 + 0.4 * len(rows))
    ax = fig.add_subplot(111)
    limit = float(torch.nan_to_num(grid).abs().max()) or 1.0
    image = ax.imshow(grid.numpy(), origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_row_label(r) for r in rows], fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("head")
    ax.set_title(f"{name}: mean head NIG")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return csv, save_figure(fig, folder / f"{name}.png")


def _prefix(label: str) -> str:
    return "P" if label == "relevant" else "N"


def head_set_rows(schemes: Mapping[Tuple[str, str], object], levels: Sequence[float],
                  by: str = "value") -> List[Dict[str, object]]:
    """Rows of :data:`HEAD_SET_COLUMNS`: per level, each head scheme's top-X % heads (``P_x``, ``N_x``), then
    for each label the ∩ over the datasets that have it (``inter(A, P)``; ``overlap_percent`` = |∩| / |a set|
    x 100, every top set of a level having the same size) and each dataset's ``P_x & N_x``
    (:meth:`NeuronSet.overlap`); ``members`` lists the heads as ``L<layer>.h<head>``."""
    rows: List[Dict[str, object]] = []

    def row(level, name: str, members: NeuronSet, overlap="") -> None:
        rows.append({"level_percent": float(level), "set": name, "heads": len(members), "overlap_percent": overlap,
                     "members": " ".join(head_label(m, h) for m, h in members.neurons())})

    for level in levels:
        top = {key: scheme.top(level, by=by) for key, scheme in schemes.items()}
        for (dataset, label), members in top.items():
            row(level, f"{_prefix(label)}_{dataset}", members)
        for label in ("relevant", "non-relevant"):
            sets = [members for (_d, lab), members in top.items() if lab == label]
            if len(sets) > 1:
                common = intersection(*sets)
                row(level, f"inter(A, {_prefix(label)})", common,
                    len(common) / len(sets[0]) * 100 if len(sets[0]) else float("nan"))
        for (dataset, label), members in top.items():
            other = top.get((dataset, "non-relevant"))
            if label == "relevant" and other is not None:
                row(level, f"P_{dataset} & N_{dataset}", members & other, members.overlap(other))
    return rows


def write_head_sets(schemes: Mapping[Tuple[str, str], object], path: Union[str, Path], levels: Sequence[float],
                    by: str = "value") -> Path:
    """:func:`head_set_rows` as a CSV file."""
    return write_csv(head_set_rows(schemes, levels, by), path, HEAD_SET_COLUMNS)


__all__ = ("HEAD_SET_COLUMNS", "head_grid", "head_set_rows", "write_head_heatmap", "write_head_sets")
