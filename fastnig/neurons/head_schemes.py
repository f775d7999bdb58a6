"""Head schemes: P_x / N_x over attention heads instead of Linear neurons.

Owns: :func:`head_attributions` — the head view of an :class:`fastnig.Attributions`
computed with ``heads=True`` (``scores`` = ``head_scores``: output projection name ->
``[pairs, heads]``; per segment with ``segments=True``) — so that everything built
for neurons works unchanged for heads: :class:`fastnig.neurons.scheme.Scheme`
(``Scheme.from_attributions(head_attributions(att), ...)``: mean, exact sums, halves,
stability), top-X % heads (:meth:`Scheme.top`: X % of all heads), intersections,
unions and fusions (:mod:`fastnig.neurons.sets`, :mod:`fastnig.neurons.fusion`).
Also its counterpart :func:`neuron_attributions` (the same attribution without its
heads, recorded as if made without them: a neuron scheme does not depend on
whether heads were computed beside it), the head universe of a model
(:func:`head_universe`, the ``sizes`` of a head scheme) and :func:`head_label`.
A head's identity is ``(output projection name, head index)``; its layer is the
projection's (docs/method.md §12).

Must not: attribute, read files or lay out figures.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping

from ..engine.heads import head_layer, output_projections

HEAD_UNITS = "heads"
"""``settings["units"]`` of a head scheme (neuron schemes have no ``units`` key)."""


def head_attributions(attributions):
    """A copy of ``attributions`` whose units are its heads; ``ValueError`` without ``heads=True``."""
    if getattr(attributions, "head_scores", None) is None:
        raise ValueError("the attributions have no head scores: attribute with heads=True")
    settings = dict(attributions.settings)
    settings["units"] = HEAD_UNITS
    return dataclasses.replace(attributions, scores=dict(attributions.head_scores),
                               segment_scores=(dict(attributions.head_segment_scores)
                                               if attributions.head_segment_scores is not None else None),
                               error_estimate=None, settings=settings, head_scores=None, head_segment_scores=None)


def neuron_attributions(attributions):
    """``attributions`` without its heads, its settings as without ``heads=True`` (the neuron scores are the
    same either way: docs/method.md §12), so that one neuron scheme takes pairs attributed with or without heads."""
    settings = {k: v for k, v in attributions.settings.items() if k != "heads"}
    return dataclasses.replace(attributions, settings=settings, head_scores=None, head_segment_scores=None)


def head_settings(record: Mapping[str, object]) -> Dict[str, object]:
    """The ``settings`` of a head scheme, from the record of its attribution with ``heads=True``."""
    return {**record, "heads": True, "units": HEAD_UNITS}


def neuron_settings(record: Mapping[str, object]) -> Dict[str, object]:
    """The ``settings`` of a neuron scheme, from the record of its attribution (``heads`` left out)."""
    return {k: v for k, v in record.items() if k != "heads"}


def head_universe(model) -> Dict[str, int]:
    """Attention output projection name -> its number of (query) heads, in model order: a head scheme's ``sizes``."""
    return {name: int(count) for name, (_module, count) in output_projections(model).items()}


def head_label(name: str, head: int) -> str:
    """A short label of head ``head`` of the output projection ``name``: ``L3.h7`` (T5: ``dec.L3.cross.h7`` for
    a decoder's cross-attention; the projection's name when it has no layer)."""
    layer = head_layer(name)
    if layer < 0:
        return f"{name}.h{int(head)}"
    prefix = "dec." if "decoder" in name else ""
    cross = ".cross" if "EncDecAttention" in name else ""
    return f"{prefix}L{layer}{cross}.h{int(head)}"


__all__ = ("HEAD_UNITS", "head_attributions", "head_label", "head_settings", "head_universe",
           "neuron_attributions", "neuron_settings")
