"""fastnig: Neuron Integrated Gradients for the neurons of neural rankers.

The package is layered; each layer imports only the layers below it (a test
checks it, docs/architecture.md has the map):

- :mod:`fastnig.engine` — the one-pass attribution of every Linear neuron
  (kernels, path, memory, pair encoding, scoring, model loading);
- :mod:`fastnig.data` — IR collections, pairs, labels;
- :mod:`fastnig.neurons` — neuron sets, schemes, fusion, stability, set expressions;
- :mod:`fastnig.evaluation` — reranking, pruning, Tables 1 and 4 (what is measured);
- :mod:`fastnig.analysis` — the paper's figures and numbers (CSV + PNG);
- :mod:`fastnig.training` — fine-tuning, the offline demo model, :func:`load_cross_encoder`;
- :mod:`fastnig.study` — configs, the cost plan, the staged study run;
- :mod:`fastnig.report` — the run folder as report, scorecard and comparison;
- :mod:`fastnig.cli` — the ``fastnig`` command.

This module only re-exports the public API.  Heavy optional dependencies
(ir_datasets, ranx, bm25s, matplotlib, safetensors) are imported only when the
stage that needs them runs; a missing one stops with the
``pip install "fastnig[ir]"`` that fixes it.
"""
from .data import (
                   DATASETS,
                   Collection,
                   DatasetUnavailable,
                   LabelledPair,
                   MissingJudgments,
                   filter_agreeing,
                   load_collection,
                   sample_pairs,
)
from .engine.attribute import Attributions, attribute
from .engine.kernels import accumulate_conductance, accumulate_conductance_ref
from .engine.loading import ModelUnavailable
from .engine.model import linear_modules
from .engine.rankers import UnsupportedModel
from .engine.scoring import relevance_probability, target_function
from .engine.units import Unit, attribute_units
from .evaluation.pruning import PruningBenchmark, evaluate_pruning, prune, pruned, random_like
from .evaluation.reranking import Candidates, build_candidates, ndcg_at_k
from .evaluation.table4 import PruningTable
from .neurons.fusion import fuse, fuse_all
from .neurons.scheme import Scheme
from .neurons.sets import COMPONENTS, NeuronSet, component, intersection, layer_index, neuron_universe, union
from .study.explore import explore
from .training.demo_model import load_cross_encoder, load_ranker

__all__ = [
    "Attributions", "attribute", "linear_modules", "relevance_probability", "target_function",
    "accumulate_conductance", "accumulate_conductance_ref", "load_cross_encoder", "load_ranker", "ModelUnavailable",
    "UnsupportedModel", "Unit", "attribute_units",
    "DATASETS", "Collection", "DatasetUnavailable", "LabelledPair", "MissingJudgments", "filter_agreeing",
    "load_collection", "sample_pairs",
    "COMPONENTS", "NeuronSet", "Scheme", "component", "fuse", "fuse_all", "intersection", "layer_index",
    "neuron_universe", "union",
    "Candidates", "PruningBenchmark", "PruningTable", "build_candidates", "evaluate_pruning", "ndcg_at_k", "prune",
    "pruned", "random_like", "explore",
]
__version__ = "0.1.0"
