"""Where a neuron's conductance flows in: the query's, the passage's or the special tokens (issue 14).

Owns: what is read off a
:class:`~fastnig.neurons.scheme.Scheme` that kept per-segment sums
(``attribute(..., segments=True)``): per (layer, component) the share of a
:class:`~fastnig.neurons.sets.NeuronSet`'s conductance through each segment
(:func:`segment_shares`), each neuron's dominant segment
(:func:`dominant_segment`) and a set filtered by it (:func:`filter_by_segment`).
Must not: attribute, or read or write files.  The segment names are
:data:`fastnig.engine.encoding.SEGMENTS`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from ..engine.encoding import SEGMENTS
from .sets import COMPONENTS, OTHER_COMPONENTS, NeuronSet, component, layer_index

if TYPE_CHECKING:  # pragma: no cover - type hints only (schemes imports this module)
    from .scheme import Scheme



def _segment_means(scheme: "Scheme") -> Dict[str, torch.Tensor]:
    means = scheme.segment_means()
    if means is None:
        raise ValueError(f"scheme {scheme.name} has no per-segment sums (attribute with segments=True; "
                         f"schemes without pairs, and fusions of schemes without segment sums, have none)")
    return means


def segment_shares(scheme: "Scheme", neurons: Optional["NeuronSet"] = None) -> List[Dict[str, object]]:
    """Per (layer, component), how a neuron set's conductance splits over the segments.

    Rows (sorted by layer, then component order as
    :meth:`NeuronSet.counts_by_layer_component`): ``layer``, ``component``,
    ``neurons`` (members there), per segment ``<segment>`` = the sum over the
    members of their mean NIG through that segment (signed, in units of F), and
    ``<segment>_share`` = Σ|mean through the segment| / Σ over the three
    segments of Σ|mean| (in [0, 1], summing to 1; 0 where the members have no
    conductance), ``magnitude`` = that denominator (units of F: weighs rows
    when shares are pooled, e.g. over components) and ``<segment>_dominant``
    = members whose dominant segment (:func:`dominant_segment`) it is.
    ``neurons=None``: every neuron of the scheme.
    """
    means = _segment_means(scheme)
    dominant = _dominant(means)
    if neurons is None:
        neurons = NeuronSet(scheme.sizes, torch.ones(scheme.total_neurons, dtype=torch.bool), "all")
    if list(neurons.sizes.items()) != list(scheme.sizes.items()):
        raise ValueError(f"neuron set {neurons.name!r} is of another neuron universe than scheme {scheme.name}")
    members = neurons.by_module()
    sums: Dict[tuple, Dict[str, object]] = {}
    for module in scheme.sizes:
        key = (layer_index(module), component(module))
        row = sums.setdefault(key, {"layer": key[0], "component": key[1], "neurons": 0,
                                    "signed": torch.zeros(len(SEGMENTS), dtype=torch.float64),
                                    "magnitude": torch.zeros(len(SEGMENTS), dtype=torch.float64),
                                    "dominant": torch.zeros(len(SEGMENTS), dtype=torch.long)})
        units = members.get(module)
        if units is None:
            continue
        values = means[module][:, units]  # [3, members]
        row["neurons"] += int(units.numel())
        row["signed"] += values.sum(dim=1)
        row["magnitude"] += values.abs().sum(dim=1)
        row["dominant"] += torch.bincount(dominant[module][units], minlength=len(SEGMENTS))
    order = COMPONENTS + OTHER_COMPONENTS
    rows = []
    for key in sorted(sums, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else len(order))):
        row = sums[key]
        total = float(row["magnitude"].sum())
        out = {"layer": row["layer"], "component": row["component"], "neurons": row["neurons"]}
        for s, name in enumerate(SEGMENTS):
            out[name] = float(row["signed"][s])
        for s, name in enumerate(SEGMENTS):
            out[f"{name}_share"] = float(row["magnitude"][s]) / total if total > 0 else 0.0
        out["magnitude"] = total
        for s, name in enumerate(SEGMENTS):
            out[f"{name}_dominant"] = int(row["dominant"][s])
        rows.append(out)
    return rows


def dominant_segment(scheme: "Scheme") -> Dict[str, torch.Tensor]:
    """module -> ``[n]`` int64 index into :data:`SEGMENTS` of the segment with the largest |mean NIG|
    (ties: the first of query, passage, special)."""
    return _dominant(_segment_means(scheme))


def _dominant(means: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {m: v.abs().argmax(dim=0) for m, v in means.items()}


def filter_by_segment(scheme: "Scheme", neurons: "NeuronSet", segment: str) -> "NeuronSet":
    """The members of ``neurons`` whose dominant segment (:func:`dominant_segment`) is ``segment``,
    e.g. the top-1 % neurons that act mainly through the query.  Named ``"<set>|<segment>"``."""
    if segment not in SEGMENTS:
        raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
    if list(neurons.sizes.items()) != list(scheme.sizes.items()):
        raise ValueError(f"neuron set {neurons.name!r} is of another neuron universe than scheme {scheme.name}")
    dominant = torch.cat([v for v in dominant_segment(scheme).values()])
    mask = neurons.mask & (dominant == SEGMENTS.index(segment))
    return NeuronSet(scheme.sizes, mask, f"{neurons.name}|{segment}")
