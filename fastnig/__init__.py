"""fastnig: Neuron Integrated Gradients for the neurons of neural rankers.

The pipeline, one module per stage:
``kernels`` (fused op + reference) -> ``attribution`` (:func:`attribute`) ->
``models`` / ``data`` (cross-encoders, labelled pairs) -> ``schemes``
(P_x / N_x, top-X %, ∩, ⊕) -> ``analysis`` (figures, tables) -> ``pruning``
(Table 4) -> ``pipeline`` (resumable jobs) -> ``cli``.

Heavy optional dependencies (ir_datasets, ranx, matplotlib, safetensors) are
imported only when the stage that needs them runs.
"""
from .attribution import Attributions, attribute, linear_modules, relevance_probability, target_function
from .data import (DATASETS, Collection, DatasetUnavailable, LabelledPair, MissingJudgments, filter_agreeing,
                   load_collection, sample_pairs)
from .kernels import accumulate_conductance, accumulate_conductance_ref
from .pruning import (Candidates, PruningBenchmark, PruningTable, build_candidates, evaluate_pruning, ndcg_at_k,
                      prune, pruned, random_like)
from .schemes import (COMPONENTS, NeuronSet, Scheme, component, fuse, fuse_all, intersection, layer_index,
                      neuron_universe, union)

__all__ = [
    "Attributions", "attribute", "linear_modules", "relevance_probability", "target_function",
    "accumulate_conductance", "accumulate_conductance_ref",
    "DATASETS", "Collection", "DatasetUnavailable", "LabelledPair", "MissingJudgments", "filter_agreeing",
    "load_collection", "sample_pairs",
    "COMPONENTS", "NeuronSet", "Scheme", "component", "fuse", "fuse_all", "intersection", "layer_index",
    "neuron_universe", "union",
    "Candidates", "PruningBenchmark", "PruningTable", "build_candidates", "evaluate_pruning", "ndcg_at_k", "prune",
    "pruned", "random_like",
]
__version__ = "0.1.0"
