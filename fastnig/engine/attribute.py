"""Neuron Integrated Gradients (conductance) of every Linear neuron in one pass.

Owns: :func:`attribute` and :class:`Attributions` — the path from a baseline
to the input, its chunks and memory model, the hooks that feed every Linear's
activations and gradients to the fused op, ``steps="auto"``.  Must not:
tokenise or read logits itself (:mod:`fastnig.engine.model`), know about
datasets, schemes or files.

``attribute(model, pairs)`` interpolates the word embeddings of each
(query, passage) pair from a baseline to the input (docs/method.md §3), evaluates all
path points in batched forward + backward passes, and, from hooks on every
selected ``nn.Linear``, feeds each layer's activations and output gradients to
the fused op of :mod:`fastnig.engine.kernels`, which adds the conductance summed over
the pair's real tokens into a per-pair accumulator (docs/method.md §5).  Where the
classification head reads only the first token, the last layer runs past
self-attention (and, for the BERT family, its queries) on that token alone
(:func:`first_token_only`): exact, and ~14 % less matrix work on a 6-layer model.
A chunk of path points that runs out of memory is undone and redone in halves
(:func:`_attribute_batch`); ``step_batch="auto"`` sizes chunks by a memory
model of everything a chunk holds (:func:`chunk_memory`).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .encoding import SEGMENTS, EncodedPairs, Pair, baseline_embeddings, validate_pairs
from .kernels import Carry, accumulate_conductance
from .memory import ChunkLimit, auto_step_batch, first_line, is_out_of_memory, release_memory
from .model import (
    check_compute_dtype,
    check_model,
    compute_autocast,
    detached_parameters,
    frozen_eval,
    input_embeddings,
    load_tokenizer,
    move_model,
    single_device,
    unwrap,
)
from .quadrature import (
    auto_converged,
    auto_step_levels,
    error_estimate,
    kernel_rule,
    path_nodes,
    relative_delta,
    richardson,
    top_error,
    uses_coarse,
)
from .rankers import BoundRanker, Ranker, bind_ranker
from .scoring import TargetSpec, normalize_targets, target_function
from .settings import AttributionSettings
from .two_tower import attributed_by
from .units import CONTEXT, Unit, attribute_units, engine_target, relabel, split_head_scores


@dataclass
class Attributions:
    """NIG of every attributed neuron for a list of (query, passage) pairs.

    Attributes:
        scores: module name (as in ``model.named_modules()``) -> float32 tensor
            ``[num_pairs, out_features]``: NIG of each output unit summed over
            the pair's real tokens, in units of F.
        delta: ``[num_pairs]`` convergence delta: NIG over the word-embedding
            input minus ``f_input - f_baseline`` (0 for an exact integral).
        f_input, f_baseline: ``[num_pairs]`` F at the input and the baseline.
        targets: per pair, ``"relevant"`` or ``"non-relevant"``.
        num_tokens: ``[num_pairs]`` real tokens of each pair after truncation.
        steps_used: ``[num_pairs]`` path intervals N of each pair (differs
            between pairs only with ``steps="auto"``).
        settings: what the scores were computed with (model, target function,
            baseline, steps, rule, max_length, dtype; ``segments: True`` when on).
        segment_scores: with ``attribute(..., segments=True)``, module name ->
            float32 ``[num_pairs, 3, out_features]``: the same NIG split by the
            segment of the token it flows through, :data:`SEGMENTS` =
            ("query", "passage", "special"); ``scores`` is its sum over dim 1.
            ``None`` otherwise.
        error_estimate: with ``rule="richardson"``, module name -> float32
            ``[num_pairs, out_features]``: |T_N - T_{N/2}| / 3 per neuron
            (:func:`fastnig.engine.quadrature.error_estimate`), an estimate of the
            error of the trapezoid sum T_N (asymptotic, not a bound: a transition
            narrower than 2h can leave T_N ≈ T_{N/2} while both are wrong); R_N's
            own error is of higher order, so where the asymptotics hold it is
            smaller than this.  ``None`` for other rules.
    """

    scores: Dict[str, torch.Tensor]
    delta: torch.Tensor
    f_input: torch.Tensor
    f_baseline: torch.Tensor
    targets: List[str]
    num_tokens: torch.Tensor
    settings: Dict[str, object] = field(default_factory=dict)
    steps_used: Optional[torch.Tensor] = None
    segment_scores: Optional[Dict[str, torch.Tensor]] = None
    error_estimate: Optional[Dict[str, torch.Tensor]] = None
    head_scores: Optional[Dict[str, torch.Tensor]] = None  # heads=True: output projection -> [pairs, heads]
    head_segment_scores: Optional[Dict[str, torch.Tensor]] = None  # heads and segments: [pairs, 3, heads]

    @property
    def num_pairs(self) -> int:
        return int(self.delta.shape[0])

    @property
    def num_neurons(self) -> int:
        return sum(int(s.shape[1]) for s in self.scores.values())

    def relative_delta(self) -> torch.Tensor:
        """``[num_pairs]`` |delta| / |F(x) - F(x')| (inf where F did not move)."""
        return relative_delta(self.delta, self.f_input, self.f_baseline)


# ---------------------------------------------------------------- the engine
# Threads of the CPU kernel when called between autograd's ops: torch's OpenMP
# workers spin-wait for a while after each op, so a second kernel thread only
# fights them for the core (MiniLM shape: 83 ms of kernel time per call of
# attribute with 1 thread, 123 ms with 2).
ENGINE_CPU_KERNEL_THREADS = 1

class _HookState:
    """Per-chunk bookkeeping shared by the forward and gradient hooks.

    ``out[name]``: ``[P, features]`` accumulators (``[P, 3, features]`` with
    ``segments``, the ``[P, T]`` ids of :attr:`EncodedPairs.segments`),
    ``carries[(name, call)]``: the previous chunk's last point of each call of the module in a
    forward; both live on the module's device.
    ``coarse[name]``: accumulators of ``out``'s shape for the half-step trapezoid
    sum (``rule="richardson"``), else ``None``; ``rule`` is the op's rule (:func:`kernel_rule`).
    ``first_point``: the global index of the chunk's first path point, given to the op
    (it decides the even points; with a half-step sum, a carry that does not end just
    before it is an error, never a silent wrong step).  ``unscale``: ``None``, or with
    fp16 compute the ``[P, S]`` powers of two that undo each path point's gradient scale
    (:func:`_gradient_scale`), applied in float32 before the op.

    A module called several times in a forward (a shared tower, a tied Linear) gets per call its own
    activation, gradient and carry (keyed by the call's index); all calls add into ``out[name]``
    (docs/method.md §5), each with the layout of the tower running (``tower_of()`` indexes
    :attr:`EncodedPairs.towers`: ``(lengths, segments)``), else the pair's.

    The forward hooks act only in the thread that made the state (the one running
    :func:`attribute`): another thread's forward of the same model passes them untouched.
    """

    def __init__(self, pairs: int, steps_in_chunk: int, lengths: torch.Tensor, rule: str,
                 out: Dict[str, torch.Tensor], carries: Dict[Tuple[str, int], Carry],
                 segments: Optional[torch.Tensor] = None, coarse: Optional[Dict[str, torch.Tensor]] = None,
                 first_point: int = 0, read_segment: Optional[torch.Tensor] = None,
                 towers: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None, tower_of=None):
        self.pairs, self.steps, self.lengths, self.rule = pairs, steps_in_chunk, lengths, rule
        self.first_point = first_point
        self.thread = threading.get_ident()
        self.unscale: Optional[torch.Tensor] = None
        self.segments, self.coarse, self.read_segment = segments, coarse, read_segment
        self.towers, self.tower_of = towers, tower_of
        self.layouts: Dict[Tuple[object, int, torch.device], Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.out, self.carries = out, carries
        self.calls: Dict[str, int] = {}  # calls of each module so far in this forward
        self.activations: Dict[Tuple[str, int], Tuple[torch.Tensor, Optional[int]]] = {}

    def on_forward(self, name: str, output: torch.Tensor) -> None:
        if threading.get_ident() != self.thread or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if output.dim() not in (2, 3):
            raise ValueError(f"layer {name}: expected a [batch, tokens, features] or [batch, features] output, "
                             f"got {tuple(output.shape)}")
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        tower = self.tower_of() if self.tower_of is not None else None
        key = (name, call)
        self.activations[key] = (output, tower)
        output.register_hook(lambda grad, key=key: self.on_grad(key, grad))

    def _layout(self, tower: Optional[int], tokens: int, device: torch.device):
        """``(real tokens [P], segment ids [P, tokens] or None)`` of an output of ``tokens`` tokens made by ``tower``
        (``None``: the pair's first ``tokens``; T = 1 past the first-token cut and for a pooler's ``[batch,
        features]``: the scored position's segment, ``read_segment``), cached per device."""
        key = (tower, tokens, device)
        if key not in self.layouts:
            lengths, ids = (self.lengths, self.segments) if tower is None else self.towers[tower]
            if self.segments is None:
                ids = None
            elif tokens == 1 and self.read_segment is not None and tower is None:
                ids = self.read_segment[:, None]
            self.layouts[key] = (lengths.to(device).clamp(max=tokens),
                                 None if ids is None else ids[:, :tokens].to(device).contiguous())
        return self.layouts[key]

    def on_grad(self, key: Tuple[str, int], grad: torch.Tensor) -> None:
        name = key[0]
        a, tower = self.activations.pop(key)
        if a.dim() == 2:  # [batch, features] (a pooler): one "token" per pair
            a, grad = a.unsqueeze(1), grad.unsqueeze(1)
        a4 = a.unflatten(0, (self.pairs, self.steps))
        g4 = grad.unflatten(0, (self.pairs, self.steps))
        if self.unscale is not None:  # fp16: exact powers of two, undone in float32
            a4, g4 = _unscaled(a4, g4, self.unscale)
        carry = self.carries.get(key)
        if carry is None:
            carry = self.carries[key] = Carry.like(a4, coarse=self.coarse is not None)
        lengths, segments = self._layout(tower if self.towers is not None else None, a4.shape[2], a4.device)
        accumulate_conductance(a4, g4, lengths, self.out[name], carry, self.rule, ENGINE_CPU_KERNEL_THREADS,
                               segments=segments, coarse_out=self.coarse[name] if self.coarse is not None else None,
                               first_point=self.first_point)

    def clear(self) -> None:
        """Drop the activations of a failed pass (each holds a hook that refers back to this state)."""
        self.activations.clear()


def _gradient_scale(f: torch.Tensor, output: str) -> Optional[torch.Tensor]:
    """``[rows]`` float32 powers of two to seed the backward of fp16 compute with, or ``None``.

    fp16 has no loss scaling of its own: for a saturated pair dF/dz = F (1 - F)
    (``output="probability"``) is tiny, and the gradients of deep activations
    underflow to zero before the float32 op sees them.  Seeding each path
    point's backward with s = 2^k such that s · F (1 - F) lies in [1, 2) scales
    every gradient of that point by s exactly (a power of two commutes with
    rounding), which the hooks undo in float32 (:func:`_unscaled`).  With
    ``output="logit"`` dF/dz = ±1 and nothing is scaled.
    """
    if output != "probability":
        return None
    _, exponent = torch.frexp((f * (1 - f)).detach().float())  # F(1 - F) = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(f, dtype=torch.float32), (1 - exponent).clamp(0, 100))


def _unscaled(a4: torch.Tensor, g4: torch.Tensor, unscale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a4``, ``g4`` ``[P, S, T, F]`` in float32 (at least), ``g4`` times the ``[P, S]`` powers of two ``unscale``."""
    dtype = torch.promote_types(a4.dtype, torch.float32)
    return a4.to(dtype), g4.to(dtype) * unscale.to(g4.device, dtype)[:, :, None, None]


def path_chunks(total: int, size: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` covering ``range(total)``, as even as possible."""
    count = -(-total // size)
    bounds = [round(i * total / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def attribute(model: nn.Module, pairs: Sequence[Pair], settings: Optional[AttributionSettings] = None, *,
              tokenizer=None, target: TargetSpec = "relevant", device: Union[str, torch.device, None] = None,
              progress: bool = True, ranker: Union[None, str, Ranker, BoundRanker] = None,
              **overrides) -> Attributions:
    """NIG (conductance) of every Linear neuron of a ranker, per pair.

    One batched forward + backward over the path points gives every layer's
    attribution at once (docs/method.md §5); parameters get no gradients.  Safe against
    other threads using the same model meanwhile (their own forwards, backwards, even
    another ``attribute``): the hooks act in this thread only, and ``requires_grad`` is
    never flipped (this thread's forward sees the parameters detached).  The model must
    stay in eval mode meanwhile: a switch to training mode is an error.

    Args:
        model: a Hugging Face ranker of a family of :mod:`fastnig.rankers` — a
            sequence-classification cross-encoder (1 or 2 logits) or a
            ``sentence_transformers.CrossEncoder`` (its model and tokenizer are used),
            a monoT5, a yes/no decoder LLM, a decoder sequence classifier.
        pairs: list of (query, passage) strings; an empty or over-long passage
            is fine (truncated to ``max_length`` tokens, passage first).
        settings: how NIG is computed, an :class:`AttributionSettings`
            (``None`` = the defaults: ``baseline="pad"``, ``rule="richardson"``,
            ``steps=32``, ``output="probability"``, ...).
        tokenizer: its fast tokenizer; ``None`` loads ``model.config.name_or_path``'s.
        target: ``"relevant"``, ``"non-relevant"`` (or 1/0), or one per pair; or a
            :class:`fastnig.Unit` (conditional NIG toward that neuron or head), or a
            list of them: then a list of :class:`Attributions`, one per unit, run
            batched (:func:`fastnig.engine.units.attribute_units`).
        device: where to compute; ``None`` (default) = where the model is, which
            is not changed; a device = the model is moved there (a warning says so;
            it stays there).  A model spread over several devices (``device_map``)
            or with weights on ``meta`` is refused before any work.
        progress: show a progress bar over pairs.
        ranker: how the model turns a pair into tokens and F: ``None`` picks the
            family from the model's class; a family name (``"classifier"``,
            ``"monot5"``, ``"yes_no"``, ``"last_token_classifier"``) or a
            :mod:`fastnig.rankers` object (template, answer words) overrides it.
        **overrides: any field of :class:`AttributionSettings` by name (e.g.
            ``steps=64, baseline="zero", segments=True``), applied over ``settings``.

    Returns:
        :class:`Attributions` with ``scores[name]``: ``[num_pairs, out_features]``
        (and ``segment_scores`` ``[num_pairs, 3, out_features]`` with ``segments=True``).
        Outputs past the first-token cut and ``[batch, features]`` outputs (the
        pooler) have the first token only: [CLS], "special".
    """
    settings = AttributionSettings() if settings is None else settings
    if not isinstance(settings, AttributionSettings):
        raise TypeError(f"settings must be an AttributionSettings, got {type(settings).__name__}")
    if overrides:
        settings = settings.replace(**overrides)
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, Unit) for t in target):
        return attribute_units(model, pairs, target, settings, tokenizer=tokenizer, device=device,
                               progress=progress, ranker=ranker)  # several conditional targets, batched
    pairs = validate_pairs(pairs)
    unit = target if isinstance(target, Unit) else None  # conditional NIG (fastnig.engine.units)
    targets = normalize_targets("relevant" if unit is not None else target, len(pairs))
    model, tokenizer = unwrap(model, tokenizer)
    input_embeddings(check_model(model))
    if device is None:
        single_device(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    bound = bind_ranker(ranker, model, tokenizer)
    embeddings = bound.embeddings
    settings, modules = attributed_by(bound, settings)  # two-tower: F = ±score, SPLADE's vocabulary units
    max_length = bound.max_length(settings.max_length)
    move_model(model, device)
    device = single_device(model)
    weights = check_compute_dtype(model, settings.dtype)
    parameters = detached_parameters(model)
    fp16 = torch.float16 in (settings.dtype, weights)
    bound, modules, settings = engine_target(bound, modules, settings, unit, pairs[0], max_length, device)

    steps, rule, segments = settings.steps, settings.rule, settings.segments
    levels = auto_step_levels(settings.max_steps) if steps == "auto" else [steps]
    P = len(pairs)
    shape = (P, len(SEGMENTS)) if segments else (P,)
    scores = {n: torch.zeros(*shape, m.out_features, dtype=torch.float32) for n, m in modules.items()}
    input_nig = torch.zeros(P, dtype=torch.float64)
    f_input = torch.zeros(P, dtype=torch.float64)
    f_base = torch.zeros(P, dtype=torch.float64)
    num_tokens = torch.zeros(P, dtype=torch.long)
    steps_used = torch.zeros(P, dtype=torch.long)
    errors = ({n: torch.zeros(P, m.out_features, dtype=torch.float32) for n, m in modules.items()}
              if uses_coarse(rule) else None)

    # Pairs of similar length share a batch: less padding, same results.
    lengths_hint = [len(q) + len(p) for q, p in pairs]
    order = sorted(range(P), key=lambda i: -lengths_hint[i])
    batches = [order[i:i + settings.pair_batch] for i in range(0, P, settings.pair_batch)]

    limit = ChunkLimit()
    bar = tqdm(total=P, desc="NIG", unit="pair", disable=not progress)
    with frozen_eval(model):
        for batch in batches:
            pending = batch
            for level in levels:
                alphas = path_nodes(level, settings.nodes)
                enc = bound.encode([pairs[i] for i in pending], max_length, settings.baseline)
                chunk = settings.step_batch
                if chunk in (None, "auto"):
                    chunk = auto_step_batch(model, modules, enc.input_ids.shape[1], len(pending), device,
                                            settings.dtype, first_token_cut=settings.first_token_cut,
                                            coarse=uses_coarse(rule), token_heads=getattr(bound, "token_heads",
                                                                                          dict)())
                relevant = torch.tensor([targets[i] == "relevant" for i in pending], device=device)
                run = _BatchRun(bound, modules, settings, enc, relevant, device, parameters, fp16)
                out, nig_in, f_in, f_b, err = _attribute_batch(run, embeddings, bound.pad_id, alphas,
                                                               min(chunk, level + 1), limit)
                out = {n: o.cpu() for n, o in out.items()}
                nig_in, f_in, f_b = nig_in.cpu(), f_in.cpu().double(), f_b.cpu().double()
                err = {n: e.cpu() for n, e in err.items()} if err is not None else None
                if level == levels[-1]:
                    done = torch.ones(len(pending), dtype=torch.bool)
                else:
                    sums = {n: o.sum(dim=1) if segments else o for n, o in out.items() if CONTEXT not in n}
                    done = auto_converged(nig_in - (f_in - f_b), f_in, f_b, settings.tolerance,
                                          top_error(sums, err) if err is not None else None)
                idx = torch.tensor(pending)[done]
                for n in scores:
                    scores[n][idx] = out[n][done]
                    if err is not None:
                        errors[n][idx] = err[n][done]
                input_nig[idx] = nig_in[done]
                f_input[idx] = f_in[done]
                f_base[idx] = f_b[done]
                num_tokens[idx] = enc.lengths[done]
                steps_used[idx] = level
                bar.update(int(done.sum()))
                pending = [i for i, d in zip(pending, done.tolist()) if not d]
                if not pending:
                    break
    bar.close()

    for name, value in scores.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"NIG of layer {name} is not finite (NaN/Inf) for some pairs: the model overflows "
                             f"along the path; try dtype=torch.float32 or another baseline")
    segment_scores = None
    if segments:  # the token sum is the sum over segments: exact, and one accumulator per layer
        segment_scores = scores
        scores = {n: value.sum(dim=1) for n, value in segment_scores.items()}
    heads = split_head_scores(scores, segment_scores, errors, modules) if settings.heads else (None, None)
    delta = input_nig - (f_input - f_base)
    target_name = targets[0] if len(set(targets)) == 1 else "per-pair"
    record = settings.record(model, target=target_name, max_length=max_length)
    if bound.family != "classifier" or bound.uses_template:  # a classifier's records compare as before
        record["ranker"] = bound.ranker.describe()
    targets = relabel(record, unit, targets)
    return Attributions(scores, delta.float(), f_input.float(), f_base.float(), targets, num_tokens, record,
                        steps_used, segment_scores, errors, *heads)


@dataclass
class _BatchRun:
    """What every forward + backward of one batch of P pairs shares: the ranker bound to the model,
    its attributed Linears, the settings, the encoded pairs (``mask``, ``types``, ``lengths`` on
    ``device``), the ``[P]`` bool targets, the model's parameters seen detached in this thread, and
    whether the compute is float16."""

    bound: BoundRanker
    modules: Dict[str, nn.Module]
    settings: AttributionSettings
    enc: EncodedPairs
    relevant: torch.Tensor
    device: torch.device
    parameters: object = None  # detached_parameters(model), entered around every forward
    fp16: bool = False  # compute in float16: gradients scaled per path point (_gradient_scale)

    def __post_init__(self) -> None:
        self.lengths = self.enc.lengths.to(self.device)
        self.mask = self.enc.attention_mask.to(self.device)
        self.types = self.enc.token_type_ids.to(self.device) if self.enc.token_type_ids is not None else None
        self.pairs = self.enc.input_ids.shape[0]
        self.model = self.bound.model


def _forward_backward(run: _BatchRun, state: _HookState, path: torch.Tensor) -> torch.Tensor:
    """One chunk: forward of ``path`` ``[P * S, T, D]`` with the hooks of ``state``, backward of
    ΣF to ``path`` alone (its ``.grad``; the parameters are seen detached, so nothing else gets a
    gradient, and ``requires_grad`` is left alone for other threads).  With fp16 compute each
    point's backward is seeded with its power of two (``state.unscale`` undoes it).
    Returns F detached, ``[P * S]``."""
    S = state.steps
    handles = [m.register_forward_hook(lambda mod, inp, o, name=name: state.on_forward(name, o))
               for name, m in run.modules.items()]
    try:
        types = run.types.repeat_interleave(S, dim=0) if run.types is not None else None
        settings = run.settings
        cut = settings.first_token_cut if run.bound.family == "classifier" else settings.last_token_cut
        with run.parameters or nullcontext(), compute_autocast(path.device, settings.dtype):
            logits = run.bound.logits(path, run.mask.repeat_interleave(S, dim=0), types, cut)
        if run.model.training:
            raise RuntimeError("the model was switched to training mode while fastnig.attribute ran (by another "
                               "thread?): its dropout would change the attributions; keep it in eval mode meanwhile")
        f = target_function(logits, run.relevant.to(logits.device).repeat_interleave(S), settings.output)
        seed = _gradient_scale(f, settings.output) if run.fp16 else None
        if seed is not None:
            state.unscale = (1 / seed).view(run.pairs, S)
        torch.autograd.backward(f if seed is not None else f.sum(), seed, inputs=[path])
    finally:
        for h in handles:
            h.remove()
    if state.activations:
        missing = ", ".join(sorted({name for name, _ in state.activations})[:3])
        state.clear()
        raise RuntimeError(f"no gradient reached layer(s) {missing}: they do not influence the model output")
    return f.detach()


def _attribute_batch(run: _BatchRun, embeddings: nn.Module, pad_id: Optional[int], alphas: torch.Tensor,
                     chunk: int, limit: ChunkLimit):
    """Attribute one batch of P pairs over all path points ``alphas``, ``chunk`` points per forward at most.

    Returns ``(scores {name: [P, features]}, input NIG [P], F at the input [P],
    F at the baseline [P], errors)``; with ``segments``, scores are
    ``[P, 3, features]`` per :data:`SEGMENTS`.  With ``rule="richardson"``
    scores and input NIG are R_N, and ``errors`` ``{name: [P, features]}`` is
    :func:`error_estimate` of each neuron's token sum; otherwise ``errors`` is ``None``.

    Out of memory anywhere in a chunk (a forward hook, a gradient hook, the
    input side's accumulation) is undone and redone, exactly: the accumulators
    are restored from a copy taken before the chunk, every carry is dropped
    (some hooks may have overwritten theirs with the failed chunk's points),
    the limit is halved (``limit``), and the carries are rebuilt by *replaying*
    the points before the failed chunk that they need (the last one; with a
    half-step sum from the last even one on) into scratch accumulators, in
    chunks within the halved limit.  The replay is an ordinary chunk of the
    loop, so an out-of-memory error there is handled the same way (halve and
    replay again; a clear ``MemoryError`` at one point per forward).  A failed
    chunk that starts at point 0 needs no replay: the redo starts from empty carries.
    """
    device, P, enc = run.device, run.pairs, run.enc
    rule, segments = run.settings.rule, run.settings.segments
    with torch.no_grad():
        x_in, x_base = baseline_embeddings(embeddings, enc, run.settings.baseline, pad_id)
        # the path in the embeddings' dtype (a bf16 model gets bf16 points), its points computed in float32
        path_dtype, exact = x_in.dtype, torch.promote_types(x_in.dtype, torch.float32)
        x_in, x_base = x_in.to(exact), x_base.to(exact)
        direction = x_in - x_base
    token_segments = enc.segments if segments else None
    if segments and token_segments is None:
        raise ValueError("segments=True needs EncodedPairs.segments (from encode_pairs)")
    shape = (P, len(SEGMENTS)) if segments else (P,)
    out = {n: torch.zeros(*shape, m.out_features, dtype=torch.float32, device=m.weight.device)
           for n, m in run.modules.items()}
    coarse = {n: torch.zeros_like(o) for n, o in out.items()} if uses_coarse(rule) else None
    input_out = torch.zeros(P, x_in.shape[-1], dtype=torch.float64, device=device)
    input_coarse = torch.zeros_like(input_out) if coarse is not None else None
    sums = _Sums(out, coarse, input_out, input_coarse)
    scratch: Optional[_Sums] = None  # where a replay's sums go (discarded)
    op_rule = kernel_rule(rule)
    carries: Dict[Tuple[str, int], Carry] = {}
    input_carry: Optional[Carry] = None
    f_in = torch.zeros(P, device=device)
    f_b = torch.zeros(P, device=device)
    total = len(alphas)

    def path_at(start: int, stop: int) -> torch.Tensor:
        alpha = alphas[start:stop].to(device=device, dtype=exact)
        path = x_base.unsqueeze(1) + alpha.view(1, stop - start, 1, 1) * direction.unsqueeze(1)
        return path.flatten(0, 1).to(path_dtype).requires_grad_(True)

    start = committed = 0  # the points before `committed` are in the accumulators; [start, committed): a replay
    while start < total:
        replay = start < committed
        stop = start + path_chunks(total - start, limit.cap(chunk))[0][1]
        if replay:
            stop = min(stop, committed)
        S = stop - start
        path = state = failure = before = None
        try:  # every allocation of the chunk inside: any out-of-memory error is undone and redone
            if replay:
                scratch = scratch if scratch is not None else sums.zeros_like()
            else:
                before = sums.copy()
            target = scratch if replay else sums
            path = path_at(start, stop)
            state = _HookState(P, S, run.lengths, op_rule, target.out, carries, token_segments, target.coarse,
                               start, enc.read_segment if segments else None, enc.towers,
                               getattr(run.bound, "current_tower", None))
            f = _forward_backward(run, state, path)
            path4 = path.detach().unflatten(0, (P, S))
            grad4 = path.grad.unflatten(0, (P, S))
            if state.unscale is not None:
                path4, grad4 = _unscaled(path4, grad4, state.unscale)
            if input_carry is None:
                input_carry = Carry.like(path4, coarse=coarse is not None)
            accumulate_conductance(path4, grad4, run.lengths, target.input_out, input_carry, op_rule,
                                   ENGINE_CPU_KERNEL_THREADS, coarse_out=target.input_coarse, first_point=start)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, anything else re-raised
            if not is_out_of_memory(exc):
                raise
            failure = first_line(exc)
        if failure is not None:  # undo the chunk: hooks may have accumulated some layers already
            if state is not None:
                state.clear()
            path = state = path4 = grad4 = None
            if before is not None:
                sums.restore(before)
                before = None
            carries.clear()  # the redo rebuilds every carry: from empty, or by a replay
            input_carry = None
            release_memory(device)
            limit.halve(S, P, enc.input_ids.shape[1], device, failure)
            # replay from the point before `committed` (with a half-step sum: from the last even one)
            start = 0 if committed == 0 else committed - 1 - ((committed - 1) % 2 if coarse is not None else 0)
            continue
        if not replay:
            f = f.view(P, S)
            if start == 0:
                f_b = f[:, 0]
            if stop == total:
                f_in = f[:, -1]
            committed = stop
        start = stop
    if coarse is None:
        return out, input_out.sum(dim=1), f_in, f_b, None
    errors = {n: error_estimate(o.sum(dim=1) if segments else o, coarse[n].sum(dim=1) if segments else coarse[n])
              for n, o in out.items()}
    scores = {n: richardson(o, coarse[n]) for n, o in out.items()}
    return scores, richardson(input_out, input_coarse).sum(dim=1), f_in, f_b, errors


@dataclass
class _Sums:
    """The accumulators of one batch: every layer's (``out``; ``coarse``: the half-step sums, or
    ``None``) and the input side's (float64)."""

    out: Dict[str, torch.Tensor]
    coarse: Optional[Dict[str, torch.Tensor]]
    input_out: torch.Tensor
    input_coarse: Optional[torch.Tensor]

    def _tensors(self) -> List[torch.Tensor]:
        tensors = list(self.out.values()) + [self.input_out]
        if self.coarse is not None:
            tensors += list(self.coarse.values()) + [self.input_coarse]
        return tensors

    def _map(self, fn) -> "_Sums":
        coarse = {n: fn(t) for n, t in self.coarse.items()} if self.coarse is not None else None
        return _Sums({n: fn(t) for n, t in self.out.items()}, coarse, fn(self.input_out),
                     fn(self.input_coarse) if self.input_coarse is not None else None)

    def copy(self) -> "_Sums":
        return self._map(torch.clone)

    def zeros_like(self) -> "_Sums":
        return self._map(torch.zeros_like)

    def restore(self, saved: "_Sums") -> None:
        for t, s in zip(self._tensors(), saved._tensors()):
            t.copy_(s)
