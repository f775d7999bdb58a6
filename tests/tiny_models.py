"""Tiny cross-encoders and a WordPiece tokenizer built offline for the tests.

Importable from tests and benchmarks (``bench/`` builds its model shapes with
``make_model``); nothing here downloads anything.
"""
from __future__ import annotations

import os
import string
import tempfile
from typing import Optional

import torch

WORDS = """the a an of to in and or is are was be for on with by as at from that this which what how why
when where who not no yes can does do about into over under between effect effects heat flow flows boundary
layer layers pressure wing wings supersonic subsonic shock wave waves laminar turbulent heating transfer
theory experimental results model models method methods cancer cell cells patient patients disease diet
food vitamin blood risk study studies protein gene genes brain acid information retrieval library search
query queries document documents index indexing system systems user users data analysis library books
number numbers high low large small new use used using given show shows case cases test tests value values
""".split()


def write_vocab(folder: str) -> str:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += sorted(set(WORDS))
    tokens += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    tokens += list(string.digits) + list(".,;:?!'\"()-/%")
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def make_tokenizer(kind: str = "bert", folder: Optional[str] = None):
    """A tiny fast WordPiece tokenizer; its vocab file goes to ``folder`` (default: a temporary folder,
    removed again: the tokenizer holds its vocabulary in memory)."""
    from transformers import BertTokenizerFast, DistilBertTokenizerFast

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="fastnig-vocab-") as scratch:
            return make_tokenizer(kind, scratch)
    vocab = write_vocab(folder)
    if kind == "distilbert":
        return DistilBertTokenizerFast(vocab=vocab)  # transformers 5 ignores vocab_file=
    tok = BertTokenizerFast(vocab=vocab)
    if kind == "roberta":  # a model without token_type_ids
        tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def make_model(kind: str = "bert", num_labels: int = 2, hidden: int = 32, layers: int = 2, heads: int = 4,
               intermediate: int = 64, vocab_size: int = 200, max_positions: int = 160, seed: int = 0,
               init_range: float = 0.2, dtype=torch.float32):
    """A randomly initialised cross-encoder of the given family and shape."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_labels=num_labels, initializer_range=init_range)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=max_positions, **common)
        model = tf.BertForSequenceClassification(cfg)
    elif kind == "electra":
        cfg = tf.ElectraConfig(embedding_size=hidden // 2, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=intermediate,
                               max_position_embeddings=max_positions, **common)
        model = tf.ElectraForSequenceClassification(cfg)
    elif kind == "distilbert":
        cfg = tf.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
                                  max_position_embeddings=max_positions, **common)
        model = tf.DistilBertForSequenceClassification(cfg)
    elif kind == "roberta":
        cfg = tf.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=intermediate, max_position_embeddings=max_positions + 2,
                               pad_token_id=0, type_vocab_size=1, **common)
        model = tf.RobertaForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


PAIRS = [
    ("what is the effect of heat transfer on wings", "the heat transfer of supersonic wings was studied "
     "in experimental tests and the results show large effects"),
    ("cancer risk diet", "a study of diet and cancer risk in patients"),
    ("boundary layer", ""),
    ("information retrieval system users", "search and indexing of documents in a library system used by "
     "users for retrieval of information about books and data analysis " * 3),
]
