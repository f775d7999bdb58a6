"""The paper's numbers shipped with fastnig (fastnig/reference/paper.json)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from fastnig.report.scorecard import check_reference, load_reference

PAPER_DIR = Path(__file__).resolve().parents[2] / "shared" / "paper"
PAPER_TEXT = PAPER_DIR / "which-neurons-matter-in-ir.txt"


@pytest.fixture(scope="module")
def ref():
    return load_reference("paper")


@pytest.fixture(scope="module")
def paper_text():
    if not PAPER_TEXT.is_file():
        pytest.skip(f"the paper's text is not at {PAPER_TEXT} (../shared/paper beside the checkout): "
                    "the reference numbers cannot be checked against it here")
    return PAPER_TEXT.read_text(encoding="utf-8")


def test_every_set_level_and_group_is_present(ref):
    t4 = ref["table4"]
    assert t4["levels"] == [0.01, 0.1, 1]
    assert list(t4["groups"]) == ["MSMARCO dev set", "LoTTE benchmark"]
    assert len(t4["sets"]) == 10 and len(t4["cells"]) == 10 * 2 * 3 and len(t4["random"]) == 2 * 3
    cells = {(c["set"], c["group"], c["level_percent"]) for c in t4["cells"]}
    for s in t4["sets"]:
        for g in t4["groups"]:
            for level in t4["levels"]:
                assert (s["set"], g, level) in cells
    assert [r["baseline"] for r in ref["table1"]["rows"]] == ["original", "pad", "pad-query", "zero", "zero-query"]
    assert ref["table3"]["O"] == [d for d in ref["table3"]["A"] if d != "ms"]


def test_bold_and_underline_mark_the_two_biggest_drops(ref):
    """Where the OCR kept the marks, bold is the level's biggest drop and underline the second (Table 4 caption)."""
    t4 = ref["table4"]
    marked = 0
    for g in t4["groups"]:
        for level in t4["levels"]:
            cells = sorted((c for c in t4["cells"] if c["group"] == g and c["level_percent"] == level),
                           key=lambda c: -c["drop_percent"])
            marks = [c["mark"] for c in cells if c["mark"]]
            if marks:
                assert cells[0]["mark"] == "bold" and cells[1]["mark"] == "underline", (g, level)
                marked += 1
    assert marked == 4  # 0.1 % and 1 % of both groups


def test_check_reference_refuses_a_missing_or_repeated_cell(ref):
    broken = copy.deepcopy(ref)
    broken["table4"]["cells"].pop(7)
    with pytest.raises(ValueError, match="missing"):
        check_reference(broken)
    repeated = copy.deepcopy(ref)
    repeated["table4"]["cells"][3] = dict(repeated["table4"]["cells"][2])
    with pytest.raises(ValueError):
        check_reference(repeated)
    no_random = copy.deepcopy(ref)
    no_random["table4"]["random"].pop()
    with pytest.raises(ValueError, match="random"):
        check_reference(no_random)


def _table4_rows_from_text(text):
    """(group, [(value, significant count or 0) per level]) for every group line of Table 4, in order."""
    start = text.index("Table 4:")
    end = text.index("5.2 RQ2", start)
    rows = []
    for line in text[start:end].splitlines():
        if "\t" not in line:  # the caption names the groups too; table rows are tab-separated
            continue
        for group in ("LoTTE benchmark", "MSMARCO dev set"):
            if group in line:
                cells = re.findall(r"(-?\d+\.\d+)(?:</?\w+>)*\s*(?:\((\d)\))?", line.split(group, 1)[1])
                rows.append((group, [(float(v), int(n or 0)) for v, n in cells]))
    return rows


def _check_table4_equals_the_paper_text(ref, paper_text):
    rows = _table4_rows_from_text(paper_text)
    t4 = ref["table4"]
    order = [s["set"] for s in t4["sets"]] + ["random"]
    assert len(rows) == 2 * len(order)  # each set: a LoTTE line then an MSMARCO line
    checked = 0
    for i, set_name in enumerate(order):
        for group, values in rows[2 * i:2 * i + 2]:
            assert len(values) == 3, (set_name, group, values)
            for level, (value, significant) in zip(t4["levels"], values):
                if set_name == "random":
                    cell = next(c for c in t4["random"] if c["group"] == group and c["level_percent"] == level)
                    assert cell["drop_percent"] == value
                else:
                    cell = next(c for c in t4["cells"] if (c["set"], c["group"], c["level_percent"])
                                == (set_name, group, level))
                    assert (cell["drop_percent"], cell["num_significant"]) == (value, significant), cell
                checked += 1
    assert checked == 66


SPOT_CHECKS = [
    ("P_ms", "LoTTE benchmark", 0.01, -1.98),
    ("N_ms", "MSMARCO dev set", 1, 52.09),
    ("inter(A, N)", "MSMARCO dev set", 1, 12.24),
    ("F_ms", "LoTTE benchmark", 0.1, 17.96),
    ("inter(A, F)", "LoTTE benchmark", 1, -1.49),
    ("F_A", "LoTTE benchmark", 1, 9.75),
]


def _cell(ref, set_name, group, level):
    return next(c for c in ref["table4"]["cells"] if (c["set"], c["group"], c["level_percent"])
                == (set_name, group, level))


def test_spot_checks_of_the_reference(ref):
    """Six cells read off the paper's Table 4 by hand (no paper text needed)."""
    for set_name, group, level, value in SPOT_CHECKS:
        assert _cell(ref, set_name, group, level)["drop_percent"] == value, (set_name, group, level)
    assert [r["quality"] for r in ref["table1"]["rows"]] == [1, 0.21, 1, 0.67, 1]


def test_reference_equals_the_paper_text(ref, paper_text):
    """Against ../shared/paper (one test, so a clone without it skips once): all 66 Table 4 cells, the
    spot checks on their lines (independently of the row order), and Table 1."""
    _check_table4_equals_the_paper_text(ref, paper_text)
    block = paper_text[paper_text.index("Table 4:"):paper_text.index("5.2 RQ2")]
    for set_name, group, level, value in SPOT_CHECKS:
        assert any(group in line and f"{value:.2f}" in line for line in block.splitlines()), (set_name, group)
    block = paper_text[paper_text.index("Table 1:"):paper_text.index("3.2 Adapting")]
    cells = [[c.strip() for c in line.split("\t")] for line in block.splitlines() if "\t" in line]
    values = [float(c[1]) for c in cells if len(c) > 1 and re.fullmatch(r"\d+(\.\d+)?", c[1])]
    assert values == [r["quality"] for r in ref["table1"]["rows"]] == [1, 0.21, 1, 0.67, 1]
