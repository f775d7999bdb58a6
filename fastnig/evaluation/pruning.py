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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..common import check_int
from ..engine.model import check_model, compute_autocast, model_device, unwrap
from ..engine.rankers import bind_ranker
from ..engine.scoring import relevance_score
from ..neurons.sets import NeuronSet
from .prefix_cache import PrefixCache
from .random_baseline import DEFAULT_REPETITIONS, RandomRuns, RepetitionRule, run_random_baseline
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

DTYPES = ("float32", "bfloat16", "auto")
"""``pruning.dtype``: reranking in fp32, in bf16 autocast, or bf16 where the device has it natively (auto)."""

# Reranking and Table 4 names stay importable from here, where earlier versions had them.
__all__ = ["prune", "pruned", "module_counts", "random_like", "PruningResult", "RandomBaseline", "PruningBenchmark",
           "table_row", "evaluate_pruning", "DEFAULT_REPETITIONS", "CSV_COLUMNS", "PruningTable", "BM25_B",
           "BM25_K1", "DEFAULT_DEPTH", "SIGNIFICANCE_LEVEL", "Candidates", "Comparison", "EncodedCandidates",
           "bm25_index", "bm25_run", "build_candidates", "compare_ndcg", "encode_candidates", "ndcg_at_k",
           "relevance_score", "score_candidates", "RepetitionRule", "RandomRuns", "DTYPES", "native_bf16",
           "rerank_dtype"]


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

    ``ndcg_pruned``, ``drop_percent``, ``p_values``: ``[repetitions]``;
    ``stopped``: why the draws stopped (:meth:`RepetitionRule.stop_reason`:
    ``"fixed"``, ``"precise"``, ``"decided"``, ``"equivalent"`` or ``"max"``).
    """

    num_neurons: int
    seed: int
    ndcg_pruned: np.ndarray
    drop_percent: np.ndarray
    p_values: np.ndarray
    alpha: float = SIGNIFICANCE_LEVEL
    stopped: str = "fixed"

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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 (Ampere and later), or a CPU with
    AVX512-BF16 or AMX-BF16 (``torch.cpu.get_capabilities()``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def rerank_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of pruning's reranking: ``None`` (the weights' dtype, no autocast) for
    ``"float32"`` / ``None``, bf16 for ``"bfloat16"``, and for ``"auto"`` bf16 where :func:`native_bf16`
    (measured to change no Table 4 verdict: docs/pruning.md), else ``None``."""
    if dtype is None or dtype in ("float32", torch.float32):
        return None
    if dtype in ("bfloat16", torch.bfloat16):
        return torch.bfloat16
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    raise ValueError(f"pruning dtype must be one of {list(DTYPES)}, got {dtype!r}")


class PruningBenchmark:
    """Reranking one validation dataset with pruned versions of one model.

    The candidates are tokenised once and the original model's scores
    computed once; every pruned run reuses both and prunes the model in place
    (:func:`pruned`), restoring it afterwards.  Every scoring goes through
    :meth:`score` (one place to change how a model is run).  Two exact
    shortcuts: random-set results are kept per (per-module counts, seed,
    repetition) in :attr:`runs` and shared by every row, and with
    :meth:`prepare` the original model's hidden states at a few layer
    boundaries are kept so that a pruned forward starts at the deepest one
    below the set's lowest pruned layer (:class:`PrefixCache`).

    Args:
        model: the cross-encoder (evaluated on its current device and dtype).
        tokenizer: its fast tokenizer.
        candidates: from :func:`build_candidates`.
        batch_size: pairs per forward pass.
        max_length: tokens of a pair encoding (:func:`fastnig.engine.model.resolve_max_length`).
        k: the nDCG cutoff (10).
        alpha: significance level of the paired t-test (0.05).
        progress: show progress bars.
        dtype: ``"float32"`` (default), ``"bfloat16"`` (autocast) or ``"auto"`` (:func:`rerank_dtype`).
        prefix: reuse the unpruned prefix (when :meth:`prepare` is called; exact).
        runs: the store of random-set results (default: a new in-memory one).
        ranker: how the model scores a pair (as for :func:`fastnig.attribute`; ``None``:
            from the model's class).  Prefix reuse applies to cross-encoders scored by
            their own pair encoding; other rankers always run the full forward.
    """

    def __init__(self, model: nn.Module, tokenizer, candidates: Candidates, batch_size: int = 32,
                 max_length: Optional[int] = None, k: int = 10, alpha: float = SIGNIFICANCE_LEVEL,
                 progress: bool = True, dtype: Union[str, torch.dtype, None] = None, prefix: bool = True,
                 runs: Optional[RandomRuns] = None, ranker=None):
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
        bound = bind_ranker(ranker, model, tokenizer)
        self.encoded = encode_candidates(tokenizer, candidates, bound.max_length(max_length), batch_size,
                                         bound).to(model_device(model))
        self.dtype = rerank_dtype(dtype, model_device(model))
        self.prefix = PrefixCache(model, enabled=prefix and self.encoded.ranker is None)
        self.runs = runs if runs is not None else RandomRuns()
        self.forwards: Dict[int, int] = {}  # start layer -> rerankings run from it (the work done)
        self._original_scores: Optional[np.ndarray] = None
        self._original_ndcg: Optional[np.ndarray] = None

    @property
    def name(self) -> str:
        return self.candidates.name

    def prepare(self, neuron_sets: Sequence[Any], repetitions: Union[int, Mapping, RepetitionRule] = 1) -> List[int]:
        """Choose the layer boundaries to cache for these sets (each to be reranked once and with up to
        ``repetitions`` random sets of the same modules), before the original model is scored.

        Returns:
            the boundaries (layer indices) whose hidden states :attr:`original_scores` will keep.
        """
        weight = 1 + RepetitionRule.parse(repetitions).max
        starts = [self.prefix.lowest_layer(list(module_counts(s))) for s in neuron_sets for _ in range(weight)]
        chosen = self.prefix.choose(starts, self.encoded.batches)
        if chosen and self._original_scores is not None:
            self._original_scores = None  # scored again, keeping the hidden states
        return chosen

    @property
    def original_scores(self) -> np.ndarray:
        """``[num_pairs]`` scores of the unpruned model (computed once; keeps the prefix cache's states)."""
        if self._original_scores is None:
            with self.prefix.capturing():
                self._original_scores = self.scored_from(f"{self.name}: original", 0)
        return self._original_scores

    def score(self, desc: str) -> np.ndarray:
        """``[num_pairs]`` scores of the model as it is now (pruned or not): the one place a model is run."""
        return score_candidates(self.model, self.encoded, self.progress, desc=desc)

    def scored_from(self, desc: str, start: int) -> np.ndarray:
        """``[num_pairs]`` scores of the model as it is now, in the benchmark's dtype, its forward started at layer
        ``start`` from the prefix cache (0: the full forward; a caller that changed the model below ``start``
        would get wrong scores — :meth:`pruned_scores` picks ``start``).  Counted in :attr:`forwards`."""
        with ExitStack() as stack:
            stack.enter_context(compute_autocast(model_device(self.model), self.dtype))
            stack.enter_context(self.prefix.starting_at(start))
            scores = self.score(desc)
        self.forwards[start] = self.forwards.get(start, 0) + 1
        return scores

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

    def pruned_scores(self, neuron_set, desc: str = "pruned", prefix: bool = True) -> np.ndarray:
        """``[num_pairs]`` scores with ``neuron_set`` pruned (the original's for an empty set); with
        ``prefix``, from the deepest cached boundary below its lowest pruned layer (same scores)."""
        counts = module_counts(neuron_set)
        if not counts:
            _resolve(self.model, neuron_set)  # still validate the set against the model
            return self.original_scores
        self.original_scores  # noqa: B018 (the prefix states are taken from the unpruned model)
        start = self.prefix.start_for(list(counts)) if prefix else 0
        with pruned(self.model, neuron_set):
            return self.scored_from(f"{self.name}: {desc}", start)

    def evaluate(self, neuron_set) -> PruningResult:
        """nDCG@k with ``neuron_set`` pruned vs the original model."""
        original = self.original_ndcg
        label = str(getattr(neuron_set, "name", "") or "set")
        pruned_ndcg = self.ndcg(self.pruned_scores(neuron_set, desc=label))
        return PruningResult(label, sum(module_counts(neuron_set).values()),
                             compare_ndcg(original, pruned_ndcg, self.alpha), original, pruned_ndcg)

    def random_baseline(self, neuron_set, repetitions: Union[int, Mapping, RepetitionRule] = DEFAULT_REPETITIONS,
                        seed: int = 0, result: Optional[PruningResult] = None) -> RandomBaseline:
        """Prune random sets drawn with :func:`random_like` (same per-module counts), repetition 0, 1, ...

        ``repetitions``: a number (fixed) or a :class:`RepetitionRule` / its
        config mapping (adaptive: stops when the random mean is precise
        enough or, given the set's ``result``, the comparison is decided).
        Results are shared through :attr:`runs`, so rows with identical
        per-module counts pay once per repetition.
        """
        rule = RepetitionRule.parse(repetitions)
        seed = check_int("seed", seed, 0)
        original = self.original_ndcg
        signature = tuple(module_counts(neuron_set).items())

        def per_query(r: int) -> np.ndarray:
            def compute():
                random_set = random_like(neuron_set, seed, r)
                return self.ndcg(self.pruned_scores(random_set, desc=f"random {r + 1}/{rule.max}"))
            return self.runs.get_or_compute(signature, seed, r, compute)

        set_points = 100.0 * result.comparison.ndcg_pruned if result is not None else None
        results, reason = run_random_baseline(per_query, rule, set_points)
        comparisons = [compare_ndcg(original, r, self.alpha) for r in results]
        return RandomBaseline(sum(module_counts(neuron_set).values()), seed,
                              np.array([c.ndcg_pruned for c in comparisons]),
                              np.array([c.drop_percent for c in comparisons]),
                              np.array([c.p_value for c in comparisons]), self.alpha, reason)


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
                     groups: Optional[Mapping[str, str]] = None,
                     repetitions: Union[int, Mapping, RepetitionRule] = DEFAULT_REPETITIONS,
                     seed: int = 0, batch_size: int = 32, max_length: Optional[int] = None, k: int = 10,
                     alpha: float = SIGNIFICANCE_LEVEL, progress: bool = True,
                     dtype: Union[str, torch.dtype, None] = None, prefix: bool = True,
                     ranker=None) -> "PruningTable":
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
        repetitions: random sets per (set, level) (the paper: 50), or a
            :class:`RepetitionRule` / ``{max: 50, stop_when: {...}}`` (adaptive);
            the same random sets are used on every dataset, and sets with
            identical per-module counts share their random runs.
        seed: seed of the random baseline.
        dtype: reranking dtype (:func:`rerank_dtype`).
        prefix: reuse the unpruned prefix (exact; :class:`PrefixCache`).
        ranker: how the model scores a pair (:class:`PruningBenchmark`).
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
    rule = RepetitionRule.parse(repetitions)
    plan = [(name, _level_key(level), nset) for name, by_level in neuron_sets.items()
            for level, nset in by_level.items()]
    rows = []
    for dataset_name, data in datasets.items():
        bench = data if isinstance(data, PruningBenchmark) else PruningBenchmark(
            model, tokenizer, data, batch_size, max_length, k, alpha, progress, dtype=dtype, prefix=prefix,
            ranker=ranker)
        bench.prepare([nset for _, _, nset in plan], rule)
        bench.original_ndcg  # noqa: B018 (computed once, before any pruning)
        bench.progress = False  # then one bar per dataset below instead of one per reranking
        for set_name, level, nset in tqdm(plan, desc=f"{dataset_name}: sets x levels", unit="set",
                                          disable=not progress):
            result = bench.evaluate(nset)
            rows.append(table_row(bench, set_name, level, result, bench.random_baseline(nset, rule, seed, result),
                                  group=groups.get(dataset_name, dataset_name), dataset=dataset_name))
        del bench
    return PruningTable(rows)
