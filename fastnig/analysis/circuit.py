"""A circuit of the top units: conditional NIG between the neurons and heads NIG ranked first.

Owns: :func:`top_units` (a scheme's top-k neurons; the top-k heads by the mean
head NIG over the scheme's pairs), :func:`circuit` (for every chosen unit,
conditional NIG toward it — docs/method.md §13 — of every chosen unit below it,
averaged over the pairs: a weighted, layered graph), :class:`Circuit` and its
JSON and figure (layers bottom to top, edges by weight).  The paper's "reduced
scope" follow-up: costly mechanistic analysis on the few units NIG ranked first.

Must not: read run folders or collections (:mod:`fastnig.study.circuit_run`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..engine.attribute import attribute
from ..engine.encoding import Pair
from ..engine.heads import head_layer
from ..engine.settings import AttributionSettings
from ..engine.units import Unit, attribute_units
from ..neurons.scheme import Scheme
from ..neurons.sets import layer_index
from .writers import new_figure, save_figure


def unit_layer(unit: Unit) -> int:
    return head_layer(unit.name) if unit.kind == "head" else layer_index(unit.name)


def unit_label(unit: Unit) -> str:
    """``"L3 intermediate.dense:17"`` / ``"L3 head 5"``."""
    layer = unit_layer(unit)
    if unit.kind == "head":
        return f"L{layer} head {unit.index}"
    tail = unit.name.split(f"layer.{layer}.", 1)[-1] if layer >= 0 else unit.name
    return f"L{layer} {tail}:{unit.index}"


@dataclass
class Circuit:
    """Nodes (units with their layer and score), edges ``(source, target, weight)``: the mean over the pairs of
    the conditional NIG of the source unit toward the target unit (source below target)."""

    nodes: List[Dict[str, object]]
    edges: List[Dict[str, object]]
    meta: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> Dict[str, object]:
        return {"meta": self.meta, "nodes": self.nodes, "edges": self.edges}

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def figure(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Layers bottom to top; units of a layer side by side (heads left, neurons right); an edge's width is
        its |weight| (largest = 4 pt), red positive, blue negative."""
        fig = new_figure(8.0, 6.0)
        ax = fig.add_subplot(111)
        position: Dict[str, Tuple[float, float]] = {}
        by_layer: Dict[int, List[Dict[str, object]]] = {}
        for node in self.nodes:
            by_layer.setdefault(int(node["layer"]), []).append(node)
        for layer, nodes in by_layer.items():
            nodes.sort(key=lambda n: (n["kind"] != "head", str(n["id"])))
            for i, node in enumerate(nodes):
                position[str(node["id"])] = ((i + 1) / (len(nodes) + 1), float(layer))
        largest = max((abs(float(e["weight"])) for e in self.edges), default=0.0) or 1.0
        for edge in self.edges:
            (x0, y0), (x1, y1) = position[str(edge["source"])], position[str(edge["target"])]
            weight = float(edge["weight"])
            ax.plot([x0, x1], [y0, y1], color="tab:red" if weight > 0 else "tab:blue",
                    linewidth=0.3 + 3.7 * abs(weight) / largest, alpha=0.7, zorder=1)
        for node in self.nodes:
            x, y = position[str(node["id"])]
            ax.scatter([x], [y], s=60, marker="s" if node["kind"] == "head" else "o",
                       color="tab:orange" if node["kind"] == "head" else "tab:green", zorder=2)
            ax.annotate(str(node["label"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_ylabel("layer")
        ax.set_xticks([])
        layers = sorted(by_layer)
        ax.set_yticks(layers)
        ax.set_ylim(min(layers, default=0) - 0.5, max(layers, default=0) + 0.5)
        ax.set_title(title or "circuit of the top units (edge = conditional NIG, mean over pairs)")
        return save_figure(fig, Path(path))


def top_heads(model, tokenizer, pairs: Sequence[Pair], k: int, *, label: str = "relevant",
              settings: Optional[AttributionSettings] = None, progress: bool = False, **kw) -> List[Unit]:
    """The ``k`` heads of largest mean head NIG (signed, descending) over ``pairs`` toward ``label``."""
    att = attribute(model, pairs, settings, tokenizer=tokenizer, target=label, heads=True, progress=progress, **kw)
    flat = [(float(v), name, h) for name, s in att.head_scores.items() for h, v in enumerate(s.mean(dim=0))]
    flat.sort(key=lambda t: -t[0])
    return [Unit(name, h, kind="head") for _, name, h in flat[:k]]


def top_units(scheme: Scheme, k: int) -> List[Unit]:
    """The scheme's ``k`` neurons of largest mean NIG (signed, descending; ties in model order)."""
    names = list(scheme.sizes)
    offsets, total = [], 0
    for name in names:
        offsets.append(total)
        total += int(scheme.sizes[name])
    units = []
    for flat in scheme.ranking("value")[:k]:
        i = max(j for j, o in enumerate(offsets) if o <= int(flat))
        units.append(Unit(names[i], int(flat) - offsets[i]))
    return units


def _value(att, unit: Unit) -> Optional[torch.Tensor]:
    """``[pairs]`` NIG of ``unit`` in an attribution, or ``None`` when it was not attributed (not below)."""
    if unit.kind == "head":
        scores = att.head_scores or {}
        return scores[unit.name][:, unit.index] if unit.name in scores else None
    return att.scores[unit.name][:, unit.index] if unit.name in att.scores else None


def circuit(model, tokenizer, pairs: Sequence[Pair], units: Sequence[Unit], *,
            settings: Optional[AttributionSettings] = None, scores: Optional[Dict[Unit, float]] = None,
            progress: bool = False, **kw) -> Circuit:
    """Conditional NIG from each unit of ``units`` onto every unit of ``units`` below it, mean over ``pairs``.

    One conditional attribution (``heads=True``) per unit that has a chosen unit in a lower layer, the
    targets batched into shared passes where memory allows (:func:`fastnig.engine.units.attribute_units`);
    ``scores``: each unit's own score (e.g. its scheme mean), kept on its node."""
    units = list(dict.fromkeys(units))
    ids = {u: f"{u.kind}:{u.name}:{u.index}" for u in units}
    nodes = [{"id": ids[u], "kind": u.kind, "module": u.name, "index": u.index, "layer": unit_layer(u),
              "label": unit_label(u), "score": None if scores is None else scores.get(u)} for u in units]
    edges = []
    lower = {t: [u for u in units if u != t and unit_layer(u) <= unit_layer(t)] for t in units}
    targets = [t for t in units if lower[t]]
    attributions = attribute_units(model, pairs, targets, settings, tokenizer=tokenizer, heads=True,
                                   progress=progress, **kw)
    for target, att in zip(targets, attributions):
        for source in lower[target]:
            value = _value(att, source)
            if value is not None:
                edges.append({"source": ids[source], "target": ids[target], "weight": float(value.mean())})
    meta = {"pairs": len(pairs), "units": len(units), "edge": "mean conditional NIG of source toward target"}
    return Circuit(nodes, edges, meta)


__all__ = ("Circuit", "circuit", "top_heads", "top_units", "unit_label", "unit_layer")
