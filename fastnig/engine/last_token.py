"""The last-token cut of decoder rerankers: the last layer's work past attention on the scored token only.

A decoder reranker reads its score at one position per pair (the last real
token).  After the last layer's self-attention nothing mixes positions, so the
rows of that layer's attention output projection and of its MLP at any other
position have exactly zero gradient and zero conductance.  Inside
:func:`last_token_only`, forward pre-hooks hand those two modules the scored
row alone (``[batch, 1, features]``); the residual additions broadcast it over
the positions, which are wrong everywhere except the scored one — and only the
scored one is read (:mod:`fastnig.engine.rankers` gathers it).  Same logits,
same attributions, less work (the decoder analogue of
:mod:`fastnig.engine.first_token`).

Owns: which decoder layers can be cut (:func:`last_layer_cut_modules`) and the
context manager.  Must not: tokenise, read logits or know about path integrals.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .first_token import cut_enabled_by_environment


def decoder_layers(base: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder's stack of layers (``base.layers``, Llama/Qwen/Mistral/Gemma), or ``None``."""
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def last_layer_cut_modules(base: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """``(attention output projection, MLP)`` of the last decoder layer, when the layer has the
    Llama-family shape the cut relies on (``self_attn.o_proj`` a Linear, an ``mlp`` module whose
    output is added back position-wise); else ``None`` (nothing is cut)."""
    layers = decoder_layers(base)
    if layers is None:
        return None
    last = layers[-1]
    o_proj = getattr(getattr(last, "self_attn", None), "o_proj", None)
    mlp = getattr(last, "mlp", None)
    if not isinstance(o_proj, nn.Linear) or not isinstance(mlp, nn.Module):
        return None
    return o_proj, mlp


@contextmanager
def last_token_only(base: nn.Module, read: torch.Tensor, enabled: bool = True) -> Iterator[None]:
    """Within the block, this thread's forward of ``base`` runs the last layer's attention output
    projection and MLP on the rows ``read`` (``[batch]`` positions) alone.

    The caller must read the last hidden state at ``read`` only (every other
    position is wrong inside the block).  Does nothing with ``enabled=False``,
    with ``FASTNIG_FIRST_TOKEN_CUT=0``, in training mode, or for a layer shape
    :func:`last_layer_cut_modules` does not know.
    """
    modules = last_layer_cut_modules(base) if enabled and cut_enabled_by_environment() else None
    if modules is None or base.training:
        yield
        return
    thread = threading.get_ident()

    def keep_read_row(module, args, kwargs):
        if threading.get_ident() != thread:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] == 1:
            return None
        rows = read.to(hidden.device).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        picked = hidden.gather(1, rows)
        if args:
            return (picked,) + tuple(args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "input"
        return args, {**kwargs, key: picked}

    handles = [m.register_forward_pre_hook(keep_read_row, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
