"""Neuron Integrated Gradients (conductance) of every Linear neuron in one pass.

Owns: :func:`attribute` and :class:`Attributions` — the path from a baseline
to the input, its chunks and memory model, the hooks that feed every Linear's
activations and gradients to the fused op, ``steps="auto"``.  Must not:
tokenise or read logits itself (:mod:`fastnig.cross_encoder`), know about
datasets, schemes or files.

``attribute(model, pairs)`` interpolates the word embeddings of each
(query, passage) pair from a baseline to the input (docs/method.md §3), evaluates all
path points in batched forward + backward passes, and, from hooks on every
selected ``nn.Linear``, feeds each layer's activations and output gradients to
the fused op of :mod:`fastnig.kernels`, which adds the conductance summed over
the pair's real tokens into a per-pair accumulator (docs/method.md §5).  Where the
classification head reads only the first token, the last layer runs past
self-attention (and, for the BERT family, its queries) on that token alone
(:func:`first_token_only`): exact, and ~14 % less matrix work on a 6-layer model.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .common import check_int, check_number
from .cross_encoder import (OUTPUTS, TARGETS, Pair, accepts_token_type_ids, check_model, frozen_eval,
                            input_embeddings, load_tokenizer, move_model, resolve_max_length, target_function,
                            tokenize_pair, unwrap, validate_pairs)
from .first_token import first_token_only
from .kernels import RULES, Carry, accumulate_conductance

BASELINES = ("pad", "pad-query", "zero", "zero-query")
NODES = ("uniform", "chebyshev")
AUTO_START_STEPS = 16

TargetSpec = Union[str, int, bool, Sequence[Union[str, int, bool]]]


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
            baseline, steps, rule, max_length, dtype).
    """

    scores: Dict[str, torch.Tensor]
    delta: torch.Tensor
    f_input: torch.Tensor
    f_baseline: torch.Tensor
    targets: List[str]
    num_tokens: torch.Tensor
    settings: Dict[str, object] = field(default_factory=dict)
    steps_used: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        return int(self.delta.shape[0])

    @property
    def num_neurons(self) -> int:
        return sum(int(s.shape[1]) for s in self.scores.values())

    def relative_delta(self) -> torch.Tensor:
        """``[num_pairs]`` |delta| / |F(x) - F(x')| (inf where F did not move)."""
        return relative_delta(self.delta, self.f_input, self.f_baseline)


def relative_delta(delta: torch.Tensor, f_input: torch.Tensor, f_baseline: torch.Tensor,
                   floor: float = 0.0) -> torch.Tensor:
    """|delta| / max(|F(x) - F(x')|, floor): the integration error relative to what is attributed."""
    return delta.abs() / (f_input - f_baseline).abs().clamp_min(floor)


def path_nodes(steps: int, nodes: str = "uniform") -> torch.Tensor:
    """The N + 1 path positions 0 = α_0 < ... < α_N = 1, float64 ``[steps + 1]``.

    ``uniform``: α_k = k / N.  ``chebyshev``: Chebyshev–Lobatto nodes
    α_k = (1 - cos(π k / N)) / 2, denser near both ends of the path, where
    the baseline's and the input's saturated regions meet the transition.
    """
    k = torch.arange(steps + 1, dtype=torch.float64)
    if nodes == "uniform":
        alphas = k / steps
    elif nodes == "chebyshev":
        alphas = (1 - torch.cos(math.pi * k / steps)) / 2
    else:
        raise ValueError(f"nodes must be one of {NODES}, got {nodes!r}")
    alphas[0], alphas[-1] = 0.0, 1.0
    return alphas


def auto_step_levels(max_steps: int) -> List[int]:
    """Refinement levels of ``steps="auto"``: 16, 32, ... doubling, ending at ``max_steps``."""
    levels = [min(AUTO_START_STEPS, max_steps)]
    while levels[-1] < max_steps:
        levels.append(min(levels[-1] * 2, max_steps))
    return levels


# --------------------------------------------------------------------------- F
def normalize_targets(target: TargetSpec, num_pairs: int) -> List[str]:
    """Per-pair target labels from one label or a per-pair list."""
    def one(value) -> str:
        if isinstance(value, str):
            if value in TARGETS:
                return value
        elif isinstance(value, (bool, int)) and int(value) in (0, 1):
            return TARGETS[0] if int(value) == 1 else TARGETS[1]
        raise ValueError(f"target must be 'relevant', 'non-relevant' (or 1/0), got {value!r}")

    if isinstance(target, (str, int, bool)):
        return [one(target)] * num_pairs
    values = list(target)
    if len(values) != num_pairs:
        raise ValueError(f"target has {len(values)} labels but there are {num_pairs} pairs")
    return [one(v) for v in values]


# ------------------------------------------------------------------ the model
def _is_attributed_by_default(name: str) -> bool:
    return "pooler" not in name.split(".")


def linear_modules(model: nn.Module, layers: Optional[Sequence[str]] = None,
                   include_pooler: bool = False) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose outputs are neurons (SPEC §4).

    By default every Linear of the encoder (``model.base_model``): the
    classification head is excluded, and so is the pooler unless
    ``include_pooler``.  ``layers`` selects module names explicitly.
    """
    everything = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in everything]
        if unknown:
            sample = ", ".join(list(everything)[:4])
            raise ValueError(f"layers: {unknown} are not nn.Linear modules of the model (e.g. {sample})")
        if not layers:
            raise ValueError("layers is empty: give Linear module names, or None for all of them")
        return {n: everything[n] for n in layers}
    base = getattr(model, "base_model", model)
    base_ids = {id(m) for m in base.modules()}
    chosen = {n: m for n, m in everything.items()
              if id(m) in base_ids and (include_pooler or _is_attributed_by_default(n))}
    if not chosen:
        raise ValueError("the model has no nn.Linear module in its encoder to attribute")
    return chosen


# ------------------------------------------------------------------ the input
@dataclass
class EncodedPairs:
    """Tokenised pairs, padded on the right to the longest.

    ``input_ids``, ``attention_mask``, ``replace`` (positions the baseline
    changes) and, when the model takes them, ``token_type_ids``: ``[P, T]``;
    ``lengths``: ``[P]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: Optional[torch.Tensor]
    replace: torch.Tensor
    lengths: torch.Tensor


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int, baseline: str,
                 use_token_type_ids: bool) -> EncodedPairs:
    """Tokenise (query, passage) pairs as the cross-encoder sees them (SPEC §1)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer must be a fast (Rust) Hugging Face tokenizer: fastnig needs sequence_ids() "
                        "to find the query tokens; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if baseline.startswith("pad") and tokenizer.pad_token_id is None:
        raise ValueError(f"baseline={baseline!r} needs a [PAD] token but the tokenizer has none; use 'zero'")
    rows = []
    for query, passage in pairs:
        enc = tokenize_pair(tokenizer, query, passage, max_length, return_special_tokens_mask=True)
        seq = enc.sequence_ids()
        special = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)
        if baseline.endswith("query"):
            replace = torch.tensor([s == 0 for s in seq], dtype=torch.bool) & ~special
        else:
            replace = ~special
        rows.append((enc, replace))
    longest = max(len(enc["input_ids"]) for enc, _ in rows)
    P = len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((P, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((P, longest), dtype=torch.long)
    types = torch.zeros((P, longest), dtype=torch.long)
    replace = torch.zeros((P, longest), dtype=torch.bool)
    lengths = torch.zeros(P, dtype=torch.long)
    for i, (enc, rep) in enumerate(rows):
        n = len(enc["input_ids"])
        input_ids[i, :n] = torch.tensor(enc["input_ids"])
        attention[i, :n] = 1
        if "token_type_ids" in enc:
            types[i, :n] = torch.tensor(enc["token_type_ids"])
        replace[i, :n] = rep
        lengths[i] = n
    return EncodedPairs(input_ids, attention, types if use_token_type_ids else None, replace, lengths)


def baseline_embeddings(embeddings: nn.Module, enc: EncodedPairs, baseline: str, pad_id: Optional[int]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Word embeddings of the input and of the baseline, each ``[P, T, D]``."""
    device = embeddings.weight.device
    ids = enc.input_ids.to(device)
    replace = enc.replace.to(device)
    x = embeddings(ids)
    if baseline.startswith("pad"):
        x_base = embeddings(torch.where(replace, torch.full_like(ids, pad_id), ids))
    else:
        x_base = x * (~replace).unsqueeze(-1).to(x.dtype)
    return x, x_base


# ---------------------------------------------------------------- the engine
# Threads of the CPU kernel when called between autograd's ops: torch's OpenMP
# workers spin-wait for a while after each op, so a second kernel thread only
# fights them for the core (MiniLM shape: 83 ms of kernel time per call of
# attribute with 1 thread, 123 ms with 2).
ENGINE_CPU_KERNEL_THREADS = 1

class _HookState:
    """Per-batch bookkeeping shared by the forward and gradient hooks."""

    def __init__(self, pairs: int, steps_in_chunk: int, lengths: torch.Tensor, rule: str,
                 out: Dict[str, torch.Tensor], carries: Dict[str, Carry]):
        self.pairs, self.steps, self.lengths, self.rule = pairs, steps_in_chunk, lengths, rule
        # real tokens per pair for outputs of T tokens (T = 1 past the first-token cut)
        self.lengths_for: Dict[int, torch.Tensor] = {}
        self.out, self.carries = out, carries
        self.activations: Dict[str, torch.Tensor] = {}

    def on_forward(self, name: str, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if name in self.activations:
            raise RuntimeError(f"module {name} ran twice in one forward pass; fastnig attributes each Linear once")
        self.activations[name] = output
        output.register_hook(lambda grad, name=name: self.on_grad(name, grad))

    def on_grad(self, name: str, grad: torch.Tensor) -> None:
        a = self.activations.pop(name)
        a4 = a.unflatten(0, (self.pairs, self.steps))
        g4 = grad.unflatten(0, (self.pairs, self.steps))
        if a4.dim() != 4:
            raise ValueError(f"layer {name}: expected a [batch, tokens, features] output, got {tuple(a.shape)}")
        carry = self.carries.get(name)
        if carry is None:
            carry = self.carries[name] = Carry.like(a4)
        tokens = a4.shape[2]
        lengths = self.lengths_for.get(tokens)
        if lengths is None:
            lengths = self.lengths_for[tokens] = self.lengths.clamp(max=tokens)
        accumulate_conductance(a4, g4, lengths, self.out[name], carry, self.rule, ENGINE_CPU_KERNEL_THREADS)


# On CPU, forwards of about this many token rows (path points × pairs × tokens)
# run faster than one big forward: the activations stay closer to the caches
# (MiniLM shape, 128 tokens: 11 points per forward ~10 % faster than 33; 1-4
# points slower again; bench/bench_attribute.py).
CPU_ROWS_PER_FORWARD = 2048


def auto_step_batch(model: nn.Module, modules: Mapping[str, nn.Linear], tokens: int, pairs: int,
                    device: torch.device, dtype: Optional[torch.dtype] = None, fraction: float = 0.5) -> int:
    """Path points per pair in one forward: what ``fraction`` of the free memory holds,
    and on CPU at most :data:`CPU_ROWS_PER_FORWARD` token rows.

    Memory estimate per point and token: every attributed Linear output kept
    for its gradient hook plus about as much again for autograd's saved
    tensors and the gradients in flight (4 × the Linear outputs), plus the
    attention probabilities (heads × tokens per layer, twice), in the compute
    dtype.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_host_memory()
    size = torch.finfo(dtype or next(model.parameters()).dtype).bits // 8
    width = sum(m.out_features for m in modules.values())
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", 0)) or 0
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layers", 0)) or 0
    per_point = tokens * pairs * size * (4 * width + 2 * heads * layers * tokens)
    points = int(free * fraction // max(per_point, 1))
    if device.type == "cpu":
        points = min(points, CPU_ROWS_PER_FORWARD // max(tokens * pairs, 1))
    return max(1, points)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume 4 GiB


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
        steps = max_steps
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    check_int("steps", steps, 1, " (path intervals) or 'auto'")
    if step_batch not in (None, "auto") and not (isinstance(step_batch, int) and not isinstance(step_batch, bool)
                                                 and step_batch >= 1):
        raise ValueError(f"step_batch must be None / 'auto' (sized from free memory) or an integer >= 1 "
                         f"(path points per forward; {steps + 1} = all at once), got {step_batch!r}")
    check_int("pair_batch", pair_batch, 1)
    if max_length is not None:
        check_int("max_length", max_length, 4, " (tokens)")


def attribute(model: nn.Module, pairs: Sequence[Pair], *, tokenizer=None, target: TargetSpec = "relevant",
              baseline: str = "pad", steps: int = 100, rule: str = "trapezoid",
              layers: Optional[Sequence[str]] = None, include_pooler: bool = False,
              step_batch: Optional[int] = None, pair_batch: int = 1, max_length: Optional[int] = None,
              output: str = "probability", nodes: str = "uniform", tolerance: float = 0.01,
              max_steps: int = 256, device: Union[str, torch.device, None] = None,
              dtype: Optional[torch.dtype] = None, progress: bool = True) -> Attributions:
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
        steps: N, the number of path intervals (N + 1 points are evaluated),
            or ``"auto"``: per pair, N = 16, 32, ... doubling up to
            ``max_steps`` until |delta| <= ``tolerance`` · max(|F(x) - F(x')|,
            0.01); each level is a fresh run, so a pair's result equals a
            fixed-``steps`` run at its final N (``Attributions.steps_used``).
        rule: ``"trapezoid"`` (default) or ``"left"`` (= Captum LayerConductance,
            ``riemann_trapezoid``).
        layers: Linear module names to attribute; ``None`` = every encoder Linear.
        include_pooler: with ``layers=None``, also attribute the pooler.
        step_batch: path points per pair in one forward (bounds memory; the
            result does not depend on it beyond float rounding); ``None`` or
            ``"auto"`` (default) = as many as half the free memory holds, on
            CPU at most ~2048 token rows, which is faster (:func:`auto_step_batch`);
            an integer = at most that many (``steps + 1`` = all at once).
        pair_batch: pairs sharing one forward (padded to the longest).
        max_length: tokens of the pair encoding; ``None`` = the tokenizer's
            ``model_max_length`` (a CrossEncoder's ``max_length``), else 512; never
            more than the model's position embeddings allow.
        output: ``"probability"`` (default) or ``"logit"``: what F is (SPEC §2).
        nodes: ``"uniform"`` (default) or ``"chebyshev"`` path positions (:func:`path_nodes`).
        tolerance, max_steps: the stopping rule of ``steps="auto"``.
        device: where to compute; ``None`` = the model's device (the model is
            moved there otherwise).
        dtype: compute dtype under autocast (e.g. ``torch.bfloat16``); the
            accumulation stays float32.
        progress: show a progress bar over pairs.

    Returns:
        :class:`Attributions` with ``scores[name]``: ``[num_pairs, out_features]``.
    """
    pairs = validate_pairs(pairs)
    _check_settings(baseline, steps, rule, step_batch, pair_batch, max_length, output, nodes, tolerance,
                    max_steps)
    targets = normalize_targets(target, len(pairs))
    model, tokenizer = unwrap(model, tokenizer)
    embeddings = input_embeddings(check_model(model))
    modules = linear_modules(model, layers, include_pooler)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    max_length = resolve_max_length(model, tokenizer, max_length)
    move_model(model, device)
    device = embeddings.weight.device
    accepts_types = accepts_token_type_ids(model, tokenizer)

    levels = auto_step_levels(max_steps) if steps == "auto" else [steps]
    P = len(pairs)
    scores = {n: torch.zeros(P, m.out_features, dtype=torch.float32) for n, m in modules.items()}
    input_nig = torch.zeros(P, dtype=torch.float64)
    f_input = torch.zeros(P, dtype=torch.float64)
    f_base = torch.zeros(P, dtype=torch.float64)
    num_tokens = torch.zeros(P, dtype=torch.long)
    steps_used = torch.zeros(P, dtype=torch.long)

    # Pairs of similar length share a batch: less padding, same results.
    lengths_hint = [len(q) + len(p) for q, p in pairs]
    order = sorted(range(P), key=lambda i: -lengths_hint[i])
    batches = [order[i:i + pair_batch] for i in range(0, P, pair_batch)]

    bar = tqdm(total=P, desc="NIG", unit="pair", disable=not progress)
    with frozen_eval(model):
        for batch in batches:
            pending = batch
            for level in levels:
                alphas = path_nodes(level, nodes)
                enc = encode_pairs(tokenizer, [pairs[i] for i in pending], max_length, baseline, accepts_types)
                chunk = step_batch
                if step_batch in (None, "auto"):
                    chunk = auto_step_batch(model, modules, enc.input_ids.shape[1], len(pending), device, dtype)
                step_chunks = path_chunks(level + 1, chunk)
                relevant = torch.tensor([targets[i] == "relevant" for i in pending], device=device)
                out, nig_in, f_in, f_b = _attribute_batch(model, embeddings, modules, enc, relevant,
                                                          tokenizer.pad_token_id, baseline, alphas, step_chunks,
                                                          rule, output, dtype)
                nig_in, f_in, f_b = nig_in.cpu(), f_in.cpu().double(), f_b.cpu().double()
                if level == levels[-1]:
                    done = torch.ones(len(pending), dtype=torch.bool)
                else:
                    done = relative_delta(nig_in - (f_in - f_b), f_in, f_b, floor=0.01) <= tolerance
                idx = torch.tensor(pending)[done]
                for n in scores:
                    scores[n][idx] = out[n].cpu()[done]
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
    delta = input_nig - (f_input - f_base)
    target_name = targets[0] if len(set(targets)) == 1 else "per-pair"
    settings = attribution_settings(model, target=target_name, output=output, baseline=baseline, steps=steps,
                                    rule=rule, max_length=max_length, dtype=dtype, nodes=nodes,
                                    tolerance=tolerance, max_steps=max_steps)
    return Attributions(scores, delta.float(), f_input.float(), f_base.float(), targets, num_tokens, settings,
                        steps_used)


def attribution_settings(model: nn.Module, *, target: str, output: str = "probability", baseline: str = "pad",
                         steps: Union[int, str] = 100, rule: str = "trapezoid", max_length: int = 512,
                         dtype: Optional[torch.dtype] = None, nodes: str = "uniform", tolerance: float = 0.01,
                         max_steps: int = 256) -> Dict[str, object]:
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
    return settings


def _attribute_batch(model, embeddings, modules, enc: EncodedPairs, relevant, pad_id, baseline, alphas,
                     step_chunks, rule, output, dtype):
    """Attribute one batch of P pairs over all path points, chunk by chunk."""
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
    out = {n: torch.zeros(P, m.out_features, dtype=torch.float32, device=device) for n, m in modules.items()}
    carries: Dict[str, Carry] = {}
    input_out = torch.zeros(P, x_in.shape[-1], dtype=torch.float64, device=device)
    input_carry: Optional[Carry] = None
    f_in = torch.zeros(P, device=device)
    f_b = torch.zeros(P, device=device)
    last = len(alphas) - 1
    for start, stop in step_chunks:
        S = stop - start
        alpha = alphas[start:stop].to(device=device, dtype=path_dtype)
        path = (x_base.unsqueeze(1) + alpha.view(1, S, 1, 1) * direction.unsqueeze(1))
        path = path.flatten(0, 1).requires_grad_(True)
        state = _HookState(P, S, lengths, rule, out, carries)
        handles = [m.register_forward_hook(lambda mod, inp, o, name=name: state.on_forward(name, o))
                   for name, m in modules.items()]
        try:
            kwargs = {"inputs_embeds": path, "attention_mask": mask.repeat_interleave(S, dim=0)}
            if types is not None:
                kwargs["token_type_ids"] = types.repeat_interleave(S, dim=0)
            with _autocast(device, dtype), first_token_only(model):
                logits = model(**kwargs).logits
            f = target_function(logits, relevant.repeat_interleave(S), output)
            torch.autograd.backward(f.sum(), inputs=[path])
        finally:
            for h in handles:
                h.remove()
        if state.activations:
            missing = ", ".join(sorted(state.activations)[:3])
            raise RuntimeError(f"no gradient reached layer(s) {missing}: they do not influence the model output")
        f = f.detach().view(P, S)
        if start == 0:
            f_b = f[:, 0]
        if stop - 1 == last:
            f_in = f[:, -1]
        path4 = path.detach().unflatten(0, (P, S))
        grad4 = path.grad.unflatten(0, (P, S))
        if input_carry is None:
            input_carry = Carry.like(path4)
        accumulate_conductance(path4, grad4, lengths, input_out, input_carry, rule, ENGINE_CPU_KERNEL_THREADS)
    return out, input_out.sum(dim=1), f_in, f_b
