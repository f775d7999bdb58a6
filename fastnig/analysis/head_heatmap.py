"""The layer × head heat map of a head scheme (mean head NIG), as CSV and PNG.

Owns: :func:`head_grid` (``[layers, heads]`` mean NIG from a head scheme or a
``{output projection: [heads]}`` mapping; T5's decoder and cross-attention
layers get rows of their own, named by the projection) and
:func:`write_head_heatmap`.  Must not: attribute or read run folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Tuple, Union

import torch

from ..engine.heads import head_layer
from .writers import new_figure, save_figure, write_csv


def head_grid(means: Mapping[str, torch.Tensor]) -> Tuple[List[str], torch.Tensor]:
    """``(row names, [rows, heads])``: one row per attention layer (output projection), in model order."""
    names = list(means)
    if not names:
        raise ValueError("no heads to draw")
    width = max(int(means[n].numel()) for n in names)
    grid = torch.full((len(names), width), float("nan"))
    for i, name in enumerate(names):
        values = means[name].detach().float().flatten()
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


__all__ = ("head_grid", "write_head_heatmap")
