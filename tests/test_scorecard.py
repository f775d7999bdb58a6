"""`fastnig compare RUN`: the scorecard of a run folder whose numbers are known (written by hand)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fastnig.report.run_folder import NotARunFolder
from fastnig.report.scorecard import FAIL, NA, PASS, load_reference, scorecard

TABLE4_COLUMNS = (
    "set", "level_percent", "dataset", "group", "num_neurons", "num_queries", "num_candidates",
    "ndcg_original", "ndcg_pruned", "drop_percent", "p_value", "significant",
    "random_repetitions", "random_ndcg_mean", "random_drop_mean", "random_drop_std", "random_significant",
)
PAPER_VALIDATION = {"ms-dev": "MSMARCO dev set", "lotte-science": "LoTTE benchmark",
                    "lotte-writing": "LoTTE benchmark", "lotte-lifestyle": "LoTTE benchmark",
                    "lotte-recreation": "LoTTE benchmark", "lotte-technology": "LoTTE benchmark"}


def _write_csv(path: Path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _config(run: Path, model="castorini/monobert-large-msmarco", datasets=("ms", "f", "tc", "nf", "nq", "tn", "r", "b"),
            in_domain="ms", validation=PAPER_VALIDATION, exclude=("r", "nf")):
    cfg = {"name": "fixture", "model": model, "output": str(run),
           "attribution": {"datasets": {d: d for d in datasets}, "in_domain": [in_domain], "baseline": "pad",
                           "steps": 100},
           "analysis": {"exclude": list(exclude), "layer_percent": 1},
           "pruning": {"validation": {k: {"dataset": k, "group": g} for k, g in validation.items()}}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg))


def _t4_row(set_name, level, dataset, group, drop, significant=False, random_drop=0.5):
    return {"set": set_name, "level_percent": level, "dataset": dataset, "group": group, "num_neurons": 10,
            "num_queries": 200, "num_candidates": 4200, "ndcg_original": 0.7, "ndcg_pruned": 0.7 * (1 - drop / 100),
            "drop_percent": drop, "p_value": 0.01 if significant else 0.5, "significant": significant,
            "random_repetitions": 50, "random_ndcg_mean": 0.7, "random_drop_mean": random_drop,
            "random_drop_std": 0.1, "random_significant": 0}


def _layers(set_name, per_layer_component):
    rows = []
    for layer in range(24):
        for comp in ("query", "key", "value", "attention_output", "intermediate", "ff_output"):
            rows.append({"set": set_name, "layer": layer, "component": comp,
                         "count": per_layer_component.get((layer, comp), 0)})
    return rows


@pytest.fixture
def fixture_run(tmp_path):
    """A paper-setup run whose numbers make 4 claims PASS, 3 FAIL and 1 N.A. (F_ms is not pruned)."""
    run = tmp_path / "run"
    _config(run)
    a = run / "analysis"
    _write_csv(a / "baselines.csv", ("baseline", "mean_difference", "quality"), [
        {"baseline": "original", "mean_difference": 0.8, "quality": 1.0},
        {"baseline": "pad", "mean_difference": 0.2, "quality": 0.25},
        {"baseline": "pad-query", "mean_difference": 0.72, "quality": 0.9},
        {"baseline": "zero", "mean_difference": 0.4, "quality": 0.5},
        {"baseline": "zero-query", "mean_difference": 0.8, "quality": 1.0}])
    inter_cols = ("curve", "name", "label", "datasets", "level_percent", "set_size", "common", "percent")
    inter = []
    for level, ms_pn, tc_pn, cap_o, cap_a in ((0.01, 0.0, 20.0, 50.0, 40.0), (0.1, 1.0, 4.0, 30.0, 20.0),
                                              (1, 2.0, 3.0, 25.0, 25.0)):
        inter += [{"curve": "P_cap_N", "name": "P_ms ∩ N_ms", "label": "both", "datasets": "ms+ms",
                   "level_percent": level, "percent": ms_pn},
                  {"curve": "P_cap_N", "name": "P_tc ∩ N_tc", "label": "both", "datasets": "tc+tc",
                   "level_percent": level, "percent": tc_pn},
                  {"curve": "cap_O", "name": "∩_O P", "label": "relevant", "datasets": "f+tc",
                   "level_percent": level, "percent": cap_o},
                  {"curve": "cap_A", "name": "∩_A P", "label": "relevant", "datasets": "ms+f+tc",
                   "level_percent": level, "percent": cap_a}]
    _write_csv(a / "intersections.csv", inter_cols, inter)
    pair_cols = ("label", "scheme_a", "scheme_b", "dataset_a", "dataset_b", "pair_kind", "level_percent",
                 "set_size", "common", "overlap_percent")
    pairs = []
    for level in (0.1, 1):
        pairs += [{"label": "relevant", "scheme_a": "P_ms", "scheme_b": "P_tc", "pair_kind": "ID-OOD",
                   "level_percent": level, "overlap_percent": 10.0},
                  {"label": "relevant", "scheme_a": "P_ms", "scheme_b": "P_f", "pair_kind": "ID-OOD",
                   "level_percent": level, "overlap_percent": 20.0},
                  {"label": "relevant", "scheme_a": "P_f", "scheme_b": "P_tc", "pair_kind": "OOD-OOD",
                   "level_percent": level, "overlap_percent": 25.0}]
    _write_csv(a / "pairwise_overlap_without_r-nf.csv", pair_cols, pairs)
    # The unexcluded file says the opposite: the claim must read the r/nf-excluded one (Fig. 2b/2d).
    _write_csv(a / "pairwise_overlap.csv", pair_cols, [dict(r, overlap_percent=50.0) if r["pair_kind"] == "ID-OOD"
                                                       else r for r in pairs])
    layer_cols = ("set", "layer", "component", "count")
    _write_csv(a / "layers_components.csv", layer_cols,
               _layers("P_ms@1%", {(3, "query"): 100})
               + _layers("N_ms@1%", {(23, "value"): 40, (23, "attention_output"): 30, (10, "value"): 5,
                                     (10, "key"): 2})
               + _layers("F_ms@1%", {(22, "key"): 50, (22, "value"): 10, (22, "attention_output"): 20}))
    rows = []
    for level in (0.1, 1):
        big = 10 if level == 0.1 else 1
        rows += [_t4_row("P_ms", level, "ms-dev", "MSMARCO dev set", 1.0 * big),
                 _t4_row("N_ms", level, "ms-dev", "MSMARCO dev set", 4.0 * big, True),
                 _t4_row("P_ms", level, "lotte-science", "LoTTE benchmark", 2.0),
                 _t4_row("P_ms", level, "lotte-writing", "LoTTE benchmark", 4.0),
                 _t4_row("N_ms", level, "lotte-science", "LoTTE benchmark", 40.0, True, random_drop=-2.5),
                 _t4_row("N_ms", level, "lotte-writing", "LoTTE benchmark", 50.0, True, random_drop=1.5),
                 _t4_row("F_A", level, "ms-dev", "MSMARCO dev set", 0.5)]
    _write_csv(run / "pruning" / "table4.csv", TABLE4_COLUMNS, rows)
    return run


def test_each_claim_verdict_on_the_fixture(fixture_run):
    card = scorecard(fixture_run)
    assert card.paper_setup
    verdicts = {c.key: c.verdict for c in card.claims}
    assert verdicts == {
        "p_cap_n_empty": PASS,         # worst in [0.1, 1] %: 4 % (the 20 % at 0.01 % is outside the range)
        "ood_above_id": PASS,          # 25 % > mean(10, 20) % in the without_r-nf file
        "cap_o_above_cap_a": FAIL,     # equal at 1 %
        "n_above_p": PASS,
        "f_top2": NA,                  # F_ms was not pruned
        "random_small": FAIL,          # |-2.5| > 2 on lotte-science
        "last_layers_peak": PASS,      # N_ms peaks at 23, F_ms at 22 (of 0-23)
        "value_attention_output": FAIL,  # F_ms: key 50 > value 10
    }
    assert "4.00 %" in card.claim("p_cap_n_empty").detail
    assert "pairwise_overlap_without_r-nf.csv" in card.claim("ood_above_id").detail
    assert "lotte-science" in card.claim("random_small").detail
    assert card.counts() == {PASS: 4, FAIL: 3, NA: 1}


def test_numeric_side_by_side(fixture_run):
    card = scorecard(fixture_run)
    t1 = {c.item: c for c in card.cells if c.table == "Table 1"}
    # The paper's Table 1 is the mean difference itself (1 at the input), not a ratio.
    assert t1["pad"].ours == 0.2 and t1["pad"].difference == pytest.approx(0.2 - 0.21)
    assert t1["zero"].difference == pytest.approx(0.4 - 0.67)
    assert t1["original"].difference == pytest.approx(0.8 - 1.0)
    t4 = {(c.item, c.group, c.level_percent): c for c in card.cells if c.table == "Table 4"}
    n = t4[("N_ms", "LoTTE benchmark", 1.0)]
    assert n.ours == pytest.approx(45.0) and n.paper == 48.40 and n.difference == pytest.approx(45.0 - 48.40)
    assert (n.ours_significant, n.paper_significant) == (2, 5)
    p = t4[("P_ms", "MSMARCO dev set", 0.1)]
    assert p.difference == pytest.approx(10.0 - 4.87)
    missing = t4[("inter(O, P)", "MSMARCO dev set", 1.0)]
    assert missing.ours is None and missing.paper == 3.54 and missing.difference is None
    assert t4[("N_ms", "MSMARCO dev set", 0.01)].ours is None  # the run has no 0.01 % level
    # Random baseline: mean over sets of each set's group mean (P, N, F_A: 0.5; N on LoTTE: (-2.5 + 1.5) / 2).
    rnd = t4[("random", "LoTTE benchmark", 1.0)]
    assert rnd.ours == pytest.approx((0.5 + (-0.5)) / 2) and rnd.paper == -0.93
    assert rnd.difference == pytest.approx(0.0 + 0.93)
    assert t4[("random", "MSMARCO dev set", 1.0)].ours == pytest.approx(0.5)


def test_renders_and_writes(fixture_run):
    card = scorecard(fixture_run)
    text = card.to_text()
    assert "4 PASS, 3 FAIL, 1 N.A." in text and "not the paper's setup" not in text.lower()
    assert any(l.strip().startswith("N.A.") and "F_ms" in l for l in text.splitlines())
    md = card.to_markdown()
    assert "| FAIL | ∩_O sets larger than ∩_A sets |" in md and "| ours − paper |" in md
    paths = card.write()
    assert paths["md"] == fixture_run / "scorecard.md" and paths["md"].read_text().startswith("# Reproduction")
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    claims = {r["item"]: r["verdict"] for r in rows if r["section"] == "claim"}
    assert claims["random_small"] == FAIL and claims["f_top2"] == NA
    pad = next(r for r in rows if r["section"] == "Table 1" and r["item"] == "pad")
    assert float(pad["difference"]) == pytest.approx(-0.01)


def test_the_papers_own_table4_passes_its_table4_claims(tmp_path):
    """A run whose Table 4 is the paper's: differences 0, and the Table 4 claims hold."""
    ref = load_reference("paper")
    run = tmp_path / "paper-numbers"
    _config(run)
    rnd = {(c["group"], c["level_percent"]): c["drop_percent"] for c in ref["table4"]["random"]}
    dataset = {"MSMARCO dev set": "ms-dev", "LoTTE benchmark": "lotte-science"}
    rows = [_t4_row(c["set"], c["level_percent"], dataset[c["group"]], c["group"], c["drop_percent"],
                    c["num_significant"] > 0, random_drop=rnd[(c["group"], c["level_percent"])])
            for c in ref["table4"]["cells"]]
    _write_csv(run / "pruning" / "table4.csv", TABLE4_COLUMNS, rows)
    card = scorecard(run)
    t4 = [c for c in card.cells if c.table == "Table 4"]
    assert len(t4) == 66 and all(c.difference == pytest.approx(0, abs=1e-9) for c in t4)
    verdicts = {c.key: c.verdict for c in card.claims}
    assert verdicts["n_above_p"] == verdicts["f_top2"] == verdicts["random_small"] == PASS
    assert verdicts["p_cap_n_empty"] == verdicts["last_layers_peak"] == NA  # no analysis files
    assert not [c for c in card.cells if c.table == "Table 1"]


def test_demo_like_run_is_labelled_and_matched_by_role(tmp_path):
    run = tmp_path / "demo"
    _config(run, model="demo", datasets=("cran", "nf"), in_domain="cran",
            validation={"cran": "Cranfield (held-out queries)"}, exclude=())
    _write_csv(run / "pruning" / "table4.csv", TABLE4_COLUMNS,
               [_t4_row("P_cran", 1, "cran", "Cranfield (held-out queries)", 3.0),
                _t4_row("N_cran", 1, "cran", "Cranfield (held-out queries)", 6.0),
                _t4_row("F_cran", 1, "cran", "Cranfield (held-out queries)", 5.0),
                _t4_row("F_A", 1, "cran", "Cranfield (held-out queries)", 1.0)])
    card = scorecard(run)
    assert not card.paper_setup and any("model demo" in d for d in card.setup_differences)
    assert "NOT THE PAPER'S SETUP" in card.to_text() and "[not the paper's setup]" in card.to_text()
    cells = [c for c in card.cells if c.table == "Table 4" and c.item == "P_cran" and c.paper is not None]
    assert len(cells) == 6 and all(c.paper_item == "P_ms" and c.ours is None for c in cells)
    ours = [c for c in card.cells if c.group == "Cranfield (held-out queries)" and c.item == "N_cran"]
    assert ours[0].ours == 6.0 and ours[0].paper is None
    verdicts = {c.key: c.verdict for c in card.claims}
    assert verdicts["n_above_p"] == PASS and verdicts["f_top2"] == PASS  # F_cran second of four
    # The paper's groups have no number of this run: left out of the printout, kept in the CSV.
    text = card.to_text()
    assert "no number of this run in: MSMARCO dev set, LoTTE benchmark" in text and "52.09" not in text
    assert "Cranfield (held-out queries)" in text
    assert any(r.get("paper") == 52.09 for r in card.rows())
    assert verdicts["ood_above_id"] == NA


def test_not_a_run_folder(tmp_path):
    with pytest.raises(NotARunFolder, match="no config.json"):
        scorecard(tmp_path)
    with pytest.raises(NotARunFolder, match="not a folder"):
        scorecard(tmp_path / "missing")
    _config(tmp_path / "r")
    with pytest.raises(ValueError, match="reference 'nope' unknown"):
        scorecard(tmp_path / "r", reference="nope")


def test_compare_cli(fixture_run, tmp_path, cli):
    code, out, err = cli("compare", fixture_run)
    assert code == 0, err
    assert "Qualitative claims: 4 PASS, 3 FAIL, 1 N.A." in out
    assert (fixture_run / "scorecard.md").is_file() and (fixture_run / "scorecard.csv").is_file()
    code, _, err = cli("compare", tmp_path / "nothing-here")
    assert code == 2
    assert err.startswith("fastnig compare: error:") and len(err.strip().splitlines()) == 1
