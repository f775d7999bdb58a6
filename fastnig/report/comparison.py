"""Two runs side by side (the paper's §6: the ``pad`` run beside the ``zero`` baseline run).

Owns: :func:`compare_runs` / :class:`RunComparison` — the layer profile of N
and F of the in-domain dataset and Table 4 of both runs, as text and
Markdown (``fastnig compare RUN --with OTHER`` and the report's §6 section).
Must not: judge against the paper (:mod:`fastnig.report.scorecard`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from .run_folder import (
    PathLike,
    fmt_number,
    md_escape,
    read_csv,
    read_run_config,
    run_in_domain,
    table4_groups,
    to_float,
)

MID_LAYERS = (7, 12)
"""The paper's mid-layer peak, "spread across layers 7 to 12" of BERT-large's 24 (counted from 1); scaled to
other depths as layers [L x 6/24, L x 12/24) counted from 0."""


def _layer_totals(run_dir: Path, set_prefix: str) -> Tuple[str, Dict[int, int]]:
    rows = [r for r in read_csv(run_dir / "analysis" / "layers_components.csv") if r["set"].startswith(set_prefix)]
    name = rows[0]["set"] if rows else ""
    totals: Dict[int, int] = defaultdict(int)
    for r in rows:
        if r["set"] == name and int(to_float(r["layer"])) >= 0:
            totals[int(to_float(r["layer"]))] += int(to_float(r["count"]))
    return name, dict(totals)


def _shares(totals: Mapping[int, int]) -> Tuple[float, float]:
    """(% in the last two layers, % in the mid layers of :data:`MID_LAYERS`) of a layer profile."""
    total = sum(totals.values())
    if not total:
        return float("nan"), float("nan")
    n = max(totals) + 1
    lo, hi = round(n * (MID_LAYERS[0] - 1) / 24), round(n * MID_LAYERS[1] / 24)
    last = sum(c for l, c in totals.items() if l >= n - 2)
    mid = sum(c for l, c in totals.items() if lo <= l < hi)
    return last / total * 100, mid / total * 100


@dataclass
class RunComparison:
    """Two runs side by side: layer profiles of N / F of the in-domain dataset, and Table 4."""

    run_dir: Path
    other_dir: Path
    run_label: str
    other_label: str
    profiles: List[Dict[str, Any]] = field(default_factory=list)   # one per set: name, this, other (layer -> n)
    table4: List[Dict[str, Any]] = field(default_factory=list)     # set, level, group, this, other

    def to_markdown(self) -> str:
        """For report.md: the profile table, the peak shares, and Table 4 of both runs."""
        a, b = self.run_label, self.other_label
        md = [f"This run (`{self.run_dir}`, {a}) beside `{self.other_dir}` ({b}).", ""]
        if not self.profiles:
            md += ["_No layer profile (analysis/layers_components.csv) in one of the runs._", ""]
        for prof in self.profiles:
            last_a, mid_a = _shares(prof["this"])
            last_b, mid_b = _shares(prof["other"])
            md += [f"**Layer profile of {prof['set']}** (neurons per layer) — share in the last two layers: "
                   f"{last_a:.1f} % ({a}) vs {last_b:.1f} % ({b}); in the mid layers "
                   f"{prof['mid']}: {mid_a:.1f} % vs {mid_b:.1f} %", "",
                   f"| layer | {md_escape(a)} | {md_escape(b)} |", "|---|---|---|"]
            for layer in sorted(set(prof["this"]) | set(prof["other"])):
                md.append(f"| {layer} | {prof['this'].get(layer, 0)} | {prof['other'].get(layer, 0)} |")
            md.append("")
        if self.table4:
            md += ["**Table 4 of both runs** (% nDCG@10 drop, positive = worse, group means)", "",
                   f"| set | group | level | {md_escape(a)} | {md_escape(b)} | difference |",
                   "|---|---|---|---|---|---|"]
            for r in self.table4:
                diff = (r["this"] - r["other"]) if r["this"] is not None and r["other"] is not None else None
                md.append(f"| {md_escape(r['set'])} | {md_escape(r['group'])} | {r['level']:g}% | "
                          f"{fmt_number(r['this'])} | "
                          f"{fmt_number(r['other'])} | {'–' if diff is None else f'{diff:+.2f}'} |")
            spread = self.spread()
            if spread:
                md += ["", "Spread of the drops (largest − smallest set, per group and level): " + "; ".join(
                    f"{g} {l:g}%: {sa:.2f} ({a}) vs {sb:.2f} ({b})" for (g, l), (sa, sb) in spread.items())]
        else:
            md.append("_No Table 4 (pruning/table4.csv) in one of the runs._")
        return "\n".join(md) + "\n"

    def spread(self) -> Dict[Tuple[str, float], Tuple[float, float]]:
        """(group, level) -> (largest − smallest drop over sets) in this run and the other (both present)."""
        by: Dict[Tuple[str, float], List[Tuple[float, float]]] = defaultdict(list)
        for r in self.table4:
            if r["this"] is not None and r["other"] is not None:
                by[(r["group"], r["level"])].append((r["this"], r["other"]))
        return {k: (max(x for x, _ in v) - min(x for x, _ in v), max(y for _, y in v) - min(y for _, y in v))
                for k, v in sorted(by.items()) if len(v) > 1}

    def to_text(self) -> str:
        """For the terminal (the Markdown, tables included, reads as text)."""
        return self.to_markdown()


def _run_label(cfg: Mapping[str, Any], run_dir: Path) -> str:
    baseline = cfg.get("attribution", {}).get("baseline", "?")
    return f"{cfg.get('name') or run_dir.name}, baseline {baseline}"


def compare_runs(run_dir: PathLike, other_dir: PathLike) -> RunComparison:
    """Two finished runs side by side (the paper's §6: the ``pad`` run beside the ``zero`` baseline's).

    Layer profiles: N_x and F_x of each run's in-domain dataset at the
    analysed level (``analysis/layers_components.csv``); Table 4: every
    (set, level, group) of either run (``pruning/table4.csv``, group means).

    Raises:
        NotARunFolder: either folder is not a run folder.
    """
    run_dir, other_dir = Path(run_dir), Path(other_dir)
    cfg, other_cfg = read_run_config(run_dir), read_run_config(other_dir)
    comp = RunComparison(run_dir, other_dir, _run_label(cfg, run_dir), _run_label(other_cfg, other_dir))
    for prefix in ("N_", "F_"):
        name, mine = _layer_totals(run_dir, f"{prefix}{run_in_domain(cfg)}@")
        other_name, theirs = _layer_totals(other_dir, f"{prefix}{run_in_domain(other_cfg)}@")
        if mine or theirs:
            n = max(list(mine) + list(theirs)) + 1
            lo, hi = round(n * (MID_LAYERS[0] - 1) / 24), round(n * MID_LAYERS[1] / 24)
            comp.profiles.append({"set": name or other_name, "this": mine, "other": theirs,
                                  "mid": f"{lo}–{hi - 1}"})
    mine, _ = table4_groups(read_csv(run_dir / "pruning" / "table4.csv"))
    theirs, _ = table4_groups(read_csv(other_dir / "pruning" / "table4.csv"))
    if mine and theirs:
        for key in sorted(dict.fromkeys(list(mine) + list(theirs)), key=lambda k: (k[2], k[1])):
            comp.table4.append({"set": key[0], "level": key[1], "group": key[2],
                                "this": mine[key]["drop"] if key in mine else None,
                                "other": theirs[key]["drop"] if key in theirs else None})
    return comp
