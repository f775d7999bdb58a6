"""The fused conductance-accumulation op and its pure-PyTorch reference.

Both compute, for one chunk of consecutive path points of P pairs,

    out[p, h] += sum_{steps k in chunk} sum_{real tokens t of p} rule_k(p, t, h)

with ``rule_k = g_k (a_{k+1} - a_k)`` (``"left"``) or
``(g_k + g_{k+1}) / 2 (a_{k+1} - a_k)`` (``"trapezoid"``), where ``a`` is a
neuron's activation and ``g = dF/da`` at consecutive path points.  The step
that links two chunks uses the carry: the previous chunk's last point, which
the op reads (``has_prev``) and then overwrites with this chunk's last point.

The compiled op (``fastnig._C``) takes raw addresses and geometry, so this
module is where devices, dtypes, shapes and strides are checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

RULES = ("left", "trapezoid")
_RULE_CODES = {"left": 0, "trapezoid": 1}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

try:
    from . import _C  # noqa: F401  (compiled extension)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def _extension():
    if _C is None:
        raise ImportError(
            "fastnig's compiled extension (fastnig._C) could not be loaded: "
            f"{_IMPORT_ERROR}. Reinstall with `pip install --force-reinstall --no-deps .` "
            "from the fastnig source folder (a C++17 compiler and CMake >= 3.18 are needed)."
        )
    return _C


def cpu_kernel_isa() -> str:
    """Which build of the CPU kernel runs here: ``"avx2"`` (AVX2 + FMA, chosen at
    run time when the CPU has both) or ``"baseline"``; the environment variable
    ``FASTNIG_CPU_ISA=baseline`` (read at the first call) forces the latter."""
    return _extension().cpu_kernel_isa()


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(getattr(_extension(), "with_cuda", False))


@dataclass
class Carry:
    """The last path point of the previous chunk, per pair, token and feature.

    ``a`` and ``g``: ``[pairs, tokens, features]``, dtype and device of the
    activations.  ``filled`` says whether a previous chunk has written them.
    """

    a: torch.Tensor
    g: torch.Tensor
    filled: bool = False

    @classmethod
    def like(cls, a4: torch.Tensor) -> "Carry":
        pairs, _, tokens, features = a4.shape
        shape = (pairs, tokens, features)
        return cls(a4.new_empty(shape), a4.new_empty(shape))


def _check(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
           carry: Optional[Carry], rule: str) -> None:
    if rule not in _RULE_CODES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if a.dim() != 4 or g.shape != a.shape:
        raise ValueError(
            "a and g must both be [pairs, steps, tokens, features]; got "
            f"{tuple(a.shape)} and {tuple(g.shape)}")
    if a.dtype not in _DTYPE_CODES or g.dtype != a.dtype:
        raise TypeError(f"a and g must share one of {list(_DTYPE_CODES)}; got {a.dtype} and {g.dtype}")
    if out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        raise TypeError("out must be a contiguous float32 or float64 tensor")
    pairs, _, _, features = a.shape
    if tuple(out.shape) != (pairs, features):
        raise ValueError(f"out must be [pairs, features] = {(pairs, features)}, got {tuple(out.shape)}")
    if lengths.shape != (pairs,):
        raise ValueError(f"lengths must be [pairs] = ({pairs},), got {tuple(lengths.shape)}")
    for name, t in (("g", g), ("lengths", lengths), ("out", out)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    if carry is not None:
        expected = (pairs, a.shape[2], features)
        for name, t in (("carry.a", carry.a), ("carry.g", carry.g)):
            if tuple(t.shape) != expected or t.dtype != a.dtype or t.device != a.device or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {a.dtype} tensor of shape {expected} on {a.device}")


def accumulate_conductance(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                           carry: Optional[Carry] = None, rule: str = "trapezoid",
                           threads: Optional[int] = None) -> torch.Tensor:
    """Fused op: add this chunk's conductance of every feature into ``out``.

    Args:
        a: ``[pairs, steps, tokens, features]`` activations at consecutive path
            points (fp32, fp64, bf16 or fp16); any strides, features ideally
            contiguous (otherwise one copy is made).
        g: same shape and dtype: ``dF/da`` at the same points.
        lengths: ``[pairs]`` int64, real tokens per pair (padding on the right).
        out: ``[pairs, features]`` float32/float64 accumulator, updated in place.
        carry: the previous chunk's last point (read when ``carry.filled``),
            replaced by this chunk's last point; ``None`` for a single chunk.
        rule: ``"left"`` or ``"trapezoid"``.
        threads: CPU threads (``None`` = ``torch.get_num_threads()``); ignored on CUDA.

    Returns:
        ``out``.
    """
    _check(a, g, lengths, out, carry, rule)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (torch's thread count) or an integer >= 1, got {threads!r}")
    if a.stride(3) != 1 and a.shape[3] > 1:
        a = a.contiguous()
    if g.stride(3) != 1 and g.shape[3] > 1:
        g = g.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    ext = _extension()
    args = (
        a.data_ptr(), g.data_ptr(), tuple(a.shape), a.stride()[:3], g.stride()[:3], _DTYPE_CODES[a.dtype],
        lengths.data_ptr(), out.data_ptr(), _DTYPE_CODES[out.dtype],
        carry.a.data_ptr() if carry is not None else 0, carry.g.data_ptr() if carry is not None else 0,
        carry is not None and carry.filled, carry is not None, _RULE_CODES[rule],
    )
    if a.device.type == "cpu":
        ext.accumulate_cpu(*args, threads or torch.get_num_threads())
    elif a.device.type == "cuda":
        if not cuda_kernels_built():
            raise RuntimeError(
                "tensors are on CUDA but fastnig was built without its CUDA kernels (nvcc was not found at "
                "build time); reinstall on a machine with nvcc, or set FASTNIG_CUDA=ON to make that an error")
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        ext.accumulate_cuda(*args, index, torch.cuda.current_stream(a.device).cuda_stream)
    else:
        raise ValueError(f"unsupported device {a.device}: fastnig has CPU and CUDA kernels")
    if carry is not None:
        carry.filled = True
    return out


def accumulate_conductance_ref(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                               carry: Optional[Carry] = None, rule: str = "trapezoid") -> torch.Tensor:
    """Pure-PyTorch reference of :func:`accumulate_conductance` (same contract).

    Materialises the differences and products in the accumulator's dtype; it
    is the unfused expression the fused op is tested and benchmarked against.
    """
    _check(a, g, lengths, out, carry, rule)
    acc = out.dtype
    a_all, g_all = a.to(acc), g.to(acc)
    if carry is not None and carry.filled:
        a_all = torch.cat([carry.a.to(acc).unsqueeze(1), a_all], dim=1)
        g_all = torch.cat([carry.g.to(acc).unsqueeze(1), g_all], dim=1)
    if a_all.shape[1] >= 2:
        da = a_all[:, 1:] - a_all[:, :-1]
        gk = g_all[:, :-1] if rule == "left" else 0.5 * (g_all[:, :-1] + g_all[:, 1:])
        tokens = a.shape[2]
        mask = torch.arange(tokens, device=a.device)[None, :] < lengths.to(a.device)[:, None]
        out += (gk * da * mask[:, None, :, None]).sum(dim=(1, 2))
    if carry is not None and a.shape[1] > 0:
        carry.a.copy_(a[:, -1])
        carry.g.copy_(g[:, -1])
        carry.filled = True
    return out
