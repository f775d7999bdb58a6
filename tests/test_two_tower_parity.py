"""fastnig.attribute of the two-tower rankers against Captum ``LayerConductance`` (issue 27).

The oracles are written from the model cards with transformers directly, never with fastnig's
ranker code (``fastnig.engine.two_tower``):

* a dense bi-encoder: [CLS] or mean pooling of ``last_hidden_state`` (mean over attended tokens),
  dot or cosine similarity;
* SPLADE: w = max over attended tokens of log(1 + relu(MLM logits)), score = w_q · w_d;
* ColBERT (colbert-ai): ``[CLS] [Q] query [SEP]`` padded with [MASK] (not attended to) to the query
  length, ``[CLS] [D] passage [SEP]``; ``linear`` projection, L2-normalised, Σ over query tokens of
  the max over document tokens (punctuation left out) of the dot product.

Captum sees the query and the passage as two inputs interpolated with the same α from their PAD
baselines (special tokens and markers kept).  The towers are always *separate* modules on Captum's
side (a deep copy when fastnig's tower is shared), each module attributed on its own: fastnig's
conductance of a shared module, called once per tower in a forward, must equal the sum of the two
copies'; with separate towers each tower's module its own.  Padded batches on both sides; Captum's
conductance summed over each tower's real tokens.  ``rule="left"`` with ``steps=N`` is Captum's
``riemann_trapezoid`` with ``n_steps=N`` (docs/method.md §5).
"""
from __future__ import annotations

import copy
import string

import pytest
import torch
import transformers as tf
from tiny_models import make_tokenizer
from torch import nn

import fastnig
from fastnig.rankers import BiEncoder, ColBERT, Splade

captum_attr = pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

STEPS = 8
TOLERANCE = 1e-4
PAIRS = [("cancer risk diet", "a study of diet and cancer risk in patients, with heat."),
         ("boundary layer heat transfer", "flow")]
TARGETS = ["relevant", "non-relevant"]
WORST = [0.0]  # the largest relative error seen (printed with -s)


@pytest.fixture(autouse=True)
def _report_worst():
    WORST[0] = 0.0
    yield
    print(f"worst relative error {WORST[0]:.2e}")


def bert_config(vocab=220, **kw):
    return tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, **kw)


def encoder(seed):
    torch.manual_seed(seed)
    return tf.BertModel(bert_config(), add_pooling_layer=False).eval()


# ------------------------------------------------------------ the oracle's inputs
def tower_batch(tok, texts, prefix=(), length=None, mask_pad=False):
    """``(ids, baseline ids, attention, real, scored)`` ``[B, L]`` of texts as one tower reads them."""
    rows = []
    for text in texts:
        words = tok(text, add_special_tokens=False)["input_ids"]
        ids = [tok.cls_token_id, *prefix, *words, tok.sep_token_id]
        special = [1] * (1 + len(prefix)) + [0] * len(words) + [1]
        attended = [1] * len(ids)
        if length is not None:  # ColBERT's query: [MASK] padding, not attended to
            extra = length - len(ids)
            ids, special, attended = ids + [tok.mask_token_id] * extra, special + [1] * extra, attended + [0] * extra
        rows.append((ids, special, attended))
    L = max(len(r[0]) for r in rows)
    out = torch.full((len(rows), L), tok.pad_token_id), torch.zeros(len(rows), L, dtype=torch.bool)
    ids, special = out
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    real = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, s, a) in enumerate(rows):
        ids[i, :len(r)], special[i, :len(r)] = torch.tensor(r), torch.tensor(s, dtype=torch.bool)
        attention[i, :len(r)], real[i, :len(r)] = torch.tensor(a), True
    base = torch.where(real & ~special, torch.full_like(ids, tok.pad_token_id), ids)
    return ids, base, attention, real


def captum_two_towers(towers, forward, q, d, targets, steps=STEPS, linears=None):
    """``({(tower, name): [P, F]}, F at the input)``: Captum LayerConductance of every Linear of each tower
    module (0 query, 1 document), summed over the tower's real tokens; F = ±score per target."""
    (q_ids, q_base, q_att, q_real), (d_ids, d_base, d_att, d_real) = q, d
    sign = torch.tensor([1.0 if t == "relevant" else -1.0 for t in targets])

    def f(qe, de, qa, da):
        return forward(qe, de, qa, da) * sign.repeat(qe.shape[0] // len(sign))

    embed = [t.get_input_embeddings() for t in towers]
    with torch.no_grad():
        xq, bq, xd, bd = embed[0](q_ids), embed[0](q_base), embed[1](d_ids), embed[1](d_base)
        f_in = f(xq, xd, q_att, d_att)
    out = {}
    for tower, module_owner, real in ((0, towers[0], q_real), (1, towers[1], d_real)):
        chosen = linears(module_owner) if linears else {n: m for n, m in module_owner.named_modules()
                                                        if isinstance(m, nn.Linear)}
        for name, module in chosen.items():
            lc = captum_attr.LayerConductance(f, module)
            attr = lc.attribute((xq, xd), baselines=(bq, bd), additional_forward_args=(q_att, d_att),
                                n_steps=steps, method="riemann_trapezoid").detach()
            out[(tower, name)] = torch.where(real[:, :, None], attr, torch.zeros_like(attr)).sum(dim=1)
    return out, f_in


def assert_close(got, expected, what):
    norm = float(expected.norm())
    rel = float((got - expected).norm()) / max(norm, 1e-30)
    assert rel <= TOLERANCE or float((got - expected).abs().max()) <= 1e-9, f"{what}: relative error {rel:.2e}"
    WORST[0] = max(WORST[0], rel)
    return rel


def pooled(h, att, pooling):
    if pooling == "cls":
        return h[:, 0]
    w = att.unsqueeze(-1).float()
    return (h * w).sum(1) / w.sum(1)


def bi_encoder_forward(towers, pooling, similarity):
    def forward(qe, de, qa, da):
        q = pooled(towers[0](inputs_embeds=qe, attention_mask=qa).last_hidden_state, qa, pooling)
        d = pooled(towers[1](inputs_embeds=de, attention_mask=da).last_hidden_state, da, pooling)
        if similarity == "cosine":
            q, d = nn.functional.normalize(q, dim=-1), nn.functional.normalize(d, dim=-1)
        return (q * d).sum(-1)
    return forward


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("pooling,similarity", [("cls", "dot"), ("mean", "cosine")])
def test_a_shared_bi_encoder_sums_both_towers_calls(pooling, similarity):
    tok = make_tokenizer()
    model = encoder(0)
    towers = (model, copy.deepcopy(model))  # Captum: two separate modules of the same weights
    q, d = tower_batch(tok, [p[0] for p in PAIRS]), tower_batch(tok, [p[1] for p in PAIRS])
    ref, f_in = captum_two_towers(towers, bi_encoder_forward(towers, pooling, similarity), q, d, TARGETS)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, target=TARGETS, ranker=BiEncoder(pooling, similarity),
                             rule="left", steps=STEPS, segments=True, progress=False)
    torch.testing.assert_close(ours.f_input, f_in.float(), rtol=1e-5, atol=1e-5)
    assert set(ours.scores) == {n for _, n in ref}
    for name, got in ours.scores.items():
        assert_close(got, ref[(0, name)] + ref[(1, name)], name)
        seg = ours.segment_scores[name]  # segments = towers: query tower, document tower, nothing else
        assert_close(seg[:, 0], ref[(0, name)], f"{name} query tower")
        assert_close(seg[:, 1], ref[(1, name)], f"{name} document tower")
        assert float(seg[:, 2].abs().max()) == 0.0


def test_separate_bi_encoder_towers_each_get_their_own_modules():
    tok = make_tokenizer()
    towers = (encoder(1), encoder(2))
    q, d = tower_batch(tok, [p[0] for p in PAIRS]), tower_batch(tok, [p[1] for p in PAIRS])
    ref, f_in = captum_two_towers(towers, bi_encoder_forward(towers, "mean", "dot"), q, d, TARGETS)
    ours = fastnig.attribute(towers, PAIRS, tokenizer=tok, target=TARGETS, ranker=BiEncoder("mean", "dot"),
                             rule="left", steps=STEPS, progress=False)
    torch.testing.assert_close(ours.f_input, f_in.float(), rtol=1e-5, atol=1e-5)
    assert set(ours.scores) == {f"{'query' if t == 0 else 'document'}.{n}" for t, n in ref}
    for (tower, name), expected in ref.items():
        assert_close(ours.scores[f"{'query' if tower == 0 else 'document'}.{name}"], expected, name)


def splade_weights(logits, att):
    return (torch.log1p(torch.relu(logits)) * att.unsqueeze(-1).float()).max(dim=1).values


def test_splade_against_captum_with_the_vocabulary_units():
    tok = make_tokenizer()
    torch.manual_seed(3)
    model = tf.BertForMaskedLM(bert_config()).eval()
    towers = (model, copy.deepcopy(model))

    def forward(qe, de, qa, da):
        wq = splade_weights(towers[0](inputs_embeds=qe, attention_mask=qa).logits, qa)
        wd = splade_weights(towers[1](inputs_embeds=de, attention_mask=da).logits, da)
        return (wq * wd).sum(-1)

    def linears(owner):
        head = owner.get_output_embeddings()
        return {n: m for n, m in owner.named_modules()
                if isinstance(m, nn.Linear) and (n.startswith("bert.") or m is head)}

    q, d = tower_batch(tok, [p[0] for p in PAIRS]), tower_batch(tok, [p[1] for p in PAIRS])
    ref, f_in = captum_two_towers(towers, forward, q, d, TARGETS, linears=linears)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, target=TARGETS, ranker=Splade(), rule="left",
                             steps=STEPS, include_vocabulary=True, progress=False)
    torch.testing.assert_close(ours.f_input, f_in.float(), rtol=1e-5, atol=1e-5)
    assert "cls.predictions.decoder" in ours.scores and "cls.predictions.transform.dense" not in ours.scores
    assert set(ours.scores) == {n for _, n in ref}
    for name, got in ours.scores.items():
        assert_close(got, ref[(0, name)] + ref[(1, name)], name)


class TinyColBERT(tf.BertPreTrainedModel):
    """colbert-ai's HF_ColBERT: a BERT encoder and a linear projection without bias."""

    def __init__(self, config, dim=16):
        super().__init__(config)
        self.bert = tf.BertModel(config, add_pooling_layer=False)
        self.linear = nn.Linear(config.hidden_size, dim, bias=False)
        self.post_init()


def colbert_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[unused0]", "[unused1]"]})
    return tok


def test_colbert_against_captum():
    tok = colbert_tokenizer()
    torch.manual_seed(4)
    model = TinyColBERT(bert_config()).eval()
    towers = (model, copy.deepcopy(model))
    q_marker, d_marker = tok.convert_tokens_to_ids(["[unused0]", "[unused1]"])
    punctuation = {i for p, i in tok.get_vocab().items() if p in string.punctuation}
    q = tower_batch(tok, [p[0] for p in PAIRS], prefix=(q_marker,), length=12)
    d = tower_batch(tok, [p[1] for p in PAIRS], prefix=(d_marker,))
    d_scored = d[3] & ~torch.isin(d[0], torch.tensor(sorted(punctuation)))

    def forward(qe, de, qa, da):
        qv = nn.functional.normalize(towers[0].linear(towers[0].bert(inputs_embeds=qe, attention_mask=qa)
                                                      .last_hidden_state), dim=-1)
        dv = nn.functional.normalize(towers[1].linear(towers[1].bert(inputs_embeds=de, attention_mask=da)
                                                      .last_hidden_state), dim=-1)
        sim = torch.einsum("bqh,bdh->bqd", qv, dv)
        keep = d_scored.repeat(qe.shape[0] // d_scored.shape[0], 1)
        return sim.masked_fill(~keep[:, None, :], float("-inf")).max(-1).values.sum(-1)

    def linears(owner):
        return {n: m for n, m in owner.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.")}

    ref, f_in = captum_two_towers(towers, forward, q, d, TARGETS, linears=linears)
    ours = fastnig.attribute(model, PAIRS, tokenizer=tok, target=TARGETS, rule="left", steps=STEPS, progress=False,
                             ranker=ColBERT(query_length=12))
    torch.testing.assert_close(ours.f_input, f_in.float(), rtol=1e-5, atol=1e-5)
    assert set(ours.scores) == {n for _, n in ref}
    for name, got in ours.scores.items():
        assert_close(got, ref[(0, name)] + ref[(1, name)], name)
