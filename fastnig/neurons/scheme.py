"""Attribution schemes: the mean NIG of every neuron over a dataset's pairs (docs/method.md §4, §6).

Owns: :class:`Scheme` for one (model, dataset, label, settings): P_x for
"relevant", N_x for "non-relevant" — filling (:meth:`Scheme.add`), exact
merging (:meth:`Scheme.merge`), ranking and top-X % selection
(:meth:`Scheme.top`, a :class:`~fastnig.neurons.sets.NeuronSet`).  A scheme
keeps exact per-neuron sums (:mod:`fastnig.neurons.exact_sums`) and the ids of
its pairs, so two partial runs merge into exactly the scheme of one run over
all pairs, and a killed run resumes where its last save stopped.  Every pair
also goes, by a hash of its query id (:func:`fastnig.neurons.halves.pair_half`),
to one of two *halves* summed the same way, for the stability estimate of
:mod:`fastnig.neurons.stability` (schemes saved before the halves existed, or
with halves by pair, load without them).

Must not: define neurons or their set algebra (:mod:`fastnig.neurons.sets`),
fuse schemes (:mod:`fastnig.neurons.fusion`) or lay files out on disk
(:mod:`fastnig.neurons.scheme_storage`; :meth:`Scheme.save` /
:meth:`Scheme.load` only pack and unpack).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..common import CorruptFile, PathLike, is_int
from ..data.registry import short_name
from ..engine.encoding import SEGMENTS
from .exact_sums import BIN_EXPONENTS, MAX_PAIRS, bins_value, split_into_bins, zero_bins
from .exemplars import Exemplars
from .halves import HALVES_RULE, halves_kept, pair_half
from .scheme_storage import expect_tensor, read_scheme, scheme_json_path, write_scheme
from .sets import NeuronSet, check_sizes, top_count

LABELS = ("relevant", "non-relevant")
RANK_BY = ("value", "abs")
FUSED_LABEL = "fused"

# --------------------------------------------------------------------- scheme
_COMPARED_META = ("model", "dataset", "label")
_PAIR_TENSORS = ("delta", "f_input", "f_baseline", "num_tokens")
"""Per-pair ``[num_pairs]`` tensors of a pair scheme, saved as ``pair/<name>``."""
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
        dropped_ids: ids of pairs the agreement filter rejected (docs/method.md §6);
            kept so that a resumed run does not re-count them.
        delta, f_input, f_baseline: ``[num_pairs]`` float32 per-pair
            convergence delta and F at the input / baseline; ``num_tokens``
            ``[num_pairs]`` int64.
        extra: free JSON-serialisable metadata (e.g. the data sampling seed,
            and ``stopping``: pairs used and why attribution stopped).
        has_halves: whether the two half sums (pairs split by query) are
            kept (:meth:`half_means`); False for fusions and for files saved
            before halves existed or with the older halves by pair.
        exemplars: per neuron the k pairs of largest |NIG| (:class:`fastnig.neurons.exemplars.Exemplars`;
            None for fusions and files saved before exemplars existed).
        has_segments: whether per-segment sums (query, passage, special;
            ``attribute(..., segments=True)``; fusions: averaged means) are kept (:meth:`segment_means`).
    """

    def __init__(self, sizes: Mapping[str, int], *, model: str, dataset: str, label: str,
                 settings: Optional[Mapping[str, object]] = None, name: Optional[str] = None,
                 extra: Optional[Mapping[str, object]] = None):
        self.sizes = check_sizes(sizes)
        for key, value in (("model", model), ("dataset", dataset)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty str, got {value!r}")
        if label not in LABELS + (FUSED_LABEL,):
            raise ValueError(f"label must be one of {LABELS} (or {FUSED_LABEL!r} for fusions), got {label!r}")
        self.model, self.dataset, self.label = model, dataset, label
        self.settings: Dict[str, object] = dict(settings or {})
        self.extra: Dict[str, object] = dict(extra or {})
        self._name = name
        self._bins = {m: zero_bins(n) for m, n in self.sizes.items()}
        # [2, B, n] exact sums of the pairs of half 0 and half 1 (pair_half); None when not kept.
        self._half_bins: Optional[Dict[str, torch.Tensor]] = {
            m: torch.zeros((2,) + tuple(zero_bins(n).shape), dtype=torch.float64) for m, n in self.sizes.items()}
        # [3, B, n] exact sums per segment (fastnig.engine.encoding.SEGMENTS); None when the attributions had none.
        self._segment_bins: Optional[Dict[str, torch.Tensor]] = None
        self._fused_mean: Optional[Dict[str, torch.Tensor]] = None
        self._fused_segment_mean: Optional[Dict[str, torch.Tensor]] = None  # fusions: [3, n] (fastnig.neurons.fusion)
        self.parts: List[Dict[str, object]] = []  # fused schemes: what was averaged
        self.pair_ids: List[str] = []
        self.dropped_ids: List[str] = []
        self._seen: set = set()
        self.delta = torch.zeros(0, dtype=torch.float32)
        self.f_input = torch.zeros(0, dtype=torch.float32)
        self.f_baseline = torch.zeros(0, dtype=torch.float32)
        self.num_tokens = torch.zeros(0, dtype=torch.long)
        self._ranking: Dict[str, np.ndarray] = {}
        self.exemplars: Optional[Exemplars] = Exemplars(self.sizes)  # per neuron the top-k |NIG| pairs

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
        """``P_<ds>`` / ``N_<ds>`` for pair schemes (docs/method.md §7 abbreviations), or the fusion's name."""
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
        return {m: bins_value(b) for m, b in self._bins.items()}

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

    @property
    def has_halves(self) -> bool:
        """True when the two half sums (pairs split by query) are kept (not for fusions or older files)."""
        return self._fused_mean is None and self._half_bins is not None

    @property
    def has_segments(self) -> bool:
        """True when per-segment means are kept: exact sums (attributions with ``segments=True``) or, for
        a fusion, the average of its parts' segment means (when every part had them)."""
        if self._fused_mean is not None:
            return self._fused_segment_mean is not None
        return self._segment_bins is not None

    def segment_means(self) -> Optional[Dict[str, torch.Tensor]]:
        """module -> ``[3, n]`` float64 mean NIG per segment (query, passage, special), or None.

        None without segment sums (:attr:`has_segments`) or pairs.  The three
        sum to :attr:`mean` up to float64 rounding (each is an exact sum; a
        fusion's are the average of its parts').
        """
        if self._fused_segment_mean is not None:
            return {m: v.clone() for m, v in self._fused_segment_mean.items()}
        if not self.has_segments or not self.pair_ids:
            return None
        return {m: torch.stack([bins_value(b[s]) for s in range(b.shape[0])]) / self.count
                for m, b in self._segment_bins.items()}

    def half_counts(self) -> Tuple[int, int]:
        """Pairs in half 0 and half 1 (:func:`~fastnig.neurons.halves.pair_half` of each pair id)."""
        ones = sum(pair_half(i) for i in self.pair_ids)
        return len(self.pair_ids) - ones, ones

    def half_means(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``([total_neurons], [total_neurons])`` float64 means of half 0 and half 1, or None.

        None when the halves are not kept (:attr:`has_halves`) or one half has
        no pair yet.  Modules are concatenated in ``sizes`` order, as in
        :meth:`mean_vector`.
        """
        if not self.has_halves:
            return None
        counts = self.half_counts()
        if min(counts) == 0:
            return None
        return tuple(torch.cat([bins_value(self._half_bins[m][h]) for m in self.sizes]) / counts[h]
                     for h in (0, 1))

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
        segment_scores = getattr(attributions, "segment_scores", None)
        new_segments = None
        if segment_scores is not None or self._segment_bins is not None:
            if segment_scores is None or (self._segment_bins is None and self.count):
                raise ValueError(f"add: scheme {self.name} and the attributions differ in segments (attribute "
                                 f"with the same segments=)")
            new_segments = {}
            for m, n in self.sizes.items():
                values = segment_scores[m].detach().cpu()
                if values.dim() != 3 or tuple(values.shape[::2]) != (num, n):
                    raise ValueError(f"add: segment_scores[{m!r}] has shape {tuple(values.shape)}, "
                                     f"expected ({num}, segments, {n})")
                old = (self._segment_bins[m] if self._segment_bins is not None else
                       torch.zeros((values.shape[1],) + tuple(zero_bins(n).shape), dtype=torch.float64))
                if old.shape[0] != values.shape[1]:
                    raise ValueError(f"add: segment_scores[{m!r}] has {values.shape[1]} segments, the scheme "
                                     f"{old.shape[0]}")
                new_segments[m] = old + torch.stack([split_into_bins(values[:, s]) for s in range(values.shape[1])])
        new_bins, new_halves = {}, None
        if self._half_bins is None:
            new_bins = {m: self._bins[m] + split_into_bins(scores[m].detach().cpu()) for m in self.sizes}
        else:
            # Bin sums are exact, so half 0 + half 1 is bit for bit the sum over all the pairs.
            half = torch.tensor([pair_half(i) for i in ids], dtype=torch.long)
            new_halves = {}
            for m in self.sizes:
                values = scores[m].detach().cpu()
                parts = torch.stack([split_into_bins(values[half == h]) for h in (0, 1)])
                new_halves[m] = self._half_bins[m] + parts
                new_bins[m] = self._bins[m] + (parts[0] + parts[1])
        exemplars = self.exemplars and self.exemplars.add(scores, self.pair_ids + ids, self.count)
        # Commit only after every check and computation succeeded.
        self.exemplars = exemplars
        if not self.settings:
            self.settings = settings
        self._bins = new_bins
        if new_halves is not None:
            self._half_bins = new_halves
        if new_segments is not None:
            self._segment_bins = new_segments
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
            if not (isinstance(i, str) or is_int(i)):
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
            checks.append(("settings", settings_without_target(self.settings),
                           settings_without_target(other.settings)))
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
        out._half_bins = (None if self._half_bins is None or other._half_bins is None
                          else {m: self._half_bins[m] + other._half_bins[m] for m in self.sizes})
        a, b = self._segment_bins, other._segment_bins
        if (a is None) != (b is None) and (self.count if a is None else other.count):
            raise ValueError(f"cannot merge {self.name} and {other.name}: one keeps segment sums, the other not")
        out._segment_bins = (a if b is None else b if a is None else {m: a[m] + b[m] for m in self.sizes})
        out.pair_ids = self.pair_ids + other.pair_ids
        out.dropped_ids = self.dropped_ids + other.dropped_ids
        out._seen = self._seen | other._seen
        out.delta = torch.cat([self.delta, other.delta])
        out.f_input = torch.cat([self.f_input, other.f_input])
        out.f_baseline = torch.cat([self.f_baseline, other.f_baseline])
        out.num_tokens = torch.cat([self.num_tokens, other.num_tokens])
        out.exemplars = self.exemplars and other.exemplars and self.exemplars.merge(other.exemplars, self.count,
                                                                                    out.pair_ids)
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
        """round(percent / 100 · total neurons), halves rounded up (docs/method.md §6)."""
        return top_count(percent, self.total_neurons)

    def top(self, percent, by: str = "value") -> NeuronSet:
        """The top ``percent`` % of all neurons of the model together (docs/method.md §6).

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

    # -- persistence (the files and their crash safety: fastnig.neurons.scheme_storage)
    def save(self, path: PathLike) -> Path:
        """Atomically write ``<path>.json`` + ``<stem>.<token>.safetensors``; returns the JSON path.

        ``path`` may end in ``.json`` or not.  See :mod:`fastnig.neurons.scheme_storage`
        for why a killed save leaves the previous scheme readable.
        """
        tensors: Dict[str, torch.Tensor] = {}
        if self._fused_mean is not None:
            for m, v in self._fused_mean.items():
                tensors[f"mean/{m}"] = v
            for m, v in (self._fused_segment_mean or {}).items():
                tensors[f"segment_mean/{m}"] = v
        else:
            for m, b in self._bins.items():
                tensors[f"sum_bins/{m}"] = b
            if self._half_bins is not None:
                for m, b in self._half_bins.items():
                    tensors[f"half_bins/{m}"] = b
            if self._segment_bins is not None:
                for m, b in self._segment_bins.items():
                    tensors[f"segment_bins/{m}"] = b
            for t in _PAIR_TENSORS:
                tensors[f"pair/{t}"] = getattr(self, t)
            exemplar_tensors, exemplars = self.exemplars.pack() if self.exemplars is not None else ({}, None)
            tensors.update(exemplar_tensors)
        meta = {**self.describe(), "name": self._name, "display_name": self.name,
                "sizes": [[m, n] for m, n in self.sizes.items()],
                "bin_exponents": list(BIN_EXPONENTS),
                "halves": HALVES_RULE if (self._fused_mean is None and self._half_bins is not None) else None,
                "pair_ids": self.pair_ids, "dropped_ids": self.dropped_ids}
        if self._fused_mean is None and self.exemplars is not None:  # absent in older files: no exemplars
            meta["exemplars"] = exemplars
        if self.has_segments:  # absent in older files: no segments
            meta["segments"] = list(SEGMENTS)
        return write_scheme(path, meta, tensors)

    @classmethod
    def load(cls, path: PathLike) -> "Scheme":
        """Read a scheme written by :meth:`save` (``path`` with or without ``.json``).

        Raises ``FileNotFoundError``, or ``ValueError`` naming the file (:class:`fastnig.common.CorruptFile`
        when it is truncated or damaged; see :func:`fastnig.neurons.scheme_storage.read_scheme`).
        """
        json_path, meta, tensors = read_scheme(path)
        try:
            return cls._unpack(json_path, meta, tensors)
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of the wrong type
            raise CorruptFile(f"scheme {json_path} is damaged: {type(exc).__name__} {exc} while reading it") from None

    @classmethod
    def _unpack(cls, json_path: Path, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> "Scheme":
        sizes = {m: int(n) for m, n in meta["sizes"]}
        scheme = cls(sizes, model=meta["model"], dataset=meta["dataset"], label=meta["label"],
                     settings=meta.get("settings"), name=meta.get("name"), extra=meta.get("extra"))
        if meta.get("segments") and list(meta["segments"]) != list(SEGMENTS):
            raise ValueError(f"scheme {json_path} has segments {meta['segments']!r}, not {list(SEGMENTS)}")
        if meta.get("kind") == "fusion":
            scheme._fused_mean = {m: expect_tensor(tensors, f"mean/{m}", (n,), json_path) for m, n in sizes.items()}
            if meta.get("segments"):
                scheme._fused_segment_mean = {m: expect_tensor(tensors, f"segment_mean/{m}", (len(SEGMENTS), n),
                                                               json_path) for m, n in sizes.items()}
            scheme._half_bins = scheme.exemplars = None
            scheme.parts = list(meta.get("parts", []))
            return scheme
        if list(meta.get("bin_exponents", [])) != list(BIN_EXPONENTS):
            raise ValueError(f"scheme {json_path} was written with other summation bins; re-create it")
        scheme._bins = {m: expect_tensor(tensors, f"sum_bins/{m}", (len(BIN_EXPONENTS), n), json_path)
                        for m, n in sizes.items()}
        if not halves_kept(meta.get("halves"), json_path):  # older file: no stability estimate
            scheme._half_bins = None
        else:
            scheme._half_bins = {m: expect_tensor(tensors, f"half_bins/{m}", (2, len(BIN_EXPONENTS), n), json_path)
                                 for m, n in sizes.items()}
        if meta.get("segments"):
            scheme._segment_bins = {m: expect_tensor(tensors, f"segment_bins/{m}",
                                                     (len(SEGMENTS), len(BIN_EXPONENTS), n), json_path)
                                    for m, n in sizes.items()}
        scheme.pair_ids = [str(i) for i in meta["pair_ids"]]
        scheme.dropped_ids = [str(i) for i in meta["dropped_ids"]]
        scheme._seen = set(scheme.pair_ids) | set(scheme.dropped_ids)
        num = len(scheme.pair_ids)
        for t in _PAIR_TENSORS:
            setattr(scheme, t, expect_tensor(tensors, f"pair/{t}", (num,), json_path))
        scheme.exemplars = Exemplars.unpack(meta.get("exemplars"), tensors, sizes, num,
                                            lambda key, shape: expect_tensor(tensors, key, shape, json_path))
        return scheme

    @staticmethod
    def exists(path: PathLike) -> bool:
        """True when a committed scheme is at ``path`` (resume instead of starting over)."""
        return scheme_json_path(path).is_file()


def settings_without_target(settings: Mapping[str, object]) -> Dict[str, object]:
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
