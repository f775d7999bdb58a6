"""The run report: ``report.md`` and a self-contained ``report.html``.

Reads what the stages wrote into the output folder (schemes summary, the
analysis CSVs and PNGs, Table 1, Table 4, timings) and lays it out in the
order of the paper.  The HTML embeds every figure (base64), so the one file
can be mailed or archived.

Owns: the layout of ``report.md`` / ``report.html``.  Must not: compute
anything (it lays out what the stages wrote).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from ..common import write_atomic

FIGURES = (  # (file glob, caption), in the paper's order
    ("baselines.png", "Table 1 — baseline quality: mean P(rel) − P(non-rel) relative to the input"),
    ("pairwise_overlap_*.png", "Figure 2 — pairwise overlap of the top-X % sets (solid: in-domain vs OOD)"),
    ("intersections*.png", "Figure 3 — intersections over OOD (O) and all (A) datasets, and P_x ∩ N_x"),
    ("layers_*.png", "Figure 5 — neurons per layer and component"),
)


def _read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "_(none)_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if f.is_integer() and abs(f) < 1e9:
        return str(int(f))
    return f"{f:.4g}"


def write_report(output: Path, settings: Mapping[str, Any], timings: Mapping[str, float],
                 throughput: Mapping[str, float]) -> Dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``output``; returns their paths."""
    output = Path(output)
    analysis = output / "analysis"
    pruning = output / "pruning"
    sections: List[Dict[str, Any]] = []

    sections.append({"title": "Settings", "md": "```json\n" + json.dumps(settings, indent=2, default=str) + "\n```\n"})
    schemes = _read_csv(analysis / "schemes.csv")
    cols = ["name", "pairs", "dropped", "mean_abs_delta", "max_abs_delta", "median_relative_delta"]
    sections.append({"title": "Attribution schemes and convergence delta", "md": _md_table(schemes, cols)})
    table1 = _read_csv(analysis / "baselines.csv")
    if table1:
        sections.append({"title": "Table 1 — baselines",
                         "md": _md_table(table1, ["baseline", "mean_difference", "quality"])})
    table4_md = pruning / "table4.md"
    if table4_md.exists():
        sections.append({"title": "Table 4 — % drop of nDCG@10 when pruning (positive = worse)",
                         "md": table4_md.read_text() + "\nFull numbers (random baseline, p-values): "
                                                       "`pruning/table4.csv`.\n"})
    figures = []
    for pattern, caption in FIGURES:
        for png in sorted(analysis.glob(pattern)):
            figures.append((png, caption))
    timing_rows = [{"stage": k, "value": v} for k, v in {**timings, **throughput}.items()]
    sections.append({"title": "Timings", "md": _md_table(timing_rows, ["stage", "value"])})

    md = ["# fastnig report" + (f": {settings.get('name')}" if settings.get("name") else ""), ""]
    for s in sections:
        md += [f"## {s['title']}", "", s["md"]]
    if figures:
        md += ["## Figures", ""]
        for png, caption in figures:
            md += [f"**{caption}** ({png.name})", "", f"![{png.stem}]({png.relative_to(output).as_posix()})", ""]
    md_path = output / "report.md"
    write_atomic(md_path, "\n".join(md))

    body = [f"<h1>fastnig report{(': ' + html.escape(str(settings.get('name')))) if settings.get('name') else ''}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s['title'])}</h2>")
        body.append(_md_to_html(s["md"]))
    if figures:
        body.append("<h2>Figures</h2>")
        for png, caption in figures:
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f"<figure><img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'/>"
                        f"<figcaption>{html.escape(caption)} ({html.escape(png.name)})</figcaption></figure>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fastnig report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    html_path = output / "report.html"
    write_atomic(html_path, page)
    return {"md": md_path, "html": html_path}


def _md_to_html(md: str) -> str:
    """The small Markdown subset the report uses: tables, code blocks, paragraphs."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i].replace("|", "").strip()) <= set("-: "):
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            if rows:
                head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
            i += 1
        else:
            i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"&lt;u&gt;(.+?)&lt;/u&gt;", r"<u>\1</u>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return text
