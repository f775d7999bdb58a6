"""The model plumbing: what a cross-encoder is to fastnig and where it runs.

Owns: unwrapping a ``sentence_transformers.CrossEncoder``; the input
embeddings, the attributed Linears (:func:`linear_modules`) and whether the
model takes ``token_type_ids``; ``max_length`` from the tokenizer and the
position embeddings; the frozen-eval context; devices (one device, moving a
model) and the autocast context; the thread-local view of the parameters as
detached (:func:`detached_parameters`).

Must not: tokenise (:mod:`fastnig.engine.encoding`), read logits
(:mod:`fastnig.engine.scoring`), know about path integrals, datasets, neuron
sets or files.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoTokenizer

from ..common import check_int

DEFAULT_MAX_LENGTH = 512


# ------------------------------------------------------------------ the model
def is_sentence_transformers_cross_encoder(model) -> bool:
    """True for a ``sentence_transformers.CrossEncoder`` (checked without importing sentence-transformers)."""
    return any(cls.__name__ == "CrossEncoder" and cls.__module__.startswith("sentence_transformers")
               for cls in type(model).__mro__)


def unwrap(model, tokenizer=None) -> Tuple[nn.Module, object]:
    """``(model, tokenizer)`` as fastnig uses them: a ``sentence_transformers.CrossEncoder`` becomes its
    Hugging Face model and tokenizer (its ``max_length`` is the tokenizer's ``model_max_length``);
    a ``(query_encoder, document_encoder)`` pair becomes one :class:`fastnig.engine.two_tower.TwoTowers`,
    a ``sentence_transformers.SentenceTransformer`` (a bi-encoder) its transformers model and tokenizer;
    anything else is returned as given."""
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(isinstance(m, nn.Module) for m in model):
        from .two_tower import TwoTowers  # the two-tower rankers build on this module
        return TwoTowers(*model), tokenizer
    if type(model).__name__ == "SentenceTransformer":
        from .two_tower import sentence_transformer_parts
        parts = sentence_transformer_parts(model)
        if parts is not None:
            return parts[0], tokenizer if tokenizer is not None else parts[1]
    if is_sentence_transformers_cross_encoder(model):
        with warnings.catch_warnings():  # sentence-transformers >= 5 calls .tokenizer .processor
            warnings.simplefilter("ignore", DeprecationWarning)
            inner_tokenizer = getattr(model, "processor", None) or getattr(model, "tokenizer", None)
        return model.model, tokenizer if tokenizer is not None else inner_tokenizer
    return model, tokenizer


def max_positions(model: nn.Module) -> Optional[int]:
    """Tokens the model's position embeddings allow (RoBERTa's offset of ``pad_token_id + 1`` taken off),
    or ``None`` when the model has no absolute position table."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        limit -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return limit


def resolve_max_length(model: nn.Module, tokenizer, max_length: Optional[int]) -> int:
    """The pair length fastnig encodes with.

    ``None``: the tokenizer's ``model_max_length`` (a sentence-transformers
    CrossEncoder's ``max_length``) when it is set, else 512.  Either way at
    most what the model's position embeddings allow (:func:`max_positions`);
    an explicit ``max_length`` above that is capped with a one-line warning.
    """
    if max_length is None:
        declared = getattr(tokenizer, "model_max_length", None)
        max_length = declared if isinstance(declared, int) and 4 <= declared <= 100_000 else DEFAULT_MAX_LENGTH
        explicit = False
    else:
        check_int("max_length", max_length, 4, " (tokens)")
        explicit = True
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        if explicit:
            warnings.warn(f"max_length={max_length} is more than the model's {limit} position embeddings allow; "
                          f"using max_length={limit}", stacklevel=3)
        max_length = limit
    return max_length


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's word-embedding module (``get_input_embeddings()``), or ``TypeError``."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is None:
        raise TypeError(
            "model: fastnig needs a Hugging Face model with get_input_embeddings() (e.g. an "
            f"AutoModelForSequenceClassification); {type(model).__name__} has none")
    return emb


def check_model(model) -> nn.Module:
    """``model`` if it is a torch module, else ``TypeError`` saying what is expected."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face cross-encoder), got {type(model).__name__}")
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def accepts_token_type_ids(model: nn.Module, tokenizer) -> bool:
    """True when both the model's ``forward`` and the tokenizer use ``token_type_ids``
    (BERT, ELECTRA, MiniLM; not RoBERTa or DistilBERT)."""
    return ("token_type_ids" in inspect.signature(model.forward).parameters
            and "token_type_ids" in getattr(tokenizer, "model_input_names", ()))


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; the modules it switched are back in training mode after.

    Parameters are not touched: no global ``requires_grad`` flip, which would
    break another thread's grad-enabled use of the same model (its backward
    would find no parameter requiring a gradient, and a second ``frozen_eval``
    entered meanwhile would restore the flags it saw flipped).  Where gradients
    flow, :func:`detached_parameters` keeps them off the parameters in the
    calling thread only.  Switching to eval mode is global (PyTorch keeps one
    ``training`` flag per module): a model that another thread trains at the
    same time cannot be attributed meanwhile; :func:`fastnig.attribute` checks
    that it stays in eval mode.
    """
    switched = [m for m in model.modules() if m.training]
    if switched:
        model.eval()
    try:
        yield
    finally:
        for m in switched:  # only what this call changed: a model in eval mode is never touched
            m.training = True


class _DetachedParameters(TorchFunctionMode):
    """Every torch function called in this thread sees ``model``'s parameters detached."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # by id, the parameter kept too: an id alone could be reused by another tensor
        self.swap = {id(p): (p, p.detach()) for p in model.parameters()}

    def _sub(self, value):
        entry = self.swap.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1]
        if type(value) in (list, tuple) and any(id(v) in self.swap for v in value):
            return type(value)(self._sub(v) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        swap = self.swap
        if any(id(a) in swap or type(a) in (list, tuple) for a in args):
            args = tuple(self._sub(a) for a in args)
        if kwargs and any(id(v) in swap for v in kwargs.values()):
            kwargs = {k: self._sub(v) for k, v in kwargs.items()}
        return func(*args, **(kwargs or {}))


def detached_parameters(model: nn.Module) -> TorchFunctionMode:
    """A context in which ``model``'s forward, in the calling thread only, uses its parameters
    detached: the autograd graph reaches the inputs alone (no parameter gradient is computed
    or kept for, and the memory is that of frozen parameters), while ``requires_grad`` stays as
    it is for every other thread (a torch function mode is thread-local).  A parameter that
    reaches an op some other way (e.g. inside a custom autograd function) only costs memory:
    :func:`fastnig.attribute` differentiates with respect to the path alone."""
    return _DetachedParameters(model)


def load_tokenizer(model):
    """The fast tokenizer of ``model.config.name_or_path``, or ``ValueError`` asking for one."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if not name:
        raise ValueError("tokenizer: the model has no config.name_or_path to load its tokenizer from; "
                         "pass tokenizer=AutoTokenizer.from_pretrained(...)")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ValueError(f"tokenizer: could not load the tokenizer of {name!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); pass tokenizer=... explicitly") from None


def _is_attributed_by_default(name: str) -> bool:
    return "pooler" not in name.split(".")


def linear_modules(model: nn.Module, layers: Optional[Sequence[str]] = None,
                   include_pooler: bool = False, exclude: Sequence[nn.Module] = ()) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose outputs are neurons (docs/method.md §4).

    By default every Linear of the encoder or decoder (``model.base_model``):
    the classification head is excluded, so is the vocabulary head
    (``get_output_embeddings()``, e.g. T5's ``lm_head``, which sits inside
    its ``base_model``), the pooler unless ``include_pooler``, and the modules
    ``exclude``.  ``layers`` selects module names explicitly.
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
    vocabulary = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(m) for m in (*exclude, vocabulary) if m is not None}
    chosen = {n: m for n, m in everything.items()
              if id(m) in base_ids and id(m) not in excluded and (include_pooler or _is_attributed_by_default(n))}
    if not chosen:
        raise ValueError("the model has no nn.Linear module in its encoder to attribute")
    return chosen


def model_devices(model: nn.Module) -> List[torch.device]:
    """The distinct devices of the model's parameters and buffers, in order of appearance."""
    seen: Dict[str, torch.device] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen.setdefault(str(tensor.device), tensor.device)
    return list(seen.values())


def _dispatched_devices(model: nn.Module) -> List[str]:
    """The distinct devices of an accelerate ``hf_device_map`` (``from_pretrained(device_map=...)``), if any."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return []
    return sorted({str(d if not isinstance(d, int) else f"cuda:{d}") for d in device_map.values()})


def single_device(model: nn.Module) -> torch.device:
    """The one device all of the model's weights are on, or ``ValueError`` saying why there is none.

    Refused: weights on the ``meta`` device (not loaded, e.g. offloaded by
    ``device_map``), and a model spread over several devices (``device_map``
    with several entries, or parameters moved by hand): fastnig keeps each
    path chunk's activations of every layer together and needs one device.
    """
    devices = model_devices(model)
    if any(d.type == "meta" for d in devices):
        raise ValueError("the model has weights on the 'meta' device (not loaded, e.g. offloaded by "
                         "device_map): load it fully on one device, e.g. from_pretrained(..., device_map=None)")
    spread = _dispatched_devices(model)
    if len(devices) > 1 or len(spread) > 1:
        names = ", ".join(spread if len(spread) > 1 else [str(d) for d in devices])
        raise ValueError(f"the model is spread over several devices ({names}); fastnig computes on one: "
                         "load it without device_map (or device_map={'': 'cuda:0'}), or move it with "
                         "model.to('cuda:0') / pass device=")
    return devices[0] if devices else torch.device("cpu")


def _normalized(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def compute_autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no context for ``None`` or float32."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_compute_dtype(model: nn.Module, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 without any); ``ValueError`` when
    ``dtype`` asks for more precision than they have: autocast only lowers precision, so
    ``dtype=torch.float32`` on a bf16 model would still compute in bf16 and say float32."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype is not None and torch.finfo(dtype).bits > torch.finfo(weights).bits:
        name = str(weights).replace("torch.", "")
        raise ValueError(f"dtype={str(dtype).replace('torch.', '')} but the model's weights are {name}: "
                         f"autocast cannot compute above the weights' precision; pass dtype=None (computes in "
                         f"{name}) or load the model in {str(dtype).replace('torch.', '')}")
    return weights


def move_model(model: nn.Module, device: Union[str, torch.device, None], *, warn: bool = True) -> torch.device:
    """Where ``model`` computes: ``device`` when one is given, else the device of its first parameter.

    ``device=None`` never moves the model.  A given ``device`` moves it there
    (``model.to``) if it is not there already, which the caller sees after the
    call: said in a warning (``warn=False`` when the caller loaded the model itself).
    """
    if device is None:
        return model_device(model)
    target = _normalized(device)
    if len(_dispatched_devices(model)) > 1:
        raise ValueError(f"device={device!r}: the model is dispatched over several devices by accelerate "
                         f"({', '.join(_dispatched_devices(model))}); load it without device_map to move it")
    here = model_devices(model)
    if here != [target] and here:
        if warn:
            warnings.warn(f"device={device!r}: moving the model from {', '.join(map(str, here))} to {target}; "
                          "it stays there after this call (pass device=None to compute where the model is)",
                          stacklevel=3)
        model.to(target)
    return target
