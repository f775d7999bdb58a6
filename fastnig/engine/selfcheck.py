"""Checks of this installation against fastnig's own references: what ``fastnig doctor`` runs.

Owns: the checks, each a :class:`CheckResult` (PASS, FAIL, SKIP or INFO);
the facts printed before them (versions, the extension's build, the
devices) are :mod:`fastnig.engine.build_info`'s.

* the fused op against its pure-PyTorch reference (in float64) on odd shapes
  (one token, one feature, a pair without real tokens, several token and
  feature blocks, feature counts that fill no vector), rules left and
  trapezoid, one call and chunks linked by a carry (a zero-step chunk
  among them), with segments and with the coarse (half-step) accumulator,
  and fp16 / bf16 / fp64 inputs (:func:`check_kernel`);
* run-to-run bit identity of the op (:func:`check_bit_identity`);
* an attribution of a tiny random BERT built in code (:func:`tiny_cross_encoder`):
  finite scores and a small convergence delta (:func:`check_attribution`); on
  a GPU, the GPU's attribution against the CPU's (:func:`check_against_cpu`);
* the out-of-memory redo on the device: an out-of-memory error raised by a
  hook of the tiny model in the first chunk's backward and in later chunks;
  each result must equal an unchunked run's (:func:`check_oom_redo`);
* a short throughput figure (:func:`measure_throughput`).

The op and the device are parameters of every check, so that the GPU's checks
run on a machine without one through
:func:`fastnig.engine.kernels.accumulate_conductance_emulated` (the CUDA
kernels' thread bodies on the CPU).  :func:`cpu_checks` and
:func:`device_checks` run the lists ``fastnig doctor`` prints.

Must not: print (``fastnig.cli.doctor_cmd`` lays the results out), touch the
network or files outside a temporary folder, or leave global state changed
(torch's random state, the forced CPU-kernel build and the models it builds
are restored or private).
"""
from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .build_info import cuda_architectures, runs_on
from .kernels import (
    Carry,
    accumulate_conductance,
    accumulate_conductance_emulated,
    accumulate_conductance_ref,
    available_cpu_isas,
    cuda_kernels_built,
    forced_cpu_isa,
)

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"

KernelOp = Callable[..., torch.Tensor]
"""``op(a, g, lengths, out, carry, rule, *, segments=None, coarse_out=None)``: the contract of
:func:`fastnig.engine.kernels.accumulate_conductance` (its emulation and reference share it)."""


@dataclass
class CheckResult:
    """One line of the doctor's table: ``status`` is PASS, FAIL, SKIP (not run here, ``detail`` says why)
    or INFO (a measurement, nothing to pass)."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def run_check(name: str, check: Callable[..., Tuple[str, str]], *args, **kwargs) -> CheckResult:
    """``check(*args, **kwargs)`` -> ``(status, detail)`` as a :class:`CheckResult`; an exception is a FAIL
    that names it (a check never stops the others)."""
    started = time.perf_counter()
    try:
        status, detail = check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the doctor
        lines = str(exc).strip().splitlines()
        status, detail = FAIL, f"raised {type(exc).__name__}: {lines[0][:300] if lines else ''}"
    return CheckResult(name, status, detail, time.perf_counter() - started)


# --------------------------------------------------------------- kernels
ODD_SHAPES: Tuple[Tuple[Tuple[int, int, int, int], Tuple[int, ...]], ...] = (
    ((1, 1, 1, 1), (1,)),               # one of everything
    ((1, 2, 1, 5), (1,)),
    ((3, 5, 7, 33), (7, 1, 0)),         # a pair without real tokens
    ((2, 9, 21, 130), (21, 4)),         # several token and feature blocks on CUDA
    ((4, 3, 1, 17), (1, 1, 1, 1)),
    ((2, 6, 37, 300), (37, 20)),        # features that fill no vector register
)
"""``((pairs, steps, tokens, features), lengths)`` the kernel checks run on."""

OTHER_DTYPES = (torch.bfloat16, torch.float16, torch.float64)
"""Input dtypes checked on one shape besides float32 (float64 accumulates in float64, the others in float32)."""

TOLERANCE = 1e-5
"""Largest error allowed against the float64 reference, relative to the result's largest magnitude (at least 1)."""


def _inputs(shape, lengths, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    segments = torch.randint(0, 3, (shape[0], shape[2]), generator=gen)
    return a, g, torch.tensor(lengths, dtype=torch.int64), segments


def _bounds(steps: int) -> List[Tuple[int, int]]:
    """Chunks of ``range(steps)``: a first chunk of one point (odd: moves the even-point carry), a
    zero-step chunk, then the rest in two."""
    cuts = [0, min(1, steps), min(1, steps), max(min(1, steps), steps // 2), steps]
    return list(zip(cuts[:-1], cuts[1:]))


def _variants(rule: str) -> List[Tuple[str, bool, bool, bool]]:
    """(label, chunked, segments, coarse) of the calls checked for ``rule``."""
    out = [("one call", False, False, False), ("chunks + carry", True, False, False),
           ("segments", True, True, False)]
    if rule == "trapezoid":
        out += [("coarse", True, False, True), ("segments + coarse", True, True, True)]
    return out


def _accumulate(op: KernelOp, a, g, lengths, segments, rule: str, chunked: bool, with_segments: bool,
                coarse: bool, acc_dtype: torch.dtype) -> List[torch.Tensor]:
    """``op`` over ``a``/``g`` as one call or in :func:`_bounds` chunks; returns out (and coarse_out)."""
    pairs, steps, _, features = a.shape
    shape = (pairs, 3, features) if with_segments else (pairs, features)
    out = torch.zeros(shape, dtype=acc_dtype, device=a.device)
    coarse_out = torch.zeros_like(out) if coarse else None
    kwargs = {}
    if with_segments:
        kwargs["segments"] = segments
    if coarse:
        kwargs["coarse_out"] = coarse_out
    if not chunked:
        op(a, g, lengths, out, None, rule, **kwargs)
    else:
        carry = Carry.like(a, coarse=coarse)
        for start, stop in _bounds(steps):
            op(a[:, start:stop], g[:, start:stop], lengths, out, carry, rule, **kwargs)
    return [out] if coarse_out is None else [out, coarse_out]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _op(op: Optional[KernelOp]) -> KernelOp:
    """``op``, or the fused op when ``None`` (looked up at the call, so a test can replace it)."""
    return accumulate_conductance if op is None else op


@lru_cache(maxsize=512)
def _reference(shape, lengths, dtype, seed: int, rule: str, variant) -> Tuple[torch.Tensor, ...]:
    """The float64 reference of one case (computed once: every build of the kernel is checked against it)."""
    a, g, lens, seg = _inputs(shape, lengths, dtype, seed)
    _, chunked, with_segments, coarse = variant
    return tuple(_accumulate(accumulate_conductance_ref, a.double(), g.double(), lens, seg, rule, chunked,
                             with_segments, coarse, torch.float64))


def check_kernel(op: Optional[KernelOp] = None, device="cpu", *,
                 shapes=ODD_SHAPES, dtypes=OTHER_DTYPES) -> Tuple[str, str]:
    """``op`` (default: the fused op) on ``device`` against :func:`accumulate_conductance_ref` in float64 on
    the CPU: every shape of ``shapes`` x rule (left, trapezoid) x call pattern (:func:`_variants`) in
    float32, and ``dtypes`` inputs on one shape."""
    op, device = _op(op), torch.device(device)
    cases: List[Tuple[str, tuple, tuple, torch.dtype]] = []
    for shape, lengths in shapes:
        cases.append((f"{shape}", shape, lengths, torch.float32))
    odd = shapes[min(2, len(shapes) - 1)]
    cases += [(f"{odd[0]} {str(d).replace('torch.', '')}", odd[0], odd[1], d) for d in dtypes]
    worst, failures, count = 0.0, [], 0
    for i, (label, shape, lengths, dtype) in enumerate(cases):
        a, g, lens, seg = _inputs(shape, lengths, dtype, seed=i)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for rule in ("left", "trapezoid"):
            for variant in _variants(rule):
                name, chunked, with_segments, coarse = variant
                ours = _accumulate(op, a.to(device), g.to(device), lens.to(device), seg.to(device), rule, chunked,
                                   with_segments, coarse, acc)
                _sync(device)
                ref = _reference(tuple(shape), tuple(lengths), dtype, i, rule, variant)
                count += 1
                for got, want in zip(ours, ref):
                    got = got.cpu().double()
                    scale = max(1.0, float(want.abs().max()))
                    error = float((got - want).abs().max()) / scale if got.numel() else 0.0
                    if not torch.isfinite(got).all():
                        error = float("inf")
                    worst = max(worst, error)
                    if error > TOLERANCE:
                        failures.append(f"{label} rule={rule} {name}: error {error:.1e}")
    others = "".join(f", {str(d).replace('torch.', '')}" for d in dtypes)
    summary = (f"{count} cases: {len(shapes)} odd shapes x rules left/trapezoid x one call, chunks + carry, "
               f"segments, coarse; float32{others} inputs; max error {worst:.1e} (tolerance {TOLERANCE:g})")
    if failures:
        return FAIL, f"{len(failures)} of {count} cases differ from the reference, e.g. {failures[0]}; {summary}"
    return PASS, summary


def check_bit_identity(op: Optional[KernelOp] = None, device="cpu", repeats: int = 3) -> Tuple[str, str]:
    """``op`` (default: the fused op) run ``repeats`` times on the same inputs (chunks, segments and the
    coarse accumulator, the largest shape of the checks): every output bit for bit equal to the first run's."""
    op, device = _op(op), torch.device(device)
    a, g, lens, seg = _inputs((3, 9, 70, 300), (70, 33, 5), seed=11)
    a, g, lens, seg = a.to(device), g.to(device), lens.to(device), seg.to(device)
    runs = []
    for _ in range(repeats):
        runs.append(_accumulate(op, a, g, lens, seg, "trapezoid", True, True, True, torch.float32))
        _sync(device)
    differ = sum(not all(torch.equal(x, y) for x, y in zip(run, runs[0])) for run in runs[1:])
    if differ:
        return FAIL, f"{differ} of {repeats - 1} reruns differ from the first run in some bits"
    return PASS, f"{repeats} runs of the same chunked inputs (segments + coarse), all bits equal"


# ------------------------------------------------------------ tiny model
_WORDS = """the a of to in and is for on with what how why does heat flow flows boundary layer pressure wing
wings shock wave waves supersonic laminar transfer theory cancer cell cells patient patients diet food vitamin
blood risk protein gene brain search query document index library data study results effect effects""".split()

TINY_PAIRS: Tuple[Tuple[str, str], ...] = (
    ("heat flow", "boundary layer heat transfer behind a shock wave in supersonic flow"),
    ("what is the effect of diet on cancer", "vitamin and protein in the diet of cancer patients"),
    ("wing pressure", "pressure on the wing"),
    ("how does a gene affect the brain", ""),
    ("search", "a library index of documents for search of data"),
)
"""(query, passage) pairs of different lengths (an empty passage and an unknown word among them)."""


def tiny_cross_encoder(*, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                       intermediate: int = 64, max_positions: int = 128):
    """A randomly initialised 2-logit BERT cross-encoder and its WordPiece tokenizer, built offline.

    The vocabulary (special tokens, some words, letters and their ``##``
    pieces) is written to a temporary folder that the fast tokenizer reads
    and that is removed again; torch's global random state is left as it was.
    """
    import string

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *string.ascii_lowercase,
              *("##" + c for c in string.ascii_lowercase), *string.digits, *".,;:?!'()-"]
    with TemporaryDirectory(prefix="fastnig-doctor-") as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
        tokenizer = BertTokenizerFast(str(vocab))  # positional: `vocab_file` in transformers 4, `vocab` in 5
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions, num_labels=2, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
    return model, tokenizer


def _settings(**overrides):
    from .settings import AttributionSettings

    # Richardson (the default rule) over 20 intervals, 7 points per forward: three chunks linked by carries.
    base = dict(steps=20, step_batch=7, pair_batch=2, max_length=64)
    return AttributionSettings(**{**base, **overrides})


class TinyModel:
    """The tiny cross-encoder of the checks (built at first use, so that a failure to build it is the
    failure of the check that needs it), its pairs, and its CPU attribution (computed once)."""

    def __init__(self, **shape):
        self._shape = shape
        self._built = None
        self.pairs = list(TINY_PAIRS)
        self._cpu = None

    def _build(self):
        if self._built is None:
            self._built = tiny_cross_encoder(**self._shape)
        return self._built

    @property
    def model(self):
        return self._build()[0]

    @property
    def tokenizer(self):
        return self._build()[1]

    def attribute(self, device="cpu", **overrides):
        """NIG of :data:`TINY_PAIRS` with :func:`_settings` (``overrides`` applied) on ``device``
        (a copy of the model goes there; the CPU model is never moved)."""
        from .attribute import attribute

        device = torch.device(device)
        model = self.model if device.type == "cpu" else copy.deepcopy(self.model).to(device)
        return attribute(model, self.pairs, _settings(**overrides), tokenizer=self.tokenizer, progress=False)

    def cpu_result(self):
        if self._cpu is None:
            self._cpu = self.attribute("cpu")
        return self._cpu


DELTA_TOLERANCE = 1e-3
"""Largest |convergence delta| of the tiny model's attribution (F is a probability; N = 20, Richardson)."""


def check_attribution(tiny: TinyModel, device="cpu") -> Tuple[str, str]:
    """The tiny model's attribution on ``device``: every score finite, |delta| <= :data:`DELTA_TOLERANCE`."""
    result = tiny.cpu_result() if torch.device(device).type == "cpu" else tiny.attribute(device)
    bad = [n for n, s in result.scores.items() if not torch.isfinite(s).all()]
    delta = result.delta.abs()
    change = (result.f_input - result.f_baseline).abs().max()
    detail = (f"{len(delta)} pairs, {len(result.scores)} Linear modules, N = 20 (Richardson, 3 chunks); "
              f"max |delta| {float(delta.max()):.1e} (tolerance {DELTA_TOLERANCE:g}; "
              f"|F(input) - F(baseline)| up to {float(change):.2g})")
    if bad:
        return FAIL, f"scores of {bad[0]} (and {len(bad) - 1} more) are not finite; {detail}"
    if not torch.isfinite(delta).all() or float(delta.max()) > DELTA_TOLERANCE:
        return FAIL, f"convergence delta too large: {detail}"
    return PASS, detail


AGREEMENT = 1e-4
"""Largest difference between two devices' (or two chunkings') scores, relative to each layer's largest |score|."""


def _difference(got, want) -> Tuple[float, str]:
    """Largest difference of the scores over layers, relative to each layer's largest |score|, and its layer."""
    worst, where = 0.0, ""
    for name, ref in want.scores.items():
        error = float((got.scores[name].cpu() - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        if not error <= worst:  # NaN counts as the worst
            worst, where = error, name
    return worst, where


def check_against_cpu(tiny: TinyModel, device) -> Tuple[str, str]:
    """The tiny model's attribution on ``device`` against the CPU's: every layer within :data:`AGREEMENT`."""
    got, want = tiny.attribute(device), tiny.cpu_result()
    worst, where = _difference(got, want)
    delta = float((got.delta.cpu() - want.delta).abs().max())
    detail = f"largest difference {worst:.1e} of a layer's largest |score| ({where}); deltas differ by {delta:.1e}"
    if not worst <= AGREEMENT:
        return FAIL, detail + f" (tolerance {AGREEMENT:g})"
    return PASS, detail + f" (tolerance {AGREEMENT:g})"


OOM_POSITIONS: Tuple[Tuple[str, int], ...] = (("backward", 1), ("forward", 2), ("backward", 3))
"""Where the injected out-of-memory error is raised: (pass, n) = during the n-th forward or backward
pass through the first layer's intermediate Linear (the 1st backward is the first chunk's, where memory
peaks; the other layers' hooks have run by then)."""


def _out_of_memory_error(device: torch.device) -> BaseException:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return oom(f"{'CUDA' if device.type == 'cuda' else 'CPU'} out of memory (injected by fastnig doctor)")


@contextmanager
def injected_out_of_memory(module: torch.nn.Module, where: str, at: int, device) -> Iterator[List[int]]:
    """Raise an out-of-memory error once, in the ``at``-th ``where`` (``"forward"`` or ``"backward"``)
    pass through ``module``: a forward hook of the module (and, for the backward, a hook on its output).
    Yields ``[passes seen, raised]``; removes the hook on exit."""
    if where not in ("forward", "backward"):
        raise ValueError(f"where must be 'forward' or 'backward', got {where!r}")
    state = [0, 0]
    device = torch.device(device)

    def tick():
        state[0] += 1
        if state[0] == at and not state[1]:
            state[1] = 1
            raise _out_of_memory_error(device)

    def hook(mod, inputs, output):
        if where == "forward":
            tick()
        elif isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: tick())

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def check_oom_redo(tiny: TinyModel, device="cpu", positions: Sequence[Tuple[str, int]] = OOM_POSITIONS
                   ) -> Tuple[str, str]:
    """The out-of-memory redo on ``device``: for each position of ``positions`` an out-of-memory error is
    injected (:func:`injected_out_of_memory`) into a chunked attribution of the tiny model (7 points per
    forward, then halved), which must equal the unchunked attribution (all 21 points in one forward)."""
    device = torch.device(device)
    model = tiny.model if device.type == "cpu" else copy.deepcopy(tiny.model).to(device)
    from .attribute import attribute

    def run(**overrides):  # two pairs of different lengths: one batch, with padding
        return attribute(model, tiny.pairs[:2], _settings(**overrides), tokenizer=tiny.tokenizer, progress=False)

    whole = run(step_batch=21)
    module = model.bert.encoder.layer[0].intermediate.dense
    failures, worst = [], 0.0
    for where, at in positions:
        with warnings.catch_warnings(), injected_out_of_memory(module, where, at, device) as state:
            warnings.simplefilter("ignore")  # the engine's warning that it redoes the chunk
            got = run()  # an error the engine does not handle ends the check (a FAIL naming it)
        if not state[1]:
            failures.append(f"{where} {at}: the injected error was never raised ({state[0]} passes)")
            continue
        error, layer = _difference(got, whole)
        worst = max(worst, error) if error == error else float("inf")
        if not error <= AGREEMENT:
            failures.append(f"{where} pass {at}: {layer} differs by {error:.1e} of its largest |score|")
    names = ", ".join(f"{w} {n}" for w, n in positions)
    if failures:
        return FAIL, f"a redone chunk changes the result: {'; '.join(failures)} (positions: {names})"
    return PASS, (f"out of memory injected at {len(positions)} positions ({names}); each redo equals the "
                  f"unchunked run (largest difference {worst:.1e}, tolerance {AGREEMENT:g})")


# ------------------------------------------------------------ throughput
def _time(fn: Callable[[], object], device: torch.device, seconds: float, at_least: int = 2) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), over about ``seconds``."""
    fn()
    _sync(device)
    calls, started = 0, time.perf_counter()
    while calls < at_least or time.perf_counter() - started < seconds:
        fn()
        calls += 1
        _sync(device)
    return (time.perf_counter() - started) / calls


def measure_throughput(op: Optional[KernelOp] = None, device="cpu", *, seconds: float = 1.0,
                       model: bool = True) -> Tuple[str, str]:
    """INFO: the fused op's read bandwidth on ``device`` (a and g of one chunk, GB/s), and on a GPU
    (``model``) the pairs per second of a MiniLM-L6-shaped random cross-encoder at 128 tokens, N = 32."""
    op, device = _op(op), torch.device(device)
    if device.type == "cuda":
        shape, dtype = (2, 33, 512, 3072), torch.bfloat16
    else:
        shape, dtype = (1, 17, 128, 1536), torch.float32
    gen = torch.Generator(device=device).manual_seed(0)  # torch's global random state stays as it was
    a = torch.randn(shape, generator=gen, device=device).to(dtype)
    g = torch.randn(shape, generator=gen, device=device).to(dtype)
    lens = torch.full((shape[0],), shape[2], dtype=torch.int64, device=device)
    out = torch.zeros(shape[0], shape[3], device=device)
    per_call = _time(lambda: op(a, g, lens, out, None, "trapezoid"), device, seconds)
    gbs = 2 * a.numel() * a.element_size() / per_call / 1e9
    dtype_name = str(dtype).replace("torch.", "")
    parts = [f"fused op {gbs:.1f} GB/s ({shape} {dtype_name}, {per_call * 1e3:.2f} ms a chunk)"]
    if model and device.type == "cuda":
        from .attribute import attribute

        tiny = TinyModel(hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512)
        net = tiny.model.to(device)
        words = " ".join(_WORDS)
        pairs = [(" ".join(_WORDS[:8]), (words + " ") * 3)] * 8  # ~128 tokens a pair
        settings = _settings(steps=32, step_batch="auto", pair_batch=4, max_length=128)
        attribute(net, pairs[:4], settings, tokenizer=tiny.tokenizer, progress=False)  # warm-up
        _sync(device)
        started = time.perf_counter()
        attribute(net, pairs, settings, tokenizer=tiny.tokenizer, progress=False)
        _sync(device)
        rate = len(pairs) / (time.perf_counter() - started)
        parts.append(f"attribution {rate:.1f} pairs/s ({rate * 33:.0f} path points/s; MiniLM-L6 shape, "
                     "128 tokens, N = 32, Richardson)")
    return INFO, "; ".join(parts)


# --------------------------------------------------------------- the lists
def cpu_checks(op: Optional[KernelOp] = None, *, tiny: Optional[TinyModel] = None,
               quick: bool = False) -> List[CheckResult]:
    """The CPU's checks: ``op`` against the reference once per build of the CPU kernel, its bit identity,
    the CUDA kernels' code through the host emulation (not ``quick``), the tiny model's attribution, and
    (not ``quick``) the op's bandwidth."""
    results: List[CheckResult] = []
    try:
        isas = available_cpu_isas()
    except ImportError as exc:
        return [CheckResult("compiled extension", FAIL, str(exc))]
    for isa in isas:
        with forced_cpu_isa(isa):
            results.append(run_check(f"CPU kernel ({isa}) vs reference", check_kernel, op, "cpu"))
    results.append(run_check("CPU kernel: bit identical run to run", check_bit_identity, op, "cpu"))
    if not quick:
        results.append(run_check("CUDA kernel code (host emulation) vs reference", check_kernel,
                                 accumulate_conductance_emulated, "cpu", dtypes=()))
    tiny = tiny or TinyModel()
    results.append(run_check("tiny BERT attribution on the CPU (finite, small delta)", check_attribution,
                             tiny, "cpu"))
    if not quick:
        results.append(run_check("CPU throughput", measure_throughput, op, "cpu", seconds=0.5))
    return results


def device_checks(device, op: Optional[KernelOp] = None, *, tiny: Optional[TinyModel] = None,
                  quick: bool = False, throughput: bool = True) -> List[CheckResult]:
    """A GPU's checks (``device``, e.g. ``"cuda:0"``): the build has code for it, ``op`` against the
    reference there and its bit identity, the tiny model's attribution there against the CPU's, the
    out-of-memory redo there, and (``throughput``, not ``quick``) a throughput figure.

    With ``device="cpu"`` and ``op=accumulate_conductance_emulated`` the same list runs here (the build
    check is then skipped): how the tests exercise the GPU path without a GPU.
    """
    device = torch.device(device)
    label = str(device)
    results: List[CheckResult] = []
    if device.type == "cuda":
        try:
            built = cuda_kernels_built()
        except ImportError as exc:
            return [CheckResult(f"{label}: compiled extension", FAIL, str(exc))]
        if not built:
            return [CheckResult(f"{label}: CUDA kernels", FAIL,
                                "fastnig was built without its CUDA kernels (no nvcc at build time): attribution "
                                "on this GPU fails; reinstall where nvcc is on PATH (docs/install.md)")]
        p = torch.cuda.get_device_properties(device)
        archs = cuda_architectures()
        if not archs:  # not readable from the library
            results.append(CheckResult(f"{label}: GPU code for compute {p.major}.{p.minor}", SKIP,
                                       "the compiled architectures are unknown (the kernel check below decides)"))
        elif runs_on(archs, (p.major, p.minor)):
            results.append(CheckResult(f"{label}: GPU code for compute {p.major}.{p.minor}", PASS,
                                       f"{p.name}; compiled: {', '.join(archs)}"))
        else:
            results.append(CheckResult(f"{label}: GPU code for compute {p.major}.{p.minor}", FAIL,
                                       f"{p.name} needs sm_{p.major}x or PTX <= compute_{p.major}{p.minor}; compiled: "
                                       f"{', '.join(archs)}; rebuild on this machine (docs/install.md)"))
    results.append(run_check(f"{label}: kernel vs reference", check_kernel, op, device))
    results.append(run_check(f"{label}: kernel bit identical run to run", check_bit_identity, op, device))
    tiny = tiny or TinyModel()
    results.append(run_check(f"{label}: tiny BERT attribution vs the CPU's", check_against_cpu, tiny, device))
    results.append(run_check(f"{label}: out-of-memory redo equals an unchunked run", check_oom_redo, tiny, device))
    if throughput and not quick:
        results.append(run_check(f"{label}: throughput", measure_throughput, op, device))
    return results


def summary(results: Sequence[CheckResult]) -> Dict[str, int]:
    """How many checks have each status."""
    return {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP, INFO)}
