"""Table 4 of the paper: pruning results as rows, and their CSV, Markdown and LaTeX forms.

Owns: :data:`CSV_COLUMNS`, :class:`PruningTable` (rows of set x level x
dataset; reading and writing ``table4.csv``; the per-group summary; the
paper's layout with bold / underlined marks), and the strict parsing of
``table4.csv`` (:func:`parse_table4_rows`): a truncated or damaged file is
refused with the file and line named, never read as a wrong number.  Every
file is written atomically (:func:`fastnig.common.write_atomic`): a write
killed or failing half-way leaves the previous file.

Must not: run models or compute metrics (it renders what
:mod:`fastnig.evaluation.pruning` measured); depends on the standard library, NumPy and
:mod:`fastnig.common` only.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from ..common import CorruptFile, write_atomic

CSV_COLUMNS = (
    "set", "level_percent", "dataset", "group", "num_neurons", "num_queries", "num_candidates",
    "ndcg_original", "ndcg_pruned", "drop_percent", "p_value", "significant",
    "random_repetitions", "random_ndcg_mean", "random_drop_mean", "random_drop_std", "random_significant",
)


_INT_COLUMNS = ("num_neurons", "num_queries", "num_candidates", "random_repetitions", "random_significant")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_cell(column: str, text: str):
    if column in ("set", "dataset", "group"):
        return text
    if column == "significant":
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(f"not a truth value: {text!r}")
        return word in _TRUE
    if column in _INT_COLUMNS:
        return int(text)
    return float(text)


def parse_table4_rows(text: str, where) -> List[Dict[str, Any]]:
    """Rows of a ``table4.csv`` (its text), typed; :class:`~fastnig.common.CorruptFile` naming ``where``
    and the line when a column is missing, a row is cut short or has extra cells, a cell is not a
    number where one is due, or the file does not end with a complete line (a truncated write)."""
    if text and not text.endswith("\n"):
        raise CorruptFile(f"{where} is truncated: its last line is incomplete (re-run the pruning stage)")
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise CorruptFile(f"{where}: not a fastnig pruning table or damaged (missing columns {missing})")
    rows = []
    for row in reader:
        line = reader.line_num
        if "\0extra" in row or any(v is None for v in row.values()):
            raise CorruptFile(f"{where}, line {line}: the row does not have the {len(reader.fieldnames)} cells "
                              "of the header; the file is damaged")
        try:
            rows.append({c: _parse_cell(c, row[c]) for c in CSV_COLUMNS})
        except ValueError as exc:
            raise CorruptFile(f"{where}, line {line}: {exc}; the file is damaged") from None
    return rows


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _latex_escape(text: str) -> str:
    if "$" in text:  # already LaTeX (e.g. "$\cap_{o \in O} P_o$")
        return text
    text = re.sub(r"([&%#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
    for symbol, command in (("∩", r"$\cap$"), ("∪", r"$\cup$"), ("⊕", r"$\oplus$")):
        text = text.replace(symbol, command)
    return text


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


@dataclass
class PruningTable:
    """Table 4 results: one row per neuron set x level x dataset (columns :data:`CSV_COLUMNS`).

    :meth:`summary` averages each (set, level, group) over the group's
    datasets; :meth:`to_markdown` / :meth:`to_latex` lay it out as the paper
    does (rows = set x dataset group, columns = levels; "(n)" = datasets with
    a significant difference; the biggest drop of each level and group in
    bold, the second biggest underlined), plus a "Random baseline" row: the
    matched random drops averaged over the sets.
    """

    rows: List[Dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------ io
    def to_csv(self, path: Union[str, Path]) -> Path:
        """Write ``table4.csv`` atomically (the previous file stays if the write is killed or fails)."""
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: row[c] for c in CSV_COLUMNS})
        return write_atomic(path, buffer.getvalue())

    @classmethod
    def from_csv(cls, path: Union[str, Path]) -> "PruningTable":
        """Read ``table4.csv`` (strictly: :func:`parse_table4_rows`)."""
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFile(f"{path} is damaged (not UTF-8 text: {exc})") from None
        return cls(parse_table4_rows(text, path))

    def write(self, folder: Union[str, Path], stem: str = "table4") -> Dict[str, Path]:
        """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.tex`` into ``folder``, each atomically; returns the
        paths by format."""
        folder = Path(folder)
        return {"csv": self.to_csv(folder / f"{stem}.csv"),
                "markdown": write_atomic(folder / f"{stem}.md", self.to_markdown()),
                "latex": write_atomic(folder / f"{stem}.tex", self.to_latex())}

    # ------------------------------------------------------- summary
    def _ordered(self, column: str) -> List:
        return list(dict.fromkeys(row[column] for row in self.rows))

    def summary(self) -> List[Dict[str, Any]]:
        """Per (set, level, group): mean drop over the group's datasets, datasets significant, random mean drop."""
        out = []
        for set_name in self._ordered("set"):
            for level in sorted(self._ordered("level_percent")):
                for group in self._ordered("group"):
                    rows = [r for r in self.rows if (r["set"], r["level_percent"], r["group"]) == (set_name, level,
                                                                                                   group)]
                    if not rows:
                        continue
                    out.append({
                        "set": set_name, "level_percent": level, "group": group, "num_datasets": len(rows),
                        "drop_percent": float(np.mean([r["drop_percent"] for r in rows])),
                        "num_significant": sum(bool(r["significant"]) for r in rows),
                        "random_drop_mean": float(np.mean([r["random_drop_mean"] for r in rows])),
                    })
        return out

    def _grid(self, bold, underline, random_label="Random baseline"):
        """Rows of (set label, group, [cell per level]) with marks applied by the given formatters."""
        summary = self.summary()
        levels = sorted(self._ordered("level_percent"))
        groups = self._ordered("group")
        cell = {(s["set"], s["level_percent"], s["group"]): s for s in summary}
        rank: Dict[Tuple, int] = {}
        for level in levels:
            for group in groups:
                values = sorted({round(s["drop_percent"], 2) for s in summary
                                 if s["level_percent"] == level and s["group"] == group
                                 and not math.isnan(s["drop_percent"])}, reverse=True)
                for s in summary:
                    if s["level_percent"] == level and s["group"] == group and not math.isnan(s["drop_percent"]):
                        v = round(s["drop_percent"], 2)
                        if v in values[:2]:
                            rank[(s["set"], level, group)] = values.index(v)
        grid = []
        for set_name in self._ordered("set"):
            for group in groups:
                cells = []
                for level in levels:
                    s = cell.get((set_name, level, group))
                    if s is None:
                        cells.append("–")
                        continue
                    text = _fmt(s["drop_percent"])
                    mark = rank.get((set_name, level, group))
                    text = bold(text) if mark == 0 else underline(text) if mark == 1 else text
                    if s["num_significant"]:
                        text += f" ({s['num_significant']})"
                    cells.append(text)
                grid.append((set_name, group, cells))
        for group in groups:
            cells = []
            for level in levels:
                values = [s["random_drop_mean"] for s in summary if s["level_percent"] == level and s["group"] == group]
                cells.append(_fmt(float(np.mean(values))) if values else "–")
            grid.append((random_label, group, cells))
        return levels, grid

    def to_markdown(self) -> str:
        """The paper's Table 4 as a Markdown table (bold = biggest drop, underlined = second)."""
        levels, grid = self._grid(lambda t: f"**{t}**", lambda t: f"<u>{t}</u>")
        head = ["Sets of neurons pruned", "Datasets"] + [f"{level:g}%" for level in levels]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        previous = None
        for set_name, group, cells in grid:
            label = set_name if set_name != previous else ""
            previous = set_name
            lines.append("| " + " | ".join([_markdown_escape(label), _markdown_escape(group)] + cells) + " |")
        lines += ["", "% of nDCG@10 difference between the original and the pruned model, (original - pruned) / "
                  "original * 100 (positive = worse). (n): datasets of the row with a significant difference "
                  "(two-tailed paired t-test over queries, p <= 0.05). Bold: biggest drop at each level and "
                  "dataset row, underlined: second biggest. Random baseline: the same number of neurons in the "
                  "same modules, drawn at random, averaged over the repetitions and over the sets."]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """The paper's Table 4 as a LaTeX ``tabular`` (booktabs; ``\\textbf`` / ``\\underline`` marks)."""
        levels, grid = self._grid(lambda t: f"\\textbf{{{t}}}", lambda t: f"\\underline{{{t}}}")
        cols = "ll" + "r" * len(levels)
        lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
                 r"Sets of neurons pruned & Datasets & \multicolumn{" + str(len(levels))
                 + r"}{c}{\% of nDCG@10 diff.} \\",
                 " & & " + " & ".join(f"{level:g}\\%" for level in levels) + r" \\", r"\midrule"]
        previous = None
        for set_name, group, cells in grid:
            if previous is not None and set_name != previous:
                lines.append(r"\midrule")
            label = _latex_escape(set_name) if set_name != previous else ""
            previous = set_name
            lines.append(" & ".join([label, _latex_escape(group)] + [c.replace("–", "--") for c in cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
