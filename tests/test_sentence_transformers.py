"""sentence-transformers CrossEncoders plug in: same scores and attributions as the transformers model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_model

import fastnig
from fastnig.engine.scoring import score_pairs
from fastnig.training.demo_model import load_cross_encoder

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test dependency (.[test])")

PAIRS = [("what is a wing", "a wing is a surface that makes lift when air flows over it"),
         ("heat transfer in slabs", "conduction of heat through composite slabs of two materials")]


@pytest.fixture(scope="module")
def cross_encoder_folder(tmp_path_factory, tokenizer):
    """A tiny 1-logit BERT saved by transformers, then loaded and saved by sentence-transformers."""
    hf_folder = tmp_path_factory.mktemp("hf")
    make_model("bert", num_labels=1, vocab_size=tokenizer.vocab_size, seed=3).save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    ce = st.CrossEncoder(str(hf_folder), max_length=24, device="cpu")
    st_folder = tmp_path_factory.mktemp("st")
    ce.save(str(st_folder))
    return hf_folder, st_folder


def test_cross_encoder_scores_equal_the_transformers_model(cross_encoder_folder):
    hf_folder, st_folder = cross_encoder_folder
    ce = st.CrossEncoder(str(st_folder), device="cpu")
    assert ce.max_length == 24
    model, tokenizer = load_cross_encoder(str(hf_folder))
    ours = score_pairs(ce, None, PAIRS)  # CrossEncoder: its own tokenizer and max_length
    reference = score_pairs(model, tokenizer, PAIRS, max_length=24)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    st_logits = ce.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    np.testing.assert_allclose(ours, np.asarray(st_logits, dtype=np.float64).ravel(), rtol=1e-5, atol=1e-5)


def test_attribute_takes_a_cross_encoder_and_its_max_length(cross_encoder_folder):
    hf_folder, st_folder = cross_encoder_folder
    ce = st.CrossEncoder(str(st_folder), device="cpu")
    got = fastnig.attribute(ce, PAIRS, steps=4, progress=False)
    model, tokenizer = load_cross_encoder(str(hf_folder))
    expected = fastnig.attribute(model, PAIRS, tokenizer=tokenizer, steps=4, max_length=24, progress=False)
    assert got.settings["max_length"] == 24 and int(got.num_tokens.max()) <= 24
    for name, value in expected.scores.items():
        torch.testing.assert_close(got.scores[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_load_cross_encoder_reads_a_sentence_transformers_folder(cross_encoder_folder):
    hf_folder, st_folder = cross_encoder_folder
    model, tokenizer = load_cross_encoder(str(st_folder))
    reference, ref_tokenizer = load_cross_encoder(str(hf_folder))
    np.testing.assert_allclose(score_pairs(model, tokenizer, PAIRS), score_pairs(reference, ref_tokenizer, PAIRS,
                                                                                max_length=24), rtol=1e-6)
