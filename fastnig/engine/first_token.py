"""The first-token cut: skip the last layer's work that cannot reach the output.

Owns: which classification heads read the last encoder layer at the first
token only (:data:`FIRST_TOKEN_HEADS`), the module from which on only that
token matters (:func:`first_token_cut`), and the context manager that runs
the last layer past self-attention (and, for the BERT family with eager or
SDPA attention, its queries) on that token alone (:func:`first_token_only`).
Exact: same logits, same gradients, same attributions, less work (~14 % of
a 6-layer model's pass).

How it stays out of the caller's way: the cut is applied per call of the
whole model, and only in the thread that entered :func:`first_token_only`.
It is made of forward hooks that do nothing unless this thread is inside a
cut call of this very model, plus (for the query cut) one wrapper of the
last self-attention's ``forward``, installed while some thread uses it and
removed after the last one (reference-counted under a lock): other threads,
and calls outside the block, run the model's own code.  On leaving the
block every hook is removed and the module's attributes are as they were.
It is off for a call that asks for attentions, hidden states or a
``head_mask``, in training mode, and with ``FASTNIG_FIRST_TOKEN_CUT=0``.

Must not: depend on tokenisation, attribution or anything above the model.
"""
from __future__ import annotations

import inspect
import os
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

# Sequence-classification heads that read the last layer's output at the first
# token only (BERT's pooler, the ELECTRA/RoBERTa heads, DistilBERT's pre-classifier).
FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "ElectraForSequenceClassification",
                     "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                     "CamembertForSequenceClassification", "DistilBertForSequenceClassification")
# Attention implementations (``config._attn_implementation``) whose math the query cut
# reproduces; any other one (flex_attention, flash_attention_*, ...) keeps every query.
QUERY_CUT_ATTENTION = ("eager", "sdpa")
# Setting this environment variable to 0 / false / off turns the cut off everywhere.
ENV_SWITCH = "FASTNIG_FIRST_TOKEN_CUT"


def cut_enabled_by_environment() -> bool:
    """False when ``FASTNIG_FIRST_TOKEN_CUT`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def last_layer_before_first_token_head(model: nn.Module) -> Optional[nn.Module]:
    """The last encoder layer of a model with one of :data:`FIRST_TOKEN_HEADS`, else ``None``."""
    if type(model).__name__ not in FIRST_TOKEN_HEADS:
        return None
    base = getattr(model, "base_model", model)
    stack = (getattr(getattr(base, "encoder", None), "layer", None)
             or getattr(getattr(base, "transformer", None), "layer", None))
    if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
        return None
    return stack[-1]


def first_token_cut(model: nn.Module) -> Optional[nn.Module]:
    """The module of the last encoder layer from which on only the first token matters, or ``None``.

    With a head that reads the last layer's output at position 0 only
    (:data:`FIRST_TOKEN_HEADS`), every row of the last layer after self-attention
    reaches F only through its first token: the other rows of the attention
    output projection and of the feed-forward block have exactly zero gradient,
    hence exactly zero conductance (Captum gets exact zeros for them too).
    Feeding the returned module its first token alone skips that work (~3/4 of
    the last layer) without changing any attribution. It is the BERT family's
    ``attention.output`` (projection + residual LayerNorm, inputs
    ``(hidden, residual)``) or DistilBERT's ``sa_layer_norm``. Any other model
    gets ``None``: nothing is skipped.
    """
    last = last_layer_before_first_token_head(model)
    if last is None:
        return None
    attention_output = getattr(getattr(last, "attention", None), "output", None)
    if isinstance(attention_output, nn.Module) and isinstance(getattr(attention_output, "dense", None), nn.Linear):
        return attention_output
    if isinstance(getattr(last, "sa_layer_norm", None), nn.LayerNorm):
        return last.sa_layer_norm
    return None


def query_cut_module(model: nn.Module) -> Optional[nn.Module]:
    """The last layer's BERT-family self-attention, when its queries can be cut to the first token too.

    ``None`` unless: the model has a :func:`first_token_cut`; its attention
    implementation (``config._attn_implementation``) is one of
    :data:`QUERY_CUT_ATTENTION`; the module is a plain encoder self-attention
    (query/key/value Linears, absolute positions, not a decoder); and it has no
    instance-level ``forward`` of its own (e.g. accelerate's hooks, which the
    cut must not bypass).
    """
    if first_token_cut(model) is None:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in QUERY_CUT_ATTENTION:
        return None
    attention = getattr(getattr(last_layer_before_first_token_head(model), "attention", None), "self", None)
    own = vars(attention).get("forward") if attention is not None else None
    ok = (attention is not None
          and (own is None or isinstance(getattr(own, "__self__", None), _QueryCutInstall))
          and all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("query", "key", "value"))
          and isinstance(getattr(attention, "num_attention_heads", None), int)
          and isinstance(getattr(attention, "attention_head_size", None), int)
          and not getattr(attention, "is_decoder", False) and not getattr(attention, "is_causal", False)
          and getattr(attention, "position_embedding_type", "absolute") == "absolute")
    return attention if ok else None


# ------------------------------------------------------------ per-thread state
class _Cut:
    """One :func:`first_token_only` block: the model, its cut module and (optionally) its query-cut module."""

    __slots__ = ("model", "cut", "attention", "signature", "thread")

    def __init__(self, model: nn.Module, cut: nn.Module, attention: Optional[nn.Module]):
        self.model, self.cut, self.attention = model, cut, attention
        self.thread = threading.get_ident()  # the only thread whose calls are cut
        try:
            self.signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self.signature = None


_local = threading.local()


def _running() -> List[Tuple[_Cut, bool]]:
    """This thread's stack of whole-model calls in progress under cut blocks: (block, whether this call is cut)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _inside(cut: _Cut) -> bool:
    """True while this thread runs a cut call of ``cut``'s model (the innermost whole-model call)."""
    stack = getattr(_local, "stack", None)
    return bool(stack) and stack[-1][0] is cut and stack[-1][1]


def _call_arguments(cut: _Cut, args, kwargs) -> Optional[Dict[str, object]]:
    """The model call's arguments by name (``**kwargs`` flattened), or ``None`` when they cannot be bound."""
    if cut.signature is None:
        return dict(kwargs) if not args else None
    try:
        bound = cut.signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    for name, parameter in cut.signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def _exact_for_this_call(cut: _Cut, args, kwargs) -> bool:
    """Whether the cut is exact for this call: eval mode, and no attentions, hidden states or head mask asked for."""
    if cut.model.training:
        return False
    named = _call_arguments(cut, args, kwargs)
    if named is None:
        return False
    config = getattr(cut.model, "config", None)
    for flag in ("output_attentions", "output_hidden_states"):
        value = named.get(flag)
        if value is None:
            value = getattr(config, flag, False)
        if value:
            return False
    return named.get("head_mask") is None


def _keep_first_token(module, args, kwargs):
    """``[batch, tokens, features]`` inputs -> their first token ``[batch, 1, features]``."""
    def first(value):
        return value[:, :1] if isinstance(value, torch.Tensor) and value.dim() == 3 else value
    return tuple(first(a) for a in args), {k: first(v) for k, v in kwargs.items()}


# ------------------------------------------------------------ the query cut
class _QueryCutInstall:
    """The wrapper ``forward`` on one self-attention module and how many blocks use it."""

    def __init__(self, module: nn.Module):
        self.module, self.users = module, 0

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        module = self.module
        stack = getattr(_local, "stack", None)
        current = stack[-1][0] if stack and stack[-1][1] else None
        if current is None or current.attention is not module or module.training:
            return type(module).forward(module, hidden_states, attention_mask, *args, **kwargs)
        if any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "encoder_hidden_states")):
            return type(module).forward(module, hidden_states, attention_mask, *args, **kwargs)
        result = _first_query_attention(module, hidden_states, attention_mask)
        if result is None:
            return type(module).forward(module, hidden_states, attention_mask, *args, **kwargs)
        return result


_installs: Dict[int, _QueryCutInstall] = {}
_install_lock = threading.Lock()


def _acquire_query_cut(module: nn.Module) -> None:
    with _install_lock:
        install = _installs.get(id(module))
        if install is None or install.module is not module:
            install = _installs[id(module)] = _QueryCutInstall(module)
            module.forward = install.forward
        install.users += 1


def _release_query_cut(module: nn.Module) -> None:
    with _install_lock:
        install = _installs.get(id(module))
        if install is None or install.module is not module:
            return
        install.users -= 1
        if install.users == 0:
            del _installs[id(module)]
            if vars(module).get("forward") == install.forward:
                del module.forward  # it had none of its own (query_cut_module checks)


def _first_query_attention(module: nn.Module, hidden_states: torch.Tensor, attention_mask):
    """The self-attention of the first token's query over every key and value.

    Returns ``(context [batch, 1, hidden], None)``, or ``None`` for a mask it
    does not know (then the module's own forward runs).  Masks: ``None``,
    ``[batch, tokens]`` (1 = attend), or 4-D boolean / additive
    ``[batch, 1, queries, tokens]`` as transformers passes them.  With eager
    attention the probabilities are computed as transformers' eager code does
    (scores + additive mask, softmax, product); otherwise with PyTorch's SDPA.
    """
    mask = attention_mask
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4)):
        return None
    if hidden_states.dim() != 3:
        return None
    if mask is not None and mask.dim() == 2:
        mask = mask[:, None, None, :].bool()
    elif mask is not None and mask.shape[-2] > 1:
        mask = mask[:, :, :1, :]
    batch = hidden_states.shape[0]
    shape = (batch, -1, module.num_attention_heads, module.attention_head_size)
    query = module.query(hidden_states[:, :1]).view(shape).transpose(1, 2)
    key = module.key(hidden_states).view(shape).transpose(1, 2)
    value = module.value(hidden_states).view(shape).transpose(1, 2)
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        scaling = module.attention_head_size ** -0.5
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
    if implementation == "eager":
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(scores.dtype).min)
            scores = scores + mask
        probabilities = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(probabilities, value)
    else:
        if mask is not None and mask.is_floating_point():
            mask = mask.to(query.dtype)
        context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return context.transpose(1, 2).reshape(batch, 1, -1), None


# ---------------------------------------------------------------- the block
@contextmanager
def first_token_only(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, calls of ``model`` from this thread run its last layer past
    self-attention on the first token only (:func:`first_token_cut`), and for the
    BERT family with eager or SDPA attention its queries too (:func:`query_cut_module`),
    keys and values still over every token: same logits and same attributions, less work.

    Per call, the cut is off (the model's own code runs) in training mode and
    when the call asks for ``output_attentions``, ``output_hidden_states`` (as
    an argument or in the config) or passes a ``head_mask``.  Other threads
    and other models are not affected, and leaving the block restores every
    module exactly (hooks removed; an instance-level ``forward`` is never touched).
    Does nothing for models without a cut, with ``enabled=False``, or with the
    environment variable ``FASTNIG_FIRST_TOKEN_CUT=0``.
    """
    cut_module = first_token_cut(model) if enabled and cut_enabled_by_environment() else None
    if cut_module is None:
        yield
        return
    cut = _Cut(model, cut_module, query_cut_module(model))

    def enter(module, args, kwargs):
        if threading.get_ident() == cut.thread:
            _running().append((cut, _exact_for_this_call(cut, args, kwargs)))

    def leave(module, *_):
        stack = _running()
        if threading.get_ident() == cut.thread and stack and stack[-1][0] is cut:
            stack.pop()

    def keep_first_token(module, args, kwargs):
        if _inside(cut):
            return _keep_first_token(module, args, kwargs)
        return None

    handles = []
    installed = False
    try:
        handles.append(model.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
        handles.append(model.register_forward_hook(leave, with_kwargs=True, always_call=True))
        handles.append(cut_module.register_forward_pre_hook(keep_first_token, with_kwargs=True))
        if cut.attention is not None:
            _acquire_query_cut(cut.attention)
            installed = True
        yield
    finally:
        for handle in handles:
            handle.remove()
        stack = _running()
        stack[:] = [entry for entry in stack if entry[0] is not cut]  # calls interrupted past their forward hook
        if installed:
            _release_query_cut(cut.attention)
