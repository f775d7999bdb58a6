"""The fused accumulation op against its pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from fastnig.engine.kernels import Carry, accumulate_conductance, accumulate_conductance_ref, cuda_kernels_built

pytestmark = pytest.mark.usefixtures("cpu_isa")  # each CPU kernel test runs on every build here

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and cuda_kernels_built() else [])
SHAPES = [  # (pairs, steps, tokens, features), lengths
    ((1, 1, 1, 1), [1]),
    ((1, 2, 1, 5), [1]),
    ((3, 5, 7, 33), [7, 1, 0]),          # batch padding, a pair with no real token
    ((2, 9, 13, 130), [13, 4]),          # features not a multiple of any vector width
    ((4, 3, 1, 17), [1, 1, 1, 1]),       # one token
]


def _inputs(shape, lengths, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).to(dtype).to(device)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    return a, g, torch.tensor(lengths, dtype=torch.int64, device=device)


def _both(a, g, lengths, rule, carry_chunks=None, out_dtype=torch.float32):
    """Run op and reference, optionally over step chunks with a carry."""
    P, S, T, H = a.shape
    results = []
    for fn in (accumulate_conductance, accumulate_conductance_ref):
        out = torch.zeros(P, H, dtype=out_dtype, device=a.device)
        if carry_chunks is None:
            fn(a, g, lengths, out, None, rule)
        else:
            carry = Carry.like(a)
            for s0 in range(0, S, carry_chunks):
                fn(a[:, s0:s0 + carry_chunks], g[:, s0:s0 + carry_chunks], lengths, out, carry, rule)
        results.append(out)
    return results


def test_hand_computed_case():
    a = torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1, 1)
    g = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    lengths = torch.tensor([1])
    left = accumulate_conductance(a, g, lengths, torch.zeros(1, 1), None, "left")
    trap = accumulate_conductance(a, g, lengths, torch.zeros(1, 1), None, "trapezoid")
    assert left.item() == pytest.approx(1 * 1 + 2 * 2)           # g0 (a1-a0) + g1 (a2-a1)
    assert trap.item() == pytest.approx(1.5 * 1 + 3.0 * 2)       # mean(g) * da per step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("shape,lengths", SHAPES)
def test_matches_reference_fp32(device, rule, shape, lengths):
    a, g, lens = _inputs(shape, lengths, torch.float32, device)
    ours, ref = _both(a, g, lens, rule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunks_with_carry_equal_one_pass(device, rule, chunk):
    a, g, lens = _inputs((3, 9, 6, 40), [6, 2, 5], torch.float32, device)
    whole, _ = _both(a, g, lens, rule)
    ours, ref = _both(a, g, lens, rule, carry_chunks=chunk)
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    big_a, big_g, lens = _inputs((3, 10, 8, 24), [8, 3, 5], torch.float32, device)
    # strided steps and tokens (views, no copy) ...
    a, g = big_a[:, ::2, :, :], big_g[:, ::2, :, :]
    assert not a.is_contiguous()
    ours, ref = _both(a, g, lens, "trapezoid")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # ... and features that are not contiguous (the wrapper copies)
    a_t = big_a.transpose(2, 3).contiguous().transpose(2, 3)
    g_t = big_g.transpose(2, 3).contiguous().transpose(2, 3)
    assert a_t.stride(3) != 1
    ours, ref = _both(a_t, g_t, lens, "left")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_low_precision_inputs_accumulate_in_fp32(device, dtype, rule):
    a, g, lens = _inputs((2, 7, 9, 50), [9, 4], dtype, device)
    ours, _ = _both(a, g, lens, rule)
    # Exact reference: the same low-precision values, upcast and summed in fp64.
    exact = torch.zeros(2, 50, dtype=torch.float64, device=device)
    accumulate_conductance_ref(a.double(), g.double(), lens, exact, None, rule)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    # Flash-attention's rule: no worse than 2x the error of plain PyTorch at that precision.
    plain = ((g[:, :-1] if rule == "left" else (g[:, :-1] + g[:, 1:]) / 2) * (a[:, 1:] - a[:, :-1]))
    mask = (torch.arange(9, device=device)[None, :] < lens[:, None])[:, None, :, None]
    plain = (plain * mask).sum(dim=(1, 2))
    err_ours = (ours.double() - exact).abs().max()
    err_plain = (plain.double() - exact).abs().max()
    assert err_ours <= 2 * err_plain + 1e-6


def test_fp64_everything():
    a, g, lens = _inputs((2, 6, 5, 11), [5, 2], torch.float64, "cpu")
    ours, ref = _both(a, g, lens, "trapezoid", out_dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_fp16_special_values_convert_exactly():
    # subnormal, normal, max, inf: the kernel's own half->float conversion
    values = torch.tensor([0.0, 6e-8, 1e-5, 1.0, -2.5, 65504.0], dtype=torch.float16)
    a = torch.stack([torch.zeros_like(values), values]).view(1, 2, 1, -1)
    g = torch.ones_like(a)
    out = accumulate_conductance(a, g, torch.tensor([1]), torch.zeros(1, values.numel()), None, "left")
    torch.testing.assert_close(out[0], values.float(), rtol=0, atol=0)


def test_bad_arguments_are_named():
    a, g, lens = _inputs((1, 2, 3, 4), [3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="rule"):
        accumulate_conductance(a, g, lens, torch.zeros(1, 4), None, "simpson")
    with pytest.raises(ValueError, match="out"):
        accumulate_conductance(a, g, lens, torch.zeros(2, 4), None, "left")
    with pytest.raises(TypeError, match="share"):
        accumulate_conductance(a, g.double(), lens, torch.zeros(1, 4), None, "left")
    with pytest.raises(ValueError, match="lengths"):
        accumulate_conductance(a, g, torch.tensor([1, 2]), torch.zeros(1, 4), None, "left")
    with pytest.raises(ValueError, match="threads"):
        accumulate_conductance(a, g, lens, torch.zeros(1, 4), None, "left", threads=0)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_large_input_uses_threads_and_matches(threads):
    torch.manual_seed(0)
    a, g, lens = _inputs((2, 17, 64, 384), [64, 31], torch.float32, "cpu")
    ours = accumulate_conductance(a, g, lens, torch.zeros(2, 384), threads=threads)
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(2, 384))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_both_cpu_builds_can_be_forced():
    """Every CPU kernel test of this file and test_kernels_segments_coarse.py runs once per build that
    can run here (the ``cpu_isa`` fixture of conftest.py); forcing one is seen and undone."""
    from fastnig.engine.kernels import available_cpu_isas, cpu_kernel_isa, forced_cpu_isa

    default = cpu_kernel_isa()
    assert default in available_cpu_isas() and "baseline" in available_cpu_isas()
    for isa in available_cpu_isas():
        with forced_cpu_isa(isa):
            assert cpu_kernel_isa() == isa
        assert cpu_kernel_isa() == default
    with pytest.raises(ValueError, match="'auto', 'avx2' or 'baseline'"):
        with forced_cpu_isa("sse"):
            pass


# --- zero-step chunks -------------------------------------------------------

@pytest.mark.parametrize("fn", [accumulate_conductance, accumulate_conductance_ref])
def test_zero_step_first_chunk_leaves_carry_empty(fn):
    a, g, lens = _inputs((2, 5, 4, 9), [4, 2], torch.float32, "cpu")
    ref = accumulate_conductance_ref(a, g, lens, torch.zeros(2, 9))
    out, carry = torch.zeros(2, 9), Carry.like(a)
    fn(a[:, :0], g[:, :0], lens, out, carry, "trapezoid")
    assert not carry.filled
    fn(a, g, lens, out, carry, "trapezoid")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
