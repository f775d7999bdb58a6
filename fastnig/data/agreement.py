"""The agreement filter (docs/method.md §6): keep the pairs the model labels as their qrels do.

Owns: :func:`filter_agreeing`, i.e. the rule "P(relevant) > 0.5 for label 1,
< 0.5 for label 0" and its report (counts per label, every P(relevant),
the dropped pairs).

Must not: tokenise or run the model itself (:func:`fastnig.engine.scoring.score_pairs`
does, as everywhere else), or load or sample data.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..common import check_int
from ..engine.model import check_model, move_model
from ..engine.two_tower import agreement_probabilities
from .records import LabelledPair


def filter_agreeing(model, tokenizer, pairs: Iterable[LabelledPair], *, batch_size: int = 32,
                    max_length: Optional[int] = None, device=None, progress: bool = True, ranker=None
                    ) -> Tuple[List[LabelledPair], Dict[str, Any]]:
    """Keep the pairs whose model prediction agrees with their label (docs/method.md §6).

    A pair agrees when P(relevant) > 0.5 for label 1 and < 0.5 for label 0
    (exactly 0.5 agrees with neither).  P(relevant) comes from
    :func:`fastnig.engine.scoring.relevance_probability` of the model's logits
    (1 or 2), on the pair encoding of :mod:`fastnig.engine.model`
    (``truncation="only_second"``), i.e. the input the attribution sees.

    Args:
        model: a Hugging Face sequence-classification cross-encoder.
        tokenizer: its fast tokenizer.
        pairs: :class:`LabelledPair` objects, any labels.
        batch_size: pairs per forward pass.
        max_length: tokens of the pair encoding (``None``: the model's, see
            :func:`fastnig.engine.model.resolve_max_length`).
        device: where to run; ``None`` = the model's device (the model is moved
            there otherwise, as :func:`fastnig.attribute` does).
        progress: show a tqdm bar.
        ranker: how the model scores a pair (as for :func:`fastnig.attribute`; ``None``:
            from the model's class): P(relevant) is the ranker's P(true) / P(yes) for
            generative rerankers.

    Returns:
        ``(kept, report)``: the agreeing pairs in input order, and a
        JSON-serialisable dict with ``total``, ``kept``, ``dropped``,
        ``by_label`` (``{"relevant"|"non-relevant": {total, kept, dropped}}``),
        ``p_relevant`` (P(relevant) of every input pair, in input order) and
        ``dropped_pairs`` (``[query_id, doc_id]`` of the dropped ones).
    """
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, LabelledPair):
            raise TypeError(f"pairs[{i}] must be a fastnig.data.LabelledPair, got {type(pair).__name__}")
        if pair.label not in (0, 1):
            raise ValueError(f"pairs[{i}].label must be 0 or 1, got {pair.label!r}")
    check_model(model)
    batch_size = check_int("batch_size", batch_size, 1, " (pairs per forward pass)")
    if max_length is not None:
        check_int("max_length", max_length, 8, " (tokens)")
    move_model(model, device)
    # P(relevant); for a two-tower ranker (a score without a probability) σ(s(q, d) - s(q, "")): docs/method.md §6.1
    probabilities: List[float] = agreement_probabilities(
        model, tokenizer, [p.text_pair for p in pairs], max_length=max_length, batch_size=batch_size,
        progress=progress, ranker=ranker)

    kept: List[LabelledPair] = []
    dropped: List[List[str]] = []
    by_label = {name: {"total": 0, "kept": 0, "dropped": 0} for name in ("relevant", "non-relevant")}
    for pair, p in zip(pairs, probabilities):
        counts = by_label["relevant" if pair.label == 1 else "non-relevant"]
        counts["total"] += 1
        if (p > 0.5) if pair.label == 1 else (p < 0.5):
            kept.append(pair)
            counts["kept"] += 1
        else:
            dropped.append([pair.query_id, pair.doc_id])
            counts["dropped"] += 1
    report = {"total": len(pairs), "kept": len(kept), "dropped": len(dropped), "by_label": by_label,
              "p_relevant": probabilities, "dropped_pairs": dropped}
    return kept, report
