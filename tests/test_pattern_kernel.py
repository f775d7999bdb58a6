"""The fused segment-pair op of the attention-pattern view (fastnig.engine.pattern_kernels).

Checked against an independent float64 reference written here (a loop over the
(query segment, key segment) blocks with boolean masks), not against the module's
own reference; the module's einsum reference is checked against it too.  The CUDA
kernel's phases run through the host emulation.
"""
from __future__ import annotations

import pytest
import torch

from fastnig.engine import pattern_kernels as pk

pytestmark = pytest.mark.skipif(not pk.segment_pairs_available(torch.device("cpu")),
                                reason="the extension predates the segment-pair op (make install)")


def _independent(a0, g0, a1, g1, q_ids, k_ids, S, rule, q_len=None, k_len=None):
    """float64 [P, H, S, S]: each block's sum by masks, position by position validity."""
    a0, g0, a1 = a0.double(), g0.double(), a1.double()
    g = g0 if rule == "left" else (g0 + g1.double()) / 2
    term = g * (a1 - a0)
    P, H, Tq, Tk = term.shape
    out = torch.zeros(P, H, S, S, dtype=torch.float64)
    for p in range(P):
        qv = torch.arange(Tq) < (Tq if q_len is None else int(q_len[p]))
        kv = torch.arange(Tk) < (Tk if k_len is None else int(k_len[p]))
        for s in range(S):
            for r in range(S):
                mask = (qv & (q_ids[p] == s))[:, None] & (kv & (k_ids[p] == r))[None, :]
                out[p, :, s, r] = (term[p] * mask).sum(dim=(1, 2))
    return out


def _inputs(P, H, Tq, Tk, S, dtype=torch.float32, seed=0, ragged=True):
    gen = torch.Generator().manual_seed(seed)
    a0, g0, a1, g1 = (torch.randn(P, H, Tq, Tk, generator=gen).to(dtype) for _ in range(4))
    q_ids = torch.randint(-1, S, (P, Tq), generator=gen)  # -1: padding, in no block
    k_ids = torch.randint(-1, S, (P, Tk), generator=gen)
    q_len = torch.randint(0, Tq + 1, (P,), generator=gen) if ragged else None
    k_len = torch.randint(0, Tk + 1, (P,), generator=gen) if ragged else None
    if ragged:
        q_len[0], k_len[0] = Tq, Tk  # one full pair
    return a0, g0, a1, g1, q_ids, k_ids, q_len, k_len


def _relative(got, expected):
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


SHAPES = [(1, 1, 1, 1, 3), (2, 3, 7, 9, 3), (3, 2, 1, 13, 3), (4, 5, 33, 31, 3), (2, 12, 129, 127, 3),
          (1, 2, 5, 300, 8), (5, 1, 17, 17, 1)]


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_equals_the_independent_reference(shape, rule):
    P, H, Tq, Tk, S = shape
    for ragged in (True, False):
        a0, g0, a1, g1, q_ids, k_ids, q_len, k_len = _inputs(P, H, Tq, Tk, S, ragged=ragged)
        expected = _independent(a0, g0, a1, g1, q_ids, k_ids, S, rule, q_len, k_len)
        g1_arg = g1 if rule == "trapezoid" else None
        got = pk.accumulate_segment_pairs(a0, g0, a1, g1_arg, q_ids, k_ids, torch.zeros(P, H, S, S), rule,
                                          q_lengths=q_len, k_lengths=k_len)
        ref = pk.accumulate_segment_pairs_ref(a0, g0, a1, g1_arg, q_ids, k_ids, torch.zeros(P, H, S, S), rule,
                                              q_lengths=q_len, k_lengths=k_len)
        assert expected.abs().max() > 0
        assert _relative(got, expected) <= 1e-6
        assert _relative(ref, expected) <= 1e-6
        assert _relative(got, ref.double()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_read_as_float(dtype):
    a0, g0, a1, g1, q_ids, k_ids, q_len, k_len = _inputs(3, 4, 19, 23, 3, dtype=dtype, seed=1)
    expected = _independent(a0, g0, a1, g1, q_ids, k_ids, 3, "trapezoid", q_len, k_len)  # from the same half values
    got = pk.accumulate_segment_pairs(a0, g0, a1, g1, q_ids, k_ids, torch.zeros(3, 4, 3, 3), q_lengths=q_len,
                                      k_lengths=k_len)
    assert _relative(got, expected) <= 1e-6


def test_strided_views_threads_and_accumulation():
    """Views of a chunk ([P, steps, H, Tq, Tk][:, s]), any thread count (same bits), out is added to."""
    gen = torch.Generator().manual_seed(2)
    P, steps, H, Tq, Tk, S = 3, 4, 5, 11, 14, 3
    a = torch.randn(P, steps, H, Tq, Tk, generator=gen)
    g = torch.randn(P, steps, H, Tq, Tk, generator=gen)
    q_ids = torch.randint(0, S, (P, Tq), generator=gen)
    k_ids = torch.randint(0, S, (P, Tk), generator=gen)
    start = torch.randn(P, H, S, S, generator=gen)
    expected = start.double().clone()
    outs = [start.clone() for _ in range(3)]
    for s in range(steps - 1):
        expected += _independent(a[:, s], g[:, s], a[:, s + 1], g[:, s + 1], q_ids, k_ids, S, "trapezoid")
        for out, threads in zip(outs, (1, 2, 7)):
            pk.accumulate_segment_pairs(a[:, s], g[:, s], a[:, s + 1], g[:, s + 1], q_ids, k_ids, out,
                                        threads=threads)
    assert _relative(outs[0], expected) <= 1e-6
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("max_grid", [None, 1, 4])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9, 3), (3, 2, 1, 13, 3), (2, 4, 40, 130, 3), (1, 2, 5, 3, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_kernel_equals_the_reference(shape, max_grid):
    P, H, Tq, Tk, S = shape
    a0, g0, a1, g1, q_ids, k_ids, q_len, k_len = _inputs(P, H, Tq, Tk, S, seed=3)
    expected = _independent(a0, g0, a1, g1, q_ids, k_ids, S, "trapezoid", q_len, k_len)
    runs = [pk.accumulate_segment_pairs_emulated(a0, g0, a1, g1, q_ids, k_ids, torch.zeros(P, H, S, S),
                                                 q_lengths=q_len, k_lengths=k_len, block_order_seed=seed,
                                                 max_grid=max_grid) for seed in (0, 1, 2)]
    assert _relative(runs[0], expected) <= 1e-6
    assert all(torch.equal(runs[0], r) for r in runs[1:])  # no order dependence: same bits for every schedule
    left = pk.accumulate_segment_pairs_emulated(a0, g0, a1, None, q_ids, k_ids, torch.zeros(P, H, S, S), "left",
                                                q_lengths=q_len, k_lengths=k_len, max_grid=max_grid)
    assert _relative(left, _independent(a0, g0, a1, g1, q_ids, k_ids, S, "left", q_len, k_len)) <= 1e-6


def test_arguments_are_checked():
    a0, g0, a1, g1, q_ids, k_ids, _, _ = _inputs(2, 3, 4, 5, 3, ragged=False)
    out = torch.zeros(2, 3, 3, 3)
    with pytest.raises(ValueError, match="g1"):
        pk.accumulate_segment_pairs(a0, g0, a1, None, q_ids, k_ids, out, "trapezoid")
    with pytest.raises(ValueError, match="a0's shape"):
        pk.accumulate_segment_pairs(a0, g0, a1[:, :, :3], g1, q_ids, k_ids, out)
    with pytest.raises(TypeError):
        pk.accumulate_segment_pairs(a0, g0.double(), a1, g1, q_ids, k_ids, out)
    with pytest.raises(ValueError, match="q_segments"):
        pk.accumulate_segment_pairs(a0, g0, a1, g1, k_ids, k_ids, out)
    with pytest.raises(ValueError, match="S must lie"):
        pk.accumulate_segment_pairs(a0, g0, a1, g1, q_ids, k_ids, torch.zeros(2, 3, 9, 9))
    with pytest.raises(ValueError, match="float32"):
        pk.accumulate_segment_pairs(a0, g0, a1, g1, q_ids, k_ids, torch.zeros(2, 3, 3, 3, dtype=torch.float64))


def test_attention_patterns_run_in_the_fused_op_and_match_the_reference_path(monkeypatch):
    """attention_pattern_nig calls the compiled op (not the einsum), and gives what the einsum path gives."""
    from tiny_models import PAIRS, make_model, make_tokenizer

    from fastnig.engine import patterns

    model, tok = make_model("bert"), make_tokenizer("bert")
    pairs = PAIRS[:3]
    calls = {"fused": 0}
    real = pk.accumulate_segment_pairs

    def counting(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pk, "accumulate_segment_pairs", counting)
    fused = patterns.attention_pattern_nig(model, pairs, tokenizer=tok, steps=6, step_batch=3, max_length=24)
    assert calls["fused"] > 0
    monkeypatch.setattr(pk, "segment_pairs_available", lambda device: False)  # the reference path
    calls["fused"] = 0
    reference = patterns.attention_pattern_nig(model, pairs, tokenizer=tok, steps=6, step_batch=3, max_length=24)
    assert calls["fused"] == 0
    assert fused.blocks.keys() == reference.blocks.keys()
    for name, value in fused.blocks.items():
        torch.testing.assert_close(value, reference.blocks[name], rtol=1e-5, atol=1e-7)
