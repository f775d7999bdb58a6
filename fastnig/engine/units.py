"""Conditional NIG: attribution toward one internal unit instead of the ranker's score.

Owns: :class:`Unit` (a Linear output neuron or an attention head, optionally
restricted to the tokens of one segment), :class:`UnitRanker` (a bound ranker
whose "logit" is that unit's activation summed over the tokens, the forward
stopped right after the unit's module), and :func:`conditional`, which finds the
units *below* the target — the attributed modules (and head contexts) the
target's activation depends on, read off the autograd graph of one dry forward —
so that only those are hooked and nothing above the target is computed
(docs/method.md §13).

F = Σ_{t} a_{u,t}: for a neuron (m, j) its output a_{m,j,t}; for a head (o, h)
Σ_{i in head h} of the attention context c_{o,t,i} (the output projection's
input, :mod:`fastnig.engine.heads`); the sum over the pair's real tokens, or
over the tokens of ``segment`` only.  :func:`fastnig.attribute` runs it as a
1-logit ranker with ``output="logit"``, so every rule, chunking, the
out-of-memory redo and the convergence delta (now against F(x) − F(x') of the
unit) apply unchanged.

Must not: tokenise itself, know about datasets, schemes or files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .encoding import SEGMENTS, Pair
from .heads import CONTEXT, head_contexts, output_projections, split_head_scores
from .model import frozen_eval

KINDS = ("neuron", "head")


@dataclass(frozen=True)
class Unit:
    """An internal unit to attribute toward (``fastnig.attribute(..., target=Unit(...))``).

    Args:
        name: the ``nn.Linear``'s module name (``kind="neuron"``), or the attention output
            projection's name (``kind="head"``, e.g. ``bert.encoder.layer.1.attention.output.dense``).
        index: the output unit (neuron) or the query head.
        kind: ``"neuron"`` or ``"head"``.
        segment: ``None`` (every real token) or ``"query"`` / ``"passage"`` / ``"special"``: F sums the
            unit's activation over that segment's tokens only.
    """

    name: str
    index: int
    kind: str = "neuron"
    segment: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Unit.name must be a module name, got {self.name!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"Unit.index must be an integer >= 0, got {self.index!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Unit.kind must be one of {KINDS}, got {self.kind!r}")
        if self.segment is not None and self.segment not in SEGMENTS:
            raise ValueError(f"Unit.segment must be None or one of {SEGMENTS}, got {self.segment!r}")

    def describe(self) -> str:
        """E.g. ``"neuron bert.encoder.layer.1.intermediate.dense[7]"`` (``" @query"`` with a segment)."""
        return f"{self.kind} {self.name}[{self.index}]" + (f" @{self.segment}" if self.segment else "")

    @property
    def key(self) -> str:
        """The engine's key of the tensor the unit reads: the module's name, or its input's (heads)."""
        return self.name + CONTEXT if self.kind == "head" else self.name


class _Reached(Exception):
    """Raised by the target's hook: the rest of the forward is not needed."""


class UnitRanker:
    """A bound ranker (:class:`fastnig.engine.rankers.BoundRanker`) whose ``[batch, 1]`` "logit" is the
    unit's activation summed over the tokens; everything else is the wrapped ranker's."""

    def __init__(self, bound, unit: Unit):
        model = bound.model
        self._bound, self.unit = bound, unit
        modules = dict(model.named_modules())
        if unit.kind == "head":
            projections = output_projections(model)
            if unit.name not in projections:
                raise ValueError(f"target {unit.describe()}: not an attention output projection; known: "
                                 f"{list(projections)[:3]}...")
            self.module, heads = projections[unit.name]
            if unit.index >= heads:
                raise ValueError(f"target {unit.describe()}: the layer has {heads} heads")
            self.width = self.module.in_features // heads
        else:
            module = modules.get(unit.name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target {unit.describe()}: {unit.name!r} is not an nn.Linear of the model")
            if unit.index >= module.out_features:
                raise ValueError(f"target {unit.describe()}: the module has {module.out_features} outputs")
            self.module = module
        self.segments: Optional[torch.Tensor] = None
        self.read_segment: Optional[torch.Tensor] = None

    def __getattr__(self, name):  # everything else is the wrapped ranker's
        return getattr(self._bound, name)

    def encode(self, pairs: Sequence[Pair], max_length: int, baseline: str):
        enc = self._bound.encode(pairs, max_length, baseline)
        self.segments, self.read_segment = enc.segments, enc.read_segment  # the batch the next logits() sees
        return enc

    def _activation(self, args, kwargs, output) -> torch.Tensor:
        """``[batch, tokens]`` activation of the unit from its module's call."""
        if self.unit.kind == "head":
            context = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            start = self.unit.index * self.width
            return context[..., start:start + self.width].float().sum(dim=-1)
        a = output[..., self.unit.index].float()
        return a.unsqueeze(1) if a.dim() == 1 else a

    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        """``[batch, 1]`` F of each row: the forward runs up to the unit's module (no cut: every token counts)."""
        box = {}

        def grab(module, args, kwargs, output):
            box["a"] = self._activation(args, kwargs, output)
            raise _Reached

        handle = self.module.register_forward_hook(grab, with_kwargs=True)
        try:
            self._bound.logits(inputs_embeds, attention_mask, token_type_ids, cut=False)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "a" not in box:
            raise ValueError(f"target {self.unit.describe()}: its module did not run in the model's forward")
        a = box["a"]
        return (a * self._weights(a, attention_mask)).sum(dim=1, keepdim=True)

    def _weights(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[batch, tokens]`` 1 on the tokens F sums over (real tokens, of ``segment`` if set), else 0."""
        rows, tokens = a.shape
        segment = SEGMENTS.index(self.unit.segment) if self.unit.segment else None
        if tokens == 1 and mask.shape[1] != 1:  # a one-token output: the scored position (a decoder step)
            if segment is None or self.read_segment is None:
                return torch.ones_like(a)
            read = self.read_segment.to(a.device).repeat_interleave(rows // self.read_segment.shape[0])
            return (read == segment).to(a.dtype)[:, None]
        weights = mask[:, :tokens].to(a.dtype)
        if segment is not None:
            if self.segments is None:
                raise ValueError("a segment-restricted target needs the pairs' segments (EncodedPairs.segments)")
            seg = self.segments.to(a.device)[:, :tokens]
            seg = seg.repeat_interleave(rows // seg.shape[0], dim=0)
            weights = weights * (seg == segment).to(a.dtype)
        return weights


def conditional(bound, unit: Unit, modules: Dict[str, nn.Module], pair: Pair, max_length: int, baseline: str,
                device: torch.device) -> Tuple[UnitRanker, Dict[str, nn.Module]]:
    """The ranker of F = the unit's activation and the modules of ``modules`` below the unit.

    "Below" = the target's activation depends on the module's output: one dry forward of
    ``pair`` at its input (grad enabled, eval mode) keeps every module's output, and those
    with a gradient path to F stay (in model order); the target's own tensor never does."""
    if not isinstance(unit, Unit):
        raise TypeError(f"target must be 'relevant' / 'non-relevant' or a fastnig.Unit, got {unit!r}")
    ranker = UnitRanker(bound, unit)
    enc = ranker.encode([pair], max_length, baseline)
    captured: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, out))
               for name, m in modules.items() if name != unit.key]
    try:
        with frozen_eval(bound.model), torch.enable_grad():
            x = bound.embeddings(enc.input_ids.to(device)).detach().requires_grad_(True)
            types = enc.token_type_ids.to(device) if enc.token_type_ids is not None else None
            f = ranker.logits(x, enc.attention_mask.to(device), types)
    finally:
        for h in handles:
            h.remove()
    names = [n for n, t in captured.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(f.sum(), [captured[n] for n in names], allow_unused=True) if names else []
    reached = {n for n, g in zip(names, grads) if g is not None}
    return ranker, {n: m for n, m in modules.items() if n in reached}


def relabel(record: Dict[str, object], unit: Optional[Unit], targets: List[str]) -> List[str]:
    """With a unit target: the record's target and output say what F was, and so does each pair's target."""
    if unit is None:
        return targets
    record.update(target=unit.describe(), output="activation")
    return [unit.describe()] * len(targets)


def engine_target(bound, modules: Dict[str, nn.Module], settings, unit: Optional[Unit], pair: Pair, max_length: int,
                  device: torch.device):
    """``(bound, modules, settings)`` as :func:`fastnig.attribute` runs them: with ``settings.heads`` every
    attention output projection's input joins ``modules`` (:func:`fastnig.engine.heads.head_contexts`); with a
    unit target, F is the unit's activation (a 1-logit ranker read with ``output="logit"``) and only the
    modules below it stay (:func:`conditional`)."""
    if settings.heads:
        modules = {**modules, **head_contexts(bound.model)}
    if unit is None:
        return bound, modules, settings
    bound, modules = conditional(bound, unit, modules, pair, max_length, settings.baseline, device)
    return bound, modules, settings.replace(output="logit")


__all__ = ("CONTEXT", "KINDS", "Unit", "UnitRanker", "conditional", "engine_target", "relabel", "split_head_scores")
