"""Table 1 of the paper as files: ``baselines.csv`` and its bar chart.

Owns: :func:`baseline_table`, the rows and figure of what
:func:`fastnig.evaluation.table1.baseline_differences` measured.  Must not:
run a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from ..common import PathLike
from .writers import Rows, new_figure, save_figure, write_csv

BASELINE_COLUMNS = ("baseline", "mean_difference", "original_difference", "quality", "pairs", "dataset")


TABLE1_FIGURE = "table1_baselines.png"


def baseline_table(differences: Mapping[str, float], out_dir: Optional[PathLike] = None, *,
                   pairs: Optional[int] = None, dataset: str = "") -> Rows:
    """Table 1 from :func:`baseline_differences`: ``baselines.csv`` and a bar chart ``table1_baselines.png``.

    One row per input (``original``) and baseline: ``mean_difference`` =
    mean P(rel) − P(non-rel) there (the paper's column), ``original_difference``
    = the same at the original input (beside each row), ``quality`` = their
    ratio; ``pairs`` / ``dataset`` say what it was averaged over.
    """
    if "original" not in differences:
        raise ValueError("differences must contain 'original' (use baseline_differences)")
    base = float(differences["original"])
    rows = [{"baseline": name, "mean_difference": float(d), "original_difference": base,
             "quality": float(d) / base if base else float("nan"), "pairs": "" if pairs is None else int(pairs),
             "dataset": dataset} for name, d in differences.items()]
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_csv(rows, out_dir / "baselines.csv", BASELINE_COLUMNS)
        fig = new_figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar([r["baseline"] for r in rows], [r["mean_difference"] for r in rows], color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(base, color="tab:red", linewidth=0.8, linestyle="--", label=f"original input ({base:.2f})")
        ax.set_ylabel("mean P(rel) − P(non-rel)")
        over = f" over {pairs} agreeing relevant pairs" if pairs else ""
        ax.set_title(f"Table 1 — baselines{over} (closer to 0 = signal erased)", fontsize="medium")
        ax.legend(fontsize="small")
        save_figure(fig, out_dir / TABLE1_FIGURE)
    return rows
