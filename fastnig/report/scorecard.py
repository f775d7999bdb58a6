"""Reproduction scorecard: a finished run beside the paper (``fastnig compare RUN``).

Reads what ``fastnig run`` wrote into a run folder and the paper's numbers
shipped with the package (``fastnig/reference/<name>.json``, see
:func:`load_reference`), and builds a :class:`Scorecard`:

* **Numbers side by side**: our Table 1 (the mean P(rel) − P(non-rel) over
  relevant pairs the model judges relevant, at the input and at each
  baseline — the paper's "average difference between each label", whose
  input value is 1 — from ``analysis/baselines.csv``) and Table 4 (% nDCG@10 drop, positive = worse,
  averaged over the datasets of each validation group, from
  ``pruning/table4.csv``) beside the paper's, with the difference ours −
  paper per cell.  When the run's model, datasets, baseline or steps differ
  from the paper's, every number is labelled "not the paper's setup".
  Sets are matched by role: the paper's ``P_ms`` / ``N_ms`` / ``F_ms`` are
  the run's ``P_<in-domain>`` ... (the demo's in-domain dataset is ``cran``).
* **The paper's qualitative claims**, one line each, PASS / FAIL / N.A.
  (N.A. = the run lacks the data the check needs); see :data:`CLAIMS` for
  the exact rule and threshold of each (decisions where the paper gives no
  number are documented there).
* **Two runs side by side** (:func:`fastnig.report.comparison.compare_runs`; ``fastnig compare RUN
  --with OTHER`` and the report's "§6" section when the config names
  ``compare_with``): the layer profile of N / F of the in-domain dataset and
  Table 4 of both runs, e.g. the ``pad`` run beside the ``zero`` (Möller)
  baseline run of the paper's §6.

It reads CSV/JSON files only (no model, no torch), and writes nothing
unless asked (:meth:`Scorecard.write`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..common import write_atomic
from .run_folder import (
    PathLike,
    fmt_number,
    md_escape,
    read_csv,
    read_run_config,
    run_in_domain,
    table4_groups,
    to_float,
    to_level,
)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
NOT_PAPER_SETUP = "not the paper's setup"

PASS, FAIL, NA = "PASS", "FAIL", "N.A."

PN_MAX_PERCENT = 5.0
"""P_x ∩ N_x counts as "almost empty" when at most this % of a set (checked at levels 0.1–1 %)."""
PN_LEVELS = (0.1, 1.0)
"""Level range (inclusive, % of neurons) of the P_x ∩ N_x check: below 0.1 % one shared neuron of
BERT-large's 22 is already 4.5 %, and the paper's pruning levels stop at 1 %."""
MIN_PRUNING_LEVEL = 0.1
"""N_ms vs P_ms is checked at levels >= 0.1 %: at 0.01 % the paper itself has P_ms above N_ms on MS MARCO dev."""
RANDOM_MAX_PERCENT = 2.0
"""Random pruning must change nDCG@10 by at most this % on every dataset (§5.3: "at most 2% on a single dataset")."""
STRONG_LEVEL = 1.0
"""Level (%) of the "F_ms among the two strongest sets" check (Table 4's last column)."""

CLAIMS: Tuple[Tuple[str, str, str], ...] = (
    ("p_cap_n_empty", "P_x ∩ N_x almost empty for every dataset",
     "Fig. 3, §5.1; rule: P_x ∩ N_x <= 5 % of a set for every dataset at every analysed level in [0.1, 1] %"),
    ("ood_above_id", "OOD–OOD overlaps above MS MARCO–OOD overlaps",
     "Fig. 2b/2d, §5.2; rule: for each label, mean OOD–OOD overlap > mean ID–OOD overlap at every level where "
     "either is > 0 (the run's analysis.exclude variant, the paper's without r and nf)"),
    ("cap_o_above_cap_a", "∩_O sets larger than ∩_A sets",
     "Fig. 3, §5.2; rule: for each label, ∩_O > ∩_A strictly at every level where ∩_O is non-empty "
     "(∩_A ⊆ ∩_O holds by construction, so only the strict part is a finding)"),
    ("n_above_p", "N_ms pruning hurts more than P_ms",
     "Table 4, §5.3; rule: drop(N_ms) > drop(P_ms) in every validation group at every level >= 0.1 %"),
    ("f_top2", "F_ms among the two strongest sets at 1 %",
     "Table 4, §5.3; rule: at most one pruned set has a larger drop than F_ms at 1 %, in every validation group"),
    ("random_small", "random pruning changes nDCG@10 by at most 2 % per dataset",
     "Table 4, §5.3; rule: |mean random drop| <= 2 % for every set, level and validation dataset"),
    ("last_layers_peak", "the layer profile peaks in the last two layers",
     "Fig. 4a/4b, §6; rule: for N_ms and F_ms (top layer_percent %), the most populated layer is one of the last two"),
    ("value_attention_output", "attention-output and value neurons dominate over key and query",
     "§6; rule: for N_ms and F_ms, min(attention_output, value) > max(query, key) neurons, all layers together"),
)
"""(key, claim, source and rule) of every qualitative check, in the order printed."""


TABLE1_TITLE = "mean P(rel) − P(non-rel) over relevant pairs the model judges relevant"


# --------------------------------------------------------------- reference
def load_reference(name: str = "paper") -> Dict[str, Any]:
    """The packaged reference numbers ``fastnig/reference/<name>.json``, checked with :func:`check_reference`."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise ValueError(f"reference {name!r} unknown; packaged references: {names}")
    ref = json.loads(path.read_text(encoding="utf-8"))
    check_reference(ref)
    return ref


def check_reference(ref: Mapping[str, Any]) -> None:
    """Raise ValueError unless Table 4 has exactly one cell per set x group x level and one random cell
    per group x level, and Table 1 has the original input (= 1) and the four baselines."""
    t1 = {r["baseline"]: r["quality"] for r in ref["table1"]["rows"]}
    if set(t1) != {"original", "pad", "pad-query", "zero", "zero-query"} or t1["original"] != 1:
        raise ValueError(f"reference Table 1: expected original (= 1) and the four baselines, got {t1}")
    t4 = ref["table4"]
    levels, groups, sets = t4["levels"], list(t4["groups"]), [s["set"] for s in t4["sets"]]
    expected = {(s, g, float(l)) for s in sets for g in groups for l in levels}
    got = [(c["set"], c["group"], float(c["level_percent"])) for c in t4["cells"]]
    if len(got) != len(set(got)) or set(got) != expected:
        missing = sorted(expected - set(got), key=str)
        extra = sorted(set(got) - expected, key=str)
        raise ValueError(f"reference Table 4: cells missing {missing[:5]} / unexpected or repeated {extra[:5]}")
    rnd = [(c["group"], float(c["level_percent"])) for c in t4["random"]]
    if len(rnd) != len(set(rnd)) or set(rnd) != {(g, float(l)) for g in groups for l in levels}:
        raise ValueError("reference Table 4: the random baseline needs one cell per group and level")
    for c in t4["cells"]:
        if not isinstance(c["drop_percent"], (int, float)) or c.get("mark", "") not in ("", "bold", "underline"):
            raise ValueError(f"reference Table 4: bad cell {c}")


# ----------------------------------------------------------------- results
@dataclass
class Cell:
    """One number of Table 1 or Table 4, ours beside the paper's (either may be missing: None)."""

    table: str                      # "Table 1" or "Table 4"
    item: str                       # baseline name, or the run's set expression (or "random")
    group: str = ""                 # Table 4: validation group
    level_percent: Optional[float] = None
    ours: Optional[float] = None
    paper: Optional[float] = None
    ours_significant: Optional[int] = None
    paper_significant: Optional[int] = None
    paper_item: str = ""            # the paper's name of the row (P_ms for the run's P_cran)

    @property
    def difference(self) -> Optional[float]:
        """ours − paper (same unit as the cell), None when one side is missing."""
        if self.ours is None or self.paper is None or math.isnan(self.ours):
            return None
        return self.ours - self.paper


@dataclass
class Claim:
    """One qualitative claim of the paper checked on the run: verdict PASS / FAIL / N.A. and why."""

    key: str
    text: str
    source: str
    verdict: str
    detail: str


@dataclass
class Scorecard:
    """The run beside the paper: :attr:`cells` (numbers) and :attr:`claims` (verdicts)."""

    run_dir: Path
    reference: str
    reference_title: str
    in_domain: str
    setup_differences: List[str]
    cells: List[Cell] = field(default_factory=list)
    claims: List[Claim] = field(default_factory=list)

    @property
    def paper_setup(self) -> bool:
        """True when model, datasets, baseline and steps are the paper's."""
        return not self.setup_differences

    def claim(self, key: str) -> Claim:
        for c in self.claims:
            if c.key == key:
                return c
        raise KeyError(key)

    def counts(self) -> Dict[str, int]:
        out = {PASS: 0, FAIL: 0, NA: 0}
        for c in self.claims:
            out[c.verdict] += 1
        return out

    # ------------------------------------------------------------ render
    def _setup_line(self) -> str:
        if self.paper_setup:
            return "Setup: the paper's (model, datasets, baseline, steps)."
        return f"Setup: {NOT_PAPER_SETUP.upper()} — " + "; ".join(self.setup_differences) + "."

    def to_text(self) -> str:
        """For the terminal."""
        n = self.counts()
        lines = [f"Reproduction scorecard: {self.run_dir} vs {self.reference} ({self.reference_title})",
                 self._setup_line(), "",
                 f"Qualitative claims: {n[PASS]} PASS, {n[FAIL]} FAIL, {n[NA]} N.A."]
        for c in self.claims:
            lines.append(f"  {c.verdict:<4}  {c.text}: {c.detail}")
        for table, title in (("Table 1", TABLE1_TITLE),
                             ("Table 4", "% nDCG@10 drop when pruning, positive = worse")):
            cells, omitted = self._shown(table)
            label = "" if self.paper_setup else f" [{NOT_PAPER_SETUP}]"
            lines += ["", f"{table} — {title}{label}"]
            if omitted:
                lines.append(f"  no number of this run in: {', '.join(omitted)} (the paper's are in scorecard.csv)")
            if not cells:
                lines.append("  (not in this run)")
                continue
            rows = [self._row_strings(c) for c in cells]
            head = ["set" if table == "Table 4" else "baseline", "group", "level", "ours", "paper", "ours-paper"]
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
            for r in rows:
                lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return "\n".join(lines) + "\n"

    def _shown(self, table: str) -> Tuple[List[Cell], List[str]]:
        """Cells to print, and the paper's groups left out because the run has no number in them
        (the CSV keeps every cell)."""
        cells = [c for c in self.cells if c.table == table]
        present = {c.group for c in cells if c.ours is not None}
        omitted = list(dict.fromkeys(c.group for c in cells if c.group not in present))
        return [c for c in cells if c.group in present], omitted

    @staticmethod
    def _row_strings(c: Cell) -> List[str]:
        item = c.item if not c.paper_item or c.paper_item == c.item else f"{c.item} (paper {c.paper_item})"
        level = "" if c.level_percent is None else f"{c.level_percent:g}%"
        ours = fmt_number(c.ours) + (f" ({c.ours_significant})" if c.ours_significant else "")
        paper = fmt_number(c.paper) + (f" ({c.paper_significant})" if c.paper_significant else "")
        diff = c.difference
        return [item, c.group, level, ours, paper, "–" if diff is None else f"{diff:+.2f}"]

    def to_markdown(self) -> str:
        """For report.md: a claims table, then Table 1 and Table 4 side by side."""
        n = self.counts()
        md = [f"Run `{self.run_dir}` against {self.reference_title}.", "", self._setup_line(), "",
              f"**Qualitative claims: {n[PASS]} PASS, {n[FAIL]} FAIL, {n[NA]} N.A.**", "",
              "| verdict | claim | our numbers | source and rule |", "|---|---|---|---|"]
        for c in self.claims:
            md.append(f"| {c.verdict} | {md_escape(c.text)} | {md_escape(c.detail)} | {md_escape(c.source)} |")
        for table, title in (("Table 1", TABLE1_TITLE),
                             ("Table 4", "% nDCG@10 drop when pruning, positive = worse; (n) = datasets significant")):
            cells, omitted = self._shown(table)
            label = "" if self.paper_setup else f" ({NOT_PAPER_SETUP})"
            md += ["", f"**{table} — {title}{label}**", ""]
            if omitted:
                md += [f"No number of this run in: {', '.join(omitted)} (the paper's are in `scorecard.csv`).", ""]
            if not cells:
                md.append("_(not in this run)_")
                continue
            t4 = table == "Table 4"  # Table 1 has no group or level: its rows leave those two out
            md += ["| set | group | level | ours | paper | ours − paper |" if t4
                   else "| baseline | ours | paper | ours − paper |",
                   "|---|---|---|---:|---:|---:|" if t4 else "|---|---:|---:|---:|"]
            for c in cells:
                row = self._row_strings(c)
                md.append("| " + " | ".join(md_escape(v) for v in (row if t4 else row[:1] + row[3:])) + " |")
        return "\n".join(md) + "\n"

    CSV_COLUMNS = ("section", "item", "paper_item", "group", "level_percent", "ours", "paper", "difference",
                   "ours_significant", "paper_significant", "verdict", "detail", "setup")

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per claim and per cell (columns :attr:`CSV_COLUMNS`)."""
        setup = "paper" if self.paper_setup else NOT_PAPER_SETUP
        out = [{"section": "claim", "item": c.key, "paper_item": c.text, "verdict": c.verdict, "detail": c.detail,
                "setup": setup} for c in self.claims]
        for c in self.cells:
            out.append({"section": c.table, "item": c.item, "paper_item": c.paper_item or c.item, "group": c.group,
                        "level_percent": c.level_percent, "ours": c.ours, "paper": c.paper,
                        "difference": c.difference, "ours_significant": c.ours_significant,
                        "paper_significant": c.paper_significant, "setup": setup})
        return out

    def to_csv(self, path: PathLike) -> Path:
        """Write ``scorecard.csv`` atomically (a killed or failed write leaves the previous file)."""
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.CSV_COLUMNS)
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.CSV_COLUMNS})
        return write_atomic(path, buffer.getvalue())

    def write(self, folder: Optional[PathLike] = None) -> Dict[str, Path]:
        """Write ``scorecard.md`` and ``scorecard.csv`` (default: into the run folder); returns the paths."""
        folder = Path(folder or self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        md = write_atomic(folder / "scorecard.md", "# Reproduction scorecard\n\n" + self.to_markdown())
        return {"md": md, "csv": self.to_csv(folder / "scorecard.csv")}


def _setup_differences(cfg: Mapping[str, Any], setup: Mapping[str, Any]) -> List[str]:
    att = cfg.get("attribution", {})
    diffs = []
    if cfg.get("model") != setup["model"]:
        diffs.append(f"model {cfg.get('model')} (paper: {setup['model']})")
    datasets = sorted(att.get("datasets", {}))
    if datasets != sorted(setup["attribution_datasets"]):
        diffs.append(f"attribution datasets {datasets} (paper: {sorted(setup['attribution_datasets'])})")
    validation = sorted(cfg.get("pruning", {}).get("validation", {}))
    if validation != sorted(setup["validation_datasets"]):
        diffs.append(f"validation datasets {validation} (paper: {sorted(setup['validation_datasets'])})")
    if att.get("baseline", "pad") != setup["baseline"]:
        diffs.append(f"baseline {att.get('baseline')} (paper: {setup['baseline']})")
    if att.get("steps") != setup["steps"]:
        diffs.append(f"steps {att.get('steps')} (paper: {setup['steps']})")
    return diffs


def _run_set_name(paper_set: str, paper_in_domain: str, in_domain: str) -> str:
    """The run's name of a paper row: P_ms -> P_<in-domain>; set-algebra rows keep their expression."""
    for prefix in ("P_", "N_", "F_"):
        if paper_set == prefix + paper_in_domain and in_domain:
            return prefix + in_domain
    return paper_set


# ------------------------------------------------------------------ claims
def _claim(key: str, verdict: str, detail: str) -> Claim:
    text, source = {k: (t, s) for k, t, s in CLAIMS}[key]
    return Claim(key, text, source, verdict, detail)


def _check_p_cap_n(inter: List[Dict[str, str]]) -> Claim:
    rows = [r for r in inter if r.get("curve") == "P_cap_N"
            and PN_LEVELS[0] - 1e-9 <= to_float(r["level_percent"]) <= PN_LEVELS[1] + 1e-9]
    if not rows:
        return _claim("p_cap_n_empty", NA, "no P_x ∩ N_x at levels 0.1–1 % (needs a dataset with both labels "
                                           "and an analysis level in [0.1, 1] %)")
    worst = max(rows, key=lambda r: to_float(r["percent"]))
    datasets = sorted({r["datasets"].split("+")[0] for r in rows})
    value = to_float(worst["percent"])
    verdict = PASS if value <= PN_MAX_PERCENT else FAIL
    return _claim("p_cap_n_empty", verdict,
                  f"largest {value:.2f} % ({worst['name']} at {to_float(worst['level_percent']):g} %) over "
                  f"{', '.join(datasets)}; threshold {PN_MAX_PERCENT:g} %")


def _pairwise_file(analysis: Path, exclude: Sequence[str]) -> Optional[Path]:
    if exclude:
        path = analysis / f"pairwise_overlap_without_{'-'.join(exclude)}.csv"
        if path.is_file():
            return path
    found = sorted(analysis.glob("pairwise_overlap_without_*.csv"))
    if found:
        return found[0]
    path = analysis / "pairwise_overlap.csv"
    return path if path.is_file() else None


def _check_ood_above_id(analysis: Path, exclude: Sequence[str]) -> Claim:
    path = _pairwise_file(analysis, exclude)
    rows = read_csv(path) if path else []
    per: Dict[Tuple[str, float], Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per[(r["label"], to_level(r["level_percent"]))][r["pair_kind"]].append(to_float(r["overlap_percent"]))
    checked, failures, labels = 0, [], set()
    for (label, level), kinds in sorted(per.items()):
        if not kinds.get("OOD-OOD") or not kinds.get("ID-OOD"):
            continue
        ood = sum(kinds["OOD-OOD"]) / len(kinds["OOD-OOD"])
        idd = sum(kinds["ID-OOD"]) / len(kinds["ID-OOD"])
        if ood == 0 and idd == 0:
            continue
        labels.add(label)
        checked += 1
        if not ood > idd:
            failures.append(f"{label} at {level:g} %: OOD–OOD {ood:.1f} % <= ID–OOD {idd:.1f} %")
    if not checked:
        return _claim("ood_above_id", NA, "needs two OOD datasets and the in-domain one with the same label "
                                          f"({path.name if path else 'no pairwise_overlap*.csv'})")
    where = f"{path.name}, labels {', '.join(sorted(labels))}, {checked} label-levels"
    if failures:
        return _claim("ood_above_id", FAIL, f"{len(failures)} of {checked} label-levels not above ({where}): "
                                            + "; ".join(failures[:3]))
    return _claim("ood_above_id", PASS, f"mean OOD–OOD above mean ID–OOD everywhere ({where})")


def _check_cap_o_above_cap_a(analysis: Path) -> Claim:
    checked, failures, files = 0, [], []
    for path in sorted(analysis.glob("intersections*.csv")):
        values: Dict[Tuple[str, float], Dict[str, float]] = defaultdict(dict)
        for r in read_csv(path):
            if r.get("curve") in ("cap_O", "cap_A"):
                values[(r["label"], to_level(r["level_percent"]))][r["curve"]] = to_float(r["percent"])
        for (label, level), v in sorted(values.items()):
            if "cap_O" not in v or "cap_A" not in v or not v["cap_O"] > 0:
                continue
            checked += 1
            if path.name not in files:
                files.append(path.name)
            if not v["cap_O"] > v["cap_A"]:
                failures.append(f"{label} at {level:g} % ({path.name}): "
                                f"∩_O {v['cap_O']:.1f} % = ∩_A {v['cap_A']:.1f} %")
    if not checked:
        return _claim("cap_o_above_cap_a", NA, "needs ∩_O (two or more OOD datasets) and ∩_A of one label, "
                                               "with a non-empty ∩_O")
    if failures:
        return _claim("cap_o_above_cap_a", FAIL, f"{len(failures)} of {checked} label-levels not strictly larger: "
                                                 + "; ".join(failures[:3]))
    return _claim("cap_o_above_cap_a", PASS, f"∩_O > ∩_A at all {checked} label-levels ({', '.join(files)})")


def _check_n_above_p(summary, in_domain: str) -> Claim:
    p, n = f"P_{in_domain}", f"N_{in_domain}"
    checks, failures = [], []
    for (s, level, group), v in sorted(summary.items()):
        if s != n or level < MIN_PRUNING_LEVEL - 1e-9 or (p, level, group) not in summary:
            continue
        dn, dp = v["drop"], summary[(p, level, group)]["drop"]
        checks.append(f"{group} {level:g} %: {dn:.2f} vs {dp:.2f}")
        if not dn > dp:
            failures.append(checks[-1])
    if not checks:
        return _claim("n_above_p", NA, f"needs {n} and {p} pruned at a level >= {MIN_PRUNING_LEVEL:g} %")
    if failures:
        return _claim("n_above_p", FAIL, f"{n} vs {p} drop: not larger at " + "; ".join(failures))
    return _claim("n_above_p", PASS, f"{n} vs {p} drop: " + "; ".join(checks))


def _check_f_top2(summary, in_domain: str) -> Claim:
    f = f"F_{in_domain}"
    level = to_level(STRONG_LEVEL)
    groups = sorted({g for (s, l, g) in summary if s == f and l == level})
    if not groups:
        return _claim("f_top2", NA, f"{f} was not pruned at {STRONG_LEVEL:g} %")
    parts, failed = [], False
    for g in groups:
        drops = {s: v["drop"] for (s, l, gg), v in summary.items() if l == level and gg == g}
        above = sorted(s for s, d in drops.items() if d > drops[f])
        rank = len(above) + 1
        parts.append(f"{g}: rank {rank} of {len(drops)} ({drops[f]:.2f})")
        failed |= rank > 2
    return _claim("f_top2", FAIL if failed else PASS, f"{f} at {STRONG_LEVEL:g} %: " + "; ".join(parts))


def _check_random(rows: List[Dict[str, str]]) -> Claim:
    values = [(abs(to_float(r["random_drop_mean"])), r) for r in rows
              if not math.isnan(to_float(r["random_drop_mean"]))]
    if not values:
        return _claim("random_small", NA, "no pruning/table4.csv (or no random baseline in it)")
    worst, r = max(values, key=lambda x: x[0])
    verdict = PASS if worst <= RANDOM_MAX_PERCENT else FAIL
    return _claim("random_small", verdict,
                  f"largest |random drop| {worst:.2f} % ({r['set']} at {to_float(r['level_percent']):g} % on "
                  f"{r['dataset']}) over {len(values)} rows; threshold {RANDOM_MAX_PERCENT:g} %")


def _profile_sets(layers: List[Dict[str, str]], in_domain: str) -> Dict[str, List[Dict[str, str]]]:
    out: Dict[str, List[Dict[str, str]]] = {}
    for prefix in (f"N_{in_domain}@", f"F_{in_domain}@"):
        members = [r for r in layers if r["set"].startswith(prefix)]
        for name in dict.fromkeys(r["set"] for r in members):
            out[name] = [r for r in members if r["set"] == name]
    return out


def _check_last_layers(layers: List[Dict[str, str]], in_domain: str) -> Claim:
    sets = _profile_sets(layers, in_domain)
    if not sets:
        return _claim("last_layers_peak", NA, f"no N_{in_domain} / F_{in_domain} in analysis/layers_components.csv")
    parts, failed = [], False
    for name, rows in sets.items():
        per_layer: Dict[int, int] = defaultdict(int)
        for r in rows:
            layer = int(to_float(r["layer"]))
            if layer >= 0:
                per_layer[layer] += int(to_float(r["count"]))
        if not per_layer:
            continue
        n_layers = max(per_layer) + 1
        if n_layers <= 2:
            continue  # every layer is one of the last two: nothing to check
        peak = max(per_layer.values())
        peak_layers = [l for l, c in sorted(per_layer.items()) if c == peak]
        ok = any(l >= n_layers - 2 for l in peak_layers)
        failed |= not ok
        parts.append(f"{name} peaks at layer {'/'.join(map(str, peak_layers))} of 0–{n_layers - 1} ({peak} neurons)")
    if not parts:
        return _claim("last_layers_peak", NA, "needs a model of 3 or more layers with neurons of N_ms / F_ms in them")
    return _claim("last_layers_peak", FAIL if failed else PASS, "; ".join(parts))


def _check_components(layers: List[Dict[str, str]], in_domain: str) -> Claim:
    sets = _profile_sets(layers, in_domain)
    if not sets:
        return _claim("value_attention_output", NA,
                      f"no N_{in_domain} / F_{in_domain} in analysis/layers_components.csv")
    parts, failed = [], False
    for name, rows in sets.items():
        total: Dict[str, int] = defaultdict(int)
        for r in rows:
            total[r["component"]] += int(to_float(r["count"]))
        strong = min(total["attention_output"], total["value"])
        weak = max(total["query"], total["key"])
        failed |= not strong > weak
        parts.append(f"{name}: attention_output {total['attention_output']}, value {total['value']}, "
                     f"key {total['key']}, query {total['query']}")
    return _claim("value_attention_output", FAIL if failed else PASS, "; ".join(parts))


# ------------------------------------------------------------------ entry
def scorecard(run_dir: PathLike, reference: str = "paper") -> Scorecard:
    """Compare a finished run folder with the packaged reference numbers.

    Args:
        run_dir: the output folder of ``fastnig run`` (holds ``config.json``,
            ``analysis/*.csv``, ``pruning/table4.csv``; missing files only make
            their cells and claims missing / N.A.).
        reference: name of a packaged reference (``fastnig/reference/<name>.json``).

    Returns:
        a :class:`Scorecard` (nothing is written; see :meth:`Scorecard.write`).

    Raises:
        NotARunFolder: ``run_dir`` has no ``config.json``.
        ValueError: unknown reference.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ref = load_reference(reference)
    setup = ref["setup"]
    in_domain = run_in_domain(cfg)
    analysis, pruning = run_dir / "analysis", run_dir / "pruning"
    card = Scorecard(run_dir=run_dir, reference=reference, reference_title=ref.get("title", reference),
                     in_domain=in_domain, setup_differences=_setup_differences(cfg, setup))

    # Table 1: the paper reports the mean difference itself ("average difference between each label"; 1 at
    # the input, over pairs the model judges relevant); a file without that column falls back to the ratio.
    ours_t1 = {}
    t1_rows = read_csv(analysis / "baselines.csv")
    for r in t1_rows:
        value = to_float(r.get("mean_difference"))
        ours_t1[r.get("baseline")] = value if not math.isnan(value) else to_float(r.get("quality"))
    if t1_rows:
        for row in ref["table1"]["rows"]:
            card.cells.append(Cell("Table 1", row["baseline"], ours=ours_t1.get(row["baseline"]),
                                   paper=float(row["quality"]), paper_item=row["paper_label"]))

    # Table 4: the paper's rows (by role), then our rows it does not have, then the random baseline.
    t4_rows = read_csv(pruning / "table4.csv")
    summary, random = table4_groups(t4_rows)
    t4 = ref["table4"]
    paper_cells = {(c["set"], to_level(c["level_percent"]), c["group"]): c for c in t4["cells"]}
    paper_random = {(c["group"], to_level(c["level_percent"])): c["drop_percent"] for c in t4["random"]}
    if t4_rows:
        shown = set()
        for s in t4["sets"]:
            ours_name = _run_set_name(s["set"], setup["in_domain"], in_domain)
            for group in t4["groups"]:
                for level in t4["levels"]:
                    key = (ours_name, to_level(level), group)
                    mine = summary.get(key)
                    pc = paper_cells[(s["set"], to_level(level), group)]
                    shown.add(key)
                    card.cells.append(Cell("Table 4", ours_name, group, float(level),
                                           ours=mine["drop"] if mine else None, paper=float(pc["drop_percent"]),
                                           ours_significant=mine["significant"] if mine else None,
                                           paper_significant=int(pc["num_significant"]), paper_item=s["set"]))
        for key, mine in summary.items():
            if key not in shown:
                card.cells.append(Cell("Table 4", key[0], key[2], key[1], ours=mine["drop"],
                                       ours_significant=mine["significant"]))
        for (group, level) in sorted(set(random) | set(paper_random), key=lambda k: (k[0], k[1])):
            card.cells.append(Cell("Table 4", "random", group, level, ours=random.get((group, level)),
                                   paper=paper_random.get((group, level)), paper_item="Random baseline"))

    inter = read_csv(analysis / "intersections.csv")
    layers = read_csv(analysis / "layers_components.csv")
    exclude = [str(x) for x in cfg.get("analysis", {}).get("exclude", []) or []]
    card.claims = [
        _check_p_cap_n(inter),
        _check_ood_above_id(analysis, exclude),
        _check_cap_o_above_cap_a(analysis),
        _check_n_above_p(summary, in_domain),
        _check_f_top2(summary, in_domain),
        _check_random(t4_rows),
        _check_last_layers(layers, in_domain),
        _check_components(layers, in_domain),
    ]
    return card


