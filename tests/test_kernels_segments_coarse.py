"""Per-segment sums (issue 14) and the coarse Richardson accumulator (issue 16).

Every kernel -- the CPU op (AVX2 and baseline builds: the cpu_isa fixture runs
each test on every build that runs here), the CUDA op where a GPU is
present and the CUDA kernels' host emulation -- against the pure-PyTorch reference.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastnig.engine.kernels import (
    Carry,
    accumulate_conductance,
    accumulate_conductance_emulated,
    accumulate_conductance_ref,
    cuda_kernels_built,
)

pytestmark = pytest.mark.usefixtures("cpu_isa")  # each CPU kernel test runs on every build here

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and cuda_kernels_built() else [])


def _emulated(a, g, lengths, out, carry=None, rule="trapezoid", threads=None, **kw):
    return accumulate_conductance_emulated(a, g, lengths, out, carry, rule, max_grid=2, block_order_seed=11, **kw)


OPS = {"op": accumulate_conductance, "emulated": _emulated}
CASES = [(op, dev) for op in OPS for dev in DEVICES if not (op == "emulated" and dev != "cpu")]
SHAPES = [  # (pairs, steps, tokens, features), lengths
    ((1, 1, 1, 1), [1]),
    ((1, 3, 1, 5), [1]),
    ((3, 5, 7, 33), [7, 1, 0]),
    ((2, 9, 21, 130), [21, 4]),
]


def _inputs(shape, lengths, dtype, device, num_segments=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).to(dtype).to(device)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    seg = torch.randint(0, num_segments, shape[:1] + shape[2:3], generator=gen)
    seg[:, 0] = 0  # a "special" first token, as [CLS]
    for p, n in enumerate(lengths):
        seg[p, n:] = -1  # padding ids are ignored
    return a, g, torch.tensor(lengths, dtype=torch.int64, device=device), seg.to(device)


def _run(fn, a, g, lens, bounds, rule="trapezoid", segments=None, num_segments=3, coarse=False,
         out_dtype=torch.float32):
    P, _, _, H = a.shape
    shape = (P, num_segments, H) if segments is not None else (P, H)
    out = torch.zeros(shape, dtype=out_dtype, device=a.device)
    coarse_out = torch.zeros_like(out) if coarse else None
    carry = Carry.like(a) if len(bounds) > 2 else None
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        fn(a[:, s0:s1], g[:, s0:s1], lens, out, carry, rule, segments=segments, coarse_out=coarse_out)
    return out, coarse_out


def _all_chunkings(steps, max_cuts=3):
    """Every way to cut 0..steps into consecutive chunks with up to max_cuts cuts."""
    inner = range(1, steps)
    for k in range(0, max_cuts + 1):
        for cuts in itertools.combinations(inner, k):
            yield [0, *cuts, steps]


# --- segments ---------------------------------------------------------------

@pytest.mark.parametrize("op,device", CASES)
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("shape,lengths", SHAPES)
def test_segments_match_reference(op, device, rule, shape, lengths):
    a, g, lens, seg = _inputs(shape, lengths, torch.float32, device)
    ours, _ = _run(OPS[op], a, g, lens, [0, shape[1]], rule, seg)
    ref, _ = _run(accumulate_conductance_ref, a, g, lens, [0, shape[1]], rule, seg)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the segments partition the real tokens: their sum is the unsegmented op
    whole, _ = _run(OPS[op], a, g, lens, [0, shape[1]], rule)
    torch.testing.assert_close(ours.sum(dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,device", CASES)
@pytest.mark.parametrize("bounds", [[0, 9], [0, 1, 9], [0, 4, 5, 9], [0, 3, 3, 9]])
def test_segments_with_carry_chunks(op, device, bounds):
    a, g, lens, seg = _inputs((3, 9, 11, 40), [11, 2, 9], torch.float32, device, num_segments=4)
    ours, _ = _run(OPS[op], a, g, lens, bounds, "trapezoid", seg, num_segments=4)
    ref, _ = _run(accumulate_conductance_ref, a, g, lens, [0, 9], "trapezoid", seg, num_segments=4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,device", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segments_low_precision(op, device, dtype):
    a, g, lens, seg = _inputs((2, 7, 9, 50), [9, 4], dtype, device)
    ours, _ = _run(OPS[op], a, g, lens, [0, 3, 7], "trapezoid", seg)
    exact, _ = _run(accumulate_conductance_ref, a.double(), g.double(), lens, [0, 7], "trapezoid", seg,
                    out_dtype=torch.float64)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


def test_segments_one_segment_equals_plain_op():
    a, g, lens, _ = _inputs((2, 5, 6, 20), [6, 3], torch.float32, "cpu")
    seg = torch.zeros(2, 6, dtype=torch.int32)
    ours, _ = _run(accumulate_conductance, a, g, lens, [0, 5], "left", seg, num_segments=1)
    plain, _ = _run(accumulate_conductance, a, g, lens, [0, 5], "left")
    assert torch.equal(ours[:, 0], plain)


def test_segments_bad_arguments_are_named():
    a, g, lens, seg = _inputs((2, 3, 4, 5), [4, 2], torch.float32, "cpu")
    with pytest.raises(ValueError, match="num_segments"):
        accumulate_conductance(a, g, lens, torch.zeros(2, 5), segments=seg)
    with pytest.raises(ValueError, match="segments must be"):
        accumulate_conductance(a, g, lens, torch.zeros(2, 3, 5), segments=seg[:, :2])
    with pytest.raises(TypeError, match="integer"):
        accumulate_conductance(a, g, lens, torch.zeros(2, 3, 5), segments=seg.float())
    bad = seg.clone()
    bad[1, 0] = 3  # a real token outside [0, 3)
    with pytest.raises(ValueError, match="segment ids"):
        accumulate_conductance(a, g, lens, torch.zeros(2, 3, 5), segments=bad)
    bad = seg.clone()
    bad[1, 3] = 7  # padding (length 2): ignored
    accumulate_conductance(a, g, lens, torch.zeros(2, 3, 5), segments=bad)


# --- coarse (Richardson) accumulator ----------------------------------------

@pytest.mark.parametrize("op,device", CASES)
@pytest.mark.parametrize("steps", [1, 2, 5, 6])
def test_coarse_every_chunking(op, device, steps):
    a, g, lens, _ = _inputs((2, steps, 10, 19), [10, 3], torch.float32, device)
    even, _ = _run(accumulate_conductance_ref, a[:, ::2], g[:, ::2], lens, [0, a[:, ::2].shape[1]])
    fine_whole, _ = _run(accumulate_conductance_ref, a, g, lens, [0, steps])
    for bounds in _all_chunkings(steps):
        fine, coarse = _run(OPS[op], a, g, lens, bounds, coarse=True)
        ref_fine, ref_coarse = _run(accumulate_conductance_ref, a, g, lens, bounds, coarse=True)
        torch.testing.assert_close(coarse, ref_coarse, rtol=1e-5, atol=1e-5, msg=lambda m: f"{bounds}: {m}")
        torch.testing.assert_close(coarse, even, rtol=1e-5, atol=1e-5, msg=lambda m: f"{bounds}: {m}")
        torch.testing.assert_close(ref_coarse, even, rtol=1e-5, atol=1e-5, msg=lambda m: f"{bounds}: {m}")
        torch.testing.assert_close(fine, ref_fine, rtol=1e-5, atol=1e-5, msg=lambda m: f"{bounds}: {m}")
        torch.testing.assert_close(fine, fine_whole, rtol=1e-5, atol=1e-5, msg=lambda m: f"{bounds}: {m}")


@pytest.mark.parametrize("op,device", CASES)
@pytest.mark.parametrize("bounds", [[0, 9], [0, 1, 9], [0, 3, 4, 9], [0, 2, 2, 5, 6, 9]])
def test_coarse_with_segments(op, device, bounds):
    a, g, lens, seg = _inputs((3, 9, 11, 40), [11, 2, 0], torch.float32, device)
    fine, coarse = _run(OPS[op], a, g, lens, bounds, segments=seg, coarse=True)
    ref_fine, ref_coarse = _run(accumulate_conductance_ref, a, g, lens, bounds, segments=seg, coarse=True)
    torch.testing.assert_close(fine, ref_fine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coarse, ref_coarse, rtol=1e-5, atol=1e-5)
    even, _ = _run(accumulate_conductance_ref, a[:, ::2], g[:, ::2], lens, [0, 5], segments=seg)
    torch.testing.assert_close(coarse, even, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,device", CASES)
def test_coarse_bf16_and_fp64_out(op, device):
    a, g, lens, seg = _inputs((2, 7, 9, 50), [9, 4], torch.bfloat16, device)
    _, coarse = _run(OPS[op], a, g, lens, [0, 3, 4, 7], segments=seg, coarse=True, out_dtype=torch.float64)
    _, exact = _run(accumulate_conductance_ref, a.double(), g.double(), lens, [0, 7], segments=seg, coarse=True,
                    out_dtype=torch.float64)
    torch.testing.assert_close(coarse, exact, rtol=1e-6, atol=1e-6)


def test_coarse_explicit_first_point_without_carry():
    # A chunk that starts at an odd global point: its even points are its local 1, 3, ...
    a, g, lens, _ = _inputs((2, 6, 5, 8), [5, 2], torch.float32, "cpu")
    out, coarse = torch.zeros(2, 8), torch.zeros(2, 8)
    accumulate_conductance(a, g, lens, out, coarse_out=coarse, first_point=3)
    even, _ = _run(accumulate_conductance_ref, a[:, 1::2], g[:, 1::2], lens, [0, 3])
    torch.testing.assert_close(coarse, even, rtol=1e-5, atol=1e-5)


def test_coarse_carry_tracks_points_and_checks_first_point():
    a, g, lens, _ = _inputs((1, 5, 3, 4), [3], torch.float32, "cpu")
    out, coarse, carry = torch.zeros(1, 4), torch.zeros(1, 4), Carry.like(a)
    accumulate_conductance(a[:, :2], g[:, :2], lens, out, carry, coarse_out=coarse)
    assert carry.next_point == 2 and carry.even_filled and carry.a_even is not None
    with pytest.raises(ValueError, match="consecutive"):
        accumulate_conductance(a[:, 2:], g[:, 2:], lens, out, carry, coarse_out=coarse, first_point=3)
    accumulate_conductance(a[:, 2:], g[:, 2:], lens, out, carry, coarse_out=coarse, first_point=2)
    assert carry.next_point == 5


def test_coarse_bad_arguments_are_named():
    a, g, lens, _ = _inputs((1, 4, 3, 4), [3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="trapezoid"):
        accumulate_conductance(a, g, lens, torch.zeros(1, 4), None, "left", coarse_out=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="trapezoid"):
        accumulate_conductance_ref(a, g, lens, torch.zeros(1, 4), None, "left", coarse_out=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="coarse_out"):
        accumulate_conductance(a, g, lens, torch.zeros(1, 4), coarse_out=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="first_point"):
        accumulate_conductance(a, g, lens, torch.zeros(1, 4), coarse_out=torch.zeros(1, 4), first_point=-1)
    carry = Carry.like(a)
    accumulate_conductance(a[:, :2], g[:, :2], lens, torch.zeros(1, 4), carry)
    with pytest.raises(ValueError, match="even-indexed"):
        accumulate_conductance(a[:, 2:], g[:, 2:], lens, torch.zeros(1, 4), carry, coarse_out=torch.zeros(1, 4))
