"""From logits to F, P(relevant) and the ranking score; batched scoring of pairs.

Owns: the targets and outputs (:data:`TARGETS`, :data:`OUTPUTS`), the map
from 1 or 2 logits to F (:func:`target_function`, docs/method.md §2),
P(relevant) and the ranking score, and :func:`score_pairs` /
:func:`score_batches` (eval mode, ``inference_mode``, the first-token cut).
Attribution, the agreement filter, reranking and fine-tuning all read a
model's output through here.

Must not: tokenise (:mod:`fastnig.engine.encoding`) or know about datasets,
neuron sets or files.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .encoding import EncodedBatches, Pair, encode_batches
from .first_token import first_token_only
from .model import frozen_eval, model_device, unwrap
from .rankers import bind_ranker

TARGETS = ("relevant", "non-relevant")
OUTPUTS = ("probability", "logit")
TargetSpec = Union[str, int, bool, Sequence[Union[str, int, bool]]]


# ------------------------------------------------------------ logits -> F
def target_function(logits: torch.Tensor, relevant: torch.Tensor, output: str = "probability") -> torch.Tensor:
    """F for each row (docs/method.md §2).

    Args:
        logits: ``[batch, 1]`` or ``[batch, 2]`` classifier outputs.
        relevant: ``[batch]`` bool, True where the target label is "relevant".
        output: ``"probability"`` (softmax / sigmoid) or ``"logit"`` (raw ±logit).
    Returns:
        ``[batch]`` F.
    """
    if logits.dtype != torch.float64:  # probabilities in at least fp32, whatever the compute dtype
        logits = logits.float()
    if logits.shape[-1] == 1:
        s = logits[:, 0]
        signed = torch.where(relevant, s, -s)
        return torch.sigmoid(signed) if output == "probability" else signed
    if logits.shape[-1] == 2:
        values = torch.softmax(logits, dim=-1) if output == "probability" else logits
        return torch.where(relevant, values[:, 1], values[:, 0])
    raise ValueError(
        f"the model has {logits.shape[-1]} output logits; fastnig supports cross-encoders with 1 logit "
        "(relevance score) or 2 logits (non-relevant, relevant)")


def relevance_probability(logits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` P(relevant) from 1- or 2-logit cross-encoder outputs."""
    ones = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return target_function(logits, ones, "probability")


def relevance_score(logits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` ranking score: the relevance logit (log-odds of P(relevant)).

    1 logit s: s (P = sigmoid(s)); 2 logits: ``logits[:, 1] - logits[:, 0]``
    (P = softmax[1] = sigmoid of it).  Ranks exactly like P(relevant).
    """
    logits = logits.float()
    if logits.shape[-1] == 1:
        return logits[:, 0]
    if logits.shape[-1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ValueError(f"the model has {logits.shape[-1]} output logits; fastnig reranks with cross-encoders "
                     "with 1 logit (relevance score) or 2 logits (non-relevant, relevant)")


SCORES = {"score": relevance_score, "probability": relevance_probability}


def score_batches(model: nn.Module, encoded: EncodedBatches, *, output: str = "score", progress: bool = True,
                  desc: str = "rerank", partial: bool = False) -> np.ndarray:
    """Score every encoded pair: ``output="score"`` (:func:`relevance_score`) or
    ``"probability"`` (:func:`relevance_probability`).

    Runs in eval mode under ``inference_mode`` with the first-token cut, or, for pairs encoded
    by a ranker (``encoded.ranker``, :func:`fastnig.engine.encoding.encode_batches`), through it.

    Returns:
        float64 ``[num_pairs]`` in input order.  With ``partial`` (``encoded``
        holds only some batches, e.g. one rank's share), the other pairs are 0.
    """
    to_score = SCORES[output]
    accepted = set(inspect.signature(model.forward).parameters)
    device = model_device(model)
    scores = (torch.zeros if partial else torch.empty)(encoded.num_pairs, dtype=torch.float64)
    bound = encoded.ranker
    if bound is not None and bound.model is not model:
        raise ValueError("the pairs were encoded for another model's ranker; encode them for this model")
    with frozen_eval(model), torch.inference_mode(), first_token_only(model) if bound is None else nullcontext():
        for batch, rows in tqdm(list(zip(encoded.batches, encoded.rows)), desc=desc, unit="batch",
                                disable=not progress, leave=False):
            inputs = {k: v.to(device) for k, v in batch.items() if k in accepted or bound is not None}
            if bound is not None:
                logits = bound.score_logits(inputs)
            else:
                out = model(**inputs)
                logits = out.logits if hasattr(out, "logits") else out[0]
            scores[rows] = to_score(logits).double().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("the model produced NaN/Inf scores for some pairs (overflow in a low-precision "
                         "dtype?); score in float32")
    return scores.numpy()


def score_pairs(model: nn.Module, tokenizer, pairs: Sequence[Pair], *, output: str = "score",
                max_length: Optional[int] = None, batch_size: int = 32, progress: bool = False,
                desc: str = "score", ranker=None) -> np.ndarray:
    """float64 ``[len(pairs)]`` scores of (query, passage) pairs, in input order
    (:func:`encode_batches` + :func:`score_batches`; ``max_length``:
    :func:`fastnig.engine.model.resolve_max_length`; ``ranker``: as for :func:`fastnig.attribute`)."""
    model, tokenizer = unwrap(model, tokenizer)
    bound = bind_ranker(ranker, model, tokenizer)
    encoded = encode_batches(tokenizer, list(pairs), bound.max_length(max_length), batch_size, scoring_ranker(bound))
    return score_batches(model, encoded, output=output, progress=progress, desc=desc)


def scoring_ranker(bound):
    """What :func:`encode_batches` is given for a bound ranker: ``None`` for a cross-encoder with its own
    pair encoding (scored as it always was, :func:`score_batches` with the first-token cut), else ``bound``."""
    return None if bound.family == "classifier" and not bound.uses_template else bound


# --------------------------------------------------------------------------- F
def normalize_targets(target: TargetSpec, num_pairs: int) -> List[str]:
    """Per-pair target labels from one label or a per-pair list."""
    def one(value) -> str:
        if isinstance(value, str):
            if value in TARGETS:
                return value
        elif isinstance(value, (bool, int)) and int(value) in (0, 1):
            return TARGETS[0] if int(value) == 1 else TARGETS[1]
        raise ValueError(f"target must be 'relevant', 'non-relevant' (or 1/0), got {value!r}")

    if isinstance(target, (str, int, bool)):
        return [one(target)] * num_pairs
    values = list(target)
    if len(values) != num_pairs:
        raise ValueError(f"target has {len(values)} labels but there are {num_pairs} pairs")
    return [one(v) for v in values]
