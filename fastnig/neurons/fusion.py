"""Fusion ⊕ of schemes: the paper's F_x (P_x ⊕ N_x) and F_A (every scheme).

Owns: :func:`fuse` (the mean of the schemes' per-neuron means, an unweighted
average of already-averaged schemes, and likewise of their per-segment means)
and :func:`fuse_all`.  Must not: read or write files, or aggregate pairs
(:class:`fastnig.neurons.scheme.Scheme`).
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from ..data.registry import short_name
from .scheme import FUSED_LABEL, LABELS, Scheme, settings_without_target


def fuse(*schemes: Scheme, name: Optional[str] = None) -> Scheme:
    """⊕: the scheme whose mean is the average of the schemes' means (docs/method.md §6).

    Every scheme weighs the same, whatever its number of pairs.  The schemes
    must share model, attributed modules and settings (except the target
    label); the same (dataset, label) may not appear twice.  F_x =
    ``fuse(P_x, N_x)`` (named ``"F_<x>"``).

    Returns:
        a fused :class:`Scheme` (label ``"fused"``): it has ``mean`` and
        ``top`` but no pairs; and ``segment_means()`` (the average of the
        parts' ``[3, n]`` segment means) when every part has them.
    """
    if len(schemes) == 1 and not isinstance(schemes[0], Scheme):
        schemes = tuple(schemes[0])
    if not schemes:
        raise ValueError("fuse: give at least one Scheme")
    for s in schemes:
        if not isinstance(s, Scheme):
            raise TypeError(f"fuse: expected Scheme arguments, got {type(s).__name__}")
    first = schemes[0]
    seen = {}
    for s in schemes:
        first.check_compatible(s, same_data=False, op="fuse")
        key = (s.dataset, s.label, tuple(sorted(str(p.get("name")) for p in s.parts)))
        if key in seen:
            raise ValueError(f"fuse: {s.name} is given twice (same dataset and label); each scheme counts once")
        seen[key] = s
    segment_means = [s.segment_means() for s in schemes]
    datasets = list(dict.fromkeys(s.dataset for s in schemes))
    if name is None:
        labels = sorted(s.label for s in schemes)
        if len(datasets) == 1 and labels == sorted(LABELS):
            name = f"F_{short_name(datasets[0])}"
    out = Scheme(first.sizes, model=first.model, dataset="+".join(datasets), label=FUSED_LABEL,
                 settings=settings_without_target(first.settings), name=name)
    out._fused_mean = _average([s.mean for s in schemes])
    if all(means is not None for means in segment_means):
        out._fused_segment_mean = _average(segment_means)
    out._half_bins = None
    out.parts = [{"name": s.name, "dataset": s.dataset, "label": s.label, "num_pairs": s.count,
                  "num_dropped": s.num_dropped} for s in schemes]
    return out


def _average(means: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """module -> the element-wise average of the ``means[i][module]`` (float64, any shape)."""
    out = {}
    for m in means[0]:
        total = torch.zeros_like(means[0][m])
        for mean in means:
            total = total + mean[m]
        out[m] = total / len(means)
    return out


def fuse_all(schemes: Iterable[Scheme], name: str = "F_A") -> Scheme:
    """F_A: the fusion of every scheme given (all labels, all datasets), each weighing the same."""
    schemes = list(schemes.values() if isinstance(schemes, Mapping) else schemes)
    return fuse(*schemes, name=name)
