"""Several conditional-NIG targets of the same pairs in batched passes (fastnig.engine.units.attribute_units).

Each target's result is compared with its own one-at-a-time ``fastnig.attribute(..., target=unit)``
(the code path the Captum parity tests of tests/test_heads.py check), ≤ 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import PAIRS, make_generative, make_model, make_tokenizer, make_word_tokenizer

import fastnig
from fastnig.engine import attribute as attribute_module
from fastnig.engine.units import attribute_units


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp(min=1e-12)
    return float((got.double() - expected.double()).abs().max() / scale)


def _same(batched, alone, unit):
    assert batched.targets == alone.targets == [unit.describe()] * alone.num_pairs
    assert batched.settings == alone.settings
    assert list(batched.scores) == list(alone.scores), unit.describe()  # the same units below, in order
    for name, value in alone.scores.items():
        assert _relative(batched.scores[name], value) <= 1e-5, (unit.describe(), name)
    for field in ("head_scores", "segment_scores", "head_segment_scores", "error_estimate"):
        mine, theirs = getattr(batched, field), getattr(alone, field)
        assert (mine is None) == (theirs is None), field
        if theirs is not None:
            assert list(mine) == list(theirs), field
            for name, value in theirs.items():
                assert _relative(mine[name], value) <= 1e-5, (unit.describe(), field, name)
    for field in ("f_input", "f_baseline", "delta"):
        assert _relative(getattr(batched, field), getattr(alone, field)) <= 1e-5 or \
            float((getattr(batched, field) - getattr(alone, field)).abs().max()) <= 1e-7, field
    assert torch.equal(batched.num_tokens, alone.num_tokens) and torch.equal(batched.steps_used, alone.steps_used)


UNITS = [
    fastnig.Unit("bert.encoder.layer.1.intermediate.dense", 5),
    fastnig.Unit("bert.encoder.layer.0.attention.output.dense", 1, kind="head"),
    fastnig.Unit("bert.encoder.layer.1.attention.output.dense", 2, kind="head", segment="query"),
    fastnig.Unit("bert.encoder.layer.0.intermediate.dense", 3, segment="passage"),
    fastnig.Unit("bert.encoder.layer.1.output.dense", 0),
]


def test_batched_targets_equal_one_at_a_time_with_a_remainder_pass(monkeypatch):
    """5 targets at different depths, 2 per pass: passes of 2, 2 and 1 (the last a plain conditional run)."""
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=2)
    pairs = PAIRS[:3]
    calls = []
    real = attribute_module.attribute

    def spy(model_, pairs_, *args, **kwargs):
        calls.append(len(pairs_))
        return real(model_, pairs_, *args, **kwargs)

    monkeypatch.setattr(attribute_module, "attribute", spy)
    batched = attribute_units(model, pairs, UNITS, tokenizer=tok, steps=4, rule="left", heads=True, per_pass=2,
                              depth_slack=None, pair_batch=2)
    assert sorted(calls) == [3, 6, 6]  # two passes of 2 replicas of the 3 pairs, one pass of 1
    monkeypatch.setattr(attribute_module, "attribute", real)
    for unit, att in zip(UNITS, batched):
        alone = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, rule="left", heads=True, target=unit,
                                  pair_batch=2, progress=False)
        _same(att, alone, unit)


def test_batched_targets_with_segments_richardson_and_the_memory_model(monkeypatch):
    """per_pass=None: the memory model (tiny model, short pairs: all path points of 4 replicas fit one
    forward) puts every target in one pass; segments and the Richardson sums split per target as alone."""
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=5)
    pairs = [PAIRS[1], PAIRS[0]]
    units = UNITS[:4]
    calls = []
    real = attribute_module.attribute
    monkeypatch.setattr(attribute_module, "attribute",
                        lambda m, p, *a, **k: calls.append(len(p)) or real(m, p, *a, **k))
    batched = attribute_units(model, pairs, units, tokenizer=tok, steps=6, heads=True, segments=True,
                              step_batch=3, depth_slack=None)
    assert calls == [len(units) * len(pairs)]
    monkeypatch.setattr(attribute_module, "attribute", real)
    for unit, att in zip(units, batched):
        alone = fastnig.attribute(model, pairs, tokenizer=tok, steps=6, heads=True, segments=True, step_batch=3,
                                  target=unit, progress=False)
        _same(att, alone, unit)


def test_batched_targets_in_a_decoder():
    tok = make_word_tokenizer("qwen")
    model = make_generative("qwen3", vocab_size=len(tok), seed=1)
    units = [fastnig.Unit("model.layers.1.mlp.up_proj", 7, segment="passage"),
             fastnig.Unit("model.layers.0.self_attn.o_proj", 1, kind="head"),
             fastnig.Unit("model.layers.1.self_attn.o_proj", 0, kind="head")]
    pairs = [PAIRS[1], PAIRS[2]]
    batched = attribute_units(model, pairs, units, tokenizer=tok, steps=4, rule="left", heads=True)
    for unit, att in zip(units, batched):
        alone = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, rule="left", heads=True, target=unit,
                                  progress=False)
        _same(att, alone, unit)


def test_targets_per_pass_follows_the_memory_model(monkeypatch):
    from fastnig.engine import units as units_module
    from fastnig.engine.model import linear_modules
    from fastnig.engine.settings import AttributionSettings

    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=2)
    modules = dict(linear_modules(model))
    settings = AttributionSettings(steps=4)
    one = units_module.chunk_memory(model, modules, 20, 1, first_token_cut=False, coarse=True).total(5)
    cuda = torch.device("cuda")  # no row cap: memory alone decides
    for targets in (1, 3, 7):  # a budget (half the free memory) of `targets` single-target forwards of 5 points
        monkeypatch.setattr(units_module, "free_memory", lambda device, n=targets: 2 * n * one + 1)
        assert units_module.targets_per_pass(model, modules, 20, 1, 5, cuda, settings) == targets
    monkeypatch.setattr(units_module, "free_memory", lambda device: 1 << 50)
    cap = units_module.CPU_ROWS_PER_FORWARD
    assert units_module.targets_per_pass(model, modules, 20, 1, 5, torch.device("cpu"), settings) == cap // 100
    # a pair whose path alone needs more than one CPU forward: nothing to fill, one target per pass
    assert units_module.targets_per_pass(model, modules, 128, 1, 33, torch.device("cpu"), settings) == 1


def test_target_passes_group_targets_of_similar_depth():
    from fastnig.engine.units import target_passes

    assert target_passes([10, 20, 30, 40, 50], 2, None) == [[4, 3], [2, 1], [0]]
    assert target_passes([50, 50, 48, 10, 9, 30], 8) == [[0, 1, 2, 5], [3, 4]]
    assert target_passes([50, 50, 48], 2) == [[0, 1], [2]]
    # slack 1.25: a pass of deepest d and k targets may cost k·d <= 1.25 × their own depths
    assert target_passes([100, 61], 4) == [[0, 1]] and target_passes([100, 59], 4) == [[0], [1]]


def test_attribute_units_validates_its_arguments():
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=2)
    with pytest.raises(TypeError, match="Unit"):
        attribute_units(model, PAIRS[:1], ["bert.encoder.layer.0.intermediate.dense"], tokenizer=tok)
    with pytest.raises(ValueError, match="per_pass"):
        attribute_units(model, PAIRS[:1], UNITS[:2], tokenizer=tok, per_pass=0)
    assert attribute_units(model, PAIRS[:1], [], tokenizer=tok) == []


def test_attribute_with_a_list_of_units_runs_them_batched():
    """``fastnig.attribute(..., target=[Unit, ...])`` is :func:`attribute_units`: a list, one result per unit, each
    equal to that unit's own conditional run."""
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=4)
    pairs = PAIRS[:2]
    units = [UNITS[0], UNITS[1]]
    got = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, rule="left", target=units, progress=False)
    assert isinstance(got, list) and len(got) == 2
    for unit, att in zip(units, got):
        alone = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, rule="left", target=unit, progress=False)
        _same(att, alone, unit)
