"""Pruning: do the neurons NIG finds matter for ranking? (docs/method.md §8, the paper's Table 4)

Owns: model surgery (:func:`prune` returns a pruned deep copy; :func:`pruned`
zeroes the same rows in place and restores them bit for bit on exit), the
random baseline (:func:`random_like`: as many neurons in every module, from a
seed), and the benchmark that reranks one dataset with pruned versions of one
model (:class:`PruningBenchmark`, :func:`evaluate_pruning` -> Table 4).
Pruning a neuron = zeroing its weight row and bias entry, so its output is
exactly 0 for every input.

Must not: tokenise, score or compute metrics itself (:mod:`fastnig.evaluation.reranking`)
or lay out the table (:mod:`fastnig.evaluation.table4`).

A *neuron set* is any object with ``sizes`` (module name -> out_features,
the universe, model order), ``name`` and ``by_module()`` (module name ->
sorted unit indices), such as :class:`fastnig.neurons.sets.NeuronSet`.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..common import check_int
from ..engine.model import check_model, model_device, resolve_max_length, unwrap
from ..engine.scoring import relevance_score
from ..neurons.sets import NeuronSet
from .reranking import (
    BM25_B,
    BM25_K1,
    DEFAULT_DEPTH,
    SIGNIFICANCE_LEVEL,
    Candidates,
    Comparison,
    EncodedCandidates,
    bm25_index,
    bm25_run,
    build_candidates,
    compare_ndcg,
    encode_candidates,
    ndcg_at_k,
    score_candidates,
)
from .table4 import CSV_COLUMNS, PruningTable

DEFAULT_REPETITIONS = 50

# Reranking and Table 4 names stay importable from here, where earlier versions had them.
__all__ = ["prune", "pruned", "module_counts", "random_like", "PruningResult", "RandomBaseline", "PruningBenchmark",
           "table_row", "evaluate_pruning", "DEFAULT_REPETITIONS", "CSV_COLUMNS", "PruningTable", "BM25_B",
           "BM25_K1", "DEFAULT_DEPTH", "SIGNIFICANCE_LEVEL", "Candidates", "Comparison", "EncodedCandidates",
           "bm25_index", "bm25_run", "build_candidates", "compare_ndcg", "encode_candidates", "ndcg_at_k",
           "relevance_score", "score_candidates"]


# ============================================================ surgery
def _neuron_members(neuron_set) -> Dict[str, torch.Tensor]:
    if not hasattr(neuron_set, "by_module"):
        raise TypeError("neuron_set must be a fastnig NeuronSet (an object with by_module() and sizes), "
                        f"got {type(neuron_set).__name__}")
    return {name: torch.as_tensor(idx, dtype=torch.long).flatten() for name, idx in neuron_set.by_module().items()}


def _resolve(model: nn.Module, neuron_set) -> List[Tuple[str, nn.Linear, torch.Tensor]]:
    """(name, Linear, unit indices) for every module with selected neurons; validates against the model."""
    check_model(model)
    members = _neuron_members(neuron_set)
    modules = dict(model.named_modules())
    sizes = dict(getattr(neuron_set, "sizes", None) or {})
    for name in list(sizes) + [n for n in members if n not in sizes]:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            sample = ", ".join([n for n, m in modules.items() if isinstance(m, nn.Linear)][:3])
            raise ValueError(f"neuron_set: {name!r} is not an nn.Linear module of this model (its Linear modules "
                             f"are named like {sample}); was the set built for another model?")
        if name in sizes and int(sizes[name]) != module.out_features:
            raise ValueError(f"neuron_set: module {name} has {sizes[name]} neurons in the set's universe but "
                             f"{module.out_features} in this model; the set was built for another model")
    resolved = []
    for name, idx in members.items():
        if idx.numel() == 0:
            continue
        module = modules[name]
        if int(idx.min()) < 0 or int(idx.max()) >= module.out_features:
            raise ValueError(f"neuron_set: module {name} has unit indices outside 0..{module.out_features - 1}")
        resolved.append((name, module, torch.unique(idx)))
    return resolved


def _zero_rows(targets: Sequence[Tuple[str, nn.Linear, torch.Tensor]]) -> None:
    with torch.no_grad():
        for _, module, idx in targets:
            idx = idx.to(module.weight.device)
            module.weight[idx] = 0
            if module.bias is not None:
                module.bias[idx] = 0


def prune(model: nn.Module, neuron_set) -> nn.Module:
    """A deep copy of ``model`` whose selected neurons output exactly 0 for every input.

    Each selected unit's weight row and bias entry are zeroed in the copy;
    ``model`` is left untouched.  For many evaluations of one model prefer
    :func:`pruned`, which avoids the copy.

    Args:
        model: the cross-encoder.
        neuron_set: a NeuronSet over the model's Linear modules (``sizes`` must
            match the model's ``out_features``).
    Returns:
        the pruned copy (same device, dtype and train/eval mode).
    """
    targets = _resolve(model, neuron_set)
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    _zero_rows([(name, modules[name], idx) for name, _, idx in targets])
    return clone


@contextmanager
def pruned(model: nn.Module, neuron_set) -> Iterator[nn.Module]:
    """Prune ``model`` in place for the duration of a ``with`` block.

    Zeroes the selected weight rows and bias entries (so the neurons output
    exactly 0) and, on exit, even after an exception, writes the saved values
    back, so the model is bit-for-bit what it was.  Costs a copy of the
    selected rows only: the fast path for the 50 random repetitions.

    Yields:
        ``model`` itself, pruned.
    """
    targets = _resolve(model, neuron_set)
    saved = []
    try:
        with torch.no_grad():
            for _, module, idx in targets:
                idx = idx.to(module.weight.device)
                bias = None if module.bias is None else module.bias[idx].clone()
                saved.append((module, idx, module.weight[idx].clone(), bias))
        _zero_rows(targets)
        yield model
    finally:
        with torch.no_grad():
            for module, idx, weight, bias in reversed(saved):
                module.weight[idx] = weight
                if bias is not None:
                    module.bias[idx] = bias


# ==================================================== random baseline
def module_counts(neuron_set) -> Dict[str, int]:
    """Module name -> number of selected neurons (modules with none omitted), in model order."""
    members = {n: int(idx.numel()) for n, idx in _neuron_members(neuron_set).items() if idx.numel()}
    order = list(getattr(neuron_set, "sizes", {}) or {})
    return {n: members[n] for n in order + sorted(set(members) - set(order)) if n in members}


def random_like(neuron_set, seed: int = 0, repetition: int = 0, name: Optional[str] = None):
    """A random neuron set with the same number of neurons in every module (layer + component).

    Within each module the units are drawn uniformly without replacement.
    The draw depends only on ``(seed, repetition)`` and the set's per-module
    counts, so repetition ``r`` is the same whatever the number of
    repetitions, and the same random sets are used on every dataset.

    Returns:
        a NeuronSet (the class of ``neuron_set``) over the same universe.
    """
    seed = check_int("seed", seed, 0)
    repetition = check_int("repetition", repetition, 0)
    sizes = dict(getattr(neuron_set, "sizes", None) or {})
    counts = module_counts(neuron_set)
    missing = [m for m in counts if m not in sizes]
    if missing:
        raise ValueError(f"neuron_set: modules {missing[:3]} are not in its sizes (the universe)")
    rng = np.random.default_rng([seed, repetition])
    members = {}
    for module, size in sizes.items():
        if counts.get(module):
            members[module] = np.sort(rng.choice(int(size), size=counts[module], replace=False)).tolist()
    label = name if name is not None else f"random({getattr(neuron_set, 'name', '') or 'set'})#{repetition}"
    kind = type(neuron_set) if hasattr(type(neuron_set), "from_indices") else NeuronSet
    return kind.from_indices(members, sizes, name=label)


# ========================================================== benchmark
@dataclass
class PruningResult:
    """One neuron set on one dataset.

    ``per_query_original`` / ``per_query_pruned``: ``[num_queries]`` nDCG@k.
    """

    name: str
    num_neurons: int
    comparison: Comparison
    per_query_original: np.ndarray
    per_query_pruned: np.ndarray

    @property
    def drop_percent(self) -> float:
        return self.comparison.drop_percent

    @property
    def p_value(self) -> float:
        return self.comparison.p_value

    @property
    def significant(self) -> bool:
        return self.comparison.significant


@dataclass
class RandomBaseline:
    """Random sets matching a neuron set's per-module counts, one result per repetition.

    ``ndcg_pruned``, ``drop_percent``, ``p_values``: ``[repetitions]``.
    """

    num_neurons: int
    seed: int
    ndcg_pruned: np.ndarray
    drop_percent: np.ndarray
    p_values: np.ndarray
    alpha: float = SIGNIFICANCE_LEVEL

    @property
    def repetitions(self) -> int:
        return int(self.drop_percent.size)

    @property
    def mean_drop(self) -> float:
        return float(self.drop_percent.mean()) if self.repetitions else math.nan

    @property
    def std_drop(self) -> float:
        """Sample standard deviation (ddof=1) of the drop over repetitions; 0 for one repetition."""
        return float(self.drop_percent.std(ddof=1)) if self.repetitions > 1 else 0.0

    @property
    def num_significant(self) -> int:
        return int(np.sum(self.p_values <= self.alpha))


class PruningBenchmark:
    """Reranking one validation dataset with pruned versions of one model.

    The candidates are tokenised once and the original model's scores
    computed once; every pruned run reuses both and prunes the model in place
    (:func:`pruned`), restoring it afterwards.

    Args:
        model: the cross-encoder (evaluated on its current device and dtype).
        tokenizer: its fast tokenizer.
        candidates: from :func:`build_candidates`.
        batch_size: pairs per forward pass.
        max_length: tokens of a pair encoding (:func:`fastnig.engine.model.resolve_max_length`).
        k: the nDCG cutoff (10).
        alpha: significance level of the paired t-test (0.05).
        progress: show progress bars.
    """

    def __init__(self, model: nn.Module, tokenizer, candidates: Candidates, batch_size: int = 32,
                 max_length: Optional[int] = None, k: int = 10, alpha: float = SIGNIFICANCE_LEVEL,
                 progress: bool = True):
        if not isinstance(candidates, Candidates):
            raise TypeError(f"candidates must be a fastnig.evaluation.reranking.Candidates, "
                            f"got {type(candidates).__name__}")
        if candidates.num_pairs == 0:
            raise ValueError(f"dataset {candidates.name}: there are no candidate passages to rerank")
        model, tokenizer = unwrap(model, tokenizer)
        self.model = model
        self.candidates = candidates
        self.k, self.alpha, self.progress = k, alpha, progress
        self.qids = list(candidates.queries)
        self.pairs = candidates.pairs()
        max_length = resolve_max_length(model, tokenizer, max_length)
        self.encoded = encode_candidates(tokenizer, candidates, max_length, batch_size).to(model_device(model))
        self._original_scores: Optional[np.ndarray] = None
        self._original_ndcg: Optional[np.ndarray] = None

    @property
    def name(self) -> str:
        return self.candidates.name

    @property
    def original_scores(self) -> np.ndarray:
        """``[num_pairs]`` scores of the unpruned model (computed once)."""
        if self._original_scores is None:
            self._original_scores = self.score(desc=f"{self.name}: original")
        return self._original_scores

    def score(self, desc: str) -> np.ndarray:
        """``[num_pairs]`` scores of the model as it is now (pruned or not)."""
        return score_candidates(self.model, self.encoded, self.progress, desc=desc)

    @property
    def original_ndcg(self) -> np.ndarray:
        """``[num_queries]`` nDCG@k of the unpruned model."""
        if self._original_ndcg is None:
            self._original_ndcg = self.ndcg(self.original_scores)
        return self._original_ndcg

    def run(self, scores: np.ndarray) -> Dict[str, Dict[str, float]]:
        """qid -> doc id -> score, from ``[num_pairs]`` scores."""
        out: Dict[str, Dict[str, float]] = {q: {} for q in self.qids}
        for (q, d), s in zip(self.pairs, scores):
            out[q][d] = float(s)
        return out

    def ndcg(self, scores: np.ndarray) -> np.ndarray:
        """``[num_queries]`` nDCG@k of the reranking given by ``scores``."""
        per_query = ndcg_at_k(self.run(scores), self.candidates.qrels, self.k)
        return np.array([per_query[q] for q in self.qids], dtype=np.float64)

    def pruned_scores(self, neuron_set, desc: str = "pruned") -> np.ndarray:
        """``[num_pairs]`` scores with ``neuron_set`` pruned (the original's for an empty set)."""
        if not module_counts(neuron_set):
            _resolve(self.model, neuron_set)  # still validate the set against the model
            return self.original_scores
        with pruned(self.model, neuron_set):
            return self.score(desc=f"{self.name}: {desc}")

    def evaluate(self, neuron_set) -> PruningResult:
        """nDCG@k with ``neuron_set`` pruned vs the original model."""
        original = self.original_ndcg
        label = str(getattr(neuron_set, "name", "") or "set")
        pruned_ndcg = self.ndcg(self.pruned_scores(neuron_set, desc=label))
        return PruningResult(label, sum(module_counts(neuron_set).values()),
                             compare_ndcg(original, pruned_ndcg, self.alpha), original, pruned_ndcg)

    def random_baseline(self, neuron_set, repetitions: int = DEFAULT_REPETITIONS, seed: int = 0
                        ) -> RandomBaseline:
        """Prune ``repetitions`` random sets drawn with :func:`random_like` (same per-module counts)."""
        check_int("repetitions", repetitions, 1)
        seed = check_int("seed", seed, 0)
        original = self.original_ndcg
        ndcg, drops, p_values = [], [], []
        for r in range(repetitions):
            random_set = random_like(neuron_set, seed, r)
            pruned_ndcg = self.ndcg(self.pruned_scores(random_set, desc=f"random {r + 1}/{repetitions}"))
            comparison = compare_ndcg(original, pruned_ndcg, self.alpha)
            ndcg.append(comparison.ndcg_pruned)
            drops.append(comparison.drop_percent)
            p_values.append(comparison.p_value)
        return RandomBaseline(sum(module_counts(neuron_set).values()), seed, np.array(ndcg), np.array(drops),
                              np.array(p_values), self.alpha)


# ============================================================== Table 4
def _level_key(level) -> float:
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"pruning levels must be numbers (percent of all neurons), got {level!r}") from None
    if not 0 < value <= 100:
        raise ValueError(f"pruning levels must be in (0, 100] (percent of all neurons), got {level!r}")
    return value


def table_row(bench: "PruningBenchmark", set_name: str, level: float, result: "PruningResult",
              rand: "RandomBaseline", group: Optional[str] = None, dataset: Optional[str] = None) -> Dict[str, Any]:
    """One row of Table 4 (:data:`CSV_COLUMNS`): a set at a level on one dataset, and its random baseline."""
    c = result.comparison
    dataset = dataset or bench.name
    return {
        "set": set_name, "level_percent": _level_key(level), "dataset": dataset, "group": group or dataset,
        "num_neurons": result.num_neurons, "num_queries": len(bench.qids),
        "num_candidates": bench.candidates.num_pairs, "ndcg_original": c.ndcg_original,
        "ndcg_pruned": c.ndcg_pruned, "drop_percent": c.drop_percent, "p_value": c.p_value,
        "significant": c.significant, "random_repetitions": rand.repetitions,
        "random_ndcg_mean": float(rand.ndcg_pruned.mean()), "random_drop_mean": rand.mean_drop,
        "random_drop_std": rand.std_drop, "random_significant": rand.num_significant,
    }


def evaluate_pruning(model: nn.Module, tokenizer, neuron_sets: Mapping[str, Mapping[float, Any]],
                     datasets: Mapping[str, Union[Candidates, PruningBenchmark]],
                     groups: Optional[Mapping[str, str]] = None, repetitions: int = DEFAULT_REPETITIONS,
                     seed: int = 0, batch_size: int = 32, max_length: Optional[int] = None, k: int = 10,
                     alpha: float = SIGNIFICANCE_LEVEL, progress: bool = True) -> "PruningTable":
    """The paper's Table 4: every neuron set x pruning level x dataset, with its random baseline.

    Args:
        model, tokenizer: the cross-encoder and its fast tokenizer.
        neuron_sets: set name (e.g. ``"P_ms"``) -> pruning level in percent
            (e.g. ``0.1``) -> NeuronSet.
        datasets: dataset name -> its :class:`Candidates` (or a ready
            :class:`PruningBenchmark`); evaluated one after the other.
        groups: dataset name -> table row label; datasets sharing a label are
            averaged into one row with the count of significant ones (e.g. the
            five LoTTE domains -> ``"LoTTE benchmark"``).  Default: each
            dataset its own row.
        repetitions: random sets per (set, level) (the paper: 50); the same
            random sets are used on every dataset, and sets with identical
            per-module counts share their random runs.
        seed: seed of the random baseline.
    Returns:
        a :class:`PruningTable` with one row per set x level x dataset.
    """
    if not neuron_sets:
        raise ValueError("neuron_sets is empty: give {set name: {level: NeuronSet}}")
    if not datasets:
        raise ValueError("datasets is empty: give {dataset name: Candidates}")
    groups = dict(groups or {})
    unknown = [g for g in groups if g not in datasets]
    if unknown:
        raise ValueError(f"groups names datasets that are not in datasets: {unknown}")
    plan = [(name, _level_key(level), nset) for name, by_level in neuron_sets.items()
            for level, nset in by_level.items()]
    rows = []
    for dataset_name, data in datasets.items():
        bench = data if isinstance(data, PruningBenchmark) else PruningBenchmark(
            model, tokenizer, data, batch_size, max_length, k, alpha, progress)
        bench.original_ndcg  # noqa: B018 (computed once, before any pruning)
        bench.progress = False  # then one bar per dataset below instead of one per reranking
        random_cache: Dict[Tuple, RandomBaseline] = {}
        for set_name, level, nset in tqdm(plan, desc=f"{dataset_name}: sets x levels", unit="set",
                                          disable=not progress):
            result = bench.evaluate(nset)
            signature = tuple(module_counts(nset).items())
            if signature not in random_cache:
                random_cache[signature] = bench.random_baseline(nset, repetitions, seed)
            rows.append(table_row(bench, set_name, level, result, random_cache[signature],
                                  group=groups.get(dataset_name, dataset_name), dataset=dataset_name))
        del bench
    return PruningTable(rows)
