"""The report's "Heads" section (runs with ``attribution.heads: true``, docs/method.md §12).

Owns: reading what the head stages wrote — the layer × head heat maps
(``analysis/heads/heads_<P|N>_<x>.png``), the top-X % head sets
(``analysis/heads/head_sets.csv``) and the head-ablation table
(``heads/head_ablation.csv``) — into the section's Markdown, its figures and
captions (:func:`heads_section`), and its bullet line among the key numbers
(:func:`head_lines`).  Must not: compute results or lay out the rest of the report
(:mod:`fastnig.report.document`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .run_folder import md_escape, read_csv, to_float

TITLE = "Heads — mean head NIG per layer and head, top heads ablated vs random heads"


def head_figures(output: Path) -> List[Path]:
    """The heat maps of a run's head schemes, P before N, by dataset."""
    return sorted((Path(output) / "analysis" / "heads").glob("heads_*.png"),
                  key=lambda p: (p.stem.split("_", 2)[2:], p.stem.split("_")[1] != "P"))


def head_caption(png: Path) -> str:
    """The caption of a head heat map, from its file name (``heads_P_cran.png``)."""
    scheme = png.stem[len("heads_"):] if png.stem.startswith("heads_") else png.stem
    return (f"Heads (not in the paper) — mean head NIG of {scheme} (the head scheme: mean over its pairs of each "
            "head's conductance), layers bottom to top, heads left to right; red positive, blue negative")


def _pct(text: Any) -> str:
    value = to_float(text)
    return "" if value != value else f"{value:.2f}"


def _p(text: Any) -> str:
    value = to_float(text)
    return "" if value != value else f"{value:.3g}"


def _table(header: List[str], rows: List[List[str]], numeric: List[bool]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if n else "---|" for n in numeric)]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ablation_table(rows: List[Mapping[str, str]]) -> str:
    """The head-ablation rows as a Markdown table (drops in % of nDCG@10, positive = worse)."""
    header = ["set", "level %", "dataset", "heads", "drop %", "p", "random drop % (mean ± std)", "random sets",
              "p top vs random", "ablated heads"]
    body = [[r["set"], f"{to_float(r['level_percent']):g}", r.get("group") or r["dataset"], r["heads"],
             _pct(r.get("drop_top_percent")), _p(r.get("p_top")),
             (f"{_pct(r.get('drop_random_mean_percent'))} ± {_pct(r.get('drop_random_std_percent'))}"
              if _pct(r.get("drop_random_mean_percent")) else ""), r.get("repetitions", ""),
             _p(r.get("p_top_vs_random")), r.get("head_list", "")] for r in rows]
    return _table(header, body, [False, True, False, True, True, True, False, True, True, False])


def sets_table(rows: List[Mapping[str, str]]) -> str:
    """The top-X % head sets and their intersections as a Markdown table."""
    body = [[f"{to_float(r['level_percent']):g}", r["set"], r["heads"],
             "" if not str(r.get("overlap_percent", "")).strip() else f"{to_float(r['overlap_percent']):.1f}",
             r.get("members", "")] for r in rows]
    return _table(["level %", "set", "heads", "overlap %", "heads (L3.h7 = layer 3, head 7)"], body,
                  [True, False, True, True, False])


def heads_section(output: Path) -> Optional[Dict[str, Any]]:
    """The section (``title``, ``md``, ``figures``, ``caption``), or ``None`` when the run made no head schemes."""
    output = Path(output)
    figures = head_figures(output)
    sets = read_csv(output / "analysis" / "heads" / "head_sets.csv")
    ablation = read_csv(output / "heads" / "head_ablation.csv")
    if not (figures or sets or ablation):
        return None
    md = ["Attention heads as units (docs/method.md §12): a head's NIG is the conductance of its slice of the "
          "attention context (the output projection's input), summed over the slice; a head scheme is its mean "
          "over the same pairs as the neuron scheme. Files: `heads/schemes/`, `analysis/heads/`.", ""]
    if ablation:
        md += ["**Head ablation** (`heads/head_ablation.csv`): nDCG@10 % drop when the top heads of each set are "
               "zeroed (their slice of the output projection's input), paired t-test over queries against the "
               "original model (p), beside as many random heads (mean ± std over the random sets) and the paired "
               "t-test of the top heads' per-query nDCG against the per-query mean over the random sets "
               "(p top vs random).", "", ablation_table(ablation)]
    if sets:
        md += ["**Top-X % head sets** (`analysis/heads/head_sets.csv`; overlap % = |∩| / |a set|).", "",
               sets_table(sets)]
    return {"title": TITLE, "md": "\n".join(md), "figures": figures, "caption": head_caption}


def head_lines(output: Path) -> List[str]:
    """The bullet line of the head ablation among the key numbers: per row, the top heads' drop beside the
    random heads' mean; none without ``heads/head_ablation.csv``."""
    rows = [r for r in read_csv(Path(output) / "heads" / "head_ablation.csv") if _pct(r.get("drop_top_percent"))]
    if not rows:
        return []
    parts = "; ".join(f"{r['set']} at {to_float(r['level_percent']):g} % ({r['heads']} heads) "
                      f"{_pct(r['drop_top_percent'])} % vs random {_pct(r['drop_random_mean_percent'])} % "
                      f"(p vs random {_p(r['p_top_vs_random'])})" for r in rows[:4])
    return [f"**Head ablation** (nDCG@10 % drop, on {rows[0].get('group') or rows[0]['dataset']}): {parts}."]


__all__ = ("TITLE", "ablation_table", "head_caption", "head_figures", "head_lines", "heads_section", "sets_table")
