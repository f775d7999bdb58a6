"""`fastnig doctor`: the installation check, its CPU path here and its GPU path through the host emulation."""
from __future__ import annotations

import struct

import pytest
import torch

from fastnig.engine import build_info, selfcheck
from fastnig.engine.build_info import cuda_architectures, runs_on
from fastnig.engine.kernels import accumulate_conductance, accumulate_conductance_emulated
from fastnig.engine.selfcheck import (
    FAIL,
    INFO,
    ODD_SHAPES,
    PASS,
    SKIP,
    TinyModel,
    check_bit_identity,
    check_kernel,
    check_oom_redo,
    device_checks,
    injected_out_of_memory,
    run_check,
)


@pytest.fixture(scope="module")
def tiny():
    return TinyModel()


def _off_by_one_token(a, g, lengths, out, carry=None, rule="trapezoid", **kwargs):
    """A subtly wrong op: the last real token of every pair is left out."""
    return accumulate_conductance(a, g, (lengths - 1).clamp(min=0), out, carry, rule, **kwargs)


def _swapped_rules(a, g, lengths, out, carry=None, rule="trapezoid", **kwargs):
    """Another wrong op: the trapezoid rule where the left rule was asked for (and the other way round)."""
    if kwargs.get("coarse_out") is not None:
        return accumulate_conductance(a, g, lengths, out, carry, rule, **kwargs)
    return accumulate_conductance(a, g, lengths, out, carry, "left" if rule == "trapezoid" else "trapezoid", **kwargs)


@pytest.mark.slow
def test_doctor_passes_here_and_prints_the_cpu_lines(cli):
    code, out, err = cli("doctor")
    assert code == 0, out + err
    for words in ("versions", "torch", "transformers", "fastnig", "CPU kernel", "CUDA kernels", "devices"):
        assert words in out
    lines = [line for line in out.splitlines() if line[2:6] in (PASS, FAIL, SKIP, INFO)]
    for isa in selfcheck.available_cpu_isas():
        assert any(line.startswith(f"  PASS  CPU kernel ({isa}) vs reference") for line in lines), out
    for name in ("CPU kernel: bit identical run to run", "CUDA kernel code (host emulation) vs reference",
                 "tiny BERT attribution on the CPU"):
        assert any(line.startswith(f"  PASS  {name}") for line in lines), out
    assert any(line.startswith("  INFO  CPU throughput") and "GB/s" in line for line in lines)
    if not torch.cuda.is_available():
        assert any(line.startswith("  SKIP  GPU checks") for line in lines)
    assert not any(line.startswith("  FAIL") for line in lines)
    assert out.strip().splitlines()[-1].endswith(": ok")


@pytest.mark.slow
def test_doctor_quick_passes(cli):
    code, out, _ = cli("doctor", "--quick", "--cpu-only")
    assert code == 0, out
    assert "PASS  CPU kernel (" in out and "SKIP  GPU checks" in out and "host emulation" not in out


@pytest.mark.slow
def test_doctor_fails_with_a_wrong_kernel(cli, monkeypatch):
    monkeypatch.setattr(selfcheck, "accumulate_conductance", _off_by_one_token)
    code, out, _ = cli("doctor", "--quick", "--cpu-only")
    assert code == 1
    assert "FAIL  CPU kernel (" in out and "differ from the reference" in out
    assert out.strip().splitlines()[-1].endswith("FAILED: do not trust results of this installation before fixing it")


@pytest.mark.parametrize("wrong", [_off_by_one_token, _swapped_rules])
def test_kernel_check_finds_a_wrong_op(wrong):
    status, detail = check_kernel(wrong, "cpu", shapes=ODD_SHAPES[2:4], dtypes=())
    assert status == FAIL and "differ from the reference" in detail


def test_kernel_check_passes_the_cuda_kernels_through_the_emulation():
    """The doctor's GPU kernel check, run on the CUDA kernels' code here, with tiny grids (grid-stride loops)."""
    def emulated(*args, **kwargs):
        return accumulate_conductance_emulated(*args, max_grid=2, **kwargs)

    status, detail = check_kernel(emulated, "cpu")
    assert status == PASS, detail
    assert "72 cases" in detail and "bfloat16" in detail


def test_bit_identity_check_on_the_emulation_whatever_the_block_order():
    seeds = iter(range(100))

    def emulated(*args, **kwargs):  # every call visits the CUDA blocks in another order
        return accumulate_conductance_emulated(*args, block_order_seed=next(seeds), **kwargs)

    assert check_bit_identity(emulated, "cpu") == (PASS, check_bit_identity(None, "cpu")[1])

    calls = iter(range(100))

    def noisy(a, g, lengths, out, carry=None, rule="trapezoid", **kwargs):
        result = accumulate_conductance(a, g, lengths, out, carry, rule, **kwargs)
        if next(calls) >= 4:  # the later runs differ in the last bit of one element
            out.view(-1)[0] = torch.nextafter(out.view(-1)[0], torch.tensor(float("inf")))
        return result

    status, detail = check_bit_identity(noisy, "cpu")
    assert status == FAIL and "2 of 2 reruns differ" in detail


@pytest.mark.slow
def test_device_checks_run_through_the_emulation(tiny, monkeypatch):
    """The GPU's list of checks on the CPU, with the CUDA kernels' code (host emulation) as the op of the
    kernel checks and of the attribution engine: everything passes."""
    import fastnig.engine.attribute as engine

    tiny.cpu_result()  # with the CPU kernel: the emulated CUDA code's attribution is compared with it

    def emulated(a, g, lengths, out, carry=None, rule="trapezoid", threads=None, **kwargs):
        return accumulate_conductance_emulated(a, g, lengths, out, carry, rule, **kwargs)

    monkeypatch.setattr(engine, "accumulate_conductance", emulated)
    results = device_checks("cpu", emulated, tiny=tiny, throughput=False)
    assert [r.name for r in results] == ["cpu: kernel vs reference", "cpu: kernel bit identical run to run",
                                         "cpu: tiny BERT attribution vs the CPU's",
                                         "cpu: out-of-memory redo equals an unchunked run"]
    assert all(r.status == PASS for r in results), [(r.name, r.detail) for r in results]


@pytest.mark.slow
def test_oom_redo_check_injects_where_it_says(tiny):
    status, detail = check_oom_redo(tiny, "cpu", positions=[("forward", 2), ("backward", 2)])
    assert status == PASS, detail
    # an injection that never fires is a failure, not a pass
    status, detail = check_oom_redo(tiny, "cpu", positions=[("backward", 10_000)])
    assert status == FAIL and "never raised" in detail


def test_oom_redo_check_at_the_first_chunks_backward(tiny):
    """Issue 22 item 1: an out-of-memory error in the first chunk's backward, where memory peaks."""
    status, detail = check_oom_redo(tiny, "cpu", positions=[("backward", 1)])
    assert status == PASS, detail


def test_injected_out_of_memory_is_seen_as_one_by_the_engine():
    from fastnig.engine.memory import is_out_of_memory

    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    with injected_out_of_memory(layer, "backward", 1, "cpu") as state:
        y = layer(x)
        with pytest.raises(Exception) as info:
            y.sum().backward()
    assert is_out_of_memory(info.value) and state == [1, 1]
    layer(x).sum().backward()  # the hook is gone
    with pytest.raises(ValueError, match="where"):
        with injected_out_of_memory(layer, "sideways", 1, "cpu"):
            pass


def test_a_check_that_raises_is_a_failure():
    def broken():
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    result = run_check("x", broken)
    assert result.status == FAIL
    assert result.detail == "raised RuntimeError: no kernel image is available for execution on the device"


def _fatbin(entries):
    """A CUDA fat binary: its header, then per entry (kind 1 = PTX, 2 = machine code; arch) a 64-byte
    header and a payload."""
    body = b""
    for kind, arch in entries:
        payload = b"\0" * 24
        header = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", arch)
        body += header.ljust(64, b"\0") + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_cuda_architectures_are_read_from_the_fat_binaries(tmp_path):
    lib = tmp_path / "_C.so"
    chance = struct.pack("<I", 0xBA55ED50) + b"\xff" * 40  # the magic number in other bytes
    lib.write_bytes(b"\x7fELF" + chance + b"x" * 100 + _fatbin([(2, 80), (2, 75)]) + b"y" * 7
                    + _fatbin([(2, 90), (1, 90), (2, 120), (1, 120)]) + b"z")
    assert cuda_architectures(lib) == ["sm_75", "sm_80", "sm_90", "compute_90", "sm_120", "compute_120"]
    (tmp_path / "plain.so").write_bytes(b"\x7fELF no gpu code")
    assert cuda_architectures(tmp_path / "plain.so") == []
    assert cuda_architectures(tmp_path / "missing.so") is None
    archs = ["sm_75", "sm_80", "sm_90", "compute_90"]
    assert runs_on(archs, (8, 6)) and runs_on(archs, (7, 5)) and runs_on(archs, (12, 0))  # PTX of 9.0 on 12.0
    assert not runs_on(["sm_80", "sm_90"], (7, 5)) and not runs_on(["sm_86"], (8, 0))
    assert not runs_on(["sm_80", "compute_90"], (7, 5)) and runs_on(["sm_80", "compute_90"], (8, 9))


def test_this_build_knows_its_architectures_when_it_has_cuda_kernels():
    if not build_info.cuda_kernels_built():
        pytest.skip("this build has no CUDA kernels")
    archs = cuda_architectures()
    assert archs and all(a.split("_")[0] in ("sm", "compute") for a in archs)
    assert any("GPU code: sm_" in value for _, value in build_info.extension_build())


def test_doctor_device_option_is_checked(cli):
    code, _, err = cli("doctor", "--device", "cpu")
    assert code == 2 and "give a GPU (cuda:N)" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = cli("doctor", "--device", "cuda:0")
        assert code == 2 and "torch sees 0 GPU(s)" in err
