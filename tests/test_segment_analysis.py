"""The segment analysis (issue 14): fusions keep segment means, segments.csv + figure, config/CLI, report line."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_labels import graded  # noqa: F401  (fixture: a small graded local collection)
from test_segments import SIZES, _attributions

from fastnig.analysis.neuron_analyses import analyze
from fastnig.analysis.segments import SEGMENT_COLUMNS, layer_shares, segment_figure_name, segment_table
from fastnig.engine.encoding import SEGMENTS
from fastnig.neurons.fusion import fuse, fuse_all
from fastnig.neurons.scheme import Scheme
from fastnig.neurons.segment_shares import segment_shares
from fastnig.report.document import figure_caption, segment_lines
from fastnig.study.config import ConfigError, load_config


def _scheme(dataset, label, seed, num=4, segments=True):
    """A scheme of ``num`` random pairs (test_segments' attributions, re-targeted to ``label``)."""
    att = _attributions(num, seed, segments=segments)
    att.targets = [label] * num
    att.settings["target"] = label
    scheme = Scheme.empty(SIZES, {"model": "tiny", "dataset": dataset, "label": label})
    return scheme.add(att, [f"{dataset}-{label}-{seed}-{i}" for i in range(num)])


def _four(segments=True):
    return [_scheme(d, label, seed, segments=segments) for seed, (d, label) in enumerate(
        [("ms", "relevant"), ("ms", "non-relevant"), ("nf", "relevant"), ("nf", "non-relevant")])]


def _read(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fusions_average_the_segment_means_and_keep_them_on_disk(tmp_path):
    p, n, p2, n2 = _four()
    f = fuse(p, n)
    assert f.has_segments and f.is_fused
    ps, ns, fs = p.segment_means(), n.segment_means(), f.segment_means()
    for m in SIZES:
        assert fs[m].shape == (len(SEGMENTS), SIZES[m])
        assert torch.equal(fs[m], (ps[m] + ns[m]) / 2)
        torch.testing.assert_close(fs[m].sum(0), f.mean[m], rtol=1e-6, atol=1e-6)
    every = fuse_all([p, n, p2, n2])
    parts = [s.segment_means() for s in (p, n, p2, n2)]
    for m in SIZES:
        torch.testing.assert_close(every.segment_means()[m], sum(x[m] for x in parts) / 4, rtol=1e-12, atol=0)
    loaded = Scheme.load(f.save(tmp_path / "F_ms"))
    assert loaded.is_fused and loaded.has_segments
    for m in SIZES:
        assert torch.equal(loaded.segment_means()[m], fs[m]) and torch.equal(loaded.mean[m], f.mean[m])
    # A fusion of schemes without segments has none, on disk neither.
    plain = fuse(*_four(segments=False)[:2])
    assert not plain.has_segments and plain.segment_means() is None
    assert not Scheme.load(plain.save(tmp_path / "F_plain")).has_segments


def test_analyze_writes_the_segment_table_and_figure(tmp_path):
    schemes = _four()
    tables = analyze(schemes, tmp_path, levels=[10, 40], in_domain="ms", layer_percent=40)
    rows = _read(tmp_path / "segments.csv")
    assert list(rows[0]) == list(SEGMENT_COLUMNS) and len(rows) == len(tables["segments"])
    sets = list(dict.fromkeys(r["set"] for r in rows))
    assert sets == ["P_ms@40%", "N_ms@40%", "P_nf@40%", "N_nf@40%", "F_ms@40%", "F_nf@40%", "F_A@40%"]
    f_ms = fuse(schemes[0], schemes[1])
    top = f_ms.top(40)
    expected = segment_shares(f_ms, top)
    got = [r for r in rows if r["set"] == "F_ms@40%"]
    assert [(int(r["layer"]), r["component"]) for r in got] == [(e["layer"], e["component"]) for e in expected]
    for r, e in zip(got, expected):
        for s in SEGMENTS:
            assert float(r[f"{s}_share"]) == pytest.approx(e[f"{s}_share"])
            assert int(r[f"{s}_dominant"]) == e[f"{s}_dominant"]
        assert float(r["level"]) == 40.0
    for name in sets:  # dominant counts partition each set; shares sum to 1 where the set has members
        members = [r for r in rows if r["set"] == name]
        assert sum(int(r[f"{s}_dominant"]) for r in members for s in SEGMENTS) == sum(int(r["neurons"])
                                                                                     for r in members)
        for r in members:
            if float(r["magnitude"]) > 0:
                assert sum(float(r[f"{s}_share"]) for s in SEGMENTS) == pytest.approx(1.0)
    # Per layer, shares pooled over components by magnitude sum to 1.
    pooled = layer_shares(tables["segments"], "P_ms")
    assert set(pooled) == {0, 1} and all(sum(v) == pytest.approx(1.0) for v in pooled.values() if any(v))
    png = tmp_path / segment_figure_name("ms", 40)
    assert png.name == "segments_ms_at_40pct.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure_caption(png).startswith("Segments")


def test_schemes_without_segments_analyse_without_a_segment_table(tmp_path):
    tables = analyze(_four(segments=False), tmp_path, levels=[10], in_domain="ms", layer_percent=40)
    assert "segments" not in tables and (tmp_path / "layers_components.csv").exists()
    assert not (tmp_path / "segments.csv").exists() and not list(tmp_path.glob("segments_*.png"))
    assert segment_table(_four(segments=False), tmp_path) == []


def test_the_report_says_which_share_of_p_and_n_acts_through_each_segment(tmp_path):
    analyze(_four(), tmp_path / "analysis", levels=[10], in_domain="ms", layer_percent=40)
    lines = segment_lines(tmp_path, {"attribution": {"in_domain": ["ms"]}})
    assert len(lines) == 1 and lines[0].startswith("**Segments**")
    assert "P_ms@40%" in lines[0] and "N_ms@40%" in lines[0] and "through the query" in lines[0]
    assert segment_lines(tmp_path, {"attribution": {"in_domain": ["tc"]}}) == []
    assert segment_lines(tmp_path / "nothing", {"attribution": {"in_domain": ["ms"]}}) == []


def _config(**attribution):
    return {"model": "m", "output": "out", "attribution": {"datasets": {"cran": "cranfield"}, **attribution}}


def test_config_segments_flag():
    assert load_config(_config()).attribution["segments"] is False
    assert load_config(_config(segments=True)).attribution["segments"] is True
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="(?i)attribution.segments must be true or false"):
            load_config(_config(segments=bad))


def test_cli_segments_flag_reaches_attribute_dataset(monkeypatch):
    from fastnig.cli import attribute_cmd, build_parser

    argv = ["attribute", "--model", "m", "--dataset", "d", "--label", "relevant", "--out", "o", "--quiet"]
    assert build_parser().parse_args(argv).segments is False
    args = build_parser().parse_args(argv + ["--segments"])
    seen = {}
    monkeypatch.setattr(attribute_cmd, "load_ranker", lambda *a, **k: (None, None))
    monkeypatch.setattr(attribute_cmd, "load_collection", lambda spec: spec)
    monkeypatch.setattr(attribute_cmd, "attribute_dataset", lambda *a, **k: seen.update(k) or _four()[0])
    assert attribute_cmd.run(args) == 0 and seen["settings"].segments is True


def test_attribute_dataset_with_segments_keeps_segment_sums(graded, tmp_path, saved_tiny_model, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from fastnig.engine.settings import AttributionSettings
    from fastnig.study.attribution_job import attribute_dataset

    model = AutoModelForSequenceClassification.from_pretrained(saved_tiny_model(seed=4))
    plain = AttributionSettings(steps=2, max_length=32)
    kwargs = dict(label="relevant", num_pairs=3, agreement_filter=False, out=tmp_path / "P_graded", progress=False)
    scheme = attribute_dataset(model, tokenizer, graded, settings=plain.replace(segments=True), **kwargs)
    assert scheme.count == 3 and scheme.settings["segments"] is True
    loaded = Scheme.load(tmp_path / "P_graded")
    assert loaded.has_segments
    for m, v in loaded.segment_means().items():
        torch.testing.assert_close(v.sum(0), loaded.mean[m], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="segments"):  # resuming without segments is refused
        attribute_dataset(model, tokenizer, graded, settings=plain, **kwargs)


def test_the_run_analysis_stage_writes_the_segment_table(tmp_path):
    from fastnig.study.distributed import Ranks
    from fastnig.study.pipeline import Study, stage_analysis

    cfg = load_config({"model": "m", "output": str(tmp_path / "run"),
                       "analysis": {"levels": [10], "layer_percent": 40},
                       "attribution": {"datasets": {"ms": "ms", "nf": "nf"}, "in_domain": ["ms"], "segments": True}})
    schemes = {(s.dataset, s.label): s for s in _four()}
    study = Study(config=cfg, model=None, tokenizer=None, collections={}, validation={}, ranks=Ranks())
    folder = stage_analysis(study, schemes)
    assert (folder / "segments.csv").exists() and (folder / "segments_ms_at_40pct.png").exists()


@pytest.mark.slow
def test_fastnig_analyze_writes_segments_only_for_schemes_with_segment_sums(tmp_path, capsys):
    from fastnig.cli import main

    for kind, segments in (("with", True), ("without", False)):
        for s in _four(segments=segments):
            s.save(tmp_path / kind / s.name)
        out = tmp_path / f"out_{kind}"
        assert main(["analyze", str(tmp_path / kind), "--out", str(out), "--levels", "10", "--in-domain", "ms",
                     "--layer-percent", "40"]) == 0
        printed = capsys.readouterr().out
        assert ("segments.csv" in printed.split("wrote")[-1]) is segments
        assert ("no segments.csv" in printed) is not segments
        assert (out / "segments.csv").exists() is segments


def test_merging_keeps_segment_sums_and_refuses_mixing():
    empty = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    with_segments = _scheme("ms", "relevant", 7)
    merged = empty.merge(with_segments)
    assert merged.has_segments
    for m, v in with_segments.segment_means().items():
        assert torch.equal(merged.segment_means()[m], v)
    with pytest.raises(ValueError, match="segments"):
        with_segments.merge(_scheme("ms", "relevant", 8, segments=False))
