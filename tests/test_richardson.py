"""rule="richardson" (issue 16): R_N = (4 T_N - T_{N/2}) / 3 from one pass, its error estimate,
its argument checks, and exactness on a model whose path is cubic in α."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import PAIRS
from torch import nn

import fastnig
from fastnig.engine import quadrature
from fastnig.study.config import ConfigError, load_config


def _two_runs(model, tokenizer, steps, **kwargs):
    """T_N and T_{N/2}: two separate trapezoid runs with the same options."""
    fine = fastnig.attribute(model, PAIRS, tokenizer=tokenizer, steps=steps, rule="trapezoid", progress=False,
                             **kwargs)
    coarse = fastnig.attribute(model, PAIRS, tokenizer=tokenizer, steps=steps // 2, rule="trapezoid",
                               progress=False, **kwargs)
    return fine, coarse


def _input_nig(att):
    return att.delta.double() + (att.f_input - att.f_baseline).double()


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, rtol", [
    ({}, 1e-5),
    ({"step_batch": 6}, 1e-5),                      # 17 points -> chunks 0-5, 6-10, 11-16: one starts on odd 11
    ({"step_batch": 4, "pair_batch": 3}, 1e-5),     # chunks start at 0, 3, 7, 10, 14; padded pair batches
    ({"segments": True, "step_batch": 5}, 1e-5),    # 0-3, 4-7, 8-12, 13-16: one starts on odd 13
    ({"dtype": torch.bfloat16, "step_batch": 6}, 2e-2),
], ids=["one-chunk", "odd-chunk", "pair-batch", "segments", "bf16"])
def test_one_pass_equals_two_trapezoid_runs(tiny_bert, tokenizer, kwargs, rtol):
    rich = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=16, rule="richardson", progress=False,
                             **kwargs)
    fine, coarse = _two_runs(tiny_bert, tokenizer, 16, **kwargs)
    for name, value in rich.scores.items():
        expected = quadrature.richardson(fine.scores[name], coarse.scores[name])
        scale = float(expected.abs().max())
        torch.testing.assert_close(value, expected, rtol=rtol, atol=rtol * scale, msg=name)
        torch.testing.assert_close(rich.error_estimate[name],
                                   quadrature.error_estimate(fine.scores[name], coarse.scores[name]),
                                   rtol=rtol, atol=rtol * scale, msg=name)
    if kwargs.get("segments"):
        for name, value in rich.segment_scores.items():
            expected = quadrature.richardson(fine.segment_scores[name], coarse.segment_scores[name])
            torch.testing.assert_close(value, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
    expected_input = quadrature.richardson(_input_nig(fine), _input_nig(coarse))
    torch.testing.assert_close(_input_nig(rich), expected_input, rtol=rtol, atol=1e-6)
    assert rich.settings["rule"] == "richardson" and fine.error_estimate is None
    assert torch.equal(rich.f_input, fine.f_input) and torch.equal(rich.steps_used, torch.full((len(PAIRS),), 16))


def test_richardson_enters_a_scheme(tiny_bert, tokenizer):
    from fastnig.neurons.scheme import Scheme
    from fastnig.neurons.sets import neuron_universe

    att = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=8, rule="richardson", progress=False)
    scheme = Scheme(neuron_universe(tiny_bert), model=att.settings["model"] or "tiny", dataset="d", label="relevant",
                    settings=att.settings)
    scheme.add(att, [f"p{i}" for i in range(len(PAIRS))])
    assert scheme.settings["rule"] == "richardson" and scheme.count == len(PAIRS)
    with pytest.raises(ValueError, match="settings"):
        scheme.add(fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=8, rule="trapezoid",
                                     progress=False),
                   [f"q{i}" for i in range(len(PAIRS))])


@pytest.mark.slow
def test_out_of_memory_redo_rebuilds_the_even_point_carry(tiny_bert, tokenizer, monkeypatch):
    """21 points in chunks of at most 5 (0-3, 4-7, ...): an OOM inside the second chunk (call 18 of the
    op: 12 layers + the input per chunk) redoes it from point 4, whose carries need point 3 and the even
    point 2; the result equals an unchunked run."""
    from fastnig.engine import attribute as attribution

    unchunked = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, rule="richardson",
                                  step_batch=21, pair_batch=2, progress=False)
    calls = {"n": 0}
    real = attribution.accumulate_conductance

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "accumulate_conductance", flaky)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        redone = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, rule="richardson",
                                   step_batch=5, pair_batch=2, progress=False)
    for name, value in unchunked.scores.items():
        torch.testing.assert_close(redone.scores[name], value, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(redone.error_estimate[name], unchunked.error_estimate[name], rtol=1e-4,
                                   atol=1e-6, msg=name)
    torch.testing.assert_close(redone.delta, unchunked.delta, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 15}, r"even number of path intervals.*steps=15: use steps=16, or rule='trapezoid'"),
    ({"steps": "auto", "max_steps": 63}, r"max_steps=63: use max_steps=64"),
    ({"steps": 16, "nodes": "chebyshev"}, r"needs nodes='uniform'.*got nodes='chebyshev'"),
    ({"steps": 16, "rule": "simpson"}, r"rule must be one of \('left', 'trapezoid', 'richardson'\)"),
])
def test_clear_errors(tiny_bert, tokenizer, kwargs, match):
    kwargs = {"rule": "richardson", **kwargs}
    with pytest.raises(ValueError, match=match):
        fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, progress=False, **kwargs)


def test_config_accepts_richardson_and_checks_its_steps():
    base = {"model": "demo", "output": "runs/x", "attribution": {"datasets": {"cran": "cranfield"},
                                                                 "rule": "richardson"}}
    config = load_config({**base, "attribution": {**base["attribution"], "steps": 16}})
    assert config.attribution["rule"] == "richardson"
    with pytest.raises(ConfigError, match="steps=17"):
        load_config({**base, "attribution": {**base["attribution"], "steps": 17}})


# ------------------------------------------------------- a path cubic in α
class CubicPath(nn.Module):
    """A cross-encoder stand-in whose Linear outputs are polynomials of degree 1, 2, 3 in the path
    position α (the word embeddings are linear in α), with F = the logit, cubic in α:

        l1 = W1 e,  l2 = W2 (l1 ⊙ l1),  l3 = W3 (l2 ⊙ l1),  logit = mean over real tokens of w · l3.

    Every conductance integrand g · da/dα is then a polynomial of degree <= 2 in α,
    where the trapezoid sum has an error of exactly c h² and R_N is exact."""

    def __init__(self, vocab: int, dim: int = 6, hidden: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.l1, self.l2, self.l3 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3)
        self.head = nn.Linear(3, 1, bias=False)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask):
        l1 = self.l1(inputs_embeds)
        l2 = self.l2(l1 * l1)
        l3 = self.l3(l2 * l1)
        mask = attention_mask.unsqueeze(-1).to(l3.dtype)
        return SimpleNamespace(logits=self.head((l3 * mask).sum(1) / mask.sum(1)))


def test_richardson_is_exact_on_a_cubic_path_where_the_trapezoid_is_not(tokenizer):
    model = CubicPath(tokenizer.vocab_size)
    layers = ["l1", "l2", "l3"]

    def run(steps, rule):
        return fastnig.attribute(model, PAIRS, tokenizer=tokenizer, steps=steps, rule=rule, output="logit",
                                 layers=layers, progress=False, step_batch=3)

    exact = run(64, "richardson")
    for steps in (2, 6):
        rich, trap = run(steps, "richardson"), run(steps, "trapezoid")
        moved = (rich.f_input - rich.f_baseline).abs()
        assert (rich.delta.abs() <= 1e-5 * moved.clamp_min(1e-3)).all(), rich.delta   # completeness, to rounding
        assert (trap.delta.abs() > 1e-3 * moved).any(), trap.delta
        for name in ("l1", "l2"):  # l3: g constant, every rule is exact
            scale = float(exact.scores[name].abs().max())
            torch.testing.assert_close(rich.scores[name], exact.scores[name], rtol=1e-5, atol=1e-5 * scale)
            assert float((trap.scores[name] - exact.scores[name]).abs().max()) > 1e-3 * scale, name
            # the estimate is exact too: T_N's error is exactly c h², so |T_N - T_N/2| / 3 = |T_N - I|
            torch.testing.assert_close(rich.error_estimate[name], (trap.scores[name] - exact.scores[name]).abs(),
                                       rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------- steps="auto"
# tiny_bert: every pair's relative delta is < 1e-5 from N = 16 on, the top neurons' estimated relative
# error of two of its pairs is above this at N = 16 (2.5e-4, 5.3e-4) and below it at N = 32
TINY_AUTO_TOLERANCE = 2e-4

@pytest.mark.slow
def test_auto_stops_on_the_neuron_estimate_too(tiny_bert, tokenizer, monkeypatch):
    """A pair stops at the first level where both the input-side delta and the top neurons' estimated
    error are within tolerance; its result equals a fixed run at that N."""
    tolerance = TINY_AUTO_TOLERANCE
    auto = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps="auto", max_steps=64, rule="richardson",
                             tolerance=tolerance, progress=False)
    for i, n in enumerate(auto.steps_used.tolist()):
        fixed = fastnig.attribute(tiny_bert, [PAIRS[i]], tokenizer=tokenizer, steps=n, rule="richardson",
                                  progress=False)
        for name, value in fixed.scores.items():
            torch.testing.assert_close(auto.scores[name][i], value[0], rtol=1e-5, atol=1e-7)
        err = quadrature.top_error(fixed.scores, fixed.error_estimate)
        done = quadrature.auto_converged(fixed.delta.double(), fixed.f_input.double(), fixed.f_baseline.double(),
                                         tolerance, err)
        assert bool(done[0]) or n == 64
    # the neuron test binds: with it switched off, no pair needs more steps and some need fewer
    monkeypatch.setattr(fastnig.engine.attribute, "top_error",
                        lambda scores, errors: torch.zeros(len(next(iter(scores.values())))))
    delta_only = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps="auto", max_steps=64,
                                   rule="richardson", tolerance=tolerance, progress=False)
    assert (delta_only.steps_used <= auto.steps_used).all() and delta_only.steps_used.sum() < auto.steps_used.sum()


def test_top_error_sums_the_estimates_of_the_largest_neurons():
    scores = {"a": torch.tensor([[3.0, -5.0, 0.1]]), "b": torch.tensor([[0.2, 4.0]])}
    errors = {"a": torch.tensor([[1.0, 2.0, 100.0]]), "b": torch.tensor([[100.0, 4.0]])}
    assert quadrature.top_error(scores, errors, percent=40).tolist() == [6.0 / 9.0]   # 2 of 5: -5.0 and 4.0
    assert quadrature.top_error(scores, errors, percent=1).tolist() == [2.0 / 5.0]    # at least one neuron


def test_memory_model_counts_the_even_point_carries(tiny_bert):
    from fastnig.engine.memory import chunk_memory
    from fastnig.engine.model import linear_modules

    modules = linear_modules(tiny_bert)
    plain = chunk_memory(tiny_bert, modules, tokens=16, pairs=2)
    coarse = chunk_memory(tiny_bert, modules, tokens=16, pairs=2, coarse=True)
    assert coarse.fixed["carries"] == 2 * plain.fixed["carries"] and coarse.per_point == plain.per_point
    assert coarse.fixed["input carry and embeddings"] == plain.fixed["input carry and embeddings"] * 7 // 5
