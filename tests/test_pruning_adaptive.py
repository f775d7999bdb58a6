"""Adaptive random baselines (fastnig.evaluation.random_baseline): a stopped row is the first n repetitions of a
fixed run, and a resumed or sharded run stops at the same n with the same numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prefix_reuse import tiny_candidates
from tiny_models import make_model, make_tokenizer

from fastnig.evaluation.pruning import PruningBenchmark, evaluate_pruning
from fastnig.evaluation.random_baseline import DEFAULT_STOP, RandomRuns, RepetitionRule, run_random_baseline
from fastnig.evaluation.reranking import score_candidates
from fastnig.neurons.sets import NeuronSet, neuron_universe
from fastnig.study.config import ConfigError, load_config

# Wide enough to stop after a few repetitions on the tiny model, never at the first check.
RULE = {"max": 10, "stop_when": {"half_width": 6.0, "margin": None, "min": 3, "round": 2, "confidence": 0.95}}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer("bert")
    model = make_model("bert", num_labels=1, layers=3, vocab_size=tok.vocab_size, seed=5, init_range=0.5)
    sizes = neuron_universe(model)
    nset = NeuronSet.from_indices({"bert.encoder.layer.1.intermediate.dense": list(range(0, 64, 3)),
                                   "bert.encoder.layer.2.attention.self.value": list(range(8))}, sizes, "S")
    return model, tok, nset


def bench_of(model, tok, cls=PruningBenchmark, **kwargs):
    return cls(model, tok, tiny_candidates(), batch_size=3, max_length=48, progress=False, **kwargs)


# ------------------------------------------------------------------ the rule
def test_rule_parsing_and_checkpoints():
    assert RepetitionRule.parse(50) == RepetitionRule(max=50) and RepetitionRule.parse(50).checkpoints() == [50]
    assert not RepetitionRule.parse({"max": 20}).adaptive
    rule = RepetitionRule.parse({"max": 50, "stop_when": {}})
    assert rule.adaptive and {k: getattr(rule, k) for k in DEFAULT_STOP} == DEFAULT_STOP
    assert rule.checkpoints() == list(range(5, 50, 5)) + [50]
    assert RepetitionRule.parse({"max": 12, "stop_when": {"min": 4, "round": 3}}).checkpoints() == [4, 7, 10, 12]
    assert RepetitionRule.parse(rule.as_dict()) == rule
    for bad, words in ((0, "max must be a positive"), ({"max": 50, "stop": {}}, "unknown key"),
                       ({"max": 50, "stop_when": {"min": 1}}, "min must be an integer >= 2"),
                       ({"max": 50, "stop_when": {"half_width": -1}}, "half_width"),
                       ({"max": 4, "stop_when": {}}, "above max"), ("fifty", "positive integer or")):
        with pytest.raises(ValueError, match=words):
            RepetitionRule.parse(bad)


def test_rule_stops_when_precise_or_decided_never_before_min_nor_after_max():
    rule = RepetitionRule.parse({"max": 50, "stop_when": {"half_width": 0.25, "margin": 1.0, "confidence": 0.95}})
    calm = lambda r: np.full(10, 0.5 + 1e-4 * ((r * 7) % 5))  # noqa: E731 (random sets all alike: precise at 5)
    results, reason = run_random_baseline(calm, rule, set_points=50.0)
    assert (len(results), reason) == (5, "precise")
    noisy = lambda r: np.full(10, 0.5 + 0.05 * ((r * 7) % 5 - 2))  # noqa: E731 (spread +-10 points)
    results, reason = run_random_baseline(noisy, rule, set_points=20.0)  # the set far below random: decided
    assert (len(results), reason) == (5, "decided")
    results, reason = run_random_baseline(noisy, rule, set_points=50.0)  # the set inside a wide interval
    assert (len(results), reason) == (50, "max")
    # Equivalence: random means 50 +- 0.5 points (sd 0.5, t(0.975, 4) = 2.776): h = 2.776 * 0.5 / sqrt(5) = 0.621 at
    # n = 5; the set at 50.3 points: |50.3 - 50| + 0.621 = 0.921 <= 1 (margin): the set hurts as much as random.
    close = lambda r: np.full(10, 0.5 + 0.005 * ((r * 7) % 5 - 2) / np.sqrt(2.5))  # noqa: E731 (sd 0.5 points)
    results, reason = run_random_baseline(close, rule, set_points=50.3)
    assert (len(results), reason) == (5, "equivalent")
    # ... and not while the interval reaches past the margin: at 50.5, 0.5 + 0.621 > 1 (and 0.5 < 0.621 + 1: not
    # decided either) at n = 5; at n = 10 (the 5 values twice: sd 0.5 * sqrt(20 / 9 / 2.5) = 0.471, t(0.975, 9) =
    # 2.262, h = 0.337) 0.5 + 0.337 <= 1: equivalent.
    results, reason = run_random_baseline(close, rule, set_points=50.5)
    assert (len(results), reason) == (10, "equivalent")
    results, reason = run_random_baseline(noisy, RepetitionRule.parse(7), set_points=20.0)
    assert (len(results), reason) == (7, "fixed")


def test_config_validates_repetitions_and_dtype():
    base = {"model": "demo", "output": "/tmp/x", "attribution": {"datasets": {"cran": "cranfield"}}}
    cfg = load_config({**base, "pruning": {"repetitions": {"max": 50, "stop_when": {"half_width": 0.5}}}})
    assert cfg.pruning["repetitions"]["stop_when"]["half_width"] == 0.5
    assert load_config({**base, "pruning": {"repetitions": 50}}).pruning["repetitions"] == 50
    for pruning, words in (({"repetitions": {"max": 50, "stop_when": {"width": 1}}}, "repetitions.stop_when"),
                           ({"repetitions": -3}, "repetitions.max"), ({"dtype": "fp8"}, "pruning.dtype"),
                           ({"prefix_reuse": "yes"}, "prefix_reuse")):
        with pytest.raises(ConfigError, match=words):
            load_config({**base, "pruning": pruning})


# --------------------------------------------------------- stopped == prefix
def test_a_stopped_row_equals_the_first_n_repetitions_of_a_fixed_run(tiny, reference):
    model, tok, nset = tiny
    adaptive = reference
    assert adaptive.stopped == "precise" and 3 <= adaptive.repetitions < RULE["max"]
    fixed = bench_of(model, tok).random_baseline(nset, RULE["max"], seed=3)
    n = adaptive.repetitions
    assert fixed.repetitions == RULE["max"] and fixed.stopped == "fixed"
    np.testing.assert_array_equal(adaptive.ndcg_pruned, fixed.ndcg_pruned[:n])
    np.testing.assert_array_equal(adaptive.drop_percent, fixed.drop_percent[:n])
    np.testing.assert_array_equal(adaptive.p_values, fixed.p_values[:n])
    assert np.ptp(fixed.drop_percent) > 0  # the random sets do differ


class Interrupted(RuntimeError):
    pass


def failing_after(calls: int):
    class Failing(PruningBenchmark):
        done = 0

        def score(self, desc):
            if Failing.done >= calls:
                raise Interrupted(f"killed after {calls} rerankings")
            Failing.done += 1
            return super().score(desc)
    return Failing


class TwoShards(PruningBenchmark):
    """Scores as two ranks do: each half of the batches alone (the rest 0), then the sum."""

    def score(self, desc):
        halves = [score_candidates(self.model, type(self.encoded)(self.encoded.batches[r::2],
                                                                  self.encoded.rows[r::2], self.encoded.num_pairs),
                                   False, desc=desc, partial=True) for r in range(2)]
        return halves[0] + halves[1]


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted adaptive row."""
    model, tok, nset = tiny
    return bench_of(model, tok).random_baseline(nset, RULE, seed=3)


@pytest.mark.parametrize("kill_at", [1, 2, 4, 6])
def test_resume_stops_at_the_same_n(tiny, reference, tmp_path, kill_at):
    model, tok, nset = tiny
    folder = tmp_path / "random"
    # A run killed after `kill_at` rerankings (the original's is the first) ...
    with pytest.raises(Interrupted):
        bench_of(model, tok, failing_after(kill_at), runs=RandomRuns(folder, "tiny")).random_baseline(nset, RULE, 3)
    stored = RandomRuns(folder, "tiny")
    assert len(stored) == kill_at - 1
    # ... resumed: it redraws none of the stored repetitions and stops where the uninterrupted run did.
    resumed_bench = bench_of(model, tok, runs=stored)
    resumed = resumed_bench.random_baseline(nset, RULE, seed=3)
    assert resumed.repetitions == reference.repetitions and resumed.stopped == reference.stopped
    assert stored.computed == reference.repetitions - (kill_at - 1)
    np.testing.assert_array_equal(resumed.ndcg_pruned, reference.ndcg_pruned)
    np.testing.assert_array_equal(resumed.p_values, reference.p_values)
    # Another configuration never reads these entries.
    assert len(RandomRuns(folder, "other")) == 0


def test_shards_stop_at_the_same_n(tiny, reference):
    model, tok, nset = tiny
    # Sharded scoring (two ranks' halves summed) gives the same numbers, hence the same stop.
    sharded = bench_of(model, tok, TwoShards).random_baseline(nset, RULE, seed=3)
    assert sharded.repetitions == reference.repetitions
    np.testing.assert_array_equal(sharded.ndcg_pruned, reference.ndcg_pruned)


def test_rows_with_identical_counts_share_random_runs(tiny):
    model, tok, nset = tiny
    twin = NeuronSet.from_indices({m: list(range(len(i))) for m, i in nset.by_module().items()}, nset.sizes, "T")
    bench = bench_of(model, tok)
    table = evaluate_pruning(model, tok, {"S": {1.0: nset}, "T": {1.0: twin}}, {"tiny": bench}, repetitions=4,
                             seed=3, progress=False)
    assert [r["random_repetitions"] for r in table.rows] == [4, 4]
    assert table.rows[0]["random_drop_mean"] == table.rows[1]["random_drop_mean"]
    assert bench.runs.computed == 4  # not 8
    assert sum(bench.forwards.values()) == 1 + 2 + 4  # original, two sets, four shared random sets
    assert bench.forwards.get(1) == 2 + 4  # every pruned forward started at layer 1 (the lowest pruned layer)


@pytest.mark.parametrize("name", ["demo", "paper", "paper-zero"])
def test_a_config_reads_back_its_own_dict(name):
    """``load_config(cfg.as_dict())`` is ``cfg`` (the packaged configs; paper's early-stopping pairs and adaptive
    repetitions included): what a run writes to config.json is a config again."""
    cfg = load_config(name)
    again = load_config(cfg.as_dict())
    assert again.as_dict() == cfg.as_dict()
    assert again.attribution == cfg.attribution and again.pruning == cfg.pruning and again.heads == cfg.heads
