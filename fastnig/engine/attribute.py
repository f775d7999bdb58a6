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

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .encoding import SEGMENTS, EncodedPairs, Pair, baseline_embeddings, encode_pairs, validate_pairs
from .first_token import first_token_only
from .kernels import Carry, accumulate_conductance
from .memory import ChunkLimit, auto_step_batch, first_line, is_out_of_memory, release_memory
from .model import (
    accepts_token_type_ids,
    check_model,
    compute_autocast,
    frozen_eval,
    input_embeddings,
    linear_modules,
    load_tokenizer,
    move_model,
    resolve_max_length,
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
from .scoring import TargetSpec, normalize_targets, target_function
from .settings import AttributionSettings


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
            (:func:`fastnig.engine.quadrature.error_estimate`), the estimated error of
            the trapezoid sum T_N; R_N's own error is of higher order, so it is
            a conservative bound for ``scores``.  ``None`` for other rules.
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
    ``carries[name]``: the previous chunk's last point; both live on the module's device.
    ``coarse[name]``: accumulators of ``out``'s shape for the half-step trapezoid
    sum (``rule="richardson"``), else ``None``; ``rule`` is the op's rule (:func:`kernel_rule`).
    """

    def __init__(self, pairs: int, steps_in_chunk: int, lengths: torch.Tensor, rule: str,
                 out: Dict[str, torch.Tensor], carries: Dict[str, Carry],
                 segments: Optional[torch.Tensor] = None, coarse: Optional[Dict[str, torch.Tensor]] = None):
        self.pairs, self.steps, self.lengths, self.rule = pairs, steps_in_chunk, lengths, rule
        self.segments, self.coarse = segments, coarse
        # segment ids of outputs of T tokens: the first T tokens' (T = 1: the first token, [CLS])
        self.segments_for: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        # real tokens per pair for outputs of T tokens on a device (T = 1 past the first-token cut
        # and for [batch, features] outputs such as the pooler's)
        self.lengths_for: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self.out, self.carries = out, carries
        self.activations: Dict[str, torch.Tensor] = {}

    def on_forward(self, name: str, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if name in self.activations:
            raise RuntimeError(f"module {name} ran twice in one forward pass; fastnig attributes each Linear once")
        if output.dim() not in (2, 3):
            raise ValueError(f"layer {name}: expected a [batch, tokens, features] or [batch, features] output, "
                             f"got {tuple(output.shape)}")
        self.activations[name] = output
        output.register_hook(lambda grad, name=name: self.on_grad(name, grad))

    def on_grad(self, name: str, grad: torch.Tensor) -> None:
        a = self.activations.pop(name)
        if a.dim() == 2:  # [batch, features] (a pooler): one "token" per pair
            a, grad = a.unsqueeze(1), grad.unsqueeze(1)
        a4 = a.unflatten(0, (self.pairs, self.steps))
        g4 = grad.unflatten(0, (self.pairs, self.steps))
        carry = self.carries.get(name)
        if carry is None:
            carry = self.carries[name] = Carry.like(a4, coarse=self.coarse is not None)
        tokens = a4.shape[2]
        key = (tokens, a4.device)
        lengths = self.lengths_for.get(key)
        if lengths is None:
            lengths = self.lengths_for[key] = self.lengths.to(a4.device).clamp(max=tokens)
        segments = None
        if self.segments is not None:
            segments = self.segments_for.get(key)
            if segments is None:
                segments = self.segments_for[key] = self.segments[:, :tokens].to(a4.device).contiguous()
        accumulate_conductance(a4, g4, lengths, self.out[name], carry, self.rule, ENGINE_CPU_KERNEL_THREADS,
                               segments=segments, coarse_out=self.coarse[name] if self.coarse is not None else None)

    def clear(self) -> None:
        """Drop the activations of a failed pass (each holds a hook that refers back to this state)."""
        self.activations.clear()


def path_chunks(total: int, size: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` covering ``range(total)``, as even as possible."""
    count = -(-total // size)
    bounds = [round(i * total / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def attribute(model: nn.Module, pairs: Sequence[Pair], settings: Optional[AttributionSettings] = None, *,
              tokenizer=None, target: TargetSpec = "relevant", device: Union[str, torch.device, None] = None,
              progress: bool = True, **overrides) -> Attributions:
    """NIG (conductance) of every Linear neuron of a cross-encoder, per pair.

    One batched forward + backward over the path points gives every layer's
    attribution at once (docs/method.md §5); parameters get no gradients.

    Args:
        model: a Hugging Face sequence-classification cross-encoder (1 or 2 logits),
            or a ``sentence_transformers.CrossEncoder`` (its model and tokenizer are used).
        pairs: list of (query, passage) strings; an empty or over-long passage
            is fine (truncated to ``max_length`` tokens, passage first).
        settings: how NIG is computed, an :class:`AttributionSettings`
            (``None`` = the defaults: ``baseline="pad"``, ``rule="richardson"``,
            ``steps=32``, ``output="probability"``, ...).
        tokenizer: its fast tokenizer; ``None`` loads ``model.config.name_or_path``'s.
        target: ``"relevant"``, ``"non-relevant"`` (or 1/0), or one per pair.
        device: where to compute; ``None`` (default) = where the model is, which
            is not changed; a device = the model is moved there (a warning says so;
            it stays there).  A model spread over several devices (``device_map``)
            or with weights on ``meta`` is refused before any work.
        progress: show a progress bar over pairs.
        **overrides: any field of :class:`AttributionSettings` by name (e.g.
            ``steps=64, baseline="zero", segments=True``), applied over ``settings``.

    Returns:
        :class:`Attributions` with ``scores[name]``: ``[num_pairs, out_features]``
        (and ``segment_scores`` ``[num_pairs, 3, out_features]`` with ``segments=True``).
        Outputs past the first-token cut and ``[batch, features]`` outputs (the
        pooler) have the first token only: [CLS], "special".
    """
    settings = (settings or AttributionSettings()).replace(**overrides) if overrides else (
        settings or AttributionSettings())
    if not isinstance(settings, AttributionSettings):
        raise TypeError(f"settings must be an AttributionSettings, got {type(settings).__name__}")
    pairs = validate_pairs(pairs)
    targets = normalize_targets(target, len(pairs))
    model, tokenizer = unwrap(model, tokenizer)
    embeddings = input_embeddings(check_model(model))
    modules = linear_modules(model, settings.layers, settings.include_pooler)
    if device is None:
        single_device(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    max_length = resolve_max_length(model, tokenizer, settings.max_length)
    move_model(model, device)
    device = single_device(model)
    accepts_types = accepts_token_type_ids(model, tokenizer)

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
                enc = encode_pairs(tokenizer, [pairs[i] for i in pending], max_length, settings.baseline,
                                   accepts_types)
                chunk = settings.step_batch
                if chunk in (None, "auto"):
                    chunk = auto_step_batch(model, modules, enc.input_ids.shape[1], len(pending), device,
                                            settings.dtype, first_token_cut=settings.first_token_cut,
                                            coarse=uses_coarse(rule))
                relevant = torch.tensor([targets[i] == "relevant" for i in pending], device=device)
                run = _BatchRun(model, modules, settings, enc, relevant, device)
                out, nig_in, f_in, f_b, err = _attribute_batch(run, embeddings, tokenizer.pad_token_id, alphas,
                                                               min(chunk, level + 1), limit)
                out = {n: o.cpu() for n, o in out.items()}
                nig_in, f_in, f_b = nig_in.cpu(), f_in.cpu().double(), f_b.cpu().double()
                err = {n: e.cpu() for n, e in err.items()} if err is not None else None
                if level == levels[-1]:
                    done = torch.ones(len(pending), dtype=torch.bool)
                else:
                    sums = {n: o.sum(dim=1) if segments else o for n, o in out.items()}
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
    delta = input_nig - (f_input - f_base)
    target_name = targets[0] if len(set(targets)) == 1 else "per-pair"
    record = settings.record(model, target=target_name, max_length=max_length)
    return Attributions(scores, delta.float(), f_input.float(), f_base.float(), targets, num_tokens, record,
                        steps_used, segment_scores, errors)


@dataclass
class _BatchRun:
    """What every forward + backward of one batch of P pairs shares: the model, its attributed
    Linears, the settings, the encoded pairs (``mask``, ``types``, ``lengths`` on ``device``)
    and the ``[P]`` bool targets."""

    model: nn.Module
    modules: Dict[str, nn.Module]
    settings: AttributionSettings
    enc: EncodedPairs
    relevant: torch.Tensor
    device: torch.device

    def __post_init__(self) -> None:
        self.lengths = self.enc.lengths.to(self.device)
        self.mask = self.enc.attention_mask.to(self.device)
        self.types = self.enc.token_type_ids.to(self.device) if self.enc.token_type_ids is not None else None
        self.pairs = self.enc.input_ids.shape[0]


def _forward_backward(run: _BatchRun, state: _HookState, path: torch.Tensor) -> torch.Tensor:
    """One chunk: forward of ``path`` ``[P * S, T, D]`` with the hooks of ``state``, backward of
    ΣF to ``path`` (its ``.grad``).  Returns F detached, ``[P * S]``."""
    S = state.steps
    handles = [m.register_forward_hook(lambda mod, inp, o, name=name: state.on_forward(name, o))
               for name, m in run.modules.items()]
    try:
        kwargs = {"inputs_embeds": path, "attention_mask": run.mask.repeat_interleave(S, dim=0)}
        if run.types is not None:
            kwargs["token_type_ids"] = run.types.repeat_interleave(S, dim=0)
        settings = run.settings
        with compute_autocast(path.device, settings.dtype), first_token_only(run.model, settings.first_token_cut):
            logits = run.model(**kwargs).logits
        f = target_function(logits, run.relevant.to(logits.device).repeat_interleave(S), settings.output)
        torch.autograd.backward(f.sum(), inputs=[path])
    finally:
        for h in handles:
            h.remove()
    if state.activations:
        missing = ", ".join(sorted(state.activations)[:3])
        state.clear()
        raise RuntimeError(f"no gradient reached layer(s) {missing}: they do not influence the model output")
    return f.detach()


def _attribute_batch(run: _BatchRun, embeddings: nn.Module, pad_id: Optional[int], alphas: torch.Tensor,
                     chunk: int, limit: ChunkLimit):
    """Attribute one batch of P pairs over all path points ``alphas``, ``chunk`` points per forward at most.

    A chunk that runs out of memory is undone (accumulators restored from a
    copy taken before it, the carries rebuilt from the previous points) and
    redone in halves (``limit``).  Returns ``(scores {name: [P, features]},
    input NIG [P], F at the input [P], F at the baseline [P], errors)``; with
    ``segments``, scores are ``[P, 3, features]`` per :data:`SEGMENTS`.
    With ``rule="richardson"`` scores and input NIG are R_N, and ``errors``
    ``{name: [P, features]}`` is :func:`error_estimate` of each neuron's
    token sum; otherwise ``errors`` is ``None``.
    """
    device, P, enc = run.device, run.pairs, run.enc
    rule, segments = run.settings.rule, run.settings.segments
    with torch.no_grad():
        x_in, x_base = baseline_embeddings(embeddings, enc, run.settings.baseline, pad_id)
        path_dtype = torch.float64 if x_in.dtype == torch.float64 else torch.float32
        x_in, x_base = x_in.to(path_dtype), x_base.to(path_dtype)
        direction = x_in - x_base
    token_segments = enc.segments if segments else None
    if segments and token_segments is None:
        raise ValueError("segments=True needs EncodedPairs.segments (from encode_pairs)")
    shape = (P, len(SEGMENTS)) if segments else (P,)
    out = {n: torch.zeros(*shape, m.out_features, dtype=torch.float32, device=m.weight.device)
           for n, m in run.modules.items()}
    coarse = {n: torch.zeros_like(o) for n, o in out.items()} if uses_coarse(rule) else None
    op_rule = kernel_rule(rule)
    carries: Dict[str, Carry] = {}
    input_out = torch.zeros(P, x_in.shape[-1], dtype=torch.float64, device=device)
    input_coarse = torch.zeros_like(input_out) if coarse is not None else None
    input_carry: Optional[Carry] = None
    f_in = torch.zeros(P, device=device)
    f_b = torch.zeros(P, device=device)
    total = len(alphas)

    def path_at(start: int, stop: int) -> torch.Tensor:
        alpha = alphas[start:stop].to(device=device, dtype=path_dtype)
        path = x_base.unsqueeze(1) + alpha.view(1, stop - start, 1, 1) * direction.unsqueeze(1)
        return path.flatten(0, 1).requires_grad_(True)

    start = 0
    size = limit.cap(chunk)
    while start < total:
        stop = start + path_chunks(total - start, size)[0][1]
        S = stop - start
        before = {n: o.clone() for n, o in out.items()}
        coarse_before = {n: o.clone() for n, o in coarse.items()} if coarse is not None else None
        path = path_at(start, stop)
        state = _HookState(P, S, run.lengths, op_rule, out, carries, token_segments, coarse)
        failure = None
        try:
            f = _forward_backward(run, state, path)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, anything else re-raised
            if not is_out_of_memory(exc):
                raise
            failure = first_line(exc)
        if failure is not None:  # undo the chunk: hooks may have accumulated some layers already
            state.clear()
            del path, state
            for n, o in out.items():
                o.copy_(before[n])
                if coarse is not None:
                    coarse[n].copy_(coarse_before[n])
            release_memory(device)
            size = limit.halve(S, P, enc.input_ids.shape[1], device, failure)
            if start > 0:  # from the last even point on with a half-step sum (its carry holds that one too)
                first = start - 1 - ((start - 1) % 2 if coarse is not None else 0)
                _refill_carries(run, path_at(first, start), first, op_rule, carries, coarse is not None)
            continue
        f = f.view(P, S)
        if start == 0:
            f_b = f[:, 0]
        if stop == total:
            f_in = f[:, -1]
        path4 = path.detach().unflatten(0, (P, S))
        grad4 = path.grad.unflatten(0, (P, S))
        if input_carry is None:
            input_carry = Carry.like(path4, coarse=coarse is not None)
        accumulate_conductance(path4, grad4, run.lengths, input_out, input_carry, op_rule,
                               ENGINE_CPU_KERNEL_THREADS, coarse_out=input_coarse)
        start = stop
    if coarse is None:
        return out, input_out.sum(dim=1), f_in, f_b, None
    errors = {n: error_estimate(o.sum(dim=1) if segments else o, coarse[n].sum(dim=1) if segments else coarse[n])
              for n, o in out.items()}
    scores = {n: richardson(o, coarse[n]) for n, o in out.items()}
    return scores, richardson(input_out, input_coarse).sum(dim=1), f_in, f_b, errors


def _refill_carries(run: _BatchRun, points: torch.Tensor, first: int, rule: str, carries: Dict[str, Carry],
                    coarse: bool) -> None:
    """Rewrite every layer's carry from path points ``points`` (``[P * S, T, D]``, global indices
    ``first``, ..., the point before a failed chunk).

    A failed chunk may have overwritten some carries with its own points; a
    pass over these points with the carries marked empty adds only to scratch
    accumulators and leaves in every carry the last point (and, with
    ``coarse``, the last even-indexed one: ``first`` is then even).
    """
    for carry in carries.values():
        carry.filled = carry.even_filled = False
        carry.next_point = first
    scratch = {n: torch.zeros(run.pairs, m.out_features, dtype=torch.float32, device=m.weight.device)
               for n, m in run.modules.items()}
    scratch_coarse = {n: torch.zeros_like(o) for n, o in scratch.items()} if coarse else None
    state = _HookState(run.pairs, points.shape[0] // run.pairs, run.lengths, rule, scratch, carries,
                       coarse=scratch_coarse)
    _forward_backward(run, state, points)
