"""Table 1 of the paper: how much relevance signal each baseline keeps.

Owns: the pairs Table 1 averages over (:func:`table1_pairs`: relevant pairs
of the in-domain dataset the model judges relevant), the mean P(rel) −
P(non-rel) at the input and at each baseline built exactly as
:func:`fastnig.attribute` builds it (:func:`baseline_differences`,
:func:`baseline_quality`).  Must not: attribute neurons, read schemes or
write files (the CSV and figure: :mod:`fastnig.analysis.table1`).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch

from ..common import check_int
from ..data import filter_agreeing, sample_pairs
from ..engine.encoding import BASELINES, baseline_embeddings, validate_pairs
from ..engine.model import frozen_eval, unwrap
from ..engine.rankers import bind_ranker
from ..engine.scoring import relevance_probability

MAX_DRAW = 16
"""Table 1 draws at most this many times the pairs it needs before giving up on more agreeing ones."""


def table1_pairs(model, tokenizer, collection, num_pairs: int, *, seed: int = 0, relevant=None, nonrelevant=None,
                 relevance_threshold: int = 1, max_length: Optional[int] = None, batch_size: int = 32, ranker=None):
    """The pairs of Table 1: the first ``num_pairs`` relevant pairs (in sampling order) the model judges relevant.

    The paper averages over "1000 inputs from the MSMARCO dataset" whose
    original difference is 1, i.e. relevant pairs the model gets right (the
    agreement filter of docs/method.md §6.1, P(relevant) > 0.5).  Relevant
    pairs are drawn as for P_x (:func:`fastnig.data.sample_pairs`, same seed
    and label mapping), ``num_pairs`` at first and twice as many each round
    until ``num_pairs`` agree, the dataset has no more, or
    :data:`MAX_DRAW` x ``num_pairs`` were drawn (a model that gets most pairs
    wrong does not scan a whole collection).

    Returns:
        ``(pairs, info)``: the agreeing :class:`fastnig.data.LabelledPair`
        objects and ``{"dataset", "drawn", "agreeing", "requested"}``.
    """
    check_int("num_pairs", num_pairs, 1)
    max_draw = MAX_DRAW * num_pairs
    size, drawn, kept = num_pairs, [], []
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "only n relevant pairs": reported below instead
            pairs = sample_pairs(collection, label=1, num_pairs=size, seed=seed, relevant=relevant,
                                 nonrelevant=nonrelevant, relevance_threshold=relevance_threshold)
        new = pairs[len(drawn):]
        drawn = pairs
        if new:
            agreeing, _ = filter_agreeing(model, tokenizer, new, max_length=max_length, batch_size=batch_size,
                                          progress=False, ranker=ranker)
            kept += agreeing
        if len(kept) >= num_pairs or len(pairs) < size or size >= max_draw:
            break
        size = min(2 * size, max_draw)
    kept = kept[:num_pairs]
    if len(kept) < num_pairs:
        warnings.warn(f"Table 1: only {len(kept)} of {len(drawn)} relevant pairs of {collection.name} are judged "
                      f"relevant by the model ({num_pairs} asked)", stacklevel=2)
    return kept, {"dataset": collection.name, "drawn": len(drawn), "agreeing": len(kept), "requested": num_pairs}


def baseline_differences(model, tokenizer, pairs, baselines: Sequence[str] = ("pad", "pad-query", "zero", "zero-query"),
                         *, max_length: Optional[int] = None, batch_size: int = 16, ranker=None) -> Dict[str, float]:
    """Mean over pairs of P(relevant) − P(non-relevant), at the input and at each baseline.

    The baselines are built exactly as :func:`fastnig.attribute` builds them
    (the ranker's ``encode`` + ``baseline_embeddings``; ``ranker`` as for
    :func:`fastnig.attribute`): word embeddings replaced,
    position / token-type embeddings and attention mask those of the input.
    For a 1-logit model P(non-relevant) = 1 − P(relevant).

    Returns:
        ``{"original": d_input, "<baseline>": d_baseline, ...}`` (unitless, in [-1, 1]).
    """
    pairs = validate_pairs(pairs)
    if isinstance(baselines, str):
        baselines = [baselines]
    baselines = list(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: {unknown} unknown; choose from {BASELINES}")
    check_int("batch_size", batch_size, 1)
    model, tokenizer = unwrap(model, tokenizer)
    bound = bind_ranker(ranker, model, tokenizer)
    max_length = bound.max_length(max_length)
    embeddings = bound.embeddings
    device = embeddings.weight.device
    totals = {name: 0.0 for name in ["original"] + baselines}
    # The input's embeddings do not depend on the baseline: take them from the
    # first encoding ("zero" when only "original" is asked: it needs no [PAD]).
    first = baselines[0] if baselines else "zero"

    def mean_difference_sum(inputs_embeds: torch.Tensor, enc) -> float:
        types = enc.token_type_ids.to(device) if enc.token_type_ids is not None else None
        p = relevance_probability(bound.logits(inputs_embeds, enc.attention_mask.to(device), types, cut=False)).double()
        return float((2 * p - 1).sum())  # P(rel) - P(non-rel) = 2 P(rel) - 1

    with frozen_eval(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            enc_first = bound.encode(batch, max_length, first)
            x, _ = baseline_embeddings(embeddings, enc_first, first, bound.pad_id)
            totals["original"] += mean_difference_sum(x, enc_first)
            for name in baselines:
                enc = enc_first if name == first else bound.encode(batch, max_length, name)
                _, x_base = baseline_embeddings(embeddings, enc, name, bound.pad_id)
                totals[name] += mean_difference_sum(x_base, enc)
    return {name: total / len(pairs) for name, total in totals.items()}


def baseline_quality(model, tokenizer, pairs, baselines: Sequence[str] = ("pad", "pad-query", "zero", "zero-query"),
                     *, max_length: Optional[int] = None, batch_size: int = 16, ranker=None) -> Dict[str, float]:
    """How much relevance signal each baseline keeps (the paper's Table 1, docs/method.md §3).

    ``quality[b]`` = mean over pairs of P(rel) − P(non-rel) at baseline ``b``
    divided by the same mean at the real input; ``"original"`` is 1.  Near 0
    = the baseline erases the relevance signal (what a baseline should do).
    The paper reports 1 / 0.21 / 1 / 0.67 / 1 for original / pad / pad-query /
    zero / zero-query on MonoBERT.

    Raises:
        ValueError: when the mean difference at the input is 0 (the ratio is undefined).
    """
    diffs = baseline_differences(model, tokenizer, pairs, baselines, max_length=max_length, batch_size=batch_size,
                                 ranker=ranker)
    if diffs["original"] == 0:
        raise ValueError("baseline_quality: the mean P(rel) - P(non-rel) at the input is 0; choose other pairs")
    return {name: d / diffs["original"] for name, d in diffs.items()}


