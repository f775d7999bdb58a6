"""Neuron identities and sets of neurons (docs/method.md §6, §7).

Owns: what a neuron is, ``(module name, output unit)``; its layer and
component, read from the module name (:func:`layer_index`,
:func:`component`); the attributed neurons of a model
(:func:`neuron_universe`); :class:`NeuronSet` with its algebra (``&``, ``|``,
``-``, :meth:`NeuronSet.overlap`, :func:`intersection`, :func:`union`); and
how many neurons the top X % of a model is (:func:`top_count`).

Must not: know about schemes, pairs or files (that is :mod:`fastnig.neurons.scheme`
and :mod:`fastnig.neurons.scheme_storage`); import any fastnig module but
:mod:`fastnig.engine.model` and :mod:`fastnig.common`.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..common import is_int
from ..engine.model import linear_modules

COMPONENTS = ("query", "key", "value", "attention_output", "intermediate", "ff_output")
"""The six Linear components of a Transformer layer, in the order they run."""
OTHER_COMPONENTS = ("embeddings", "pooler", "other")
"""Components of Linear modules outside the layer stack (e.g. ELECTRA's
``embeddings_project``) or of unknown role."""

# ---------------------------------------------------------------- neuron names
_LAYER_CONTAINERS = ("layer", "layers", "h", "block", "blocks")
_ATTENTION_PROJECTIONS = {
    "query": "query", "key": "key", "value": "value",                  # BERT, RoBERTa, ELECTRA, MiniLM
    "q_lin": "query", "k_lin": "key", "v_lin": "value",                # DistilBERT
    "query_proj": "query", "key_proj": "key", "value_proj": "value",   # DeBERTa
    "q_proj": "query", "k_proj": "key", "v_proj": "value",
    "q": "query", "k": "key", "v": "value",                            # MPNet
}
_ATTENTION_OUTPUTS = ("out_lin", "o", "out_proj")


def _layer_position(parts: Sequence[str]) -> Optional[int]:
    """Index in ``parts`` of the layer number (``...layer.<n>...``), or None."""
    for i in range(len(parts) - 1):
        if parts[i] in _LAYER_CONTAINERS and parts[i + 1].isdigit():
            return i + 1
    return None


def layer_index(module_name: str) -> int:
    """Transformer layer (0-based) of a Linear module, from its name.

    ``bert.encoder.layer.3.attention.self.query`` -> 3,
    ``distilbert.transformer.layer.3.ffn.lin1`` -> 3.  Modules outside the
    layer stack (ELECTRA's ``embeddings_project``, a pooler) give -1.
    """
    if not isinstance(module_name, str):
        raise TypeError(f"module_name must be a str, got {type(module_name).__name__}")
    parts = module_name.split(".")
    pos = _layer_position(parts)
    return int(parts[pos]) if pos is not None else -1


def component(module_name: str) -> str:
    """Role of a Linear module inside its Transformer layer, from its name.

    One of :data:`COMPONENTS` (``query``, ``key``, ``value``,
    ``attention_output``, ``intermediate``, ``ff_output``) for the Linear
    modules of a layer of BERT / RoBERTa / ELECTRA / MiniLM
    (``attention.self.query``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``), DistilBERT (``attention.q_lin``
    / ``k_lin`` / ``v_lin`` / ``out_lin``, ``ffn.lin1``, ``ffn.lin2``), DeBERTa
    and MPNet; else ``embeddings``, ``pooler`` or ``other``.
    """
    if not isinstance(module_name, str):
        raise TypeError(f"module_name must be a str, got {type(module_name).__name__}")
    parts = module_name.split(".")
    pos = _layer_position(parts)
    if pos is None:
        if "pooler" in parts:
            return "pooler"
        if any(p.startswith("embeddings") for p in parts):
            return "embeddings"
        return "other"
    inner = parts[pos + 1:]
    if not inner:
        return "other"
    last = inner[-1]
    if "attention" in inner[:-1] or "attn" in inner[:-1]:
        if last in _ATTENTION_PROJECTIONS:
            return _ATTENTION_PROJECTIONS[last]
        if last in _ATTENTION_OUTPUTS or (last == "dense" and "output" in inner):
            return "attention_output"
        return "other"
    if inner[:2] == ["intermediate", "dense"] or inner == ["ffn", "lin1"]:
        return "intermediate"
    if inner[:2] == ["output", "dense"] or inner == ["ffn", "lin2"]:
        return "ff_output"
    return "other"


def neuron_universe(model, layers: Optional[Sequence[str]] = None, include_pooler: bool = False) -> Dict[str, int]:
    """Attributed modules of ``model`` -> out_features, in model order.

    The same modules as :func:`fastnig.attribute` with the same ``layers`` /
    ``include_pooler``: the ``sizes`` a :class:`Scheme` needs.
    """
    return {name: int(m.out_features) for name, m in linear_modules(model, layers, include_pooler).items()}


def check_sizes(sizes) -> Dict[str, int]:
    """``sizes`` (module name -> out_features, in model order) checked, as a plain dict of ints."""
    if not isinstance(sizes, Mapping) or not sizes:
        raise TypeError("sizes must be a non-empty dict {module name: out_features} in model order")
    out = {}
    for name, n in sizes.items():
        if not isinstance(name, str):
            raise TypeError(f"sizes: module names must be str, got {name!r}")
        if not is_int(n) or int(n) < 1:
            raise ValueError(f"sizes[{name!r}] must be a positive integer (out_features), got {n!r}")
        out[name] = int(n)
    return out


def top_count(percent, total: int) -> int:
    """round(percent / 100 · total), halves rounded up (docs/method.md §6): the size of a top-X % set."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float, np.floating, np.integer)) \
            or not 0 < float(percent) <= 100:
        raise ValueError(f"percent must be a number in (0, 100] (e.g. 0.01, 0.1, 1), got {percent!r}")
    # Decimal(str(.)) so that 0.01 % of 221,184 is exactly 22.1184, not a float
    # that happens to fall on the other side of .5.
    exact = Decimal(str(percent)) * total / Decimal(100)
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


# ------------------------------------------------------------------ neuron set
class NeuronSet:
    """A set of neurons of one model: ``(module, unit)`` pairs.

    Attributes:
        sizes: every attributed module -> out_features, in model order (the
            universe the set lives in; sets of different universes do not mix).
        name: a label such as ``"P_ms@0.1%"``.
        mask: ``[total_neurons]`` bool, the members, modules concatenated in
            ``sizes`` order.
    """

    def __init__(self, sizes: Mapping[str, int], mask: torch.Tensor, name: str = ""):
        self.sizes = check_sizes(sizes)
        total = sum(self.sizes.values())
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (total,):
            raise ValueError(f"mask must be a bool tensor of shape [{total}] (all neurons of sizes), "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        self.mask = mask.detach().cpu()
        self.name = str(name)

    # -- construction
    @classmethod
    def from_indices(cls, members: Mapping[str, Sequence[int]], sizes: Mapping[str, int],
                     name: str = "") -> "NeuronSet":
        """A set from ``{module: unit indices}`` (duplicates collapse)."""
        sizes = check_sizes(sizes)
        offsets = _offsets(sizes)
        mask = torch.zeros(sum(sizes.values()), dtype=torch.bool)
        for module, units in members.items():
            if module not in sizes:
                raise ValueError(f"members: module {module!r} is not in sizes (e.g. {next(iter(sizes))!r})")
            idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
            if idx.numel() and (idx.min() < 0 or idx.max() >= sizes[module]):
                raise ValueError(f"members[{module!r}]: unit indices must be in [0, {sizes[module]}), "
                                 f"got {idx.min().item()}..{idx.max().item()}")
            mask[offsets[module] + idx] = True
        return cls(sizes, mask, name)

    @classmethod
    def empty(cls, sizes: Mapping[str, int], name: str = "") -> "NeuronSet":
        sizes = check_sizes(sizes)
        return cls(sizes, torch.zeros(sum(sizes.values()), dtype=torch.bool), name)

    # -- views
    @property
    def total(self) -> int:
        """Number of neurons in the universe."""
        return int(self.mask.numel())

    def by_module(self) -> Dict[str, torch.Tensor]:
        """Module -> sorted unit indices (LongTensor); modules with no member omitted."""
        out = {}
        start = 0
        for module, n in self.sizes.items():
            units = torch.nonzero(self.mask[start:start + n]).flatten()
            if units.numel():
                out[module] = units.to(torch.long)
            start += n
        return out

    def neurons(self) -> List[Tuple[str, int]]:
        """Members as ``(module, unit)``, in model order."""
        return [(module, int(u)) for module, units in self.by_module().items() for u in units]

    def describe(self) -> List[Dict[str, object]]:
        """Members with their layer and component: dicts module, unit, layer, component."""
        return [{"module": m, "unit": u, "layer": layer_index(m), "component": component(m)}
                for m, u in self.neurons()]

    def counts_by_layer_component(self) -> Dict[Tuple[int, str], int]:
        """``(layer, component) -> number of members`` (the paper's Figure 5).

        Every (layer, component) present in the universe appears, zeros
        included, sorted by layer then component order (:data:`COMPONENTS`,
        then :data:`OTHER_COMPONENTS`); layer -1 = outside the layer stack.
        """
        counts: Dict[Tuple[int, str], int] = {}
        start = 0
        for module, n in self.sizes.items():
            key = (layer_index(module), component(module))
            counts[key] = counts.get(key, 0) + int(self.mask[start:start + n].sum())
            start += n
        order = COMPONENTS + OTHER_COMPONENTS
        return dict(sorted(counts.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))))

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __contains__(self, neuron) -> bool:
        module, unit = neuron
        if module not in self.sizes or not 0 <= unit < self.sizes[module]:
            return False
        return bool(self.mask[_offsets(self.sizes)[module] + unit])

    def __iter__(self) -> Iterator[Tuple[str, int]]:
        return iter(self.neurons())

    # -- algebra
    def _require_same_universe(self, other: "NeuronSet", op: str) -> None:
        if not isinstance(other, NeuronSet):
            raise TypeError(f"{op}: expected a NeuronSet, got {type(other).__name__}")
        if list(self.sizes.items()) != list(other.sizes.items()):
            mine, theirs = set(self.sizes.items()), set(other.sizes.items())
            diff = sorted(mine ^ theirs)[:3]
            raise ValueError(f"{op}: the sets {self.name!r} and {other.name!r} are over different neurons "
                             f"(different models or attributed layers; e.g. {diff})")

    def __and__(self, other: "NeuronSet") -> "NeuronSet":
        self._require_same_universe(other, "intersection")
        return NeuronSet(self.sizes, self.mask & other.mask, f"{self.name} ∩ {other.name}")

    def __or__(self, other: "NeuronSet") -> "NeuronSet":
        self._require_same_universe(other, "union")
        return NeuronSet(self.sizes, self.mask | other.mask, f"{self.name} ∪ {other.name}")

    def __sub__(self, other: "NeuronSet") -> "NeuronSet":
        self._require_same_universe(other, "difference")
        return NeuronSet(self.sizes, self.mask & ~other.mask, f"{self.name} \\ {other.name}")

    def __eq__(self, other) -> bool:
        return (isinstance(other, NeuronSet) and list(self.sizes.items()) == list(other.sizes.items())
                and torch.equal(self.mask, other.mask))

    __hash__ = None  # mutable mask: not hashable

    def overlap(self, other: "NeuronSet") -> float:
        """``|self ∩ other| / |self| * 100`` (docs/method.md §6); NaN when ``self`` is empty."""
        self._require_same_universe(other, "overlap")
        size = len(self)
        if size == 0:
            return float("nan")
        return int((self.mask & other.mask).sum()) / size * 100.0

    def __repr__(self) -> str:
        return f"NeuronSet({self.name!r}, {len(self)} of {self.total} neurons)"

    # -- persistence (small JSON: the pruning stage can read a set without schemes)
    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "sizes": dict(self.sizes),
                "members": {m: u.tolist() for m, u in self.by_module().items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "NeuronSet":
        return cls.from_indices(data["members"], data["sizes"], data.get("name", ""))


def _offsets(sizes: Mapping[str, int]) -> Dict[str, int]:
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = start
        start += n
    return out


def intersection(*sets: NeuronSet, name: Optional[str] = None) -> NeuronSet:
    """∩ of one or more neuron sets of the same universe."""
    sets = _flatten_sets(sets, "intersection")
    result = sets[0]
    for s in sets[1:]:
        result = result & s
    return NeuronSet(result.sizes, result.mask,
                     name if name is not None else "∩(" + ", ".join(s.name for s in sets) + ")")


def union(*sets: NeuronSet, name: Optional[str] = None) -> NeuronSet:
    """∪ of one or more neuron sets of the same universe."""
    sets = _flatten_sets(sets, "union")
    result = sets[0]
    for s in sets[1:]:
        result = result | s
    return NeuronSet(result.sizes, result.mask,
                     name if name is not None else "∪(" + ", ".join(s.name for s in sets) + ")")


def _flatten_sets(sets, op: str) -> List[NeuronSet]:
    if len(sets) == 1 and not isinstance(sets[0], NeuronSet):
        sets = tuple(sets[0])
    if not sets:
        raise ValueError(f"{op}: give at least one NeuronSet")
    for s in sets:
        if not isinstance(s, NeuronSet):
            raise TypeError(f"{op}: expected NeuronSet arguments, got {type(s).__name__}")
    return list(sets)

