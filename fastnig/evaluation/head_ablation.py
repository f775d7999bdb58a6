"""Head ablation, evaluated like Table 4: nDCG@10 drop of the top heads vs as many random heads.

Owns: :func:`ablated_heads` (zero each chosen head's slice of its output
projection's input — done as zeroing the projection's weight columns of that
slice, which is the same map; restored afterwards), :func:`random_heads` and
:func:`evaluate_head_ablation`, which reranks one validation set through a
:class:`fastnig.evaluation.pruning.PruningBenchmark` (its candidates, scoring
and nDCG) with the heads ablated, with ``repetitions`` seeded random sets of as
many heads, and compares them (docs/method.md §12).

Must not: choose the heads (schemes, :func:`fastnig.attribute` with ``heads=True``) or write files.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, MutableMapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..common import optional_import
from ..engine.heads import output_projections
from .pruning import PruningBenchmark
from .reranking import Comparison, compare_ndcg

Head = Tuple[str, int]
"""(attention output projection name, head index), as in ``Attributions.head_scores``."""


def _slices(model: nn.Module, heads: Sequence[Head]) -> List[Tuple[nn.Linear, slice]]:
    projections = output_projections(model)
    out = []
    for name, h in heads:
        if name not in projections:
            raise ValueError(f"head ({name!r}, {h}): not an attention output projection of the model")
        module, count = projections[name]
        if not 0 <= int(h) < count:
            raise ValueError(f"head ({name!r}, {h}): the layer has {count} heads")
        width = module.in_features // count
        out.append((module, slice(int(h) * width, (int(h) + 1) * width)))
    return out


@contextmanager
def ablated_heads(model: nn.Module, heads: Sequence[Head]) -> Iterator[nn.Module]:
    """Inside the block the heads' outputs are zeroed (their output projection's input slice): the weight columns
    of those slices are zero, restored exactly on exit."""
    saved = []
    with torch.no_grad():
        for module, cols in _slices(model, heads):
            saved.append((module, cols, module.weight[:, cols].clone()))
            module.weight[:, cols] = 0
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, cols, weight in reversed(saved):
                module.weight[:, cols] = weight


def random_heads(model: nn.Module, count: int, seed: int = 0, repetition: int = 0) -> List[Head]:
    """``count`` heads drawn uniformly without replacement over all heads of the model, seeded by (seed, repetition)."""
    every = [(name, h) for name, (_, n) in output_projections(model).items() for h in range(n)]
    if count > len(every):
        raise ValueError(f"{count} heads asked, the model has {len(every)}")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(repetition))
    picked = torch.randperm(len(every), generator=generator)[:count].tolist()
    return [every[i] for i in sorted(picked)]


@dataclass
class HeadAblation:
    """The top heads ablated vs ``repetitions`` random sets of as many heads, on one dataset.

    ``top``: the top heads vs the original model (drop %, paired t-test over queries); ``random_drops``:
    ``[repetitions]`` drop % of each random set; ``versus_random``: the top heads' per-query nDCG against the
    per-query mean nDCG over the random sets (paired t-test; drop % = how much more the top heads cost)."""

    dataset: str
    heads: List[Head]
    top: Comparison
    random_drops: np.ndarray
    versus_random: Comparison

    def row(self) -> Dict[str, object]:
        return {"dataset": self.dataset, "heads": len(self.heads), "ndcg_original": self.top.ndcg_original,
                "ndcg_top_ablated": self.top.ndcg_pruned, "drop_top_percent": self.top.drop_percent,
                "p_top": self.top.p_value, "drop_random_mean_percent": float(self.random_drops.mean()),
                "drop_random_std_percent": float(self.random_drops.std(ddof=1)) if self.random_drops.size > 1
                else 0.0, "repetitions": int(self.random_drops.size),
                "ndcg_random_ablated": self.versus_random.ndcg_original, "p_top_vs_random": self.versus_random.p_value,
                "significant_vs_random": bool(self.versus_random.significant)}


def ablated_ndcg(bench: PruningBenchmark, heads: Sequence[Head], desc: str) -> np.ndarray:
    """``[queries]`` nDCG@k of ``bench``'s reranking with ``heads`` ablated, scored as the benchmark scores a
    pruned model (its dtype; from the deepest cached layer boundary at or below the lowest ablated layer, whose
    hidden states the ablation cannot change)."""
    bench.original_scores  # noqa: B018 (the original model's scores, and the prefix states, come first)
    start = bench.prefix.start_for(sorted({name for name, _ in heads}))
    with ablated_heads(bench.model, heads):
        return bench.ndcg(bench.scored_from(f"{bench.name}: {desc}", start))


def evaluate_head_ablation(bench: PruningBenchmark, heads: Sequence[Head], repetitions: int = 10,
                           seed: int = 0, random_runs: Optional[MutableMapping] = None) -> HeadAblation:
    """nDCG@k of ``bench``'s reranking with ``heads`` ablated, and with ``repetitions`` random sets of as many.

    ``random_runs``: a dict shared between calls: the per-query nDCG of each random set, keyed by (bench,
    number of heads, seed, repetition), so that sets of the same size rerank their random sets once."""
    optional_import("scipy.stats", "for the paired t-test")
    heads = [(str(n), int(h)) for n, h in heads]
    original = bench.original_ndcg
    top = ablated_ndcg(bench, heads, f"{len(heads)} top heads ablated")
    random_runs = {} if random_runs is None else random_runs
    randoms = []
    for r in range(repetitions):
        key = (bench.name, len(heads), int(seed), r)
        if key not in random_runs:
            random_runs[key] = ablated_ndcg(bench, random_heads(bench.model, len(heads), seed, r),
                                            f"{len(heads)} random heads, repetition {r}")
        randoms.append(random_runs[key])
    drops = np.array([compare_ndcg(original, x, bench.alpha).drop_percent for x in randoms])
    mean_random = np.mean(randoms, axis=0) if randoms else original
    return HeadAblation(bench.name, heads, compare_ndcg(original, top, bench.alpha), drops,
                        compare_ndcg(mean_random, top, bench.alpha))


__all__ = ("Head", "HeadAblation", "ablated_heads", "ablated_ndcg", "evaluate_head_ablation", "random_heads")
