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


# ------------------------------------------------ generative rerankers (issue 23)
SPECIAL_WORDS = ["<pad>", "</s>", "<unk>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                 "</think>"]
TEMPLATE_WORDS = "query document relevant true false yes no system user assistant judge whether meets".split()


def make_word_tokenizer(kind: str = "t5"):
    """A tiny fast word-level tokenizer built with ``tokenizers``: lower-cased words and punctuation,
    the special tokens of T5 (``kind="t5"``: ``</s>`` appended, pad ``<pad>``), Qwen (``"qwen"``: the
    chat markers, pad ``<|endoftext|>``, nothing appended) or Llama (``"llama"``: ``<s>`` prepended,
    no pad token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_WORDS + sorted(set(WORDS + TEMPLATE_WORDS))
                               + list(string.ascii_lowercase) + list(".,;:?!'\"()-/%<>")))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIAL_WORDS)
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", padding_side="left")


def make_generative(kind: str = "t5", vocab_size: int = 200, hidden: int = 32, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 64, seed: int = 0, init_range: float = 0.2,
                    dtype=torch.float32):
    """A randomly initialised generative ranker: ``"t5"`` (T5ForConditionalGeneration, gated-GELU),
    ``"qwen3"`` / ``"qwen2"`` / ``"llama"`` (ForCausalLM, grouped-query attention), ``"llama-cls"``
    (LlamaForSequenceClassification, 1 logit)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden // heads, d_ff=intermediate,
                          num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.0,
                          tie_word_embeddings=False)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, initializer_range=init_range, pad_token_id=4,
                      tie_word_embeddings=False)
        if kind == "qwen3":
            model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=hidden // heads, **common))
        elif kind == "qwen2":
            model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
        elif kind == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
        elif kind == "llama-cls":
            model = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_labels=1, **common))
        else:
            raise ValueError(kind)
    return model.to(dtype).eval()
