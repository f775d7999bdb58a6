"""report.md / report.html: read top-down (findings first, settings last), paper figure numbers, §6 comparison."""
from __future__ import annotations

import json
import re
import shutil

from test_scorecard import TABLE4_COLUMNS, _layers, _t4_row, _write_csv, fixture_run  # noqa: F401 (fixture)

from fastnig.analysis.neuron_analyses import FIGURE5, figure2_name, figure3_name, figure4_name
from fastnig.analysis.table1 import TABLE1_FIGURE
from fastnig.report.comparison import compare_runs
from fastnig.report.document import figure_caption, write_report

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def _figures(run):
    names = [figure2_name("relevant"), figure2_name("relevant", ["r", "nf"]), figure2_name("non-relevant"),
             figure2_name("non-relevant", ["r", "nf"]), figure3_name(), figure3_name(["r", "nf"]),
             figure4_name("N_ms@1%", "ms"), figure4_name("F_ms@1%", "ms"), figure4_name("P_tc@1%", "ms"),
             FIGURE5, TABLE1_FIGURE]
    for name in names:
        (run / "analysis" / name).write_bytes(PNG)
    return names


def test_figure_names_and_captions_follow_the_paper():
    assert figure2_name("relevant") == "figure2a_pairwise_overlap_relevant.png"
    assert figure2_name("relevant", ["r", "nf"]) == "figure2b_pairwise_overlap_relevant_without_r-nf.png"
    assert figure2_name("non-relevant") == "figure2c_pairwise_overlap_non-relevant.png"
    assert figure2_name("non-relevant", ["r", "nf"]).startswith("figure2d_")
    assert figure3_name(["r", "nf"]) == "figure3_intersections_without_r-nf.png"
    # Figure 4a / 4b = N and F of the in-domain dataset (§6: "the two schemes with the biggest impact").
    assert figure4_name("N_ms@1%", "ms") == "figure4a_layers_N_ms_at_1pct.png"
    assert figure4_name("F_ms@1%", "ms") == "figure4b_layers_F_ms_at_1pct.png"
    assert figure4_name("N_tc@1%", "ms") == "layers_N_tc_at_1pct.png"  # not a figure of the paper
    assert figure4_name("N_cran@1%", "cran").startswith("figure4a_")
    from pathlib import Path

    captions = {name: figure_caption(Path(name)) for name in (
        "figure2b_pairwise_overlap_relevant_without_r-nf.png", "figure2c_pairwise_overlap_non-relevant.png",
        "figure3_intersections.png", "figure3_intersections_without_r-nf.png", "figure4a_layers_N_ms_at_1pct.png",
        "figure4b_layers_F_ms_at_1pct.png", "figure5_layers.png", "table1_baselines.png", "layers_P_tc_at_1pct.png")}
    assert captions["figure2b_pairwise_overlap_relevant_without_r-nf.png"] == \
        "Figure 2b — relevant neurons, without r, nf"
    assert captions["figure2c_pairwise_overlap_non-relevant.png"].startswith("Figure 2c — non-relevant neurons")
    assert captions["figure3_intersections.png"].startswith("Figure 3 — ") and "without" not in \
        captions["figure3_intersections.png"]
    assert captions["figure3_intersections_without_r-nf.png"].endswith("(without r, nf)")
    assert captions["figure4a_layers_N_ms_at_1pct.png"] == "Figure 4a — N_ms at top 1 % per layer and component"
    assert captions["figure4b_layers_F_ms_at_1pct.png"].startswith("Figure 4b — F_ms")
    assert captions["figure5_layers.png"].startswith("Figure 5 — number of important neurons at each layer")
    assert captions["table1_baselines.png"].startswith("Table 1 ")
    assert "not a figure of the paper" in captions["layers_P_tc_at_1pct.png"]


def test_report_reads_top_down(fixture_run):
    from fastnig.evaluation.table4 import PruningTable

    PruningTable.from_csv(fixture_run / "pruning" / "table4.csv").write(fixture_run / "pruning")
    names = _figures(fixture_run)
    settings = json.loads((fixture_run / "config.json").read_text())
    paths = write_report(fixture_run, settings, {"attribution_s": 12.5}, {"attribution_pairs_per_s": 3.0})
    md = paths["md"].read_text()
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles[0] == "What was found" and titles[1] == "Reproduction scorecard" and titles[2] == "Figures"
    assert titles[-2:] == ["Settings", "Timings"]
    assert titles.index("Table 4 — % drop of nDCG@10 when pruning (positive = worse)") < titles.index("Settings")
    assert titles.index("Attribution schemes and convergence delta") == len(titles) - 3
    found = md.split("## Reproduction scorecard")[0]
    # The key numbers: scorecard verdicts, P ∩ N, strongest drops against random, layer peak, Table 1.
    assert "4 PASS, 3 FAIL, 1 N.A." in found
    assert "**P_x ∩ N_x** at 1 %" in found and "ms 2.0 %" in found and "tc 3.0 %" in found
    assert "**Strongest pruning drops** at 1 % on LoTTE benchmark" in found and "N_ms 45.00 % (random -0.50 %" in found
    assert "**Layer peak** of N_ms@1%: layer 23 of 0–23" in found and "**Layer peak** of F_ms@1%: layer 22" in found
    assert "**Table 1**" in found and "0.80 at the input, PAD 0.20" in found
    assert "Figure 2a, Figure 2b, Figure 2c, Figure 2d, Figure 3, Figure 3, Figure 4a, Figure 4b, Figure 5" in found
    # Figures in the paper's order, Table 1's chart after them, extra charts last.
    order = [md.index(f"({name})") for name in names if f"({name})" in md]
    assert len(order) == len(names)
    shown = sorted(names, key=lambda n: md.index(f"({n})"))
    assert shown[:8] == names[:8] and shown[8:] == [FIGURE5, TABLE1_FIGURE, names[8]]
    assert md.index("## Figures") < md.index("(figure2a_") < md.index("## Table 4")
    # The scorecard is a section of the report and is written beside it.
    assert "| FAIL | ∩_O sets larger than ∩_A sets |" in md
    assert (fixture_run / "scorecard.md").is_file() and (fixture_run / "scorecard.csv").is_file()
    page = paths["html"].read_text()
    assert page.index("What was found") < page.index("Reproduction scorecard") < page.index("<figure>") \
        < page.index("<h2>Settings</h2>") < page.index("<h2>Timings</h2>")
    assert "<li><strong>Reproduction scorecard</strong>" in page


def _zero_run(fixture_run, tmp_path):
    """The fixture run again with the zero baseline: smaller Table 4 gaps, a larger mid-layer peak."""
    zero = tmp_path / "zero"
    shutil.copytree(fixture_run, zero)
    cfg = json.loads((zero / "config.json").read_text())
    cfg["name"], cfg["attribution"]["baseline"] = "fixture-zero", "zero"
    (zero / "config.json").write_text(json.dumps(cfg))
    _write_csv(zero / "analysis" / "layers_components.csv", ("set", "layer", "component", "count"),
               _layers("N_ms@1%", {(23, "value"): 20, (8, "value"): 40, (9, "attention_output"): 20})
               + _layers("F_ms@1%", {(22, "value"): 30, (10, "value"): 50}))
    _write_csv(zero / "pruning" / "table4.csv", TABLE4_COLUMNS,
               [_t4_row("P_ms", 1, "ms-dev", "MSMARCO dev set", 2.0),
                _t4_row("N_ms", 1, "ms-dev", "MSMARCO dev set", 3.0)])
    return zero


def test_runs_side_by_side_and_in_the_report(fixture_run, tmp_path, cli):
    zero = _zero_run(fixture_run, tmp_path)
    comp = compare_runs(zero, fixture_run)
    assert comp.run_label == "fixture-zero, baseline zero" and comp.other_label == "fixture, baseline pad"
    n = comp.profiles[0]
    assert n["set"] == "N_ms@1%" and n["this"][8] == 40 and n["other"][23] == 70 and n["mid"] == "6–11"
    t4 = {(r["set"], r["level"], r["group"]): r for r in comp.table4}
    assert t4[("N_ms", 1.0, "MSMARCO dev set")]["this"] == 3.0 and t4[("N_ms", 1.0, "MSMARCO dev set")]["other"] == 4.0
    assert t4[("N_ms", 1.0, "LoTTE benchmark")]["this"] is None
    assert comp.spread()[("MSMARCO dev set", 1.0)] == (1.0, 3.0)  # sets of both runs: N_ms - P_ms, 3 - 2 vs 4 - 1
    md = comp.to_markdown()
    assert "share in the last two layers: 25.0 % (fixture-zero, baseline zero) vs 90.9 % (fixture, baseline pad)" in md
    assert "in the mid layers 6–11: 75.0 % vs 9.1 %" in md  # 60 of 80 vs 7 of 77
    # The report of a run whose config names compare_with ends with the §6 section before the settings.
    settings = json.loads((zero / "config.json").read_text())
    settings["compare_with"] = str(fixture_run)
    text = write_report(zero, settings, {}, {})["md"].read_text()
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert "§6 — this run beside another (impact of the baseline)" in titles
    assert titles.index("§6 — this run beside another (impact of the baseline)") < titles.index("Settings")
    assert "| N_ms | MSMARCO dev set | 1% | 3.00 | 4.00 | -1.00 |" in text
    settings["compare_with"] = str(tmp_path / "not-run-yet")
    assert "no finished run there yet" in write_report(zero, settings, {}, {})["md"].read_text()
    # The same from the command line.
    code, out, err = cli("compare", zero, "--with", fixture_run)
    assert code == 0, err
    assert "Layer profile of N_ms@1%" in out and "NOT THE PAPER'S SETUP" in out
    code, _, err = cli("compare", zero, "--with", tmp_path / "x")
    assert code == 2 and "--with" in err
