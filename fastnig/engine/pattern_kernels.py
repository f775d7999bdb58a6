"""The fused segment-pair op of the attention-pattern view, and its pure-PyTorch reference.

For the attention probabilities of P pairs and H heads at two consecutive path points
(``a0``, ``g0`` = ∂F/∂a at point k; ``a1``, ``g1`` at k + 1; each ``[P, H, Tq, Tk]``),
with a segment id per query position (``q_segments`` ``[P, Tq]``) and per key position
(``k_segments`` ``[P, Tk]``), both ops compute

    out[p, h, s, r] += Σ_{i: q_seg[p, i] = s} Σ_{j: k_seg[p, j] = r} rule(a0, g0, a1, g1)[p, h, i, j]

with ``rule = g0 (a1 − a0)`` (``"left"``) or ``½ (g0 + g1) (a1 − a0)`` (``"trapezoid"``),
over the first ``q_lengths[p]`` query and ``k_lengths[p]`` key positions (all without
lengths); a segment id outside ``[0, S)`` (padding: −1) counts nowhere.  ``out`` is
``[P, H, S, S]`` float32, S ≤ :data:`MAX_SEGMENTS`.

:func:`accumulate_segment_pairs` runs the compiled kernels (``csrc/cpu/segment_pairs_cpu.cpp``,
``csrc/cuda/segment_pairs_cuda.cu``): every input element is read once, nothing of the
inputs' size is made.  :func:`accumulate_segment_pairs_ref` is the unfused expression
(``Qᵀ (g ⊙ Δa) K`` with one-hot segment matrices, a batched einsum that materialises
g ⊙ Δa), the reference the kernels are tested and benchmarked against;
:func:`accumulate_segment_pairs_emulated` runs the CUDA kernel's phases on the CPU.
Reference: docs/cuda_kernel.md ("The segment-pair op").

Must not: know about models, hooks or the path (:mod:`fastnig.engine.patterns` drives it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import kernels

MAX_SEGMENTS = 8
"""The most segments one call may have (the CUDA kernel's shared-memory partial sums)."""

_INPUT_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3}  # csrc/conductance.h DType
_RULE_CODES = {"left": 0, "trapezoid": 1}


def _ext():
    return kernels._C


def segment_pairs_available(device: torch.device) -> bool:
    """Whether the compiled op runs on ``device`` here: the extension loads, holds the segment-pair
    entry points (a build older than them does not), and on CUDA was built with its CUDA kernels."""
    ext = _ext()
    if ext is None or not hasattr(ext, "segment_pairs_cpu"):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return hasattr(ext, "segment_pairs_cuda")
    return device.type == "cpu"


def _check(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths) -> None:
    if rule not in _RULE_CODES:
        raise ValueError(f"rule must be 'left' or 'trapezoid', got {rule!r}")
    if rule == "trapezoid" and g1 is None:
        raise ValueError("rule='trapezoid' needs g1 (the gradient at the second point)")
    inputs = [("a0", a0), ("g0", g0), ("a1", a1)] + ([("g1", g1)] if g1 is not None else [])
    if a0.dim() != 4:
        raise ValueError(f"a0 must be [pairs, heads, q_tokens, k_tokens], got {tuple(a0.shape)}")
    for name, t in inputs:
        if t.shape != a0.shape:
            raise ValueError(f"{name} must have a0's shape {tuple(a0.shape)}, got {tuple(t.shape)}")
        if t.dtype not in _INPUT_CODES or t.dtype != a0.dtype:
            raise TypeError(f"a0, g0, a1, g1 must share one of {list(_INPUT_CODES)}; {name} is {t.dtype}")
        if t.device != a0.device:
            raise ValueError(f"{name} is on {t.device} but a0 is on {a0.device}")
    P, H, Tq, Tk = a0.shape
    if out.dtype != torch.float32 or not out.is_contiguous() or out.dim() != 4 or tuple(out.shape[:2]) != (P, H) \
            or out.shape[2] != out.shape[3]:
        raise ValueError(f"out must be a contiguous float32 [pairs, heads, S, S] = ({P}, {H}, S, S) tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if not 1 <= out.shape[2] <= MAX_SEGMENTS:
        raise ValueError(f"out's S must lie in [1, {MAX_SEGMENTS}], got {out.shape[2]}")
    for name, t, shape in (("q_segments", q_segments, (P, Tq)), ("k_segments", k_segments, (P, Tk)),
                           ("q_lengths", q_lengths, (P,)), ("k_lengths", k_lengths, (P,))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (("out", out), ("q_segments", q_segments), ("k_segments", k_segments),
                    ("q_lengths", q_lengths), ("k_lengths", k_lengths)):
        if t is not None and t.device != a0.device:
            raise ValueError(f"{name} is on {t.device} but a0 is on {a0.device}")


def _args(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths):
    """Checks everything; returns (tensors to keep alive, the keyword arguments of the compiled entry points)."""
    _check(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths)
    given = (a0, g0, a1, g1 if g1 is not None else a0)
    inputs = [t if t.shape[3] <= 1 or t.stride(3) == 1 else t.contiguous() for t in given]
    ids = [t.to(torch.int64).contiguous() for t in (q_segments, k_segments)]
    lengths = [None if t is None else t.to(torch.int64).contiguous() for t in (q_lengths, k_lengths)]
    args = dict(  # by name: the py::arg names of csrc/bindings.cpp (FASTNIG_SEGMENT_PYARGS)
        a0=inputs[0].data_ptr(), g0=inputs[1].data_ptr(), a1=inputs[2].data_ptr(),
        g1=inputs[3].data_ptr() if g1 is not None else 0, shape=tuple(a0.shape),
        strides=tuple(tuple(t.stride()[:3]) for t in inputs), dtype=_INPUT_CODES[a0.dtype], rule=_RULE_CODES[rule],
        q_segments=ids[0].data_ptr(), k_segments=ids[1].data_ptr(),
        q_lengths=lengths[0].data_ptr() if lengths[0] is not None else 0,
        k_lengths=lengths[1].data_ptr() if lengths[1] is not None else 0,
        num_segments=out.shape[2], out=out.data_ptr())
    return (inputs, ids, lengths), args


def accumulate_segment_pairs(a0: torch.Tensor, g0: torch.Tensor, a1: torch.Tensor, g1: Optional[torch.Tensor],
                             q_segments: torch.Tensor, k_segments: torch.Tensor, out: torch.Tensor,
                             rule: str = "trapezoid", *, q_lengths: Optional[torch.Tensor] = None,
                             k_lengths: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> torch.Tensor:
    """Fused op: ``out[p, h, s, r] +=`` the rule's sum over the (query segment s, key segment r) block.

    Args:
        a0, g0, a1, g1: ``[P, H, Tq, Tk]``, float32, bfloat16 or float16 (read as float), one dtype and
            device; any strides, the key axis ideally contiguous (else one copy is made).  ``g1`` may
            be ``None`` with ``rule="left"``.
        q_segments, k_segments: ``[P, Tq]`` / ``[P, Tk]`` integer segment ids; ids outside ``[0, S)`` count
            nowhere.
        out: ``[P, H, S, S]`` float32 contiguous accumulator (S ≤ :data:`MAX_SEGMENTS`), updated in place.
        rule: ``"left"`` or ``"trapezoid"``.
        q_lengths, k_lengths: optional ``[P]`` valid query / key positions of each pair (the first ones).
        threads: CPU threads (``None`` = ``torch.get_num_threads()``); ignored on CUDA.

    Returns:
        ``out``.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    keep, args = _args(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths)
    ext = kernels._extension()
    if not hasattr(ext, "segment_pairs_cpu"):
        raise ImportError("fastnig's compiled extension predates the segment-pair op: rebuild it (make install)")
    if a0.device.type == "cpu":
        ext.segment_pairs_cpu(**args, n_threads=threads or torch.get_num_threads())
    elif a0.device.type == "cuda":
        if not hasattr(ext, "segment_pairs_cuda"):
            raise RuntimeError("tensors are on CUDA but fastnig was built without its CUDA kernels (no nvcc at "
                               "build time); reinstall on a machine with nvcc")
        index = a0.device.index if a0.device.index is not None else torch.cuda.current_device()
        ext.segment_pairs_cuda(**args, device=index, stream=torch.cuda.current_stream(a0.device).cuda_stream)
    else:
        raise ValueError(f"unsupported device {a0.device}: fastnig has CPU and CUDA kernels")
    del keep
    return out


def accumulate_segment_pairs_emulated(a0, g0, a1, g1, q_segments, k_segments, out, rule: str = "trapezoid", *,
                                      q_lengths=None, k_lengths=None, block_order_seed: int = 0,
                                      max_grid: Optional[int] = None) -> torch.Tensor:
    """The CUDA op run on the CPU (same contract as :func:`accumulate_segment_pairs`): the kernel's
    phases (``csrc/cuda/segment_pairs_kernel.h``) over the launcher's grid, blocks and the threads of
    every phase in an order shuffled by ``block_order_seed``, shared memory starting as NaN;
    ``max_grid`` caps the blocks (to exercise the grid-stride loop).  For tests: scalar, one thread."""
    if a0.device.type != "cpu":
        raise ValueError(f"the emulation runs on CPU tensors, got {a0.device}")
    if max_grid is not None and (isinstance(max_grid, bool) or not isinstance(max_grid, int) or max_grid < 1):
        raise ValueError(f"max_grid must be None or an integer >= 1, got {max_grid!r}")
    keep, args = _args(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths)
    kernels._extension().segment_pairs_cuda_emulated(**args, block_order_seed=int(block_order_seed) % 2**64,
                                                     max_grid=max_grid if max_grid is not None else 2**31 - 1)
    del keep
    return out


def one_hot_segments(ids: torch.Tensor, lengths: Optional[torch.Tensor], segments: int) -> torch.Tensor:
    """``[P, T, segments]`` float one-hot of ``ids`` ``[P, T]``; positions past ``lengths`` and ids outside
    ``[0, segments)`` are all-zero rows."""
    ids = ids.to(torch.int64)
    valid = (ids >= 0) & (ids < segments)
    if lengths is not None:
        valid &= torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
    onehot = torch.nn.functional.one_hot(ids.clamp(0, segments - 1), segments).float()
    return onehot * valid[..., None].float()


def accumulate_segment_pairs_ref(a0, g0, a1, g1, q_segments, k_segments, out, rule: str = "trapezoid", *,
                                 q_lengths=None, k_lengths=None) -> torch.Tensor:
    """Pure-PyTorch reference (same contract): ``out += Qᵀ (g ⊙ (a1 − a0)) K``, one batched einsum with
    ``[P, T, S]`` one-hot segment matrices, materialising g ⊙ Δa ``[P, H, Tq, Tk]`` in float32."""
    _check(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths, k_lengths)
    S = out.shape[2]
    q = one_hot_segments(q_segments, q_lengths, S)
    k = one_hot_segments(k_segments, k_lengths, S)
    g = (g0.float() + g1.float()) / 2 if rule == "trapezoid" else g0.float()
    out += torch.einsum("pis,phij,pjr->phsr", q, g * (a1.float() - a0.float()), k)
    return out


def segment_pair_blocks(a0, g0, a1, g1, q_segments, k_segments, out, rule: str = "trapezoid", *,
                        q_lengths=None, k_lengths=None) -> Tuple[torch.Tensor, bool]:
    """``(out, fused)``: the compiled op where it runs here (:func:`segment_pairs_available`), else the
    reference; inputs of another dtype (float64), or of mixed dtypes, are read as float32 first.  The
    engine's entry point (one CPU thread: it runs inside autograd's backward)."""
    dtypes = {t.dtype for t in (a0, g0, a1, g1) if t is not None}
    if len(dtypes) > 1 or a0.dtype not in _INPUT_CODES:
        a0, g0, a1 = a0.float(), g0.float(), a1.float()
        g1 = g1.float() if g1 is not None else None
    if segment_pairs_available(a0.device):
        return accumulate_segment_pairs(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths=q_lengths,
                                        k_lengths=k_lengths, threads=1), True
    return accumulate_segment_pairs_ref(a0, g0, a1, g1, q_segments, k_segments, out, rule, q_lengths=q_lengths,
                                        k_lengths=k_lengths), False


__all__ = ("MAX_SEGMENTS", "accumulate_segment_pairs", "accumulate_segment_pairs_emulated",
           "accumulate_segment_pairs_ref", "one_hot_segments", "segment_pair_blocks", "segment_pairs_available")
