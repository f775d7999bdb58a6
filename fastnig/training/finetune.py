"""Fine-tuning a cross-encoder on a collection's judgments.

Owns: :func:`finetune_cross_encoder` (pairwise-softmax training on judged
positives against BM25 and random negatives, fp32 weights with an optional
bf16 autocast forward), :func:`training_dtype` and the training log.  Must
not: cache models or decide the demo's settings (:mod:`fastnig.training.demo_model`).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..common import check_int, check_number, sample_key
from ..data.loading import load_collection
from ..engine.encoding import encode_batch
from ..engine.model import compute_autocast, move_model
from ..evaluation.reranking import bm25_run

# Fine-tuning of the demo model: bf16 autocast where the CPU has it natively (training_dtype; the model's
# forward + backward: 0.37 s a step on 2 idle AVX512-BF16 cores, batch 16, 64 tokens, against 0.62 s in fp32),
# 355 s in all for 800 steps in `make demo`.
# Chosen on 2026-12-03 among 14 settings (160-800 steps, lr 5e-5 to 3e-4, head lr 2e-3 or 1e-2, half or all
# negatives random, 64 or 128 tokens, batch 16 or 32, fp32 or bf16), by Table 1's original-input value (mean
# P(rel) - P(non-rel) of the first 32 agreeing relevant training pairs, which the paper's MonoBERT puts at 1) and
# the held-out nDCG@10 (BM25: 0.493): with half the negatives from BM25 (judgments are incomplete: many unjudged
# BM25 hits are relevant) the loss stayed near 0.6 (Table 1: 0.42-0.70); random negatives only, lr 1e-4, a 2e-3
# head: Table 1 0.79 / 0.90-0.92 / 0.93 / 0.92-0.96 after 160 / 480 / 640 / 800 steps (nDCG@10 0.470 / 0.474-0.480
# / 0.489 / 0.463-0.466; bf16 and fp32 alike, runs differ by thread count); a 1e-2 head, batch 32 or
# 128 tokens: no better per step.
DEMO_STEPS = 800
DEMO_LR = 1e-4
DEMO_HEAD_LR = 2e-3
DEMO_MAX_LENGTH = 64
DEMO_RANDOM_NEGATIVES = 1.0


def training_dtype(device=None) -> Optional[torch.dtype]:
    """The autocast dtype a fine-tune should use on ``device``: bf16 where it is native, else ``None`` (fp32).

    Native: a CUDA device with bf16 (Ampere and later), or a CPU with
    AVX512-BF16 or AMX-BF16 (``torch.cpu.get_capabilities()``), where bf16
    makes a MiniLM training step 1.7x faster; elsewhere bf16 is emulated and
    slower, so fp32 is kept.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else None
    return None


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; ``None`` (no autocast) -> ``"float32"``."""
    return str(dtype or torch.float32).replace("torch.", "")


@dataclass
class TrainingLog:
    """What :func:`finetune_cross_encoder` did.

    Attributes:
        losses: the training loss of every step (mean BCE over the batch).
        seconds: wall time of the optimisation loop (data preparation excluded).
        prepare_seconds: BM25 run and passage reading before the loop.
        num_positives, num_negatives: training pairs available (each step draws
            ``batch_size // 2`` of each, cycling through them in a seeded order).
        settings: the arguments that determine the result.
    """

    losses: List[float]
    seconds: float
    prepare_seconds: float
    num_positives: int
    num_negatives: int
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _training_pairs(collection, query_ids: Sequence[str], *, negative_depth: int, random_per_query: int, seed: int,
                    bm25_cache_dir, progress: bool):
    """(query, passage) positives (judged relevant), hard negatives (BM25 top ``negative_depth`` not judged
    relevant) and random negatives (``random_per_query`` corpus documents not judged relevant, seeded).
    ``negative_depth`` 0: no hard negatives, and no BM25 run."""
    queries, qrels = collection.queries(), collection.qrels()
    texts_of = {q: queries[q] for q in query_ids}
    run = (bm25_run(collection, texts_of, k=negative_depth, cache_dir=bm25_cache_dir, progress=progress)
           if negative_depth else {})
    all_ids = sorted(d for d, _ in collection.iter_docs()) if random_per_query else []
    pos_ids, hard_ids, random_ids = [], [], []
    for q in query_ids:
        relevant = {d for d, g in qrels.get(q, {}).items() if g > 0}
        pos_ids += [(q, d) for d in sorted(relevant)]
        hard_ids += [(q, d) for d, _ in run.get(q, []) if d not in relevant]
        if random_per_query:
            ranked = sorted((d for d in all_ids if d not in relevant), key=lambda d: sample_key(seed, "neg", q, d))
            random_ids += [(q, d) for d in ranked[:random_per_query]]
    passages = collection.doc_texts({d for _, d in pos_ids + hard_ids + random_ids})

    def texts(ids):
        return [(texts_of[q], passages[d]) for q, d in ids if passages.get(d)]

    return texts(pos_ids), texts(hard_ids), texts(random_ids)


def _cycle(items: Sequence, rng: random.Random) -> Iterator:
    """Endless epochs over ``items``, each in a fresh seeded order."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i]


def finetune_cross_encoder(model, tokenizer, collection, *, query_ids: Optional[Sequence[str]] = None,
                           steps: int = DEMO_STEPS, batch_size: int = 16, lr: float = DEMO_LR,
                           max_length: int = DEMO_MAX_LENGTH, seed: int = 0, warmup: float = 0.1,
                           negative_depth: int = 30, random_negatives: float = DEMO_RANDOM_NEGATIVES,
                           head_lr: Optional[float] = DEMO_HEAD_LR, freeze_embeddings: bool = True,
                           dropout: bool = False, dtype: Optional[torch.dtype] = None, bm25_cache_dir=None,
                           device=None, progress: bool = True) -> TrainingLog:
    """Fine-tune a cross-encoder in place on a collection's judgments (pointwise BCE).

    Every step takes ``batch_size // 2`` positives (judged relevant:
    grade > 0) and as many negatives: hard ones (the BM25 top
    ``negative_depth`` of the same queries, minus their judged-relevant
    documents) and, a ``random_negatives`` fraction of them, random corpus
    documents not judged relevant for the query; each kind is drawn from its
    own seeded cyclic order.  It minimises the binary cross-entropy
    of the relevance logit (1-logit models; 2-logit models: cross-entropy of
    the two logits, label 1 = relevant).  AdamW, linear warm-up over
    ``warmup · steps`` steps then linear decay to 0, gradient norm clipped at
    1.  The word embeddings are frozen by default (most parameters of a small
    BERT, and the most expensive to update; their gradient is not computed).

    Deterministic from ``seed`` on one device and thread count.  The model is
    left in eval mode on ``device`` (``None`` = where it is).

    Args:
        model: a Hugging Face sequence-classification model with 1 or 2 logits.
        tokenizer: its tokenizer (pairs: ``truncation="only_second"``).
        collection: a :class:`fastnig.data.Collection` (or a spec for
            :func:`fastnig.data.load_collection`).
        query_ids: the training queries (default: every query with a
            relevant judgment).  Hold some out to evaluate the model.
        steps, batch_size, lr, max_length, warmup: the optimisation.
        seed: sampling order, dropout and the new head's init are all from it.
        negative_depth: BM25 depth the hard negatives come from.
        head_lr: learning rate of the classification head (the parameters
            outside ``model.base_model``, new and randomly initialised when the
            model is a pretrained encoder); ``None`` = ``lr``.  A larger one
            lets a brief fine-tune reach confident scores: with ``lr`` alone
            the new head's logits stay near 0.
        random_negatives: fraction of the negatives that are random documents
            (0 = BM25 negatives only).  All by default: Cranfield's judgments are
            incomplete (many unjudged BM25 hits are relevant), and with half
            the negatives from BM25 the loss stays near 0.6 within a few
            hundred steps.  Lists every doc id: meant for small corpora.  At 1
            no BM25 run is made.
        freeze_embeddings: keep the embedding layer fixed.
        dropout: train with the model's dropout (off by default: for a few
            dozen steps it only slows learning, and costs ~40 % of a CPU step).
        dtype: ``torch.bfloat16`` = mixed precision (the forward under bf16
            autocast; weights, gradients and the optimizer stay in the
            parameters' dtype); ``None`` or ``torch.float32`` = none.  bf16
            makes a MiniLM step 1.7x faster on 2 CPU cores with native bf16
            (AVX512-BF16, AMX; see :func:`training_dtype`) and slower where
            bf16 is emulated.  (float16 is not offered: it would need loss
            scaling.)
        bm25_cache_dir: where :func:`fastnig.evaluation.reranking.bm25_run` keeps its index.
        progress: a progress bar over steps.

    Returns:
        :class:`TrainingLog` (per-step losses, timings, pair counts, settings).
    """
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 2), ("max_length", max_length, 8),
                             ("negative_depth", negative_depth, 1)):
        check_int(name, value, low)
    check_number("lr", lr, positive=True)
    if head_lr is not None:
        check_number("head_lr", head_lr, positive=True)
    if not 0 <= random_negatives <= 1:
        raise ValueError(f"random_negatives must be a fraction in [0, 1], got {random_negatives!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {warmup!r}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32 or torch.bfloat16 (mixed precision), got {dtype!r}")
    if isinstance(collection, (str, os.PathLike)):
        collection = load_collection(collection)
    num_labels = int(getattr(model.config, "num_labels", 0) or 0)
    if num_labels not in (1, 2):
        raise ValueError(f"the model has {num_labels} logits; a cross-encoder has 1 (score) or 2 (non-rel, rel)")
    if query_ids is None:
        queries = collection.queries()
        query_ids = [q for q, docs in collection.qrels().items()
                     if queries.get(q) and any(g > 0 for g in docs.values())]
    query_ids = [str(q) for q in query_ids]
    unknown = [q for q in query_ids if q not in collection.queries()]
    if unknown:
        raise ValueError(f"query_ids: {len(unknown)} ids are not queries of {collection.name!r} (e.g. {unknown[:3]})")

    started = time.perf_counter()
    n_neg = batch_size - batch_size // 2
    n_random = round(random_negatives * n_neg)
    positives, hard, easy = _training_pairs(collection, query_ids,
                                            negative_depth=negative_depth if n_random < n_neg else 0,
                                            random_per_query=max(1, -(-n_random * steps // len(query_ids)))
                                            if n_random else 0, seed=seed, bm25_cache_dir=bm25_cache_dir,
                                            progress=False)
    for what, items, needed in (("positive", positives, True), ("hard negative", hard, n_random < n_neg),
                                ("random negative", easy, n_random > 0)):
        if needed and not items:
            raise ValueError(f"{collection.name}: no {what} training pairs for the {len(query_ids)} training queries")
    prepare_seconds = time.perf_counter() - started

    device = move_model(model, device)
    rng = random.Random(seed)
    pos_iter, hard_iter = _cycle(positives, rng), _cycle(hard, rng)
    easy_iter = _cycle(easy, rng) if n_random else iter(())
    torch.manual_seed(seed)
    frozen = []
    if freeze_embeddings:
        emb = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
        frozen = [p for p in emb.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    body = {id(p) for p in model.base_model.parameters()}
    head = [p for p in trainable if id(p) not in body]
    groups = [{"params": [p for p in trainable if id(p) in body]},
              {"params": head, "lr": lr if head_lr is None else head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.01)
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    half = batch_size // 2
    losses: List[float] = []
    model.train(dropout)  # no dropout by default: it costs ~40 % of a CPU step
    started = time.perf_counter()
    try:
        for _ in tqdm(range(steps), desc="fine-tune", unit="step", disable=not progress):
            batch = ([next(pos_iter) for _ in range(half)] + [next(hard_iter) for _ in range(n_neg - n_random)]
                     + [next(easy_iter) for _ in range(n_random)])
            labels = torch.tensor([1.0] * half + [0.0] * (batch_size - half), device=device)
            enc = {k: v.to(device) for k, v in encode_batch(tokenizer, batch, max_length).items()}
            with compute_autocast(device, dtype):
                logits = model(**enc).logits.float()
            if num_labels == 1:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels)
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels.long())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    settings = dict(collection=str(collection.name), num_queries=len(query_ids), steps=steps,
                    batch_size=batch_size, lr=lr, max_length=max_length, seed=seed, warmup=warmup,
                    negative_depth=negative_depth, random_negatives=random_negatives, head_lr=head_lr,
                    freeze_embeddings=freeze_embeddings, dropout=dropout,
                    dtype=_dtype_name(dtype))
    return TrainingLog(losses, time.perf_counter() - started, prepare_seconds, len(positives), len(hard) + len(easy),
                       settings)
