"""How fastnig talks to a Hugging Face cross-encoder: the one home of the plumbing.

Owns: checking (query, passage) pairs; tokenising them as the model sees them
(``truncation="only_second"``, falling back to ``longest_first`` when the
query alone is too long); whether the model takes ``token_type_ids``; the
frozen-eval context; the map from logits (1 or 2) to F, P(relevant) and the
ranking score; and batched scoring of pairs with the first-token cut
(:mod:`fastnig.first_token`).  Attribution, data (agreement filter),
reranking, model fine-tuning and analysis all go through here.

Must not: know about path integrals, datasets, neuron sets or files.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .common import check_int
from .first_token import first_token_only

Pair = Tuple[str, str]
TARGETS = ("relevant", "non-relevant")
OUTPUTS = ("probability", "logit")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


DEFAULT_MAX_LENGTH = 512


# ------------------------------------------------------------------ the model
def is_sentence_transformers_cross_encoder(model) -> bool:
    """True for a ``sentence_transformers.CrossEncoder`` (checked without importing sentence-transformers)."""
    return any(cls.__name__ == "CrossEncoder" and cls.__module__.startswith("sentence_transformers")
               for cls in type(model).__mro__)


def unwrap(model, tokenizer=None) -> Tuple[nn.Module, object]:
    """``(model, tokenizer)`` as fastnig uses them: a ``sentence_transformers.CrossEncoder`` becomes its
    Hugging Face model and tokenizer (its ``max_length`` is the tokenizer's ``model_max_length``);
    anything else is returned as given."""
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
    """Eval mode and no parameter gradients for the duration, both restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


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
                   include_pooler: bool = False) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose outputs are neurons (docs/method.md §4).

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


# ------------------------------------------------------------------ the pairs
def validate_pairs(pairs) -> List[Pair]:
    """``pairs`` as a non-empty list of (query, passage) string tuples, or a ``TypeError``/``ValueError``
    that says which pair is wrong.  An empty passage is fine; an empty query is not."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
        raise TypeError("pairs must be a list of (query, passage) tuples; wrap a single pair as [(query, passage)]")
    try:
        pairs = list(pairs)
    except TypeError:
        raise TypeError("pairs must be a list of (query, passage) string tuples") from None
    if not pairs:
        raise ValueError("pairs is empty: give at least one (query, passage) tuple")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, passage) tuple, got {pair!r:.80}")
        query, passage = pair
        if not isinstance(query, str) or not isinstance(passage, str):
            raise TypeError(f"pairs[{i}]: query and passage must be strings, got "
                            f"{type(query).__name__} and {type(passage).__name__}")
        if not query.strip():
            raise ValueError(f"pairs[{i}]: the query is empty")
    return [(q, p) for q, p in pairs]


def tokenize_pair(tokenizer, query: str, passage: str, max_length: int, **kwargs):
    """One pair as the cross-encoder sees it: ``[CLS] query [SEP] passage [SEP]``,
    the passage truncated first (``only_second``); a query longer than
    ``max_length`` on its own is truncated too (``longest_first``).

    A fast tokenizer keeps its truncation setting as shared state, so threads
    must not share one (each thread: ``copy.deepcopy(tokenizer)``); processes
    (``torchrun``) are unaffected."""
    try:
        return tokenizer(query, passage, truncation="only_second", max_length=max_length, **kwargs)
    except Exception:  # the query alone is longer than max_length
        return tokenizer(query, passage, truncation="longest_first", max_length=max_length, **kwargs)


def tokenize_pairs(tokenizer, pairs: Sequence[Pair], max_length: int, chunk: int = 1024
                   ) -> List[Dict[str, List[int]]]:
    """Token ids of many pairs (:func:`tokenize_pair`'s truncation), in chunks of ``chunk`` pairs.

    Returns one dict per pair with the model inputs the tokenizer makes among
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` (lists of ints, unpadded).
    """
    names = [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
             if n in MODEL_INPUTS]
    rows: List[Dict[str, List[int]]] = []
    for start in range(0, len(pairs), chunk):
        queries = [q for q, _ in pairs[start:start + chunk]]
        passages = [p or "" for _, p in pairs[start:start + chunk]]
        try:
            enc = tokenizer(queries, passages, truncation="only_second", max_length=max_length)
            batch = [{n: enc[n][i] for n in names if n in enc} for i in range(len(queries))]
        except Exception:  # some query alone exceeds max_length: pair by pair
            batch = [None] * len(queries)
        for i, (q, p) in enumerate(zip(queries, passages)):
            if batch[i] is None or not p:  # an empty passage: [CLS] q [SEP], as tokenize_pair encodes it
                one = tokenize_pair(tokenizer, q, p, max_length)
                batch[i] = {n: one[n] for n in names if n in one}
        rows += batch
    return rows


def pad_rows(rows: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad token rows to the longest: ``input_ids`` with ``pad_id``, the rest with 0; each ``[batch, tokens]``."""
    width = max(len(r["input_ids"]) for r in rows)
    return {key: torch.tensor([r[key] + [pad_id if key == "input_ids" else 0] * (width - len(r[key])) for r in rows],
                              dtype=torch.long)
            for key in rows[0]}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's [PAD] id (0 when it has none: padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_batch(tokenizer, pairs: Sequence[Pair], max_length: int) -> Dict[str, torch.Tensor]:
    """Model inputs of a few pairs, padded to the longest (e.g. one training batch)."""
    return pad_rows(tokenize_pairs(tokenizer, pairs, max_length), pad_token_id(tokenizer))


# ------------------------------------------------------------ logits -> F
def target_function(logits: torch.Tensor, relevant: torch.Tensor, output: str = "probability") -> torch.Tensor:
    """F for each row (docs/method.md §2).

    Args:
        logits: ``[batch, 1]`` or ``[batch, 2]`` classifier outputs.
        relevant: ``[batch]`` bool, True where the target label is "relevant".
        output: ``"probability"`` (softmax / sigmoid) or ``"logit"`` (raw ±logit).
    Returns:
        ``[batch]`` F.
    """
    if logits.dtype != torch.float64:  # probabilities in at least fp32, whatever the compute dtype
        logits = logits.float()
    if logits.shape[-1] == 1:
        s = logits[:, 0]
        signed = torch.where(relevant, s, -s)
        return torch.sigmoid(signed) if output == "probability" else signed
    if logits.shape[-1] == 2:
        values = torch.softmax(logits, dim=-1) if output == "probability" else logits
        return torch.where(relevant, values[:, 1], values[:, 0])
    raise ValueError(
        f"the model has {logits.shape[-1]} output logits; fastnig supports cross-encoders with 1 logit "
        "(relevance score) or 2 logits (non-relevant, relevant)")


def relevance_probability(logits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` P(relevant) from 1- or 2-logit cross-encoder outputs."""
    ones = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return target_function(logits, ones, "probability")


def relevance_score(logits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` ranking score: the relevance logit (log-odds of P(relevant)).

    1 logit s: s (P = sigmoid(s)); 2 logits: ``logits[:, 1] - logits[:, 0]``
    (P = softmax[1] = sigmoid of it).  Ranks exactly like P(relevant).
    """
    logits = logits.float()
    if logits.shape[-1] == 1:
        return logits[:, 0]
    if logits.shape[-1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ValueError(f"the model has {logits.shape[-1]} output logits; fastnig reranks with cross-encoders "
                     "with 1 logit (relevance score) or 2 logits (non-relevant, relevant)")


SCORES = {"score": relevance_score, "probability": relevance_probability}


# ---------------------------------------------------------- batched scoring
@dataclass
class EncodedBatches:
    """Pairs tokenised once, in padded batches of similar length.

    Attributes:
        batches: per batch, the model inputs (``input_ids``, ``attention_mask``
            and, if the tokenizer makes them, ``token_type_ids``), each
            ``[batch, tokens]`` int64.
        rows: per batch, ``[batch]`` int64 positions of its pairs in the input order.
        num_pairs: number of pairs.
    """

    batches: List[Dict[str, torch.Tensor]]
    rows: List[torch.Tensor]
    num_pairs: int

    def to(self, device) -> "EncodedBatches":
        return EncodedBatches([{k: v.to(device) for k, v in b.items()} for b in self.batches],
                              self.rows, self.num_pairs)


def encode_batches(tokenizer, pairs: Sequence[Pair], max_length: int = 512, batch_size: int = 32
                   ) -> EncodedBatches:
    """Tokenise every pair once (:func:`tokenize_pairs`) into batches of similar length.

    Pairs are sorted by length so that a batch holds pairs of similar length
    (less padding; the scores do not depend on the batching beyond float rounding).
    """
    check_int("max_length", max_length, 4, " (tokens)")
    check_int("batch_size", batch_size, 1, " (pairs per forward pass)")
    encoded = tokenize_pairs(tokenizer, pairs, max_length)
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]["input_ids"]))
    batches, rows = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batches.append(pad_rows([encoded[i] for i in idx], pad_token_id(tokenizer)))
        rows.append(torch.tensor(idx, dtype=torch.long))
    return EncodedBatches(batches, rows, len(pairs))


def score_batches(model: nn.Module, encoded: EncodedBatches, *, output: str = "score", progress: bool = True,
                  desc: str = "rerank", partial: bool = False) -> np.ndarray:
    """Score every encoded pair: ``output="score"`` (:func:`relevance_score`) or
    ``"probability"`` (:func:`relevance_probability`).

    Runs in eval mode under ``inference_mode`` with the first-token cut.

    Returns:
        float64 ``[num_pairs]`` in input order.  With ``partial`` (``encoded``
        holds only some batches, e.g. one rank's share), the other pairs are 0.
    """
    to_score = SCORES[output]
    accepted = set(inspect.signature(model.forward).parameters)
    device = model_device(model)
    scores = (torch.zeros if partial else torch.empty)(encoded.num_pairs, dtype=torch.float64)
    with frozen_eval(model), torch.inference_mode(), first_token_only(model):
        for batch, rows in tqdm(list(zip(encoded.batches, encoded.rows)), desc=desc, unit="batch",
                                disable=not progress, leave=False):
            inputs = {k: v.to(device) for k, v in batch.items() if k in accepted}
            out = model(**inputs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            scores[rows] = to_score(logits).double().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("the model produced NaN/Inf scores for some pairs (overflow in a low-precision "
                         "dtype?); score in float32")
    return scores.numpy()


def score_pairs(model: nn.Module, tokenizer, pairs: Sequence[Pair], *, output: str = "score",
                max_length: Optional[int] = None, batch_size: int = 32, progress: bool = False,
                desc: str = "score") -> np.ndarray:
    """float64 ``[len(pairs)]`` scores of (query, passage) pairs, in input order
    (:func:`encode_batches` + :func:`score_batches`; ``max_length``: :func:`resolve_max_length`)."""
    model, tokenizer = unwrap(model, tokenizer)
    max_length = resolve_max_length(model, tokenizer, max_length)
    return score_batches(model, encode_batches(tokenizer, list(pairs), max_length, batch_size), output=output,
                         progress=progress, desc=desc)


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
