"""The ranker families of issue 23: classifier unchanged, monoT5, yes/no decoders, decoder classifiers.

Behaviour only (Captum parity: tests/test_rankers_parity.py): the classifier's results bit for bit
as before, the exact last-token cut, heads never attributed, bf16, padding invariance, templates
and their errors, unsupported models, baselines.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import PAIRS, make_generative, make_word_tokenizer

import fastnig
from fastnig.engine.encoding import SEGMENTS, baseline_embeddings
from fastnig.engine.rankers import bind_ranker
from fastnig.engine.scoring import score_pairs
from fastnig.engine.templates import tokenize_template
from fastnig.rankers import FAMILIES, Classifier, LastTokenClassifier, MonoT5, YesNo

SHORT = [  # different lengths, an empty passage
    ("cancer risk diet", "a study of diet and cancer risk in patients"),
    ("boundary layer", ""),
    ("heat transfer on wings", "the heat transfer of supersonic wings was studied in experimental tests"),
]
KINDS = {  # model kind -> (tokenizer kind, family)
    "t5": ("t5", "monot5"),
    "qwen3": ("qwen", "yes_no"),
    "llama": ("llama", "yes_no"),
    "llama-cls": ("llama", "last_token_classifier"),
}
TEMPLATE = "query: {query} document: {passage}"  # short: keeps the decoders' tests fast


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(kind, seed=0, dtype=torch.float32):
    tok = make_word_tokenizer(KINDS[kind][0])
    return make_generative(kind, vocab_size=len(tok), seed=seed, dtype=dtype), tok


def _random_pad_row(model, tokenizer, seed=7):
    """The pad token's embedding as a trained model has one (the tiny models zero the row of
    ``config.pad_token_id``, the qwen tokenizer's pad: RMSNorm's path is then nearly singular at the baseline)."""
    if tokenizer.pad_token_id is not None:
        weight = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight[tokenizer.pad_token_id] = (0.2 * torch.randn(weight.shape[1], generator=gen)).to(weight.dtype)
    return model


def _attr(model, tok, pairs=SHORT, **kwargs):
    kwargs.setdefault("steps", 8)
    kwargs.setdefault("progress", False)
    return fastnig.attribute(model, pairs, tokenizer=tok, **kwargs)


def _assert_rel(got, expected, tol, what="", floor=1e-7):
    """``||got - expected|| <= tol * ||expected||``, or ``<= floor`` (F's units) for a Linear whose
    conductance is rounding noise only (e.g. monoT5's decoder self-attention queries and keys: one
    decoder step attends to itself alone, so they get no gradient)."""
    norm = float(expected.norm())
    err = float((got - expected).norm())
    assert err <= tol * norm or err <= floor, f"{what}: relative error {err / max(norm, 1e-30):.2e} > {tol}"


# ---------------------------------------------------------------- 2. classifier unchanged
@pytest.mark.parametrize("ranker", ["classifier", "object"])
def test_classifier_ranker_is_bit_identical_to_no_ranker(tiny_bert, tokenizer, ranker):
    ranker = Classifier() if ranker == "object" else ranker
    kwargs = dict(tokenizer=tokenizer, steps=8, pair_batch=2, progress=False, segments=True)
    before = fastnig.attribute(tiny_bert, PAIRS[:3], **kwargs)
    after = fastnig.attribute(tiny_bert, PAIRS[:3], ranker=ranker, **kwargs)
    assert list(after.scores) == list(before.scores)
    for name in before.scores:
        assert torch.equal(after.scores[name], before.scores[name]), name
        assert torch.equal(after.segment_scores[name], before.segment_scores[name]), name
    for field in ("delta", "f_input", "f_baseline", "num_tokens", "steps_used"):
        assert torch.equal(getattr(after, field), getattr(before, field)), field
    assert after.settings == before.settings  # a classifier's records compare as before (no "ranker" key)
    plain = score_pairs(tiny_bert, tokenizer, PAIRS)
    assert np.array_equal(score_pairs(tiny_bert, tokenizer, PAIRS, ranker=ranker), plain)
    assert np.array_equal(score_pairs(tiny_bert, tokenizer, PAIRS, ranker=ranker, output="probability"),
                          score_pairs(tiny_bert, tokenizer, PAIRS, output="probability"))


def test_default_ranker_follows_the_model_class(tiny_bert, tokenizer):
    assert bind_ranker(None, tiny_bert, tokenizer).family == "classifier"
    for kind, (_, family) in KINDS.items():
        model, tok = _model(kind)
        assert bind_ranker(None, model, tok).family == family, kind
    assert {"classifier", "monot5", "yes_no", "last_token_classifier"} <= set(FAMILIES)


# ------------------------------------------------ 3. exact savings; which Linears are attributed
def _cut_rows(model, cut, **kwargs):
    """Token rows the last decoder layer's o_proj and down_proj saw, and the attributions."""
    tok = kwargs.pop("tok")
    last = model.base_model.layers[-1]
    seen = {"o_proj": set(), "down_proj": set()}
    handles = [last.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen["o_proj"].add(o.shape[1])),
               last.mlp.down_proj.register_forward_hook(lambda m, i, o: seen["down_proj"].add(o.shape[1]))]
    try:
        out = _attr(model, tok, last_token_cut=cut, pair_batch=3, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


@pytest.mark.parametrize("kind", ["qwen3", "llama-cls"])
def test_last_token_cut_changes_nothing(kind):
    """The cut runs the last layer's o_proj and MLP on the scored token only; every attribution,
    per segment too, equals the uncut run's within 1e-5 (batch padding included)."""
    model, tok = _model(kind, seed=3)
    _random_pad_row(model, tok)
    ranker = YesNo(template=TEMPLATE) if kind == "qwen3" else None
    seen_cut, cut = _cut_rows(model, True, tok=tok, ranker=ranker, segments=True)
    seen_full, full = _cut_rows(model, False, tok=tok, ranker=ranker, segments=True)
    assert seen_cut == {"o_proj": {1}, "down_proj": {1}}
    assert 1 not in seen_full["o_proj"] | seen_full["down_proj"]
    assert set(cut.scores) == set(full.scores)
    for name in full.scores:
        for i in range(len(SHORT)):
            _assert_rel(cut.scores[name][i], full.scores[name][i], 1e-5, f"{name} pair {i}")
            _assert_rel(cut.segment_scores[name][i], full.segment_scores[name][i], 1e-5, f"{name} segments {i}")
    torch.testing.assert_close(cut.f_input, full.f_input, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cut.delta, full.delta, rtol=0, atol=1e-5)


def test_heads_are_never_attributed_and_t5_cross_attention_is():
    for kind in KINDS:
        model, tok = _model(kind)
        names = list(bind_ranker(None, model, tok).modules())
        assert not any(n.startswith(("lm_head", "score")) for n in names), (kind, names)
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and not n.startswith(("lm_head", "score"))]
        assert names == linears, kind  # every other Linear, in model order
        if kind == "t5":
            for layer in range(model.config.num_decoder_layers):
                for proj in "qkvo":
                    assert f"decoder.block.{layer}.layer.1.EncDecAttention.{proj}" in names
            assert any(n.startswith("encoder.") for n in names)
    model, tok = _model("t5")
    out = _attr(model, tok, SHORT[:1], steps=4)
    assert "lm_head" not in out.scores
    assert out.scores["decoder.block.1.layer.1.EncDecAttention.k"].abs().sum() > 0


# ---------------------------------------------------------------------------- 4. bf16
@pytest.mark.parametrize("kind", ["t5", "qwen3"])
def test_bf16_weights_agree_with_float32(kind):
    fp32, tok = _model(kind, seed=2)
    bf16, _ = _model(kind, seed=2, dtype=torch.bfloat16)
    _random_pad_row(fp32, tok)
    _random_pad_row(bf16, tok)
    with torch.no_grad():  # the same weights, rounded
        for p32, p16 in zip(fp32.parameters(), bf16.parameters()):
            p16.copy_(p32)
    ranker = YesNo(template=TEMPLATE) if kind == "qwen3" else None
    a32 = _attr(fp32, tok, SHORT, ranker=ranker, steps=16, pair_batch=3)
    a16 = _attr(bf16, tok, SHORT, ranker=ranker, steps=16, pair_batch=3)
    assert next(bf16.parameters()).dtype == torch.bfloat16  # left as it was
    assert set(a16.scores) == set(a32.scores)
    torch.testing.assert_close(a16.f_input, a32.f_input, rtol=0, atol=0.05)
    torch.testing.assert_close(a16.f_baseline, a32.f_baseline, rtol=0, atol=0.05)
    for name, expected in a32.scores.items():
        got = a16.scores[name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        _assert_rel(got, expected, 0.1, name)


# ----------------------------------------------------------------------- 5. padding
@pytest.mark.parametrize("kind", ["qwen3", "llama", "llama-cls"])
def test_scores_do_not_depend_on_padding_side_or_batch(kind):
    model, tok = _model(kind, seed=4)
    make = LastTokenClassifier if kind == "llama-cls" else YesNo
    pairs = PAIRS + SHORT
    right = score_pairs(model, tok, pairs, ranker=make(padding_side="right"))
    left = score_pairs(model, tok, pairs, ranker=make(padding_side="left"))
    alone = score_pairs(model, tok, pairs, ranker=make(), batch_size=1)
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone, right, rtol=1e-5, atol=1e-6)
    # the scores are those of the attribution's F: P(relevant) = sigmoid(score)
    probability = score_pairs(model, tok, SHORT, ranker=make(padding_side="left"), output="probability")
    attributed = _attr(model, tok, SHORT, ranker=make(), steps=2, pair_batch=3)
    np.testing.assert_allclose(probability, attributed.f_input.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "qwen3", "llama-cls"])
def test_a_pair_alone_equals_the_pair_in_a_padded_batch(kind):
    model, tok = _model(kind, seed=5)
    ranker = YesNo(template=TEMPLATE) if kind == "qwen3" else None
    batch = _attr(model, tok, SHORT, ranker=ranker, pair_batch=3, segments=True)
    enc = bind_ranker(ranker, model, tok).encode(SHORT, 64, "pad")  # always right-padded, whatever the tokenizer's side
    assert torch.equal(enc.attention_mask.bool(), torch.arange(enc.input_ids.shape[1]) < enc.lengths[:, None])
    for i, pair in enumerate(SHORT):
        alone = _attr(model, tok, [pair], ranker=ranker, segments=True)
        assert alone.num_tokens[0] == batch.num_tokens[i]
        for name, expected in alone.scores.items():
            _assert_rel(batch.scores[name][i], expected[0], 1e-5, f"{name} pair {i}")
            _assert_rel(batch.segment_scores[name][i], alone.segment_scores[name][0], 1e-5, f"{name} pair {i}")
        torch.testing.assert_close(batch.f_input[i], alone.f_input[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- 6. templates
def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True).strip()


def test_tokenize_template_segments():
    tok = make_word_tokenizer("t5")
    ids, seg = tokenize_template(tok, "Query: {query} Document: {passage} Relevant:", "cancer risk",
                                 "a study of diet", 64)
    assert ids == tok("Query: cancer risk Document: a study of diet Relevant:")["input_ids"]
    assert _decode(tok, [i for i, s in zip(ids, seg) if s == 0]) == "cancer risk"
    assert _decode(tok, [i for i, s in zip(ids, seg) if s == 1]) == "a study of diet"
    assert [tok.convert_ids_to_tokens(i) for i, s in zip(ids, seg) if s == 2] == \
        ["query", ":", "document", ":", "relevant", ":", "</s>"]
    llama = make_word_tokenizer("llama")  # <s> prepended: structure
    ids, seg = tokenize_template(llama, TEMPLATE, "heat", "wings", 64)
    assert llama.convert_ids_to_tokens(ids) == ["<s>", "query", ":", "heat", "document", ":", "wings"]
    assert seg == [2, 2, 2, 0, 2, 2, 1]
    ids, seg = tokenize_template(llama, TEMPLATE, "heat", "", 64)  # an empty passage: no passage token
    assert 1 not in seg and seg[-1] == 2


def test_tokenize_template_truncates_the_passage_first():
    tok = make_word_tokenizer("t5")
    template = "Query: {query} Document: {passage} Relevant:"
    query, passage = "cancer risk diet", "a study of diet and cancer risk in patients"
    full, _ = tokenize_template(tok, template, query, passage, 64)
    assert len(full) == 19  # 3 query, 9 passage, 7 template tokens ("query", ":", ..., "</s>")
    ids, seg = tokenize_template(tok, template, query, passage, 14)
    assert len(ids) == 14 and seg.count(0) == 3 and seg.count(1) == 4
    assert _decode(tok, [i for i, s in zip(ids, seg) if s == 1]) == "a study of diet"
    assert ids[-3:] == full[-3:]  # the template's end ("Relevant:", </s>) is kept
    ids, seg = tokenize_template(tok, template, query, passage, 9)  # no passage left, then the query is cut
    assert len(ids) == 9 and seg.count(1) == 0 and seg.count(0) == 2
    with pytest.raises(ValueError, match="template alone"):
        tokenize_template(tok, template, query, passage, 5)


@pytest.mark.parametrize("template,match", [
    ("Query: {query} Relevant:", r"\{passage\}"),
    ("Query: {query} {query} Document: {passage}", r"\{query\}"),
    ("Query: {query} Title: {title} Document: {passage}", "title"),
    ("Query: {query} Document: {passage} {", "format string"),
])
def test_bad_templates_are_clear_errors(template, match):
    for make in (MonoT5, YesNo, LastTokenClassifier):
        with pytest.raises(ValueError, match=match):
            make(template=template)


@pytest.mark.parametrize("ranker,kind,argument", [
    (lambda: YesNo(yes="very yes"), "qwen3", "yes"),
    (lambda: MonoT5(true="so true"), "t5", "true"),
    (lambda: MonoT5(false=""), "t5", "false"),  # "false must be a non-empty word"
])
def test_an_answer_word_that_is_not_one_token_is_a_value_error(ranker, kind, argument):
    model, tok = _model(kind)
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        _attr(model, tok, SHORT[:1], ranker=ranker())
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        score_pairs(model, tok, SHORT[:1], ranker=ranker())


def test_an_answer_word_outside_the_vocabulary_is_a_value_error_not_unk():
    """"nope" is no word of the tiny vocabulary: it encodes to the one token <unk>, which must not be taken
    as the answer's logit (every unknown word would read the same row)."""
    model, tok = _model("qwen3")
    assert tok.encode("nope", add_special_tokens=False) == [tok.unk_token_id]
    with pytest.raises(ValueError, match=r"^no\b"):
        bind_ranker(YesNo(no="nope"), model, tok)
    with pytest.raises(ValueError, match=r"^true\b"):
        bind_ranker(MonoT5(true="maybe"), *_model("t5"))


@pytest.mark.parametrize("kind", ["t5", "qwen3", "llama-cls"])
def test_segments_sum_to_scores_and_one_token_outputs_take_the_scored_positions_segment(kind):
    model, tok = _model(kind, seed=6)
    ranker = YesNo(template=TEMPLATE) if kind == "qwen3" else None
    out = _attr(model, tok, SHORT, ranker=ranker, pair_batch=3, segments=True)
    assert out.settings["segments"] is True and out.settings["ranker"]["family"] == KINDS[kind][1]
    for name, seg in out.segment_scores.items():
        assert seg.shape == (len(SHORT), len(SEGMENTS), out.scores[name].shape[1])
        assert torch.equal(seg.sum(dim=1), out.scores[name]), name
    if kind == "t5":  # the decoder's one step is structure; the encoder's tokens have all three
        for name, seg in out.segment_scores.items():
            if name.startswith("decoder.") and ".EncDecAttention.k" not in name and ".EncDecAttention.v" not in name:
                assert (seg[:, :2] == 0).all(), name
        enc = out.segment_scores["encoder.block.0.layer.1.DenseReluDense.wo"]
        assert (enc[:, 0].abs().sum(-1) > 0).all() and (enc[[0, 2], 1].abs().sum(-1) > 0).all()
        assert (enc[1, 1] == 0).all()  # an empty passage
    else:  # past the last-token cut: the last real token's segment
        last = model.base_model.layers[-1]
        prefix = [n for n, m in model.named_modules() if m is last][0]
        for name in (f"{prefix}.self_attn.o_proj", f"{prefix}.mlp.down_proj"):
            seg = out.segment_scores[name]
            for i, (_, passage) in enumerate(SHORT):
                # the short template ends with the passage; an empty passage ends on "document:"
                where = 1 if passage else 2
                others = [s for s in range(3) if s != where]
                assert (seg[i, others] == 0).all() and seg[i, where].abs().sum() > 0, (name, i)


# ---------------------------------------------------------------- 7. unsupported models
@pytest.mark.parametrize("head", ["BertForTokenClassification", "BertForQuestionAnswering", "BertForMultipleChoice"])
def test_unsupported_architecture_names_the_families(tiny_bert, tokenizer, head):
    """(``BertModel`` and ``BertForMaskedLM`` are the bi_encoder and splade families now.)"""
    import transformers

    model = getattr(transformers, head)(tiny_bert.config).eval()
    with pytest.raises(fastnig.UnsupportedModel) as err:
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)
    message = str(err.value)
    assert head in message
    for family in ("classifier", "monot5", "yes_no", "last_token_classifier"):
        assert family in message
    with pytest.raises(fastnig.UnsupportedModel):
        score_pairs(model, tokenizer, PAIRS[:1])


def test_unknown_or_mismatched_ranker(tiny_bert, tokenizer):
    with pytest.raises(ValueError, match="nonsense") as err:
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, ranker="nonsense", progress=False)
    for family in ("classifier", "monot5", "yes_no", "last_token_classifier"):
        assert family in str(err.value)
    with pytest.raises(fastnig.UnsupportedModel, match="monot5"):
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, ranker="monot5", progress=False)
    with pytest.raises(fastnig.UnsupportedModel, match="yes_no"):
        fastnig.attribute(tiny_bert.bert, PAIRS[:1], tokenizer=tokenizer, ranker="yes_no", progress=False)
    model, tok = _model("qwen3")
    with pytest.raises(fastnig.UnsupportedModel, match="last_token_classifier"):
        fastnig.attribute(model, SHORT[:1], tokenizer=tok, ranker=LastTokenClassifier(), progress=False)
    with pytest.raises(ValueError, match="padding_side"):
        YesNo(padding_side="middle")


# ------------------------------------------------------------------------ 8. baselines
@pytest.mark.parametrize("kind", ["t5", "qwen3", "llama-cls"])
@pytest.mark.parametrize("baseline", ["pad-query", "zero", "zero-query"])
def test_other_baselines_run_for_every_family(kind, baseline):
    model, tok = _model(kind, seed=8)
    ranker = YesNo(template=TEMPLATE) if kind == "qwen3" else None
    out = _attr(model, tok, SHORT, ranker=ranker, baseline=baseline, steps=4, pair_batch=3)
    assert out.settings["baseline"] == baseline
    for name, value in out.scores.items():
        assert torch.isfinite(value).all(), name
    assert torch.isfinite(out.delta).all()
    bound = bind_ranker(ranker, model, tok)
    enc = bound.encode(SHORT, 64, baseline)
    query_only = (enc.segments == 0)
    expected = query_only if baseline.endswith("query") else query_only | (enc.segments == 1)
    assert torch.equal(enc.replace, expected)  # template tokens are never replaced
    x, x_base = baseline_embeddings(bound.embeddings, enc, baseline, bound.pad_id)
    keep = ~enc.replace
    assert torch.equal(x_base[keep], x[keep])
    if baseline.startswith("zero"):
        assert (x_base[enc.replace] == 0).all()
    else:
        pad = bound.embeddings.weight[tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id]
        assert torch.equal(x_base[enc.replace], pad.expand(int(enc.replace.sum()), -1))


def test_pad_baseline_without_a_pad_token_uses_eos():
    """The "llama" tokenizer has no pad token: the PAD baselines put its end-of-sequence token."""
    model, tok = _model("llama-cls", seed=9)
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    bound = bind_ranker(None, model, tok)
    assert bound.pad_id == tok.eos_token_id
    enc = bound.encode(SHORT, 64, "pad")
    x, x_base = baseline_embeddings(bound.embeddings, enc, "pad", bound.pad_id)
    eos = model.get_input_embeddings()(torch.tensor(tok.eos_token_id))
    assert torch.equal(x_base[enc.replace], eos.expand(int(enc.replace.sum()), -1))
    # F at the baseline is the classifier's at the prompt with every query/passage token made eos
    out = _attr(model, tok, SHORT[:1], steps=2)
    ids, seg = tokenize_template(tok, TEMPLATE, *SHORT[0], 64)
    base_ids = torch.tensor([[tok.eos_token_id if s in (0, 1) else t for t, s in zip(ids, seg)]])
    with torch.no_grad():
        hidden = model.model(input_ids=base_ids).last_hidden_state[:, -1]
        expected = torch.sigmoid(model.score(hidden)[:, 0])
    torch.testing.assert_close(out.f_baseline, expected, rtol=1e-5, atol=1e-6)
