"""fastnig: Neuron Integrated Gradients for the neurons of neural rankers.

The pipeline, one module per stage (README "Layout"): engine
(``kernels``, ``first_token``, ``cross_encoder``, ``attribution``) -> data
(``models``, ``data``) -> schemes and neuron sets (``neurons``, ``schemes``,
``set_expressions``, ``analysis``) -> pruning (``reranking``, ``pruning``) ->
study (``report``, ``config``, ``distributed``, ``pipeline``) -> ``cli``.
This module only re-exports the public API.

Heavy optional dependencies (ir_datasets, ranx, bm25s, matplotlib,
safetensors) are imported only when the stage that needs them runs; a
missing one stops with the ``pip install "fastnig[ir]"`` that fixes it.
"""
from .attribution import Attributions, attribute, linear_modules
from .cross_encoder import relevance_probability, target_function
from .data import (DATASETS, Collection, DatasetUnavailable, LabelledPair, MissingJudgments, filter_agreeing,
                   load_collection, sample_pairs)
from .kernels import accumulate_conductance, accumulate_conductance_ref
from .pruning import PruningBenchmark, evaluate_pruning, prune, pruned, random_like
from .report import PruningTable
from .reranking import Candidates, build_candidates, ndcg_at_k
from .fusion import fuse, fuse_all
from .schemes import (COMPONENTS, NeuronSet, Scheme, component, intersection, layer_index,
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
