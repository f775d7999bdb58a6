"""Reusing the unpruned prefix of the model: pruned forwards start at a cached layer boundary (docs/method.md §8).

Pruning a set leaves every encoder layer below its lowest pruned module
unchanged, so the hidden states entering that layer are the original
model's.  :class:`PrefixCache` captures them during the original model's
scoring (forward pre-hooks on the chosen layers: no extra forward), at a few
layer *boundaries* chosen as memory allows, and runs a pruned forward from
the deepest boundary at or below the set's lowest pruned layer: the
embeddings' output is replaced by the cached hidden states and the encoder's
layer list is cut to the layers from there on, for the duration of the call;
everything else (the model's own attention-mask preparation, the last
layer's first-token cut, the head) runs as usual.  Exact: in fp32 the scores
are bit-identical to the full forward's (tests/test_prefix_reuse.py).

Recognised layer stacks: the BERT family's ``base_model.encoder.layer`` and
DistilBERT's ``transformer.layer``, with ``base_model.embeddings``.  Any
other model (or a set with a pruned module outside the stack) runs the full
forward.

Must not: prune (:mod:`fastnig.evaluation.pruning`), score or know about
datasets; it only reroutes the model's own forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..engine.memory import free_memory
from ..engine.model import model_device

DEFAULT_MEMORY_FRACTION = 0.25
"""Share of the free memory (:func:`fastnig.engine.memory.free_memory`) the cached hidden states may take."""

_BatchKey = Tuple[int, Tuple[int, ...]]


def _layer_stack(model: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.ModuleList], Optional[nn.Module]]:
    """``(owner, layers, embeddings)``: the module holding the ``layer`` ModuleList, the list, and the
    embeddings module whose output enters it; ``(None, None, None)`` when not recognised."""
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    for owner in (getattr(base, "encoder", None), getattr(base, "transformer", None)):
        layers = getattr(owner, "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and isinstance(embeddings, nn.Module):
            return owner, layers, embeddings
    return None, None, None


def _batch_key(input_ids: torch.Tensor) -> _BatchKey:
    return input_ids.data_ptr(), tuple(input_ids.shape)


class PrefixCache:
    """Original hidden states at a few layer boundaries, and pruned forwards that start from them.

    Args:
        model: the cross-encoder.
        memory_fraction: share of the free memory of the model's device the
            cache may take (:data:`DEFAULT_MEMORY_FRACTION`).
        enabled: ``False`` turns reuse off (every forward is the full one).
    """

    def __init__(self, model: nn.Module, memory_fraction: float = DEFAULT_MEMORY_FRACTION, enabled: bool = True):
        self.model = model
        self.owner, self.layers, self.embeddings = _layer_stack(model) if enabled else (None, None, None)
        self.memory_fraction = memory_fraction
        self.boundaries: List[int] = []
        self.states: Dict[int, Dict[_BatchKey, torch.Tensor]] = {}
        self._layer_of_module: Dict[int, int] = {}
        if self.layers is not None:
            for index, layer in enumerate(self.layers):
                for module in layer.modules():
                    self._layer_of_module[id(module)] = index

    @property
    def supported(self) -> bool:
        """Whether the model's layer stack is recognised."""
        return self.layers is not None

    @property
    def captured(self) -> bool:
        """Whether hidden states are held for every boundary."""
        return bool(self.boundaries) and all(self.states.get(b) for b in self.boundaries)

    # ------------------------------------------------------------ choosing
    def lowest_layer(self, module_names: Sequence[str]) -> int:
        """Index of the lowest encoder layer holding one of ``module_names``; 0 when one is outside the
        stack (or the stack is not recognised), the number of layers for no module."""
        if self.layers is None:
            return 0
        modules = dict(self.model.named_modules())
        lowest = len(self.layers)
        for name in module_names:
            index = self._layer_of_module.get(id(modules.get(name)))
            if index is None:
                return 0
            lowest = min(lowest, index)
        return lowest

    def bytes_per_boundary(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> int:
        """Bytes of one boundary's hidden states: sum over batches of ``batch x tokens x hidden`` x the
        weights' element size."""
        hidden = next((p.shape[-1] for n, p in self.layers[0].named_parameters() if p.dim() == 2), 0) \
            if self.layers is not None else 0
        weights = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        element = 4 if weights is None else max(4, weights.element_size())
        return sum(int(b["input_ids"].numel()) for b in batches) * int(hidden) * element

    def choose(self, starts: Sequence[int], batches: Sequence[Mapping[str, torch.Tensor]],
               budget: Optional[int] = None) -> List[int]:
        """Pick the boundaries to cache for pruned forwards that could start at ``starts`` (one entry per
        forward to come: its lowest pruned layer).

        Greedy: the boundary saving the most layer-forwards first (a forward
        starting at ``s`` saves ``b`` layers from boundary ``b <= s``, beyond
        what the deeper boundaries already chosen save), as long as the
        cache fits ``budget`` bytes (default: ``memory_fraction`` x the free
        memory of the model's device).  Sets :attr:`boundaries`, sorted.
        """
        self.boundaries, self.states = [], {}
        if self.layers is None:
            return []
        per = self.bytes_per_boundary(batches)
        if budget is None:
            budget = int(free_memory(model_device(self.model)) * self.memory_fraction)
        capacity = budget // per if per else 0
        candidates = sorted({int(s) for s in starts if 0 < int(s) < len(self.layers)})
        chosen: List[int] = []

        def saved(boundaries: List[int]) -> int:
            return sum(max([b for b in boundaries if b <= s], default=0) for s in starts)

        while candidates and len(chosen) < capacity:
            best = max(candidates, key=lambda b: (saved(chosen + [b]), b))
            if saved(chosen + [best]) <= saved(chosen):
                break
            chosen.append(best)
            candidates.remove(best)
        self.boundaries = sorted(chosen)
        return self.boundaries

    def start_for(self, module_names: Sequence[str]) -> int:
        """The boundary a pruned forward of these modules starts from: the deepest cached one at or below
        their lowest layer, else 0 (the full forward)."""
        if not self.captured:
            return 0
        lowest = self.lowest_layer(module_names)
        return max([b for b in self.boundaries if b <= lowest], default=0)

    # ------------------------------------------------------------- running
    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Within the block, every call of the model stores the hidden states entering each boundary layer,
        keyed by its batch (the ``input_ids`` tensor).  Wrap the original model's scoring with it."""
        if self.layers is None or not self.boundaries:
            yield
            return
        current: List[Optional[_BatchKey]] = [None]
        states: Dict[int, Dict[_BatchKey, torch.Tensor]] = {b: {} for b in self.boundaries}

        def enter(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            current[0] = _batch_key(ids) if isinstance(ids, torch.Tensor) else None

        def keep(boundary):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if current[0] is not None and isinstance(hidden, torch.Tensor):
                    states[boundary][current[0]] = hidden.detach()
            return hook

        handles = [self.model.register_forward_pre_hook(enter, with_kwargs=True)]
        handles += [self.layers[b].register_forward_pre_hook(keep(b), with_kwargs=True) for b in self.boundaries]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.states = states

    @contextmanager
    def starting_at(self, boundary: int) -> Iterator[None]:
        """Within the block, calls of the model skip the embeddings' and layers ``0 .. boundary - 1``'s work:
        the embeddings' output is the cached hidden state entering layer ``boundary`` (of the call's batch)
        and the encoder runs layers ``boundary ..`` only.  ``boundary = 0``: the model as it is.

        Raises:
            RuntimeError: a call whose batch was not captured (the cache belongs to other batches).
        """
        if boundary == 0:
            yield
            return
        cached = self.states[boundary]
        current: List[Optional[torch.Tensor]] = [None]

        def enter(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            hidden = cached.get(_batch_key(ids)) if isinstance(ids, torch.Tensor) else None
            if hidden is None:
                raise RuntimeError("prefix reuse: this batch's hidden states were not captured (score the "
                                   "same encoded batches as the original model's scoring)")
            current[0] = hidden

        def replace(module, args, output):
            return current[0]

        handles = [self.model.register_forward_pre_hook(enter, with_kwargs=True),
                   self.embeddings.register_forward_hook(replace)]
        full = self.layers
        self.owner.layer = nn.ModuleList(list(full)[boundary:])
        try:
            yield
        finally:
            self.owner.layer = full
            for handle in handles:
                handle.remove()
