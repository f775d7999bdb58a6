"""Writing what the analyses compute: CSV tables and matplotlib figures.

Owns: the CSV dialect of every analysis table (:func:`write_csv`: UTF-8,
header, floats at full precision) and the figure plumbing (:func:`new_figure`
on matplotlib's Agg canvas, so the caller's pyplot backend is left alone;
:func:`save_figure`; :func:`level_axis`).  Must not: compute anything.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..common import PathLike, optional_import

Rows = List[Dict[str, Any]]


def write_csv(rows: Rows, path: PathLike, columns: Optional[Sequence[str]] = None) -> Path:
    """Write rows (dicts) to a UTF-8 CSV with a header; floats at full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def new_figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib figure on the Agg canvas (the caller's pyplot backend is left alone)."""
    canvas = optional_import("matplotlib.backends.backend_agg", "for the figures").FigureCanvasAgg
    fig = optional_import("matplotlib.figure", "for the figures").Figure(figsize=(width, height), dpi=110)
    canvas(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Lay out and write ``fig`` as a PNG at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def level_axis(ax, levels: Sequence[float]) -> None:
    """A log x axis ticked at the pruning levels (percent of all neurons)."""
    ax.set_xscale("log")
    ax.set_xticks(levels)
    ax.set_xticklabels([f"{x:g}" for x in levels], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("top neurons kept (% of all neurons, log scale)")
