"""How much memory a path chunk of :func:`fastnig.attribute` takes, and what to do when it runs out.

Owns: the memory model of one chunk (:func:`chunk_memory`: every Linear
output kept for its gradient hook, the fp32 parts under autocast, attention,
the path and its gradient, fixed costs), the free memory a chunk may take
(:func:`free_memory`, counting PyTorch's allocator cache on CUDA), the chunk
size of ``step_batch="auto"`` (:func:`auto_step_batch`), and out-of-memory
recovery bookkeeping (:func:`is_out_of_memory`, :class:`ChunkLimit`: halve
and warn once).  Must not: run the model or accumulate conductance.
"""
from __future__ import annotations

import gc
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .first_token import cut_enabled_by_environment, last_layer_before_first_token_head, query_cut_module
from .first_token import first_token_cut as cut_of
from .model import input_embeddings, linear_modules

# On CPU, forwards of about this many token rows (path points × pairs × tokens)
# run faster than one big forward: the activations stay closer to the caches
# (MiniLM shape, 128 tokens: 11 points per forward ~10 % faster than 33; 1-4
# points slower again; bench/throughput/bench_attribute.py).
CPU_ROWS_PER_FORWARD = 2048


@dataclass
class ChunkMemory:
    """Predicted memory of one path chunk of :func:`attribute` (bytes), by part.

    ``per_point``: what one more path point per forward adds (all pairs of
    the batch); ``fixed``: what the batch holds whatever the chunk size.
    """

    per_point: Dict[str, int]
    fixed: Dict[str, int]

    def total(self, points: int) -> int:
        """Predicted peak of a chunk of ``points`` path points, bytes."""
        return sum(self.fixed.values()) + points * sum(self.per_point.values())


def _encoder_shape(model: nn.Module) -> Tuple[int, int, int, int]:
    """(hidden, intermediate, heads, layers) from the config (BERT, DistilBERT and T5 names; a T5's decoder
    layers counted with its encoder's), 0 when unknown."""
    config = getattr(model, "config", None)

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return 0
    layers = first("num_hidden_layers", "n_layers") + first("num_decoder_layers")
    return (first("hidden_size", "dim", "d_model"), first("intermediate_size", "hidden_dim", "ffn_dim", "d_ff"),
            first("num_attention_heads", "n_heads", "num_heads"), layers)


def chunk_memory(model: nn.Module, modules: Mapping[str, nn.Linear], tokens: int, pairs: int,
                 dtype: Optional[torch.dtype] = None, first_token_cut: bool = True,
                 coarse: bool = False, token_heads: Optional[Mapping[str, nn.Linear]] = None) -> ChunkMemory:
    """The memory model of a path chunk: what one forward + backward of ``points`` path
    points of ``pairs`` pairs of ``tokens`` tokens holds at its peak (the start of backward).

    Per point and token row (c = bytes of the compute dtype, f = bytes of the
    parts autocast keeps in float32, or of the parameters' dtype without autocast):

    * every Linear output of the encoder and every attributed module: kept for
      the gradient hooks (q, k, v and the intermediate ones by autograd too), c each;
    * per layer, the two residual sums autograd keeps for the LayerNorms, f each,
      and the attention: SDPA keeps its output (c) and log-sum-exp (heads, fp32),
      eager attention its probabilities (heads × tokens, c);
    * the path itself, its gradient and the embedding LayerNorm's input (f),
      the attention mask (tokens × f for eager attention, tokens bytes for SDPA);
    * the transient peak of backward: about two intermediate-wide gradients
      and one attention-wide (three for eager attention's probabilities), c.

    Past the first-token cut (``first_token_cut``) the last layer's rows are
    one per path point instead of ``tokens``; a ``[batch, features]`` output
    (the pooler) has one row.  Fixed: the carries (two points of every
    attributed output, c; four with ``coarse``, the Richardson rule's last even
    point), the input's carry (the embeddings' dtype), input and baseline
    embeddings and their difference (float32 at least); under autocast, every
    Linear's weight cast to c.  With float16 compute (autocast or weights) the
    gradients are unscaled in float32 before the op: a float32 copy of one
    layer's activations and gradients at a time, and float32 carries.
    Calibrated on CPU against the allocator's peak (tests/test_engine_robustness.py):
    within 10 % on the MiniLM shape, SDPA or eager, float32 or bfloat16.

    ``token_heads``: Linears outside the encoder that run on every token (SPLADE's vocabulary
    projection, ``[points, tokens, vocab]``): their output (c) and the float32 log(1 + relu(.))
    chain autograd keeps on it (three copies, 4 bytes each) per token row, attributed or not.
    """
    parameter = next(model.parameters(), None)
    param_dtype = parameter.dtype if parameter is not None else torch.float32
    compute = dtype or param_dtype
    c = torch.finfo(compute).bits // 8
    autocast = dtype is not None and dtype != param_dtype
    f = max(4, torch.finfo(param_dtype).bits // 8) if autocast else c
    hidden, intermediate, heads, layers = _encoder_shape(model)
    embedding = input_embeddings(model).weight.shape[1]
    eager = getattr(getattr(model, "config", None), "_attn_implementation", "eager") == "eager"

    # rows per path point (all pairs) of each Linear: tokens, or 1 past the cut and for 2-D outputs
    cut = cut_of(model) if first_token_cut else None
    last_layer_rows_cut = cut is not None
    past_cut = set()
    if cut is not None:
        named = list(model.named_modules())
        cut_name = next(n for n, m in named if m is cut)
        last_layer = last_layer_before_first_token_head(model)
        layer_name = next(n for n, m in named if m is last_layer)
        after = False
        for name, m in named:
            if name == cut_name:
                after = True
            if after and isinstance(m, nn.Linear) and name.startswith(layer_name + "."):
                past_cut.add(name)
        query = query_cut_module(model)
        if query is not None:
            past_cut.update(n for n, m in named if m is getattr(query, "query", None))

    # one row per pair: past the cut, the pooler, and the head's Linears (they read the first token)
    base_ids = {id(m) for m in getattr(model, "base_model", model).modules()}
    single = past_cut | {n for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and ("pooler" in n.split(".") or id(m) not in base_ids)}
    token_heads = dict(token_heads or {})
    single -= set(token_heads)

    def rows(name: str) -> int:
        return pairs if name in single else pairs * tokens

    kept = dict(linear_modules(model))
    kept.update(modules)
    per_point: Dict[str, int] = {}
    per_point["linear outputs"] = sum(m.out_features * rows(n) * c for n, m in kept.items())
    if token_heads:
        per_point["token heads"] = sum(m.out_features * pairs * tokens * (c + 3 * 4)
                                       for n, m in token_heads.items() if n not in kept)
        per_point["token heads"] += sum(m.out_features * pairs * tokens * 3 * 4
                                        for n, m in token_heads.items() if n in kept)
    full, last = pairs * tokens, (pairs if last_layer_rows_cut else pairs * tokens)
    layer_rows = full * max(layers - 1, 0) + (last if layers else 0)
    per_point["layer norm inputs"] = 2 * hidden * f * layer_rows
    if eager:
        attention_row = heads * tokens * c
    else:
        attention_row = hidden * c + heads * 4
    per_point["attention"] = attention_row * full * max(layers - 1, 0) + (
        attention_row * (pairs if query_cut_active(model, first_token_cut) else full) if layers else 0)
    per_point["path and embeddings"] = full * (2 * embedding * f + hidden * f)
    per_point["attention mask"] = full * tokens * (f if eager else 1)
    per_point["backward transients"] = full * c * (2 * intermediate + (3 * heads * tokens if eager else hidden))
    half = torch.float16 in (dtype, param_dtype)  # gradients unscaled in float32 before the op, carries float32
    if half:
        per_point["backward transients"] += full * 4 * 2 * max(intermediate, hidden)

    carry_rows = {n: (1 if n in single else tokens) for n in modules}
    carry_points = 4 if coarse else 2
    carry_bytes = 4 if half else c
    path_bytes = torch.finfo(param_dtype).bits // 8  # the path is in the embeddings' dtype
    fixed = {
        "carries": sum(carry_points * pairs * carry_rows[n] * m.out_features * carry_bytes
                       for n, m in modules.items()),
        # input and baseline embeddings and their difference in float32 at least, the input's carry
        "input carry and embeddings": pairs * tokens * embedding * (
            3 * max(4, path_bytes) + carry_points * (4 if half else path_bytes)),
    }
    if autocast:  # each Linear's weight cast to the compute dtype, kept for its input gradient
        fixed["weights cast by autocast"] = sum(m.weight.numel() * c for m in model.modules()
                                                if isinstance(m, nn.Linear))
    return ChunkMemory(per_point, fixed)


def query_cut_active(model: nn.Module, first_token_cut: bool = True) -> bool:
    """Whether :func:`attribute` runs the last layer's queries on the first token only."""
    return bool(first_token_cut) and cut_enabled_by_environment() and query_cut_module(model) is not None


def free_memory(device: torch.device) -> int:
    """Bytes a chunk may still take on ``device``: on CUDA the driver's free memory plus
    what PyTorch's caching allocator holds unused (``memory_reserved - memory_allocated``);
    on the host ``MemAvailable`` of ``/proc/meminfo``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _available_host_memory()


def auto_step_batch(model: nn.Module, modules: Mapping[str, nn.Linear], tokens: int, pairs: int,
                    device: torch.device, dtype: Optional[torch.dtype] = None, fraction: float = 0.5,
                    first_token_cut: bool = True, coarse: bool = False,
                    token_heads: Optional[Mapping[str, nn.Linear]] = None) -> int:
    """Path points per pair in one forward: as many as ``fraction`` of the free memory
    (:func:`free_memory`) holds by the memory model (:func:`chunk_memory`), and on CPU
    at most :data:`CPU_ROWS_PER_FORWARD` token rows.  At least 1."""
    device = torch.device(device)
    estimate = chunk_memory(model, modules, tokens, pairs, dtype, first_token_cut, coarse, token_heads)
    budget = free_memory(device) * fraction - sum(estimate.fixed.values())
    points = int(budget // max(sum(estimate.per_point.values()), 1))
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


# ------------------------------------------------------- out-of-memory recovery
_OUT_OF_MEMORY = re.compile(r"out of memory|DefaultCPUAllocator|can't allocate memory|could not allocate|"
                            r"failed to allocate", re.IGNORECASE)
logger = logging.getLogger("fastnig")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (CUDA), ``MemoryError`` and a CPU allocation failure
    (a ``RuntimeError`` whose message says it could not allocate, e.g. ``DefaultCPUAllocator: ...``)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    return isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc)) is not None


class ChunkLimit:
    """Path points per forward within one :func:`attribute` call: halved after an out-of-memory
    error and kept for the rest of the call (said once in a warning, later halvings logged)."""

    def __init__(self) -> None:
        self.limit: Optional[int] = None
        self.warned = False

    def cap(self, size: int) -> int:
        return size if self.limit is None else max(1, min(size, self.limit))

    def halve(self, size: int, pairs: int, tokens: int, device: torch.device, message: str) -> int:
        if size <= 1:
            raise MemoryError(
                f"out of memory on {device} even with one path point per forward ({pairs} pair(s) x {tokens} "
                f"tokens): lower pair_batch or max_length, or compute in dtype=torch.bfloat16 ({message})")
        smaller = (size + 1) // 2
        self.limit = smaller
        text = (f"out of memory on {device} with {size} path points per forward ({pairs} pair(s) x {tokens} "
                f"tokens); the chunk is redone with {smaller}, and later chunks use at most that ({message})")
        if not self.warned:
            self.warned = True
            warnings.warn(text + "; further halvings are logged to the 'fastnig' logger", RuntimeWarning,
                          stacklevel=4)
        else:
            logger.info(text)
        return smaller


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
