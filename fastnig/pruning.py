"""Pruning evaluation: do the neurons NIG finds matter for ranking? (SPEC §8, the paper's Table 4)

The stages, top to bottom:

1. **Pruning.** :func:`prune` returns a pruned deep copy of a model;
   :func:`pruned` zeroes the same rows in place and restores them bit for bit
   on exit (what the evaluation uses: no copy of a BERT-large per run).
   Pruning a neuron = zeroing its weight row and bias entry, so its output is
   exactly 0 for every input.
2. **Random baseline.** :func:`random_like` draws, from a seed, as many
   neurons as a set has in every module (= layer + component).
3. **Candidates.** :func:`build_candidates`: per sampled query, every judged
   relevant passage plus the top ``depth`` (20) of the dataset's own
   first-stage run, or of BM25 (:func:`bm25_run`, ``bm25s``, index cached on
   disk) when it has none.
4. **Reranking.** :func:`encode_candidates` tokenises the pairs once;
   :func:`score_candidates` scores them in batches (the last layer past
   self-attention on the first token only, which is all the head reads:
   :func:`fastnig.attribution.first_token_only`).  The score is the
   relevance **logit** (1-logit models: the logit; 2-logit models:
   ``logit[1] - logit[0]``), i.e. the log-odds of P(relevant): it ranks
   exactly like P(relevant) = sigmoid(score) but does not saturate to ties at
   1.0 in float32.
5. **Metrics.** :func:`ndcg_at_k` (ranx; ties broken by doc id, descending,
   as trec_eval does, so it equals trec_eval's ``ndcg_cut``) and
   :func:`compare_ndcg` (% drop of the mean, two-tailed paired t-test).
6. **Benchmark.** :class:`PruningBenchmark`: one validation dataset, its
   candidates tokenised once and the original model's scores computed once,
   shared by every pruned run and random repetition.
7. **Table 4.** :func:`evaluate_pruning` -> :class:`PruningTable` (CSV,
   Markdown, LaTeX).

A *neuron set* is any object with ``sizes`` (module name -> out_features,
the universe, model order), ``name`` and ``by_module()`` (module name ->
sorted unit indices), such as :class:`fastnig.schemes.NeuronSet`.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import random
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .attribution import first_token_only

DEFAULT_DEPTH = 20
DEFAULT_REPETITIONS = 50
SIGNIFICANCE_LEVEL = 0.05
BM25_K1 = 0.9  # Anserini / Pyserini defaults, the usual "BM25" of IR papers
BM25_B = 0.4

CSV_COLUMNS = (
    "set", "level_percent", "dataset", "group", "num_neurons", "num_queries", "num_candidates",
    "ndcg_original", "ndcg_pruned", "drop_percent", "p_value", "significant",
    "random_repetitions", "random_ndcg_mean", "random_drop_mean", "random_drop_std", "random_significant",
)


# ============================================================ 1. pruning
def _neuron_members(neuron_set) -> Dict[str, torch.Tensor]:
    if not hasattr(neuron_set, "by_module"):
        raise TypeError("neuron_set must be a fastnig NeuronSet (an object with by_module() and sizes), "
                        f"got {type(neuron_set).__name__}")
    return {name: torch.as_tensor(idx, dtype=torch.long).flatten() for name, idx in neuron_set.by_module().items()}


def _resolve(model: nn.Module, neuron_set) -> List[Tuple[str, nn.Linear, torch.Tensor]]:
    """(name, Linear, unit indices) for every module with selected neurons; validates against the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    members = _neuron_members(neuron_set)
    modules = dict(model.named_modules())
    sizes = dict(getattr(neuron_set, "sizes", None) or {})
    for name in list(sizes) + [n for n in members if n not in sizes]:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            sample = ", ".join([n for n, m in modules.items() if isinstance(m, nn.Linear)][:3])
            raise ValueError(f"neuron_set: {name!r} is not an nn.Linear module of this model (its Linear modules "
                             f"are named like {sample}); was the set built for another model?")
        if name in sizes and int(sizes[name]) != module.out_features:
            raise ValueError(f"neuron_set: module {name} has {sizes[name]} neurons in the set's universe but "
                             f"{module.out_features} in this model; the set was built for another model")
    resolved = []
    for name, idx in members.items():
        if idx.numel() == 0:
            continue
        module = modules[name]
        if int(idx.min()) < 0 or int(idx.max()) >= module.out_features:
            raise ValueError(f"neuron_set: module {name} has unit indices outside 0..{module.out_features - 1}")
        resolved.append((name, module, torch.unique(idx)))
    return resolved


def _zero_rows(targets: Sequence[Tuple[str, nn.Linear, torch.Tensor]]) -> None:
    with torch.no_grad():
        for _, module, idx in targets:
            idx = idx.to(module.weight.device)
            module.weight[idx] = 0
            if module.bias is not None:
                module.bias[idx] = 0


def prune(model: nn.Module, neuron_set) -> nn.Module:
    """A deep copy of ``model`` whose selected neurons output exactly 0 for every input.

    Each selected unit's weight row and bias entry are zeroed in the copy;
    ``model`` is left untouched.  For many evaluations of one model prefer
    :func:`pruned`, which avoids the copy.

    Args:
        model: the cross-encoder.
        neuron_set: a NeuronSet over the model's Linear modules (``sizes`` must
            match the model's ``out_features``).
    Returns:
        the pruned copy (same device, dtype and train/eval mode).
    """
    targets = _resolve(model, neuron_set)
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    _zero_rows([(name, modules[name], idx) for name, _, idx in targets])
    return clone


@contextmanager
def pruned(model: nn.Module, neuron_set) -> Iterator[nn.Module]:
    """Prune ``model`` in place for the duration of a ``with`` block.

    Zeroes the selected weight rows and bias entries (so the neurons output
    exactly 0) and, on exit, even after an exception, writes the saved values
    back, so the model is bit-for-bit what it was.  Costs a copy of the
    selected rows only: the fast path for the 50 random repetitions.

    Yields:
        ``model`` itself, pruned.
    """
    targets = _resolve(model, neuron_set)
    saved = []
    try:
        with torch.no_grad():
            for _, module, idx in targets:
                idx = idx.to(module.weight.device)
                bias = None if module.bias is None else module.bias[idx].clone()
                saved.append((module, idx, module.weight[idx].clone(), bias))
        _zero_rows(targets)
        yield model
    finally:
        with torch.no_grad():
            for module, idx, weight, bias in reversed(saved):
                module.weight[idx] = weight
                if bias is not None:
                    module.bias[idx] = bias


# ==================================================== 2. random baseline
def _check_seed(seed, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {seed!r}")
    return int(seed)


def module_counts(neuron_set) -> Dict[str, int]:
    """Module name -> number of selected neurons (modules with none omitted), in model order."""
    members = {n: int(idx.numel()) for n, idx in _neuron_members(neuron_set).items() if idx.numel()}
    order = list(getattr(neuron_set, "sizes", {}) or {})
    return {n: members[n] for n in order + sorted(set(members) - set(order)) if n in members}


def _neuron_set_class(neuron_set):
    cls = type(neuron_set)
    if hasattr(cls, "from_indices"):
        return cls
    from .schemes import NeuronSet  # noqa: WPS433 (late import: schemes is optional for pruning)
    return NeuronSet


def random_like(neuron_set, seed: int = 0, repetition: int = 0, name: Optional[str] = None):
    """A random neuron set with the same number of neurons in every module (layer + component).

    Within each module the units are drawn uniformly without replacement.
    The draw depends only on ``(seed, repetition)`` and the set's per-module
    counts, so repetition ``r`` is the same whatever the number of
    repetitions, and the same random sets are used on every dataset.

    Returns:
        a NeuronSet (the class of ``neuron_set``) over the same universe.
    """
    seed = _check_seed(seed)
    repetition = _check_seed(repetition, "repetition")
    sizes = dict(getattr(neuron_set, "sizes", None) or {})
    counts = module_counts(neuron_set)
    missing = [m for m in counts if m not in sizes]
    if missing:
        raise ValueError(f"neuron_set: modules {missing[:3]} are not in its sizes (the universe)")
    rng = np.random.default_rng([seed, repetition])
    members = {}
    for module, size in sizes.items():
        if counts.get(module):
            members[module] = np.sort(rng.choice(int(size), size=counts[module], replace=False)).tolist()
    label = name if name is not None else f"random({getattr(neuron_set, 'name', '') or 'set'})#{repetition}"
    return _neuron_set_class(neuron_set).from_indices(members, sizes, name=label)


# ========================================================= 3. candidates
@dataclass
class Candidates:
    """The passages to rerank for each sampled query of one dataset.

    Attributes:
        name: the dataset's name.
        queries: qid -> query text, in evaluation order (sorted qids).
        docs: qid -> candidate doc ids (first-stage order, then the judged
            relevant passages it missed).
        passages: doc id -> passage text for every candidate.
        qrels: qid -> doc id -> grade (every judgment of the sampled queries;
            grade > 0 = relevant, the gain of nDCG).
        source: where the first-stage list came from: ``"scoreddocs"`` or ``"bm25"``.
    """

    name: str
    queries: Dict[str, str]
    docs: Dict[str, List[str]]
    passages: Dict[str, str]
    qrels: Dict[str, Dict[str, int]]
    source: str

    def pairs(self) -> List[Tuple[str, str]]:
        """``[(qid, doc_id)]`` of every candidate, query by query."""
        return [(qid, doc) for qid in self.queries for doc in self.docs[qid]]

    @property
    def num_pairs(self) -> int:
        return sum(len(d) for d in self.docs.values())

    @property
    def num_queries(self) -> int:
        return len(self.queries)


def _bm25_cache_dir(cache_dir: Union[str, Path], collection_name: str, source: str, k1: float, b: float) -> Path:
    identity = [collection_name, source, k1, b, "bm25s-lucene-en-stopwords-nostem"]
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", collection_name).strip("_")[-60:] or "collection"
    return Path(cache_dir).expanduser() / f"{slug}-{key}"


def bm25_index(collection, cache_dir: Union[str, Path, None] = None, k1: float = BM25_K1, b: float = BM25_B,
               progress: bool = True):
    """A ``bm25s`` index over ``collection.iter_docs()`` and its doc ids, cached on disk.

    Tokenisation: bm25s's (lowercase, words of 2+ characters, English stop
    words removed, no stemming).  With ``cache_dir`` the index is saved to /
    loaded from ``cache_dir/<name>-<hash of name, source, k1, b>`` (the
    collection's ``name`` and ``source``); delete that folder if the corpus
    changes under the same name.

    Returns:
        ``(retriever, doc_ids)``: a ``bm25s.BM25`` and the list mapping its row
        numbers to doc ids.
    """
    import bm25s

    name = str(getattr(collection, "name", "") or "")
    source = str(getattr(collection, "source", "") or "")
    folder = _bm25_cache_dir(cache_dir, name, source, k1, b) if cache_dir is not None and name else None
    if folder is not None and (folder / "doc_ids.json").is_file():
        retriever = bm25s.BM25.load(str(folder))
        doc_ids = json.loads((folder / "doc_ids.json").read_text())
        return retriever, doc_ids
    doc_ids, texts = [], []
    for doc_id, text in collection.iter_docs():
        doc_ids.append(str(doc_id))
        texts.append(text or "")
    if not doc_ids:
        raise ValueError(f"collection {name!r} has no documents to index with BM25")
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=progress)
    del texts
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=progress)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        retriever.save(str(folder))
        tmp = folder / "doc_ids.json.tmp"
        tmp.write_text(json.dumps(doc_ids))
        tmp.replace(folder / "doc_ids.json")  # written last: marks the cache complete
    return retriever, doc_ids


def bm25_run(collection, queries: Mapping[str, str], k: int = 100, cache_dir: Union[str, Path, None] = None,
             k1: float = BM25_K1, b: float = BM25_B, progress: bool = True) -> Dict[str, List[Tuple[str, float]]]:
    """BM25 top ``k`` of each query over the collection's corpus.

    Returns:
        qid -> ``[(doc_id, score)]`` by decreasing score (fewer than ``k`` when
        the corpus is smaller).
    """
    import bm25s

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (passages per query), got {k!r}")
    retriever, doc_ids = bm25_index(collection, cache_dir, k1, b, progress)
    qids = list(queries)
    if not qids:
        return {}
    query_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False)
    depth = min(k, len(doc_ids))
    rows, scores = retriever.retrieve(query_tokens, k=depth, show_progress=progress)
    return {qid: [(doc_ids[int(r)], float(s)) for r, s in zip(rows[i], scores[i])] for i, qid in enumerate(qids)}


def _first_stage(collection, qids: Sequence[str], depth: int) -> Optional[Dict[str, List[Tuple[str, float]]]]:
    """The dataset's own run for ``qids`` (top ``depth``, best first), or ``None`` when it has none."""
    try:
        run = collection.scoreddocs(query_ids=list(qids), depth=max(depth, 1))
    except TypeError:  # a collection whose scoreddocs() takes no arguments
        run = collection.scoreddocs()
    if run is None:
        return None
    wanted = set(qids)
    out = {}
    for qid, hits in run.items():
        if str(qid) in wanted:
            ranked = sorted(((str(d), float(sc)) for d, sc in hits), key=lambda ds: (-ds[1], ds[0]))
            out[str(qid)] = ranked[:depth]
    return out


def build_candidates(collection, num_queries: Optional[int] = None, seed: int = 0, depth: int = DEFAULT_DEPTH,
                     cache_dir: Union[str, Path, None] = None, k1: float = BM25_K1, b: float = BM25_B,
                     progress: bool = True) -> Candidates:
    """The candidates to rerank for (a seeded sample of) a dataset's queries (SPEC §8).

    Eligible queries have a text and at least one relevant judgment (grade >
    0).  ``num_queries`` of them are drawn with ``random.Random(seed)`` from
    the sorted qids (all of them if ``None`` or more than there are).  Each
    gets its first-stage top ``depth`` (the dataset's own run,
    ``collection.scoreddocs()``, when it has one; else :func:`bm25_run` over
    its corpus) plus every judged relevant passage.  A sampled query missing
    from the dataset's own run is left out (with a warning).  Relevant
    passages missing from the corpus stay in the qrels (they count in the
    ideal DCG) but cannot be reranked.

    Args:
        collection: a :mod:`fastnig.data` Collection (``name``, ``queries()``,
            ``qrels()``, ``doc_texts(ids)``, ``iter_docs()``, ``scoreddocs()``).
        num_queries: queries to sample; ``None`` = all eligible.
        seed: sampling seed (integer >= 0).
        depth: first-stage passages per query (the paper: 20).
        cache_dir: where BM25 indexes are cached (``None``: not cached).
        k1, b: BM25 parameters (default 0.9 / 0.4, Anserini's).
    """
    seed = _check_seed(seed)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0 (first-stage passages per query), got {depth!r}")
    if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(num_queries, int)
                                    or num_queries < 1):
        raise ValueError(f"num_queries must be None (all) or an integer >= 1, got {num_queries!r}")
    name = str(getattr(collection, "name", "") or "collection")
    query_texts = {str(q): t for q, t in collection.queries().items()}
    all_qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in collection.qrels().items()}
    eligible = sorted(q for q, docs in all_qrels.items()
                      if any(g > 0 for g in docs.values()) and (query_texts.get(q) or "").strip())
    if not eligible:
        raise ValueError(f"dataset {name}: no query has both a text and a relevant judgment (grade > 0)")
    if num_queries is not None and num_queries < len(eligible):
        chosen = set(random.Random(seed).sample(eligible, num_queries))
        eligible = [q for q in eligible if q in chosen]

    run = _first_stage(collection, eligible, depth)
    if run is not None:
        source = "scoreddocs"
        absent = [q for q in eligible if q not in run]
        if absent:
            warnings.warn(f"dataset {name}: {len(absent)} sampled queries are not in its first-stage run "
                          f"(e.g. {absent[:3]}); they are left out", stacklevel=2)
            eligible = [q for q in eligible if q in run]
            if not eligible:
                raise ValueError(f"dataset {name}: none of the sampled queries is in its first-stage run")
    else:
        source = "bm25"
        queries_for_bm25 = {q: query_texts[q] for q in eligible}
        run = bm25_run(collection, queries_for_bm25, depth, cache_dir, k1, b, progress) if depth else {}
    queries = {q: query_texts[q] for q in eligible}
    docs = {}
    for q in queries:
        listed = [str(d) for d, _ in run.get(q, [])]
        relevant = [d for d, g in sorted(all_qrels[q].items()) if g > 0]
        docs[q] = list(dict.fromkeys(listed + relevant))
    wanted = sorted({d for ds in docs.values() for d in ds})
    passages = {str(d): t for d, t in collection.doc_texts(wanted).items() if t is not None}
    missing = [d for d in wanted if d not in passages]
    if missing:
        warnings.warn(f"dataset {name}: {len(missing)} candidate passages are not in the corpus "
                      f"(e.g. {missing[:3]}); they are left out of the reranking", stacklevel=2)
        docs = {q: [d for d in ds if d in passages] for q, ds in docs.items()}
    return Candidates(name=name, queries=queries, docs=docs, passages=passages,
                      qrels={q: all_qrels[q] for q in queries}, source=source)


# ========================================================== 4. reranking
@dataclass
class EncodedCandidates:
    """Candidate pairs tokenised once, in padded batches of similar length.

    Attributes:
        batches: per batch, the model inputs (``input_ids``, ``attention_mask``
            and, if the tokenizer makes them, ``token_type_ids``), each
            ``[batch, tokens]`` int64.
        rows: per batch, ``[batch]`` int64 positions of its pairs in
            ``Candidates.pairs()``.
        num_pairs: number of pairs.
    """

    batches: List[Dict[str, torch.Tensor]]
    rows: List[torch.Tensor]
    num_pairs: int

    def to(self, device) -> "EncodedCandidates":
        return EncodedCandidates([{k: v.to(device) for k, v in b.items()} for b in self.batches],
                                 self.rows, self.num_pairs)


def encode_candidates(tokenizer, candidates: Candidates, max_length: int = 512, batch_size: int = 32
                      ) -> EncodedCandidates:
    """Tokenise every (query, passage) candidate pair once (``truncation="only_second"``).

    Pairs are sorted by length so that a batch holds pairs of similar length
    (less padding; the scores do not depend on the batching).  A query longer
    than ``max_length`` on its own is truncated too (``longest_first``).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4 (tokens), got {max_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (pairs per forward pass), got {batch_size!r}")
    pairs = candidates.pairs()
    queries = [candidates.queries[q] for q, _ in pairs]
    passages = [candidates.passages[d] or "" for _, d in pairs]
    names = [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
             if n in ("input_ids", "attention_mask", "token_type_ids")]
    encoded: List[Dict[str, List[int]]] = []
    chunk = 1024
    for start in range(0, len(pairs), chunk):
        q, p = queries[start:start + chunk], passages[start:start + chunk]
        try:
            enc = tokenizer(q, p, truncation="only_second", max_length=max_length)
            encoded += [{n: enc[n][i] for n in names if n in enc} for i in range(len(q))]
        except Exception:  # some query alone exceeds max_length: encode pair by pair
            for qi, pi in zip(q, p):
                try:
                    one = tokenizer(qi, pi, truncation="only_second", max_length=max_length)
                except Exception:
                    one = tokenizer(qi, pi, truncation="longest_first", max_length=max_length)
                encoded.append({n: one[n] for n in names if n in one})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]["input_ids"]))
    batches, rows = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]["input_ids"]) for i in idx)
        batch = {}
        for key in encoded[idx[0]]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([encoded[i][key] + [fill] * (width - len(encoded[i][key])) for i in idx],
                                      dtype=torch.long)
        batches.append(batch)
        rows.append(torch.tensor(idx, dtype=torch.long))
    return EncodedCandidates(batches, rows, len(pairs))


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


def score_candidates(model: nn.Module, encoded: EncodedCandidates, progress: bool = True,
                     desc: str = "rerank", partial: bool = False) -> np.ndarray:
    """Relevance scores (:func:`relevance_score`) of every encoded pair.

    Returns:
        float64 ``[num_pairs]``, in ``Candidates.pairs()`` order.  With
        ``partial`` (``encoded`` holds only some batches, e.g. one rank's
        share), the pairs of the other batches are 0.
    """
    import inspect

    from tqdm.auto import tqdm

    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device
    scores = (torch.zeros if partial else torch.empty)(encoded.num_pairs, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), first_token_only(model):
            for batch, rows in tqdm(list(zip(encoded.batches, encoded.rows)), desc=desc, unit="batch",
                                    disable=not progress, leave=False):
                inputs = {k: v.to(device) for k, v in batch.items() if k in accepted}
                scores[rows] = relevance_score(model(**inputs).logits).double().cpu()
    finally:
        model.train(was_training)
    if not torch.isfinite(scores).all():
        raise ValueError("the model produced NaN/Inf scores for some candidates (overflow in a low-precision "
                         "dtype?); rerank in float32")
    return scores.numpy()


# ============================================================ 5. metrics
def ndcg_at_k(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], k: int = 10
              ) -> Dict[str, float]:
    """nDCG@k of each query with ranx (gain = grade, Järvelin & Kekäläinen; grades <= 0 count 0).

    Ties in score are broken by doc id, descending, as trec_eval does, so the
    values equal trec_eval's / pytrec_eval's ``ndcg_cut_k``.  Queries of
    ``qrels`` without any relevant judgment are skipped (nDCG is undefined);
    a query missing from ``run`` scores 0.  Uses ranx's numba kernel
    (``ranx.metrics.ndcg``) on arrays built here, which avoids compiling
    ranx's string-keyed containers on every new process.

    Returns:
        qid -> nDCG@k, for every query of ``qrels`` with a relevant judgment.
    """
    from numba.typed import List as TypedList
    from ranx.metrics import ndcg

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (rank cutoff), got {k!r}")
    qids, qrels_arrays, run_arrays = [], [], []
    for qid, judged in qrels.items():
        qid = str(qid)
        relevant = sorted(((str(d), int(g)) for d, g in judged.items() if int(g) > 0), key=lambda dg: -dg[1])
        if not relevant:
            continue
        docs = {str(d): float(s) for d, s in run.get(qid, {}).items()}
        # trec_eval's order: score descending, then doc id descending.
        ranking = sorted(docs, key=lambda d: (docs[d], d), reverse=True)
        number = {d: i for i, d in enumerate(dict.fromkeys([d for d, _ in relevant] + ranking))}
        qids.append(qid)
        qrels_arrays.append(np.array([[number[d], g] for d, g in relevant], dtype=np.float64).reshape(-1, 2))
        run_arrays.append(np.array([[number[d], len(ranking) - i] for i, d in enumerate(ranking)],
                                   dtype=np.float64).reshape(-1, 2))
    if not qids:
        raise ValueError("qrels has no relevant judgment (grade > 0): nDCG is undefined")
    values = ndcg(TypedList(qrels_arrays), TypedList(run_arrays), k)
    return {q: float(v) for q, v in zip(qids, values)}


@dataclass
class Comparison:
    """A pruned model vs the original on the same queries.

    ``drop_percent`` = (original - pruned) / original * 100 of the mean
    nDCG (positive = the pruned model is worse); ``p_value`` of the
    two-tailed paired t-test over queries (1.0 when nothing changed).
    """

    ndcg_original: float
    ndcg_pruned: float
    drop_percent: float
    p_value: float
    significant: bool


def compare_ndcg(original: Sequence[float], pruned: Sequence[float], alpha: float = SIGNIFICANCE_LEVEL
                 ) -> Comparison:
    """% drop of the mean nDCG and a two-tailed paired t-test (scipy ``ttest_rel``), significant at p <= alpha.

    Args:
        original, pruned: per-query nDCG, ``[num_queries]``, same query order.
    """
    from scipy.stats import ttest_rel

    a = np.asarray(original, dtype=np.float64)
    p = np.asarray(pruned, dtype=np.float64)
    if a.shape != p.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"original and pruned must be per-query arrays of the same length, got {a.shape} and "
                         f"{p.shape}")
    mean_a, mean_p = float(a.mean()), float(p.mean())
    drop = (mean_a - mean_p) / mean_a * 100.0 if mean_a != 0 else math.nan
    diff = a - p
    if not diff.any():
        p_value = 1.0
    elif a.size < 2:
        p_value = math.nan
    elif np.all(diff == diff[0]):  # constant non-zero difference: t is infinite
        p_value = 0.0
    else:
        p_value = float(ttest_rel(a, p).pvalue)
    significant = bool(not math.isnan(p_value) and p_value <= alpha)
    return Comparison(mean_a, mean_p, drop, p_value, significant)


# ========================================================== 6. benchmark
@dataclass
class PruningResult:
    """One neuron set on one dataset.

    ``per_query_original`` / ``per_query_pruned``: ``[num_queries]`` nDCG@k.
    """

    name: str
    num_neurons: int
    comparison: Comparison
    per_query_original: np.ndarray
    per_query_pruned: np.ndarray

    @property
    def drop_percent(self) -> float:
        return self.comparison.drop_percent

    @property
    def p_value(self) -> float:
        return self.comparison.p_value

    @property
    def significant(self) -> bool:
        return self.comparison.significant


@dataclass
class RandomBaseline:
    """Random sets matching a neuron set's per-module counts, one result per repetition.

    ``ndcg_pruned``, ``drop_percent``, ``p_values``: ``[repetitions]``.
    """

    num_neurons: int
    seed: int
    ndcg_pruned: np.ndarray
    drop_percent: np.ndarray
    p_values: np.ndarray
    alpha: float = SIGNIFICANCE_LEVEL

    @property
    def repetitions(self) -> int:
        return int(self.drop_percent.size)

    @property
    def mean_drop(self) -> float:
        return float(self.drop_percent.mean()) if self.repetitions else math.nan

    @property
    def std_drop(self) -> float:
        """Sample standard deviation (ddof=1) of the drop over repetitions; 0 for one repetition."""
        return float(self.drop_percent.std(ddof=1)) if self.repetitions > 1 else 0.0

    @property
    def num_significant(self) -> int:
        return int(np.sum(self.p_values <= self.alpha))


class PruningBenchmark:
    """Reranking one validation dataset with pruned versions of one model.

    The candidates are tokenised once and the original model's scores
    computed once; every pruned run reuses both and prunes the model in place
    (:func:`pruned`), restoring it afterwards.

    Args:
        model: the cross-encoder (evaluated on its current device and dtype).
        tokenizer: its fast tokenizer.
        candidates: from :func:`build_candidates`.
        batch_size: pairs per forward pass.
        max_length: tokens of a pair encoding.
        k: the nDCG cutoff (10).
        alpha: significance level of the paired t-test (0.05).
        progress: show progress bars.
    """

    def __init__(self, model: nn.Module, tokenizer, candidates: Candidates, batch_size: int = 32,
                 max_length: int = 512, k: int = 10, alpha: float = SIGNIFICANCE_LEVEL, progress: bool = True):
        if not isinstance(candidates, Candidates):
            raise TypeError(f"candidates must be a fastnig.pruning.Candidates, got {type(candidates).__name__}")
        if candidates.num_pairs == 0:
            raise ValueError(f"dataset {candidates.name}: there are no candidate passages to rerank")
        self.model = model
        self.candidates = candidates
        self.k, self.alpha, self.progress = k, alpha, progress
        self.qids = list(candidates.queries)
        self.pairs = candidates.pairs()
        device = next(model.parameters()).device
        self.encoded = encode_candidates(tokenizer, candidates, max_length, batch_size).to(device)
        self._original_scores: Optional[np.ndarray] = None
        self._original_ndcg: Optional[np.ndarray] = None

    @property
    def name(self) -> str:
        return self.candidates.name

    @property
    def original_scores(self) -> np.ndarray:
        """``[num_pairs]`` scores of the unpruned model (computed once)."""
        if self._original_scores is None:
            self._original_scores = self.score(desc=f"{self.name}: original")
        return self._original_scores

    def score(self, desc: str) -> np.ndarray:
        """``[num_pairs]`` scores of the model as it is now (pruned or not)."""
        return score_candidates(self.model, self.encoded, self.progress, desc=desc)

    @property
    def original_ndcg(self) -> np.ndarray:
        """``[num_queries]`` nDCG@k of the unpruned model."""
        if self._original_ndcg is None:
            self._original_ndcg = self.ndcg(self.original_scores)
        return self._original_ndcg

    def run(self, scores: np.ndarray) -> Dict[str, Dict[str, float]]:
        """qid -> doc id -> score, from ``[num_pairs]`` scores."""
        out: Dict[str, Dict[str, float]] = {q: {} for q in self.qids}
        for (q, d), s in zip(self.pairs, scores):
            out[q][d] = float(s)
        return out

    def ndcg(self, scores: np.ndarray) -> np.ndarray:
        """``[num_queries]`` nDCG@k of the reranking given by ``scores``."""
        per_query = ndcg_at_k(self.run(scores), self.candidates.qrels, self.k)
        return np.array([per_query[q] for q in self.qids], dtype=np.float64)

    def pruned_scores(self, neuron_set, desc: str = "pruned") -> np.ndarray:
        """``[num_pairs]`` scores with ``neuron_set`` pruned (the original's for an empty set)."""
        if not module_counts(neuron_set):
            _resolve(self.model, neuron_set)  # still validate the set against the model
            return self.original_scores
        with pruned(self.model, neuron_set):
            return self.score(desc=f"{self.name}: {desc}")

    def evaluate(self, neuron_set) -> PruningResult:
        """nDCG@k with ``neuron_set`` pruned vs the original model."""
        original = self.original_ndcg
        label = str(getattr(neuron_set, "name", "") or "set")
        pruned_ndcg = self.ndcg(self.pruned_scores(neuron_set, desc=label))
        return PruningResult(label, sum(module_counts(neuron_set).values()),
                             compare_ndcg(original, pruned_ndcg, self.alpha), original, pruned_ndcg)

    def random_baseline(self, neuron_set, repetitions: int = DEFAULT_REPETITIONS, seed: int = 0
                        ) -> RandomBaseline:
        """Prune ``repetitions`` random sets drawn with :func:`random_like` (same per-module counts)."""
        if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
            raise ValueError(f"repetitions must be an integer >= 1, got {repetitions!r}")
        seed = _check_seed(seed)
        original = self.original_ndcg
        ndcg, drops, p_values = [], [], []
        for r in range(repetitions):
            random_set = random_like(neuron_set, seed, r)
            pruned_ndcg = self.ndcg(self.pruned_scores(random_set, desc=f"random {r + 1}/{repetitions}"))
            comparison = compare_ndcg(original, pruned_ndcg, self.alpha)
            ndcg.append(comparison.ndcg_pruned)
            drops.append(comparison.drop_percent)
            p_values.append(comparison.p_value)
        return RandomBaseline(sum(module_counts(neuron_set).values()), seed, np.array(ndcg), np.array(drops),
                              np.array(p_values), self.alpha)


# ============================================================== 7. table
def _level_key(level) -> float:
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"pruning levels must be numbers (percent of all neurons), got {level!r}") from None
    if not 0 < value <= 100:
        raise ValueError(f"pruning levels must be in (0, 100] (percent of all neurons), got {level!r}")
    return value


def table_row(bench: "PruningBenchmark", set_name: str, level: float, result: "PruningResult",
              rand: "RandomBaseline", group: Optional[str] = None, dataset: Optional[str] = None) -> Dict[str, Any]:
    """One row of Table 4 (:data:`CSV_COLUMNS`): a set at a level on one dataset, and its random baseline."""
    c = result.comparison
    dataset = dataset or bench.name
    return {
        "set": set_name, "level_percent": _level_key(level), "dataset": dataset, "group": group or dataset,
        "num_neurons": result.num_neurons, "num_queries": len(bench.qids),
        "num_candidates": bench.candidates.num_pairs, "ndcg_original": c.ndcg_original,
        "ndcg_pruned": c.ndcg_pruned, "drop_percent": c.drop_percent, "p_value": c.p_value,
        "significant": c.significant, "random_repetitions": rand.repetitions,
        "random_ndcg_mean": float(rand.ndcg_pruned.mean()), "random_drop_mean": rand.mean_drop,
        "random_drop_std": rand.std_drop, "random_significant": rand.num_significant,
    }


def evaluate_pruning(model: nn.Module, tokenizer, neuron_sets: Mapping[str, Mapping[float, Any]],
                     datasets: Mapping[str, Union[Candidates, PruningBenchmark]],
                     groups: Optional[Mapping[str, str]] = None, repetitions: int = DEFAULT_REPETITIONS,
                     seed: int = 0, batch_size: int = 32, max_length: int = 512, k: int = 10,
                     alpha: float = SIGNIFICANCE_LEVEL, progress: bool = True) -> "PruningTable":
    """The paper's Table 4: every neuron set x pruning level x dataset, with its random baseline.

    Args:
        model, tokenizer: the cross-encoder and its fast tokenizer.
        neuron_sets: set name (e.g. ``"P_ms"``) -> pruning level in percent
            (e.g. ``0.1``) -> NeuronSet.
        datasets: dataset name -> its :class:`Candidates` (or a ready
            :class:`PruningBenchmark`); evaluated one after the other.
        groups: dataset name -> table row label; datasets sharing a label are
            averaged into one row with the count of significant ones (e.g. the
            five LoTTE domains -> ``"LoTTE benchmark"``).  Default: each
            dataset its own row.
        repetitions: random sets per (set, level) (the paper: 50); the same
            random sets are used on every dataset, and sets with identical
            per-module counts share their random runs.
        seed: seed of the random baseline.
    Returns:
        a :class:`PruningTable` with one row per set x level x dataset.
    """
    if not neuron_sets:
        raise ValueError("neuron_sets is empty: give {set name: {level: NeuronSet}}")
    if not datasets:
        raise ValueError("datasets is empty: give {dataset name: Candidates}")
    groups = dict(groups or {})
    unknown = [g for g in groups if g not in datasets]
    if unknown:
        raise ValueError(f"groups names datasets that are not in datasets: {unknown}")
    plan = [(name, _level_key(level), nset) for name, by_level in neuron_sets.items()
            for level, nset in by_level.items()]
    from tqdm.auto import tqdm

    rows = []
    for dataset_name, data in datasets.items():
        bench = data if isinstance(data, PruningBenchmark) else PruningBenchmark(
            model, tokenizer, data, batch_size, max_length, k, alpha, progress)
        bench.original_ndcg  # noqa: B018 (computed once, before any pruning)
        bench.progress = False  # then one bar per dataset below instead of one per reranking
        random_cache: Dict[Tuple, RandomBaseline] = {}
        for set_name, level, nset in tqdm(plan, desc=f"{dataset_name}: sets x levels", unit="set",
                                          disable=not progress):
            result = bench.evaluate(nset)
            signature = tuple(module_counts(nset).items())
            if signature not in random_cache:
                random_cache[signature] = bench.random_baseline(nset, repetitions, seed)
            rows.append(table_row(bench, set_name, level, result, random_cache[signature],
                                  group=groups.get(dataset_name, dataset_name), dataset=dataset_name))
        del bench
    return PruningTable(rows)


def _parse_cell(column: str, text: str):
    if column in ("set", "dataset", "group"):
        return text
    if column == "significant":
        return text.strip().lower() in ("true", "1", "yes")
    if column in ("num_neurons", "num_queries", "num_candidates", "random_repetitions", "random_significant"):
        return int(text)
    return float(text)


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _latex_escape(text: str) -> str:
    if "$" in text:  # already LaTeX (e.g. "$\cap_{o \in O} P_o$")
        return text
    text = re.sub(r"([&%#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
    for symbol, command in (("∩", r"$\cap$"), ("∪", r"$\cup$"), ("⊕", r"$\oplus$")):
        text = text.replace(symbol, command)
    return text


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


@dataclass
class PruningTable:
    """Table 4 results: one row per neuron set x level x dataset (columns :data:`CSV_COLUMNS`).

    :meth:`summary` averages each (set, level, group) over the group's
    datasets; :meth:`to_markdown` / :meth:`to_latex` lay it out as the paper
    does (rows = set x dataset group, columns = levels; "(n)" = datasets with
    a significant difference; the biggest drop of each level and group in
    bold, the second biggest underlined), plus a "Random baseline" row: the
    matched random drops averaged over the sets.
    """

    rows: List[Dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------ io
    def to_csv(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: row[c] for c in CSV_COLUMNS})
        return path

    @classmethod
    def from_csv(cls, path: Union[str, Path]) -> "PruningTable":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a fastnig pruning table (missing columns {missing})")
            return cls([{c: _parse_cell(c, row[c]) for c in CSV_COLUMNS} for row in reader])

    def write(self, folder: Union[str, Path], stem: str = "table4") -> Dict[str, Path]:
        """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.tex`` into ``folder``; returns the paths by format."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"csv": self.to_csv(folder / f"{stem}.csv"), "markdown": folder / f"{stem}.md",
                 "latex": folder / f"{stem}.tex"}
        paths["markdown"].write_text(self.to_markdown())
        paths["latex"].write_text(self.to_latex())
        return paths

    # ------------------------------------------------------- summary
    def _ordered(self, column: str) -> List:
        return list(dict.fromkeys(row[column] for row in self.rows))

    def summary(self) -> List[Dict[str, Any]]:
        """Per (set, level, group): mean drop over the group's datasets, datasets significant, random mean drop."""
        out = []
        for set_name in self._ordered("set"):
            for level in sorted(self._ordered("level_percent")):
                for group in self._ordered("group"):
                    rows = [r for r in self.rows if (r["set"], r["level_percent"], r["group"]) == (set_name, level,
                                                                                                   group)]
                    if not rows:
                        continue
                    out.append({
                        "set": set_name, "level_percent": level, "group": group, "num_datasets": len(rows),
                        "drop_percent": float(np.mean([r["drop_percent"] for r in rows])),
                        "num_significant": sum(bool(r["significant"]) for r in rows),
                        "random_drop_mean": float(np.mean([r["random_drop_mean"] for r in rows])),
                    })
        return out

    def _grid(self, bold, underline, random_label="Random baseline"):
        """Rows of (set label, group, [cell per level]) with marks applied by the given formatters."""
        summary = self.summary()
        levels = sorted(self._ordered("level_percent"))
        groups = self._ordered("group")
        cell = {(s["set"], s["level_percent"], s["group"]): s for s in summary}
        rank: Dict[Tuple, int] = {}
        for level in levels:
            for group in groups:
                values = sorted({round(s["drop_percent"], 2) for s in summary
                                 if s["level_percent"] == level and s["group"] == group
                                 and not math.isnan(s["drop_percent"])}, reverse=True)
                for s in summary:
                    if s["level_percent"] == level and s["group"] == group and not math.isnan(s["drop_percent"]):
                        v = round(s["drop_percent"], 2)
                        if v in values[:2]:
                            rank[(s["set"], level, group)] = values.index(v)
        grid = []
        for set_name in self._ordered("set"):
            for group in groups:
                cells = []
                for level in levels:
                    s = cell.get((set_name, level, group))
                    if s is None:
                        cells.append("–")
                        continue
                    text = _fmt(s["drop_percent"])
                    mark = rank.get((set_name, level, group))
                    text = bold(text) if mark == 0 else underline(text) if mark == 1 else text
                    if s["num_significant"]:
                        text += f" ({s['num_significant']})"
                    cells.append(text)
                grid.append((set_name, group, cells))
        for group in groups:
            cells = []
            for level in levels:
                values = [s["random_drop_mean"] for s in summary if s["level_percent"] == level and s["group"] == group]
                cells.append(_fmt(float(np.mean(values))) if values else "–")
            grid.append((random_label, group, cells))
        return levels, grid

    def to_markdown(self) -> str:
        """The paper's Table 4 as a Markdown table (bold = biggest drop, underlined = second)."""
        levels, grid = self._grid(lambda t: f"**{t}**", lambda t: f"<u>{t}</u>")
        head = ["Sets of neurons pruned", "Datasets"] + [f"{level:g}%" for level in levels]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        previous = None
        for set_name, group, cells in grid:
            label = set_name if set_name != previous else ""
            previous = set_name
            lines.append("| " + " | ".join([_markdown_escape(label), _markdown_escape(group)] + cells) + " |")
        lines += ["", "% of nDCG@10 difference between the original and the pruned model, (original - pruned) / "
                  "original * 100 (positive = worse). (n): datasets of the row with a significant difference "
                  "(two-tailed paired t-test over queries, p <= 0.05). Bold: biggest drop at each level and "
                  "dataset row, underlined: second biggest. Random baseline: the same number of neurons in the "
                  "same modules, drawn at random, averaged over the repetitions and over the sets."]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """The paper's Table 4 as a LaTeX ``tabular`` (booktabs; ``\\textbf`` / ``\\underline`` marks)."""
        levels, grid = self._grid(lambda t: f"\\textbf{{{t}}}", lambda t: f"\\underline{{{t}}}")
        cols = "ll" + "r" * len(levels)
        lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
                 r"Sets of neurons pruned & Datasets & \multicolumn{" + str(len(levels))
                 + r"}{c}{\% of nDCG@10 diff.} \\",
                 " & & " + " & ".join(f"{level:g}\\%" for level in levels) + r" \\", r"\midrule"]
        previous = None
        for set_name, group, cells in grid:
            if previous is not None and set_name != previous:
                lines.append(r"\midrule")
            label = _latex_escape(set_name) if set_name != previous else ""
            previous = set_name
            lines.append(" & ".join([label, _latex_escape(group)] + [c.replace("–", "--") for c in cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
