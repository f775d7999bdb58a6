"""Prefix reuse in pruning (fastnig.evaluation.prefix_cache): a pruned forward that starts at a cached layer
boundary gives bit-identical fp32 scores to the full forward, wherever the set's lowest module is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import PAIRS, make_model, make_tokenizer
from torch import nn

from fastnig.evaluation.prefix_cache import PrefixCache
from fastnig.evaluation.pruning import PruningBenchmark, random_like
from fastnig.evaluation.reranking import Candidates
from fastnig.neurons.sets import NeuronSet, neuron_universe

LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_candidates() -> Candidates:
    queries = {f"q{i}": q for i, (q, _) in enumerate(PAIRS)}
    passages = {f"d{j}": p for j, (_, p) in enumerate(PAIRS)}
    passages.update({f"e{j}": f"{p} {q}" for j, (q, p) in enumerate(PAIRS)})
    docs = {q: sorted(passages) for q in queries}
    qrels = {f"q{i}": {f"d{i}": 2, f"e{(i + 1) % len(PAIRS)}": 1} for i in range(len(PAIRS))}
    return Candidates("tiny", queries, docs, passages, qrels, "scoreddocs")


def layer_modules(model, layer: int):
    """The Linear module names of encoder layer ``layer``, in model order."""
    return [n for n in neuron_universe(model) if f".layer.{layer}." in n]


def sets_lowest_in_every_layer(model):
    """For every layer b and two of its modules (the first and the last Linear of the layer): a set whose
    lowest pruned module is that one, with more units in the layers above."""
    sizes = neuron_universe(model)
    out = []
    for b in range(LAYERS):
        names = layer_modules(model, b)
        for first in (names[0], names[-1]):
            members = {first: [0, 3]}
            for above in range(b + 1, LAYERS):
                members[layer_modules(model, above)[2]] = [1, 5]
            out.append((b, NeuronSet.from_indices(members, sizes, f"lowest {first}")))
    return out


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_prefix_reuse_is_bit_identical_to_the_full_forward_for_a_lowest_module_in_every_layer(kind):
    tok = make_tokenizer(kind)
    model = make_model(kind, num_labels=1, layers=LAYERS, vocab_size=tok.vocab_size, seed=2)
    bench = PruningBenchmark(model, tok, tiny_candidates(), batch_size=3, max_length=48, progress=False)
    cases = sets_lowest_in_every_layer(model)
    boundaries = bench.prepare([s for _, s in cases], repetitions=2)
    assert boundaries == list(range(1, LAYERS))  # memory allows them all
    original = bench.original_scores
    assert bench.prefix.captured and len(bench.encoded.batches) > 1
    full_model = make_model(kind, num_labels=1, layers=LAYERS, vocab_size=tok.vocab_size, seed=2)
    reference = PruningBenchmark(full_model, tok, tiny_candidates(), batch_size=3, max_length=48, progress=False,
                                 prefix=False)
    for b, nset in cases:
        assert bench.prefix.start_for(list(nset.by_module())) == b
        before = dict(bench.forwards)
        reused = bench.pruned_scores(nset)
        assert bench.forwards.get(b, 0) == before.get(b, 0) + 1  # it did start at layer b
        full = bench.pruned_scores(nset, prefix=False)
        assert np.array_equal(reused, full), (b, nset.name)
        assert not np.array_equal(reused, original)
        # ... and both equal a plain forward of an independently built copy of the model, pruned.
        assert torch.equal(torch.from_numpy(reused), torch.from_numpy(reference.pruned_scores(nset)))
        # A random set of the same per-module counts starts from the same boundary.
        assert bench.prefix.start_for(list(random_like(nset, 0, 1).by_module())) == b
    # The model is whole again: same layers, same scores.
    assert len(bench.prefix.layers) == LAYERS and bench.prefix.owner.layer is bench.prefix.layers
    np.testing.assert_array_equal(bench.pruned_scores(NeuronSet.empty(neuron_universe(model))), original)
    bench._original_scores = None
    np.testing.assert_array_equal(bench.original_scores, original)


def test_prefix_memory_budget_and_unrecognised_models():
    tok = make_tokenizer("bert")
    model = make_model("bert", num_labels=1, layers=LAYERS, vocab_size=tok.vocab_size)
    bench = PruningBenchmark(model, tok, tiny_candidates(), batch_size=3, max_length=48, progress=False)
    per = bench.prefix.bytes_per_boundary(bench.encoded.batches)
    rows = sum(int(b["input_ids"].numel()) for b in bench.encoded.batches)
    assert per == rows * 32 * 4  # tokens x hidden x fp32
    # Starts at layers 3, 3, 1: with room for one boundary the deeper, more useful one is kept.
    assert bench.prefix.choose([3, 3, 1], bench.encoded.batches, budget=per) == [3]
    assert bench.prefix.choose([3, 3, 1], bench.encoded.batches, budget=2 * per) == [1, 3]
    assert bench.prefix.choose([3, 3, 1], bench.encoded.batches, budget=per - 1) == []
    assert bench.prefix.choose([0, 0], bench.encoded.batches, budget=10 * per) == []
    # Without captured states (or for an unknown stack) every forward is the full one.
    assert bench.prefix.start_for(layer_modules(model, 3)) == 0
    unknown = PrefixCache(nn.Sequential(nn.Linear(4, 4)))
    assert not unknown.supported and unknown.choose([2], []) == [] and unknown.lowest_layer(["0"]) == 0
    off = PruningBenchmark(model, tok, tiny_candidates(), batch_size=3, max_length=48, progress=False,
                           prefix=False)
    assert off.prepare([NeuronSet.from_indices({layer_modules(model, 2)[0]: [1]}, neuron_universe(model))]) == []
