"""Heads in the study (issue 25, item 5): head schemes beside the neuron schemes, their heat maps and top-X %
sets, head ablation against random heads, the report's Heads section, the config and the plan.

Independent checks: a head scheme equals the mean of ``attribute(..., heads=True).head_scores`` over the kept
pairs; a resumed (killed after any save, also between the head and the neuron save of a chunk) or sharded job
ends with the head scheme of an uninterrupted one, bit for bit; the heat map CSV is the scheme's mean; the head
sets are ``Scheme.top`` and their ∩; ablation by zeroed weight columns equals zeroing the heads' outputs by a
hook; the ablation's p-values are ``scipy.stats.ttest_rel`` on the per-query nDCG.
"""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from test_schemes import make_attributions
from test_stability import collection, model_dir, tiny  # noqa: F401 (fixtures)

from fastnig.neurons.scheme import Scheme
from fastnig.study.config import ConfigError, load_config

L0, L1 = "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"


def _p(a, b):
    """The p-value of compare_ndcg's paired t-test: 1 where nothing changed, else scipy's ttest_rel."""
    from scipy.stats import ttest_rel

    return 1.0 if not np.any(np.asarray(a) - np.asarray(b)) else float(ttest_rel(a, b).pvalue)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ config
def _config(**heads):
    att = {"datasets": {"cran": "cranfield", "med": "med"}, "negatives": "unjudged", "heads": heads.pop("on", True)}
    cfg = {"model": "demo", "output": "/tmp/x", "attribution": att,
           "pruning": {"validation": {"cran": "cranfield"}, "queries": 10, "depth": 5}}
    if heads:
        cfg["heads"] = heads
    return cfg


@pytest.mark.parametrize("heads,words", [
    ({"levels": []}, "heads.levels"),
    ({"levels": [0]}, "heads.levels"),
    ({"levels": [150]}, "heads.levels"),
    ({"sets": "P_cran"}, "heads.sets must be a list"),
    ({"sets": ["P_xx"]}, "heads.sets: set expression 'P_xx': unknown dataset 'xx'"),
    ({"sets": ["P_cran &"]}, "heads.sets"),
    ({"repetitions": 0}, "heads.repetitions"),
    ({"repetitions": "3"}, "heads.repetitions"),
    ({"seed": -1}, "heads.seed"),
    ({"by": "size"}, "heads.by"),
    ({"colour": 1}, "unknown key(s) ['colour'] in config section 'heads'"),
    ({"on": False, "sets": ["P_cran"]}, "attribution.heads is not true"),
    ({"on": "yes"}, "heads"),
])
def test_a_bad_heads_section_is_refused_naming_the_key(heads, words):
    with pytest.raises(ConfigError) as err:
        load_config(_config(**heads))
    assert words in str(err.value)


def test_head_ablation_needs_a_validation_dataset():
    cfg = _config(sets=["P_cran"])
    cfg["pruning"]["validation"] = {}
    with pytest.raises(ConfigError, match="heads.sets is given but pruning.validation"):
        load_config(cfg)


def test_the_demo_turns_heads_on_within_its_budget():
    demo = load_config("demo")
    assert demo.heads_on and demo.attribution["heads"] is True and demo.as_dict()["heads"] == demo.heads
    heads = demo.heads
    assert heads["sets"] == ["P_cran", "N_cran"]
    # at most ~10 extra rerankings of the pruning candidates: each set x level once + its random sets
    assert len(heads["sets"]) * len(heads["levels"]) * (1 + heads["repetitions"]) <= 10
    plain = load_config(_config(on=False))
    assert not plain.heads_on and "heads" not in plain.as_dict() and plain.heads["sets"] == []


def test_the_plan_counts_the_head_ablation_rerankings():
    from fastnig.study.plan import plan_config

    def stage(plan):
        return [s for s in plan.stages if s.name.startswith("head ablation")]

    candidates = 10 * (5 + 1)  # queries x (depth + 1 relevant), as the pruning stage is counted
    plan = plan_config(_config(sets=["P_cran", "N_cran"], levels=[5, 10], repetitions=4))
    (heads,) = stage(plan)
    assert heads.sequences == 1 * candidates * (2 * 2 * (1 + 4) + 1)  # + 1: pruning has no sets, no original yet
    cfg = _config(sets=["P_cran"], levels=[10], repetitions=3)
    cfg["pruning"]["sets"] = ["P_cran"]
    (heads,) = stage(plan_config(cfg))
    assert heads.sequences == candidates * (1 * 1 * (1 + 3))  # the original model's scores are pruning's
    assert heads.flops > 0 and not stage(plan_config(_config(on=True)))
    assert not stage(plan_config("paper"))  # the paper config leaves heads off


# ------------------------------------------------------------------ attribution job
def _attribute(model, tokenizer, collection, out, heads_out=None, **kw):  # noqa: F811
    from fastnig.engine.settings import AttributionSettings
    from fastnig.study.attribution_job import attribute_dataset

    kw = {"label": "relevant", "settings": AttributionSettings(steps=4, max_length=48), "chunk_pairs": 2,
          "progress": False, "num_pairs": 12, **kw}
    return attribute_dataset(model, tokenizer, collection, out=out, heads_out=heads_out, **kw)


def assert_same(a: Scheme, b: Scheme, ordered: bool = True) -> None:
    """Bit for bit: the same pairs (in the same order when ``ordered``), sums, halves, segments, per-pair values."""
    if ordered:
        assert a.pair_ids == b.pair_ids and a.dropped_ids == b.dropped_ids
        for t in ("delta", "f_input", "f_baseline", "num_tokens"):
            assert torch.equal(getattr(a, t), getattr(b, t)), t
    else:
        assert sorted(a.pair_ids) == sorted(b.pair_ids) and sorted(a.dropped_ids) == sorted(b.dropped_ids)
    assert a.sizes == b.sizes and a.settings == b.settings
    for m in a.sizes:
        assert torch.equal(a._bins[m], b._bins[m]) and torch.equal(a._half_bins[m], b._half_bins[m]), m


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny, collection):  # noqa: F811
    """One job with heads on MEDLINE's relevant pairs (agreement filter on): (neuron scheme, head scheme)."""
    out = tmp_path_factory.mktemp("whole")
    scheme = _attribute(*tiny, collection, out / "P", out / "heads" / "P")
    return scheme, Scheme.load(out / "heads" / "P")


@pytest.mark.slow
def test_the_job_fills_a_head_scheme_of_the_same_pairs(uninterrupted, tiny, collection, tmp_path):  # noqa: F811
    import fastnig
    from fastnig.study.attribution_job import pair_id

    neurons, heads = uninterrupted
    assert heads.pair_ids == neurons.pair_ids and heads.dropped_ids == neurons.dropped_ids
    assert neurons.count >= 3 and neurons.num_dropped > 0  # the agreement filter dropped some, for both
    assert heads.sizes == {f"bert.encoder.layer.{i}.attention.output.dense": 4 for i in range(2)}
    assert heads.settings["units"] == "heads" and heads.settings["heads"] is True
    assert "heads" not in neurons.settings and "units" not in neurons.settings
    # independent: the mean of attribute(heads=True)'s head scores over the kept pairs
    model, tokenizer = tiny
    by_id = {pair_id(p): p for p in fastnig.data.sample_pairs(collection, label=1, num_pairs=12, seed=0)}
    att = fastnig.attribute(model, [by_id[i].text_pair for i in heads.pair_ids], tokenizer=tokenizer, steps=4,
                            max_length=48, heads=True, progress=False)
    for name, mean in heads.mean.items():
        torch.testing.assert_close(mean, att.head_scores[name].double().mean(0), rtol=1e-5, atol=1e-7)
    # the neuron scheme does not depend on heads: the same as a job without them, bit for bit
    plain = _attribute(*tiny, collection, tmp_path / "P")
    assert_same(neurons, plain)
    # a job without heads, then the same job with heads, adds only the head scheme (same pairs, same chunks)
    _attribute(*tiny, collection, tmp_path / "P", tmp_path / "heads" / "P")
    assert_same(Scheme.load(tmp_path / "heads" / "P"), heads)
    assert_same(Scheme.load(tmp_path / "P"), neurons)


class _Killed(BaseException):
    pass


@pytest.mark.slow
def test_a_job_killed_after_any_save_resumes_to_the_uninterrupted_schemes(uninterrupted, tiny, collection,  # noqa: F811
                                                                          tmp_path, monkeypatch):
    """A kill right after each save of the job — between the head and the neuron save of a chunk (the head
    scheme one chunk ahead), at a chunk boundary, between the two saves of the agreement filter's drops —
    then a resume: both schemes are the uninterrupted ones, bit for bit, extra included."""
    neurons, heads = uninterrupted
    real_save = Scheme.save
    saves = []

    def counting(self, path):
        saves.append(str(path))
        result = real_save(self, path)
        if len(saves) == kill_at[0]:
            raise _Killed()
        return result

    kill_at = [0]
    monkeypatch.setattr(Scheme, "save", counting)
    _attribute(*tiny, collection, tmp_path / "count" / "P", tmp_path / "count" / "heads" / "P")
    order = ["heads" if "/heads/" in s else "neurons" for s in saves]
    total = len(order)
    assert order == ["heads", "neurons"] * (total // 2)  # the head scheme is always saved first
    assert total >= 8  # the drops, >= 2 chunks, the final stopping record
    for k in range(1, total + 1):
        saves.clear()
        kill_at[0] = k
        out = tmp_path / f"kill{k}"
        with pytest.raises(_Killed):
            _attribute(*tiny, collection, out / "P", out / "heads" / "P")
        kill_at[0] = 0
        if order[k - 1] == "heads" and k < total - 1:  # between the two writes of a chunk: the head scheme is ahead
            assert Scheme.load(out / "heads" / "P").seen_ids > (Scheme.load(out / "P").seen_ids
                                                                if Scheme.exists(out / "P") else frozenset())
        resumed = _attribute(*tiny, collection, out / "P", out / "heads" / "P")
        assert_same(resumed, neurons)
        assert_same(Scheme.load(out / "heads" / "P"), heads)
        assert Scheme.load(out / "heads" / "P").extra == heads.extra and resumed.extra == neurons.extra, k


@pytest.mark.slow
def test_two_shards_merge_to_the_uninterrupted_head_scheme(uninterrupted, tiny, collection, tmp_path):  # noqa: F811
    neurons, heads = uninterrupted
    parts = [(_attribute(*tiny, collection, tmp_path / f"P.rank{r}", tmp_path / "heads" / f"P.rank{r}",
                         shard=(r, 2)), Scheme.load(tmp_path / "heads" / f"P.rank{r}")) for r in range(2)]
    assert_same(parts[0][1].merge(parts[1][1]), heads, ordered=False)
    assert_same(parts[0][0].merge(parts[1][0]), neurons, ordered=False)


# ------------------------------------------------------------------ analysis
def _head_scheme(values, ids, label="relevant", dataset="cran"):
    """A head scheme of two 4-head layers from ``[pairs, 8]`` made-up head scores."""
    values = torch.tensor(values, dtype=torch.float32)
    att = make_attributions({L0: values[:, :4], L1: values[:, 4:]}, label, units="heads")
    return Scheme.empty({L0: 4, L1: 4}, {"model": "tiny", "dataset": dataset, "label": label}).add(att, ids)


def test_the_heat_map_is_the_scheme_mean_and_the_sets_are_its_top_heads(tmp_path):
    pytest.importorskip("matplotlib")
    from fastnig.analysis.head_heatmap import head_set_rows, write_head_heatmap

    p_cran = _head_scheme([[8, 1, 0, 0, 2, 0, 0, 6], [6, 1, 0, 0, 0, 0, 4, 2]], ["a", "b"])
    p_med = _head_scheme([[1, 0, 0, 0, 0, 0, 0, 9], [1, 0, 0, 0, 0, 0, 0, 7]], ["c", "d"], dataset="med")
    n_cran = _head_scheme([[0, 0, 0, 9, 0, 0, 0, 5], [0, 0, 0, 3, 0, 0, 0, 1]], ["e", "f"], "non-relevant")
    csv_path, png = write_head_heatmap(p_cran, tmp_path, "heads_P_cran")
    rows = _read(csv_path)
    assert [(r["module"], int(r["layer"]), int(r["head"])) for r in rows] == [(m, i, h) for i, m in
                                                                              enumerate((L0, L1)) for h in range(4)]
    assert [float(r["mean_nig"]) for r in rows] == [7, 1, 0, 0, 1, 0, 2, 4]  # by hand: the mean over the 2 pairs
    assert png.stat().st_size > 1000
    # the top 25 % of the 8 heads = 2 heads; ∩ over the datasets; P_x & N_x
    schemes = {("cran", "relevant"): p_cran, ("med", "relevant"): p_med, ("cran", "non-relevant"): n_cran}
    sets = {r["set"]: r for r in head_set_rows(schemes, [25])}
    assert sets["P_cran"]["members"] == "L0.h0 L1.h3" and sets["P_cran"]["heads"] == 2
    assert sets["P_med"]["members"] == "L0.h0 L1.h3" and sets["N_cran"]["members"] == "L0.h3 L1.h3"
    assert sets["inter(A, P)"]["members"] == "L0.h0 L1.h3" and sets["inter(A, P)"]["overlap_percent"] == 100
    assert "inter(A, N)" not in sets  # one dataset has N
    assert sets["P_cran & N_cran"]["members"] == "L1.h3" and sets["P_cran & N_cran"]["overlap_percent"] == 50
    for key, scheme in schemes.items():  # the rows are Scheme.top
        name = ("P_" if key[1] == "relevant" else "N_") + key[0]
        top = scheme.top(25)
        assert sets[name]["heads"] == len(top) == 2


def test_head_fusions_are_the_top_heads_of_the_fused_means():
    """F_x and F_A over head schemes, as the study's ``heads.sets`` evaluates them: the top heads of the averaged
    means (hand-computed)."""
    from fastnig.neurons.expressions import evaluate

    p_cran = _head_scheme([[8, 1, 0, 0, 2, 0, 0, 6], [6, 1, 0, 0, 0, 0, 4, 2]], ["a", "b"])
    p_med = _head_scheme([[1, 0, 0, 0, 0, 0, 0, 9], [1, 0, 0, 0, 0, 0, 0, 7]], ["c", "d"], dataset="med")
    n_cran = _head_scheme([[0, 0, 0, 9, 0, 0, 0, 5], [0, 0, 0, 3, 0, 0, 0, 1]], ["e", "f"], "non-relevant")
    schemes = {("cran", "relevant"): p_cran, ("med", "relevant"): p_med, ("cran", "non-relevant"): n_cran}
    # means: P_cran [7, 1, 0, 0, 1, 0, 2, 4], P_med [1, 0, 0, 0, 0, 0, 0, 8], N_cran [0, 0, 0, 6, 0, 0, 0, 3]
    # F_A = their average [8/3, 1/3, 0, 2, 1/3, 0, 2/3, 5]: the top 37.5 % (3 of 8) are heads 7, 0, 3
    f_a = evaluate("F_A", schemes, 37.5, in_domain=["cran"], by="value", name="F_A")
    assert sorted(f_a.neurons()) == sorted([(L1, 3), (L0, 0), (L0, 3)])
    # F_cran = (P_cran + N_cran) / 2 = [3.5, 0.5, 0, 3, 0.5, 0, 1, 3.5]: the top 50 % are heads 0, 7, 3, 6
    f_cran = evaluate("F_cran", schemes, 50, in_domain=["cran"], by="value", name="F_cran")
    assert sorted(f_cran.neurons()) == sorted([(L0, 0), (L1, 3), (L0, 3), (L1, 2)])


# ------------------------------------------------------------------ ablation
@pytest.mark.slow
def test_head_ablation_zeroes_the_heads_outputs_and_tests_as_scipy(tmp_path):
    pytest.importorskip("scipy.stats")
    from test_pruning import OverlapCollection, word_tokenizer
    from tiny_models import make_model

    from fastnig.engine.heads import output_projections
    from fastnig.evaluation.head_ablation import evaluate_head_ablation, random_heads
    from fastnig.evaluation.pruning import PruningBenchmark
    from fastnig.evaluation.reranking import build_candidates

    tok = word_tokenizer()
    model = make_model("bert", num_labels=2, vocab_size=tok.vocab_size, seed=11)
    candidates = build_candidates(OverlapCollection(seed=3, num_queries=8), depth=10, cache_dir=tmp_path,
                                  progress=False)
    bench = PruningBenchmark(model, tok, candidates, batch_size=64, progress=False)
    calls = []
    real_score = bench.score
    bench.score = lambda desc: calls.append(desc) or real_score(desc)

    def hooked_ndcg(heads):
        """Independent: the heads' outputs zeroed by a pre-hook on their output projection's input."""
        handles = []
        for name, (module, count) in output_projections(model).items():
            chosen = [h for n, h in heads if n == name]
            width = module.in_features // count

            def zero(mod, args, chosen=chosen, width=width):
                x = args[0].clone()
                for h in chosen:
                    x[..., h * width:(h + 1) * width] = 0
                return (x,)
            if chosen:
                handles.append(module.register_forward_pre_hook(zero))
        try:
            return bench.ndcg(real_score("hooked"))
        finally:
            for h in handles:
                h.remove()

    top = [(L0, 0), (L1, 2), (L1, 3)]
    shared = {}
    result = evaluate_head_ablation(bench, top, repetitions=3, seed=5, random_runs=shared)
    assert len(calls) == 1 + 1 + 3  # the original, the top heads, 3 random sets
    original = bench.original_ndcg
    ablated = hooked_ndcg(top)
    randoms = [hooked_ndcg(random_heads(model, 3, 5, r)) for r in range(3)]
    np.testing.assert_allclose(result.top.ndcg_pruned, ablated.mean(), rtol=1e-6)
    assert result.top.drop_percent == pytest.approx((original.mean() - ablated.mean()) / original.mean() * 100)
    assert result.top.p_value == pytest.approx(_p(original, ablated))
    assert np.any(original != ablated)  # the tiny model's ranking does move: the t-test is scipy's
    drops = [(original.mean() - r.mean()) / original.mean() * 100 for r in randoms]
    np.testing.assert_allclose(result.random_drops, drops, rtol=1e-6, atol=1e-9)
    row = result.row()
    assert row["drop_random_std_percent"] == pytest.approx(np.std(drops, ddof=1), abs=1e-9)
    mean_random = np.mean(randoms, axis=0)
    assert row["p_top_vs_random"] == pytest.approx(_p(mean_random, ablated))
    # a second set of as many heads reuses the random sets: one more reranking, and the original is not redone
    evaluate_head_ablation(bench, [(L0, 1), (L0, 2), (L1, 0)], repetitions=3, seed=5, random_runs=shared)
    assert len(calls) == 1 + 1 + 3 + 1


# ------------------------------------------------------------------ the study and its report
@pytest.fixture(scope="module")
def heads_study(tmp_path_factory, model_dir):  # noqa: F811
    """A reduced study with heads (tiny 2-layer BERT, 8 heads): (config, output folder, report.md, the
    descriptions of every reranking it scored)."""
    pytest.importorskip("matplotlib")
    import fastnig.study.pipeline as pipeline

    tmp = tmp_path_factory.mktemp("heads-study")
    out = tmp / "run"
    cfg = {"name": "tiny-heads", "model": str(model_dir), "output": str(out), "cache_dir": str(tmp / "cache"),
           "attribution": {"datasets": {"cran": "cranfield", "med": "med"}, "in_domain": ["cran"],
                           "negatives": "unjudged", "agreement_filter": False, "pairs": 4, "steps": 2,
                           "max_length": 40, "chunk_pairs": 2, "heads": True},
           "analysis": {"levels": [10], "layer_percent": 10},
           "pruning": {"levels": [10], "sets": ["P_cran"], "queries": 4, "depth": 4, "repetitions": 1,
                       "validation": {"cran": {"dataset": "cranfield", "group": "Cranfield"}}},
           "heads": {"levels": [25], "sets": ["P_cran", "N_cran"], "repetitions": 2}}
    descs = []
    real_score = pipeline.score_candidates
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "score_candidates", lambda *a, **k: descs.append(k.get("desc")) or real_score(*a, **k))
        report = pipeline.run_study(cfg, progress=False)
    return cfg, out, report, descs


@pytest.mark.slow
def test_a_study_with_heads_writes_its_head_schemes_heat_maps_sets_and_ablation(heads_study):
    from fastnig.neurons.head_schemes import head_label
    from fastnig.neurons.sets import top_count

    _cfg, out, _report, descs = heads_study
    assert sum("original" in str(d) for d in descs) == 1  # pruning and head ablation share the original's scores
    assert sum("heads" in str(d) for d in descs) == 2 + 2  # 2 top sets, 2 random sets shared by the two
    for name in ("P_cran", "N_cran", "P_med", "N_med"):
        heads, neurons = Scheme.load(out / "heads" / "schemes" / name), Scheme.load(out / "schemes" / name)
        assert heads.pair_ids == neurons.pair_ids and heads.count == 4
        rows = _read(out / "analysis" / "heads" / f"heads_{name}.csv")
        mean = heads.mean
        assert [float(r["mean_nig"]) for r in rows] == [float(mean[r["module"]][int(r["head"])]) for r in rows]
        assert len(rows) == 8 and (out / "analysis" / "heads" / f"heads_{name}.png").stat().st_size > 1000
    p_cran = Scheme.load(out / "heads" / "schemes" / "P_cran")
    sets = {r["set"]: r for r in _read(out / "analysis" / "heads" / "head_sets.csv")}
    assert int(sets["P_cran"]["heads"]) == top_count(25, 8) == 2 and "inter(A, P)" in sets
    assert sets["P_cran"]["members"] == " ".join(head_label(m, h) for m, h in p_cran.top(25).neurons())
    ablation = {r["set"]: r for r in _read(out / "heads" / "head_ablation.csv")}
    assert set(ablation) == {"P_cran", "N_cran"}
    assert ablation["P_cran"]["head_list"] == sets["P_cran"]["members"]
    assert int(ablation["P_cran"]["heads"]) == 2 and ablation["P_cran"]["repetitions"] == "2"
    assert ablation["P_cran"]["dataset"] == "cran" and ablation["P_cran"]["group"] == "Cranfield"
    assert ablation["P_cran"]["drop_random_mean_percent"] == ablation["N_cran"]["drop_random_mean_percent"]
    table4 = _read(out / "pruning" / "table4.csv")
    assert float(ablation["P_cran"]["ndcg_original"]) == pytest.approx(float(table4[0]["ndcg_original"]))
    timings = json.loads((out / "timings.json").read_text())["timings"]
    assert timings["head_ablation_s"] > 0 and timings["head_analysis_s"] > 0


@pytest.mark.slow
def test_the_report_shows_the_heat_maps_and_the_head_ablation_table(heads_study):
    _cfg, out, report, _descs = heads_study
    md = report.read_text()
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    heads_title = next(t for t in titles if t.startswith("Heads"))
    assert titles.index(heads_title) > titles.index(next(t for t in titles if t.startswith("Table 4")))
    assert titles.index(heads_title) < titles.index("Attribution schemes and convergence delta")
    section = md.split(f"## {heads_title}")[1].split("\n## ")[0]
    for name in ("P_cran", "N_cran", "P_med", "N_med"):
        assert f"![heads_{name}](analysis/heads/heads_{name}.png)" in section
    assert "| P_cran | 25 | Cranfield | 2 |" in section and "| N_cran | 25 | Cranfield | 2 |" in section
    assert "| 25 | inter(A, P) |" in section
    assert "**Head ablation** (nDCG@10 % drop, on Cranfield)" in md.split("## ")[1]  # among the key numbers
    page = (out / "report.html").read_text()
    assert "<img alt='heads_P_cran' src='data:image/png;base64," in page and "p top vs random" in page


@pytest.mark.slow
def test_the_heads_report_in_a_real_browser(heads_study):
    from browser_driver import Browser, find_chromium
    from test_browser import check_report_page

    if not find_chromium():
        pytest.skip("headless Chromium is not installed (tests/test_browser.py)")
    _cfg, out, _report, _descs = heads_study
    with Browser() as browser:
        images = check_report_page(browser, out / "report.html")
    assert {"heads_P_cran", "heads_N_cran", "heads_P_med", "heads_N_med"} <= {alt for alt, _ in images}


@pytest.mark.slow
def test_a_resumed_study_recomputes_no_head_work(heads_study, monkeypatch):
    import fastnig.evaluation.head_ablation as head_ablation
    import fastnig.study.head_stages as head_stages
    import fastnig.study.pipeline as pipeline

    cfg, out, _report, _descs = heads_study
    before = {p: p.read_bytes() for p in (out / "heads" / "head_ablation.csv", out / "analysis" / "heads" /
                                          "heads_P_cran.csv", out / "heads" / "schemes" / "P_cran.json")}
    monkeypatch.setattr(head_ablation, "evaluate_head_ablation", lambda *a, **k: pytest.fail("ablation redone"))
    monkeypatch.setattr(head_stages, "write_head_heatmap", lambda *a, **k: pytest.fail("heat map redone"))
    monkeypatch.setattr(pipeline, "score_candidates", lambda *a, **k: pytest.fail("a reranking was redone"))
    pipeline.run_study(cfg, progress=False)
    assert {p: p.read_bytes() for p in before} == before
