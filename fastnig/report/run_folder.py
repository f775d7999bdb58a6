"""Reading a finished ``fastnig run`` folder: its config and CSV tables, and number formats.

Owns: parsing ``config.json`` and the CSVs the stages write (analysis,
``pruning/table4.csv``) into plain Python values, the group means of Table 4
(:func:`table4_summary`), and the number/Markdown formats the scorecard and
the run comparison print.  Must not: judge results (:mod:`fastnig.report.scorecard`)
or compute anything from models.

A damaged run file is an error that names it, never a wrong number: a CSV
whose last line is incomplete (a truncated write) or whose rows do not
match its header, a ``table4.csv`` with a cell that is not a number where
one is due (:func:`fastnig.evaluation.table4.parse_table4_rows`), and a
``config.json`` that is not a JSON object with an ``attribution`` section
raise :class:`fastnig.common.CorruptFile` / :class:`NotARunFolder`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..common import CorruptFile, exclusive_lock
from ..evaluation.table4 import parse_table4_rows

PathLike = Union[str, os.PathLike]


class NotARunFolder(ValueError):
    """The folder given is not a run folder written by ``fastnig run``."""


RUN_LOCK = ".fastnig-run.lock"
"""The lock file a ``fastnig run`` holds in its output folder (:func:`run_lock`)."""


def run_lock(run_dir: PathLike):
    """Context manager: the exclusive lock of one ``fastnig run`` on its output folder.

    A second run on the same folder (another process or thread) is refused at
    once with :class:`fastnig.common.OutputLocked`; the lock goes when the run
    ends or its process dies.  Taken by the main rank only (torchrun ranks of
    one run share the folder).
    """
    return exclusive_lock(Path(run_dir) / RUN_LOCK, f"run folder {run_dir}")


def fmt_number(x: Optional[float]) -> str:
    if x is None:
        return "–"
    if math.isnan(x):
        return "nan"
    return f"{x:.2f}"


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


_SCHEMAS = {"table4.csv": parse_table4_rows}
"""CSV files whose cells are also type-checked, by name: file name -> strict parser(text, path)."""


def read_csv(path: Path) -> List[Dict[str, str]]:
    """The rows of a CSV the stages wrote, as strings (``[]`` when the file does not exist).

    Raises :class:`~fastnig.common.CorruptFile` naming the file (and line)
    when it is truncated or damaged; ``table4.csv`` is also parsed strictly.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFile(f"{path} is damaged (not UTF-8 text: {exc})") from None
    if text and not text.endswith("\n"):
        raise CorruptFile(f"{path} is truncated: its last line is incomplete (re-run the stage that writes it)")
    if path.name in _SCHEMAS:
        _SCHEMAS[path.name](text, path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    rows = []
    for row in reader:
        if "\0extra" in row or any(v is None for v in row.values()):
            raise CorruptFile(f"{path}, line {reader.line_num}: the row does not have the "
                              f"{len(reader.fieldnames)} cells of the header; the file is damaged")
        rows.append(row)
    return rows


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def to_level(value: Any) -> float:
    return round(to_float(value), 9)


def is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def read_run_config(run_dir: PathLike) -> Dict[str, Any]:
    """The run's ``config.json`` (written by ``fastnig run``).

    Raises:
        NotARunFolder: ``run_dir`` is not a folder or holds no ``config.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunFolder(f"{run_dir} is not a folder (give the output folder of `fastnig run`, e.g. runs/demo)")
    path = run_dir / "config.json"
    if not path.is_file():
        raise NotARunFolder(f"{run_dir} is not a fastnig run folder: it has no config.json "
                            "(run `fastnig run CONFIG` first, or give its output folder)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NotARunFolder(f"{path} is not valid JSON (truncated or damaged?): {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("attribution"), dict):
        raise NotARunFolder(f"{path} is not a fastnig run configuration (no 'attribution' section)")
    return cfg


def run_in_domain(cfg: Mapping[str, Any]) -> str:
    att = cfg.get("attribution", {})
    in_domain = att.get("in_domain") or []
    if isinstance(in_domain, str):
        return in_domain
    return str(in_domain[0]) if in_domain else ""


def table4_groups(rows: List[Dict[str, str]]) -> Tuple[Dict[Tuple[str, float, str], Dict[str, float]],
                                                        Dict[Tuple[str, float], float]]:
    """Per (set, level, group): mean drop over the group's datasets and datasets significant; and the
    random baseline per (group, level): mean over sets of the group's mean random drop (as table4.md)."""
    grouped: Dict[Tuple[str, float, str], List[Dict[str, str]]] = defaultdict(list)
    for r in rows:
        grouped[(r["set"], to_level(r["level_percent"]), r["group"])].append(r)
    summary = {}
    for key, members in grouped.items():
        summary[key] = {"drop": sum(to_float(r["drop_percent"]) for r in members) / len(members),
                        "significant": sum(is_true(r["significant"]) for r in members),
                        "random": sum(to_float(r["random_drop_mean"]) for r in members) / len(members)}
    by_gl: Dict[Tuple[str, float], List[float]] = defaultdict(list)
    for (_s, level, group), v in summary.items():
        by_gl[(group, level)].append(v["random"])
    random = {k: sum(v) / len(v) for k, v in by_gl.items()}
    return summary, random


def table4_summary(rows: List[Dict[str, str]]):
    """Group means of ``pruning/table4.csv`` rows: ``({(set, level, group): {drop, significant, random}},
    {(group, level): random baseline})`` (the numbers of ``table4.md``)."""
    return table4_groups(rows)
