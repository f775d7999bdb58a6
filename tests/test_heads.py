"""Heads as units (``heads=True``) and conditional NIG (``target=fastnig.Unit(...)``) against Captum.

The oracles are Captum's ``LayerConductance`` with forward functions written here:
the context's conductance is ``LayerConductance(..., layer=output projection,
attribute_to_layer_input=True)`` summed over each head's dimensions; a unit
target's F is that unit's activation summed over the tokens, read by a hook of
this file's own.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import PAIRS, make_generative, make_model, make_tokenizer, make_word_tokenizer

import fastnig
from fastnig.engine.encoding import SEGMENTS
from fastnig.engine.heads import output_projections
from fastnig.engine.rankers import bind_ranker

captum_attr = pytest.importorskip("captum.attr")
STEPS = 16


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _classifier_inputs(model, tok, query, passage):
    enc = tok(query, passage, truncation="only_second", max_length=512, return_tensors="pt",
              return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"].bool()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x = emb(ids)
        x_base = emb(torch.where(special, ids, torch.full_like(ids, tok.pad_token_id)))
    extra = {"attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        extra["token_type_ids"] = enc["token_type_ids"]
    seq = torch.tensor([2 if s is None else s for s in enc.sequence_ids()])
    seq[special[0]] = 2

    def run(inputs_embeds):
        n = inputs_embeds.shape[0]
        return model(inputs_embeds=inputs_embeds, **{k: v.expand(n, -1) for k, v in extra.items()}).logits

    return x, x_base, run, seq


def _probability(logits):
    return torch.softmax(logits.float(), -1)[:, 1] if logits.shape[-1] == 2 else torch.sigmoid(logits[:, 0].float())


def _context_conductance(forward, layer, x, x_base):
    """``[tokens, heads * d]`` conductance of ``layer``'s input (Captum)."""
    lc = captum_attr.LayerConductance(forward, layer)
    attr = lc.attribute(x, baselines=x_base, n_steps=STEPS, method="riemann_trapezoid",
                        attribute_to_layer_input=True)
    return attr.detach()[0]


def _check_heads(ours, forward, model, x, x_base, seq=None):
    projections = output_projections(model)
    assert set(ours.head_scores) == set(projections)
    for name, (layer, heads) in projections.items():
        per_token = _context_conductance(forward, layer, x, x_base)  # [T, H*d]
        expected = per_token.sum(0).unflatten(-1, (heads, -1)).sum(-1)
        got = ours.head_scores[name][0]
        assert got.shape == (heads,)
        assert _relative(got, expected) <= 1e-4, f"{name}: {_relative(got, expected):.2e}"
        # the heads add up to the context layer's total
        assert abs(float(got.sum() - per_token.sum())) <= 1e-4 * float(per_token.abs().sum()) + 1e-7
        if seq is not None and ours.head_segment_scores is not None:
            seg = ours.head_segment_scores[name][0]
            torch.testing.assert_close(seg.sum(0), got, rtol=1e-5, atol=1e-7)
            for s in range(len(SEGMENTS)):
                want = per_token[seq == s].sum(0).unflatten(-1, (heads, -1)).sum(-1)
                denominator = max(float(want.abs().max()), 1e-6 * float(expected.abs().max()), 1e-12)
                assert float((seg[s] - want).abs().max()) / denominator <= 1e-4, (name, SEGMENTS[s])


@pytest.mark.parametrize("family,logits", [("bert", 2), pytest.param("electra", 1, marks=pytest.mark.slow)])
def test_heads_equal_captum_context_conductance_per_head(family, logits):
    tok = make_tokenizer("bert")
    model = make_model(family, num_labels=logits, vocab_size=tok.vocab_size, seed=1)
    query, passage = PAIRS[0]
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=STEPS, rule="left", progress=False,
                             heads=True, segments=True)
    plain = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=STEPS, rule="left", progress=False)
    assert set(ours.scores) == set(plain.scores)  # heads add units, never change the neurons
    for name, value in plain.scores.items():
        torch.testing.assert_close(ours.scores[name], value, rtol=1e-5, atol=1e-7)
    assert ours.settings == {**plain.settings, "segments": True, "heads": True}
    x, x_base, run, seq = _classifier_inputs(model, tok, query, passage)
    _check_heads(ours, lambda e: _probability(run(e)), model, x, x_base, seq)


def test_heads_off_changes_nothing_and_richardson_and_chunks_agree():
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=2)
    plain = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, progress=False)
    assert plain.head_scores is None and "heads" not in plain.settings
    whole = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, progress=False, heads=True, pair_batch=2)
    chunked = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, progress=False, heads=True, step_batch=3)
    assert whole.error_estimate is not None and not any("#" in n for n in whole.error_estimate)
    for name, value in whole.head_scores.items():
        torch.testing.assert_close(chunked.head_scores[name], value, rtol=1e-4, atol=1e-6)


def _decoder_inputs(model, tok):
    bound = bind_ranker(None, model, tok)
    enc = bound.encode([PAIRS[1]], 512, "pad")
    ids = enc.input_ids
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x = emb(ids)
        x_base = emb(torch.where(enc.replace, torch.full_like(ids, bound.pad_id), ids))
    answer = bound.answer

    def run(inputs_embeds):  # the decoder's logits of (no, yes) at the last token, written out here
        n, t = inputs_embeds.shape[:2]
        hidden = model.model(inputs_embeds=inputs_embeds, attention_mask=torch.ones(n, t, dtype=torch.long),
                             position_ids=torch.arange(t).expand(n, -1), use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1])[:, answer]

    return x, x_base, run, enc.segments[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_decoder_heads_equal_captum_with_grouped_query_attention(kind):
    tok = make_word_tokenizer("llama" if kind == "llama" else "qwen")
    model = make_generative(kind, vocab_size=len(tok), seed=1)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA: query heads count
    ours = fastnig.attribute(model, [PAIRS[1]], tokenizer=tok, steps=STEPS, rule="left", progress=False,
                             heads=True, segments=True)
    x, x_base, run, seq = _decoder_inputs(model, tok)
    assert all(v.shape == (1, model.config.num_attention_heads) for v in ours.head_scores.values())
    _check_heads(ours, lambda e: torch.softmax(run(e).float(), -1)[:, 1], model, x, x_base, seq)


# ------------------------------------------------------------------ conditional NIG
def _unit_forward(run, model, unit: fastnig.Unit, weights: torch.Tensor):
    """F = the unit's activation summed over the tokens ``weights`` ([T] 0/1), read by a hook."""
    modules = dict(model.named_modules())
    layer = modules[unit.name]
    heads = output_projections(model)[unit.name][1] if unit.kind == "head" else None

    def forward(inputs_embeds):
        box = {}

        def hook(module, args, output):
            if unit.kind == "head":
                d = args[0].shape[-1] // heads
                box["a"] = args[0][..., unit.index * d:(unit.index + 1) * d].sum(-1)
            else:
                box["a"] = output[..., unit.index]

        handle = layer.register_forward_hook(hook)
        try:
            run(inputs_embeds)
        finally:
            handle.remove()
        return (box["a"].float() * weights).sum(-1)

    return forward


def _check_conditional(ours, forward, model, x, x_base, names):
    modules = dict(model.named_modules())
    for name in names:
        lc = captum_attr.LayerConductance(forward, modules[name])
        expected = lc.attribute(x, baselines=x_base, n_steps=STEPS, method="riemann_trapezoid").detach()[0].sum(0)
        got = ours.scores[name][0]
        assert _relative(got, expected) <= 1e-4, f"{name}: {_relative(got, expected):.2e}"
    with torch.no_grad():
        f_x, f_b = forward(x), forward(x_base)
    torch.testing.assert_close(ours.f_input, f_x.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.f_baseline, f_b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,logits", [("bert", 2), pytest.param("electra", 1, marks=pytest.mark.slow)])
def test_conditional_nig_toward_a_neuron_equals_captum(family, logits):
    tok = make_tokenizer("bert")
    model = make_model(family, num_labels=logits, vocab_size=tok.vocab_size, seed=1)
    prefix = "bert" if family == "bert" else "electra"
    unit = fastnig.Unit(f"{prefix}.encoder.layer.1.intermediate.dense", 5)
    query, passage = PAIRS[0]
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=STEPS, rule="left", progress=False,
                             target=unit, heads=True)
    # below: everything of layer 0 and layer 1's attention; above (and the unit's own module): nothing
    below = [n for n in ours.scores]
    assert f"{prefix}.encoder.layer.1.attention.output.dense" in below
    assert not any(n.startswith((f"{prefix}.encoder.layer.1.intermediate", f"{prefix}.encoder.layer.1.output"))
                   for n in below)
    assert ours.settings["target"] == unit.describe() and ours.targets == [unit.describe()]
    x, x_base, run, _ = _classifier_inputs(model, tok, query, passage)
    forward = _unit_forward(run, model, unit, torch.ones(x.shape[1]))
    _check_conditional(ours, forward, model, x, x_base, [f"{prefix}.encoder.layer.0.intermediate.dense",
                                                         f"{prefix}.encoder.layer.1.attention.self.value"])
    # its heads, toward the neuron
    projections = output_projections(model)
    for name, (layer, heads) in projections.items():
        expected = _context_conductance(forward, layer, x, x_base).sum(0).unflatten(-1, (heads, -1)).sum(-1)
        assert _relative(ours.head_scores[name][0], expected) <= 1e-4, name
    # completeness: the input's NIG still sums to F(x) - F(x') of the unit (a finer rule: a small delta)
    fine = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=64, progress=False, target=unit)
    assert float(fine.relative_delta()[0]) < 0.01


def test_conditional_nig_toward_a_head_of_one_segment_equals_captum():
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=3)
    unit = fastnig.Unit("bert.encoder.layer.1.attention.output.dense", 2, kind="head", segment="query")
    query, passage = PAIRS[1]
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=STEPS, rule="left", progress=False,
                             target=unit)
    assert "bert.encoder.layer.1.attention.output.dense" not in ours.scores
    assert "bert.encoder.layer.1.attention.self.query" in ours.scores
    x, x_base, run, seq = _classifier_inputs(model, tok, query, passage)
    forward = _unit_forward(run, model, unit, (seq == 0).float())
    _check_conditional(ours, forward, model, x, x_base, ["bert.encoder.layer.0.output.dense",
                                                         "bert.encoder.layer.1.attention.self.key"])


@pytest.mark.slow
def test_conditional_nig_in_a_decoder_equals_captum():
    tok = make_word_tokenizer("qwen")
    model = make_generative("qwen3", vocab_size=len(tok), seed=1)
    unit = fastnig.Unit("model.layers.1.mlp.up_proj", 7, segment="passage")
    ours = fastnig.attribute(model, [PAIRS[1]], tokenizer=tok, steps=STEPS, rule="left", progress=False,
                             target=unit)
    assert not any(n.startswith("model.layers.1.mlp") for n in ours.scores)
    x, x_base, run, seq = _decoder_inputs(model, tok)
    forward = _unit_forward(run, model, unit, (seq == 1).float())
    _check_conditional(ours, forward, model, x, x_base, ["model.layers.0.mlp.down_proj",
                                                         "model.layers.1.self_attn.o_proj"])


def test_unit_validation():
    with pytest.raises(ValueError, match="kind"):
        fastnig.Unit("x", 0, kind="layer")
    with pytest.raises(ValueError, match="segment"):
        fastnig.Unit("x", 0, segment="title")
    with pytest.raises(ValueError, match="index"):
        fastnig.Unit("x", -1)
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tok, steps=4, progress=False, target=fastnig.Unit("bert", 0))
    with pytest.raises(ValueError, match="heads"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tok, steps=4, progress=False,
                          target=fastnig.Unit("bert.encoder.layer.0.attention.output.dense", 9, kind="head"))


# ------------------------------------------------------------- attention pattern by segment
def _pattern_reference(forward, module, x, x_base, seq):
    """Captum LayerConductance of the attention module's probabilities (its output's last tensor), eager
    attention, summed into (query segment, key segment) blocks: ``[heads, 3, 3]``."""
    attr = captum_attr.LayerConductance(forward, module).attribute(x, baselines=x_base, n_steps=STEPS,
                                                                  method="riemann_trapezoid")
    probabilities = attr[-1][0].detach()  # [heads, T, T]
    one_hot = torch.nn.functional.one_hot(seq, len(SEGMENTS)).float()
    return torch.einsum("is,hij,jr->hsr", one_hot, probabilities, one_hot)


def _check_patterns(model, ours, forward, x, x_base, seq, attention_modules):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for name, module in attention_modules.items():
            expected = _pattern_reference(forward, module, x, x_base, seq)
            got = ours.blocks[name][0]
            assert got.shape == expected.shape
            assert _relative(got, expected) <= 1e-4, f"{name}: {_relative(got, expected):.2e}"
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("family,logits", [("bert", 2), pytest.param("electra", 1, marks=pytest.mark.slow)])
def test_attention_pattern_blocks_equal_captum_on_the_probabilities(family, logits):
    from fastnig.engine.patterns import attention_pattern_nig

    tok = make_tokenizer("bert")
    model = make_model(family, num_labels=logits, vocab_size=tok.vocab_size, seed=1)
    implementation = model.config._attn_implementation
    query, passage = PAIRS[0]
    ours = attention_pattern_nig(model, [(query, passage)], tokenizer=tok, steps=STEPS, rule="left")
    assert model.config._attn_implementation == implementation  # restored
    assert ours.settings["attention"] == "eager"
    x, x_base, run, seq = _classifier_inputs(model, tok, query, passage)
    base = getattr(model, family)
    modules = {f"{family}.encoder.layer.{i}.attention.output.dense": layer.attention.self
               for i, layer in enumerate(base.encoder.layer)}
    _check_patterns(model, ours, lambda e: _probability(run(e)), x, x_base, seq, modules)


@pytest.mark.slow
def test_decoder_attention_pattern_blocks_equal_captum():
    from fastnig.engine.patterns import attention_pattern_nig

    tok = make_word_tokenizer("qwen")
    model = make_generative("qwen3", vocab_size=len(tok), seed=1)
    ours = attention_pattern_nig(model, [PAIRS[1]], tokenizer=tok, steps=STEPS, rule="left")
    x, x_base, run, seq = _decoder_inputs(model, tok)
    modules = {f"model.layers.{i}.self_attn.o_proj": layer.self_attn for i, layer in enumerate(model.model.layers)}
    _check_patterns(model, ours, lambda e: torch.softmax(run(e).float(), -1)[:, 1], x, x_base, seq, modules)


def test_attention_pattern_chunks_and_rules():
    from fastnig.engine.patterns import attention_pattern_nig

    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=4)
    pairs = [PAIRS[1], PAIRS[0], PAIRS[2]]
    whole = attention_pattern_nig(model, pairs, tokenizer=tok, steps=4, step_batch=5, pair_batch=3, max_length=24)
    chunked = attention_pattern_nig(model, pairs, tokenizer=tok, steps=4, step_batch=2, max_length=24)
    assert whole.settings["rule"] == "richardson"
    for name, value in whole.blocks.items():
        torch.testing.assert_close(chunked.blocks[name], value, rtol=1e-4, atol=1e-7)
        assert value.shape == (3, model.config.num_attention_heads, 3, 3)
        assert (value[2, :, 1] == 0).all() and (value[2, :, :, 1] == 0).all()  # an empty passage: no block
        assert (value[0] != 0).any()
    totals = whole.head_totals()
    assert set(totals) == set(whole.blocks)


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "t5", pytest.param("llama-cls", marks=pytest.mark.slow),
                                  pytest.param("qwen2", marks=pytest.mark.slow)])
def test_heads_add_up_to_the_output_projections_conductance_in_every_family(kind):
    """y = W c + b: Σ_j g_{y_j} Δy_j = (Wᵀ g_y)ᵀ Δc, so per layer the heads' total equals the total NIG of the
    output projection's own units, point by point, for every rule (and the first- and last-token cuts)."""
    if kind in ("distilbert", "roberta"):
        tok = make_tokenizer(kind)
        model = make_model(kind, vocab_size=tok.vocab_size, seed=5)
    else:
        tok = make_word_tokenizer({"t5": "t5", "llama-cls": "llama"}.get(kind, "qwen"))
        model = make_generative(kind, vocab_size=len(tok), seed=5)
    ours = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, progress=False, heads=True, segments=True)
    projections = output_projections(model)
    assert set(ours.head_scores) == set(projections) and len(projections) >= 2
    if kind == "t5":
        assert any("EncDecAttention" in n for n in projections) and any("decoder" in n for n in projections)
    for name, (_, heads) in projections.items():
        got = ours.head_scores[name]
        assert got.shape == (2, heads)
        torch.testing.assert_close(ours.head_segment_scores[name].sum(1), got, rtol=1e-5, atol=1e-7)
        expected = ours.scores[name].sum(-1)
        scale = ours.scores[name].abs().sum(-1).clamp_min(1e-9)
        assert ((got.sum(-1) - expected).abs() / scale).max() <= 1e-4, name


def test_out_of_memory_redo_covers_the_head_accumulators(monkeypatch):
    """An OOM raised inside a gradient hook mid-chunk (some layers and head contexts already accumulated):
    the redo restores the head accumulators and carries exactly like the neurons'."""
    import warnings

    from fastnig.engine import attribute as attribution

    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=2)
    reference = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, step_batch=9, heads=True,
                                  progress=False)
    calls = {"n": 0}
    real = attribution.accumulate_conductance

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # second chunk, after some of its accumulations (14 per chunk: 12 + 2 contexts)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "accumulate_conductance", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        redone = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=8, step_batch=4, heads=True,
                                   progress=False)
    assert calls["n"] > 20
    for name, value in reference.head_scores.items():
        torch.testing.assert_close(redone.head_scores[name], value, rtol=1e-4, atol=1e-7)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
