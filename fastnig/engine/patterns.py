"""Attention-pattern NIG by segment: the conductance of every head's attention probabilities, in blocks.

Owns: :func:`attention_pattern_nig` and :class:`AttentionPatterns`.  For every
attention layer and head, the conductance of the attention probabilities
p_{h,i,j} (query position i, key position j; after the softmax, as the value
product reads them) summed into blocks by (segment of i × segment of j), with
segments query / passage / special (:data:`fastnig.engine.encoding.SEGMENTS`):
``blocks[projection name]`` ``[pairs, heads, 3, 3]`` — query→passage is
``[:, :, 0, 1]``, passage→query ``[:, :, 1, 0]``, to and from the structure
tokens the rows and columns of index 2 (docs/method.md §12).

**Attention implementation.** SDPA and flash attention never materialise the
probabilities, so this runs the model with **eager** attention
(``model.set_attn_implementation("eager")``) for the call only and restores the
previous implementation afterwards (also on error).  Eager attention keeps the
``[points, heads, T, T]`` probabilities of one path chunk for its backward anyway;
the gradient hook on them reduces each step's rule term (g · Δp, trapezoid:
½ (g_k + g_{k+1}) · Δp) into the ``[P, heads, 3, 3]`` blocks at once with the fused
segment-pair op (:func:`fastnig.engine.pattern_kernels.accumulate_segment_pairs`,
C++ / CUDA: every element read once, no ``[P, heads, T, T]`` product made), so
nothing of that size outlives the chunk beyond the carry (the previous point's p
and g, the even point's too for Richardson, copied out of the chunk).  Where the
compiled op does not run (an extension built before it, or without its CUDA
kernels for CUDA tensors) its pure-PyTorch reference (one-hot segment matrices,
Q^T (g ⊙ Δp) K) does the same sums.  A separate pass from :func:`fastnig.attribute`;
no out-of-memory redo (``step_batch`` bounds the chunk).

Must not: know about datasets, schemes or files.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoding import SEGMENTS, Pair, baseline_embeddings, validate_pairs
from .heads import output_projections
from .memory import auto_step_batch
from .model import (
    compute_autocast,
    detached_parameters,
    frozen_eval,
    load_tokenizer,
    move_model,
    single_device,
    unwrap,
)
from .pattern_kernels import segment_pair_blocks
from .quadrature import path_nodes, richardson
from .rankers import bind_ranker
from .scoring import TargetSpec, normalize_targets, target_function
from .settings import AttributionSettings

ATTENTION = "eager"
"""The attention implementation the pattern view needs (the only one that materialises the probabilities)."""


@dataclass
class AttentionPatterns:
    """Conductance of the attention probabilities of every head, by (query segment, key segment).

    Attributes:
        blocks: output projection name (the layer's key in ``Attributions.head_scores``) ->
            float32 ``[num_pairs, heads, 3, 3]``: ``[p, h, s, r]`` = Σ over query positions of
            segment s and key positions of segment r of the conductance of p_{h,i,j}.
        f_input, f_baseline: ``[num_pairs]`` F at the input and the baseline.
        settings: what it was computed with (``attention: "eager"``).
    """

    blocks: Dict[str, torch.Tensor]
    f_input: torch.Tensor
    f_baseline: torch.Tensor
    settings: Dict[str, object] = field(default_factory=dict)

    def head_totals(self) -> Dict[str, torch.Tensor]:
        """``{name: [pairs, heads]}``: each head's probabilities' total conductance (the blocks' sum)."""
        return {n: b.sum(dim=(2, 3)) for n, b in self.blocks.items()}


@contextmanager
def attention_implementation(model: nn.Module, name: str = ATTENTION) -> Iterator[None]:
    """Run ``model`` with the attention implementation ``name`` inside the block; the previous one after."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before == name:
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation to {name!r}, which "
                         "the attention-pattern view needs (the probabilities)")
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _probe_modules(model: nn.Module) -> Dict[str, Tuple[nn.Module, int]]:
    """Output projection name -> (the module returning that layer's attention probabilities, heads)."""
    modules = dict(model.named_modules())
    found = {}
    for name, (_, heads) in output_projections(model).items():
        parent = name.rsplit(".", 1)[0]
        if parent.endswith("attention.output"):  # BERT family: the probabilities come from attention.self
            parent = parent[:-len("output")] + "self"
        found[name] = (modules[parent], heads)
    return found


class _Blocks:
    """The running sums of one layer: step terms of the rule reduced to ``[P, heads, 3, 3]`` blocks by the
    fused segment-pair op (:func:`fastnig.engine.pattern_kernels.segment_pair_blocks`)."""

    def __init__(self, trapezoid: bool, coarse: bool):
        self.trapezoid, self.coarse = trapezoid, coarse
        self.fine: Optional[torch.Tensor] = None
        self.half: Optional[torch.Tensor] = None
        self.prev: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.even: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def add(self, a: torch.Tensor, g: torch.Tensor, index: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Point ``index`` of the path: ``a``, ``g`` ``[P, heads, Tq, Tk]``; ``q`` / ``k`` the ``[P, Tq]`` /
        ``[P, Tk]`` segment ids of the query / key positions (−1: padding, in no block)."""
        if self.fine is None:
            self.fine = torch.zeros(a.shape[0], a.shape[1], len(SEGMENTS), len(SEGMENTS), device=a.device)
            self.half = torch.zeros_like(self.fine)
        if self.prev is not None:
            pa, pg = self.prev
            segment_pair_blocks(pa, pg, a, g if self.trapezoid else None, q, k, self.fine,
                                "trapezoid" if self.trapezoid else "left")
        self.prev = (a, g)
        if self.coarse and index % 2 == 0:
            if self.even is not None:
                ea, eg = self.even
                segment_pair_blocks(ea, eg, a, g, q, k, self.half, "trapezoid")
            self.even = (a, g)

    def own(self) -> None:
        """Copy the carried points out of the chunk's tensors (views of them would keep the whole chunk)."""
        self.prev = tuple(t.clone() for t in self.prev) if self.prev is not None else None
        self.even = tuple(t.clone() for t in self.even) if self.even is not None else None

    def result(self) -> torch.Tensor:
        return richardson(self.fine, self.half) if self.coarse else self.fine


def _segment_ids(segments: torch.Tensor, tokens: int, read: torch.Tensor) -> torch.Tensor:
    """``[P, tokens]`` segment ids of the first ``tokens`` positions (−1: padding; one position: ``read``)."""
    ids = read[:, None] if tokens == 1 and segments.shape[1] != 1 else segments[:, :tokens]
    return ids.to(torch.int64).contiguous()


def attention_pattern_nig(model: nn.Module, pairs: Sequence[Pair], settings: Optional[AttributionSettings] = None,
                          *, tokenizer=None, target: TargetSpec = "relevant",
                          device: Union[str, torch.device, None] = None, ranker=None, progress: bool = False,
                          **overrides) -> AttentionPatterns:
    """Conductance of every head's attention probabilities toward F, in (query segment × key segment) blocks.

    Same path, baseline, target, rules (``left``, ``trapezoid``, ``richardson``; fixed ``steps``) and rankers
    as :func:`fastnig.attribute`; runs with eager attention for the call (restored after).
    """
    settings = AttributionSettings() if settings is None else settings
    if overrides:
        settings = settings.replace(**overrides)
    if settings.steps == "auto":
        raise ValueError("attention_pattern_nig needs a fixed number of steps (steps='auto' is not supported)")
    pairs = validate_pairs(pairs)
    targets = normalize_targets(target, len(pairs))
    model, tokenizer = unwrap(model, tokenizer)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
    bound = bind_ranker(ranker, model, tokenizer)
    max_length = bound.max_length(settings.max_length)
    move_model(model, device)
    device = single_device(model)
    probes = _probe_modules(model)
    P = len(pairs)
    blocks = {n: torch.zeros(P, heads, len(SEGMENTS), len(SEGMENTS)) for n, (_, heads) in probes.items()}
    f_input, f_base = torch.zeros(P), torch.zeros(P)
    alphas = path_nodes(settings.steps, settings.nodes)
    coarse = settings.rule == "richardson"
    trapezoid = settings.rule != "left"
    # the first-token cut's query-cut attention returns no probabilities: off here (the decoders' cut keeps them)
    cut = False if bound.family == "classifier" else settings.last_token_cut
    with attention_implementation(model), frozen_eval(model):
        for begin in range(0, P, settings.pair_batch):
            rows = list(range(begin, min(begin + settings.pair_batch, P)))
            enc = bound.encode([pairs[i] for i in rows], max_length, settings.baseline)
            chunk = settings.step_batch
            if chunk in (None, "auto"):
                chunk = auto_step_batch(model, bound.modules(), enc.input_ids.shape[1], len(rows), device,
                                        settings.dtype, first_token_cut=settings.first_token_cut, coarse=coarse)
            out, f_in, f_b = _pattern_batch(bound, probes, settings, enc, targets, rows, alphas, chunk, device,
                                            trapezoid, coarse, cut)
            for name, value in out.items():
                blocks[name][rows] = value.cpu()
            f_input[rows], f_base[rows] = f_in.cpu(), f_b.cpu()
    record = settings.record(model, target=targets[0] if len(set(targets)) == 1 else "per-pair",
                             max_length=max_length)
    record["attention"] = ATTENTION
    return AttentionPatterns(blocks, f_input, f_base, record)


def _pattern_batch(bound, probes, settings, enc, targets: List[str], rows, alphas, chunk: int, device,
                   trapezoid: bool, coarse: bool, cut: bool):
    P = len(rows)
    with torch.no_grad():
        x_in, x_base = baseline_embeddings(bound.embeddings, enc, settings.baseline, bound.pad_id)
        dtype, exact = x_in.dtype, torch.promote_types(x_in.dtype, torch.float32)
        x_in, x_base = x_in.to(exact), x_base.to(exact)
    segments = enc.segments.to(device)
    read = (enc.read_segment if enc.read_segment is not None else enc.segments[:, 0]).to(device)
    mask = enc.attention_mask.to(device)
    types = enc.token_type_ids.to(device) if enc.token_type_ids is not None else None
    relevant = torch.tensor([targets[i] == "relevant" for i in rows], device=device)
    sums = {n: _Blocks(trapezoid, coarse) for n in probes}
    parameters = detached_parameters(bound.model)
    f_in = f_b = None
    total = len(alphas)
    for start in range(0, total, max(1, int(chunk))):
        stop = min(start + max(1, int(chunk)), total)
        S = stop - start
        alpha = alphas[start:stop].to(device=device, dtype=exact)
        path = (x_base.unsqueeze(1) + alpha.view(1, S, 1, 1) * (x_in - x_base).unsqueeze(1))
        path = path.flatten(0, 1).to(dtype).requires_grad_(True)

        def hook(module, args, output, name):
            heads = probes[name][1]
            found = [t for t in (output if isinstance(output, tuple) else (output,))
                     if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == heads and t.requires_grad]
            if not found:
                raise RuntimeError(f"{name}: the attention module returned no probabilities (eager attention?)")
            p = found[-1]

            def on_grad(g, p=p, name=name):
                a4, g4 = p.detach().unflatten(0, (P, S)), g.unflatten(0, (P, S))
                q = _segment_ids(segments, a4.shape[3], read)
                k = _segment_ids(segments, a4.shape[4], read)
                for s in range(S):
                    sums[name].add(a4[:, s], g4[:, s], start + s, q, k)
                sums[name].own()

            p.register_hook(on_grad)

        handles = [m.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name))
                   for name, (m, _) in probes.items()]
        try:
            with parameters, compute_autocast(path.device, settings.dtype):
                logits = bound.logits(path, mask.repeat_interleave(S, dim=0),
                                      types.repeat_interleave(S, dim=0) if types is not None else None, cut)
            f = target_function(logits, relevant.repeat_interleave(S), settings.output)
            torch.autograd.backward(f.sum(), inputs=[path])
        finally:
            for h in handles:
                h.remove()
        f = f.detach().view(P, S)
        f_b = f[:, 0] if start == 0 else f_b
        f_in = f[:, -1] if stop == total else f_in
    return {n: b.result() for n, b in sums.items()}, f_in, f_b


__all__ = ("ATTENTION", "AttentionPatterns", "attention_implementation", "attention_pattern_nig")
