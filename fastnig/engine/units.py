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

:func:`attribute_units` attributes toward several units of the same pairs in batched
passes: each pass replicates the pairs once per target (each replica's F is its own
target's activation, :class:`_TargetsRanker`), so one forward + backward gives every
target's attributions; targets of similar depth (:func:`target_passes`) share a pass,
as many as fit one forward with all their path points by the memory model
(:func:`targets_per_pass`).

Must not: tokenise itself, know about datasets, schemes or files.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .encoding import SEGMENTS, Pair, validate_pairs
from .heads import CONTEXT, head_contexts, output_projections, split_head_scores
from .memory import CPU_ROWS_PER_FORWARD, chunk_memory, free_memory
from .model import frozen_eval, load_tokenizer, move_model, single_device, unwrap
from .rankers import bind_ranker
from .settings import AttributionSettings
from .two_tower import attributed_by

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


# ------------------------------------------------------------ several targets in one pass
class _Tagged(str):
    """A query string that knows which target of the pass its replica belongs to."""

    target: int

    def __new__(cls, text: str, target: int) -> "_Tagged":
        tagged = super().__new__(cls, text)
        tagged.target = target
        return tagged


class _AllReached(Exception):
    """Raised once every target module of the pass has run."""


def _targets_bound(bound, rankers: List[UnitRanker], modules: Dict[str, nn.Module]):
    """A copy of ``bound`` (a :class:`~fastnig.engine.rankers.BoundRanker`, so :func:`fastnig.attribute` takes it
    as ``ranker=``) whose pairs are replicas tagged with a target (:class:`_Tagged` queries) and whose
    ``[batch, 1]`` "logit" is, per row, its own target's activation summed over the tokens (each target's
    :class:`UnitRanker` reads it); the forward stops once the last target module has run.  ``modules()``
    returns ``modules``: the units below at least one target of the pass."""
    multi = copy.copy(bound)
    state: Dict[str, torch.Tensor] = {}

    def encode(pairs: Sequence[Pair], max_length: int, baseline: str):
        state["which"] = torch.tensor([q.target for q, _ in pairs], dtype=torch.long)
        enc = bound.encode([(str(q), p) for q, p in pairs], max_length, baseline)
        for ranker in rankers:
            ranker.segments, ranker.read_segment = enc.segments, enc.read_segment
        return enc

    def logits(inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        rows = inputs_embeds.shape[0]
        which = state["which"].to(inputs_embeds.device)
        which = which.repeat_interleave(rows // which.shape[0])
        by_module: Dict[int, List[int]] = {}
        for j, ranker in enumerate(rankers):
            by_module.setdefault(id(ranker.module), []).append(j)
        grabbed: Dict[int, torch.Tensor] = {}
        done: set = set()

        def grab(module, args, kwargs, output):
            if id(module) in done:
                return
            done.add(id(module))
            for j in by_module[id(module)]:
                grabbed[j] = rankers[j]._activation(args, kwargs, output)
            if len(done) == len(by_module):
                raise _AllReached

        handles = [r.module.register_forward_hook(grab, with_kwargs=True)
                   for r in {id(r.module): r for r in rankers}.values()]
        try:
            bound.logits(inputs_embeds, attention_mask, token_type_ids, cut=False)
        except _AllReached:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [rankers[j].unit.describe() for j in range(len(rankers)) if j not in grabbed]
        if missing:
            raise ValueError(f"target {missing[0]}: its module did not run in the model's forward")
        f = None
        for j, ranker in enumerate(rankers):
            a = grabbed[j]
            fj = (a * ranker._weights(a, attention_mask)).sum(dim=1, keepdim=True)
            f = fj if f is None else torch.where((which == j)[:, None], fj, f)
        return f

    multi.encode, multi.logits = encode, logits
    multi.modules = lambda layers=None, include_pooler=False: dict(modules)
    if hasattr(bound, "current_tower"):  # state the forward sets lives on the original (a two-tower ranker)
        multi.current_tower = bound.current_tower
    return multi


def _module_order(model: nn.Module, unit: Unit) -> int:
    """The position of the unit's module in ``model.named_modules()`` (for a head: its output projection)."""
    for i, (name, _) in enumerate(model.named_modules()):
        if name == unit.name:
            return i
    return -1


def targets_per_pass(model: nn.Module, modules: Dict[str, nn.Module], tokens: int, pairs: int, points: int,
                     device: torch.device, settings: AttributionSettings, fraction: float = 0.5) -> int:
    """How many targets of ``pairs`` pairs may share one pass: the most whose replicas (``pairs`` × targets
    rows) still fit all ``points`` path points in one forward — ``fraction`` of the free memory by the memory
    model (:func:`chunk_memory`), and on the CPU at most :data:`CPU_ROWS_PER_FORWARD` token rows.  Replicas
    only fill the room one target's forward leaves: where one target alone already needs several path
    chunks, batching would not save a forward (the same rows, only more of the model above the lower
    targets), and the answer is 1.  At least 1."""
    device = torch.device(device)
    coarse = settings.rule == "richardson"
    one = chunk_memory(model, modules, tokens, pairs, settings.dtype, first_token_cut=False, coarse=coarse)
    shared = one.fixed.get("weights cast by autocast", 0)  # not per row
    per_target = max(one.total(points) - shared, 1)
    k = int((free_memory(device) * fraction - shared) // per_target)
    if device.type == "cpu":
        k = min(k, CPU_ROWS_PER_FORWARD // max(pairs * tokens * points, 1))
    return max(1, k)


def target_passes(depths: Sequence[int], per_pass: int, depth_slack: Optional[float] = 1.25) -> List[List[int]]:
    """Indices of the targets (``depths``: each one's position in the forward) grouped into passes: deepest
    first, at most ``per_pass`` each, and a target joins a pass only while the pass's work, k × its deepest
    target's depth (every replica runs up to it), stays within ``depth_slack`` × the sum of its targets' own
    depths (what they cost alone); ``depth_slack=None``: only ``per_pass`` counts."""
    order = sorted(range(len(depths)), key=lambda i: -depths[i])
    passes: List[List[int]] = []
    for i in order:
        group = passes[-1] if passes else None
        if group is not None and len(group) < per_pass:
            deepest = max(depths[j] for j in group + [i])
            own = sum(max(depths[j], 1) for j in group + [i])
            if depth_slack is None or (len(group) + 1) * max(deepest, 1) <= depth_slack * own:
                group.append(i)
                continue
        passes.append([i])
    return passes


def attribute_units(model: nn.Module, pairs: Sequence[Pair], units: Sequence[Unit],
                    settings: Optional[AttributionSettings] = None, *, tokenizer=None, device=None,
                    progress: bool = False, ranker=None, per_pass: Optional[int] = None,
                    depth_slack: Optional[float] = 1.25, **overrides) -> list:
    """Conditional NIG of the same pairs toward each of ``units``: a list of :class:`fastnig.Attributions`,
    one per unit in order, each what ``fastnig.attribute(model, pairs, settings, target=unit, ...)`` gives
    (up to float rounding: batches of other sizes).

    Targets run batched: grouped by depth into passes of at most ``per_pass`` (``None``:
    :func:`targets_per_pass`, the memory model) of similar depth (:func:`target_passes` with
    ``depth_slack``); a pass replicates the pairs once per target, hooks the units below any of its
    targets and stops the forward after the highest; each target keeps the units below it.  A pass of one
    target is a plain conditional :func:`fastnig.attribute`."""
    from .attribute import attribute  # attribute imports this module

    settings = AttributionSettings() if settings is None else settings
    if overrides:
        settings = settings.replace(**overrides)
    units = list(units)
    for unit in units:
        if not isinstance(unit, Unit):
            raise TypeError(f"units must be fastnig.Unit objects, got {unit!r}")
    if per_pass is not None and (isinstance(per_pass, bool) or not isinstance(per_pass, int) or per_pass < 1):
        raise ValueError(f"per_pass must be None or an integer >= 1, got {per_pass!r}")
    pairs = validate_pairs(pairs)
    if not units:
        return []
    model, tokenizer = unwrap(model, tokenizer)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
    if device is None:
        single_device(model)
    bound = bind_ranker(ranker, model, tokenizer)
    move_model(model, device)
    device = single_device(model)
    common = dict(tokenizer=tokenizer, progress=progress, ranker=bound)
    if len(units) == 1 or per_pass == 1:
        return [attribute(model, pairs, settings, target=unit, **common) for unit in units]

    base_settings, modules = attributed_by(bound, settings)
    if settings.heads:
        modules = {**modules, **head_contexts(model)}
    max_length = bound.max_length(settings.max_length)
    distinct = list(dict.fromkeys(units))
    if per_pass is None:  # every attributed unit: an upper bound of any pass's units below
        tokens = int(bound.encode(pairs, max_length, settings.baseline).input_ids.shape[1])
        points = (settings.steps if settings.steps != "auto" else settings.max_steps) + 1
        per_pass = targets_per_pass(model, modules, tokens, min(len(pairs), settings.pair_batch), points, device,
                                    settings)
    results: Dict[Unit, object] = {}
    for indices in target_passes([_module_order(model, u) + 1 for u in distinct], per_pass, depth_slack):
        group = [distinct[i] for i in indices]
        if len(group) == 1:
            results[group[0]] = attribute(model, pairs, settings, target=group[0], **common)
            continue
        rankers, below = {}, {}
        for unit in group:  # the units below each target: one dry forward of the first pair
            rankers[unit], below[unit] = conditional(bound, unit, modules, pairs[0], max_length, settings.baseline,
                                                     device)
        results.update(_one_pass(attribute, model, pairs, settings, base_settings, group, rankers, below,
                                 modules, bound, max_length, common))
    return [results[u] for u in units]


def _one_pass(attribute, model, pairs, settings, base_settings, group, rankers, below, modules, bound,
              max_length, common) -> Dict[Unit, object]:
    """One batched pass of the targets ``group``, split into one :class:`Attributions` per target."""
    P = len(pairs)
    union = {n: m for n, m in modules.items() if any(n in below[u] for u in group)}
    multi = _targets_bound(bound, [rankers[u] for u in group], union)
    replicas = [(_Tagged(q, j), p) for j in range(len(group)) for q, p in pairs]
    run = base_settings.replace(output="logit", heads=False, pair_batch=settings.pair_batch * len(group))
    att = attribute(model, replicas, run, **{**common, "ranker": multi})
    record = base_settings.replace(output="logit").record(model, target="relevant", max_length=max_length)
    if bound.family != "classifier" or bound.uses_template:
        record["ranker"] = bound.ranker.describe()
    out = {}
    for j, unit in enumerate(group):
        rows = torch.arange(j * P, (j + 1) * P)
        keep = [n for n in modules if n in below[unit]]
        scores = {n: att.scores[n][rows] for n in keep}
        segments = {n: att.segment_scores[n][rows] for n in keep} if att.segment_scores is not None else None
        errors = {n: att.error_estimate[n][rows] for n in keep} if att.error_estimate is not None else None
        heads = split_head_scores(scores, segments, errors, modules) if settings.heads else (None, None)
        unit_record = dict(record)
        targets = relabel(unit_record, unit, ["relevant"] * P)
        out[unit] = type(att)(scores, att.delta[rows], att.f_input[rows], att.f_baseline[rows], targets,
                              att.num_tokens[rows], unit_record, att.steps_used[rows], segments, errors, *heads)
    return out


__all__ = ("CONTEXT", "KINDS", "Unit", "UnitRanker", "attribute_units", "conditional", "engine_target", "relabel",
           "split_head_scores", "target_passes", "targets_per_pass")
