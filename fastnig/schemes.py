"""Attribution schemes, neuron sets and their algebra (SPEC §4, §6).

A :class:`Scheme` is the mean NIG of every neuron over the pairs of one
(model, dataset, label, settings): P_x for "relevant", N_x for
"non-relevant".  It keeps exact per-neuron sums and the ids of the pairs it
holds, so that two partial runs merge into exactly the scheme one run over
all pairs gives, and a killed run resumes where its last save stopped.

``scheme.top(percent)`` ranks every neuron of the model together and returns
a :class:`NeuronSet`; sets intersect (``&``), unite (``|``) and compare
(:meth:`NeuronSet.overlap`).  :func:`fuse` averages schemes (⊕): F_x =
P_x ⊕ N_x, and :func:`fuse_all` gives F_A.

A neuron is ``(module name, output unit)``; its layer and component come from
the module name (:func:`layer_index`, :func:`component`).

Exact sums
----------
Float addition is not associative, so a plain float64 running sum of the
float32 NIG values would depend on how pairs were split into runs.  Each
float32 value is instead cut exactly into pieces aligned on fixed 32-bit
"bins" of the binary exponent (2^96, 2^64, ..., 2^-160); within a bin every
piece is an integer multiple of the bin's unit below 2^32 units, so float64
sums of up to 2^21 pieces per bin are exact whatever the order.  The
per-neuron sum is then read once, bins from smallest to largest: the same
bits for any split, merge order or resume point.  The price is 9 float64 per
neuron (16 MB for BERT-large) and at most 2,097,152 pairs per scheme.

Files
-----
``scheme.save("runs/P_ms")`` writes two files in ``runs/``:
``P_ms.json`` (metadata, pair ids, the name of its tensor file) and
``P_ms.<token>.safetensors`` (sums and per-pair numbers).  Each save writes a
new tensor file under a fresh token, then atomically replaces the JSON (temp
file in the same folder + ``os.replace``), then deletes the old tensor file.
The JSON is the commit point: a save killed at any moment leaves either the
previous scheme or the new one, never a mix; a tensor file whose token the
JSON does not name is an orphan that the next save removes.  One writer per
scheme path.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

COMPONENTS = ("query", "key", "value", "attention_output", "intermediate", "ff_output")
"""The six Linear components of a Transformer layer, in the order they run."""
OTHER_COMPONENTS = ("embeddings", "pooler", "other")
"""Components of Linear modules outside the layer stack (e.g. ELECTRA's
``embeddings_project``) or of unknown role."""
LABELS = ("relevant", "non-relevant")
RANK_BY = ("value", "abs")
FUSED_LABEL = "fused"

FORMAT = "fastnig-scheme"
FORMAT_VERSION = 1

# Exponents of the exact-summation bins (see the module docstring).  Each bin
# holds multiples of 2^e below 2^(e+32); together they cover every finite
# float32, subnormals included (2^-149 >= 2^-160).
_BIN_EXPONENTS = (96, 64, 32, 0, -32, -64, -96, -128, -160)
MAX_PAIRS = 2 ** 21
"""Most pairs a scheme can hold with exact sums (53 - 32 bits of headroom)."""

# SPEC §7 dataset abbreviations, for names such as "P_ms".
DATASET_ABBREVIATIONS = {
    "msmarco-passage/trec-dl-2019/judged": "ms",
    "msmarco-passage/trec-dl-2019": "ms",
    "beir/fiqa/test": "f",
    "beir/trec-covid": "tc",
    "beir/nfcorpus/test": "nf",
    "beir/nq": "nq",
    "wapo/v2/trec-news-2018": "tn",
    "disks45/nocr/trec-robust-2004": "r",
    "beir/bioasq": "b",
}

PathLike = Union[str, os.PathLike]


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


def short_name(dataset: str) -> str:
    """Short dataset name for labels: SPEC §7 abbreviation, else the last path part."""
    if dataset in DATASET_ABBREVIATIONS:
        return DATASET_ABBREVIATIONS[dataset]
    stripped = dataset.rstrip("/\\")
    return os.path.basename(stripped) or stripped


def neuron_universe(model, layers: Optional[Sequence[str]] = None, include_pooler: bool = False) -> Dict[str, int]:
    """Attributed modules of ``model`` -> out_features, in model order.

    The same modules as :func:`fastnig.attribute` with the same ``layers`` /
    ``include_pooler``: the ``sizes`` a :class:`Scheme` needs.
    """
    from .attribution import linear_modules

    return {name: int(m.out_features) for name, m in linear_modules(model, layers, include_pooler).items()}


def _check_sizes(sizes) -> Dict[str, int]:
    if not isinstance(sizes, Mapping) or not sizes:
        raise TypeError("sizes must be a non-empty dict {module name: out_features} in model order")
    out = {}
    for name, n in sizes.items():
        if not isinstance(name, str):
            raise TypeError(f"sizes: module names must be str, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
            raise ValueError(f"sizes[{name!r}] must be a positive integer (out_features), got {n!r}")
        out[name] = int(n)
    return out


def _round_half_up(percent, total: int) -> int:
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
        self.sizes = _check_sizes(sizes)
        total = sum(self.sizes.values())
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (total,):
            raise ValueError(f"mask must be a bool tensor of shape [{total}] (all neurons of sizes), "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        self.mask = mask.detach().cpu()
        self.name = str(name)

    # -- construction
    @classmethod
    def from_indices(cls, members: Mapping[str, Sequence[int]], sizes: Mapping[str, int], name: str = "") -> "NeuronSet":
        """A set from ``{module: unit indices}`` (duplicates collapse)."""
        sizes = _check_sizes(sizes)
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
        sizes = _check_sizes(sizes)
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
        """``|self ∩ other| / |self| * 100`` (SPEC §6); NaN when ``self`` is empty."""
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
    return NeuronSet(result.sizes, result.mask, name if name is not None else "∩(" + ", ".join(s.name for s in sets) + ")")


def union(*sets: NeuronSet, name: Optional[str] = None) -> NeuronSet:
    """∪ of one or more neuron sets of the same universe."""
    sets = _flatten_sets(sets, "union")
    result = sets[0]
    for s in sets[1:]:
        result = result | s
    return NeuronSet(result.sizes, result.mask, name if name is not None else "∪(" + ", ".join(s.name for s in sets) + ")")


def _flatten_sets(sets, op: str) -> List[NeuronSet]:
    if len(sets) == 1 and not isinstance(sets[0], NeuronSet):
        sets = tuple(sets[0])
    if not sets:
        raise ValueError(f"{op}: give at least one NeuronSet")
    for s in sets:
        if not isinstance(s, NeuronSet):
            raise TypeError(f"{op}: expected NeuronSet arguments, got {type(s).__name__}")
    return list(sets)


# ---------------------------------------------------------------- exact sums
def _split_into_bins(values: torch.Tensor) -> torch.Tensor:
    """Exact per-column sums of float32 ``values [P, n]``, as bins ``[B, n]`` float64.

    Every value is cut into pieces ``q_b`` that are multiples of ``2^e_b``
    below ``2^(e_b+32)``; all operations are exact in float64 (power-of-two
    scaling, truncation, subtraction of a prefix of the bits), and so are
    the column sums of up to 2^21 such pieces.
    """
    rest = values.to(torch.float32).to(torch.float64)
    bins = torch.empty((len(_BIN_EXPONENTS), values.shape[1]), dtype=torch.float64)
    for b, e in enumerate(_BIN_EXPONENTS):
        unit = math.ldexp(1.0, e)
        piece = torch.trunc(rest / unit) * unit
        rest = rest - piece
        bins[b] = piece.sum(dim=0)
    return bins


def _bins_value(bins: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bins -> ``[n]`` float64 sum, smallest bin first (one fixed rounding order)."""
    total = torch.zeros(bins.shape[1], dtype=torch.float64)
    for b in range(bins.shape[0] - 1, -1, -1):
        total = total + bins[b]
    return total


# --------------------------------------------------------------------- scheme
_COMPARED_META = ("model", "dataset", "label")


class Scheme:
    """Mean NIG per neuron over the pairs of one (model, dataset, label, settings).

    Build with :meth:`empty` (or :meth:`from_attributions`), feed with
    :meth:`add`, combine with :meth:`merge`, persist with :meth:`save` /
    :meth:`load`.  :func:`fuse` returns a *fused* scheme, which has a mean but
    no pairs (it cannot :meth:`add` or :meth:`merge`).

    Attributes:
        sizes: attributed module -> out_features, in model order.
        model, dataset, label: what the scheme describes; label is
            ``"relevant"`` (P_x), ``"non-relevant"`` (N_x) or ``"fused"``.
        settings: :attr:`fastnig.Attributions.settings` of every pair (target
            function, baseline, steps, rule, max_length, dtype, ...).
        pair_ids: ids of the pairs summed, in the order they were added.
        dropped_ids: ids of pairs the agreement filter rejected (SPEC §6);
            kept so that a resumed run does not re-count them.
        delta, f_input, f_baseline: ``[num_pairs]`` float32 per-pair
            convergence delta and F at the input / baseline; ``num_tokens``
            ``[num_pairs]`` int64.
        extra: free JSON-serialisable metadata (e.g. the data sampling seed).
    """

    def __init__(self, sizes: Mapping[str, int], *, model: str, dataset: str, label: str,
                 settings: Optional[Mapping[str, object]] = None, name: Optional[str] = None,
                 extra: Optional[Mapping[str, object]] = None):
        self.sizes = _check_sizes(sizes)
        for key, value in (("model", model), ("dataset", dataset)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty str, got {value!r}")
        if label not in LABELS + (FUSED_LABEL,):
            raise ValueError(f"label must be one of {LABELS} (or {FUSED_LABEL!r} for fusions), got {label!r}")
        self.model, self.dataset, self.label = model, dataset, label
        self.settings: Dict[str, object] = dict(settings or {})
        self.extra: Dict[str, object] = dict(extra or {})
        self._name = name
        self._bins = {m: torch.zeros((len(_BIN_EXPONENTS), n), dtype=torch.float64) for m, n in self.sizes.items()}
        self._fused_mean: Optional[Dict[str, torch.Tensor]] = None
        self.parts: List[Dict[str, object]] = []  # fused schemes: what was averaged
        self.pair_ids: List[str] = []
        self.dropped_ids: List[str] = []
        self._seen: set = set()
        self.delta = torch.zeros(0, dtype=torch.float32)
        self.f_input = torch.zeros(0, dtype=torch.float32)
        self.f_baseline = torch.zeros(0, dtype=torch.float32)
        self.num_tokens = torch.zeros(0, dtype=torch.long)
        self._ranking: Dict[str, np.ndarray] = {}

    # -- construction
    @classmethod
    def empty(cls, sizes: Mapping[str, int], meta: Mapping[str, object]) -> "Scheme":
        """A scheme with no pairs yet.

        Args:
            sizes: module -> out_features in model order (:func:`neuron_universe`).
            meta: ``model``, ``dataset``, ``label`` (required); ``settings``
                (else taken from the first :meth:`add`), ``name``, ``extra``.
        """
        if not isinstance(meta, Mapping):
            raise TypeError("meta must be a dict with model, dataset, label (and optionally settings, name, extra)")
        missing = [k for k in _COMPARED_META if k not in meta]
        if missing:
            raise ValueError(f"meta is missing {missing}; give model, dataset and label "
                             f"('relevant' or 'non-relevant')")
        unknown = sorted(set(meta) - {"model", "dataset", "label", "settings", "name", "extra"})
        if unknown:
            raise ValueError(f"meta has unknown keys {unknown}; allowed: model, dataset, label, settings, name, extra")
        return cls(sizes, model=meta["model"], dataset=meta["dataset"], label=meta["label"],
                   settings=meta.get("settings"), name=meta.get("name"), extra=meta.get("extra"))

    @classmethod
    def from_attributions(cls, attributions, pair_ids: Sequence, dataset: str, *, model: Optional[str] = None,
                          sizes: Optional[Mapping[str, int]] = None) -> "Scheme":
        """A scheme holding these attributions; label and settings come from them.

        ``model`` defaults to ``attributions.settings["model"]`` (the model's
        ``name_or_path``); give it when that is empty (a model built in code).
        """
        settings = dict(attributions.settings)
        label = settings.get("target")
        if label not in LABELS:
            raise ValueError(f"the attributions mix targets ({settings.get('target')!r}); a scheme has one label")
        model = model or str(settings.get("model") or "")
        if not model:
            raise ValueError("model: the attributions do not name their model (settings['model'] is empty); "
                             "pass model='...'")
        sizes = sizes or {m: int(s.shape[1]) for m, s in attributions.scores.items()}
        scheme = cls(sizes, model=model, dataset=dataset, label=label, settings=settings)
        scheme.add(attributions, pair_ids)
        return scheme

    # -- basic views
    @property
    def is_fused(self) -> bool:
        return self._fused_mean is not None

    @property
    def name(self) -> str:
        """``P_<ds>`` / ``N_<ds>`` for pair schemes (SPEC §7 abbreviations), or the fusion's name."""
        if self._name:
            return self._name
        if self.label == FUSED_LABEL:
            return "⊕".join(str(p.get("name")) for p in self.parts) or "fusion"
        return ("P_" if self.label == "relevant" else "N_") + short_name(self.dataset)

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def count(self) -> int:
        """Pairs summed (the same for every neuron)."""
        return len(self.pair_ids)

    num_pairs = count

    @property
    def num_dropped(self) -> int:
        """Pairs rejected by the agreement filter."""
        return len(self.dropped_ids)

    @property
    def seen_ids(self) -> frozenset:
        """Ids of every pair already processed (summed or dropped): skip them when resuming."""
        return frozenset(self._seen)

    @property
    def total_neurons(self) -> int:
        return sum(self.sizes.values())

    @property
    def sum(self) -> Dict[str, torch.Tensor]:
        """Module -> ``[out_features]`` float64 sum of NIG over the pairs (units of F)."""
        self._require_pairs_scheme("sum")
        return {m: _bins_value(b) for m, b in self._bins.items()}

    @property
    def mean(self) -> Dict[str, torch.Tensor]:
        """Module -> ``[out_features]`` float64 mean NIG per pair (units of F)."""
        if self._fused_mean is not None:
            return {m: v.clone() for m, v in self._fused_mean.items()}
        if self.count == 0:
            raise ValueError(f"scheme {self.name} has no pairs yet: its mean is undefined")
        return {m: s / self.count for m, s in self.sum.items()}

    def mean_vector(self) -> torch.Tensor:
        """``[total_neurons]`` float64 mean, modules concatenated in ``sizes`` order."""
        mean = self.mean
        return torch.cat([mean[m] for m in self.sizes])

    def delta_summary(self) -> Dict[str, float]:
        """Convergence delta over the pairs: mean and max |delta|, median relative |delta|.

        Relative = |delta| / |F(x) - F(x')|, infinite where F did not move.
        """
        if self.count == 0:
            return {"pairs": 0, "mean_abs_delta": float("nan"), "max_abs_delta": float("nan"),
                    "median_relative_delta": float("nan")}
        abs_delta = self.delta.double().abs()
        moved = (self.f_input.double() - self.f_baseline.double()).abs()
        relative = abs_delta / moved
        return {"pairs": self.count, "mean_abs_delta": float(abs_delta.mean()),
                "max_abs_delta": float(abs_delta.max()), "median_relative_delta": float(relative.median())}

    def describe(self) -> Dict[str, object]:
        """The metadata, as saved in the JSON file (without the pair ids)."""
        return {"name": self.name, "model": self.model, "dataset": self.dataset, "label": self.label,
                "kind": "fusion" if self.is_fused else "pairs", "settings": dict(self.settings),
                "num_pairs": self.count, "num_dropped": self.num_dropped,
                "delta": self.delta_summary(), "parts": list(self.parts), "extra": dict(self.extra)}

    def __repr__(self) -> str:
        kind = f"fusion of {len(self.parts)}" if self.is_fused else f"{self.count} pairs, {self.num_dropped} dropped"
        return f"Scheme({self.name}: {self.model}, {kind}, {self.total_neurons} neurons)"

    def _require_pairs_scheme(self, what: str) -> None:
        if self._fused_mean is not None:
            raise TypeError(f"{what}: {self.name} is a fusion (an average of means) and holds no pairs; "
                            "add or merge the pair schemes, then fuse again")

    # -- filling
    def add(self, attributions, pair_ids: Sequence) -> "Scheme":
        """Add the pairs of one :func:`fastnig.attribute` call (in place; returns self).

        Args:
            attributions: :class:`fastnig.Attributions` of pairs that all have
                this scheme's label as target; ``scores[m]``: ``[P, sizes[m]]``
                for exactly the modules of ``sizes``.  Scores are taken as
                float32 (the engine's dtype), the sums are exact.
            pair_ids: ``P`` ids (str, or int turned into str), one per pair in
                order, none already in the scheme (summed or dropped).
        """
        self._require_pairs_scheme("add")
        for attr in ("scores", "delta", "f_input", "f_baseline", "targets", "settings"):
            if not hasattr(attributions, attr):
                raise TypeError(f"attributions must be a fastnig.Attributions, got {type(attributions).__name__}")
        num = int(attributions.delta.shape[0])
        ids = self._new_ids(pair_ids, "pair_ids")
        if len(ids) != num:
            raise ValueError(f"pair_ids has {len(ids)} ids but the attributions hold {num} pairs")
        wrong = sorted({t for t in attributions.targets if t != self.label})
        if wrong:
            raise ValueError(f"the attributions target {wrong} but scheme {self.name} is for label {self.label!r}")
        settings = dict(attributions.settings)
        if self.settings:
            _require_same("add", self.name, "the attributions", [("settings", self.settings, settings)])
        if settings.get("model") and str(settings["model"]) != self.model:
            raise ValueError(f"add: the attributions are of model {settings['model']!r} but scheme {self.name} "
                             f"is of model {self.model!r}")
        scores = attributions.scores
        if set(scores) != set(self.sizes):
            missing = sorted(set(self.sizes) - set(scores))[:3]
            extra = sorted(set(scores) - set(self.sizes))[:3]
            raise ValueError(f"add: the attributed modules differ from the scheme's (missing {missing}, "
                             f"unexpected {extra}); attribute with the same layers/include_pooler")
        for m, n in self.sizes.items():
            if tuple(scores[m].shape) != (num, n):
                raise ValueError(f"add: scores[{m!r}] has shape {tuple(scores[m].shape)}, expected ({num}, {n})")
            if not torch.isfinite(scores[m]).all():
                raise ValueError(f"add: scores[{m!r}] has NaN/Inf values; they cannot enter a mean")
        if self.count + num > MAX_PAIRS:
            raise ValueError(f"a scheme holds at most {MAX_PAIRS} pairs with exact sums; split the dataset")
        new_bins = {m: self._bins[m] + _split_into_bins(scores[m].detach().cpu()) for m in self.sizes}
        # Commit only after every check and computation succeeded.
        if not self.settings:
            self.settings = settings
        self._bins = new_bins
        self.pair_ids.extend(ids)
        self._seen.update(ids)
        self.delta = torch.cat([self.delta, attributions.delta.detach().cpu().float()])
        self.f_input = torch.cat([self.f_input, attributions.f_input.detach().cpu().float()])
        self.f_baseline = torch.cat([self.f_baseline, attributions.f_baseline.detach().cpu().float()])
        tokens = getattr(attributions, "num_tokens", None)
        tokens = torch.zeros(num, dtype=torch.long) if tokens is None else torch.as_tensor(tokens).cpu().long()
        self.num_tokens = torch.cat([self.num_tokens, tokens])
        self._ranking.clear()
        return self

    def mark_dropped(self, pair_ids: Sequence) -> "Scheme":
        """Record pairs the agreement filter rejected (in place; returns self)."""
        self._require_pairs_scheme("mark_dropped")
        ids = self._new_ids(pair_ids, "pair_ids")
        self.dropped_ids.extend(ids)
        self._seen.update(ids)
        return self

    def _new_ids(self, pair_ids, arg: str) -> List[str]:
        if isinstance(pair_ids, (str, bytes)):
            raise TypeError(f"{arg} must be a sequence of ids, not one string")
        ids = []
        for i in pair_ids:
            if isinstance(i, bool) or not isinstance(i, (str, int, np.integer)):
                raise TypeError(f"{arg}: ids must be str or int, got {type(i).__name__}")
            ids.append(str(i))
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
            raise ValueError(f"{arg} repeats ids {dup}")
        again = [i for i in ids if i in self._seen]
        if again:
            raise ValueError(f"{arg}: {len(again)} pair(s) are already in scheme {self.name} (e.g. {again[:3]}); "
                             "skip scheme.seen_ids when resuming")
        return ids

    # -- combining
    def check_compatible(self, other: "Scheme", *, same_data: bool = True, op: str = "combine") -> None:
        """Raise ValueError naming what differs between two schemes.

        Always compared: sizes (attributed modules), model, settings (except
        ``target`` when ``same_data`` is False); with ``same_data`` also
        dataset and label.
        """
        if not isinstance(other, Scheme):
            raise TypeError(f"{op}: expected a Scheme, got {type(other).__name__}")
        if list(self.sizes.items()) != list(other.sizes.items()):
            diff = sorted(set(self.sizes.items()) ^ set(other.sizes.items()))[:3]
            raise ValueError(f"cannot {op} {self.name} and {other.name}: their attributed modules differ (e.g. {diff})")
        checks = [("model", self.model, other.model)]
        if same_data:
            checks += [("dataset", self.dataset, other.dataset), ("label", self.label, other.label)]
            checks.append(("settings", self.settings, other.settings))
        else:
            checks.append(("settings", _without_target(self.settings), _without_target(other.settings)))
        _require_same(op, self.name, other.name, checks)

    def merge(self, other: "Scheme") -> "Scheme":
        """A new scheme with the pairs of both (exact: equals one run over all pairs).

        Both must share model, dataset, label, settings and modules, and no
        pair id (summed or dropped).
        """
        self._require_pairs_scheme("merge")
        other._require_pairs_scheme("merge")
        if self.settings and other.settings:
            self.check_compatible(other, op="merge")
        else:  # an empty scheme has no settings yet: compare the rest
            _require_same("merge", self.name, other.name, [("model", self.model, other.model),
                          ("dataset", self.dataset, other.dataset), ("label", self.label, other.label)])
            if list(self.sizes.items()) != list(other.sizes.items()):
                raise ValueError(f"cannot merge {self.name} and {other.name}: their attributed modules differ")
        shared = self._seen & other._seen
        if shared:
            raise ValueError(f"cannot merge {self.name} and {other.name}: {len(shared)} pair id(s) are in both "
                             f"(e.g. {sorted(shared)[:3]}); a pair must be counted once")
        if self.count + other.count > MAX_PAIRS:
            raise ValueError(f"a scheme holds at most {MAX_PAIRS} pairs with exact sums")
        out = Scheme(self.sizes, model=self.model, dataset=self.dataset, label=self.label,
                     settings=self.settings or other.settings, name=self._name, extra={**other.extra, **self.extra})
        out._bins = {m: self._bins[m] + other._bins[m] for m in self.sizes}
        out.pair_ids = self.pair_ids + other.pair_ids
        out.dropped_ids = self.dropped_ids + other.dropped_ids
        out._seen = self._seen | other._seen
        out.delta = torch.cat([self.delta, other.delta])
        out.f_input = torch.cat([self.f_input, other.f_input])
        out.f_baseline = torch.cat([self.f_baseline, other.f_baseline])
        out.num_tokens = torch.cat([self.num_tokens, other.num_tokens])
        return out

    # -- neuron selection
    def ranking(self, by: str = "value") -> np.ndarray:
        """``[total_neurons]`` flat neuron indices, most important first.

        ``by="value"``: mean descending (signed); ``"abs"``: |mean| descending.
        Ties keep model order: the module that comes first in ``sizes``
        (i.e. ``model.named_modules()``) wins, then the lower unit index.
        """
        if by not in RANK_BY:
            raise ValueError(f"by must be one of {RANK_BY}, got {by!r}")
        if by not in self._ranking:
            values = self.mean_vector().numpy()
            key = values if by == "value" else np.abs(values)
            # lexsort: last key is primary.  -key ascending = key descending;
            # ties fall back to the flat index, i.e. model order.
            self._ranking[by] = np.lexsort((np.arange(values.size), -key))
        return self._ranking[by]

    def top_count(self, percent) -> int:
        """round(percent / 100 · total neurons), halves rounded up (SPEC §6)."""
        if isinstance(percent, bool) or not isinstance(percent, (int, float, np.floating, np.integer)) \
                or not 0 < float(percent) <= 100:
            raise ValueError(f"percent must be a number in (0, 100] (e.g. 0.01, 0.1, 1), got {percent!r}")
        return _round_half_up(percent, self.total_neurons)

    def top(self, percent, by: str = "value") -> NeuronSet:
        """The top ``percent`` % of all neurons of the model together (SPEC §6).

        Keeps the first round(percent/100 · total) neurons of
        :meth:`ranking` (ties: model order, then unit index).  Named like
        ``"P_ms@0.1%"`` (``"|P_ms|@0.1%"`` for ``by="abs"``).
        """
        k = self.top_count(percent)
        order = self.ranking(by)
        mask = torch.zeros(self.total_neurons, dtype=torch.bool)
        mask[torch.from_numpy(order[:k].copy())] = True
        label = self.name if by == "value" else f"|{self.name}|"
        return NeuronSet(self.sizes, mask, f"{label}@{float(percent):g}%")

    # -- persistence
    def save(self, path: PathLike) -> Path:
        """Atomically write ``<path>.json`` + ``<stem>.<token>.safetensors``; returns the JSON path.

        ``path`` may end in ``.json`` or not.  See the module docstring for
        why a killed save leaves the previous scheme readable.
        """
        from safetensors.torch import save_file

        json_path = scheme_json_path(path)
        folder = json_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        stem = json_path.name[:-len(".json")]
        token = secrets.token_hex(6)
        tensor_name = f"{stem}.{token}.safetensors"

        tensors: Dict[str, torch.Tensor] = {}
        if self._fused_mean is not None:
            for m, v in self._fused_mean.items():
                tensors[f"mean/{m}"] = v.contiguous()
        else:
            for m, b in self._bins.items():
                tensors[f"sum_bins/{m}"] = b.contiguous()
            tensors["pair/delta"] = self.delta.contiguous()
            tensors["pair/f_input"] = self.f_input.contiguous()
            tensors["pair/f_baseline"] = self.f_baseline.contiguous()
            tensors["pair/num_tokens"] = self.num_tokens.contiguous()
        tmp = folder / f".{tensor_name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "token": token})
        _fsync(tmp)
        os.replace(tmp, folder / tensor_name)

        meta = {"format": FORMAT, "version": FORMAT_VERSION, "token": token, "tensors": tensor_name,
                **self.describe(), "name": self._name, "display_name": self.name,
                "sizes": [[m, n] for m, n in self.sizes.items()],
                "bin_exponents": list(_BIN_EXPONENTS),
                "pair_ids": self.pair_ids, "dropped_ids": self.dropped_ids}
        tmp_json = folder / f".{json_path.name}.{token}.tmp"
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_json, json_path)  # the commit point
        _fsync_dir(folder)

        # The new scheme is committed; what follows only frees disk space.
        keep = {tensor_name}
        for leftover in _files_of(folder, stem):
            if leftover.name not in keep:
                try:
                    leftover.unlink()
                except OSError:
                    pass
        return json_path

    @classmethod
    def load(cls, path: PathLike) -> "Scheme":
        """Read a scheme written by :meth:`save` (``path`` with or without ``.json``)."""
        from safetensors import safe_open

        json_path = scheme_json_path(path)
        if not json_path.is_file():
            raise FileNotFoundError(f"no scheme at {json_path} (a scheme is a .json file written by Scheme.save)")
        for attempt in range(2):
            meta = _read_scheme_json(json_path)
            tensor_path = json_path.parent / meta["tensors"]
            try:
                with safe_open(str(tensor_path), framework="pt") as f:
                    file_meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                break
            except FileNotFoundError:
                if attempt:  # a concurrent save may have replaced it once; twice means it is gone
                    raise FileNotFoundError(f"scheme {json_path} names the tensor file {meta['tensors']}, "
                                            "which is missing; the scheme files were moved or deleted in part") from None
        if file_meta.get("token") != meta["token"]:
            raise ValueError(f"scheme {json_path}: its tensor file {meta['tensors']} belongs to another save "
                             f"(token {file_meta.get('token')!r} != {meta['token']!r}); the files were mixed up")
        sizes = {m: int(n) for m, n in meta["sizes"]}
        scheme = cls(sizes, model=meta["model"], dataset=meta["dataset"], label=meta["label"],
                     settings=meta.get("settings"), name=meta.get("name"), extra=meta.get("extra"))
        if meta.get("kind") == "fusion":
            scheme._fused_mean = {m: _expect(tensors, f"mean/{m}", (n,), json_path) for m, n in sizes.items()}
            scheme.parts = list(meta.get("parts", []))
            return scheme
        if list(meta.get("bin_exponents", [])) != list(_BIN_EXPONENTS):
            raise ValueError(f"scheme {json_path} was written with other summation bins; re-create it")
        scheme._bins = {m: _expect(tensors, f"sum_bins/{m}", (len(_BIN_EXPONENTS), n), json_path)
                        for m, n in sizes.items()}
        scheme.pair_ids = [str(i) for i in meta["pair_ids"]]
        scheme.dropped_ids = [str(i) for i in meta["dropped_ids"]]
        scheme._seen = set(scheme.pair_ids) | set(scheme.dropped_ids)
        num = len(scheme.pair_ids)
        scheme.delta = _expect(tensors, "pair/delta", (num,), json_path)
        scheme.f_input = _expect(tensors, "pair/f_input", (num,), json_path)
        scheme.f_baseline = _expect(tensors, "pair/f_baseline", (num,), json_path)
        scheme.num_tokens = _expect(tensors, "pair/num_tokens", (num,), json_path)
        return scheme

    @staticmethod
    def exists(path: PathLike) -> bool:
        """True when a committed scheme is at ``path`` (resume instead of starting over)."""
        return scheme_json_path(path).is_file()


def scheme_json_path(path: PathLike) -> Path:
    """The JSON file of the scheme saved at ``path`` (``.json`` added when missing)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    p = Path(path)
    if p.name.endswith(".safetensors"):
        raise ValueError(f"path {p}: give the scheme's .json file (or its name without extension), "
                         "not its tensor file")
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def is_scheme_file(path: PathLike) -> bool:
    """True when ``path`` is a JSON file written by :meth:`Scheme.save`."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(200)
    except OSError:
        return False
    return f'"format": "{FORMAT}"' in head


def _read_scheme_json(json_path: Path) -> Dict[str, object]:
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not a valid scheme file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a fastnig scheme file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{json_path}: scheme format version {meta.get('version')} is not supported "
                         f"(this fastnig reads version {FORMAT_VERSION})")
    return meta


def _expect(tensors: Mapping[str, torch.Tensor], key: str, shape: Tuple[int, ...], where: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"scheme {where}: its tensor file lacks {key!r}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"scheme {where}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _files_of(folder: Path, stem: str) -> List[Path]:
    """Tensor files and temp files that saves of scheme ``stem`` may have left in ``folder``."""
    pattern = re.compile(r"^\.?" + re.escape(stem) + r"(\.json)?\.[0-9a-f]{12}(\.safetensors)?(\.tmp)?$")
    return [p for p in folder.iterdir() if pattern.match(p.name)]


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _without_target(settings: Mapping[str, object]) -> Dict[str, object]:
    return {k: v for k, v in settings.items() if k != "target"}


def _require_same(op: str, name_a: str, name_b: str, checks) -> None:
    diffs = []
    for what, a, b in checks:
        if what == "settings":
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    diffs.append(f"settings[{key!r}] {a.get(key)!r} vs {b.get(key)!r}")
        elif a != b:
            diffs.append(f"{what} {a!r} vs {b!r}")
    if diffs:
        raise ValueError(f"cannot {op} {name_a} and {name_b}: " + "; ".join(diffs))


# --------------------------------------------------------------------- fusion
def fuse(*schemes: Scheme, name: Optional[str] = None) -> Scheme:
    """⊕: the scheme whose mean is the average of the schemes' means (SPEC §6).

    Every scheme weighs the same, whatever its number of pairs.  The schemes
    must share model, attributed modules and settings (except the target
    label); the same (dataset, label) may not appear twice.  F_x =
    ``fuse(P_x, N_x)`` (named ``"F_<x>"``).

    Returns:
        a fused :class:`Scheme` (label ``"fused"``): it has ``mean`` and
        ``top`` but no pairs.
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
    means = [s.mean for s in schemes]
    fused_mean = {}
    for m in first.sizes:
        total = torch.zeros(first.sizes[m], dtype=torch.float64)
        for mean in means:
            total = total + mean[m]
        fused_mean[m] = total / len(schemes)
    datasets = list(dict.fromkeys(s.dataset for s in schemes))
    if name is None:
        labels = sorted(s.label for s in schemes)
        if len(datasets) == 1 and labels == sorted(LABELS):
            name = f"F_{short_name(datasets[0])}"
    out = Scheme(first.sizes, model=first.model, dataset="+".join(datasets), label=FUSED_LABEL,
                 settings=_without_target(first.settings), name=name)
    out._fused_mean = fused_mean
    out.parts = [{"name": s.name, "dataset": s.dataset, "label": s.label, "num_pairs": s.count,
                  "num_dropped": s.num_dropped} for s in schemes]
    return out


def fuse_all(schemes: Iterable[Scheme], name: str = "F_A") -> Scheme:
    """F_A: the fusion of every scheme given (all labels, all datasets), each weighing the same."""
    schemes = list(schemes.values() if isinstance(schemes, Mapping) else schemes)
    return fuse(*schemes, name=name)
