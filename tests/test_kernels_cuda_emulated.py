"""The CUDA kernels' own thread bodies, run on the CPU over the CUDA launch grid.

``accumulate_conductance_emulated`` executes csrc/cuda/conductance_kernel.h
(the code the GPU runs) block by block in a seeded random order, with an
optionally tiny grid so that the grid-stride loops are exercised; its scratch
buffer starts as NaN, so a read of a partial sum no thread wrote shows.
"""
from __future__ import annotations

import pytest
import torch

from fastnig.engine.kernels import Carry, accumulate_conductance_emulated, accumulate_conductance_ref

SHAPES = [  # (pairs, steps, tokens, features), lengths
    ((1, 1, 1, 1), [1]),
    ((1, 2, 1, 5), [1]),
    ((3, 5, 7, 33), [7, 1, 0]),
    ((2, 9, 21, 130), [21, 4]),   # > 1 token block, > 1 feature block
    ((4, 3, 1, 17), [1, 1, 1, 1]),
]


def _inputs(shape, lengths, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    return a, g, torch.tensor(lengths, dtype=torch.int64)


def _chunked(fn, a, g, lens, out, rule, bounds, **kw):
    carry = Carry.like(a)
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        fn(a[:, s0:s1], g[:, s0:s1], lens, out, carry, rule, **kw)
    return out


@pytest.mark.parametrize("max_grid", [None, 1, 2])
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("shape,lengths", SHAPES)
def test_emulated_matches_reference(shape, lengths, rule, max_grid):
    a, g, lens = _inputs(shape, lengths)
    ours = accumulate_conductance_emulated(a, g, lens, torch.zeros(shape[0], shape[3]), None, rule,
                                           max_grid=max_grid)
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(shape[0], shape[3]), None, rule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("bounds", [[0, 9], [0, 4, 9], [0, 1, 2, 9], [0, 5, 5, 9]])
def test_emulated_chunks_with_carry(rule, bounds):
    a, g, lens = _inputs((3, 9, 11, 40), [11, 2, 9])
    ours = _chunked(accumulate_conductance_emulated, a, g, lens, torch.zeros(3, 40), rule, bounds, max_grid=2)
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(3, 40), None, rule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_emulated_is_bit_identical_across_block_orders_and_grids():
    a, g, lens = _inputs((3, 6, 37, 300), [37, 20, 9], seed=1)
    seg = torch.randint(0, 3, (3, 37), generator=torch.Generator().manual_seed(2))
    results = []
    for seed, max_grid in [(0, None), (1, None), (7, 2), (123, 1), (5, 3)]:
        out, coarse = torch.zeros(3, 3, 300), torch.zeros(3, 3, 300)
        accumulate_conductance_emulated(a, g, lens, out, None, "trapezoid", segments=seg, coarse_out=coarse,
                                        block_order_seed=seed, max_grid=max_grid)
        results.append((out, coarse))
    for out, coarse in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(coarse, results[0][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_other_dtypes(dtype):
    a, g, lens = _inputs((2, 7, 9, 50), [9, 4], dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = accumulate_conductance_emulated(a, g, lens, torch.zeros(2, 50, dtype=out_dtype), max_grid=2)
    exact = accumulate_conductance_ref(a.double(), g.double(), lens, torch.zeros(2, 50, dtype=torch.float64))
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


def test_emulated_non_contiguous_and_fp64_out():
    big_a, big_g, lens = _inputs((3, 10, 8, 24), [8, 3, 5])
    a, g = big_a[:, ::2], big_g[:, ::2]
    ours = accumulate_conductance_emulated(a, g, lens, torch.zeros(3, 24, dtype=torch.float64), max_grid=1)
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(3, 24, dtype=torch.float64))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_emulated_grid_stride_over_many_pairs_and_token_blocks():
    # 70 pairs x 9 token blocks x 3 feature blocks on a 2x2x2 grid: every loop strides.
    a, g, lens = _inputs((70, 2, 70, 257), [70 - i for i in range(70)], seed=3)
    ours = accumulate_conductance_emulated(a, g, lens, torch.zeros(70, 257), max_grid=2, block_order_seed=9)
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(70, 257))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_emulated_rejects_bad_arguments():
    a, g, lens = _inputs((1, 2, 3, 4), [3])
    with pytest.raises(ValueError, match="max_grid"):
        accumulate_conductance_emulated(a, g, lens, torch.zeros(1, 4), max_grid=0)


# --- on a GPU: the real launch ---------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and __import__("fastnig.engine.kernels").engine.kernels.cuda_kernels_built()),
    reason="needs a GPU and the CUDA kernels")


@needs_cuda
def test_cuda_kernel_on_a_gpu(monkeypatch):
    """One test (one skip without a GPU): bit-identical run to run, close to the emulation, and,
    with two GPUs, the caller's current device restored."""
    from fastnig.engine.kernels import accumulate_conductance
    a, g, lens = _inputs((3, 6, 37, 300), [37, 20, 9], seed=1)
    seg = torch.randint(0, 3, (3, 37), generator=torch.Generator().manual_seed(2))
    emulated = accumulate_conductance_emulated(a, g, lens, torch.zeros(3, 3, 300), segments=seg)
    monkeypatch.setenv("FASTNIG_CUDA_SYNC", "1")
    runs = [accumulate_conductance(a.cuda(), g.cuda(), lens.cuda(), torch.zeros(3, 3, 300, device="cuda"),
                                   segments=seg.cuda()).cpu() for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    torch.testing.assert_close(runs[0], emulated, rtol=1e-5, atol=1e-5)
    if torch.cuda.device_count() >= 2:
        a, g, lens = _inputs((1, 3, 4, 8), [4])
        torch.cuda.set_device(0)
        accumulate_conductance(a.to("cuda:1"), g.to("cuda:1"), lens.to("cuda:1"),
                               torch.zeros(1, 8, device="cuda:1"))
        assert torch.cuda.current_device() == 0
