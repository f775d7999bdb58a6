"""The fused conductance-accumulation op and its pure-PyTorch reference.

Both compute, for one chunk of consecutive path points of P pairs,

    out[p, h] += sum_{steps k in chunk} sum_{real tokens t of p} rule_k(p, t, h)

with ``rule_k = g_k (a_{k+1} - a_k)`` (``"left"``) or
``(g_k + g_{k+1}) / 2 (a_{k+1} - a_k)`` (``"trapezoid"``), where ``a`` is a
neuron's activation and ``g = dF/da`` at consecutive path points.  The step
that links two chunks uses the carry: the previous chunk's last point, which
the op reads (``has_prev``) and then overwrites with this chunk's last point.

Two optional extensions share the same read of ``a`` and ``g``:

* ``segments`` (``[pairs, tokens]`` ids in ``[0, S)``): ``out`` is then
  ``[pairs, S, features]`` and each token's terms go to its segment's row
  (e.g. query / passage / special tokens);
* ``coarse_out`` (shape of ``out``, trapezoid rule only): also accumulates the
  trapezoid sum over the even-indexed *global* path points 0, 2, 4, ...,
  ``(g_{2j} + g_{2j+2}) / 2 (a_{2j+2} - a_{2j})``, i.e. the half-step estimate
  that Richardson extrapolation combines with ``out``.  ``first_point`` is the
  global index of the chunk's first point; the carry also keeps the most
  recent even-indexed point.

``accumulate_conductance_emulated`` runs the CUDA kernels' thread bodies on
the CPU over the CUDA launch grid, so that the GPU code is tested without a GPU.

The compiled op (``fastnig.engine._C``) takes raw addresses and geometry, so this
module is where devices, dtypes, shapes and strides are checked.
"""
from __future__ import annotations

import shutil
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

RULES = ("left", "trapezoid")
_RULE_CODES = {"left": 0, "trapezoid": 1}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def _extension():
    """The compiled extension, or an ``ImportError`` naming why it cannot load and the one fix.

    Causes told apart: a build for another Python (a ``_C`` file whose ABI
    tag is not this interpreter's ``EXT_SUFFIX``), no C++ compiler to build
    it, the sources imported from a checkout that was never built, and a
    build that exists but fails to load (the loader's own error).
    """
    if _C is not None:
        return _C

    here = Path(__file__).resolve().parent
    package = sys.modules.get(__package__)
    folders = list(dict.fromkeys([here] + [Path(p).resolve() for p in getattr(package, "__path__", [])]))
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    builds = sorted(f for folder in folders for f in folder.glob("_C.*") if f.suffix in (".so", ".pyd"))
    root = here.parents[1]  # a checkout's root holds pyproject.toml beside fastnig/
    checkout = (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file()
    python = sys.executable or "python"
    # the one build command: editable for a checkout (sources stay importable from it), else a reinstall
    build = (f"{python} -m pip install -e {root}" if checkout
             else f"{python} -m pip install --force-reinstall --no-deps <the fastnig source folder or wheel>")
    if builds and not any(f.name.endswith(suffix) for f in builds):
        cause = f"{builds[0]} was built for another Python (this one, {sys.version.split()[0]}, loads '_C{suffix}')"
        fix = f"rebuild it with this Python: {build}"
    elif builds:
        cause = f"{builds[0]} exists but failed to load ({_IMPORT_ERROR})"
        fix = f"rebuild it: {build}"
    elif not any(shutil.which(cc) for cc in ("c++", "g++", "clang++", "cl")):
        cause = "it was never built, and no C++ compiler (c++, g++, clang++) is on PATH to build it"
        fix = f"install a C++17 compiler (e.g. `apt-get install g++`), then build it: {build}"
    elif checkout:
        cause = (f"Python imported the source folder {here}, which holds no build of it (the current folder or "
                 "PYTHONPATH puts the checkout before any installed fastnig)")
        fix = f"install the checkout in editable mode (what `make install` does for .venv): {build}"
    else:
        cause = f"the installed package in {here} has no build of it ({_IMPORT_ERROR})"
        fix = f"reinstall it: {build}"
    raise ImportError(f"fastnig's compiled extension (fastnig.engine._C) could not be loaded: {cause}. Fix: {fix}.")


def cpu_kernel_isa() -> str:
    """Which build of the CPU kernel runs here: ``"avx2"`` (AVX2 + FMA, chosen at
    run time when the CPU has both) or ``"baseline"``; the environment variable
    ``FASTNIG_CPU_ISA=baseline`` (read at the first call) forces the latter."""
    return _extension().cpu_kernel_isa()


def available_cpu_isas() -> Tuple[str, ...]:
    """The builds of the CPU kernel that can run here: ``("avx2", "baseline")`` or ``("baseline",)``."""
    return ("avx2", "baseline") if _extension().avx2_supported() else ("baseline",)


_forced_isa = ["auto"]  # the build forced now (forced_cpu_isa blocks nest)


@contextmanager
def forced_cpu_isa(name: str) -> Iterator[None]:
    """Run the CPU kernel with the build ``name`` (``"avx2"``, ``"baseline"`` or ``"auto"``: the
    default choice) inside the block, then go back to the build before it (for tests and
    benchmarks of both builds; a ``ValueError`` where ``"avx2"`` cannot run)."""
    if name not in ("auto", "avx2", "baseline"):
        raise ValueError(f"name must be 'auto', 'avx2' or 'baseline', got {name!r}")
    _extension().set_cpu_isa(name)
    _forced_isa.append(name)
    try:
        yield
    finally:
        _forced_isa.pop()
        _extension().set_cpu_isa(_forced_isa[-1])


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(getattr(_extension(), "with_cuda", False))


@dataclass
class Carry:
    """The last path point of the previous chunk, per pair, token and feature.

    ``a`` and ``g``: ``[pairs, tokens, features]``, dtype and device of the
    activations.  ``filled`` says whether a previous chunk has written them.

    Only for a coarse accumulator (``coarse_out``): ``a_even``/``g_even`` (same
    shape, allocated on first use, or by ``Carry.like(a4, coarse=True)``) hold the
    most recent even-indexed path point, ``even_filled`` says whether they do.
    ``next_point`` is the global index of the point the next chunk starts at
    (the default ``first_point`` of a call with this carry).
    """

    a: torch.Tensor
    g: torch.Tensor
    filled: bool = False
    a_even: Optional[torch.Tensor] = None
    g_even: Optional[torch.Tensor] = None
    even_filled: bool = False
    next_point: int = 0

    @classmethod
    def like(cls, a4: torch.Tensor, coarse: bool = False) -> "Carry":
        pairs, _, tokens, features = a4.shape
        shape = (pairs, tokens, features)
        carry = cls(a4.new_empty(shape), a4.new_empty(shape))
        if coarse:
            carry.a_even, carry.g_even = a4.new_empty(shape), a4.new_empty(shape)
        return carry


def _check(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
           carry: Optional[Carry], rule: str, segments: Optional[torch.Tensor] = None,
           coarse_out: Optional[torch.Tensor] = None, first_point: Optional[int] = None) -> None:
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
    pairs, _, tokens, features = a.shape
    if segments is None:
        if tuple(out.shape) != (pairs, features):
            raise ValueError(f"out must be [pairs, features] = {(pairs, features)}, got {tuple(out.shape)}")
    else:
        if out.dim() != 3 or out.shape[0] != pairs or out.shape[2] != features or out.shape[1] < 1:
            raise ValueError("with segments, out must be [pairs, num_segments, features] = "
                             f"({pairs}, S, {features}), got {tuple(out.shape)}")
        if tuple(segments.shape) != (pairs, tokens):
            raise ValueError(f"segments must be [pairs, tokens] = {(pairs, tokens)}, got {tuple(segments.shape)}")
        if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
            raise TypeError(f"segments must be an integer tensor, got {segments.dtype}")
    if lengths.shape != (pairs,):
        raise ValueError(f"lengths must be [pairs] = ({pairs},), got {tuple(lengths.shape)}")
    for name, t in (("g", g), ("lengths", lengths), ("out", out), ("segments", segments),
                    ("coarse_out", coarse_out)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    if coarse_out is not None:
        if rule != "trapezoid":
            raise ValueError("coarse_out (the half-step trapezoid sum for Richardson extrapolation) needs "
                             f"rule='trapezoid', got rule={rule!r}")
        if coarse_out.shape != out.shape or coarse_out.dtype != out.dtype or not coarse_out.is_contiguous():
            raise ValueError(f"coarse_out must be a contiguous {out.dtype} tensor of out's shape {tuple(out.shape)}")
    if first_point is not None and (isinstance(first_point, bool) or not isinstance(first_point, int)
                                    or first_point < 0):
        raise ValueError(f"first_point must be None or an integer >= 0, got {first_point!r}")
    if carry is not None:
        expected = (pairs, tokens, features)
        buffers = [("carry.a", carry.a), ("carry.g", carry.g)]
        if coarse_out is not None:
            buffers += [("carry.a_even", carry.a_even), ("carry.g_even", carry.g_even)]
        for name, t in buffers:
            if t is None:
                continue  # even-point buffers are allocated on first use
            if tuple(t.shape) != expected or t.dtype != a.dtype or t.device != a.device or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {a.dtype} tensor of shape {expected} on {a.device}")


def _prepare_segments(segments: Optional[torch.Tensor], lengths: torch.Tensor, num_segments: int):
    """int64 contiguous segment ids; on CPU, real tokens' ids are checked (on CUDA
    that check would synchronise: there a real token with an id outside
    ``[0, num_segments)`` is skipped by the kernel)."""
    if segments is None:
        return None
    segments = segments.to(torch.int64).contiguous()
    if segments.device.type == "cpu" and segments.numel():
        real = torch.arange(segments.shape[1])[None, :] < lengths.to(torch.int64)[:, None]
        ids = segments[real]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_segments):
            raise ValueError(f"segment ids of real tokens must lie in [0, {num_segments}) (out's dim 1); "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
    return segments


def _resolve_first_point(carry: Optional[Carry], coarse_out: Optional[torch.Tensor],
                         first_point: Optional[int]) -> int:
    """The chunk's global first point; with a coarse accumulator, also readies the carry's even buffers."""
    if first_point is None:
        first_point = carry.next_point if carry is not None else 0
    if coarse_out is not None and carry is not None:
        if carry.filled and first_point != carry.next_point:
            raise ValueError(f"first_point={first_point} but the carry holds the points before "
                             f"{carry.next_point}: chunks must be consecutive")
        if carry.a_even is None or carry.g_even is None:
            if carry.filled:
                raise ValueError("the carry was filled without coarse_out, so it holds no even-indexed point; "
                                 "pass coarse_out from the first chunk on (or use Carry.like(a4, coarse=True))")
            carry.a_even, carry.g_even = torch.empty_like(carry.a), torch.empty_like(carry.g)
    return first_point


def _update_carry(carry: Optional[Carry], steps: int, coarse: bool, first_point: int) -> None:
    """Flags of the carry after a chunk (the kernels, or the reference, wrote its buffers)."""
    if carry is None:
        return
    if steps > 0:
        carry.filled = True  # a zero-step chunk leaves the carry as it was
    if coarse and (steps >= 2 or (steps == 1 and first_point % 2 == 0)):
        carry.even_filled = True
    carry.next_point = first_point + steps


def _kernel_args(a, g, lengths, out, carry, rule, segments, coarse_out, first_point):
    """Checks everything and returns ((a, g, lengths, segments), first_point, args): the tensors the
    call must keep alive and the keyword arguments shared by every compiled entry point."""
    _check(a, g, lengths, out, carry, rule, segments, coarse_out, first_point)
    if a.stride(3) != 1 and a.shape[3] > 1:
        a = a.contiguous()
    if g.stride(3) != 1 and g.shape[3] > 1:
        g = g.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    num_segments = out.shape[1] if segments is not None else 1
    segments = _prepare_segments(segments, lengths, num_segments)
    first_point = _resolve_first_point(carry, coarse_out, first_point)
    coarse = coarse_out is not None
    even = carry is not None and coarse
    args = dict(  # by name: the py::arg names of csrc/bindings.cpp (FASTNIG_CALL_PYARGS)
        a=a.data_ptr(), g=g.data_ptr(), shape=tuple(a.shape), a_strides=a.stride()[:3], g_strides=g.stride()[:3],
        dtype=_DTYPE_CODES[a.dtype], lengths=lengths.data_ptr(), out=out.data_ptr(),
        out_dtype=_DTYPE_CODES[out.dtype],
        a_carry=carry.a.data_ptr() if carry is not None else 0, g_carry=carry.g.data_ptr() if carry is not None else 0,
        has_prev=carry is not None and carry.filled, write_carry=carry is not None, rule=_RULE_CODES[rule],
        segments=segments.data_ptr() if segments is not None else 0, num_segments=num_segments,
        coarse_out=coarse_out.data_ptr() if coarse else 0,
        a_even=carry.a_even.data_ptr() if even else 0, g_even=carry.g_even.data_ptr() if even else 0,
        has_prev_even=even and carry.even_filled, first_point=first_point,
    )
    return (a, g, lengths, segments), first_point, args


def _scratch(ext, a: torch.Tensor, out: torch.Tensor, segments, coarse: bool, fill: Optional[float] = None):
    """The CUDA op's partial-sum buffer [accumulators, pairs, token blocks, segments, features]."""
    num_segments = out.shape[1] if segments is not None else 1
    n = ext.cuda_scratch_elements(tuple(a.shape), num_segments, coarse)
    if fill is None:
        return torch.empty(max(n, 1), dtype=out.dtype, device=a.device)
    return torch.full((max(n, 1),), fill, dtype=out.dtype, device=a.device)


def accumulate_conductance(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                           carry: Optional[Carry] = None, rule: str = "trapezoid",
                           threads: Optional[int] = None, *, segments: Optional[torch.Tensor] = None,
                           coarse_out: Optional[torch.Tensor] = None,
                           first_point: Optional[int] = None) -> torch.Tensor:
    """Fused op: add this chunk's conductance of every feature into ``out``.

    Args:
        a: ``[pairs, steps, tokens, features]`` activations at consecutive path
            points (fp32, fp64, bf16 or fp16); any strides, features ideally
            contiguous (otherwise one copy is made).
        g: same shape and dtype: ``dF/da`` at the same points.
        lengths: ``[pairs]`` int64, real tokens per pair (padding on the right).
        out: ``[pairs, features]`` float32/float64 accumulator, updated in place;
            ``[pairs, num_segments, features]`` when ``segments`` is given.
        carry: the previous chunk's last point (read when ``carry.filled``),
            replaced by this chunk's last point; ``None`` for a single chunk.
            A chunk of zero steps leaves it untouched.
        rule: ``"left"`` or ``"trapezoid"``.
        threads: CPU threads (``None`` = ``torch.get_num_threads()``); ignored on CUDA.
        segments: optional ``[pairs, tokens]`` integer segment id of each token
            (e.g. 0 = special, 1 = query, 2 = passage); the ids of real tokens must
            lie in ``[0, num_segments)`` (padding tokens' ids are ignored; on CUDA,
            where checking would synchronise, a real token with another id is skipped).
        coarse_out: optional accumulator of ``out``'s shape and dtype (``rule``
            must be ``"trapezoid"``): += the trapezoid sum over the even-indexed
            global path points of the chunk, linked to the previous chunk's last
            even point through the carry (``carry.a_even``/``g_even``).
        first_point: global index of the chunk's first path point, which decides
            which points are even; ``None`` = ``carry.next_point`` (0 without a
            carry).  Only read with ``coarse_out``.

    Returns:
        ``out``.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (torch's thread count) or an integer >= 1, got {threads!r}")
    keep, first_point, args = _kernel_args(a, g, lengths, out, carry, rule, segments, coarse_out, first_point)
    ext = _extension()
    if a.device.type == "cpu":
        ext.accumulate_cpu(**args, n_threads=threads or torch.get_num_threads())
    elif a.device.type == "cuda":
        if not cuda_kernels_built():
            raise RuntimeError(
                "tensors are on CUDA but fastnig was built without its CUDA kernels (nvcc was not found at "
                "build time); reinstall on a machine with nvcc, or set FASTNIG_CUDA=ON to make that an error")
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        scratch = _scratch(ext, a, out, segments, coarse_out is not None)
        ext.accumulate_cuda(**args, scratch=scratch.data_ptr(), device=index,
                            stream=torch.cuda.current_stream(a.device).cuda_stream)
    else:
        raise ValueError(f"unsupported device {a.device}: fastnig has CPU and CUDA kernels")
    del keep
    _update_carry(carry, a.shape[1], coarse_out is not None, first_point)
    return out


def accumulate_conductance_emulated(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                                    carry: Optional[Carry] = None, rule: str = "trapezoid", *,
                                    segments: Optional[torch.Tensor] = None,
                                    coarse_out: Optional[torch.Tensor] = None, first_point: Optional[int] = None,
                                    block_order_seed: int = 0, max_grid: Optional[int] = None) -> torch.Tensor:
    """The CUDA op run on the CPU: same contract as :func:`accumulate_conductance`.

    Runs the CUDA kernels' own thread bodies (``csrc/cuda/conductance_kernel.h``)
    over the grid the CUDA launcher uses, one thread after another, the blocks of
    each pass visited in an order shuffled by ``block_order_seed``.  ``max_grid``
    caps every grid dimension (default: the hardware limits, 2**31-1 for x and
    65535 for y and z), so that small inputs exercise the grid-stride loops.  The
    scratch buffer starts as NaN, so a read of a partial sum that no thread wrote
    shows.  Tensors must be on the CPU.  For tests: it is slow (scalar, one thread).
    """
    if a.device.type != "cpu":
        raise ValueError(f"the emulation runs on CPU tensors, got {a.device}")
    if max_grid is not None and (isinstance(max_grid, bool) or not isinstance(max_grid, int) or max_grid < 1):
        raise ValueError(f"max_grid must be None or an integer >= 1, got {max_grid!r}")
    keep, first_point, args = _kernel_args(a, g, lengths, out, carry, rule, segments, coarse_out, first_point)
    ext = _extension()
    scratch = _scratch(ext, a, out, segments, coarse_out is not None, fill=float("nan"))
    ext.accumulate_cuda_emulated(**args, scratch=scratch.data_ptr(), block_order_seed=int(block_order_seed) % 2**64,
                                 max_grid=max_grid if max_grid is not None else 2**31 - 1)
    del keep
    _update_carry(carry, a.shape[1], coarse_out is not None, first_point)
    return out


def _ref_add(a_all: torch.Tensor, g_all: torch.Tensor, rule: str, lengths: torch.Tensor,
             segments: Optional[torch.Tensor], target: torch.Tensor) -> None:
    """target += the rule's sum over the steps between consecutive points of a_all/g_all."""
    if a_all.shape[1] < 2:
        return
    da = a_all[:, 1:] - a_all[:, :-1]
    gk = g_all[:, :-1] if rule == "left" else 0.5 * (g_all[:, :-1] + g_all[:, 1:])
    tokens = a_all.shape[2]
    mask = torch.arange(tokens, device=a_all.device)[None, :] < lengths.to(a_all.device)[:, None]
    if segments is None:
        target += (gk * da * mask[:, None, :, None]).sum(dim=(1, 2))
        return
    per_token = (gk * da).sum(dim=1)                                      # [pairs, tokens, features]
    ids = segments.to(device=a_all.device, dtype=torch.int64)
    mask = mask & (ids >= 0) & (ids < target.shape[1])  # like the kernels: other ids count nowhere
    onehot = torch.nn.functional.one_hot(ids.clamp(0, target.shape[1] - 1), target.shape[1]).to(target.dtype)
    onehot = onehot * mask[..., None]
    target += torch.einsum("pth,pts->psh", per_token, onehot)


def accumulate_conductance_ref(a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                               carry: Optional[Carry] = None, rule: str = "trapezoid", *,
                               segments: Optional[torch.Tensor] = None,
                               coarse_out: Optional[torch.Tensor] = None,
                               first_point: Optional[int] = None) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`accumulate_conductance` (same contract).

    Materialises the differences and products in the accumulator's dtype; it
    is the unfused expression the fused op is tested and benchmarked against.
    """
    _check(a, g, lengths, out, carry, rule, segments, coarse_out, first_point)
    if segments is not None:
        segments = _prepare_segments(segments, lengths, out.shape[1])
    first_point = _resolve_first_point(carry, coarse_out, first_point)
    acc = out.dtype
    a_all, g_all = a.to(acc), g.to(acc)
    if carry is not None and carry.filled:
        a_all = torch.cat([carry.a.to(acc).unsqueeze(1), a_all], dim=1)
        g_all = torch.cat([carry.g.to(acc).unsqueeze(1), g_all], dim=1)
    _ref_add(a_all, g_all, rule, lengths, segments, out)
    steps = a.shape[1]
    if coarse_out is not None:
        even = [s for s in range(steps) if (first_point + s) % 2 == 0]
        a_even, g_even = a[:, even].to(acc), g[:, even].to(acc)
        if carry is not None and carry.even_filled:
            a_even = torch.cat([carry.a_even.to(acc).unsqueeze(1), a_even], dim=1)
            g_even = torch.cat([carry.g_even.to(acc).unsqueeze(1), g_even], dim=1)
        _ref_add(a_even, g_even, "trapezoid", lengths, segments, coarse_out)
        if carry is not None and even:
            carry.a_even.copy_(a[:, even[-1]])
            carry.g_even.copy_(g[:, even[-1]])
    if carry is not None and steps > 0:
        carry.a.copy_(a[:, -1])
        carry.g.copy_(g[:, -1])
    _update_carry(carry, steps, coarse_out is not None, first_point)
    return out
