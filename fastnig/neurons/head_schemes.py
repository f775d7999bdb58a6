"""Head schemes: P_x / N_x over attention heads instead of Linear neurons.

Owns: :func:`head_attributions` — the head view of an :class:`fastnig.Attributions`
computed with ``heads=True`` (``scores`` = ``head_scores``: output projection name ->
``[pairs, heads]``; per segment with ``segments=True``) — so that everything built
for neurons works unchanged for heads: :class:`fastnig.neurons.scheme.Scheme`
(``Scheme.from_attributions(head_attributions(att), ...)``: mean, exact sums, halves,
stability), top-X % heads (:meth:`Scheme.top`: X % of all heads), intersections,
unions and fusions (:mod:`fastnig.neurons.sets`, :mod:`fastnig.neurons.fusion`).
A head's identity is ``(output projection name, head index)``; its layer is the
projection's (docs/method.md §12).

Must not: attribute, read files or lay out figures.
"""
from __future__ import annotations

import dataclasses


def head_attributions(attributions):
    """A copy of ``attributions`` whose units are its heads; ``ValueError`` without ``heads=True``."""
    if getattr(attributions, "head_scores", None) is None:
        raise ValueError("the attributions have no head scores: attribute with heads=True")
    settings = dict(attributions.settings)
    settings["units"] = "heads"
    return dataclasses.replace(attributions, scores=dict(attributions.head_scores),
                               segment_scores=(dict(attributions.head_segment_scores)
                                               if attributions.head_segment_scores is not None else None),
                               error_estimate=None, settings=settings)


__all__ = ("head_attributions",)
