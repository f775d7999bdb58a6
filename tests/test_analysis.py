"""The RQ1/RQ2 analyses on hand-made schemes: numbers, CSV files, figures and ``fastnig analyze``."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fastnig.analysis import neuron_analyses as analysis
from fastnig.analysis import table1 as table1_files
from fastnig.engine.attribute import Attributions
from fastnig.evaluation import table1 as baselines
from fastnig.neurons.fusion import fuse
from fastnig.neurons.scheme import Scheme

L0Q, L0I = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense"
L1V, L1F = "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.1.output.dense"
SIZES = {L0Q: 2, L0I: 3, L1V: 2, L1F: 3}   # flat neurons: 0-1 L0Q, 2-4 L0I, 5-6 L1V, 7-9 L1F
SETTINGS = {"model": "tiny", "output": "probability", "baseline": "pad", "steps": 8, "rule": "trapezoid",
            "max_length": 512, "dtype": "float32"}

# Neurons from most to least important, per scheme; "nf" has no non-relevant judgments.
ORDERS = {
    ("ms", "relevant"): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    ("tc", "relevant"): [0, 2, 1, 5, 3, 4, 6, 7, 8, 9],
    ("nf", "relevant"): [2, 0, 5, 1, 9, 8, 7, 6, 4, 3],
    ("ms", "non-relevant"): [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ("tc", "non-relevant"): [9, 0, 8, 7, 6, 5, 4, 3, 2, 1],
}
LEVELS = (10, 20, 30)   # 10 neurons: top 1, 2 and 3


def scheme_from_order(dataset, label, order):
    """One pair whose NIG ranks the neurons as ``order`` (10 for the first, 1 for the last)."""
    values = torch.zeros(10)
    for rank, neuron in enumerate(order):
        values[neuron] = 10 - rank
    scores, start = {}, 0
    for m, n in SIZES.items():
        scores[m] = values[start:start + n].unsqueeze(0)
        start += n
    attributions = Attributions(scores, torch.tensor([0.01]), torch.tensor([0.9]), torch.tensor([0.2]), [label],
                                torch.tensor([12]), {**SETTINGS, "target": label})
    scheme = Scheme.empty(SIZES, {"model": "tiny", "dataset": dataset, "label": label})
    scheme.add(attributions, [f"{dataset}-{label}-1"])
    return scheme.mark_dropped([f"{dataset}-{label}-2"])


@pytest.fixture
def schemes():
    return [scheme_from_order(d, l, o) for (d, l), o in ORDERS.items()]


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def curve(rows, **match):
    """``{level: value}`` of the rows matching ``match``; value = overlap_percent or percent."""
    out = {}
    for r in rows:
        if all(str(r[k]) == str(v) for k, v in match.items()):
            value = r["overlap_percent"] if "overlap_percent" in r else r["percent"]
            out[float(r["level_percent"])] = round(float(value), 4)
    return out


def assert_png(path: Path):
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 0, path
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas


# Hand-computed from ORDERS at the top 1 / 2 / 3 neurons.
PAIRWISE = {
    ("relevant", "ms", "tc", "ID-OOD"): {10: 100.0, 20: 50.0, 30: 100.0},
    ("relevant", "ms", "nf", "ID-OOD"): {10: 0.0, 20: 50.0, 30: 66.6667},
    ("relevant", "nf", "tc", "OOD-OOD"): {10: 0.0, 20: 100.0, 30: 66.6667},
    ("non-relevant", "ms", "tc", "ID-OOD"): {10: 100.0, 20: 50.0, 30: 66.6667},
}
INTERSECTIONS = {
    ("cap_O", "relevant", "nf+tc"): {10: 0.0, 20: 100.0, 30: 66.6667},
    ("cap_A", "relevant", "ms+nf+tc"): {10: 0.0, 20: 50.0, 30: 66.6667},
    ("cap_A", "non-relevant", "ms+tc"): {10: 100.0, 20: 50.0, 30: 66.6667},
    ("P_cap_N", "both", "ms+ms"): {10: 0.0, 20: 0.0, 30: 0.0},
    ("P_cap_N", "both", "tc+tc"): {10: 0.0, 20: 50.0, 30: 33.3333},
}


def test_pairwise_overlaps_match_hand_computed_values(schemes, tmp_path):
    rows = analysis.pairwise_overlaps(schemes, tmp_path, levels=LEVELS)
    assert len(rows) == 4 * 3
    for (label, a, b, kind), expected in PAIRWISE.items():
        assert curve(rows, label=label, dataset_a=a, dataset_b=b, pair_kind=kind) == expected
    table = read_csv(tmp_path / "pairwise_overlap.csv")
    assert tuple(table[0]) == analysis.PAIRWISE_COLUMNS
    for (label, a, b, kind), expected in PAIRWISE.items():
        assert curve(table, label=label, dataset_a=a, dataset_b=b, pair_kind=kind) == expected
    row = next(r for r in table if r["dataset_b"] == "nf" and r["level_percent"] == "30.0" and r["dataset_a"] == "ms")
    assert (row["scheme_a"], row["scheme_b"], row["set_size"], row["common"]) == ("P_ms", "P_nf", "3", "2")
    assert_png(tmp_path / "figure2a_pairwise_overlap_relevant.png")
    assert_png(tmp_path / "figure2c_pairwise_overlap_non-relevant.png")


def test_excluding_datasets_and_ranking_by_abs(schemes, tmp_path):
    rows = analysis.pairwise_overlaps(schemes, tmp_path, levels=LEVELS, exclude=["nf"])
    assert {(r["dataset_a"], r["dataset_b"]) for r in rows} == {("ms", "tc")}
    assert (tmp_path / "pairwise_overlap_without_nf.csv").is_file()
    assert_png(tmp_path / "figure2b_pairwise_overlap_relevant_without_nf.png")
    # All values are positive here, so ranking by |mean| changes nothing.
    by_abs = analysis.pairwise_overlaps(schemes, levels=LEVELS, by="abs")
    assert [r["overlap_percent"] for r in by_abs] == [
        r["overlap_percent"] for r in analysis.pairwise_overlaps(schemes, levels=LEVELS)]


def test_intersection_summary_matches_hand_computed_values(schemes, tmp_path):
    rows = analysis.intersection_summary(schemes, tmp_path, levels=LEVELS)
    table = read_csv(tmp_path / "intersections.csv")
    assert tuple(table[0]) == analysis.INTERSECTION_COLUMNS
    for source in (rows, table):
        assert {(r["curve"], r["label"], r["datasets"]) for r in source} == set(INTERSECTIONS)
        for (name, label, datasets), expected in INTERSECTIONS.items():
            assert curve(source, curve=name, label=label, datasets=datasets) == expected
    names = {r["name"] for r in table}
    assert {"∩_O P", "∩_A P", "∩_A N", "P_tc ∩ N_tc"} <= names
    assert_png(tmp_path / "figure3_intersections.png")
    # Without nf only tc is out of domain: no ∩_O curve left, ∩_A P = P_ms ∩ P_tc.
    rows = analysis.intersection_summary(schemes, tmp_path, levels=LEVELS, exclude=["nf"])
    assert curve(rows, curve="cap_A", label="relevant") == {10: 100.0, 20: 50.0, 30: 100.0}
    assert not [r for r in rows if r["curve"] == "cap_O"]
    assert_png(tmp_path / "figure3_intersections_without_nf.png")


def test_layer_component_counts(schemes, tmp_path):
    p_ms = schemes[0].top(30)   # neurons 0, 1, 2
    rows = analysis.layer_component_counts([p_ms], tmp_path)
    expected = [(0, "query", 2), (0, "intermediate", 1), (1, "value", 0), (1, "ff_output", 0)]
    assert [(r["layer"], r["component"], r["count"]) for r in rows] == expected
    table = read_csv(tmp_path / "layers_components.csv")
    assert [(r["set"], int(r["layer"]), r["component"], int(r["count"])) for r in table] == [
        ("P_ms@30%", *e) for e in expected]
    assert_png(tmp_path / "layers_P_ms_at_30pct.png")


@pytest.mark.slow
def test_analyze_writes_every_table_and_figure(schemes, tmp_path):
    tables = analysis.analyze(schemes, tmp_path, levels=LEVELS, exclude=["nf"], layer_percent=30)
    assert set(tables) == {"schemes", "pairwise_overlap", "intersections", "pairwise_overlap_without_nf",
                           "intersections_without_nf", "layers_components", "layer_profile"}
    summary = read_csv(tmp_path / "schemes.csv")
    assert [(r["name"], r["pairs"], r["dropped"], r["steps"]) for r in summary] == [
        ("P_ms", "1", "1", "8"), ("N_ms", "1", "1", "8"), ("P_nf", "1", "1", "8"),
        ("P_tc", "1", "1", "8"), ("N_tc", "1", "1", "8")]
    assert float(summary[0]["mean_abs_delta"]) == pytest.approx(0.01)
    layers = read_csv(tmp_path / "layers_components.csv")
    sets = list(dict.fromkeys(r["set"] for r in layers))
    assert sets == ["P_ms@30%", "N_ms@30%", "P_nf@30%", "P_tc@30%", "N_tc@30%", "F_ms@30%", "F_tc@30%", "F_A@30%"]
    # F_ms: P_ms and N_ms rank in opposite orders, so every neuron ties at 5.5 and
    # the tie rule (model order) keeps neurons 0, 1, 2.
    f_ms = {(r["layer"], r["component"]): int(r["count"]) for r in layers if r["set"] == "F_ms@30%"}
    assert f_ms == {("0", "query"): 2, ("0", "intermediate"): 1, ("1", "value"): 0, ("1", "ff_output"): 0}
    # File names follow the paper's numbering: Figures 2a-d, 3, 4a (N_ms), 4b (F_ms), 5.
    for name in ("figure2a_pairwise_overlap_relevant", "figure2c_pairwise_overlap_non-relevant",
                 "figure3_intersections", "figure2b_pairwise_overlap_relevant_without_nf",
                 "figure3_intersections_without_nf", "figure4a_layers_N_ms_at_30pct", "figure4b_layers_F_ms_at_30pct",
                 "layers_F_A_at_30pct", "layers_P_ms_at_30pct", "figure5_layers"):
        assert_png(tmp_path / f"{name}.png")
    assert_png(tmp_path / "figure2d_pairwise_overlap_non-relevant_without_nf.png")
    assert not list(tmp_path.glob("layers_N_ms*")) and not list(tmp_path.glob("figure4*_P_*"))
    # Figure 5: neurons per layer of P, N, F of the in-domain dataset and F_A (default sets).
    profile = read_csv(tmp_path / "layer_profile.csv")
    assert list(dict.fromkeys(r["expression"] for r in profile)) == ["P_ms", "N_ms", "F_ms", "F_A"]
    per_layer = {(r["expression"], r["layer"]): int(r["count"]) for r in profile}
    assert per_layer[("F_ms", "0")] == 3 and per_layer[("F_ms", "1")] == 0
    assert sum(v for (e, _), v in per_layer.items() if e == "N_ms") == 3
    # Given sets (a run passes its pruned sets): only those, and unknown ones are left out.
    tables = analysis.analyze(schemes, tmp_path / "given", levels=LEVELS, layer_percent=30,
                              profile=["inter(O, P)", "N_nf", "F_A"])
    assert [r["expression"] for r in tables["layer_profile"]][::2] == ["inter(O, P)", "F_A"]


def test_schemes_of_one_dataset_and_label_are_merged(schemes):
    extra = scheme_from_order("tc", "relevant", ORDERS[("tc", "relevant")])
    extra.pair_ids[:] = ["another-pair"]
    extra._seen = {"another-pair"}
    index = analysis.index_schemes(schemes + [extra])
    assert index[("tc", "relevant")].count == 2
    assert list(index)[0] == ("ms", "relevant")
    with pytest.raises(ValueError, match="are in both"):
        analysis.index_schemes(schemes + [scheme_from_order("tc", "relevant", ORDERS[("tc", "relevant")])])


def test_analyses_refuse_mixed_settings_and_bad_levels(schemes):
    odd = scheme_from_order("nq", "relevant", list(range(10)))
    odd.settings["steps"] = 50
    with pytest.raises(ValueError, match=r"settings\['steps'\] 8 vs 50"):
        analysis.pairwise_overlaps(schemes + [odd])
    with pytest.raises(ValueError, match="levels"):
        analysis.pairwise_overlaps(schemes, levels=[0])
    with pytest.raises(ValueError, match="by must be one of"):
        analysis.intersection_summary(schemes, by="rank")


# --------------------------------------------------------------------- CLI
def test_fastnig_analyze_on_saved_scheme_files(schemes, tmp_path, capsys):
    from fastnig.cli import main

    runs = tmp_path / "runs"
    for s in schemes:
        s.save(runs / s.name)
    fuse(schemes[0], schemes[3]).save(runs / "fusions" / "F_ms")  # skipped: fusions are derived
    out = tmp_path / "report"
    rc = main(["analyze", str(runs), "--out", str(out), "--levels", "10", "20", "30", "--exclude", "nf",
               "--layer-percent", "30"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "read 5 scheme(s)" in printed and "skipping F_ms" in printed and "layers_F_A_at_30pct.png" in printed
    assert "figure4a_layers_N_ms_at_30pct.png" in printed and "figure5_layers.png" in printed
    table = read_csv(out / "pairwise_overlap.csv")
    for (label, a, b, kind), expected in PAIRWISE.items():
        assert curve(table, label=label, dataset_a=a, dataset_b=b, pair_kind=kind) == expected
    table = read_csv(out / "intersections_without_nf.csv")
    assert curve(table, curve="cap_A", label="relevant") == {10: 100.0, 20: 50.0, 30: 100.0}
    assert_png(out / "figure2c_pairwise_overlap_non-relevant.png")
    # Files can also be named one by one, with or without ".json".
    rc = main(["analyze", str(runs / "P_ms"), str(runs / "P_tc.json"), "-o", str(tmp_path / "two"),
               "--levels", "10", "20"])
    assert rc == 0
    assert curve(read_csv(tmp_path / "two" / "pairwise_overlap.csv"), dataset_b="tc") == {10: 100.0, 20: 50.0}


def test_fastnig_analyze_help_and_errors(tmp_path, capsys):
    from fastnig.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("INPUTS", "OUTPUTS", "EXAMPLE", "pairwise_overlap.csv", "--exclude", "--baseline-model"):
        assert words in text
    assert main(["analyze", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    assert "no such scheme file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert main(["analyze", "-o", str(tmp_path / "out")]) == 2


# ------------------------------------------------------------------ Table 1
def independent_differences(model, tokenizer, pairs, max_length=512):
    """P(rel) - P(non-rel) per baseline, from input ids / embeddings built by hand, one pair at a time."""
    words = model.get_input_embeddings()
    out = {name: [] for name in ("original", "pad", "pad-query", "zero", "zero-query")}
    for query, passage in pairs:
        enc = tokenizer(query, passage, truncation="only_second", max_length=max_length,
                        return_special_tokens_mask=True, return_tensors="pt")
        ids = enc["input_ids"]
        special = enc["special_tokens_mask"].bool()
        in_query = torch.tensor([[s == 0 for s in enc.sequence_ids()]])
        extra = {"attention_mask": enc["attention_mask"]}
        if "token_type_ids" in tokenizer.model_input_names:
            extra["token_type_ids"] = enc["token_type_ids"]

        def difference(**inputs):
            logits = model(**inputs, **extra).logits[0]
            if logits.numel() == 1:
                return float(torch.sigmoid(logits[0]) - torch.sigmoid(-logits[0]))
            p = torch.softmax(logits, -1)
            return float(p[1] - p[0])

        with torch.no_grad():
            pad = torch.full_like(ids, tokenizer.pad_token_id)
            out["original"].append(difference(input_ids=ids))
            out["pad"].append(difference(input_ids=torch.where(special, ids, pad)))
            out["pad-query"].append(difference(input_ids=torch.where(in_query & ~special, pad, ids)))
            out["zero"].append(difference(inputs_embeds=words(ids) * special.unsqueeze(-1)))
            out["zero-query"].append(difference(inputs_embeds=words(ids) * (~(in_query & ~special)).unsqueeze(-1)))
    return {k: sum(v) / len(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind, num_labels", [("bert", 2), ("distilbert", 1)])
def test_baseline_quality_matches_an_independent_computation(kind, num_labels):
    from tiny_models import PAIRS, make_model, make_tokenizer

    tokenizer = make_tokenizer(kind)
    model = make_model(kind, num_labels=num_labels, vocab_size=tokenizer.vocab_size, seed=3)
    with torch.no_grad():  # a [PAD] embedding that is not zero (nor constant: LayerNorm
        # would remove it), so that "pad" differs from "zero"
        weight = model.get_input_embeddings().weight
        weight[tokenizer.pad_token_id] = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
    pairs = PAIRS + [("heat flow", "laminar boundary layer heat transfer"), ("diet", "vitamin study")]
    expected = independent_differences(model, tokenizer, pairs)
    assert len({round(v, 6) for v in expected.values()}) == 5  # the five really differ
    diffs = baselines.baseline_differences(model, tokenizer, pairs, batch_size=4)
    quality = baselines.baseline_quality(model, tokenizer, pairs, batch_size=3)
    assert list(quality) == ["original", "pad", "pad-query", "zero", "zero-query"]
    for name, value in expected.items():
        assert diffs[name] == pytest.approx(value, abs=1e-6)
        assert quality[name] == pytest.approx(value / expected["original"], rel=1e-5, abs=1e-6)
    assert quality["original"] == 1.0


def test_baseline_table_and_cli(tiny_bert, tokenizer, tmp_path, capsys):
    from fastnig.cli import main

    rows = table1_files.baseline_table({"original": 0.5, "pad": 0.1, "zero": -0.25}, tmp_path, pairs=7, dataset="ms")
    assert [(r["baseline"], r["quality"]) for r in rows] == [("original", 1.0), ("pad", 0.2), ("zero", -0.5)]
    table = read_csv(tmp_path / "baselines.csv")
    assert tuple(table[0]) == table1_files.BASELINE_COLUMNS
    # Each row has the original input's value beside it, and what it was averaged over.
    assert [(r["baseline"], float(r["mean_difference"]), float(r["original_difference"]), float(r["quality"]),
             r["pairs"], r["dataset"]) for r in table] == [
        ("original", 0.5, 0.5, 1.0, "7", "ms"), ("pad", 0.1, 0.5, 0.2, "7", "ms"),
        ("zero", -0.25, 0.5, -0.5, "7", "ms")]
    assert_png(tmp_path / "table1_baselines.png")
    with pytest.raises(ValueError, match="baselines"):
        baselines.baseline_quality(tiny_bert, tokenizer, [("a", "b")], baselines=["blank"])

    from tiny_models import PAIRS

    model_dir = tmp_path / "model"
    tiny_bert.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("".join(f"{q}\t{p}\n" for q, p in PAIRS) + '{"query": "diet", "passage": "vitamin"}\n')
    out = tmp_path / "report"
    assert main(["analyze", "--baseline-model", str(model_dir), "--baseline-pairs", str(pairs_file),
                 "--baseline-max-pairs", "3", "--out", str(out), "--device", "cpu"]) == 0
    # Table 1's protocol: only the pairs the model judges relevant (P(rel) > 0.5), the first 3 of them.
    from fastnig.engine.scoring import score_pairs

    every = PAIRS + [("diet", "vitamin")]
    p_rel = score_pairs(tiny_bert, tokenizer, every, output="probability").tolist()
    agreeing = [pair for pair, p in zip(every, p_rel) if p > 0.5][:3]
    assert agreeing, "the tiny model judges no pair relevant; pick other pairs"
    expected = baselines.baseline_differences(tiny_bert, tokenizer, agreeing)
    table = read_csv(out / "baselines.csv")
    assert [r["baseline"] for r in table] == list(expected)
    for r in table:
        assert float(r["mean_difference"]) == pytest.approx(expected[r["baseline"]], rel=1e-5, abs=1e-6)
        assert int(r["pairs"]) == len(agreeing)
    assert "judges relevant" in capsys.readouterr().out
    assert main(["analyze", "--baseline-model", str(model_dir), "-o", str(out)]) == 2
