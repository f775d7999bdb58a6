"""fastnig.attribute of the generative ranker families against Captum ``LayerConductance`` (issue 23).

The oracle here is written from the model cards, with transformers directly: it never calls
fastnig's ranker code (``fastnig.engine.rankers`` / ``templates``).  Each family's prompt is
built piece by piece (template text, query, passage), so the oracle knows which tokens are the
query's and the passage's by construction; the pieces joined must give the tokens the whole
prompt gives (what fastnig tokenises).  The baseline replaces the query and passage tokens by
the pad token (the end-of-sequence token for a tokenizer without one) and keeps the template's.

* monoT5 (castorini's usage): ``Query: {q} Document: {d} Relevant:``, one decoder step from
  ``decoder_start_token_id``, softmax over the logits of (``false``, ``true``) -> P(true);
* Qwen3-Reranker (its model card): prefix + ``<Instruct>: ...\\n<Query>: {q}\\n<Document>: {d}``
  + suffix, ``logits[:, -1, [no, yes]]`` -> log_softmax -> exp, left padding; here also right
  padding (read at the last real token), explicit ``position_ids = cumsum(mask) - 1`` either way;
* a Llama sequence classifier: its ``score`` head on the hidden state of the last real token.

Captum's ``riemann_trapezoid`` with ``n_steps=N`` evaluates the N + 1 points k / N and sums
g_k (a_{k+1} - a_k): fastnig's ``rule="left"`` with ``steps=N`` (docs/method.md §5, as in
tests/test_attribution.py).  Pairs of different lengths go through one padded batch on both
sides; Captum's conductance is summed over each pair's real tokens only.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_generative, make_word_tokenizer
from torch import nn

import fastnig

captum_attr = pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

STEPS = 16  # Captum's riemann_trapezoid n_steps=16 and fastnig's rule="left" steps=16: the same 17 points
TOLERANCE = 1e-4  # ||fastnig - captum|| / ||captum|| per pair and Linear
PAIRS = [  # different lengths: one padded batch
    ("cancer risk diet", "a study of diet and cancer risk in patients with heat"),
    ("boundary layer", "flow"),
    ("what is the effect of heat transfer on wings",
     "the heat transfer of supersonic wings was studied in experimental tests and the results show large effects"),
]

QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

# (text piece, segment): 0 query, 1 passage, 2 template; special tokens the tokenizer adds are template
LAYOUTS = {
    "monot5": lambda q, d: [("Query: ", 2), (q, 0), (" Document: ", 2), (d, 1), (" Relevant:", 2)],
    "qwen3": lambda q, d: [(QWEN3_PREFIX + f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: ", 2), (q, 0),
                           ("\n<Document>: ", 2), (d, 1), (QWEN3_SUFFIX, 2)],
    "llama-cls": lambda q, d: [("query: ", 2), (q, 0), (" document: ", 2), (d, 1)],
}


def _pieces(tokenizer, layout, query, passage):
    """Token ids and segments of the prompt, built from its pieces; checked against the whole prompt's
    tokens (with the tokenizer's special tokens, as fastnig tokenises it)."""
    pieces = layout(query, passage)
    text = "".join(t for t, _ in pieces)
    whole = tokenizer(text, add_special_tokens=True)["input_ids"]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, segments = [], []
    for piece, segment in pieces:
        part = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += part
        segments += [segment] * len(part)
    assert ids == bare, "the pieces tokenise differently from the whole prompt"
    start = next(i for i in range(len(whole) - len(bare) + 1) if whole[i:i + len(bare)] == bare)
    ids = whole[:start] + ids + whole[start + len(bare):]
    segments = [2] * start + segments + [2] * (len(whole) - start - len(bare))
    return ids, segments


def _batch(tokenizer, layout, pairs, side):
    """``input_ids``, ``baseline_ids`` (query and passage tokens -> pad, else eos), ``attention_mask``,
    ``segments`` (0 query, 1 passage, 2 template, -1 padding): ``[P, T]`` padded on ``side``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [_pieces(tokenizer, layout, q, d) for q, d in pairs]
    width = max(len(ids) for ids, _ in rows)
    input_ids, base_ids, mask, segs = [], [], [], []
    for ids, segments in rows:
        base = [pad if s in (0, 1) else t for t, s in zip(ids, segments)]
        fill = width - len(ids)
        if side == "left":
            input_ids.append([pad] * fill + ids)
            base_ids.append([pad] * fill + base)
            mask.append([0] * fill + [1] * len(ids))
            segs.append([-1] * fill + segments)
        else:
            input_ids.append(ids + [pad] * fill)
            base_ids.append(base + [pad] * fill)
            mask.append([1] * len(ids) + [0] * fill)
            segs.append(segments + [-1] * fill)
    return torch.tensor(input_ids), torch.tensor(base_ids), torch.tensor(mask), torch.tensor(segs)


# ------------------------------------------------------------- the forwards, from the model cards
def _monot5_forward(model, tokenizer):
    false_id, true_id = tokenizer.convert_tokens_to_ids("false"), tokenizer.convert_tokens_to_ids("true")

    def forward(inputs_embeds, attention_mask):
        start = torch.full((inputs_embeds.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
        logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=start,
                       use_cache=False).logits
        return torch.softmax(logits[:, 0, [false_id, true_id]], dim=-1)[:, 1]  # P(true)

    return forward


def _positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _last_real(attention_mask):
    index = torch.arange(attention_mask.shape[1])
    return (attention_mask * index).argmax(-1)


def _yes_no_forward(model, tokenizer, side):
    no_id, yes_id = tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes")

    def forward(inputs_embeds, attention_mask):
        logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=_positions(attention_mask), use_cache=False).logits
        if side == "left":  # the model card: the last position is every row's last token
            last = logits[:, -1, :]
        else:
            last = logits[torch.arange(logits.shape[0]), _last_real(attention_mask)]
        scores = torch.stack([last[:, no_id], last[:, yes_id]], dim=1)
        return torch.log_softmax(scores, dim=1)[:, 1].exp()  # P(yes)

    return forward


def _sequence_classifier_forward(model, tokenizer, side):
    def forward(inputs_embeds, attention_mask):
        hidden = model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=_positions(attention_mask), use_cache=False).last_hidden_state
        read = hidden[:, -1] if side == "left" else hidden[torch.arange(hidden.shape[0]), _last_real(attention_mask)]
        return torch.sigmoid(model.score(read)[:, 0])  # 1 logit: F = sigmoid(s)

    return forward


def _heads(model):
    return {id(m) for m in (getattr(model, "lm_head", None), getattr(model, "score", None)) if m is not None}


def _linears(model):
    """Every Linear of the model but its vocabulary / score head (what fastnig attributes by default)."""
    heads = _heads(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in heads}


def _captum(model, forward, input_ids, base_ids, mask, segments, steps):
    """Captum LayerConductance per Linear: ``{name: [P, 3, features]}`` summed over each pair's real tokens
    of each segment (query, passage, template; an output of one token per pair, monoT5's decoder step,
    is the template's), and F at the input ``[P]``."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x, x_base = emb(input_ids), emb(base_ids)
        f = forward(x, mask)
    out = {}
    for name, module in _linears(model).items():
        lc = captum_attr.LayerConductance(forward, module)
        attr = lc.attribute(x, baselines=x_base, additional_forward_args=(mask,), n_steps=steps,
                            method="riemann_trapezoid", attribute_to_layer_input=False).detach()
        if attr.shape[1] == mask.shape[1]:  # a token axis over the (encoder) input: its real tokens only
            out[name] = torch.stack([torch.where((segments == s)[:, :, None], attr, torch.zeros_like(attr)).sum(1)
                                     for s in range(3)], dim=1)
        else:  # the decoder step of monoT5
            assert attr.shape[1] == 1, (name, attr.shape)
            out[name] = torch.stack([torch.zeros_like(attr[:, 0])] * 2 + [attr[:, 0]], dim=1)
    return out, f


def _compare(ours, ref, f_ref):
    """The largest ||ours - ref|| / ||ref|| over Linears and pairs, of the token sums and of each segment's
    sum (asserted <= TOLERANCE).

    A vector that is rounding noise only (below 1e-5 of the pair's largest: monoT5's decoder
    self-attention queries and keys, which one decoder step on its own start token never uses; a
    segment with nothing in it) is held to an absolute bound instead (1e-6 of the pair's largest)."""
    assert set(ours.scores) == set(ref)
    torch.testing.assert_close(ours.f_input, f_ref.float(), rtol=1e-5, atol=1e-6)
    worst = 0.0
    for i in range(len(f_ref)):
        scale = max(float(expected[i].sum(0).norm()) for expected in ref.values())
        assert scale > 0
        for name, expected in ref.items():
            assert ours.segment_scores[name].shape == expected.shape, name
            checks = [("all tokens", ours.scores[name][i], expected[i].sum(0))]
            checks += [(segment, ours.segment_scores[name][i, s], expected[i, s])
                       for s, segment in enumerate(("query", "passage", "template"))]
            for what, got, want in checks:
                norm, err = float(want.norm()), float((got - want).norm())
                if norm < 1e-5 * scale:
                    assert err <= 1e-6 * scale, f"{name} pair {i} {what}: Captum ~0 ({norm:.1e}), error {err:.1e}"
                    continue
                worst = max(worst, err / norm)
                assert err <= TOLERANCE * norm, f"{name} pair {i} {what}: relative error {err / norm:.2e}"
    return worst


def _pad_embedding_not_zero(model, tokenizer, seed=7):
    """Give the pad token a random embedding as a trained model has (the tiny models initialise the row of
    ``config.pad_token_id`` to zero, which makes RMSNorm's path nearly singular at the baseline)."""
    pad = tokenizer.pad_token_id
    if pad is not None:
        gen = torch.Generator().manual_seed(seed)
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[pad] = 0.2 * torch.randn(weight.shape[1], generator=gen, dtype=weight.dtype)
    return model


# ------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("side", ["right", "left"])
def test_monot5_equals_captum(side):
    """T5 (relative position bias): also a left-padded oracle batch, which fastnig's right padding must match."""
    tok = make_word_tokenizer("t5")
    model = make_generative("t5", vocab_size=len(tok), seed=1)
    names = _linears(model)
    assert "lm_head" not in names and any("EncDecAttention" in n for n in names)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, steps=STEPS, rule="left", pair_batch=len(PAIRS),
                             progress=False, segments=True)
    ids, base, mask, segments = _batch(tok, LAYOUTS["monot5"], PAIRS, side)
    ref, f = _captum(model, _monot5_forward(model, tok), ids, base, mask, segments, STEPS)
    worst = _compare(ours, ref, f)
    print(f"monot5 ({side} padding): max relative error {worst:.2e}")


@pytest.mark.parametrize("kind,side,pad_row", [
    ("qwen3", "left", "random"), ("qwen3", "right", "random"),
    ("qwen3", "left", "zero"), ("qwen3", "right", "zero"), ("qwen2", "left", "random"), ("qwen2", "right", "random"),
])
def test_yes_no_equals_captum(kind, side, pad_row):
    """Qwen3-Reranker's recipe; ``pad_row="zero"`` keeps the tiny model's zero pad embedding (a path that
    is nearly singular at the baseline), ``"random"`` gives the pad
    token an embedding as a trained model has."""
    tok = make_word_tokenizer("qwen")
    model = make_generative(kind, vocab_size=len(tok), seed=1)
    if pad_row == "random":
        _pad_embedding_not_zero(model, tok)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, steps=STEPS, rule="left", pair_batch=len(PAIRS),
                             progress=False, segments=True, ranker="yes_no")
    ids, base, mask, segments = _batch(tok, LAYOUTS["qwen3"], PAIRS, side)
    ref, f = _captum(model, _yes_no_forward(model, tok, side), ids, base, mask, segments, STEPS)
    worst = _compare(ours, ref, f)
    print(f"yes_no {kind} ({side} padding, {pad_row} pad row): max relative error {worst:.2e}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_classifier_equals_captum(side):
    """LlamaForSequenceClassification with the "llama" tokenizer (no pad token: the baseline puts eos)."""
    tok = make_word_tokenizer("llama")
    assert tok.pad_token_id is None
    model = make_generative("llama-cls", vocab_size=len(tok), seed=1)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, steps=STEPS, rule="left", pair_batch=len(PAIRS),
                             progress=False, segments=True)
    ids, base, mask, segments = _batch(tok, LAYOUTS["llama-cls"], PAIRS, side)
    ref, f = _captum(model, _sequence_classifier_forward(model, tok, side), ids, base, mask, segments, STEPS)
    worst = _compare(ours, ref, f)
    print(f"last_token_classifier ({side} padding): max relative error {worst:.2e}")
