"""Attention heads as units: the conductance of the attention context, summed per head.

Owns: finding every attention output projection of a ranker (the ``nn.Linear``
whose input is the attention context, heads concatenated: BERT / RoBERTa /
ELECTRA ``attention.output.dense``, DistilBERT ``attention.out_lin``, Llama /
Qwen / Mistral / Gemma ``self_attn.o_proj``, T5 ``SelfAttention.o`` and
``EncDecAttention.o``; :func:`output_projections`), its number of (query)
heads, and :class:`HeadContext`, the pseudo-module through which
:func:`fastnig.attribute` feeds that *input* to the same fused op as every
Linear output (``heads=True``).  The engine accumulates the context's conductance
``[pairs, heads * head_dim]`` (``[pairs, 3, ...]`` per segment) under the key
``name + CONTEXT`` like any module's, with the same carries, out-of-memory redo and
Richardson sums; :func:`split_head_scores` turns it into ``[pairs, heads]`` at the end
(exact: conductance adds over the units of a layer, docs/method.md §12).

Must not: run a model, tokenise or know about datasets and files.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

CONTEXT = "#context"
"""Suffix of the engine's internal key of an output projection's input (never a module name: ``#``)."""

# names (the end of the module name) of the Linear that reads the attention context, per family
OUTPUT_PROJECTION = re.compile(
    r"(^|\.)(attention\.output\.dense|attention\.out_lin|self_attn\.o_proj|SelfAttention\.o|EncDecAttention\.o"
    r"|attention\.attn\.o|self_attn\.out_proj)$")
_HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads", "encoder_attention_heads", "n_head")


def num_heads(model: nn.Module) -> int:
    """Query heads of every attention layer (``config.num_attention_heads`` or the family's name for it);
    with grouped-query attention the query heads, whose outputs the output projection reads."""
    config = getattr(model, "config", None)
    for name in _HEAD_COUNTS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell how many attention heads {type(model).__name__} has: its config has none of "
                     f"{list(_HEAD_COUNTS)}")


def output_projections(model: nn.Module) -> Dict[str, Tuple[nn.Linear, int]]:
    """Attention output projection name -> (the Linear, its number of heads), in model order.

    A ``ValueError`` when the model has none of the known names, or when a projection's input
    width is not a multiple of the head count."""
    heads = num_heads(model)
    found: Dict[str, Tuple[nn.Linear, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and OUTPUT_PROJECTION.search(name):
            if module.in_features % heads:
                raise ValueError(f"{name}: input width {module.in_features} is not a multiple of the "
                                 f"{heads} attention heads")
            found[name] = (module, heads)
    if not found:
        raise ValueError(f"heads=True: found no attention output projection in {type(model).__name__} "
                         f"(known names: {OUTPUT_PROJECTION.pattern})")
    return found


class HeadContext:
    """The input of an attention output projection, seen by the engine as a module's output.

    Duck-types what :func:`fastnig.attribute` reads of an attributed ``nn.Linear``:
    ``out_features`` (the context width, heads × head dim), ``weight`` (its device) and
    ``register_forward_hook(hook)``, which hooks the projection and calls
    ``hook(projection, args, context)`` with the tensor the projection actually received
    (after any forward pre-hook, e.g. the last-token cut's one row).
    """

    def __init__(self, projection: nn.Linear, heads: int):
        self.projection, self.heads = projection, heads
        self.out_features = projection.in_features
        self.in_features = projection.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.projection.weight

    def register_forward_hook(self, hook: Callable):
        def on_output(module, args, kwargs, output):
            context = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            return hook(module, args, context)

        return self.projection.register_forward_hook(on_output, with_kwargs=True)


def head_contexts(model: nn.Module) -> Dict[str, HeadContext]:
    """``{projection name + CONTEXT: HeadContext}`` for every attention output projection of ``model``."""
    return {name + CONTEXT: HeadContext(module, heads) for name, (module, heads) in output_projections(model).items()}


def per_head(context: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., heads * d]`` conductance of the context units -> ``[..., heads]`` (sum over each head's d units)."""
    return context.unflatten(-1, (heads, context.shape[-1] // heads)).sum(dim=-1)


def split_head_scores(scores: Dict[str, torch.Tensor], segment_scores: Optional[Dict[str, torch.Tensor]],
                      errors: Optional[Dict[str, torch.Tensor]], modules: Dict[str, object]):
    """Take the context keys out of the engine's dicts (in place) and return
    ``(head_scores {projection: [P, heads]}, head_segment_scores {projection: [P, 3, heads]} or None)``."""
    head_scores: Dict[str, torch.Tensor] = {}
    head_segments: Optional[Dict[str, torch.Tensor]] = {} if segment_scores is not None else None
    for key in [k for k in scores if k.endswith(CONTEXT)]:
        heads = modules[key].heads
        name = key[:-len(CONTEXT)]
        head_scores[name] = per_head(scores.pop(key), heads)
        if segment_scores is not None:
            head_segments[name] = per_head(segment_scores.pop(key), heads)
        if errors is not None:
            errors.pop(key, None)
    return head_scores, head_segments


def head_layer(name: str) -> int:
    """The layer index of an output projection's name (the number after ``layer.`` / ``layers.`` / ``block.``)."""
    match = re.search(r"(?:^|\.)(?:layer|layers|block)\.(\d+)\.", name)
    return int(match.group(1)) if match else -1
