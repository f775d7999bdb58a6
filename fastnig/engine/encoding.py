"""A (query, passage) pair as the cross-encoder sees it, and the path's ends.

Owns: checking pairs (:func:`validate_pairs`); tokenising them
(``truncation="only_second"``, falling back to ``longest_first`` when the
query alone is too long); padding into batches (:class:`EncodedBatches`); the
segment of every token (:data:`SEGMENTS`, the one home of the names); and the
integration baselines (:data:`BASELINES`, :func:`encode_pairs`,
:func:`baseline_embeddings`, docs/method.md §1, §3).

Must not: run a model (:mod:`fastnig.engine.scoring`), know about path
integrals, datasets, neuron sets or files.  Imports :mod:`fastnig.common` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..common import check_int

Pair = Tuple[str, str]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEGMENTS = ("query", "passage", "special")
"""Token segments: dim 1 of ``Attributions.segment_scores``, the ids of :attr:`EncodedPairs.segments`."""
BASELINES = ("pad", "pad-query", "zero", "zero-query")


# ------------------------------------------------------------------ the pairs
def validate_pairs(pairs) -> List[Pair]:
    """``pairs`` as a non-empty list of (query, passage) string tuples, or a ``TypeError``/``ValueError``
    that says which pair is wrong.  An empty passage is fine; an empty query is not."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
        raise TypeError("pairs must be a list of (query, passage) tuples; wrap a single pair as [(query, passage)]")
    try:
        pairs = list(pairs)
    except TypeError:
        raise TypeError("pairs must be a list of (query, passage) string tuples") from None
    if not pairs:
        raise ValueError("pairs is empty: give at least one (query, passage) tuple")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, passage) tuple, got {pair!r:.80}")
        query, passage = pair
        if not isinstance(query, str) or not isinstance(passage, str):
            raise TypeError(f"pairs[{i}]: query and passage must be strings, got "
                            f"{type(query).__name__} and {type(passage).__name__}")
        if not query.strip():
            raise ValueError(f"pairs[{i}]: the query is empty")
    return [(q, p) for q, p in pairs]


def tokenize_pair(tokenizer, query: str, passage: str, max_length: int, **kwargs):
    """One pair as the cross-encoder sees it: ``[CLS] query [SEP] passage [SEP]``,
    the passage truncated first (``only_second``); a query longer than
    ``max_length`` on its own is truncated too (``longest_first``).

    A fast tokenizer keeps its truncation setting as shared state, so threads
    must not share one (each thread: ``copy.deepcopy(tokenizer)``); processes
    (``torchrun``) are unaffected."""
    try:
        return tokenizer(query, passage, truncation="only_second", max_length=max_length, **kwargs)
    except Exception:  # the query alone is longer than max_length
        return tokenizer(query, passage, truncation="longest_first", max_length=max_length, **kwargs)


def tokenize_pairs(tokenizer, pairs: Sequence[Pair], max_length: int, chunk: int = 1024
                   ) -> List[Dict[str, List[int]]]:
    """Token ids of many pairs (:func:`tokenize_pair`'s truncation), in chunks of ``chunk`` pairs.

    Returns one dict per pair with the model inputs the tokenizer makes among
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` (lists of ints, unpadded).
    """
    names = [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
             if n in MODEL_INPUTS]
    rows: List[Dict[str, List[int]]] = []
    for start in range(0, len(pairs), chunk):
        queries = [q for q, _ in pairs[start:start + chunk]]
        passages = [p or "" for _, p in pairs[start:start + chunk]]
        try:
            enc = tokenizer(queries, passages, truncation="only_second", max_length=max_length)
            batch = [{n: enc[n][i] for n in names if n in enc} for i in range(len(queries))]
        except Exception:  # some query alone exceeds max_length: pair by pair
            batch = [None] * len(queries)
        for i, (q, p) in enumerate(zip(queries, passages)):
            if batch[i] is None or not p:  # an empty passage: [CLS] q [SEP], as tokenize_pair encodes it
                one = tokenize_pair(tokenizer, q, p, max_length)
                batch[i] = {n: one[n] for n in names if n in one}
        rows += batch
    return rows


def pad_rows(rows: Sequence[Dict[str, List[int]]], pad_id: int, side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad token rows to the longest on ``side`` (``"right"`` or ``"left"``): ``input_ids`` with ``pad_id``,
    the rest with 0; each ``[batch, tokens]``."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(row, key):
        fill = [pad_id if key == "input_ids" else 0] * (width - len(row[key]))
        return fill + row[key] if side == "left" else row[key] + fill

    return {key: torch.tensor([padded(r, key) for r in rows], dtype=torch.long) for key in rows[0]}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's [PAD] id (0 when it has none: padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_batch(tokenizer, pairs: Sequence[Pair], max_length: int) -> Dict[str, torch.Tensor]:
    """Model inputs of a few pairs, padded to the longest (e.g. one training batch)."""
    return pad_rows(tokenize_pairs(tokenizer, pairs, max_length), pad_token_id(tokenizer))


# ---------------------------------------------------------- batched scoring
@dataclass
class EncodedBatches:
    """Pairs tokenised once, in padded batches of similar length.

    Attributes:
        batches: per batch, the model inputs (``input_ids``, ``attention_mask``
            and, if the tokenizer makes them, ``token_type_ids``), each
            ``[batch, tokens]`` int64.
        rows: per batch, ``[batch]`` int64 positions of its pairs in the input order.
        num_pairs: number of pairs.
        ranker: the bound ranker (:class:`fastnig.engine.rankers.BoundRanker`) the
            pairs were laid out by and are scored with; ``None``: a cross-encoder's
            own pair encoding, scored by its classification head.
    """

    batches: List[Dict[str, torch.Tensor]]
    rows: List[torch.Tensor]
    num_pairs: int
    ranker: object = None

    def to(self, device) -> "EncodedBatches":
        return EncodedBatches([{k: v.to(device) for k, v in b.items()} for b in self.batches],
                              self.rows, self.num_pairs, self.ranker)


def encode_batches(tokenizer, pairs: Sequence[Pair], max_length: int = 512, batch_size: int = 32,
                   ranker=None) -> EncodedBatches:
    """Tokenise every pair once into batches of similar length: the cross-encoder's pair encoding
    (:func:`tokenize_pairs`), or with a bound ``ranker`` its layout (``ranker.rows``, padded on
    ``ranker.padding_side()``).

    Pairs are sorted by length so that a batch holds pairs of similar length
    (less padding; the scores do not depend on the batching beyond float rounding).
    """
    check_int("max_length", max_length, 4, " (tokens)")
    check_int("batch_size", batch_size, 1, " (pairs per forward pass)")
    encoded = ranker.rows(pairs, max_length) if ranker is not None else tokenize_pairs(tokenizer, pairs, max_length)
    side = ranker.padding_side() if ranker is not None else "right"
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]["input_ids"]))
    batches, rows = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batches.append(pad_rows([encoded[i] for i in idx], pad_token_id(tokenizer), side))
        rows.append(torch.tensor(idx, dtype=torch.long))
    return EncodedBatches(batches, rows, len(pairs), ranker)


# ------------------------------------------------------------------ the input
@dataclass
class EncodedPairs:
    """Tokenised pairs, padded on the right to the longest.

    ``input_ids``, ``attention_mask``, ``replace`` (positions the baseline
    changes) and, when the model takes them, ``token_type_ids``: ``[P, T]``;
    ``lengths``: ``[P]``; ``segments``: ``[P, T]`` int64 index into
    :data:`SEGMENTS` of each real token (0 query, 1 passage, 2 special: the
    tokenizer's special-token mask, or no sequence id), -1 on padding;
    ``read_segment``: ``[P]`` the segment of outputs that keep one token per
    pair (the position the score is read at: [CLS] for a cross-encoder, the
    last real token for a decoder, the decoder step for monoT5);
    ``towers``: for a two-tower ranker (:mod:`fastnig.engine.two_tower`), whose row is the
    query's tokens followed by the passage's, per tower ``(lengths [P], segments [P, T_tower])``:
    the real tokens and segment ids of the outputs of a Linear run by that tower (the hooks
    read it per call, docs/method.md §5); ``None`` for single-input rankers.
    ``baseline_ids``: ``[P, T]`` the ids the ``pad`` baselines embed, where the pad token is not one
    id for the whole row (separate towers with their own vocabularies); ``None``: ``replace``
    positions get the ranker's pad id.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: Optional[torch.Tensor]
    replace: torch.Tensor
    lengths: torch.Tensor
    segments: Optional[torch.Tensor] = None
    read_segment: Optional[torch.Tensor] = None
    towers: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    baseline_ids: Optional[torch.Tensor] = None


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int, baseline: str,
                 use_token_type_ids: bool) -> EncodedPairs:
    """Tokenise (query, passage) pairs as the cross-encoder sees them (docs/method.md §1)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer must be a fast (Rust) Hugging Face tokenizer: fastnig needs sequence_ids() "
                        "to find the query tokens; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if baseline.startswith("pad") and tokenizer.pad_token_id is None:
        raise ValueError(f"baseline={baseline!r} needs a [PAD] token but the tokenizer has none; use 'zero'")
    rows = []
    for query, passage in pairs:
        enc = tokenize_pair(tokenizer, query, passage, max_length, return_special_tokens_mask=True)
        seq = enc.sequence_ids()
        special = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)
        if baseline.endswith("query"):
            replace = torch.tensor([s == 0 for s in seq], dtype=torch.bool) & ~special
        else:
            replace = ~special
        segment = torch.tensor([2 if s is None else s for s in seq], dtype=torch.long)
        segment[special] = 2
        rows.append((enc, replace, segment))
    longest = max(len(enc["input_ids"]) for enc, _, _ in rows)
    P = len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((P, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((P, longest), dtype=torch.long)
    types = torch.zeros((P, longest), dtype=torch.long)
    replace = torch.zeros((P, longest), dtype=torch.bool)
    lengths = torch.zeros(P, dtype=torch.long)
    segments = torch.full((P, longest), -1, dtype=torch.long)
    for i, (enc, rep, segment) in enumerate(rows):
        n = len(enc["input_ids"])
        input_ids[i, :n] = torch.tensor(enc["input_ids"])
        attention[i, :n] = 1
        if "token_type_ids" in enc:
            types[i, :n] = torch.tensor(enc["token_type_ids"])
        replace[i, :n] = rep
        segments[i, :n] = segment
        lengths[i] = n
    return EncodedPairs(input_ids, attention, types if use_token_type_ids else None, replace, lengths, segments,
                        read_segment=segments[:, 0])


def baseline_embeddings(embeddings: nn.Module, enc: EncodedPairs, baseline: str, pad_id: Optional[int]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Word embeddings of the input and of the baseline, each ``[P, T, D]``."""
    device = embeddings.weight.device
    ids = enc.input_ids.to(device)
    replace = enc.replace.to(device)
    x = embeddings(ids)
    if baseline.startswith("pad") and enc.baseline_ids is not None:
        x_base = embeddings(enc.baseline_ids.to(device))
    elif baseline.startswith("pad"):
        x_base = embeddings(torch.where(replace, torch.full_like(ids, pad_id), ids))
    else:
        x_base = x * (~replace).unsqueeze(-1).to(x.dtype)
    return x, x_base
