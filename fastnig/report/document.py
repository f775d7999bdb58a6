"""The run report: ``report.md`` and a self-contained ``report.html``.

Reads what the stages wrote into the output folder (schemes summary, the
analysis CSVs and PNGs, Table 1, Table 4, timings) and lays it out for a
reader going top-down: what was found first (key numbers, the reproduction
scorecard, the figures in the paper's numbering), then the tables, the §6
comparison with another run (``compare_with``), and last the schemes,
settings and timings.  The HTML embeds every figure (base64), so the one
file can be mailed or archived.

Owns: the layout of ``report.md`` / ``report.html`` and the figure captions.
Must not: run models or compute results (it reads and summarises what the
stages wrote; the scorecard is :mod:`fastnig.report.scorecard`'s).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from ..common import write_atomic
from ..engine.encoding import SEGMENTS
from .comparison import compare_runs
from .heads_section import head_lines, heads_section
from .markdown import md_to_html
from .run_folder import NotARunFolder, md_escape, read_csv, table4_summary
from .scorecard import scorecard

FIGURES = (  # (file glob, caption), in the paper's order; {x} = what follows the figure number in the name
    ("figure2a_*.png", "Figure 2a — relevant neurons: overlap of P_x and P_y for every two datasets "
                       "(solid: in-domain vs OOD, grey dashed: OOD vs OOD)"),
    ("figure2b_*.png", "Figure 2b — relevant neurons, without {without}"),
    ("figure2c_*.png", "Figure 2c — non-relevant neurons: overlap of N_x and N_y for every two datasets "
                       "with non-relevant judgments"),
    ("figure2d_*.png", "Figure 2d — non-relevant neurons, without {without}"),
    ("figure3_*.png", "Figure 3 — ∩ over the OOD datasets (∩_O) and over all (∩_A) per label, and P_x ∩ N_x "
                      "for each dataset{without_suffix}"),
    ("figure4a_*.png", "Figure 4a — {set} per layer and component"),
    ("figure4b_*.png", "Figure 4b — {set} per layer and component"),
    ("figure5_*.png", "Figure 5 — number of important neurons at each layer (the pruned sets)"),
    ("table1_*.png", "Table 1 (chart) — mean P(rel) − P(non-rel) at the input and at each baseline"),
    ("layers_*.png", "Per layer and component (not a figure of the paper) — {set}"),
    ("segments_*.png", "Segments (not in the paper) — per layer, the share of the top sets' |conductance| "
                       "through the query, the passage and the special tokens"),
)


def figure_caption(png: Path) -> str:
    """The caption of an analysis figure, numbered as in the paper (from its file name)."""
    name = png.stem
    without = name.split("_without_")[1].replace("-", ", ") if "_without_" in name else ""
    set_name = name.split("layers_", 1)[1].replace("_at_", " at top ").replace("pct", " %") if "layers_" in name else ""
    for pattern, caption in FIGURES:
        if png.match(pattern):
            return caption.format(without=without, set=set_name,
                                  without_suffix=f" (without {without})" if without else "")
    return name


def _read_csv(path: Path) -> List[Dict[str, str]]:
    return read_csv(path)  # a truncated or damaged file is an error naming it, not a wrong number


def _md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GFM table of ``columns`` (those empty in every row left out); numbers right-aligned."""
    columns = [c for c in columns if any(str(r.get(c, "") or "").strip() for r in rows)]
    if not rows or not columns:
        return "_(none)_\n"
    numeric = [all(str(r.get(c, "")).strip() == "" or _is_number(r.get(c)) for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "".join("---:|" if n else "---|" for n in numeric)]
    for r in rows:
        lines.append("| " + " | ".join(md_escape(_fmt(r.get(c, ""))) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _fmt(value: Any) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if f.is_integer() and abs(f) < 1e9:
        return str(int(f))
    return f"{f:.4g}"


def _figures(analysis: Path) -> List[Path]:
    seen: List[Path] = []
    for pattern, _caption in FIGURES:
        for png in sorted(analysis.glob(pattern)):
            if png not in seen:
                seen.append(png)
    return seen


def _in_domain(settings: Mapping[str, Any]) -> str:
    in_domain = settings.get("attribution", {}).get("in_domain") or []
    return str(in_domain[0]) if isinstance(in_domain, list) and in_domain else str(in_domain or "")


def _num(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def key_numbers(output: Path, settings: Mapping[str, Any]) -> List[str]:
    """Bullet lines of the headline numbers: P_x ∩ N_x, the strongest pruning drops against random,
    the layer peak of N / F of the in-domain dataset, the segments (:func:`segment_lines`), and Table
    1's input and PAD values."""
    analysis, lines = output / "analysis", []
    in_domain = _in_domain(settings)
    layer_percent = _num(settings.get("analysis", {}).get("layer_percent", 1))
    pn = [r for r in _read_csv(analysis / "intersections.csv") if r.get("curve") == "P_cap_N"]
    if pn:
        levels = sorted({_num(r["level_percent"]) for r in pn})
        level = min(levels, key=lambda x: abs(x - layer_percent))
        at = [r for r in pn if _num(r["level_percent"]) == level]
        parts = ", ".join(f"{r['datasets'].split('+')[0]} {_num(r['percent']):.1f} %" for r in at)
        worst = max(pn, key=lambda r: _num(r["percent"]))
        lines.append(f"**P_x ∩ N_x** at {level:g} % (share of a set): {parts}; largest at any level "
                     f"{_num(worst['percent']):.1f} % ({worst['name']} at {_num(worst['level_percent']):g} %).")
    summary, _random = table4_summary(_read_csv(output / "pruning" / "table4.csv"))
    if summary:
        top_level = max(level for _s, level, _g in summary)
        for group in sorted({g for _s, l, g in summary if l == top_level}):
            best = sorted(((v["drop"], s, v) for (s, l, g), v in summary.items() if l == top_level and g == group),
                          key=lambda x: -x[0])[:3]
            parts = "; ".join(f"{s} {d:.2f} % (random {v['random']:.2f} %"
                              + (f", {v['significant']} significant" if v["significant"] else "") + ")"
                              for d, s, v in best)
            lines.append(f"**Strongest pruning drops** at {top_level:g} % on {group} (nDCG@10 % drop): {parts}.")
    layers = _read_csv(analysis / "layers_components.csv")
    for prefix in ("N_", "F_"):
        rows = [r for r in layers if in_domain and r["set"].startswith(f"{prefix}{in_domain}@")]
        if not rows:
            continue
        per_layer: Dict[int, int] = {}
        for r in rows:
            layer = int(_num(r["layer"]))
            if layer >= 0:
                per_layer[layer] = per_layer.get(layer, 0) + int(_num(r["count"]))
        if per_layer and sum(per_layer.values()):
            n = max(per_layer) + 1
            peak = max(per_layer, key=lambda l: (per_layer[l], l))
            last = sum(c for l, c in per_layer.items() if l >= n - 2) / sum(per_layer.values()) * 100
            lines.append(f"**Layer peak** of {rows[0]['set']}: layer {peak} of 0–{n - 1} ({per_layer[peak]} neurons); "
                         f"{last:.0f} % of the set in the last two layers.")
    lines += segment_lines(output, settings)
    t1 = {r["baseline"]: r for r in _read_csv(analysis / "baselines.csv")}
    if "original" in t1:
        pad = f", PAD {_num(t1['pad']['mean_difference']):.2f}" if "pad" in t1 else ""
        zero = f", zero {_num(t1['zero']['mean_difference']):.2f}" if "zero" in t1 else ""
        over = f" over {t1['original'].get('pairs')} agreeing relevant pairs" if t1["original"].get("pairs") else ""
        lines.append(f"**Table 1**: mean P(rel) − P(non-rel){over} = {_num(t1['original']['mean_difference']):.2f} "
                     f"at the input{pad}{zero} (the paper: 1, 0.21, 0.67).")
    return lines


def segment_lines(output: Path, settings: Mapping[str, Any]) -> List[str]:
    """The bullet line of the segment analysis (``analysis/segments.csv``, runs with
    ``attribution.segments``): of the top sets P and N of the in-domain dataset, the share of neurons
    that act mainly through the query, the passage and the special tokens; none without the CSV."""
    in_domain = _in_domain(settings)
    rows = _read_csv(output / "analysis" / "segments.csv")
    parts = []
    for prefix in ("P_", "N_"):
        chosen = [r for r in rows if in_domain and r["set"].startswith(f"{prefix}{in_domain}@")]
        counts = {s: sum(int(_num(r[f"{s}_dominant"])) for r in chosen) for s in SEGMENTS}
        total = sum(counts.values())
        if total:
            ranked = sorted(SEGMENTS, key=lambda s: -counts[s])
            shares = ", ".join(f"{counts[s] / total * 100:.0f} %" + (" act mainly" if i == 0 else "")
                               + f" through the {s}{' tokens' if s == 'special' else ''}"
                               for i, s in enumerate(ranked))
            parts.append(f"of the {total} neurons of {chosen[0]['set']}, {shares}")
    if not parts:
        return []
    return ["**Segments**: " + "; ".join(parts) + " (a neuron's segment: the one of its largest |mean NIG|)."]


def evidence_lines(output: Path) -> List[str]:
    """Bullet lines on what the findings stand on: the model's own ranking quality (``model_quality.json``,
    written for the offline demo model) and the evidence counts (agreeing pairs per scheme, validation
    queries, random repetitions) read from ``analysis/schemes.csv`` and ``pruning/table4.csv``."""
    lines = []
    quality_path = output / "model_quality.json"
    if quality_path.exists():
        q = json.loads(quality_path.read_text())
        steps = q.get("training", {}).get("settings", {}).get("steps")
        trained = f"; fine-tuned {steps} steps on the other {q.get('train_queries')} queries" if steps else ""
        lines.append(f"**Model quality** ({q.get('dataset')}, {q['queries']} held-out queries, BM25 top "
                     f"{q['depth']} reranked{trained}): nDCG@{q['k']} **{_num(q['ndcg']):.3f}**, BM25 "
                     f"{_num(q['bm25_ndcg']):.3f}, random order {_num(q['random_ndcg']):.3f} "
                     f"(mean of {q['random_orders']} permutations).")
    schemes = [r for r in _read_csv(output / "analysis" / "schemes.csv") if r.get("pairs")]
    table4 = _read_csv(output / "pruning" / "table4.csv")
    if schemes or table4:
        parts = []
        if schemes:
            parts.append("agreeing pairs per scheme: " + ", ".join(f"{r['name']} {r['pairs']}" for r in schemes))
        for dataset in dict.fromkeys(r.get("dataset", "") for r in table4):
            rows = [r for r in table4 if r.get("dataset", "") == dataset]
            parts.append(f"pruning on {dataset}: {rows[0].get('num_queries')} queries "
                         f"({rows[0].get('num_candidates')} candidate pairs), random baseline = "
                         f"{rows[0].get('random_repetitions')} random sets per row, paired t-test per query")
        lines.append("**Evidence**: " + "; ".join(parts) + ".")
    return lines


def _comparison_section(output: Path, settings: Mapping[str, Any]) -> str:
    other = Path(str(settings["compare_with"]))
    if not other.is_absolute() and not other.exists():
        other = output.parent / other.name if (output.parent / other.name).exists() else other
    try:
        return compare_runs(output, other).to_markdown()
    except NotARunFolder as exc:
        return f"`compare_with: {settings['compare_with']}` — no finished run there yet ({exc}).\n"


def write_report(output: Path, settings: Mapping[str, Any], timings: Mapping[str, float],
                 throughput: Mapping[str, float]) -> Dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``output``; returns their paths.

    Order: key numbers, the reproduction scorecard (also written as
    ``scorecard.md`` / ``.csv``), the figures (paper numbering), Table 1,
    Table 4, the heads (:mod:`fastnig.report.heads_section`; runs with
    ``attribution.heads``), the §6 comparison when ``settings["compare_with"]`` names another
    run folder, the attribution schemes, and last the settings and timings.
    """
    output = Path(output)
    analysis = output / "analysis"
    pruning = output / "pruning"
    sections: List[Dict[str, Any]] = []

    found = key_numbers(output, settings) + head_lines(output) + evidence_lines(output)
    card = None
    try:
        card = scorecard(output)
        card.write(output)
    except NotARunFolder:
        pass
    if card is not None:
        n = card.counts()
        setup = "the paper's setup" if card.paper_setup else "not the paper's setup"
        found.insert(0, f"**Reproduction scorecard**: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['N.A.']} N.A. of the "
                        f"paper's qualitative claims ({setup}; details below).")
    figures = _figures(analysis)
    if figures:
        found.append("**Figures**: " + ", ".join(figure_caption(p).split(" — ")[0] for p in figures
                                                 if p.name.startswith(("figure", "table1"))) + " (below).")
    if (output / "explorer.html").exists():
        found.append("**Neuron explorer**: [explorer.html](explorer.html) — every neuron, its sets, ranks and exemplar "
                     "pairs, in one file that opens offline (`fastnig explore`).")
    sections.append({"title": "What was found", "md": "\n".join(f"- {line}" for line in found) + "\n"
                     if found else "_(no results yet)_\n"})
    if card is not None:
        sections.append({"title": "Reproduction scorecard", "md": card.to_markdown()})
    sections.append({"title": "Figures", "figures": figures, "md": "" if figures else "_(none)_\n"})
    table1 = _read_csv(analysis / "baselines.csv")
    if table1:
        sections.append({"title": "Table 1 — baselines: mean P(rel) − P(non-rel), original input beside each",
                         "md": _md_table(table1, ["baseline", "mean_difference", "original_difference", "quality",
                                                  "pairs", "dataset"])})
    table4_md = pruning / "table4.md"
    if table4_md.exists():
        sections.append({"title": "Table 4 — % drop of nDCG@10 when pruning (positive = worse)",
                         "md": table4_md.read_text() + "\nFull numbers (random baseline, p-values): "
                                                       "`pruning/table4.csv`.\n"})
    heads = heads_section(output)
    if heads is not None:
        sections.append(heads)
    if settings.get("compare_with"):
        sections.append({"title": "§6 — this run beside another (impact of the baseline)",
                         "md": _comparison_section(output, settings)})
    schemes = _read_csv(analysis / "schemes.csv")
    cols = ["name", "pairs", "dropped", "mean_abs_delta", "max_abs_delta", "median_relative_delta"]
    sections.append({"title": "Attribution schemes and convergence delta", "md": _md_table(schemes, cols)})
    stability_cols = [c for c in (schemes[0] if schemes else {}) if c.startswith("stability@")]
    if stability_cols:
        note = ("\nstability@X% = estimated fraction of the scheme's top-X % set that would stay in it if the "
                "pairs were doubled (split-half estimate, docs/method.md §6.6; empty or nan = not available). "
                "pairs_sampled / stop_reason: pairs drawn before the agreement filter and why attribution "
                "stopped (stable = early-stopping rule met).\n")
        sections.append({"title": "Pairs used and stability of the top-X % sets",
                         "md": _md_table(schemes, ["name", "pairs", "pairs_sampled", "stop_reason"] + stability_cols)
                         + note})
    sections.append({"title": "Settings", "md": "```json\n" + json.dumps(settings, indent=2, default=str) + "\n```\n"})
    timing_rows = [{"stage": k, "value": v} for k, v in {**timings, **throughput}.items()]
    sections.append({"title": "Timings", "md": _md_table(timing_rows, ["stage", "value"])})

    md = ["# fastnig report" + (f": {settings.get('name')}" if settings.get("name") else ""), ""]
    for s in sections:
        md += [f"## {s['title']}", "", s["md"]]
        caption = s.get("caption", figure_caption)
        for png in s.get("figures", ()):
            md += [f"**{caption(png)}** ({png.name})", "",
                   f"![{png.stem}]({png.relative_to(output).as_posix()})", ""]
    md_path = output / "report.md"
    write_atomic(md_path, "\n".join(md))

    body = [f"<h1>fastnig report{(': ' + html.escape(str(settings.get('name')))) if settings.get('name') else ''}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s['title'])}</h2>")
        body.append(md_to_html(s["md"]))
        caption = s.get("caption", figure_caption)
        for png in s.get("figures", ()):
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f"<figure><img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'/>"
                        f"<figcaption>{html.escape(caption(png))} ({html.escape(png.name)})</figcaption>"
                        f"</figure>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fastnig report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
            "td.num,th.num,td[style*=right],th[style*=right]{text-align:right;font-variant-numeric:tabular-nums}"
            "img{max-width:100%}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    html_path = output / "report.html"
    write_atomic(html_path, page)
    return {"md": md_path, "html": html_path}
