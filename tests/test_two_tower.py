"""Two-tower rankers (issue 27): a Linear called more than once per forward, chunking / OOM redo /
Richardson / steps="auto" with two calls, SPLADE's vocabulary units, families, scoring, the
agreement rule, and a reduced `fastnig run` on a tiny bi-encoder and a tiny SPLADE.

Captum parity of the three rankers: tests/test_two_tower_parity.py.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from test_faults_engine import Positions, _assert_equal_runs, _quiet
from tiny_models import make_model, make_tokenizer
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import fastnig
from fastnig.data import LabelledPair, filter_agreeing
from fastnig.engine import attribute as attribution
from fastnig.engine import quadrature
from fastnig.engine.scoring import score_pairs
from fastnig.engine.settings import AttributionSettings
from fastnig.rankers import BiEncoder, ColBERT, resolve_ranker

captum_attr = pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PAIRS = [("cancer risk diet", "a study of diet and cancer risk in patients with heat"),
         ("boundary layer heat transfer", "flow"), ("wing", "supersonic wing pressure tests")]


def bert_config(vocab=220, positions=64):
    return tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=positions, initializer_range=0.2)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bi_encoder():
    torch.manual_seed(0)
    return tf.BertModel(bert_config(), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def splade():
    torch.manual_seed(1)
    return tf.BertForMaskedLM(bert_config()).eval()


# ------------------------------------------------ a Linear called twice by design
class TiedScorer(nn.Module):
    """A single-input scorer whose ``mix`` Linear runs twice per forward (weight-tied), or, untied,
    two copies of it once each: the same function."""

    def __init__(self, vocab=220, dim=16, tied=True):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.again = self.mix if tied else copy.deepcopy(self.mix)
        self.head = nn.Linear(dim, 1)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask):
        h = torch.tanh(self.mix(inputs_embeds))
        h = torch.tanh(self.again(h)) * attention_mask.unsqueeze(-1)
        return SequenceClassifierOutput(logits=self.head(h.sum(1) / attention_mask.sum(1, keepdim=True)))


def test_a_linear_called_twice_is_the_sum_of_its_calls(tok):
    """fastnig on the tied model == the sum over the untied copies' conductance, each checked against Captum."""
    tied, untied = TiedScorer(), TiedScorer(tied=False)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.again.load_state_dict(tied.mix.state_dict())
    options = dict(tokenizer=tok, rule="left", steps=8, progress=False, layers=["mix"], pair_batch=3,
                   output="logit")
    ours = fastnig.attribute(tied, PAIRS, **options)
    parts = fastnig.attribute(untied, PAIRS, **{**options, "layers": ["mix", "again"]})
    torch.testing.assert_close(ours.scores["mix"], parts.scores["mix"] + parts.scores["again"], rtol=1e-5,
                               atol=1e-7)
    # the untied copies against Captum: each Linear once, summed over real tokens
    enc = tok([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, return_tensors="pt",
              return_special_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    base = torch.where(mask.bool() & ~enc["special_tokens_mask"].bool(), tok.pad_token_id, ids)
    x, xb = untied.embed(ids).detach(), untied.embed(base).detach()
    forward = lambda e, m: untied(e, m).logits[:, 0]  # noqa: E731
    for name in ("mix", "again"):
        attr = captum_attr.LayerConductance(forward, getattr(untied, name)).attribute(
            x, baselines=xb, additional_forward_args=(mask,), n_steps=8, method="riemann_trapezoid")
        expected = (attr * mask[:, :, None]).sum(1).detach()
        torch.testing.assert_close(parts.scores[name], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("step_batch", [1, 2, 3])
def test_chunks_of_a_shared_tower_equal_one_chunk(bi_encoder, tok, step_batch):
    options = dict(tokenizer=tok, steps=8, rule="richardson", segments=True, pair_batch=2, progress=False)
    reference = fastnig.attribute(bi_encoder, PAIRS, step_batch=9, **options)
    _assert_equal_runs(fastnig.attribute(bi_encoder, PAIRS, step_batch=step_batch, **options), reference)


def test_out_of_memory_at_every_position_of_a_shared_tower(bi_encoder, tok, monkeypatch):
    """An OOM at each forward hook and each accumulation of a chunked run (9 points in chunks of 4; the
    second call's forward and backward included): every redo equals the unchunked run."""
    monkeypatch.setattr(attribution, "release_memory", lambda device: None)
    layers = ["encoder.layer.1.attention.self.query"]
    options = dict(tokenizer=tok, steps=8, rule="richardson", segments=True, pair_batch=2, layers=layers,
                   progress=False)
    reference = fastnig.attribute(bi_encoder, PAIRS[:2], step_batch=9, **options)
    positions = Positions(monkeypatch)
    _assert_equal_runs(fastnig.attribute(bi_encoder, PAIRS[:2], step_batch=4, **options), reference)
    events = list(positions.events)
    assert sum(kind == "forward" for kind, _, _ in events) == 2 * len(layers) * 3  # two calls per chunk
    for k in range(1, len(events) + 1):
        positions.arm(k)
        result = _quiet(fastnig.attribute, bi_encoder, PAIRS[:2], step_batch=4, **options)
        assert len(positions.events) > k
        _assert_equal_runs(result, reference)
    positions.arm()


def test_steps_auto_equals_a_fixed_run_at_its_final_steps(bi_encoder, tok, monkeypatch):
    monkeypatch.setattr(quadrature, "AUTO_START_STEPS", 4)
    options = dict(tokenizer=tok, pair_batch=3, progress=False)
    auto = fastnig.attribute(bi_encoder, PAIRS, steps="auto", max_steps=16, tolerance=1e-3, **options)
    for n in set(auto.steps_used.tolist()):
        idx = [i for i, s in enumerate(auto.steps_used.tolist()) if s == n]
        fixed = fastnig.attribute(bi_encoder, [PAIRS[i] for i in idx], steps=n, **options)
        for name, value in fixed.scores.items():
            torch.testing.assert_close(auto.scores[name][idx], value, rtol=1e-4, atol=1e-6)  # other padding


# ------------------------------------------------------- SPLADE's vocabulary units
def test_splade_vocabulary_units_sum_to_the_score_change(splade, tok):
    """The vocabulary projection is a cut (F depends on the input only through both towers' logits): its
    units' conductance, both calls summed, equals the input side's NIG = F(x) - F(x') + delta."""
    result = fastnig.attribute(splade, PAIRS, tokenizer=tok, steps=32, include_vocabulary=True, progress=False,
                               target=["relevant", "non-relevant", "relevant"])
    terms = result.scores["cls.predictions.decoder"]
    assert terms.shape == (len(PAIRS), splade.config.vocab_size)
    input_side = result.f_input - result.f_baseline + result.delta
    torch.testing.assert_close(terms.sum(1), input_side, rtol=1e-4, atol=1e-5)
    default = fastnig.attribute(splade, PAIRS[:1], tokenizer=tok, steps=4, progress=False)
    assert not any(n.startswith("cls.") for n in default.scores)  # off by default


def test_include_vocabulary_is_only_for_splade(bi_encoder, tok):
    with pytest.raises(ValueError, match="include_vocabulary"):
        fastnig.attribute(bi_encoder, PAIRS[:1], tokenizer=tok, steps=4, include_vocabulary=True, progress=False)
    with pytest.raises(TypeError, match="include_vocabulary"):
        AttributionSettings(include_vocabulary="yes")


def test_the_memory_model_counts_the_vocabulary_outputs(splade, tok):
    from fastnig.engine.memory import chunk_memory
    from fastnig.engine.rankers import bind_ranker

    bound = bind_ranker(None, splade, tok)
    modules = bound.modules()
    plain = chunk_memory(splade, modules, 40, 2)
    counted = chunk_memory(splade, modules, 40, 2, token_heads=bound.token_heads())
    vocab = splade.config.vocab_size
    assert counted.per_point["token heads"] == vocab * 2 * 40 * (4 + 12)
    assert counted.total(8) > plain.total(8)


# ------------------------------------------------------------- families and layout
def test_families_are_detected_and_today_s_are_unchanged(bi_encoder, splade, tok):
    assert resolve_ranker(None, bi_encoder).family == "bi_encoder"
    assert resolve_ranker(None, splade).family == "splade"
    assert resolve_ranker(None, make_model("bert")).family == "classifier"
    assert resolve_ranker("colbert", bi_encoder).family == "colbert"  # named, never guessed
    with pytest.raises(ValueError, match="pooling"):
        BiEncoder(pooling="max")


def test_two_tower_f_is_the_signed_score_and_scoring_agrees(bi_encoder, tok):
    result = fastnig.attribute(bi_encoder, PAIRS, tokenizer=tok, steps=4, target=["relevant", "non-relevant",
                                                                                   "relevant"], progress=False)
    assert result.settings["output"] == "logit" and result.settings["ranker"]["pooling"] == "cls"
    scores = score_pairs(bi_encoder, tok, PAIRS, ranker="bi_encoder")
    torch.testing.assert_close(result.f_input.double(), torch.tensor(scores) * torch.tensor([1.0, -1.0, 1.0]),
                               rtol=1e-5, atol=1e-5)
    # a pair's score does not depend on its batch
    one = score_pairs(bi_encoder, tok, PAIRS[1:2], ranker="bi_encoder")
    assert abs(one[0] - scores[1]) < 1e-5


def test_separate_towers_use_their_own_word_embeddings(tok):
    torch.manual_seed(2)
    q, d = tf.BertModel(bert_config(), add_pooling_layer=False).eval(), tf.BertModel(bert_config(),
                                                                                      add_pooling_layer=False).eval()
    with torch.no_grad():  # the document tower's PAD differs from the query tower's
        d.get_input_embeddings().weight[tok.pad_token_id] = 1.0
    result = fastnig.attribute((q, d), PAIRS, tokenizer=tok, steps=32, progress=False)
    scores = score_pairs((q, d), tok, PAIRS, ranker=BiEncoder())
    torch.testing.assert_close(result.f_input.double(), torch.tensor(scores), rtol=1e-5, atol=1e-5)
    assert float((result.delta.abs() / (result.f_input - result.f_baseline).abs()).max()) < 0.05


def test_colbert_markers_must_be_tokens(bi_encoder, tok):
    class Projected(tf.BertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.bert = tf.BertModel(config, add_pooling_layer=False)
            self.linear = nn.Linear(config.hidden_size, 8, bias=False)
            self.post_init()

    model = Projected(bert_config()).eval()
    with pytest.raises(ValueError, match="marker"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tok, ranker=ColBERT(), steps=4, progress=False)
    result = fastnig.attribute(model, PAIRS[:1], tokenizer=tok, ranker=ColBERT(query_marker=None,
                                                                                document_marker=None,
                                                                                query_length=8),
                               steps=4, progress=False)
    passage = len(tok(PAIRS[0][1])["input_ids"])  # [CLS] passage [SEP]
    assert result.num_tokens.tolist() == [8 + passage]  # the query [MASK]-padded to 8


def test_the_agreement_rule_ranks_against_the_empty_passage(bi_encoder, tok):
    pairs = [LabelledPair(f"q{i}", f"d{i}", q, p, 1 - i % 2, 1 - i % 2) for i, (q, p) in enumerate(PAIRS)]
    kept, report = filter_agreeing(bi_encoder, tok, pairs, progress=False)
    full = score_pairs(bi_encoder, tok, PAIRS, ranker="bi_encoder")
    empty = score_pairs(bi_encoder, tok, [(q, "") for q, _ in PAIRS], ranker="bi_encoder")
    expected = [p for p, s, e in zip(pairs, full, empty) if (s > e) == (p.label == 1) and s != e]
    assert [p.doc_id for p in kept] == [p.doc_id for p in expected]
    assert all(0 < p < 1 for p in report["p_relevant"])


# ------------------------------------------------------------------ the study
def _study(tmp_path, folder, name):
    cfg = {
        "name": name, "model": str(folder), "output": "unused",
        "attribution": {
            "datasets": {"cran": "cranfield", "med": "med"}, "in_domain": ["cran"],
            "labels": ["relevant", "non-relevant"], "negatives": "unjudged", "agreement_filter": False,
            "pairs": 4, "steps": 4, "max_length": 48, "chunk_pairs": 2},
        "analysis": {"levels": [1, 10], "layer_percent": 10, "baseline_pairs": 0},
        "pruning": {"levels": [10], "sets": ["P_cran"], "queries": 4, "depth": 5, "repetitions": 1,
                    "validation": {"cran": {"dataset": "cranfield", "group": "Cranfield"}}},
    }
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, IR_DATASETS_HOME=str(tmp_path / "irds"), FASTNIG_OFFLINE="1", HF_HUB_OFFLINE="1",
               FASTNIG_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastnig", "run", str(config), "--output", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "report.md").is_file() and (out / "explorer.html").is_file()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bi_encoder", "splade"])
def test_a_reduced_study_on_a_two_tower_model(tmp_path, tok, kind):
    folder = tmp_path / kind
    torch.manual_seed(0)
    cfg = bert_config(vocab=tok.vocab_size, positions=160)
    model = tf.BertModel(cfg, add_pooling_layer=False) if kind == "bi_encoder" else tf.BertForMaskedLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = _study(tmp_path, folder, kind)
    assert (out / "pruning" / "table4.csv").is_file()
    schemes = sorted(p.name for p in Path(out / "schemes").glob("*.json") if ".rank" not in p.name)
    assert schemes and any(name.startswith("P_cran") for name in schemes)


def test_a_sentence_transformer_brings_its_pooling_and_normalisation(tmp_path, tok):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models
    torch.manual_seed(6)
    tf.BertModel(bert_config(vocab=tok.vocab_size), add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = SentenceTransformer(modules=[models.Transformer(str(tmp_path)), models.Pooling(32, "mean"),
                                         models.Normalize()], device="cpu")
    result = fastnig.attribute(model, PAIRS, steps=8, progress=False)  # its tokenizer, its pooling
    assert result.settings["ranker"] == {"family": "bi_encoder", "pooling": "mean", "similarity": "cosine"}
    e = model.encode([q for q, _ in PAIRS] + [p for _, p in PAIRS], convert_to_tensor=True)
    torch.testing.assert_close(result.f_input, (e[:3] * e[3:]).sum(-1).float(), rtol=1e-4, atol=1e-5)
