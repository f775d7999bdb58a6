"""attribute(..., segments=True): each neuron's NIG split by query, passage and special tokens (issue 14)."""
from __future__ import annotations

import warnings

import pytest
import torch
from test_attribution import _captum_conductance
from tiny_models import PAIRS, make_model, make_tokenizer

import fastnig
from fastnig.engine import attribute as attribution
from fastnig.engine.encoding import SEGMENTS, encode_pairs
from fastnig.engine.first_token import first_token_cut as cut_of

FAMILIES = [  # (model family, logits, tokenizer family)
    ("bert", 2, "bert"),
    ("electra", 1, "bert"),
    ("distilbert", 2, "distilbert"),
]


@pytest.fixture(scope="module")
def segmented(tiny_bert, tokenizer):
    return fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=21, pair_batch=2,
                             progress=False, segments=True)


def _assert_segments_close(result, reference, rtol=1e-4, atol=1e-6):
    for name, ref in reference.segment_scores.items():
        torch.testing.assert_close(result.segment_scores[name], ref, rtol=rtol, atol=atol, msg=name)


def test_segment_ids_follow_sequence_ids_and_special_tokens(tokenizer):
    enc = encode_pairs(tokenizer, [PAIRS[1], PAIRS[2]], 64, "pad", True)
    assert enc.segments.shape == enc.input_ids.shape and enc.segments.dtype == torch.long
    for i, (query, passage) in enumerate([PAIRS[1], PAIRS[2]]):
        n = int(enc.lengths[i])
        ids = enc.segments[i]
        tokens = tokenizer.convert_ids_to_tokens(enc.input_ids[i, :n].tolist())
        assert (ids[n:] == -1).all()
        for t, s in zip(tokens, ids[:n].tolist()):
            assert (s == 2) == (t in ("[CLS]", "[SEP]"))
        assert (ids[:n] == 0).sum() == len(tokenizer.tokenize(query))
        assert (ids[:n] == 1).sum() == len(tokenizer.tokenize(passage))


def test_segment_scores_sum_to_scores_and_equal_the_plain_run(tiny_bert, tokenizer, segmented):
    plain = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=21, pair_batch=2,
                              progress=False)
    assert set(segmented.segment_scores) == set(segmented.scores) == set(plain.scores)
    assert plain.segment_scores is None and "segments" not in plain.settings
    assert segmented.settings == {**plain.settings, "segments": True}
    for name, seg in segmented.segment_scores.items():
        assert seg.shape == (len(PAIRS), len(SEGMENTS), plain.scores[name].shape[1]) and seg.dtype == torch.float32
        assert torch.equal(seg.sum(dim=1), segmented.scores[name])
        torch.testing.assert_close(segmented.scores[name], plain.scores[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(segmented.delta, plain.delta)
    # the query and the passage both carry conductance in the first layer
    first = segmented.segment_scores["bert.encoder.layer.0.intermediate.dense"]
    assert (first[:, 0].abs().sum(-1) > 0).all() and (first[[0, 1, 3], 1].abs().sum(-1) > 0).all()
    assert (first[2, 1] == 0).all()  # an empty passage has no passage token


def test_past_the_first_token_cut_and_the_pooler_everything_is_special(tiny_bert, tokenizer, segmented):
    assert cut_of(tiny_bert) is not None
    for name in ("bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
                 "bert.encoder.layer.1.output.dense"):
        seg = segmented.segment_scores[name]
        assert (seg[:, :2] == 0).all() and (seg[:, 2] != 0).any(), name
    uncut = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=21, pair_batch=2,
                              progress=False, segments=True, first_token_cut=False)
    _assert_segments_close(uncut, segmented)
    pooled = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=8, progress=False, segments=True,
                               layers=["bert.pooler.dense"])
    seg = pooled.segment_scores["bert.pooler.dense"]
    assert (seg[:, :2] == 0).all() and torch.equal(seg[:, 2], pooled.scores["bert.pooler.dense"])


def _captum_segment_conductance(model, tokenizer, query, passage, steps):
    """Captum LayerConductance (riemann_trapezoid) per Linear and token (test_attribution's reference),
    summed over each segment's tokens: ``{name: [3, features]}``."""
    pytest.importorskip("captum.attr")
    enc = tokenizer(query, passage, truncation="only_second", max_length=512, return_special_tokens_mask=True)
    seq = torch.tensor([2 if s is None else s for s in enc.sequence_ids()])
    seq[torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)] = 2
    per_token = _captum_conductance(model, tokenizer, query, passage, "relevant", steps, per_token=True)
    return {name: torch.stack([attr[seq == s].sum(dim=0) for s in range(len(SEGMENTS))])
            for name, attr in per_token.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family,logits,tok_family", FAMILIES)
def test_left_rule_segments_equal_captum_layer_conductance_per_segment(family, logits, tok_family):
    """Same convention as tests/test_attribution.py: fastnig's "left" rule is Captum's riemann_trapezoid."""
    tok = make_tokenizer(tok_family)
    model = make_model(family, num_labels=logits, vocab_size=tok.vocab_size, seed=1)
    query, passage = PAIRS[0]
    steps = 16
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=steps, rule="left", progress=False,
                             segments=True)
    ref = _captum_segment_conductance(model, tok, query, passage, steps)
    assert set(ours.segment_scores) == set(ref)
    for name, expected in ref.items():
        got = ours.segment_scores[name][0]
        scale = expected.abs().max()
        for s, segment in enumerate(SEGMENTS):
            # a segment that carries nothing (e.g. query and passage past the first-token cut): nothing here either
            denominator = max(float(expected[s].abs().max()), 1e-6 * float(scale))
            rel = (got[s] - expected[s]).abs().max() / denominator
            assert rel <= 1e-4, f"{name} {segment}: relative error {rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("step_batch", [1, 3, 7])
def test_chunked_equals_unchunked(tiny_bert, tokenizer, segmented, step_batch):
    chunked = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=step_batch,
                                pair_batch=2, progress=False, segments=True)
    _assert_segments_close(chunked, segmented)


def test_auto_steps_equal_fixed_runs_at_the_steps_used(tiny_bert, tokenizer):
    pairs = PAIRS[:2]
    auto = fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, steps="auto", max_steps=64, rule="left",
                             pair_batch=2, progress=False, segments=True)
    assert auto.settings["segments"] is True
    for i, used in enumerate(auto.steps_used.tolist()):
        fixed = fastnig.attribute(tiny_bert, [pairs[i]], tokenizer=tokenizer, steps=used, rule="left",
                                  progress=False, segments=True)
        for name, seg in fixed.segment_scores.items():
            torch.testing.assert_close(auto.segment_scores[name][i], seg[0], rtol=1e-4, atol=1e-6, msg=name)
            assert torch.equal(auto.segment_scores[name][i].sum(0), auto.scores[name][i])


@pytest.mark.parametrize("baseline", ["pad-query", "zero"])
def test_other_baselines_and_trapezoid_sum_to_scores(tiny_bert, tokenizer, baseline):
    seg = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=10, baseline=baseline,
                            progress=False, segments=True)
    plain = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=10, baseline=baseline,
                              progress=False)
    for name, value in plain.scores.items():
        torch.testing.assert_close(seg.segment_scores[name].sum(1), value, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_compute(tiny_bert, tokenizer, segmented):
    r = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=20, dtype=torch.bfloat16,
                          progress=False, segments=True)
    for name, ref in segmented.segment_scores.items():
        got = r.segment_scores[name]
        assert got.dtype == torch.float32 and torch.equal(got.sum(1), r.scores[name])
        assert (got - ref[:2]).norm() / ref[:2].norm() < 0.1, name


def test_out_of_memory_mid_backward_restores_the_segment_accumulators(tiny_bert, tokenizer, segmented,
                                                                      monkeypatch):
    calls = {"n": 0}
    real = attribution.accumulate_conductance

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:  # mid-way through the second chunk's layers
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "accumulate_conductance", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=7, pair_batch=2,
                                   progress=False, segments=True)
    assert calls["n"] > 18
    _assert_segments_close(result, segmented)


def test_segments_must_be_a_bool(tiny_bert, tokenizer):
    with pytest.raises(TypeError, match="segments"):
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False, segments=1)


# ------------------------------------------------------------------ schemes
SIZES = {"bert.encoder.layer.0.attention.self.query": 4, "bert.encoder.layer.0.intermediate.dense": 6,
         "bert.encoder.layer.1.output.dense": 5}
SETTINGS = {"model": "tiny", "target": "relevant", "output": "probability", "baseline": "pad", "steps": 8,
            "rule": "trapezoid", "max_length": 512, "dtype": "float32"}


def _attributions(num, seed, segments=True):
    g = torch.Generator().manual_seed(seed)
    seg = {m: (torch.randn(num, 3, n, generator=g) * 10.0 ** torch.randint(-6, 2, (num, 3, n), generator=g))
           for m, n in SIZES.items()}
    settings = {**SETTINGS, "segments": True} if segments else dict(SETTINGS)
    return fastnig.Attributions(scores={m: v.sum(1) for m, v in seg.items()}, delta=torch.zeros(num),
                                f_input=torch.full((num,), 0.9), f_baseline=torch.full((num,), 0.1),
                                targets=["relevant"] * num, num_tokens=torch.full((num,), 7, dtype=torch.long),
                                settings=settings, segment_scores=seg if segments else None)


def _scheme():
    from fastnig.neurons.scheme import Scheme

    return Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})


def _same_segment_bins(a, b):
    assert a.has_segments and b.has_segments
    for m in SIZES:
        assert torch.equal(a._segment_bins[m], b._segment_bins[m]), m


def test_scheme_segment_sums_survive_merge_resume_and_save_load_bit_for_bit(tmp_path):
    from fastnig.neurons.scheme import Scheme

    first, second = _attributions(5, 0), _attributions(4, 1)
    ids1, ids2 = [f"p{i}" for i in range(5)], [f"q{i}" for i in range(4)]
    whole = _scheme().add(first, ids1).add(second, ids2)
    merged = _scheme().add(first, ids1).merge(_scheme().add(second, ids2))
    _same_segment_bins(whole, merged)
    resumed = Scheme.load(_scheme().add(first, ids1).save(tmp_path / "part")).add(second, ids2)
    _same_segment_bins(whole, resumed)
    loaded = Scheme.load(whole.save(tmp_path / "whole"))
    _same_segment_bins(whole, loaded)
    means = loaded.segment_means()
    for m, n in SIZES.items():
        assert means[m].shape == (3, n) and means[m].dtype == torch.float64
        expected = torch.cat([first.segment_scores[m], second.segment_scores[m]]).double().mean(0)
        torch.testing.assert_close(means[m], expected, rtol=1e-9, atol=1e-12)
        # scores are the float32 token sums: equal up to their rounding
        torch.testing.assert_close(means[m].sum(0), loaded.mean[m], rtol=1e-6, atol=1e-6)


def test_schemes_without_segments_still_work_and_mixing_is_refused(tmp_path):
    from fastnig.neurons.fusion import fuse
    from fastnig.neurons.scheme import Scheme
    from fastnig.neurons.segment_shares import segment_shares

    plain = _scheme().add(_attributions(3, 2, segments=False), ["a", "b", "c"])
    assert not plain.has_segments and plain.segment_means() is None
    loaded = Scheme.load(plain.save(tmp_path / "plain"))
    assert not loaded.has_segments and torch.equal(loaded.mean_vector(), plain.mean_vector())
    with pytest.raises(ValueError):  # settings differ in segments
        plain.add(_attributions(2, 3), ["d", "e"])
    with pytest.raises(ValueError, match="per-segment"):
        segment_shares(plain)
    with_segments = _scheme().add(_attributions(3, 4), ["x", "y", "z"])
    assert fuse(with_segments).has_segments and not fuse(plain).has_segments  # averages: test_segment_analysis


def test_segment_shares_and_dominant_segment_filter():
    from fastnig.engine.encoding import SEGMENTS as NAMES
    from fastnig.neurons.segment_shares import dominant_segment, filter_by_segment, segment_shares

    scheme = _scheme().add(_attributions(6, 5), [str(i) for i in range(6)])
    rows = segment_shares(scheme)
    assert [(r["layer"], r["component"]) for r in rows] == [(0, "query"), (0, "intermediate"), (1, "ff_output")]
    means = scheme.segment_means()
    for row, m in zip(rows, SIZES):
        assert row["neurons"] == SIZES[m]
        assert sum(row[f"{s}_share"] for s in NAMES) == pytest.approx(1.0)
        for i, s in enumerate(NAMES):
            assert row[s] == pytest.approx(float(means[m][i].sum()))
            assert row[f"{s}_share"] == pytest.approx(float(means[m][i].abs().sum() / means[m].abs().sum()))
    top = scheme.top(40)
    parts = [filter_by_segment(scheme, top, s) for s in NAMES]
    assert sum(len(p) for p in parts) == len(top) and all(p.name.startswith(top.name + "|") for p in parts)
    dominant = dominant_segment(scheme)
    for module, unit in parts[0]:
        assert int(dominant[module][unit]) == 0
    few = segment_shares(scheme, top)
    assert sum(r["neurons"] for r in few) == len(top)
