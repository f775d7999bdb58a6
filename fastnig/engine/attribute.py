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

from ..common import check_int, check_number
from .scoring import OUTPUTS, target_function
from .encoding import Pair, validate_pairs
from .scoring import TargetSpec, normalize_targets
from .model import (accepts_token_type_ids, check_model, compute_autocast, frozen_eval, input_embeddings,
                    linear_modules, load_tokenizer, move_model, resolve_max_length, single_device, unwrap)
from .encoding import BASELINES, EncodedPairs, baseline_embeddings, encode_pairs
from .first_token import first_token_only
from .kernels import Carry, accumulate_conductance
from .memory import ChunkLimit, auto_step_batch, first_line, is_out_of_memory, release_memory
from .quadrature import (DEFAULT_RULE, DEFAULT_STEPS, NODES, auto_converged, auto_step_levels, check_rule,
                         error_estimate, kernel_rule, path_nodes, relative_delta, richardson, top_error, uses_coarse)
from .encoding import SEGMENTS


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


def _check_settings(baseline, steps, rule, step_batch, pair_batch, max_length, output, nodes, tolerance,
                    max_steps):
    if nodes not in NODES:
        raise ValueError(f"nodes must be one of {NODES}, got {nodes!r}")
    if steps == "auto":
        check_int("max_steps", max_steps, 1)
        check_number("tolerance", tolerance, positive=True, hint=" (relative convergence delta)")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    check_rule(rule, steps, nodes, max_steps)
    steps = max_steps if steps == "auto" else steps
    check_int("steps", steps, 1, " (path intervals) or 'auto'")
    if step_batch not in (None, "auto") and not (isinstance(step_batch, int) and not isinstance(step_batch, bool)
                                                 and step_batch >= 1):
        raise ValueError(f"step_batch must be None / 'auto' (sized from free memory) or an integer >= 1 "
                         f"(path points per forward; {steps + 1} = all at once), got {step_batch!r}")
    check_int("pair_batch", pair_batch, 1)
    if max_length is not None:
        check_int("max_length", max_length, 4, " (tokens)")


def attribute(model: nn.Module, pairs: Sequence[Pair], *, tokenizer=None, target: TargetSpec = "relevant",
              baseline: str = "pad", steps: int = DEFAULT_STEPS, rule: str = DEFAULT_RULE,
              layers: Optional[Sequence[str]] = None, include_pooler: bool = False,
              step_batch: Optional[int] = None, pair_batch: int = 1, max_length: Optional[int] = None,
              output: str = "probability", nodes: str = "uniform", tolerance: float = 0.05,
              max_steps: int = 256, device: Union[str, torch.device, None] = None,
              dtype: Optional[torch.dtype] = None, progress: bool = True,
              first_token_cut: bool = True, segments: bool = False) -> Attributions:
    """NIG (conductance) of every Linear neuron of a cross-encoder, per pair.

    One batched forward + backward over the path points gives every layer's
    attribution at once (docs/method.md §5); parameters get no gradients.

    Args:
        model: a Hugging Face sequence-classification cross-encoder (1 or 2 logits),
            or a ``sentence_transformers.CrossEncoder`` (its model and tokenizer are used).
        pairs: list of (query, passage) strings; an empty or over-long passage
            is fine (truncated to ``max_length`` tokens, passage first).
        tokenizer: its fast tokenizer; ``None`` loads ``model.config.name_or_path``'s.
        target: ``"relevant"``, ``"non-relevant"`` (or 1/0), or one per pair.
        baseline: ``"pad"`` (default), ``"pad-query"``, ``"zero"`` or ``"zero-query"`` (docs/method.md §3).
        steps: N, the number of path intervals (N + 1 points are evaluated;
            default 32: with ``richardson`` as accurate as the trapezoid rule at
            N = 100 on the demo model, bench/results/steps_accuracy.md),
            or ``"auto"``: per pair, N = 16, 32, ... doubling up to
            ``max_steps`` until |delta| <= ``tolerance`` · max(|F(x) - F(x')|,
            0.01) and, with ``rule="richardson"``, also the estimated relative
            L1 error of the pair's top 1 % neurons (by |NIG|) is <= ``tolerance``
            (:func:`fastnig.engine.quadrature.auto_converged`); each level is a
            fresh run, so a pair's result equals a fixed-``steps`` run at its
            final N (``Attributions.steps_used``).
        rule: ``"richardson"`` (default), ``"trapezoid"``, ``"left"`` (= Captum
            LayerConductance, ``riemann_trapezoid``).  ``"richardson"``: R_N = (4 T_N - T_{N/2}) / 3
            from the trapezoid sums over all N + 1 points and over the even ones,
            both accumulated in the same pass (same cost; needs uniform nodes and
            an even N, or an even ``max_steps`` with ``steps="auto"``); also fills
            ``Attributions.error_estimate`` (docs/method.md §5).
        layers: Linear module names to attribute; ``None`` = every encoder Linear.
            A Linear with ``[batch, features]`` outputs (the pooler) counts as one token per pair.
        include_pooler: with ``layers=None``, also attribute the pooler.
        step_batch: path points per pair in one forward (bounds memory; the
            result does not depend on it beyond float rounding); ``None`` or
            ``"auto"`` (default) = as many as half the free memory holds, on
            CPU at most ~2048 token rows, which is faster (:func:`auto_step_batch`);
            an integer = at most that many (``steps + 1`` = all at once).
            A chunk that runs out of memory (CUDA or host) is undone and redone
            with half as many points, and later chunks use at most that (one warning).
        pair_batch: pairs sharing one forward (padded to the longest).
        max_length: tokens of the pair encoding; ``None`` = the tokenizer's
            ``model_max_length`` (a CrossEncoder's ``max_length``), else 512; never
            more than the model's position embeddings allow.
        output: ``"probability"`` (default) or ``"logit"``: what F is (docs/method.md §2).
        nodes: ``"uniform"`` (default) or ``"chebyshev"`` path positions (:func:`path_nodes`).
        tolerance, max_steps: the stopping rule of ``steps="auto"`` (default 0.05: with
            ``richardson``, 99.5-100 % overlap of the top 0.1 % and 1 % sets with the
            reference on the demo model, bench/results/steps_accuracy.md).
        device: where to compute; ``None`` (default) = where the model is, which
            is not changed; a device = the model is moved there (a warning says so;
            it stays there).  A model spread over several devices (``device_map``)
            or with weights on ``meta`` is refused before any work.
        dtype: compute dtype under autocast (e.g. ``torch.bfloat16``); the
            accumulation stays float32.
        progress: show a progress bar over pairs.
        first_token_cut: run the last layer past self-attention on the first
            token only where the head reads just that token (exact, faster;
            :func:`fastnig.engine.first_token.first_token_only`); ``False`` = run the whole
            model (also: environment variable ``FASTNIG_FIRST_TOKEN_CUT=0``).
        segments: also split each neuron's NIG by the segment of the token it
            flows through — ("query", "passage", "special") from the tokenizer's
            sequence ids and special-token mask — into ``segment_scores[name]``:
            ``[num_pairs, 3, out_features]``, accumulated by the same fused op;
            ``scores`` is then their sum.  Outputs past the first-token cut and
            ``[batch, features]`` outputs (the pooler) have the first token only:
            [CLS], "special".

    Returns:
        :class:`Attributions` with ``scores[name]``: ``[num_pairs, out_features]``
        (and ``segment_scores`` with ``segments=True``).
    """
    pairs = validate_pairs(pairs)
    _check_settings(baseline, steps, rule, step_batch, pair_batch, max_length, output, nodes, tolerance,
                    max_steps)
    targets = normalize_targets(target, len(pairs))
    if not isinstance(first_token_cut, bool):
        raise TypeError(f"first_token_cut must be True or False, got {first_token_cut!r}")
    if not isinstance(segments, bool):
        raise TypeError(f"segments must be True or False, got {segments!r}")
    model, tokenizer = unwrap(model, tokenizer)
    embeddings = input_embeddings(check_model(model))
    modules = linear_modules(model, layers, include_pooler)
    if device is None:
        single_device(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    max_length = resolve_max_length(model, tokenizer, max_length)
    move_model(model, device)
    device = single_device(model)
    accepts_types = accepts_token_type_ids(model, tokenizer)

    levels = auto_step_levels(max_steps) if steps == "auto" else [steps]
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
    batches = [order[i:i + pair_batch] for i in range(0, P, pair_batch)]

    limit = ChunkLimit()
    bar = tqdm(total=P, desc="NIG", unit="pair", disable=not progress)
    with frozen_eval(model):
        for batch in batches:
            pending = batch
            for level in levels:
                alphas = path_nodes(level, nodes)
                enc = encode_pairs(tokenizer, [pairs[i] for i in pending], max_length, baseline, accepts_types)
                chunk = step_batch
                if step_batch in (None, "auto"):
                    chunk = auto_step_batch(model, modules, enc.input_ids.shape[1], len(pending), device, dtype,
                                            first_token_cut=first_token_cut, coarse=uses_coarse(rule))
                relevant = torch.tensor([targets[i] == "relevant" for i in pending], device=device)
                out, nig_in, f_in, f_b, err = _attribute_batch(model, embeddings, modules, enc, relevant,
                                                               tokenizer.pad_token_id, baseline, alphas,
                                                               min(chunk, level + 1), limit, rule, output, dtype,
                                                               first_token_cut, segments)
                out = {n: o.cpu() for n, o in out.items()}
                nig_in, f_in, f_b = nig_in.cpu(), f_in.cpu().double(), f_b.cpu().double()
                err = {n: e.cpu() for n, e in err.items()} if err is not None else None
                if level == levels[-1]:
                    done = torch.ones(len(pending), dtype=torch.bool)
                else:
                    sums = {n: o.sum(dim=1) if segments else o for n, o in out.items()}
                    done = auto_converged(nig_in - (f_in - f_b), f_in, f_b, tolerance,
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
    settings = attribution_settings(model, target=target_name, output=output, baseline=baseline, steps=steps,
                                    rule=rule, max_length=max_length, dtype=dtype, nodes=nodes,
                                    tolerance=tolerance, max_steps=max_steps, segments=segments)
    return Attributions(scores, delta.float(), f_input.float(), f_base.float(), targets, num_tokens, settings,
                        steps_used, segment_scores, errors)


def attribution_settings(model: nn.Module, *, target: str, output: str = "probability", baseline: str = "pad",
                         steps: Union[int, str] = DEFAULT_STEPS, rule: str = DEFAULT_RULE, max_length: int = 512,
                         dtype: Optional[torch.dtype] = None, nodes: str = "uniform", tolerance: float = 0.05,
                         max_steps: int = 256, segments: bool = False) -> Dict[str, object]:
    """The ``settings`` dict :func:`attribute` records for these arguments.

    Lets a resumed job check, before computing anything, that a saved scheme
    was made with the same settings.
    """
    settings = {
        "model": getattr(getattr(model, "config", None), "name_or_path", "") or "",
        "target": target, "output": output, "baseline": baseline, "steps": steps, "rule": rule,
        "nodes": nodes, "max_length": max_length, "dtype": str(dtype or torch.float32).replace("torch.", ""),
    }
    if steps == "auto":
        settings.update(tolerance=float(tolerance), max_steps=max_steps)
    if segments:  # recorded only when on: settings without segments compare as before
        settings["segments"] = True
    return settings


def _forward_backward(model, modules, state: _HookState, path: torch.Tensor, mask: torch.Tensor,
                      types: Optional[torch.Tensor], relevant: torch.Tensor, output: str, dtype,
                      cut: bool) -> torch.Tensor:
    """One chunk: forward of ``path`` ``[P * S, T, D]`` with the hooks of ``state``, backward of
    ΣF to ``path`` (its ``.grad``).  Returns F detached, ``[P * S]``."""
    S = state.steps
    handles = [m.register_forward_hook(lambda mod, inp, o, name=name: state.on_forward(name, o))
               for name, m in modules.items()]
    try:
        kwargs = {"inputs_embeds": path, "attention_mask": mask.repeat_interleave(S, dim=0)}
        if types is not None:
            kwargs["token_type_ids"] = types.repeat_interleave(S, dim=0)
        with compute_autocast(path.device, dtype), first_token_only(model, cut):
            logits = model(**kwargs).logits
        f = target_function(logits, relevant.to(logits.device).repeat_interleave(S), output)
        torch.autograd.backward(f.sum(), inputs=[path])
    finally:
        for h in handles:
            h.remove()
    if state.activations:
        missing = ", ".join(sorted(state.activations)[:3])
        state.clear()
        raise RuntimeError(f"no gradient reached layer(s) {missing}: they do not influence the model output")
    return f.detach()


def _attribute_batch(model, embeddings, modules, enc: EncodedPairs, relevant, pad_id, baseline, alphas,
                     chunk: int, limit: ChunkLimit, rule, output, dtype, cut: bool = True,
                     segments: bool = False):
    """Attribute one batch of P pairs over all path points, ``chunk`` points per forward at most.

    A chunk that runs out of memory is undone (accumulators restored from a
    copy taken before it, the carries rebuilt from the previous points) and
    redone in halves (``limit``).  Returns ``(scores {name: [P, features]},
    input NIG [P], F at the input [P], F at the baseline [P], errors)``; with
    ``segments``, scores are ``[P, 3, features]`` per :data:`SEGMENTS`.
    With ``rule="richardson"`` scores and input NIG are R_N, and ``errors``
    ``{name: [P, features]}`` is :func:`error_estimate` of each neuron's
    token sum; otherwise ``errors`` is ``None``.
    """
    device = embeddings.weight.device
    P = enc.input_ids.shape[0]
    lengths = enc.lengths.to(device)
    mask = enc.attention_mask.to(device)
    types = enc.token_type_ids.to(device) if enc.token_type_ids is not None else None
    with torch.no_grad():
        x_in, x_base = baseline_embeddings(embeddings, enc, baseline, pad_id)
        path_dtype = torch.float64 if x_in.dtype == torch.float64 else torch.float32
        x_in, x_base = x_in.to(path_dtype), x_base.to(path_dtype)
        direction = x_in - x_base
    token_segments = enc.segments if segments else None
    if segments and token_segments is None:
        raise ValueError("segments=True needs EncodedPairs.segments (from encode_pairs)")
    shape = (P, len(SEGMENTS)) if segments else (P,)
    out = {n: torch.zeros(*shape, m.out_features, dtype=torch.float32, device=m.weight.device)
           for n, m in modules.items()}
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
        state = _HookState(P, S, lengths, op_rule, out, carries, token_segments, coarse)
        failure = None
        try:
            f = _forward_backward(model, modules, state, path, mask, types, relevant, output, dtype, cut)
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
                _refill_carries(model, modules, path_at(first, start), first, P, lengths, op_rule, carries, mask,
                                types, relevant, output, dtype, cut, coarse is not None)
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
        accumulate_conductance(path4, grad4, lengths, input_out, input_carry, op_rule, ENGINE_CPU_KERNEL_THREADS,
                               coarse_out=input_coarse)
        start = stop
    if coarse is None:
        return out, input_out.sum(dim=1), f_in, f_b, None
    errors = {n: error_estimate(o.sum(dim=1) if segments else o, coarse[n].sum(dim=1) if segments else coarse[n])
              for n, o in out.items()}
    scores = {n: richardson(o, coarse[n]) for n, o in out.items()}
    return scores, richardson(input_out, input_coarse).sum(dim=1), f_in, f_b, errors


def _refill_carries(model, modules, points: torch.Tensor, first: int, P: int, lengths, rule,
                    carries: Dict[str, Carry], mask, types, relevant, output, dtype, cut, coarse: bool) -> None:
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
    scratch = {n: torch.zeros(P, m.out_features, dtype=torch.float32, device=m.weight.device)
               for n, m in modules.items()}
    scratch_coarse = {n: torch.zeros_like(o) for n, o in scratch.items()} if coarse else None
    state = _HookState(P, points.shape[0] // P, lengths, rule, scratch, carries, coarse=scratch_coarse)
    _forward_backward(model, modules, state, points, mask, types, relevant, output, dtype, cut)
